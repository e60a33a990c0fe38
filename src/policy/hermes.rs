//! Hermes (Basani et al., HiPC 2024), server side. Clients gate their own pushes (a push only
//! when the test loss improved significantly; otherwise a `skip` message); the server
//! aggregates what arrives as it arrives and equalises round times:
//!
//! * every client starts with D = 2500 samples per round and batch size b = 16 (E local epochs);
//! * once every client has reported a round, the median round time T_med is fixed;
//! * a client whose round time lies outside [Q1 − 1.5·IQR, Q3 + 1.5·IQR] of the others' gets a
//!   new pair (D, b), b ∈ {2, 4, …, 64}, sent as a directive: for each b, the D whose predicted
//!   round time E·D·k_i(b)/b is closest to T_med, where k_i(b) is the client's cost of one step
//!   at batch size b ([`StepCost`], fitted from the rounds it reported at each b); b is kept
//!   when its prediction is within the tolerance of T_med, as the authors' search (which starts
//!   at b = 16) in effect keeps it; otherwise the qualifying b closest to it. A per-step cost
//!   that did not depend on b made "the smallest D" pick b = 2 every time (docs/seeds.md H1).
//!   The tolerance is `hermes_tolerance_s` capped at T_med/10: the authors' ±1 s is a few
//!   percent of their rounds (H2).
//!
//! Updates are aggregated as they arrive, as shares of the active population: with the `loss`
//! weighting, w_i = (1/L_i) / Σ_j 1/L_j over every active client's latest loss (from its pushes
//! and skips). The reference code keeps a running weighted average of updates (weights 1/loss);
//! normalising per batch instead would give each lone update w = 1, and the accumulated,
//! stale updates of many gated clients then add up and diverge (seen with 8 clients).

use std::collections::BTreeMap;
use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, Policy, PushMeta, Ready, SessionId, SyncPolicy};
use crate::protocol::message::{Directive, RoundTime, SkipReport};

crate::settings::settings! {
    /// Hermes' settings, as flags and TOML keys; [`HermesConfig`] is what they build.
    pub struct HermesSettings;
    pub struct HermesFlags;
    ["Policy"]
    hermes_samples: val u64 = "2500", "Hermes: initial samples per round D";
    hermes_batch: val u64 = "16", "Hermes: initial batch size b";
    hermes_epochs: val u64 = "5", "Hermes: local epochs per round E";
    hermes_tolerance_s: val f64 = "1", "Hermes: round-time tolerance around the median, seconds";
}

impl Policy for Hermes {
    type Settings = HermesSettings;
    fn build(s: &HermesSettings, common: &Common) -> Self {
        Self::new(HermesConfig {
            samples: s.hermes_samples,
            batch: s.hermes_batch,
            epochs: s.hermes_epochs,
            tolerance: s.hermes_tolerance_s,
            max_batch: common.max_batch,
        })
    }
}

/// The batch sizes Hermes chooses from.
pub const BATCH_SIZES: [u64; 6] = [2, 4, 8, 16, 32, 64];

/// Hermes settings.
#[derive(Clone, Debug)]
pub struct HermesConfig {
    /// Initial samples per round D.
    pub samples: u64,
    /// Initial batch size b.
    pub batch: u64,
    /// Local epochs per round E.
    pub epochs: u64,
    /// Allowed distance of the predicted round time from T_med, seconds.
    pub tolerance: f64,
    pub max_batch: usize,
}

#[derive(Clone, Debug)]
struct Alloc {
    d: u64,
    b: u64,
    last_round_s: Option<f64>,
    /// The latest loss the client reported (push or skip).
    loss: Option<f64>,
    /// Seconds per step measured at each batch size.
    cost: StepCost,
}

/// The Hermes policy.
pub struct Hermes {
    cfg: HermesConfig,
    clients: BTreeMap<SessionId, Alloc>,
    t_med: Option<f64>,
    pending: Ready,
    /// Reallocations made: (client, D, b).
    changes: std::collections::VecDeque<(SessionId, u64, u64)>,
    /// Reallocations since the start (`changes` keeps the latest MAX_CHANGES).
    reallocations: u64,
}

