//! Top-k with error feedback and f16 values (docs/algorithms.md §4):
//!
//! ```text
//! u = Δ + r;  S = Top-k(|u|);  send (S, f16(u[S]));  r = u − scatter(S, f16(u[S]))
//! ```
//!
//! The residual is kept in f64, so that the split of u into what is sent and what stays is
//! exact: for a sent entry h = f16(u) lies within a factor of two of u (or is 0), so u − h is
//! exact (Sterbenz), and nothing is lost to the f16 rounding. (Saturation at ±65504 is the one
//! exception: such an entry keeps its excess in the residual, rounded.)

use crate::protocol::model::SplitMix64;
use crate::protocol::numerics::magnitude_key;
use crate::protocol::select::{self, INF_KEY};
use half::f16;

/// Error-feedback state of one client.
#[derive(Clone, Debug)]
pub struct Sparsifier {
    residual: Vec<f64>,
    keys: Vec<u32>,
    scratch: Vec<u32>,
    selected: Vec<u32>,
    candidates: Vec<u32>,
    sample: Vec<u32>,
    rng: SplitMix64,
    /// Calls whose selection ran over all entries (no sample, or the sample guessed too high).
    full_selections: u64,
}

/// One sparse update: ascending indices and their f16 values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sparse {
    pub indices: Vec<u32>,
    pub values: Vec<f16>,
}

/// The fused pass notes per block of this many entries whether one may be a candidate, and
/// only rescans the blocks that may hold one.
const BLOCK: usize = 4;

impl Sparsifier {
    pub fn new(n: usize) -> Self {
        Self {
            residual: vec![0.0; n],
            keys: Vec::new(),
            scratch: Vec::new(),
            selected: Vec::new(),
            candidates: Vec::new(),
            sample: Vec::new(),
            rng: SplitMix64::new(0x5EED),
            full_selections: 0,
        }
    }

    /// What was not sent yet.
    pub fn residual(&self) -> &[f64] {
        &self.residual
    }

    /// Puts a refused update's values back into the residual, to be sent later.
    pub fn restore(&mut self, sent: &Sparse) {
        for (&i, h) in sent.indices.iter().zip(&sent.values) {
            self.residual[i as usize] += h.to_f64();
        }
    }

    /// Selects the k largest entries of u = Δ + r (ties to the lower index), returns them as
    /// f16 and keeps the rest in r.
    ///
    /// One pass over the parameters does the work: a stratified sample of u first gives a key
    /// threshold T that a little more than k entries reach, then a fused pass adds Δ into r and
    /// collects the indices whose key reaches T (a few percent of them), and the exact Top-k
    /// (radix select) runs on those candidates alone. Every entry of the Top-k has a key at
    /// least the k-th largest, which is ≥ T whenever k candidates were found, so the result is
    /// the exact Top-k of all of u; when the sample guessed too high (fewer than k
    /// candidates), the exact Top-k runs over all of u instead.
    pub fn sparsify(&mut self, delta: &[f32], k: usize) -> Sparse {
        assert_eq!(delta.len(), self.residual.len(), "update and residual sizes differ");
        let n = delta.len();
        let k = k.min(n);
        self.selected.clear();
        let residual = &self.residual;
        let threshold =
            select::sampled_threshold(n, k, &mut self.rng, &mut self.sample, &mut self.scratch, |i| {
                magnitude_key((residual[i] + delta[i] as f64) as f32)
            });
        let found = match threshold {
            Some(t) => {
                add_and_collect(&mut self.residual, delta, t, &mut self.candidates, &mut self.keys);
                self.candidates.len() >= k
            }
            None => {
                for (r, &d) in self.residual.iter_mut().zip(delta) {
                    *r += d as f64;
                }
                false
            }
        };
        if found {
            select::topk_of_candidates(
                &self.candidates,
                &self.keys,
                k,
                &mut self.scratch,
                &mut self.selected,
            );
        } else if k > 0 {
            self.full_selections += 1;
            self.keys.clear();
            self.keys.extend(self.residual.iter().map(|&u| magnitude_key(u as f32)));
            select::exact_topk(&self.keys, k, &mut self.scratch, &mut self.selected);
        }
        let mut out = Sparse {
            indices: Vec::with_capacity(self.selected.len()),
            values: Vec::with_capacity(self.selected.len()),
        };
        for &i in &self.selected {
            let u = &mut self.residual[i as usize];
            let h = f16::from_f64(u.clamp(-65504.0, 65504.0));
            *u -= h.to_f64();
            out.indices.push(i);
            out.values.push(h);
        }
        out
    }
}

