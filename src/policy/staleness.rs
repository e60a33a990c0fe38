//! Staleness weighting α(s) and batch weights (docs/algorithms.md §1–2).

use serde::{Deserialize, Serialize};

/// Which α(s) applies to an update of staleness s, or Hermes' inverse-loss weighting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightingKind {
    /// α(s) = 1 (FedAsync's constant).
    Constant,
    /// α(s) = (s + 1)^(−a).
    Polynomial,
    /// α(s) = 1 if s ≤ b, else 1 / (a·(s − b) + 1).
    Hinge,
    /// α(s) = exp(−β · min(s, S)).
    Exponential,
    /// Hermes: w ∝ 1 / L (the update's training loss), normalised over the batch.
    Loss,
}

/// α(s) and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weighting {
    pub kind: WeightingKind,
    /// Polynomial exponent a.
    pub poly_a: f64,
    /// Hinge slope a and knee b.
    pub hinge_a: f64,
    pub hinge_b: f64,
    /// Exponential rate β and cap S.
    pub exp_beta: f64,
    pub exp_cap: f64,
    /// Weight by sample count (w ∝ n_i); off: every update counts the same.
    pub samples: bool,
}

impl Default for Weighting {
    fn default() -> Self {
        Self {
            kind: WeightingKind::Constant,
            poly_a: 0.5,
            hinge_a: 10.0,
            hinge_b: 4.0,
            exp_beta: 0.5,
            exp_cap: 16.0,
            samples: true,
        }
    }
}

impl Weighting {
    /// α(s) for the staleness functions (1 for `Loss`, which is not staleness based).
    pub fn alpha(&self, s: u64) -> f64 {
        let s = s as f64;
        match self.kind {
            WeightingKind::Constant | WeightingKind::Loss => 1.0,
            WeightingKind::Polynomial => (s + 1.0).powf(-self.poly_a),
            WeightingKind::Hinge => {
                if s <= self.hinge_b {
                    1.0
                } else {
                    1.0 / (self.hinge_a * (s - self.hinge_b) + 1.0)
                }
            }
            WeightingKind::Exponential => (-self.exp_beta * s.min(self.exp_cap)).exp(),
        }
    }
}

/// One update's inputs to weighting.
#[derive(Clone, Copy, Debug)]
pub struct WeightInput {
    pub staleness: u64,
    pub samples: u32,
    pub loss: f32,
}

/// How a batch's weights are normalised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalization {
    /// w_i = α(s_i) · n_i / Σ n_j (or α(s_i) / |B| without sample weighting).
    Batch,
    /// w_i = α(s_i) / M, M = active clients.
    Fixed(usize),
    /// w_i = 1 / M, M = active clients, whatever the weighting: ADSP, whose authors add each
    /// commit's Δ / M (`recv_commit`); a staleness factor on top would damp stale commits twice.
    Uniform(usize),
    /// Hermes: shares of the active population. With the `loss` weighting
    /// w_i = (1/L_i) / Σ_{j active} 1/L_j over each client's latest loss (1/M when losses are
    /// equal), so stale, accumulated updates average instead of adding up; with a staleness
    /// weighting, α(s_i) / M.
    Population { clients: usize, inverse_loss_sum: f64 },
}

/// Smallest loss used by the `loss` weighting (a zero loss would get infinite weight).
pub const MIN_LOSS: f64 = 1e-6;