/// numpy's default percentile: linear interpolation between closest ranks.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Reallocations kept for the status (the latest; memory stays bounded however long a run).
const MAX_CHANGES: usize = 64;

/// The median of values (any order).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// True when `t` lies outside the closed interval [Q1 − 1.5·IQR, Q3 + 1.5·IQR] of `others`.
///
/// The reference code tests `>=` / `<=`, which flags a client whose time equals everyone
/// else's when the others agree exactly (IQR = 0); docs/algorithms.md §5 says "outside", and so do we.
pub fn is_outlier(t: f64, others: &[f64]) -> bool {
    let mut v = others.to_vec();
    v.sort_by(f64::total_cmp);
    let (q1, q3) = (percentile(&v, 25.0), percentile(&v, 75.0));
    let iqr = q3 - q1;
    t > q3 + 1.5 * iqr || t < q1 - 1.5 * iqr
}

/// The tolerance around T_med, as a fraction of it (the configured tolerance, in seconds, caps
/// it). The authors' ±1 s is a few percent of their rounds of tens of seconds; a cap of T_med/2
/// let every reallocation aim at half the median (docs/seeds.md H2).
pub const RELATIVE_TOLERANCE: f64 = 0.1;

/// A client's measured cost of one local step, per batch size: the latest seconds per step
/// measured at each b. Between batch sizes it is the line k(b) = a + c·b fitted to them (least
/// squares, a and c at least 0); with one batch size measured, that cost for every b, the only
/// assumption one measurement allows (the allocation then keeps b unless it cannot reach T_med).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepCost {
    by_batch: BTreeMap<u64, f64>,
}

impl StepCost {
    pub fn record(&mut self, b: u64, seconds_per_step: f64) {
        if b > 0 && seconds_per_step.is_finite() && seconds_per_step > 0.0 {
            self.by_batch.insert(b, seconds_per_step);
        }
    }

    /// Seconds per step at batch size `b`, if anything was measured.
    pub fn at(&self, b: u64) -> Option<f64> {
        let pts: Vec<(f64, f64)> = self.by_batch.iter().map(|(&b, &k)| (b as f64, k)).collect();
        let n = pts.len() as f64;
        let mean_k = pts.iter().map(|p| p.1).sum::<f64>() / n;
        if pts.len() < 2 {
            return pts.first().map(|p| p.1);
        }
        let mean_b = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let sbb: f64 = pts.iter().map(|p| (p.0 - mean_b).powi(2)).sum();
        let sbk: f64 = pts.iter().map(|p| (p.0 - mean_b) * (p.1 - mean_k)).sum();
        let c = sbk / sbb;
        let x = b as f64;
        let k = if c <= 0.0 {
            mean_k // no measurable growth with b
        } else if mean_k - c * mean_b < 0.0 {
            // Through the origin: k = c'·b.
            let c0 = pts.iter().map(|p| p.0 * p.1).sum::<f64>() / pts.iter().map(|p| p.0 * p.0).sum::<f64>();
            c0 * x
        } else {
            mean_k + c * (x - mean_b)
        };
        (k.is_finite() && k > 0.0).then_some(k)
    }
}

/// The (D, b) for a client whose step at batch size b costs `cost(b)` seconds: for each b, the
/// D (with D ≥ b) whose predicted round E·D·cost(b)/b is closest to `target`; a b qualifies when
/// that prediction is within `tol` of it. The current b is kept when it qualifies (the authors'
/// search, which starts at the current b = 16 and takes the first D that fits, in effect keeps
/// it); otherwise the qualifying b closest to it (the larger on a tie).
pub fn allocate(
    cost: &dyn Fn(u64) -> Option<f64>,
    epochs: u64,
    target: f64,
    tol: f64,
    current_b: u64,
) -> Option<(u64, u64)> {
    let e = epochs.max(1) as f64;
    let mut best: Option<(u64, u64)> = None;
    for &b in &BATCH_SIZES {
        let Some(k) = cost(b).filter(|k| *k > 0.0 && k.is_finite()) else { continue };
        let per_sample = e * k / b as f64;
        let d = ((target / per_sample).round().max(1.0) as u64).max(b);
        let t = d as f64 * per_sample;
        if (t - target).abs() > tol {
            continue;
        }
        let better = match best {
            None => true,
            Some((_, bb)) => b.abs_diff(current_b) <= bb.abs_diff(current_b),
        };
        if better {
            best = Some((d, b));
        }
    }
    best
}

