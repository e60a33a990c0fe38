//! Push decode + validation against a plain copy of the same bytes (issue: the decoder must
//! not copy the arrays, so it should run within 2× of `memcpy`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use sparsync::protocol::frame::{PushHeader, PushLimits, PushView, encode_push};
use sparsync::protocol::model::SplitMix64;

fn push_frame(n: usize, density: f64) -> Vec<u8> {
    let nnz = (n as f64 * density).ceil() as usize;
    let mut rng = SplitMix64::new(7);
    let stride = n / nnz;
    let idx: Vec<u32> = (0..nnz).map(|i| (i * stride + (rng.next_u64() as usize % stride)) as u32).collect();
    let vals: Vec<f16> = (0..nnz).map(|_| f16::from_f32(rng.next_unit_f32() - 0.5)).collect();
    let h = PushHeader { base_version: 1, seq: 1, samples: 32, local_steps: 1, loss: 0.5, nnz: nnz as u32 };
    encode_push(&h, &idx, &vals)
}

fn bench(c: &mut Criterion) {
    let n = 1 << 20;
    let frame = push_frame(n, 0.01);
    let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
    let mut g = c.benchmark_group("push_1pct_of_2^20");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode_validate", |b| {
        b.iter(|| {
            let v = PushView::decode(black_box(&frame), &limits).expect("valid");
            black_box(v.header.nnz)
        })
    });
    let mut dst = vec![0u8; frame.len()];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&frame));
            black_box(dst.as_ptr());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
