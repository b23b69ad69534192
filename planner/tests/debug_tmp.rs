mod common;
use pshard_planner::cost::{PlanParams, TierModel};
use pshard_planner::placement::{place, steps, Frac, Strategy};
use pshard_planner::CostTable;
use std::time::Instant;
#[test]
fn dbg() {
    let (cpu, gpu) = common::h200_profiles();
    let table = CostTable::new(Some(&cpu), Some(&gpu), 16);
    let params = PlanParams::new(16384);
    let spec = common::spec("llama3-70b");
    let t0 = Instant::now();
    let g = common::graph(&spec, 4096, 1).unwrap();
    println!("graph {:?}", t0.elapsed());
    let t0 = Instant::now();
    let m = TierModel::new(&spec, &table, &params, &g, true);
    println!("model {:?}", t0.elapsed());
    let st = steps(&spec, Strategy::GpuonlyLayerpinLayerstream);
    let t0 = Instant::now();
    let mut pl = place(&spec, Strategy::GpuonlyLayerpinLayerstream, &st, 0, Frac(0));
    println!("place {:?}", t0.elapsed());
    let t0 = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(m.bill(&pl));
    }
    println!("bill x100 {:?}", t0.elapsed());
    let t0 = Instant::now();
    let mut inc = m.incremental(&pl);
    println!("incremental {:?}", t0.elapsed());
    let t0 = Instant::now();
    for k in 0..st.len() {
        let gs = pshard_planner::placement::apply_step(&spec, &mut pl, st[k]);
        inc.update(&pl, &gs);
        std::hint::black_box(inc.eval());
    }
    println!("{} updates {:?}", st.len(), t0.elapsed());
    let t0 = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(pl.clone());
    }
    println!("clone x100 {:?}", t0.elapsed());
}