impl Hermes {
    pub fn new(cfg: HermesConfig) -> Self {
        Self {
            pending: Ready::new(cfg.max_batch),
            cfg,
            clients: BTreeMap::new(),
            t_med: None,
            changes: Default::default(),
            reallocations: 0,
        }
    }

    /// The allocation of a client: (D, b).
    #[cfg(test)]
    pub fn allocation(&self, client: SessionId) -> Option<(u64, u64)> {
        self.clients.get(&client).map(|a| (a.d, a.b))
    }

    #[cfg(test)]
    pub fn median_round_time(&self) -> Option<f64> {
        self.t_med
    }

    /// Σ 1/L over the active clients' latest losses (a client without one yet counts as the
    /// mean of the others, or 1 when nobody reported).
    fn population(&self) -> Normalization {
        let known: Vec<f64> = self
            .clients
            .values()
            .filter_map(|a| a.loss)
            .map(|l| 1.0 / l.max(super::staleness::MIN_LOSS))
            .collect();
        let mean = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let missing = self.clients.len() - known.len();
        Normalization::Population {
            clients: self.clients.len().max(1),
            inverse_loss_sum: known.iter().sum::<f64>() + mean * missing as f64,
        }
    }

    fn round_time(&mut self, client: SessionId, seconds: f64) -> Vec<Action> {
        let epochs = self.cfg.epochs as f64;
        let Some(a) = self.clients.get_mut(&client) else { return Vec::new() };
        a.last_round_s = Some(seconds);
        // The round ran E·D/b steps of batch size b.
        a.cost.record(a.b, seconds / (epochs * a.d as f64 / a.b as f64));
        if self.t_med.is_none() {
            let all: Vec<f64> = self.clients.values().filter_map(|a| a.last_round_s).collect();
            if all.len() < self.clients.len() {
                return Vec::new();
            }
            self.t_med = Some(median(&all));
        }
        let t_med = self.t_med.expect("set above");
        let others: Vec<f64> =
            self.clients.iter().filter(|(c, _)| **c != client).filter_map(|(_, a)| a.last_round_s).collect();
        if others.len() < 2 || !is_outlier(seconds, &others) {
            return Vec::new();
        }
        let a = &self.clients[&client];
        let tol = self.cfg.tolerance.min(RELATIVE_TOLERANCE * t_med);
        let cost = |b: u64| a.cost.at(b);
        let Some((d, b)) = allocate(&cost, self.cfg.epochs, t_med, tol, a.b) else {
            return Vec::new();
        };
        let k = a.cost.at(b).expect("allocate used it");
        if (d, b) == (a.d, a.b) {
            return Vec::new();
        }
        let a = self.clients.get_mut(&client).expect("present");
        a.d = d;
        a.b = b;
        // Its next report reflects the new allocation.
        a.last_round_s = None;
        if self.changes.len() == MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back((client, d, b));
        self.reallocations += 1;
        vec![Action::Directive {
            session: client,
            directive: Directive {
                chunk_size: Some(d),
                batch_size: Some(b),
                reason: Some(format!(
                    "hermes: round time {seconds:.2} s is an outlier; predicted {:.2} s against median {t_med:.2} s",
                    self.cfg.epochs as f64 * d as f64 * k / b as f64
                )),
                ..Default::default()
            },
        }]
    }
}

