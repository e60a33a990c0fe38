//! GPU Top-k against a sort-based CPU reference (magnitude descending, ties to the lower
//! index), for n from 1 to 2^22, across chunk boundaries, random and adversarial inputs.

mod common;

use common::gpu;
use half::f16;
use sparsync::engine::Selection;
use sparsync::engine::gpu::topk::{GpuTopk, TopkChunk};
use sparsync::engine::gpu::util;
use sparsync::protocol::frame::{DeltaHeader, DeltaView, encode_delta_with_body};
use sparsync::protocol::model::SplitMix64;
use sparsync::protocol::numerics::{magnitude_key, to_f16_sat};

/// The reference: sort indices by (magnitude desc, index asc), take k, return in index order.
fn reference(d: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..d.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        magnitude_key(d[b as usize]).cmp(&magnitude_key(d[a as usize])).then(a.cmp(&b))
    });
    order.truncate(k.min(d.len()));
    order.sort_unstable();
    order
}

struct Gpu {
    topk: GpuTopk,
    ctx: std::sync::Arc<sparsync::engine::gpu::device::GpuContext>,
}

impl Gpu {
    fn new() -> Option<Self> {
        let ctx = gpu::shared()?;
        Some(Self { topk: GpuTopk::new(ctx.clone()), ctx })
    }

    /// Runs the GPU selection on `d` split into chunks of `chunk` elements. With `xhat`, the
    /// selection applies the sent values to it (x = xhat + d) and returns x̂ and d after.
    #[allow(clippy::type_complexity)]
    fn select(
        &mut self,
        d: &[f32],
        chunk: usize,
        sel: Selection,
        xhat: Option<&[f32]>,
    ) -> (Vec<(u32, f16)>, Option<(Vec<f32>, Vec<f32>, Vec<f32>)>) {
        let upload = |label: &str, values: &[f32]| {
            let b = util::storage(&self.ctx, label, 4 * values.len() as u64, wgpu::BufferUsages::empty());
            self.ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(values));
            b
        };
        let x: Option<Vec<f32>> = xhat.map(|xh| xh.iter().zip(d).map(|(a, b)| a + b).collect());
        let bufs: Vec<(wgpu::Buffer, Option<(wgpu::Buffer, wgpu::Buffer)>, usize)> = d
            .chunks(chunk)
            .enumerate()
            .map(|(ci, part)| {
                let range = ci * chunk..ci * chunk + part.len();
                let replica = xhat
                    .zip(x.as_ref())
                    .map(|(xh, x)| (upload("xhat", &xh[range.clone()]), upload("x", &x[range.clone()])));
                (upload("d", part), replica, part.len())
            })
            .collect();
        let chunks: Vec<TopkChunk<'_>> = bufs
            .iter()
            .map(|(d, r, len)| TopkChunk { d, replica: r.as_ref().map(|(xh, x)| (xh, x)), len: *len })
            .collect();
        let s = self.topk.select(&chunks, sel, xhat.is_some()).expect("selection runs");
        let h = DeltaHeader { version: 1, base_version: 0, nnz: s.nnz };
        let frame = encode_delta_with_body(&h, &s.body);
        let entries =
            DeltaView::decode(&frame, d.len() as u64).expect("a valid Delta body").entries().collect();
        let read = |b: &wgpu::Buffer, len: usize| -> Vec<f32> {
            let enc = util::encoder(&self.ctx, "read");
            let bytes = util::Readback::new().read(&self.ctx, enc, &[(b, 0, 4 * len as u64)]).unwrap();
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let after = x.map(|x| {
            let (mut xh_after, mut d_after) = (Vec::new(), Vec::new());
            for (db, r, len) in &bufs {
                let (xb, _) = r.as_ref().unwrap();
                xh_after.extend(read(xb, *len));
                d_after.extend(read(db, *len));
            }
            (xh_after, d_after, x)
        });
        (entries, after)
    }

    fn check_exact(&mut self, d: &[f32], k: usize, chunk: usize, what: &str) {
        let (got, _) = self.select(d, chunk, Selection::Exact { k }, None);
        let want = reference(d, k);
        let got_idx: Vec<u32> = got.iter().map(|e| e.0).collect();
        assert!(got_idx == want, "{what}: n {} k {k} chunk {chunk}: index sets differ", d.len());
        for (i, h) in got {
            assert_eq!(h.to_bits(), to_f16_sat(d[i as usize]).to_bits(), "{what}: value at {i}");
        }
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| (r.next_unit_f32() - 0.5) * (1.0 + (r.next_u64() % 1000) as f32)).collect()
}

