//! Top-k with error feedback and f16 values (algorithms.md §4):
//!
//! ```text
//! u = Δ + r;  S = Top-k(|u|);  send (S, f16(u[S]));  r = u − scatter(S, f16(u[S]))
//! ```
//!
//! The residual is kept in f64, so that the split of u into what is sent and what stays is
//! exact: for a sent entry h = f16(u) lies within a factor of two of u (or is 0), so u − h is
//! exact (Sterbenz), and nothing is lost to the f16 rounding. (Saturation at ±65504 is the one
//! exception: such an entry keeps its excess in the residual, rounded.)

use half::f16;
use sparsync::engine::select;
use sparsync::protocol::numerics::magnitude_key;

/// Error-feedback state of one client.
#[derive(Clone, Debug)]
pub struct Sparsifier {
    residual: Vec<f64>,
    keys: Vec<u32>,
    scratch: Vec<u32>,
    selected: Vec<u32>,
}

/// One sparse update: ascending indices and their f16 values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sparse {
    pub indices: Vec<u32>,
    pub values: Vec<f16>,
}

impl Sparsifier {
    pub fn new(n: usize) -> Self {
        Self { residual: vec![0.0; n], keys: Vec::new(), scratch: Vec::new(), selected: Vec::new() }
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

    /// Selects the k largest entries of Δ + r, returns them as f16, keeps the rest in r.
    /// Simple passes that vectorise: u = Δ + r in place, the magnitude keys, then the shared
    /// exact Top-k (radix select, ties to the lower index).
    pub fn sparsify(&mut self, delta: &[f32], k: usize) -> Sparse {
        assert_eq!(delta.len(), self.residual.len(), "update and residual sizes differ");
        for (r, &d) in self.residual.iter_mut().zip(delta) {
            *r += d as f64;
        }
        self.keys.clear();
        self.keys.extend(self.residual.iter().map(|&u| magnitude_key(u as f32)));
        select::exact_topk(&self.keys, k, &mut self.scratch, &mut self.selected);
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

#[cfg(test)]
mod tests {
    use super::*;
    use sparsync::protocol::model::SplitMix64;

    #[test]
    fn nothing_is_lost_including_the_f16_rounding() {
        let n = 5000;
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
            let k = 1 + step * 7;
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
                assert_eq!(total_sent[i] + s.residual()[i], total_delta[i], "entry {i} after step {step}");
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
                sparsync::engine::select::exact_topk(&keys, k, &mut scratch, &mut want);
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
