//! The client's sparsify step (Top-k + error feedback + f16 encode into a Push frame) for 2^20
//! parameters at 1%, next to one local training step of `mlp` (batch 32) on the same machine,
//! the same step at mlp's own size, and the bare residual update r += Δ at 2^20 (the memory
//! traffic every error-feedback sparsifier pays).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sparsync::protocol::frame::{PushHeader, encode_push};
use sparsync::protocol::model::{ModelLayout, SplitMix64};
use sparsync::protocol::sparsify::Sparsifier;
use sparsync_client::train::Trainer;

fn bench(c: &mut Criterion) {
    let n = 1 << 20;
    let mut r = SplitMix64::new(1);
    let delta: Vec<f32> = (0..n).map(|_| (r.next_unit_f32() - 0.5) * 1e-3).collect();
    let mut s = Sparsifier::new(n);
    c.bench_function("sparsify_2^20_at_1pct", |b| {
        b.iter(|| {
            let sparse = s.sparsify(black_box(&delta), n / 100);
            let h = PushHeader {
                base_version: 0,
                seq: 1,
                samples: 32,
                local_steps: 1,
                loss: 0.5,
                nnz: sparse.indices.len() as u32,
            };
            black_box(encode_push(&h, &sparse.indices, &sparse.values))
        })
    });

    // The floor under any error-feedback sparsifier: r += Δ over the f64 residual (12 bytes
    // read and 8 written per parameter), without selecting anything.
    let mut residual = vec![0.0f64; n];
    c.bench_function("residual_add_2^20", |b| {
        b.iter(|| {
            for (r, &d) in residual.iter_mut().zip(black_box(&delta)) {
                *r += d as f64;
            }
            black_box(&residual);
        })
    });

    // At mlp's own size, for the like-for-like comparison with its training step.
    let m = ModelLayout::builtin("mlp").unwrap().num_params();
    let small: Vec<f32> = delta[..m].to_vec();
    let mut s2 = Sparsifier::new(m);
    c.bench_function("sparsify_mlp_101770_at_1pct", |b| {
        b.iter(|| black_box(s2.sparsify(black_box(&small), m.div_ceil(100))))
    });

    let data = sparsync::data::embedded();
    let mut t = Trainer::new("mlp", 1).unwrap();
    t.set_params(&ModelLayout::builtin("mlp").unwrap().init(0)).unwrap();
    let shard: Vec<usize> = (0..data.train.len()).collect();
    c.bench_function("mlp_train_step_batch_32", |b| {
        b.iter(|| black_box(t.step(&data.train, &shard, 32, 0.05)))
    });
    c.bench_function("mlp_local_round_10_steps", |b| {
        b.iter(|| black_box(t.train(&data.train, &shard, 10, 32, 0.05, |_| {})))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