#[test]
fn exact_topk_matches_reference_random_sizes() {
    let Some(mut g) = Gpu::new() else { return };
    for (s, &n) in [1usize, 2, 7, 255, 256, 257, 4095, 4096, 4097, 8191, 8193, 100_003].iter().enumerate() {
        let d = random(n, s as u64);
        for k in [0, 1, n / 100 + 1, n / 3, n.saturating_sub(1), n, n + 5] {
            g.check_exact(&d, k, n, "random");
            // Again: the second selection starts from the first one's threshold.
            g.check_exact(&d, k, n, "random, steady");
        }
    }
}

#[test]
fn exact_topk_across_chunk_boundaries() {
    let Some(mut g) = Gpu::new() else { return };
    let d = random(50_000, 42);
    for chunk in [1000, 4096, 7777, 49_999] {
        for k in [1, 500, 12_345, 50_000] {
            g.check_exact(&d, k, chunk, "chunked");
        }
    }
}

#[test]
fn exact_topk_adversarial_inputs() {
    let Some(mut g) = Gpu::new() else { return };
    let n = 10_007;
    let cases: Vec<(&str, Vec<f32>)> = vec![
        ("all equal magnitudes, mixed signs", (0..n).map(|i| if i % 3 == 0 { -0.5 } else { 0.5 }).collect()),
        ("all zeros", vec![0.0; n]),
        ("±0", (0..n).map(|i| if i % 2 == 0 { 0.0 } else { -0.0 }).collect()),
        (
            "subnormals",
            (0..n).map(|i| f32::from_bits((i % 50) as u32) * if i % 2 == 0 { 1.0 } else { -1.0 }).collect(),
        ),
        ("few distinct", (0..n).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect()),
        ("one spike", (0..n).map(|i| if i == 4321 { 1e30 } else { 1e-3 }).collect()),
        ("f16 overflow", (0..n).map(|i| (i as f32 - 5000.0) * 1e3).collect()),
        (
            "same key after the first digits",
            (0..n).map(|i| f32::from_bits(0x3f80_0000 + (i % 3) as u32)).collect(),
        ),
    ];
    for (what, d) in &cases {
        for k in [1, 2, 100, 5000, n - 1, n] {
            for chunk in [n, 3000] {
                g.check_exact(d, k, chunk, what);
                g.check_exact(d, k, chunk, what);
            }
        }
    }
}

#[test]
fn exact_topk_large() {
    let Some(mut g) = Gpu::new() else { return };
    let n = 1 << 22;
    let d = random(n, 99);
    g.check_exact(&d, n / 100, n, "2^22");
    g.check_exact(&d, n / 1000, 1 << 20, "2^22 in 4 chunks");
}

#[test]
fn replica_update_adds_the_sent_values() {
    let Some(mut g) = Gpu::new() else { return };
    let n = 9000;
    let d = random(n, 5);
    let xhat = random(n, 6);
    for _ in 0..2 {
        // The second selection of the same layout starts from the first one's threshold.
        let (sent, after) = g.select(&d, 4000, Selection::Exact { k: 300 }, Some(&xhat));
        let (replica, d_after, x) = after.unwrap();
        let mut want = xhat.clone();
        let mut want_d = d.clone();
        for (i, h) in &sent {
            let i = *i as usize;
            want[i] = sparsync::protocol::numerics::apply_delta_entry(want[i], *h);
            want_d[i] = sparsync::protocol::numerics::canon(x[i] - want[i]);
        }
        assert_eq!(common::bits(&replica), common::bits(&want));
        // d is kept exact where values were sent, and untouched elsewhere.
        assert_eq!(common::bits(&d_after), common::bits(&want_d));
    }
    assert!(g.topk.counters().selections >= 2);
}