impl SyncPolicy for Hermes {
    fn name(&self) -> &'static str {
        "hermes"
    }

    fn on_join(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.clients
            .insert(client, Alloc {
            d: self.cfg.samples,
            b: self.cfg.batch,
            last_round_s: None,
            loss: None,
            cost: StepCost::default(),
        });
        vec![Action::Directive {
            session: client,
            directive: Directive {
                chunk_size: Some(self.cfg.samples),
                batch_size: Some(self.cfg.batch),
                local_epochs: Some(self.cfg.epochs),
                reason: Some("hermes: initial allocation".into()),
                ..Default::default()
            },
        }]
    }

    fn on_leave(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.clients.remove(&client);
        Vec::new()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        if let Some(a) = self.clients.get_mut(&push.session) {
            a.loss = Some(push.loss as f64);
        }
        self.pending.push(push.id);
        vec![Action::Ack(push.id)]
    }

    fn on_skip(&mut self, _now: Duration, client: SessionId, report: &SkipReport) -> Vec<Action> {
        if let Some(a) = self.clients.get_mut(&client)
            && report.loss.is_finite()
            && report.loss >= 0.0
        {
            a.loss = Some(report.loss);
        }
        match report.round_seconds {
            Some(s) if s.is_finite() && s >= 0.0 => self.round_time(client, s),
            _ => Vec::new(),
        }
    }

    fn on_round_time(&mut self, _now: Duration, client: SessionId, report: &RoundTime) -> Vec<Action> {
        self.round_time(client, report.seconds)
    }

    fn poll(&mut self, _now: Duration) -> Vec<Action> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        self.pending.next_batch(self.population()).into_iter().collect()
    }

    fn drain(&mut self) -> Vec<Action> {
        let n = self.population();
        self.pending.drain(n)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "median_round_s": self.t_med,
            "allocations": self.clients.iter().map(|(c, a)| (c.to_string(), (a.d, a.b))).collect::<BTreeMap<_, _>>(),
            "reallocations": self.reallocations,
            "latest_reallocations": self.changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HermesConfig {
        HermesConfig { samples: 2500, batch: 16, epochs: 5, tolerance: 1.0, max_batch: 64 }
    }

    fn report(seconds: f64) -> RoundTime {
        RoundTime { seconds, steps: 0, commit_overhead_s: None }
    }

    #[test]
    fn quartiles_follow_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 25.0), 1.75);
        assert_eq!(percentile(&v, 75.0), 3.25);
        assert_eq!(median(&[4.0, 1.0, 3.0]), 3.0);
        assert!(is_outlier(10.0, &[4.0, 4.2, 3.9, 4.1]));
        assert!(!is_outlier(4.05, &[4.0, 4.2, 3.9, 4.1]));
        assert!(!is_outlier(4.0, &[4.0, 4.0, 4.0]), "equal to everyone is not an outlier");
    }

    #[test]
    fn a_four_times_slower_client_is_brought_within_tolerance_of_the_median() {
        let t = Duration::ZERO;
        let mut p = Hermes::new(cfg());
        for c in 0..5 {
            p.on_join(t, c);
        }
        // Four clients take ~40 s a round (E·D/b = 781.25 steps at ~0.05 s), one takes 160 s.
        let times = [40.0, 41.0, 39.0, 40.5, 160.0];
        let mut acts = Vec::new();
        for (c, &s) in times.iter().enumerate() {
            acts.extend(p.on_round_time(t, c as SessionId, &report(s)));
        }
        assert_eq!(p.median_round_time(), Some(40.5));
        assert_eq!(acts.len(), 1, "only the slow client is reallocated: {acts:?}");
        let (d, b) = p.allocation(4).unwrap();
        let k = 160.0 / (5.0 * 2500.0 / 16.0);
        let predicted = 5.0 * d as f64 * k / b as f64;
        assert!((predicted - 40.5).abs() <= 1.0, "predicted {predicted} for D {d}, b {b}");
        assert_eq!(p.allocation(0), Some((2500, 16)), "the others keep theirs");
        // b = 16 reaches the median, so it is kept, with the D closest to the median.
        assert_eq!(b, 16);
        let per = 5.0 * k / 16.0;
        for dd in [d - 1, d + 1] {
            assert!((dd as f64 * per - 40.5).abs() >= (predicted - 40.5).abs(), "D {dd} is closer");
        }
    }

    #[test]
    fn a_tolerance_longer_than_the_median_round_is_capped_at_a_tenth_of_it() {
        let t = Duration::ZERO;
        let mut p = Hermes::new(HermesConfig { samples: 512, epochs: 1, tolerance: 0.25, ..cfg() });
        for c in 0..5 {
            p.on_join(t, c);
        }
        // Rounds of ~0.09 s, one of 0.4 s: the outlier must still get a round near 0.09 s, not
        // the smallest allocation there is.
        let times = [0.09, 0.085, 0.095, 0.09, 0.4];
        for (c, &s) in times.iter().enumerate() {
            p.on_round_time(t, c as SessionId, &report(s));
        }
        let (d, b) = p.allocation(4).unwrap();
        let k = 0.4 / (512.0 / 16.0);
        let predicted = d as f64 * k / b as f64;
        assert!((predicted - 0.09).abs() <= 0.045, "predicted {predicted} s for D {d}, b {b}");
        assert!(d > 2, "not the smallest allocation: D {d}, b {b}");
        // H2: within a tenth of the median, not aimed at its lower edge.
        assert!((predicted - 0.09).abs() <= 0.009, "predicted {predicted} s for D {d}, b {b}");
        // H1: b = 16 reaches it, so b stays (the old rule's constant step cost chose b = 2).
        assert_eq!(b, 16);
    }

    /// H1: the step cost depends on b; `allocate` follows the measured costs.
    #[test]
    fn allocate_chooses_b_from_the_per_b_step_costs() {
        // Target 1 s ± 0.1 s, E = 1, current b = 16. With a step cost of 0.125·b, a round of
        // 16 samples (one step at b = 16) takes 2 s: b = 16 cannot reach it, b = 8 can (D = 8).
        let linear = |b: u64| Some(0.125 * b as f64);
        assert_eq!(allocate(&linear, 1, 1.0, 0.1, 16), Some((8, 8)));
        // At 0.32·b, only b = 2 can (3 samples, 0.96 s).
        let steeper = |b: u64| Some(0.32 * b as f64);
        assert_eq!(allocate(&steeper, 1, 1.0, 0.1, 16), Some((3, 2)));
        // When the current b reaches the target it is kept, whatever the others cost.
        let flat = |_: u64| Some(0.5);
        assert_eq!(allocate(&flat, 1, 1.0, 0.1, 16), Some((32, 16)));
    }

    /// H1: the cost model is the line through the costs measured at each batch size.
    #[test]
    fn the_step_cost_is_fitted_from_measured_batch_sizes() {
        let mut c = StepCost::default();
        assert_eq!(c.at(16), None);
        c.record(16, 0.2);
        assert_eq!((c.at(2), c.at(64)), (Some(0.2), Some(0.2)), "one batch size: the same everywhere");
        c.record(4, 0.08);
        // a + c·b through (4, 0.08) and (16, 0.2): c = 0.01, a = 0.04.
        assert!((c.at(8).unwrap() - 0.12).abs() < 1e-12);
        assert!((c.at(64).unwrap() - 0.68).abs() < 1e-12);
        // A Hermes client measured at two batch sizes is allocated with that line.
        let t = Duration::ZERO;
        let mut p = Hermes::new(HermesConfig { samples: 512, epochs: 1, tolerance: 1.0, ..cfg() });
        for c in 0..5 {
            p.on_join(t, c);
        }
        p.clients.get_mut(&4).unwrap().cost.record(4, 0.5);
        // Client 4: 32 steps of b = 16 in 16 s (0.5 s a step, as at b = 4: no growth with b).
        for (c, &s) in [1.0, 1.1, 0.9, 1.0, 16.0].iter().enumerate() {
            p.on_round_time(t, c as SessionId, &report(s));
        }
        // Cost 0.5 s per step at every b: b = 16 reaches 1.0 s with D = 32.
        assert_eq!(p.allocation(4), Some((32, 16)));
    }

    #[test]
    fn no_reallocation_before_every_client_reported() {
        let t = Duration::ZERO;
        let mut p = Hermes::new(cfg());
        for c in 0..3 {
            p.on_join(t, c);
        }
        assert!(p.on_round_time(t, 0, &report(100.0)).is_empty());
        assert!(p.median_round_time().is_none());
    }
}
