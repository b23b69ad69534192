use super::*;
use pshard_model::synth;
use pshard_planner::placement::{place, steps, Strategy};
use pshard_planner::Frac;

fn spec(preset: &str) -> ModelSpec {
    let p = synth::preset(preset).unwrap();
    let h = synth::plan(&p, synth::QuantRecipe::from_name("q8_0").unwrap())
        .header()
        .unwrap();
    ModelSpec::from_gguf(&h, &h.tensors, preset).unwrap()
}

fn lower(spec: &ModelSpec, pl: &Placement, n: usize) -> Program {
    let g = pshard_model::arch::build_graph(spec, n, 1).unwrap();
    Program::lower(spec, g, pl, 2, false)
}

#[test]
fn all_cpu_programs_have_only_cpu_steps() {
    let s = spec("tiny-llama");
    let p = lower(&s, &Placement::uniform(&s, pshard_planner::Place::Cpu), 4);
    assert!(p.steps.iter().all(|st| st.kind.lane() == Lane::Cpu));
    assert!(p.steps.iter().all(|st| st.waits.is_empty()));
    assert_eq!(p.n_events, 0);
    // Every node once, in order (matmuls of one input grouped).
    let nodes: Vec<usize> = p
        .steps
        .iter()
        .flat_map(|st| {
            assert!(
                !matches!(st.kind, StepKind::Cpu { cols: Some(_), .. }),
                "{:?} in an all-CPU program",
                st.kind
            );
            st.kind.cpu_nodes()
        })
        .collect();
    assert_eq!(nodes, (0..p.graph.nodes.len()).collect::<Vec<_>>());
}

