//! A model split across shards gives the bits of one engine: the same steps on 1, 2, 3 and 5
//! shards give bit-identical models, replicas and Delta frames, with momentum, with ties at
//! the Top-k boundary that straddle shards, with shards no push touches, and with shards
//! that own no keys at all.

mod common;

use common::{bits, random_update};
use half::f16;
use sparsync::engine::cpu::{CpuAggregator, TILE};
use sparsync::engine::sharded::ShardedAggregator;
use sparsync::engine::{Aggregator, OptimizerSettings, Selection, UpdateRef};
use sparsync::protocol::frame::{DeltaView, PushHeader, PushLimits, PushView, encode_push};
use sparsync::protocol::model::SplitMix64;

/// A push's frame.
struct Push {
    frame: Vec<u8>,
}

impl Push {
    fn new(idx: &[u32], vals: &[f16]) -> Self {
        let h = PushHeader {
            base_version: 0,
            seq: 1,
            samples: 1,
            local_steps: 1,
            loss: 1.0,
            nnz: idx.len() as u32,
        };
        Self { frame: encode_push(&h, idx, vals) }
    }

    fn as_ref(&self, weight: f32) -> UpdateRef<'_> {
        let limits = PushLimits { num_params: u64::MAX >> 1, max_nnz: u64::MAX >> 1 };
        let view = PushView::decode(&self.frame, &limits).expect("a valid push");
        UpdateRef::from_push(&view, weight)
    }
}

/// Steps of pushes (with weights), each followed by a broadcast of k entries.
type Run = Vec<(Vec<(Push, f32)>, usize)>;

/// Runs `steps` on `engine`; returns every Delta frame and the final state's bits.
fn play(engine: &mut dyn Aggregator, steps: &Run) -> (Vec<Vec<u8>>, Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut deltas = Vec::new();
    for (pushes, k) in steps {
        let refs: Vec<UpdateRef<'_>> = pushes.iter().map(|(p, w)| p.as_ref(*w)).collect();
        engine.aggregate(&refs).expect("aggregate");
        deltas.push(engine.broadcast(Selection::Exact { k: *k }).expect("broadcast").frame);
    }
    let s = engine.read_state().expect("state");
    (deltas, bits(&s.x), bits(&s.replica), bits(&s.momentum))
}

fn random_run(n: usize, seed: u64, steps: usize, per_step: usize, k: usize) -> Run {
    let mut rng = SplitMix64::new(seed);
    (0..steps)
        .map(|s| {
            let pushes = (0..per_step)
                .map(|j| {
                    let (idx, vals) = random_update(&mut rng, n, n / 100 + 3, 0.5);
                    (Push::new(&idx, &vals), 0.25 + 0.125 * ((s + j) % 5) as f32)
                })
                .collect();
            (pushes, k)
        })
        .collect()
}

fn same_on_every_shard_count(n: usize, opt: OptimizerSettings, run: &Run) {
    let init = common::init(n, 9);
    let want = play(&mut CpuAggregator::with_threads(init.clone(), opt, 1), run);
    assert!(want.0.iter().all(|d| !d.is_empty()));
    for shards in [1, 2, 3, 5] {
        let mut e = ShardedAggregator::new(init.clone(), opt, shards, 1);
        assert_eq!(e.num_params(), n);
        let got = play(&mut e, run);
        for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
            assert!(g == w, "{shards} shards: Delta {i} differs");
        }
        assert!(got.1 == want.1, "{shards} shards: x differs");
        assert!(got.2 == want.2, "{shards} shards: x̂ differs");
        assert!(got.3 == want.3, "{shards} shards: momentum differs");
    }
}

#[test]
fn random_steps_give_one_engines_bits_on_1_2_3_and_5_shards() {
    // Five whole tiles and a bit: every shard of 5 owns keys (one or two tiles each).
    let n = 5 * TILE + 1_234;
    same_on_every_shard_count(n, OptimizerSettings::default(), &random_run(n, 1, 6, 5, n / 100));
    let momentum = OptimizerSettings { momentum: 0.9, server_lr: 0.5 };
    same_on_every_shard_count(n, momentum, &random_run(n, 2, 4, 3, n / 50));
}

#[test]
fn ties_at_the_top_k_boundary_across_shards_go_to_the_lower_index() {
    let n = 4 * TILE;
    // The same |value| at one index in each tile (so in each shard of 2, 3 or 4), signs mixed:
    // k = 3 must take the three lowest indices, whichever shards hold them.
    let idx: Vec<u32> = (0..4).map(|t| (t * TILE + 7) as u32).collect();
    let vals: Vec<f16> = [0.5, -0.5, 0.5, -0.5].map(f16::from_f32).to_vec();
    let run: Run = vec![(vec![(Push::new(&idx, &vals), 1.0)], 3), (vec![], 2), (vec![], 2)];
    let init = vec![0.0; n];
    let want = play(&mut CpuAggregator::with_threads(init.clone(), OptimizerSettings::default(), 1), &run);
    for shards in [2, 3, 4] {
        let got =
            play(&mut ShardedAggregator::new(init.clone(), OptimizerSettings::default(), shards, 1), &run);
        assert!(got == want, "{shards} shards differ");
    }
    // The first Delta holds the three lowest of the four tied indices.
    let first = DeltaView::decode(&want.0[0], n as u64).expect("a Delta");
    let got: Vec<u32> =
        first.indices_bytes().chunks(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(got, idx[..3]);
}

#[test]
fn shards_no_push_touches_and_shards_with_no_keys_change_nothing() {
    // Pushes only in the first tile: the other shards have nothing to add, and the Top-k
    // still ranges over their (zero) entries when k exceeds what changed.
    let n = 3 * TILE + 10;
    let mut rng = SplitMix64::new(5);
    let run: Run = (0..3)
        .map(|_| {
            let (idx, vals) = random_update(&mut rng, TILE, 40, 1.0);
            (vec![(Push::new(&idx, &vals), 1.0)], 100)
        })
        .collect();
    same_on_every_shard_count(n, OptimizerSettings::default(), &run);
    // A model smaller than one tile: shards 2.. own no keys.
    let n = 1_000;
    same_on_every_shard_count(n, OptimizerSettings::default(), &random_run(n, 3, 4, 3, 10));
}

#[test]
fn gaussiank_is_refused_with_several_shards() {
    let mut e = ShardedAggregator::new(vec![0.0; 2 * TILE], OptimizerSettings::default(), 2, 1);
    let err = e.broadcast(Selection::GaussianK { k: 10 }).unwrap_err().to_string();
    assert!(err.contains("GaussianK") && err.contains("shards"), "{err}");
}
