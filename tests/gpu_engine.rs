//! The GPU engine against the CPU reference: deterministic mode bit for bit, fast mode within
//! f32 summation error, on batches that cross workgroup and chunk boundaries.

mod common;

use common::gpu;
use common::*;
use half::f16;
use sparsync::config::GpuMode;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::gpu::device::DeviceOptions;
use sparsync::engine::gpu::{GpuAggregator, GpuOptions};
use sparsync::engine::{Aggregator, OptimizerSettings, Selection, UpdateRef};
use sparsync::protocol::frame::{PushHeader, PushLimits, PushView, encode_push};
use sparsync::protocol::model::SplitMix64;

/// A batch as frames.
fn batch_frames(rng: &mut SplitMix64, n: usize, updates: usize, adversarial: bool) -> Vec<(Vec<u8>, f32)> {
    (0..updates)
        .map(|u| {
            let nnz = 1 + (rng.next_u64() as usize % (n / 3).max(1));
            let (idx, mut vals) = random_update(rng, n, nnz, 4.0);
            if adversarial {
                let pick = [
                    f16::from_f32(0.0),
                    f16::from_f32(-0.0),
                    f16::MIN_POSITIVE_SUBNORMAL,
                    -f16::MIN_POSITIVE_SUBNORMAL,
                    f16::from_bits(0x03ff), // largest subnormal
                    f16::MAX,
                    f16::MIN,
                    f16::from_f32(1.0),
                ];
                match u % 3 {
                    0 => vals.iter_mut().for_each(|v| *v = f16::from_f32(0.25)), // all equal
                    1 => vals.iter_mut().enumerate().for_each(|(i, v)| *v = pick[i % pick.len()]),
                    _ => {}
                }
            }
            // Weights as staleness × sample weighting make them: anything in (0, 1].
            let w = match u % 4 {
                0 => 1.0,
                1 => 0.1,
                2 => (rng.next_unit_f32() * 0.999) + 0.001,
                _ => 1.0 / 3.0 * 0.7,
            };
            let h = PushHeader {
                base_version: 0,
                seq: u as u64,
                samples: 1,
                local_steps: 1,
                loss: 0.0,
                nnz: idx.len() as u32,
            };
            (encode_push(&h, &idx, &vals), w)
        })
        .collect()
}

fn refs<'a>(frames: &'a [(Vec<u8>, f32)], n: usize) -> Vec<UpdateRef<'a>> {
    let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
    frames.iter().map(|(f, w)| UpdateRef::from_push(&PushView::decode(f, &limits).unwrap(), *w)).collect()
}

struct Case {
    n: usize,
    chunk: usize,
    momentum: f32,
    lr: f32,
    adversarial: bool,
    steps: usize,
    seed: u64,
}

fn deterministic_case(c: &Case) {
    let Some(ctx) = gpu::shared() else { return };
    let opt = OptimizerSettings { momentum: c.momentum, server_lr: c.lr };
    let mut x0 = init(c.n, c.seed);
    if c.adversarial {
        // ±0 and a subnormal in the starting model (canonicalised on load by both engines).
        x0[0] = -0.0;
        x0[c.n / 2] = f32::from_bits(5);
    }
    let mut cpu = CpuAggregator::new(x0.clone(), opt);
    let opts = GpuOptions { mode: GpuMode::Deterministic, chunk_elems: Some(c.chunk), ..Default::default() };
    let mut gpu = GpuAggregator::with_context(ctx, &x0, opt, &opts).unwrap();
    assert_eq!(gpu.num_chunks(), c.n.div_ceil(c.chunk));
    let mut rng = SplitMix64::new(c.seed);
    for step in 0..c.steps {
        let frames = batch_frames(&mut rng, c.n, 1 + step % 5, c.adversarial);
        let batch = refs(&frames, c.n);
        cpu.aggregate(&batch).unwrap();
        gpu.aggregate(&batch).unwrap();
        let k = 1 + rng.next_u64() as usize % (c.n / 4).max(1);
        let a = cpu.broadcast(Selection::Exact { k }).unwrap();
        let b = gpu.broadcast(Selection::Exact { k }).unwrap();
        assert_eq!(a.header, b.header, "step {step}");
        assert!(a.frame == b.frame, "step {step}: Delta frames differ (n {}, chunk {}, k {k})", c.n, c.chunk);
        let (s1, s2) = (cpu.read_state().unwrap(), gpu.read_state().unwrap());
        assert_eq!(bits(&s1.x), bits(&s2.x), "x after step {step}");
        assert_eq!(bits(&s1.replica), bits(&s2.replica), "x̂ after step {step}");
        assert_eq!(bits(&s1.momentum), bits(&s2.momentum), "momentum after step {step}");
    }
}

#[test]
fn deterministic_equals_cpu_bit_for_bit() {
    for (i, &(n, chunk)) in
        [(1usize, 1usize), (257, 256), (5000, 1000), (20_011, 4099), (70_000, 70_000)].iter().enumerate()
    {
        deterministic_case(&Case {
            n,
            chunk,
            momentum: 0.0,
            lr: 1.0,
            adversarial: false,
            steps: 4,
            seed: i as u64,
        });
    }
}

#[test]
fn deterministic_with_momentum_and_server_lr() {
    deterministic_case(&Case {
        n: 9001,
        chunk: 2048,
        momentum: 0.9,
        lr: 0.7,
        adversarial: false,
        steps: 5,
        seed: 7,
    });
    deterministic_case(&Case {
        n: 3000,
        chunk: 3000,
        momentum: 0.5,
        lr: 1.0,
        adversarial: true,
        steps: 4,
        seed: 8,
    });
}

