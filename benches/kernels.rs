//! Criterion benches of the GPU kernels (on whatever adapter exists) and the CPU engine:
//! aggregation of 16 updates at 1% of 2^20 (the step's kernels alone, and the whole step with
//! its upload), exact Top-k of 2^20 at 1% (steady state: from the previous threshold).
//! `sparsync bench aggregate|topk` measures the full size grid with a copy reference.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sparsync::bench::kernels::{gaussian, random_batch};
use sparsync::config::GpuMode;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::gpu::aggregate::Replay;
use sparsync::engine::gpu::device::{self, DeviceOptions};
use sparsync::engine::gpu::topk::{GpuTopk, TopkChunk};
use sparsync::engine::gpu::{GpuAggregator, GpuOptions, util};
use sparsync::engine::{Aggregator, KernelProbe, OptimizerSettings, Selection, UpdateRef};
use sparsync::protocol::frame::{PushLimits, PushView};

const N: usize = 1 << 20;

fn bench(c: &mut Criterion) {
    let ctx = device::open(&DeviceOptions::default()).ok();
    let frames = random_batch(N, 0.01, 16, 1);
    let limits = PushLimits { num_params: N as u64, max_nnz: N as u64 };
    let batch: Vec<UpdateRef<'_>> = frames
        .iter()
        .map(|f| UpdateRef::from_push(&PushView::decode(f, &limits).unwrap(), 1.0 / 16.0))
        .collect();
    let entries: u64 = batch.iter().map(|u| u.nnz() as u64).sum();
    let x0 = vec![0.0f32; N];

    let mut g = c.benchmark_group("aggregate_16x1pct_2^20");
    g.throughput(Throughput::Elements(entries));
    if let Some(ctx) = &ctx {
        for mode in [GpuMode::Deterministic, GpuMode::Fast] {
            let opts = GpuOptions { mode, ..Default::default() };
            let mut e =
                GpuAggregator::with_context(ctx.clone(), &x0, OptimizerSettings::default(), &opts).unwrap();
            e.aggregate(&batch).unwrap();
            e.wait().unwrap();
            g.bench_function(format!("gpu_step_kernels_{mode:?}"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        e.replay(Replay::All).unwrap();
                    }
                    t.elapsed()
                })
            });
            g.bench_function(format!("gpu_step_{mode:?}"), |b| {
                b.iter(|| {
                    e.aggregate(&batch).unwrap();
                    e.wait().unwrap()
                })
            });
        }
    } else {
        eprintln!("no GPU adapter: GPU benches not run");
    }
    let mut cpu = CpuAggregator::new(x0.clone(), OptimizerSettings::default());
    g.bench_function("cpu_step", |b| b.iter(|| cpu.aggregate(&batch).unwrap()));
    g.finish();

    let d = gaussian(N, 2);
    let mut g = c.benchmark_group("topk_1pct_2^20");
    g.throughput(Throughput::Elements(N as u64));
    if let Some(ctx) = &ctx {
        let buf = util::storage(ctx, "d", 4 * N as u64, wgpu::BufferUsages::empty());
        ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&d));
        let chunks = [TopkChunk { d: &buf, replica: None, len: N }];
        let mut t = GpuTopk::new(ctx.clone());
        g.bench_function("gpu_exact", |b| {
            b.iter(|| t.select(&chunks, Selection::Exact { k: N / 100 }, false).unwrap())
        });
    }
    let keys: Vec<u32> = d.iter().map(|&v| sparsync::protocol::numerics::magnitude_key(v)).collect();
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    g.bench_function("cpu_exact", |b| {
        b.iter(|| sparsync::protocol::select::exact_topk(&keys, N / 100, &mut scratch, &mut out))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