/// All-CPU programs run each layer's q/k/v, and its gate/up, as one matmul step (consecutive
/// matmuls of one input); nothing else is grouped, and nothing in exact mode.
#[test]
fn cpu_matmuls_of_one_input_are_one_step() {
    let s = spec("tiny-llama");
    let cpu = Placement::uniform(&s, pshard_planner::Place::Cpu);
    for exact in [false, true] {
        let g = pshard_model::arch::build_graph(&s, 3, 1).unwrap();
        let p = Program::lower(&s, g, &cpu, 2, exact);
        let groups: Vec<Vec<String>> = p
            .steps
            .iter()
            .filter_map(|st| match &st.kind {
                StepKind::CpuMatMuls { nodes } => Some(
                    nodes
                        .clone()
                        .map(|ni| match p.graph.nodes[ni].op {
                            Op::MatMul { weight, .. } => s.tensor(weight).name.clone(),
                            ref op => panic!("{op:?} grouped"),
                        })
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        if exact {
            assert!(groups.is_empty(), "{groups:?}");
            continue;
        }
        let want: Vec<Vec<String>> = (0..s.layers.len())
            .flat_map(|l| {
                [
                    vec![
                        format!("blk.{l}.attn_q.weight"),
                        format!("blk.{l}.attn_k.weight"),
                        format!("blk.{l}.attn_v.weight"),
                    ],
                    vec![
                        format!("blk.{l}.ffn_gate.weight"),
                        format!("blk.{l}.ffn_up.weight"),
                    ],
                ]
            })
            .collect();
        assert_eq!(groups, want);
    }
}

#[test]
fn streamed_layers_load_one_segment_ahead_into_alternate_slots() {
    let s = spec("tiny-llama");
    let st = steps(&s, Strategy::GpuonlyLayerpinLayerstream);
    // Only the output pinned: every layer streams.
    let pl = place(&s, Strategy::GpuonlyLayerpinLayerstream, &st, 1, Frac(0));
    let p = lower(&s, &pl, 16);
    let loads: Vec<(usize, usize, usize)> = p
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, st)| match st.kind {
            StepKind::Load { seg, slot } => Some((i, seg, slot)),
            _ => None,
        })
        .collect();
    let n_layers = s.layers.len();
    assert_eq!(loads.len(), n_layers);
    for (j, &(_, seg, slot)) in loads.iter().enumerate() {
        assert_eq!(slot, j % 2, "slot of the {j}th load");
        assert_eq!(p.lanes.segments[seg].seg.layer, Some(j));
    }
    // The second layer's load is issued before the first layer's first GPU step ends.
    let first_gpu = p
        .steps
        .iter()
        .position(|st| matches!(st.kind, StepKind::Gpu(_)))
        .unwrap();
    assert!(
        loads[1].0 < first_gpu,
        "layer 1 loads while layer 0 computes"
    );
    // Every GPU step reading a slot waits (directly or through an earlier wait) for its load,
    // and every load after the first two waits for the compute that used its slot last.
    for &(i, _, _) in &loads[2..] {
        assert!(!p.steps[i].waits.is_empty(), "load at step {i} must wait");
    }
}

#[test]
fn split_matmuls_issue_the_gpu_part_before_the_cpu_part() {
    let s = spec("tiny-llama");
    let st = steps(&s, Strategy::BandwidthAggregation);
    let pl = place(&s, Strategy::BandwidthAggregation, &st, 1, Frac(6000));
    let p = lower(&s, &pl, 1);
    let mut seen = 0;
    for (i, step) in p.steps.iter().enumerate() {
        if let StepKind::Cpu {
            node,
            cols: Some(c),
        } = &step.kind
        {
            seen += 1;
            let gpu = p.steps[..i].iter().rposition(|x| {
                matches!(&x.kind, StepKind::Gpu(GpuWork::Node { node: m, cols: Some(g), .. }) if m == node && g.start == c.end)
            });
            assert!(
                gpu.is_some(),
                "CPU part of node {node} has its GPU part before it"
            );
        }
    }
    assert!(seen > 0, "aggregation splits matrices");
}

/// Decode programs on the GPU quantize a shared GEMV input once: in every layer the k and v
/// projections reuse q's quantized input and up reuses gate's, and nothing else does; never in
/// exact mode or above the int8-GEMV batch.
#[test]
fn decode_gemvs_share_their_quantized_input() {
    let p = synth::preset("tiny-llama").unwrap();
    let h = synth::plan(&p, synth::QuantRecipe::from_name("q4_k").unwrap())
        .header()
        .unwrap();
    let s = ModelSpec::from_gguf(&h, &h.tensors, "tiny-llama").unwrap();
    let gpu = Placement::uniform(&s, pshard_planner::Place::Pinned);
    let reused = |n: usize, exact: bool| -> Vec<String> {
        let g = pshard_model::arch::build_graph(&s, n, 1).unwrap();
        let prog = Program::lower(&s, g, &gpu, 2, exact);
        prog.steps
            .iter()
            .filter_map(|st| match &st.kind {
                StepKind::Gpu(GpuWork::Node {
                    node,
                    reuse_acts: true,
                    ..
                }) => match prog.graph.nodes[*node].op {
                    Op::MatMul { weight, .. } => Some(s.tensor(weight).name.clone()),
                    ref op => panic!("reuse flagged on {op:?}"),
                },
                _ => None,
            })
            .collect()
    };
    let n_layer = s.layers.len();
    let names = reused(1, false);
    assert_eq!(names.len(), 3 * n_layer, "{names:?}");
    for l in 0..n_layer {
        for t in ["attn_k", "attn_v", "ffn_up"] {
            let want = format!("blk.{l}.{t}.weight");
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
    let max = pshard_kernels::cuda::GEMV_INT8_MAX_ROWS;
    assert_eq!(reused(max, false).len(), 3 * n_layer);
    assert!(reused(1, true).is_empty());
    assert!(reused(max + 1, false).is_empty());
}

/// The q/k norms and rotary embeddings become one launch per layer: qwen3 (per-head q/k norms)
/// fuses norm q, norm k, rope q, rope k; llama its two ropes; nothing else is fused, and nothing
/// is fused across a CPU step (a CPU-placed attention keeps its ops).
#[test]
fn qk_norms_and_ropes_fuse_into_one_launch_per_layer() {
    for (name, with_norm) in [("tiny-qwen3", true), ("tiny-llama", false)] {
        let s = spec(name);
        let gpu = Placement::uniform(&s, pshard_planner::Place::Pinned);
        let p = lower(&s, &gpu, 3);
        let fused: Vec<&std::ops::Range<usize>> = p
            .steps
            .iter()
            .filter_map(|st| match &st.kind {
                StepKind::Gpu(GpuWork::QkNormRope { nodes }) => Some(nodes),
                _ => None,
            })
            .collect();
        assert_eq!(fused.len(), s.layers.len(), "{name}");
        for r in &fused {
            assert_eq!(r.len(), if with_norm { 4 } else { 2 }, "{name}");
            for ni in (*r).clone() {
                assert!(matches!(
                    p.graph.nodes[ni].op,
                    Op::Rope { .. } | Op::HeadRmsNorm { .. }
                ));
            }
        }
        let gpu_nodes = p
            .steps
            .iter()
            .filter(|st| matches!(st.kind, StepKind::Gpu(GpuWork::Node { .. })))
            .count();
        let covered: usize = fused.iter().map(|r| r.len()).sum();
        assert_eq!(gpu_nodes + covered, p.graph.nodes.len(), "{name}");
        // All on the CPU: nothing to fuse.
        let cpu = lower(&s, &Placement::uniform(&s, pshard_planner::Place::Cpu), 3);
        assert!(cpu
            .steps
            .iter()
            .all(|st| !matches!(st.kind, StepKind::Gpu(_))));
    }
}
