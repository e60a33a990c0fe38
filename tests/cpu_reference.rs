//! `CpuAggregator` against a straightforward f64 computation of docs/algorithms.md §2–3.

mod common;

use common::*;
use half::f16;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::engine::{Aggregator, OptimizerSettings, Selection, UpdateRef};
use sparsync::policy::staleness::{Normalization, WeightInput, Weighting, WeightingKind, batch_weights};
use sparsync::protocol::frame::{DeltaView, PushHeader, PushLimits, PushView, encode_push};
use sparsync::protocol::model::SplitMix64;

struct Reference {
    x: Vec<f64>,
    m: Vec<f64>,
    xhat: Vec<f64>,
}

/// Weights straight from docs/algorithms.md §1–2, in f64.
fn weights_f64(w: &Weighting, batch: &[WeightInput]) -> Vec<f64> {
    let total: f64 = batch.iter().map(|u| if w.samples { u.samples as f64 } else { 1.0 }).sum();
    batch
        .iter()
        .map(|u| {
            let s = u.staleness as f64;
            let alpha = match w.kind {
                WeightingKind::Polynomial => (s + 1.0).powf(-w.poly_a),
                WeightingKind::Hinge if s > w.hinge_b => 1.0 / (w.hinge_a * (s - w.hinge_b) + 1.0),
                WeightingKind::Exponential => (-w.exp_beta * s.min(w.exp_cap)).exp(),
                _ => 1.0,
            };
            alpha * if w.samples { u.samples as f64 } else { 1.0 } / total
        })
        .collect()
}

fn check(seed: u64, kind: WeightingKind, samples: bool, momentum: f32, lr: f32) {
    let n = 5000;
    let mut rng = SplitMix64::new(seed);
    let x0 = init(n, seed);
    let opt = OptimizerSettings { momentum, server_lr: lr };
    let mut engine = CpuAggregator::new(x0.clone(), opt);
    let mut r = Reference {
        x: x0.iter().map(|&v| v as f64).collect(),
        m: vec![0.0; n],
        xhat: x0.iter().map(|&v| v as f64).collect(),
    };
    let weighting = Weighting { kind, samples, ..Default::default() };
    for step in 0..6u64 {
        // A batch of 1..5 updates with staleness up to 8 and different sample counts.
        let size = 1 + (rng.next_u64() % 5) as usize;
        let mut frames = Vec::new();
        let mut inputs = Vec::new();
        for i in 0..size {
            let nnz = 50 + (rng.next_u64() % 400) as usize;
            let (idx, vals) = random_update(&mut rng, n, nnz, 2.0);
            let staleness = rng.next_u64() % 9;
            let samples = 1 + (rng.next_u64() % 200) as u32;
            let h = PushHeader {
                base_version: 0,
                seq: i as u64,
                samples,
                local_steps: 1,
                loss: 1.0,
                nnz: idx.len() as u32,
            };
            frames.push(encode_push(&h, &idx, &vals));
            inputs.push(WeightInput { staleness, samples, loss: 1.0 });
        }
        let mut w32 = Vec::new();
        batch_weights(&weighting, Normalization::Batch, &inputs, &mut w32);
        let w64 = weights_f64(&weighting, &inputs);
        for (a, b) in w32.iter().zip(&w64) {
            assert!(((*a as f64) - b).abs() <= 1e-7 * b.abs(), "weight {a} vs {b}");
        }
        let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
        let views: Vec<PushView<'_>> = frames.iter().map(|f| PushView::decode(f, &limits).unwrap()).collect();
        let updates: Vec<UpdateRef<'_>> =
            views.iter().zip(&w32).map(|(v, &w)| UpdateRef::from_push(v, w)).collect();
        engine.aggregate(&updates).unwrap();

        // f64: g = Σ w_i Δ_i; m = μ m + g; x = x + η m; with a bound on the f32 rounding.
        let mut g = vec![0.0f64; n];
        let mut mag = vec![0.0f64; n];
        for (v, &w) in views.iter().zip(&w64) {
            for (i, h) in v.entries() {
                g[i as usize] += w * h.to_f64();
                mag[i as usize] += (w * h.to_f64()).abs();
            }
        }
        let state = engine.read_state().unwrap();
        for i in 0..n {
            r.m[i] = momentum as f64 * r.m[i] + g[i];
            r.x[i] += lr as f64 * r.m[i];
            // Several roundings per term and per step, each ≤ 2^-24 relative; the momentum
            // history carries earlier steps' errors.
            let tol =
                1e-6 * (r.x[i].abs() + (lr as f64 * r.m[i]).abs() + mag[i] * (step as f64 + 2.0)) + 1e-12;
            assert!(
                (state.x[i] as f64 - r.x[i]).abs() <= tol,
                "x[{i}] {} vs {} (step {step})",
                state.x[i],
                r.x[i]
            );
            // Follow the engine's rounding so that errors do not compound across steps.
            r.x[i] = state.x[i] as f64;
            if momentum != 0.0 {
                r.m[i] = state.momentum[i] as f64;
            }
        }

        // §3: Top-k of d = x − x̂ by magnitude, f16 values, x̂[S] += f16(d[S]).
        let k = 1 + (rng.next_u64() % 200) as usize;
        let bc = engine.broadcast(Selection::Exact { k }).unwrap();
        let d: Vec<f64> = (0..n).map(|i| r.x[i] - r.xhat[i]).collect();
        let delta = DeltaView::decode(&bc.frame, n as u64).unwrap();
        let sel: Vec<(u32, f16)> = delta.entries().collect();
        assert_eq!(sel.len(), k);
        assert!(sel.windows(2).all(|w| w[0].0 < w[1].0), "indices ascending");
        let chosen: std::collections::HashSet<u32> = sel.iter().map(|e| e.0).collect();
        let min_sel = sel.iter().map(|&(i, _)| d[i as usize].abs()).fold(f64::INFINITY, f64::min);
        let max_rest =
            (0..n as u32).filter(|i| !chosen.contains(i)).map(|i| d[i as usize].abs()).fold(0.0, f64::max);
        assert!(min_sel >= max_rest - 1e-6 * max_rest, "selection is not the Top-k: {min_sel} < {max_rest}");
        for &(i, h) in &sel {
            let want = d[i as usize].clamp(-65504.0, 65504.0);
            let ulp = f16::from_f64(want).to_f64().abs() * 2f64.powi(-10) + 6e-8;
            assert!((h.to_f64() - want).abs() <= ulp, "value at {i}: {} vs {want}", h.to_f64());
            r.xhat[i as usize] += h.to_f64();
        }
        let state = engine.read_state().unwrap();
        for i in 0..n {
            assert!((state.replica[i] as f64 - r.xhat[i]).abs() <= 1e-6 * r.xhat[i].abs() + 1e-12);
            r.xhat[i] = state.replica[i] as f64;
        }
        assert_eq!(state.version, step + 1);
        assert_eq!(state.replica_version, step + 1);
    }
}

#[test]
fn matches_f64_reference_across_weightings() {
    let mut seed = 11;
    for kind in
        [WeightingKind::Constant, WeightingKind::Polynomial, WeightingKind::Hinge, WeightingKind::Exponential]
    {
        for samples in [true, false] {
            seed += 1;
            check(seed, kind, samples, 0.0, 1.0);
        }
    }
}

#[test]
fn matches_f64_reference_with_momentum_and_server_lr() {
    check(101, WeightingKind::Polynomial, true, 0.9, 0.5);
    check(102, WeightingKind::Constant, false, 0.5, 1.0);
}