#[test]
fn deterministic_with_adversarial_values() {
    deterministic_case(&Case {
        n: 4096,
        chunk: 1500,
        momentum: 0.0,
        lr: 1.0,
        adversarial: true,
        steps: 6,
        seed: 9,
    });
    deterministic_case(&Case {
        n: 600,
        chunk: 256,
        momentum: 0.0,
        lr: 0.3,
        adversarial: true,
        steps: 6,
        seed: 10,
    });
}

fn fast_case(opts: DeviceOptions, seed: u64) {
    let Some(ctx) = gpu::open(&opts) else { return };
    let n = 30_000;
    let opt = OptimizerSettings::default();
    let x0 = init(n, seed);
    let mut cpu = CpuAggregator::new(x0.clone(), opt);
    let gopts = GpuOptions { mode: GpuMode::Fast, chunk_elems: Some(7000), device: opts, fault: None };
    let mut gpu = GpuAggregator::with_context(ctx, &x0, opt, &gopts).unwrap();
    let mut rng = SplitMix64::new(seed);
    for step in 0..3 {
        // Overlapping updates: the same indices from many updates contend for the same slots.
        let frames = batch_frames(&mut rng, n, 16, step == 2);
        let batch = refs(&frames, n);
        let mut mag = vec![0.0f64; n];
        for u in &batch {
            for (i, v) in sparsync::protocol::frame::sparse_entries(u.indices, u.values) {
                mag[i as usize] += (u.weight as f64 * v.to_f64()).abs();
            }
        }
        cpu.aggregate(&batch).unwrap();
        gpu.aggregate(&batch).unwrap();
        let (a, b) = (cpu.read_state().unwrap(), gpu.read_state().unwrap());
        for (i, (m, (xa, xb))) in mag.iter().zip(a.x.iter().zip(&b.x)).enumerate() {
            // f32 summation of ≤ 16 terms: a few ulps of the terms' magnitude.
            let tol = 4e-6 * (m + xa.abs() as f64) + 1e-30;
            assert!(((xa - xb) as f64).abs() <= tol, "x[{i}]: cpu {xa} gpu {xb} (step {step})");
        }
        // Keep the engines in the same state so errors do not compound.
        gpu.load_state(&a).unwrap();
    }
}

#[test]
fn fast_mode_within_f32_tolerance_on_every_path() {
    fast_case(DeviceOptions::default(), 21);
    fast_case(DeviceOptions { no_f16: true, ..Default::default() }, 23);
}

/// Realistic batches: `updates` pushes of 1% of n each, random values.
fn realistic_batch(rng: &mut SplitMix64, n: usize, updates: usize, seq: u64) -> Vec<(Vec<u8>, f32)> {
    (0..updates)
        .map(|u| {
            let (idx, vals) = random_update(rng, n, n / 100 + 1, 0.01);
            let h = PushHeader {
                base_version: 0,
                seq: seq + u as u64,
                samples: 1,
                local_steps: 1,
                loss: 0.0,
                nnz: idx.len() as u32,
            };
            (encode_push(&h, &idx, &vals), 1.0 / updates as f32)
        })
        .collect()
}

/// A server's life: many steps at one k. Every Delta and the state stay bit-identical to the
/// CPU engine, the selection reads d about once per broadcast (from the previous threshold),
/// each step is two dispatches per chunk, and uploads reuse their staging buffers.
#[test]
fn a_run_of_steps_selects_from_candidates_bit_identical_to_cpu() {
    let Some(ctx) = gpu::shared() else { return };
    let (n, chunk, steps) = (100_003, 30_000, 30);
    let opt = OptimizerSettings::default();
    let x0 = init(n, 31);
    let mut cpu = CpuAggregator::new(x0.clone(), opt);
    let opts = GpuOptions { mode: GpuMode::Deterministic, chunk_elems: Some(chunk), ..Default::default() };
    let mut gpu = GpuAggregator::with_context(ctx, &x0, opt, &opts).unwrap();
    let chunks = gpu.num_chunks() as u64;
    let k = n / 100;
    let mut rng = SplitMix64::new(32);
    let mut warm = None;
    for step in 0..steps {
        let frames = realistic_batch(&mut rng, n, 8, 100 * step as u64);
        let batch = refs(&frames, n);
        cpu.aggregate(&batch).unwrap();
        gpu.aggregate(&batch).unwrap();
        let a = cpu.broadcast(Selection::Exact { k }).unwrap();
        let b = gpu.broadcast(Selection::Exact { k }).unwrap();
        assert!(a.frame == b.frame, "step {step}: Delta frames differ");
        if step == 1 {
            warm = Some(gpu.counters());
        }
    }
    let (s1, s2) = (cpu.read_state().unwrap(), gpu.read_state().unwrap());
    assert_eq!(bits(&s1.x), bits(&s2.x));
    assert_eq!(bits(&s1.replica), bits(&s2.replica));
    let c = gpu.counters();
    assert_eq!(c.steps, steps as u64);
    assert_eq!(c.broadcasts, steps as u64);
    let mean = c.topk_input_passes as f64 / c.broadcasts as f64;
    assert!(
        mean <= 1.5,
        "{} passes over d in {} broadcasts ({} misses)",
        c.topk_input_passes,
        c.broadcasts,
        c.topk_misses
    );
    // Per step: the bounds and the block pass of each chunk, in one submission.
    let step_dispatches = c.dispatches - gpu.topk_counters().dispatches;
    assert_eq!(step_dispatches, steps as u64 * 2 * chunks);
    assert_eq!(c.submits - c.waits, steps as u64, "one submission per step");
    let w = warm.unwrap();
    assert_eq!(c.staging_allocations, w.staging_allocations, "uploads after warm-up reuse their staging");
}