#[test]
fn steady_selections_read_d_once_and_stay_exact() {
    let Some(mut g) = Gpu::new() else { return };
    let n = 200_000;
    let k = 2000;
    // A drifting d: each round moves every value a little, as a step between broadcasts does.
    let mut d = random(n, 7);
    let mut r = SplitMix64::new(8);
    g.topk.forget();
    let before = g.topk.counters();
    let rounds = 12;
    for round in 0..rounds {
        g.check_exact(&d, k, 70_000, &format!("round {round}"));
        for v in d.iter_mut() {
            *v *= 1.0 + (r.next_unit_f32() - 0.5) * 0.05;
        }
    }
    let c = g.topk.counters();
    let (selections, passes) = (c.selections - before.selections, c.input_passes - before.input_passes);
    assert_eq!(selections, rounds);
    // Cold: 4 passes (radix + collect); then one pass each while the threshold holds.
    let mean = passes as f64 / selections as f64;
    assert!(mean <= 1.5, "{passes} passes over d in {selections} selections ({} misses)", c.misses);
}

#[test]
fn gaussiank_is_a_threshold_selection_near_k() {
    let Some(mut g) = Gpu::new() else { return };
    // Gaussian d (Box–Muller), the distribution GaussianK assumes.
    let n = 200_000;
    let mut r = SplitMix64::new(3);
    let d: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (r.next_unit_f32().max(1e-7) as f64, r.next_unit_f32() as f64);
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.01) as f32
        })
        .collect();
    for k in [200, 2000, 20_000] {
        let (got, _) = g.select(&d, 70_000, Selection::GaussianK { k }, None);
        let chosen: std::collections::HashSet<u32> = got.iter().map(|e| e.0).collect();
        let min_in = got.iter().map(|e| d[e.0 as usize].abs()).fold(f32::INFINITY, f32::min);
        let max_out =
            (0..n as u32).filter(|i| !chosen.contains(i)).map(|i| d[i as usize].abs()).fold(0.0, f32::max);
        assert!(min_in > max_out, "k {k}: not a threshold selection ({min_in} <= {max_out})");
        let c = got.len() as f64;
        assert!(c >= 2.0 * k as f64 / 3.0 && c <= 4.0 * k as f64 / 3.0, "k {k}: sent {c}");
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        // The CPU engine's GaussianK lands within a few entries (its statistics are f64).
        let mut cpu = sparsync::engine::cpu::CpuAggregator::new(d.clone(), Default::default());
        let zero = vec![0.0; n];
        sparsync::engine::Aggregator::load_state(
            &mut cpu,
            &sparsync::engine::ModelState {
                x: d.clone(),
                momentum: vec![],
                replica: zero,
                version: 1,
                replica_version: 0,
            },
        )
        .unwrap();
        let bc = sparsync::engine::Aggregator::broadcast(&mut cpu, Selection::GaussianK { k }).unwrap();
        assert!(!bc.exact);
        let cpu_count = bc.header.nnz as f64;
        assert!((cpu_count - c).abs() <= 0.01 * c + 3.0, "k {k}: cpu {cpu_count} gpu {c}");
    }
}

/// GaussianK on a distribution far from Gaussian may select many more than k (here 90% of the
/// entries): the output grows to what was selected, the same entries as the CPU engine's.
#[test]
fn gaussiank_output_grows_to_what_it_selects() {
    let Some(mut g) = Gpu::new() else { return };
    let n = 10_000;
    // mean 0.45, deviation 0.15: the refinement ends at t0·0.5·1.5·0.5 ≈ 0.31, below 0.5.
    let d: Vec<f32> = (0..n).map(|i| if i % 10 == 0 { 0.0 } else { 0.5 }).collect();
    let (got, _) = g.select(&d, n, Selection::GaussianK { k: 100 }, None);
    let mut cpu = sparsync::engine::cpu::CpuAggregator::new(d.clone(), Default::default());
    sparsync::engine::Aggregator::load_state(
        &mut cpu,
        &sparsync::engine::ModelState {
            x: d.clone(),
            momentum: vec![],
            replica: vec![0.0; n],
            version: 1,
            replica_version: 0,
        },
    )
    .unwrap();
    let bc = sparsync::engine::Aggregator::broadcast(&mut cpu, Selection::GaussianK { k: 100 }).unwrap();
    assert_eq!(got.len(), bc.header.nnz as usize);
    assert_eq!(got.len(), n - n / 10, "every 0.5 is above the refined threshold");
    assert!(got.iter().all(|(i, h)| h.to_f32() == d[*i as usize]));
}
