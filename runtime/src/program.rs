//! Programs: a graph lowered once for a batch size into steps on lanes with explicit dependencies,
//! and buffers with a memory space and a lifetime.
//!
//! The topology depends only on the batch shape: token ids, positions, KV length and logit rows are
//! inputs of each run, so a program is reused for every batch of its size. Today every step runs on
//! the CPU lane; the hybrid runtime assigns GPU lanes and copy steps from a plan.

use pshard_model::arch::{build_graph, GraphError};
use pshard_model::graph::{BufId, Graph};
use pshard_model::spec::ModelSpec;

/// Where a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// CPU threads.
    Cpu,
    /// The GPU compute stream.
    GpuCompute,
    /// The GPU copy stream.
    GpuCopy,
}

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemSpace {
    /// Ordinary host memory.
    Host,
    /// Page-locked host memory (async copies).
    PinnedHost,
    /// Device memory.
    Device,
}

/// One step: a graph node on a lane, after its dependencies.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Index into the graph's nodes.
    pub node: usize,
    /// Lane it runs on.
    pub lane: Lane,
    /// Steps that must finish first (read-after-write, write-after-read, write-after-write).
    pub deps: Vec<usize>,
}

/// A buffer's placement and lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferPlan {
    /// Memory space.
    pub space: MemSpace,
    /// Bytes at this program's batch size.
    pub bytes: usize,
    /// First step that touches it.
    pub first_step: usize,
    /// Last step that touches it.
    pub last_step: usize,
}

/// A graph lowered for one batch shape.
#[derive(Clone, Debug)]
pub struct Program {
    /// The forward pass.
    pub graph: Graph,
    /// Steps in issue order.
    pub steps: Vec<Step>,
    /// One entry per graph buffer.
    pub buffers: Vec<BufferPlan>,
}

impl Program {
    /// Lowers the model's graph for `n_tokens` tokens (`n_logit_rows` with logits), all on the CPU.
    pub fn for_cpu(
        spec: &ModelSpec,
        n_tokens: usize,
        n_logit_rows: usize,
    ) -> Result<Program, GraphError> {
        let graph = build_graph(spec, n_tokens, n_logit_rows)?;
        Ok(Program::lower(graph, |_| Lane::Cpu, MemSpace::Host))
    }

    /// Lowers a graph, assigning each node a lane and every buffer one memory space.
    pub fn lower(graph: Graph, lane_of: impl Fn(usize) -> Lane, space: MemSpace) -> Program {
        let n_bufs = graph.buffers.len();
        let mut last_writer: Vec<Option<usize>> = vec![None; n_bufs];
        let mut readers_since_write: Vec<Vec<usize>> = vec![Vec::new(); n_bufs];
        let mut buffers: Vec<BufferPlan> = (0..n_bufs)
            .map(|i| BufferPlan {
                space,
                bytes: graph.rows(BufId(i as u32)) * graph.buffers[i].cols * 4,
                first_step: usize::MAX,
                last_step: 0,
            })
            .collect();
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for (i, node) in graph.nodes.iter().enumerate() {
            let reads = node.op.reads();
            let writes = node.op.writes();
            let mut deps = Vec::new();
            for b in &reads {
                deps.extend(last_writer[b.0 as usize]);
            }
            for b in &writes {
                deps.extend(last_writer[b.0 as usize]);
                deps.extend(readers_since_write[b.0 as usize].iter().copied());
            }
            deps.sort_unstable();
            deps.dedup();
            deps.retain(|&d| d != i);
            for b in &reads {
                readers_since_write[b.0 as usize].push(i);
            }
            for b in &writes {
                last_writer[b.0 as usize] = Some(i);
                readers_since_write[b.0 as usize].clear();
            }
            for b in reads.iter().chain(&writes) {
                let p = &mut buffers[b.0 as usize];
                p.first_step = p.first_step.min(i);
                p.last_step = p.last_step.max(i);
            }
            steps.push(Step {
                node: i,
                lane: lane_of(i),
                deps,
            });
        }
        Program {
            graph,
            steps,
            buffers,
        }
    }

    /// Bytes of all activation buffers.
    pub fn buffer_bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pshard_model::graph::{GraphBuilder, Op, Rows};
    use pshard_model::spec::{GroupId, TensorId};

    #[test]
    fn dependencies_follow_buffers() {
        let spec = crate::testutil::empty_spec();
        let mut b = GraphBuilder::new(&spec, 4, 1);
        let x = b.buf("x", Rows::Tokens, 8);
        let y = b.buf("y", Rows::Tokens, 8);
        let g = GroupId(0);
        b.push(
            Op::Embed {
                table: TensorId(0),
                out: x,
                scale: 1.0,
            },
            None,
            g,
        ); // 0 writes x
        b.push(
            Op::RmsNorm {
                x,
                weight: TensorId(1),
                out: y,
                eps: 1e-5,
            },
            None,
            g,
        ); // 1 reads x, writes y
        b.push(Op::Add { a: x, b: y, out: x }, None, g); // 2 reads x,y writes x
        b.push(
            Op::Embed {
                table: TensorId(0),
                out: y,
                scale: 1.0,
            },
            None,
            g,
        ); // 3 writes y (WAR on 2)
        let p = Program::lower(b.finish(x), |_| Lane::Cpu, MemSpace::Host);
        assert_eq!(p.steps[1].deps, vec![0]);
        assert_eq!(p.steps[2].deps, vec![0, 1]);
        assert_eq!(p.steps[3].deps, vec![1, 2]);
        assert_eq!(p.buffers[0].bytes, 4 * 8 * 4);
        assert_eq!((p.buffers[1].first_step, p.buffers[1].last_step), (1, 3));
    }
}