/// Weights of a batch per docs/algorithms.md §2 (computed in f64, rounded once to f32).
pub fn batch_weights(w: &Weighting, norm: Normalization, batch: &[WeightInput], out: &mut Vec<f32>) {
    out.clear();
    if batch.is_empty() {
        return;
    }
    let count = |u: &WeightInput| if w.samples { u.samples as f64 } else { 1.0 };
    match (w.kind, norm) {
        (_, Normalization::Uniform(m)) => {
            out.extend(batch.iter().map(|_| (1.0 / m.max(1) as f64) as f32));
        }
        (WeightingKind::Loss, Normalization::Batch) => {
            let raw = |u: &WeightInput| count(u) / (u.loss as f64).max(MIN_LOSS);
            let total: f64 = batch.iter().map(raw).sum();
            out.extend(batch.iter().map(|u| (raw(u) / total) as f32));
        }
        (WeightingKind::Loss, Normalization::Fixed(m)) => {
            // Relative to a loss of 1 per client, so that equal losses give 1/M.
            out.extend(batch.iter().map(|u| (1.0 / (u.loss as f64).max(MIN_LOSS) / m.max(1) as f64) as f32));
        }
        (_, Normalization::Batch) => {
            let total: f64 = batch.iter().map(count).sum();
            out.extend(batch.iter().map(|u| (w.alpha(u.staleness) * count(u) / total) as f32));
        }
        (_, Normalization::Fixed(m)) => {
            out.extend(batch.iter().map(|u| (w.alpha(u.staleness) / m.max(1) as f64) as f32));
        }
        (WeightingKind::Loss, Normalization::Population { clients, inverse_loss_sum }) => {
            let total = if inverse_loss_sum > 0.0 && inverse_loss_sum.is_finite() {
                inverse_loss_sum
            } else {
                clients.max(1) as f64
            };
            out.extend(batch.iter().map(|u| (1.0 / (u.loss as f64).max(MIN_LOSS) / total).min(1.0) as f32));
        }
        (_, Normalization::Population { clients, .. }) => {
            out.extend(batch.iter().map(|u| (w.alpha(u.staleness) / clients.max(1) as f64) as f32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(kind: WeightingKind) -> Weighting {
        Weighting { kind, ..Default::default() }
    }

    #[test]
    fn alpha_functions_match_algorithms_md() {
        let p = with(WeightingKind::Polynomial);
        assert_eq!(p.alpha(0), 1.0);
        assert!((p.alpha(3) - 0.5).abs() < 1e-12); // (3+1)^-0.5
        let h = with(WeightingKind::Hinge);
        assert_eq!(h.alpha(4), 1.0);
        assert!((h.alpha(5) - 1.0 / 11.0).abs() < 1e-12);
        assert!((h.alpha(6) - 1.0 / 21.0).abs() < 1e-12);
        let e = with(WeightingKind::Exponential);
        assert!((e.alpha(2) - (-1.0f64).exp()).abs() < 1e-12);
        assert_eq!(e.alpha(16), e.alpha(100)); // capped at S = 16
        assert_eq!(with(WeightingKind::Constant).alpha(1000), 1.0);
    }

    #[test]
    fn batch_weights_follow_samples_and_staleness() {
        let b = [
            WeightInput { staleness: 0, samples: 30, loss: 1.0 },
            WeightInput { staleness: 3, samples: 10, loss: 0.5 },
        ];
        let mut out = Vec::new();
        batch_weights(&with(WeightingKind::Polynomial), Normalization::Batch, &b, &mut out);
        assert_eq!(out, vec![0.75, (0.5 * 0.25) as f32]);
        let no_samples = Weighting { samples: false, ..with(WeightingKind::Constant) };
        batch_weights(&no_samples, Normalization::Batch, &b, &mut out);
        assert_eq!(out, vec![0.5, 0.5]);
        batch_weights(&no_samples, Normalization::Fixed(4), &b, &mut out);
        assert_eq!(out, vec![0.25, 0.25]);
        // ADSP: 1/M whatever the staleness, samples or weighting.
        for kind in [WeightingKind::Polynomial, WeightingKind::Loss] {
            batch_weights(&with(kind), Normalization::Uniform(4), &b, &mut out);
            assert_eq!(out, vec![0.25, 0.25]);
        }
        // Loss weighting within a batch: w ∝ 1/L (with samples: 30/1 and 10/0.5 = 20 → 0.6, 0.4)
        batch_weights(&with(WeightingKind::Loss), Normalization::Batch, &b, &mut out);
        assert_eq!(out, vec![0.6, 0.4]);
        // Hermes: shares of the population's inverse losses (1/1 + 1/0.5 + 1/2 + 1/1 = 4.5).
        let pop = Normalization::Population { clients: 4, inverse_loss_sum: 4.5 };
        batch_weights(&with(WeightingKind::Loss), pop, &b, &mut out);
        assert_eq!(out, vec![(1.0 / 4.5) as f32, (2.0 / 4.5) as f32]);
        batch_weights(&with(WeightingKind::Polynomial), pop, &b, &mut out);
        assert_eq!(out, vec![0.25, 0.125]);
    }
}
