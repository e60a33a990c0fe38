//! The CPU engine on several threads against the engine as it was before it was split into
//! tiles (kept here as the oracle: one pass over each update in batch order, the apply through
//! the batch's indices, the Top-k from the keys of every entry). Batches cross tile and
//! thread boundaries, are sparse and dense, with and without momentum; every Delta frame and
//! the whole state must be the same bits for every thread count.

mod common;

use common::*;
use half::f16;
use sparsync::engine::cpu::{CpuAggregator, TILE};
use sparsync::engine::{Aggregator, OptimizerSettings, Selection, UpdateRef};
use sparsync::protocol::frame::{DeltaHeader, PushLimits, PushView, encode_delta, encode_push};
use sparsync::protocol::model::SplitMix64;
use sparsync::protocol::numerics::{self, add, canon, mul};
use sparsync::protocol::select::exact_topk;

/// The former single-threaded engine, operation for operation.
struct Oracle {
    x: Vec<f32>,
    m: Vec<f32>,
    replica: Vec<f32>,
    acc: Vec<f32>,
    opt: OptimizerSettings,
    version: u64,
    replica_version: u64,
}

impl Oracle {
    fn new(x0: &[f32], opt: OptimizerSettings) -> Self {
        let x: Vec<f32> = x0.iter().copied().map(canon).collect();
        let n = x.len();
        Self {
            replica: x.clone(),
            m: if opt.momentum != 0.0 { vec![0.0; n] } else { vec![] },
            acc: vec![0.0; n],
            x,
            opt,
            version: 0,
            replica_version: 0,
        }
    }

    fn entries<'a>(u: &'a UpdateRef<'a>) -> impl Iterator<Item = (usize, f32)> + 'a {
        u.indices.chunks_exact(4).zip(u.values.chunks_exact(2)).map(|(i, v)| {
            (u32::from_le_bytes([i[0], i[1], i[2], i[3]]) as usize, f16::from_le_bytes([v[0], v[1]]).to_f32())
        })
    }

    fn apply(x: &mut f32, u: f32, eta: f32) {
        if u != 0.0 {
            *x = add(*x, if eta == 1.0 { u } else { mul(eta, u) });
        }
    }

    fn aggregate(&mut self, batch: &[UpdateRef<'_>]) {
        for u in batch {
            let (hi, lo) = numerics::split_weight(u.weight);
            for (i, v) in Self::entries(u) {
                self.acc[i] = numerics::accumulate(self.acc[i], hi, lo, v);
            }
        }
        let eta = self.opt.server_lr;
        if self.opt.momentum == 0.0 {
            for u in batch {
                for (i, _) in Self::entries(u) {
                    let g = std::mem::take(&mut self.acc[i]);
                    Self::apply(&mut self.x[i], g, eta);
                }
            }
        } else {
            for i in 0..self.x.len() {
                let u = add(mul(self.opt.momentum, self.m[i]), std::mem::take(&mut self.acc[i]));
                self.m[i] = u;
                Self::apply(&mut self.x[i], u, eta);
            }
        }
        self.version += 1;
    }

    fn broadcast(&mut self, k: usize) -> Vec<u8> {
        let keys: Vec<u32> =
            self.x.iter().zip(&self.replica).map(|(&x, &r)| numerics::magnitude_key(canon(x - r))).collect();
        let (mut scratch, mut selected) = (Vec::new(), Vec::new());
        exact_topk(&keys, k, &mut scratch, &mut selected);
        let mut values = Vec::new();
        for &i in &selected {
            let h = numerics::to_f16_sat(canon(self.x[i as usize] - self.replica[i as usize]));
            self.replica[i as usize] = numerics::apply_delta_entry(self.replica[i as usize], h);
            values.push(h);
        }
        let header = DeltaHeader {
            version: self.version,
            base_version: self.replica_version,
            nnz: selected.len() as u32,
        };
        self.replica_version = self.version;
        encode_delta(&header, &selected, &values)
    }
}

/// Updates of mixed density and weight, some dense enough that a tile applies in one sweep.
fn batch(rng: &mut SplitMix64, n: usize, updates: usize, step: usize) -> Vec<(Vec<u8>, f32)> {
    (0..updates)
        .map(|u| {
            let nnz = match (u + step) % 4 {
                0 => n / 3,
                1 => n / 200,
                2 => 1 + rng.next_u64() as usize % 50,
                _ => n / 20,
            };
            let (idx, vals) = random_update(rng, n, nnz, 0.5);
            let w = [1.0, 0.3, 0.7 / 3.0, 0.05][u % 4];
            (encode_push(&header(0, u as u64, idx.len()), &idx, &vals), w)
        })
        .collect()
}

fn run(threads: usize, momentum: f32, lr: f32, seed: u64) {
    let n = 3 * TILE + 4321;
    let opt = OptimizerSettings { momentum, server_lr: lr };
    let x0 = init(n, seed);
    let mut oracle = Oracle::new(&x0, opt);
    let mut e = CpuAggregator::with_threads(x0, opt, threads);
    assert_eq!(e.threads(), threads);
    let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
    let mut rng = SplitMix64::new(seed ^ 77);
    for step in 0..8 {
        let frames = batch(&mut rng, n, 1 + step % 5, step);
        let refs: Vec<UpdateRef<'_>> = frames
            .iter()
            .map(|(f, w)| UpdateRef::from_push(&PushView::decode(f, &limits).unwrap(), *w))
            .collect();
        oracle.aggregate(&refs);
        e.aggregate(&refs).unwrap();
        // k: 1% (the sampled threshold), a quarter (all keys), and a handful.
        let k = [n / 100, n / 4, 7][step % 3];
        let want = oracle.broadcast(k);
        let got = e.broadcast(Selection::Exact { k }).unwrap();
        assert!(got.frame == want, "threads {threads} step {step} k {k}: Delta frames differ");
        let s = e.read_state().unwrap();
        assert_eq!(bits(&s.x), bits(&oracle.x), "threads {threads}: x after step {step}");
        assert_eq!(bits(&s.replica), bits(&oracle.replica), "threads {threads}: x̂ after step {step}");
        assert_eq!(bits(&s.momentum), bits(&oracle.m), "threads {threads}: momentum after step {step}");
    }
    // The sampled threshold took at least some of the 1% selections in one pass.
    let c = e.counters();
    assert!(c.topk_input_passes < 4 * c.broadcasts, "{c:?}");
}

#[test]
fn every_thread_count_gives_the_former_engines_bits() {
    for threads in [1, 2, 3, 8] {
        run(threads, 0.0, 1.0, 1);
    }
}

#[test]
fn with_momentum_and_server_lr_too() {
    for threads in [1, 3] {
        run(threads, 0.9, 0.7, 2);
    }
}