/// The least b ≥ 0 with `magnitude_key(u as f32) >= t` ⟺ `|u| >= b` for every non-NaN f64 u
/// (1 ≤ t ≤ the key of +∞). f64 → f32 rounds to nearest, ties to even, and is monotone, so the
/// keys ≥ t are those of |u| at or above the midpoint between t's f32 and the one below it,
/// the midpoint itself included only when it rounds up, that is when t is even.
fn key_bound(t: u32) -> f64 {
    debug_assert!((1..=INF_KEY).contains(&t));
    let below = f32::from_bits(t - 1) as f64;
    // Half an ulp of the f32 below t; for t = ∞ the ulp is that of f32::MAX, 2^104.
    let half_ulp = if t == INF_KEY { 2f64.powi(103) } else { (f32::from_bits(t) as f64 - below) / 2.0 };
    let mid = below + half_ulp;
    if t.is_multiple_of(2) { mid } else { f64::from_bits(mid.to_bits() + 1) }
}

/// |u| ≥ bound, or u is NaN (whose key is above every threshold).
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord, reason = "the negation is what lets NaN through")]
fn reaches(u: f64, bound: f64) -> bool {
    !(u.abs() < bound)
}

/// r += Δ, and the indices i (ascending) whose magnitude key of r[i] reaches `t` into `idx`,
/// their keys into `keys` (a NaN's key is above every t). Blocks of BLOCK entries: a vectorised
/// add that also notes whether any |r| reaches the bound, then, for the few blocks that hold
/// one, the block's hits.
fn add_and_collect(residual: &mut [f64], delta: &[f32], t: u32, idx: &mut Vec<u32>, keys: &mut Vec<u32>) {
    idx.clear();
    keys.clear();
    let bound = key_bound(t);
    let mut rc = residual.chunks_exact_mut(BLOCK);
    let mut dc = delta.chunks_exact(BLOCK);
    let mut base = 0u32;
    for (r, d) in (&mut rc).zip(&mut dc) {
        let (Ok(r), Ok(d)) = (<&mut [f64; BLOCK]>::try_from(r), <&[f32; BLOCK]>::try_from(d)) else {
            unreachable!("chunks_exact yields BLOCK entries")
        };
        let mut any = false;
        for j in 0..BLOCK {
            r[j] += d[j] as f64;
            any |= reaches(r[j], bound);
        }
        if any {
            for (j, &u) in r.iter().enumerate() {
                let key = magnitude_key(u as f32);
                if key >= t {
                    idx.push(base + j as u32);
                    keys.push(key);
                }
            }
        }
        base += BLOCK as u32;
    }
    for (j, (r, &d)) in rc.into_remainder().iter_mut().zip(dc.remainder()).enumerate() {
        *r += d as f64;
        let key = magnitude_key(*r as f32);
        if key >= t {
            idx.push(base + j as u32);
            keys.push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_lost_including_the_f16_rounding() {
        // 5,000 takes the full selection, 40,000 the sampled candidates.
        for n in [5000, 40_000] {
            nothing_is_lost(n);
        }
    }

    fn nothing_is_lost(n: usize) {
        let mut s = Sparsifier::new(n);
        let mut r = SplitMix64::new(1);
        let mut total_delta = vec![0.0f64; n];
        let mut total_sent = vec![0.0f64; n];
        for step in 0..40 {
            // Values that are multiples of 2^-30 below 2^5: every sum in this test is exact in
            // f64, so equality below is exact equality, not a tolerance.
            let delta: Vec<f32> = (0..n)
                .map(|_| ((r.next_u64() % (1 << 34)) as f64 - (1u64 << 33) as f64) as f32 * 2f32.powi(-30))
                .collect();
            let k = 1 + step * 7 * (n / 5000);
            let sent = s.sparsify(&delta, k);
            assert_eq!(sent.indices.len(), k);
            assert!(sent.indices.windows(2).all(|w| w[0] < w[1]), "ascending");
            for (t, d) in total_delta.iter_mut().zip(&delta) {
                *t += *d as f64;
            }
            for (&i, h) in sent.indices.iter().zip(&sent.values) {
                total_sent[i as usize] += h.to_f64();
            }
            for i in 0..n {
                assert_eq!(
                    total_sent[i] + s.residual()[i],
                    total_delta[i],
                    "n {n}: entry {i} after step {step}"
                );
            }
        }
        if n >= select::SAMPLED_MIN {
            assert!(s.full_selections < 40, "n {n}: the sampled candidates were never used");
        }
    }

    /// The sparsifier as first written: r += Δ, the keys of all of u, the exact Top-k.
    struct Reference {
        residual: Vec<f64>,
    }

    impl Reference {
        fn sparsify(&mut self, delta: &[f32], k: usize) -> Sparse {
            for (r, &d) in self.residual.iter_mut().zip(delta) {
                *r += d as f64;
            }
            let keys: Vec<u32> = self.residual.iter().map(|&u| magnitude_key(u as f32)).collect();
            let (mut scratch, mut selected) = (Vec::new(), Vec::new());
            select::exact_topk(&keys, k, &mut scratch, &mut selected);
            let mut out = Sparse::default();
            for i in selected {
                let u = &mut self.residual[i as usize];
                let h = f16::from_f64(u.clamp(-65504.0, 65504.0));
                *u -= h.to_f64();
                out.indices.push(i);
                out.values.push(h);
            }
            out
        }
    }

    #[test]
    fn sampled_candidates_give_exactly_the_full_top_k() {
        let n = 50_000;
        let mut r = SplitMix64::new(9);
        let mut sampled_calls = 0;
        let mut full_calls = 0;
        // Each makes one step's Δ from (index, step, random draw).
        type Make = fn(usize, usize, &mut SplitMix64) -> f32;
        let kinds: [(&str, Make); 8] = [
            ("uniform", |_, _, r| r.next_unit_f32() - 0.5),
            ("heavy tail", |_, _, r| {
                let u = r.next_unit_f32().max(1e-6);
                (u.powi(-2) * 1e-3).copysign(r.next_unit_f32() - 0.5)
            }),
            ("mostly zero", |_, _, r| if r.next_u64() % 50 == 0 { r.next_unit_f32() } else { 0.0 }),
            ("few values, ties", |_, _, r| ((r.next_u64() % 5) as f32 - 2.0) * 0.25),
            ("grows with index", |i, _, r| (i as f32 * 1e-4) * (r.next_unit_f32() - 0.5)),
            ("one hot region", |i, s, r| {
                if (s * 997 + 3000..s * 997 + 3100).contains(&i) { 100.0 } else { r.next_unit_f32() * 1e-3 }
            }),
            // 1,000 nonzero entries: for k = 2,000 the sample's threshold lets too few through.
            ("k above the support", |i, _, r| if i % 50 == 0 { r.next_unit_f32() - 0.5 } else { 0.0 }),
            ("inf and NaN", |i, _, r| match i {
                17 => f32::NAN,
                4242 => f32::INFINITY,
                777 => f32::NEG_INFINITY,
                _ => r.next_unit_f32() - 0.5,
            }),
        ];
        for (name, make) in kinds {
            let mut s = Sparsifier::new(n);
            let mut reference = Reference { residual: vec![0.0; n] };
            for step in 0..12 {
                let delta: Vec<f32> = (0..n).map(|i| make(i, step, &mut r)).collect();
                let k = [1, 50, 500, 2000, 6000][step % 5];
                let before = s.full_selections;
                let got = s.sparsify(&delta, k);
                if s.full_selections == before {
                    sampled_calls += 1;
                } else {
                    full_calls += 1;
                }
                let want = reference.sparsify(&delta, k);
                assert_eq!(got.indices, want.indices, "{name}: indices at step {step} (k {k})");
                let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.values), bits(&want.values), "{name}: values at step {step}");
                let same =
                    s.residual.iter().zip(&reference.residual).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name}: residual after step {step}");
            }
        }
        // Both ways were taken: the sample's threshold, and the full selection when it guessed
        // too high ("k above the support") or k was too large a share (6,000 of 50,000).
        assert!(sampled_calls > 40, "sampled {sampled_calls}");
        assert!(full_calls > 16, "full {full_calls}");
    }

    #[test]
    fn key_bound_splits_exactly_where_the_keys_do() {
        let mut r = SplitMix64::new(3);
        let mut ts: Vec<u32> = vec![1, 2, 3, 0x007F_FFFF, 0x0080_0000, 0x0080_0001, 0x3F80_0000, 0x3F80_0001];
        ts.extend([0x7F7F_FFFF, INF_KEY - 1, INF_KEY]);
        ts.extend((0..2000).map(|_| 1 + (r.next_u64() % INF_KEY as u64) as u32));
        for t in ts {
            let b = key_bound(t);
            let below = f64::from_bits(b.to_bits() - 1);
            for u in [b, -b, below, -below] {
                let want = magnitude_key(u as f32) >= t;
                assert_eq!(reaches(u, b), want, "t {t:#x}, u {u:e}");
            }
            assert!(magnitude_key(b as f32) >= t && magnitude_key(below as f32) < t, "t {t:#x}");
            // And for values nowhere near the bound.
            for _ in 0..64 {
                // Any f32 (NaN included), nudged off the f32 grid, either sign.
                let near = f32::from_bits(r.next_u64() as u32 & 0x7FFF_FFFF) as f64;
                let u = near * (1.0 + (r.next_unit_f32() as f64 - 0.5) * 2f64.powi(-20));
                let u = if r.next_u64().is_multiple_of(2) { u } else { -u };
                assert_eq!(reaches(u, b), magnitude_key(u as f32) >= t, "t {t:#x}, u {u:e}");
            }
        }
    }

    #[test]
    fn selection_matches_the_reference_top_k_with_ties() {
        let mut r = SplitMix64::new(5);
        for n in [1usize, 7, 300, 5000] {
            // Few distinct magnitudes: many ties.
            let delta: Vec<f32> = (0..n).map(|_| ((r.next_u64() % 7) as f32 - 3.0) * 0.5).collect();
            for k in [0, 1, n / 3, n] {
                let mut s = Sparsifier::new(n);
                let got = s.sparsify(&delta, k).indices;
                let keys: Vec<u32> = delta.iter().map(|&v| magnitude_key(v)).collect();
                let (mut scratch, mut want) = (Vec::new(), Vec::new());
                crate::protocol::select::exact_topk(&keys, k, &mut scratch, &mut want);
                assert_eq!(got, want, "n {n} k {k}");
            }
        }
    }

    #[test]
    fn sends_the_largest_magnitudes() {
        let mut s = Sparsifier::new(6);
        let sent = s.sparsify(&[0.1, -5.0, 0.2, 3.0, -0.3, 0.0], 2);
        assert_eq!(sent.indices, vec![1, 3]);
        assert_eq!(sent.values, vec![f16::from_f32(-5.0), f16::from_f32(3.0)]);
        // The rest is sent later: 0.1 + 0.1 accumulates.
        let sent = s.sparsify(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1);
        assert_eq!(sent.indices, vec![4]);
    }
}
