//! ADSP (Hu, Wang, Wu, AAAI 2020): no client waits for another. In every check period Γ every
//! client commits the same number C of times: client i is told to commit every
//! `T_i = max(T_min, Γ/C − o_i)` seconds (o_i: its commit overhead, which it reports) and trains
//! without pause in between, so a faster client does more local steps per commit.
//!
//! C is searched online: each candidate runs one period; the global loss at the period's start,
//! Γ/2 and Γ is fitted with `l(t) = 1/(a²·t + b) + c₀` and scored `r(C) = a² / (1/(l_target −
//! c₀) − b)`, the inverse of the predicted time to the target loss. As in the authors' code, t
//! is absolute (seconds since the first client joined): r is then the inverse of the projected
//! time at which the target is reached, comparable between candidates tried one after the other
//! (period-relative times would favour later candidates, which start from a lower loss). The search starts at C = 1
//! and tries C + 1 while the score improves, keeping the best. It runs again every
//! `research_every`, or at once when the global loss rises by 30% or more between two periods
//! (then from the current C, as the authors' code does). Commits are applied as they arrive with
//! `w = α(s) / M`, M the active clients.
//!
//! Γ and T_min left unset are derived from measured round times (`derive_timescale`): the
//! paper's 60 s and 10 s suit hours of training, not a run of minutes. Until every client has
//! reported two rounds, no interval is sent and clients commit every `local_steps` steps.

use std::collections::BTreeMap;
use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, LossSource, Policy, PushMeta, Ready, SessionId, SyncPolicy};
use crate::protocol::message::{Directive, RoundTime};
use crate::settings::Invalid;

crate::settings::settings! {
    /// ADSP's settings, as flags and TOML keys (seconds); [`AdspConfig`] is what they build.
    pub struct AdspSettings;
    pub struct AdspFlags;
    ["Policy"]
    adsp_period_s: opt f64 = "10 rounds of the slowest client", "ADSP: check period Γ in seconds (unset: ten times the slowest client's measured round time; the paper used 60 s for hours of training)";
    adsp_min_interval_s: opt f64 = "the fastest client's round", "ADSP: smallest commit interval T_min in seconds (unset: the fastest client's measured round time; the paper used 10 s)";
    adsp_research_s: val f64 = "1000", "ADSP: search C again after this many seconds";
    adsp_target_loss: val f64 = "0.35", "ADSP: target loss l_target of the score r(C)";
}

impl Policy for Adsp {
    type Settings = AdspSettings;
    fn build(s: &AdspSettings, common: &Common) -> Self {
        let secs = Duration::from_secs_f64;
        Self::new(AdspConfig {
            period: s.adsp_period_s.map(secs),
            min_interval: s.adsp_min_interval_s.map(secs),
            research_every: secs(s.adsp_research_s),
            target_loss: s.adsp_target_loss,
            rise: 0.3,
            max_batch: common.max_batch,
        })
    }
    fn validate(s: &AdspSettings) -> Result<(), Invalid> {
        if s.adsp_period_s.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            return Err(Invalid { field: "adsp_period_s", reason: "must be positive" });
        }
        if s.adsp_min_interval_s.is_some_and(|p| !(p.is_finite() && p >= 0.0)) {
            return Err(Invalid { field: "adsp_min_interval_s", reason: "must be zero or positive" });
        }
        Ok(())
    }
}

/// ADSP settings.
#[derive(Clone, Debug)]
pub struct AdspConfig {
    /// Check period Γ (None: derived from measured round times).
    pub period: Option<Duration>,
    /// Smallest commit interval T_min (None: derived from measured round times).
    pub min_interval: Option<Duration>,
    /// Search again after this long.
    pub research_every: Duration,
    /// l_target of the score.
    pub target_loss: f64,
    /// Relative rise of the global loss between two periods that forces a new search.
    pub rise: f64,
    pub max_batch: usize,
}

#[derive(Clone, Debug, Default)]
struct ClientState {
    /// Commit overhead o_i, seconds (as the client reports it).
    overhead: f64,
    /// Commits in the current period.
    commits: u64,
    /// The interval last sent.
    interval: Option<f64>,
    /// Round times reported (seconds, including the commit's overhead), at most two kept.
    rounds: Vec<f64>,
}

/// Γ and T_min in force.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timescale {
    pub period: Duration,
    pub min_interval: Duration,
    /// True when measured round times set either value.
    pub derived: bool,
}

/// Finished periods and scores kept for the status (the latest).
const MAX_KEPT: usize = 64;

/// Periods Γ spans in rounds of the slowest client when derived.
pub const ROUNDS_PER_PERIOD: f64 = 10.0;

/// The paper's Γ and T_min. Γ is also how long after the first join clients that have not
/// reported two rounds are waited for (browser and Python trainers send no RoundTime); then
/// the reports so far set the timescale, or with none the paper's values apply.
pub const PAPER_PERIOD: Duration = Duration::from_secs(60);
pub const PAPER_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The longest Γ or T_min a derivation gives (a day), whatever a client reports.
const MAX_DERIVED_S: f64 = 86_400.0;

/// The documented rule (docs/algorithms.md §5, ADSP): from each client's second reported round
/// time R_i (the first includes start-up), Γ = 10 · max R_i, ten rounds of the slowest client,
/// so that C = 1 … 10 spans one commit per ten of its rounds to one per round; and T_min =
/// min R_i, no client commits more often than the fastest one's own plain round. A value set
/// in the configuration is kept.
pub fn derive_timescale(cfg: &AdspConfig, rounds: &[f64]) -> Option<Timescale> {
    if let (Some(period), Some(min_interval)) = (cfg.period, cfg.min_interval) {
        return Some(Timescale { period, min_interval, derived: false });
    }
    let ok = |r: &&f64| r.is_finite() && **r > 0.0;
    if rounds.is_empty() || !rounds.iter().all(|r| ok(&r)) {
        return None;
    }
    let max = rounds.iter().copied().fold(f64::MIN, f64::max);
    let min = rounds.iter().copied().fold(f64::MAX, f64::min);
    let secs = |x: f64| Duration::from_secs_f64(x.min(MAX_DERIVED_S));
    Some(Timescale {
        period: cfg.period.unwrap_or_else(|| secs(ROUNDS_PER_PERIOD * max)),
        min_interval: cfg.min_interval.unwrap_or_else(|| secs(min)),
        derived: true,
    })
}

/// The global loss: the evaluator's latest score when one reported within a period, else the
/// mean of the clients' latest push losses.
#[derive(Clone, Debug, Default)]
pub struct GlobalLoss {
    evaluator: Option<(Duration, f64)>,
    per_client: BTreeMap<SessionId, f64>,
}

impl GlobalLoss {
    pub fn record(&mut self, now: Duration, source: LossSource, loss: f64) {
        if !loss.is_finite() {
            return;
        }
        match source {
            LossSource::Evaluator => self.evaluator = Some((now, loss)),
            LossSource::Push(c) => {
                self.per_client.insert(c, loss);
            }
        }
    }

    pub fn forget(&mut self, client: SessionId) {
        self.per_client.remove(&client);
    }

    pub fn value(&self, now: Duration, horizon: Duration) -> Option<f64> {
        if let Some((t, l)) = self.evaluator
            && now.saturating_sub(t) <= horizon
        {
            return Some(l);
        }
        if self.per_client.is_empty() {
            return None;
        }
        Some(self.per_client.values().sum::<f64>() / self.per_client.len() as f64)
    }
}

/// The fitted curve l(t) = 1/(a²·t + b) + c₀ through three points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub a2: f64,
    pub b: f64,
    pub c0: f64,
}

/// Fits the three points exactly: y_i = 1/(l_i − c₀) must lie on a line in t, which fixes c₀
/// (found by bisection below min l); then a² is the slope and b the intercept. None when the
/// points are not a convex decrease (no such c₀ exists).
pub fn fit(points: [(f64, f64); 3]) -> Option<Fit> {
    let [(t0, l0), (t1, l1), (t2, l2)] = points;
    if !(t0 < t1 && t1 < t2 && l0 > l1 && l1 > l2) {
        return None;
    }
    let g = |c: f64| {
        let (y0, y1, y2) = (1.0 / (l0 - c), 1.0 / (l1 - c), 1.0 / (l2 - c));
        (y1 - y0) / (t1 - t0) - (y2 - y1) / (t2 - t1)
    };
    let span = l0 - l2;
    let mut hi = l2 - span * 1e-9;
    let mut lo = l2 - span * 1e6;
    let (glo, ghi) = (g(lo), g(hi));
    if !(glo.is_finite() && ghi.is_finite()) || glo.signum() == ghi.signum() {
        return None;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if g(mid).signum() == glo.signum() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let c0 = 0.5 * (lo + hi);
    let (y0, y1) = (1.0 / (l0 - c0), 1.0 / (l1 - c0));
    let a2 = (y1 - y0) / (t1 - t0);
    let b = y0 - a2 * t0;
    (a2 > 0.0).then_some(Fit { a2, b, c0 })
}

/// r(C): the inverse of the predicted time (on the points' clock) at which the loss reaches the
/// target. Without a fit, the straight line through the first and last points predicts it.
pub fn score(points: [(f64, f64); 3], target: f64) -> f64 {
    if let Some(f) = fit(points) {
        if target <= f.c0 {
            return 0.0; // the curve never gets there
        }
        let t = (1.0 / (target - f.c0) - f.b) / f.a2;
        return if t <= points[0].0 { f64::MAX } else { 1.0 / t };
    }
    let [(t0, l0), _, (t2, l2)] = points;
    let slope = (l0 - l2) / (t2 - t0);
    if slope <= 0.0 || !slope.is_finite() {
        return 0.0;
    }
    if l2 <= target {
        return f64::MAX;
    }
    1.0 / (t2 + (l2 - target) / slope)
}

#[derive(Clone, Debug)]
struct Search {
    candidate: u64,
    best: Option<(u64, f64)>,
}

/// The ADSP policy.
pub struct Adsp {
    cfg: AdspConfig,
    /// Γ and T_min, once known.
    scale: Option<Timescale>,
    clients: BTreeMap<SessionId, ClientState>,
    c: u64,
    search: Option<Search>,
    period_start: Option<Duration>,
    /// The clock origin of the loss curve (the first join).
    origin: Duration,
    /// Loss samples of this period (seconds since `origin`, loss): start, middle, end.
    points: Vec<(f64, f64)>,
    mid_recorded: bool,
    last_search: Duration,
    prev_period_loss: Option<f64>,
    loss: GlobalLoss,
    pending: Ready,
    /// Per finished period: (C, commits per client).
    /// (the latest MAX_KEPT; memory stays bounded however long a run).
    history: std::collections::VecDeque<(u64, BTreeMap<SessionId, u64>)>,
    /// Periods finished since the start.
    periods: u64,
    /// Every score computed: (C, r(C)).
    scores: Vec<(u64, f64)>,
}

impl Adsp {
    pub fn new(cfg: AdspConfig) -> Self {
        let scale = derive_timescale(&cfg, &[]);
        Self {
            pending: Ready::new(cfg.max_batch),
            cfg,
            scale,
            clients: BTreeMap::new(),
            c: 1,
            search: Some(Search { candidate: 1, best: None }),
            period_start: None,
            origin: Duration::ZERO,
            points: Vec::new(),
            mid_recorded: false,
            last_search: Duration::ZERO,
            prev_period_loss: None,
            loss: GlobalLoss::default(),
            history: Default::default(),
            periods: 0,
            scores: Vec::new(),
        }
    }

    /// The commit count per period in force.
    #[cfg(test)]
    pub fn commits_per_period(&self) -> u64 {
        self.c
    }

    /// Γ (the configured one until derived; only read once periods run).
    fn period(&self) -> Duration {
        self.scale.map_or(Duration::MAX, |s| s.period)
    }

    /// T_i = max(T_min, Γ/C − o_i).
    fn interval(&self, scale: Timescale, overhead: f64) -> f64 {
        (scale.period.as_secs_f64() / self.c as f64 - overhead).max(scale.min_interval.as_secs_f64())
    }

    fn directives(&mut self, force: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(scale) = self.scale else { return out };
        let ids: Vec<SessionId> = self.clients.keys().copied().collect();
        for id in ids {
            let t = self.interval(scale, self.clients[&id].overhead);
            let st = self.clients.get_mut(&id).expect("listed above");
            if force || st.interval.is_none_or(|old| (old - t).abs() > 1e-9) {
                st.interval = Some(t);
                out.push(Action::Directive {
                    session: id,
                    directive: Directive {
                        commit_interval_s: Some(t),
                        reason: Some(format!(
                            "adsp: C = {} commits per {:.2} s period (T_min {:.2} s{})",
                            self.c,
                            scale.period.as_secs_f64(),
                            scale.min_interval.as_secs_f64(),
                            if scale.derived { ", derived from round times" } else { "" }
                        )),
                        ..Default::default()
                    },
                });
            }
        }
        out
    }

    fn loss_now(&self, now: Duration) -> Option<f64> {
        self.loss.value(now, self.period())
    }

    fn end_period(&mut self, now: Duration) -> Vec<Action> {
        let start = self.period_start.expect("a period is running");
        let commits: BTreeMap<SessionId, u64> = self.clients.iter().map(|(&c, s)| (c, s.commits)).collect();
        if self.history.len() == MAX_KEPT {
            self.history.pop_front();
        }
        self.history.push_back((self.c, commits));
        self.periods += 1;
        let end_loss = self.loss_now(now);
        let clock = now.saturating_sub(self.origin).as_secs_f64();
        if let Some(l) = end_loss {
            self.points.push((clock, l));
        }
        let scored = (self.points.len() == 3).then(|| {
            let p = [self.points[0], self.points[1], self.points[2]];
            score(p, self.cfg.target_loss)
        });
        if let Some(search) = self.search.as_mut() {
            let s = scored.unwrap_or(0.0);
            if self.scores.len() == MAX_KEPT {
                self.scores.remove(0);
            }
            self.scores.push((search.candidate, s));
            let improved = search.best.is_none_or(|(_, b)| s > b);
            if improved {
                search.best = Some((search.candidate, s));
                search.candidate += 1;
                self.c = search.candidate;
            } else {
                self.c = search.best.map_or(1, |b| b.0);
                self.search = None;
                self.last_search = now;
            }
        } else {
            let rose = matches!((self.prev_period_loss, end_loss), (Some(p), Some(l)) if p > 0.0 && (l - p) / p >= self.cfg.rise);
            if rose || now.saturating_sub(self.last_search) >= self.cfg.research_every {
                self.search = Some(Search { candidate: self.c, best: None });
            }
        }
        if end_loss.is_some() {
            self.prev_period_loss = end_loss;
        }
        // The next period.
        self.period_start = Some(start + self.period());
        self.points = end_loss.map(|l| vec![(clock, l)]).unwrap_or_default();
        self.mid_recorded = false;
        for s in self.clients.values_mut() {
            s.commits = 0;
        }
        self.directives(false)
    }
}

impl Adsp {
    /// The timescale that would start now, how long after the first join it waits for clients
    /// that have not reported two rounds (the paper's Γ), and whether every client has.
    fn candidate(&self) -> Option<(Timescale, Duration, bool)> {
        if self.clients.is_empty() {
            return None;
        }
        let second: Vec<f64> =
            self.clients.values().filter(|c| c.rounds.len() >= 2).map(|c| c.rounds[1]).collect();
        let all = second.len() == self.clients.len();
        if second.is_empty() {
            let paper = Timescale {
                period: self.cfg.period.unwrap_or(PAPER_PERIOD),
                min_interval: self.cfg.min_interval.unwrap_or(PAPER_MIN_INTERVAL),
                derived: false,
            };
            return Some((paper, PAPER_PERIOD, false));
        }
        derive_timescale(&self.cfg, &second).map(|t| (t, PAPER_PERIOD, all))
    }

    /// Γ and T_min are fixed once every client has reported its second round, or, when some
    /// never report, 60 s after the first join; periods start.
    fn try_derive(&mut self, now: Duration) -> Vec<Action> {
        if self.scale.is_some() {
            return Vec::new();
        }
        match self.candidate() {
            Some((scale, wait, all)) if all || now.saturating_sub(self.origin) >= wait => {
                self.scale = Some(scale);
                self.start_periods(now);
                self.directives(true)
            }
            _ => Vec::new(),
        }
    }

    /// The first check period starts now.
    fn start_periods(&mut self, now: Duration) {
        self.period_start = Some(now);
        self.last_search = now;
        let clock = now.saturating_sub(self.origin).as_secs_f64();
        self.points = self.loss_now(now).map(|l| vec![(clock, l)]).unwrap_or_default();
    }
}

impl SyncPolicy for Adsp {
    fn name(&self) -> &'static str {
        "adsp"
    }

    fn on_join(&mut self, now: Duration, client: SessionId) -> Vec<Action> {
        if self.clients.is_empty() && self.periods == 0 && self.period_start.is_none() {
            self.origin = now;
        }
        self.clients.insert(client, ClientState::default());
        if self.scale.is_some() && self.period_start.is_none() {
            self.start_periods(now);
        }
        self.directives(false)
    }

    fn on_leave(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.clients.remove(&client);
        self.loss.forget(client);
        Vec::new()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        if let Some(s) = self.clients.get_mut(&push.session) {
            s.commits += 1;
        }
        self.pending.push(push.id);
        vec![Action::Ack(push.id)]
    }

    fn on_round_time(&mut self, now: Duration, client: SessionId, report: &RoundTime) -> Vec<Action> {
        let Some(s) = self.clients.get_mut(&client) else { return Vec::new() };
        if let Some(o) = report.commit_overhead_s {
            s.overhead = o;
        }
        if self.scale.is_some() || report.steps == 0 {
            return Vec::new();
        }
        // A round of no time says nothing about the client's speed: not kept.
        if s.rounds.len() < 2 && report.seconds.is_finite() && report.seconds > 0.0 {
            s.rounds.push(report.seconds);
        }
        self.try_derive(now)
    }

    fn on_loss(&mut self, now: Duration, source: LossSource, loss: f64) {
        self.loss.record(now, source, loss);
        // A period that started before any loss was known starts its curve at the first one.
        if self.period_start.is_some()
            && self.points.is_empty()
            && let Some(l) = self.loss_now(now)
        {
            self.points.push((now.saturating_sub(self.origin).as_secs_f64(), l));
        }
    }

    fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut out = self.try_derive(now);
        if let Some(start) = self.period_start {
            let half = start + self.period() / 2;
            if !self.mid_recorded && now >= half {
                self.mid_recorded = true;
                if let Some(l) = self.loss_now(now)
                    && self.points.len() == 1
                {
                    self.points.push((now.saturating_sub(self.origin).as_secs_f64(), l));
                }
            }
            if now >= start + self.period() {
                out.extend(self.end_period(now));
            }
        }
        let m = self.clients.len().max(1);
        out.extend(self.pending.next_batch(Normalization::Fixed(m)));
        out
    }

    fn next_wakeup(&self) -> Option<Duration> {
        if self.scale.is_none() {
            return self.candidate().map(|(_, wait, _)| self.origin + wait);
        }
        let start = self.period_start?;
        Some(if self.mid_recorded { start + self.period() } else { start + self.period() / 2 })
    }

    fn drain(&mut self) -> Vec<Action> {
        let m = self.clients.len().max(1);
        self.pending.drain(Normalization::Fixed(m))
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "commits_per_period": self.c,
            "searching": self.search.as_ref().map(|s| s.candidate),
            "scores": self.scores,
            "intervals": self.clients.iter().map(|(c, s)| (c.to_string(), s.interval)).collect::<BTreeMap<_, _>>(),
            "periods": self.periods,
            "period_s": self.scale.map(|s| s.period.as_secs_f64()),
            "min_interval_s": self.scale.map(|s| s.min_interval.as_secs_f64()),
            "timescale_derived": self.scale.map(|s| s.derived),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdspConfig {
        AdspConfig {
            period: Some(Duration::from_secs(60)),
            min_interval: Some(Duration::from_secs(1)),
            research_every: Duration::from_secs(1000),
            target_loss: 0.3,
            rise: 0.3,
            max_batch: 64,
        }
    }

    #[test]
    fn fit_recovers_the_curve() {
        let (a2, b, c0) = (0.02, 1.0, 0.2);
        let l = |t: f64| 1.0 / (a2 * t + b) + c0;
        let f = fit([(0.0, l(0.0)), (30.0, l(30.0)), (60.0, l(60.0))]).unwrap();
        assert!((f.a2 - a2).abs() < 1e-6 && (f.b - b).abs() < 1e-6 && (f.c0 - c0).abs() < 1e-6, "{f:?}");
        // Time to 0.3: 1/(0.1) = 10 = 0.02 t + 1 → t = 450.
        let r = score([(0.0, l(0.0)), (30.0, l(30.0)), (60.0, l(60.0))], 0.3);
        assert!((1.0 / r - 450.0).abs() < 1e-3, "{}", 1.0 / r);
        assert!(fit([(0.0, 1.0), (30.0, 0.5), (60.0, 0.0)]).is_none(), "a straight line has no such curve");
        assert!(score([(0.0, 1.0), (30.0, 0.9), (60.0, 0.8)], 0.3) > 0.0, "linear fallback");
    }

    /// Scripted clients that commit every T_i (their directive) and take o_i per commit.
    /// `loss_of(C, dt)` advances a synthetic training run by dt seconds under C and returns the
    /// global loss.
    fn run_clients(
        p: &mut Adsp,
        overheads: &[f64],
        seconds: f64,
        loss_of: &mut dyn FnMut(u64, f64) -> f64,
    ) -> Vec<(u64, BTreeMap<SessionId, u64>)> {
        let dt = 0.05;
        let mut next_commit = vec![0.0f64; overheads.len()];
        let mut interval = vec![f64::NAN; overheads.len()];
        let mut id = 0;
        let mut t = 0.0;
        let apply = |acts: Vec<Action>, interval: &mut Vec<f64>| {
            for a in acts {
                if let Action::Directive { session: client, directive } = a {
                    interval[client as usize] = directive.commit_interval_s.unwrap();
                }
            }
        };
        for (i, &o) in overheads.iter().enumerate() {
            let acts = p.on_join(Duration::from_secs_f64(t), i as SessionId);
            apply(acts, &mut interval);
            p.on_round_time(
                Duration::ZERO,
                i as SessionId,
                &RoundTime { seconds: 1.0, steps: 1, commit_overhead_s: Some(o) },
            );
        }
        for (i, &o) in overheads.iter().enumerate() {
            next_commit[i] = interval[i] + o;
        }
        while t < seconds {
            t += dt;
            let now = Duration::from_secs_f64(t);
            let l = loss_of(p.c, dt);
            p.on_loss(now, LossSource::Evaluator, l);
            for i in 0..overheads.len() {
                if t >= next_commit[i] {
                    id += 1;
                    let m = PushMeta::for_test(id, i as SessionId);
                    p.on_push(now, &m);
                    // Train for T_i, then commit (which takes o_i): every T_i + o_i seconds.
                    next_commit[i] = t + interval[i] + overheads[i];
                }
            }
            let acts = p.poll(now);
            apply(acts, &mut interval);
        }
        p.history.iter().cloned().collect()
    }

    #[test]
    fn commit_counts_are_equal_across_speeds() {
        let mut p = Adsp::new(cfg());
        // Overheads of 0.1 s, 1 s and 4 s: very different clients.
        let mut progress = 0.0;
        let hist = run_clients(&mut p, &[0.1, 1.0, 4.0], 600.0, &mut |_, dt| {
            progress += 0.01 * dt;
            2.0 / (1.0 + progress) + 0.1
        });
        assert!(hist.len() >= 9);
        for (c, commits) in &hist[1..] {
            let (lo, hi) = (commits.values().min().unwrap(), commits.values().max().unwrap());
            assert!(hi - lo <= 1, "C = {c}: commits {commits:?}");
            assert!((*hi as i64 - *c as i64).abs() <= 1, "C = {c}: commits {commits:?}");
        }
    }

    #[test]
    fn search_picks_the_best_scoring_c() {
        let mut p = Adsp::new(cfg());
        // A synthetic loss curve whose speed a² peaks at C = 3 (more commits help, until the
        // communication cost outweighs them).
        let a2 = |c: u64| [0.0, 0.010, 0.016, 0.020, 0.015, 0.012, 0.010][c.min(6) as usize];
        let mut progress = 1.0;
        run_clients(&mut p, &[0.1, 0.5], 400.0, &mut |c, dt| {
            progress += a2(c) * dt;
            1.0 / progress + 0.1
        });
        assert!(p.search.is_none(), "search finished");
        assert_eq!(p.commits_per_period(), 3, "scores: {:?}", p.scores);
        let tried: Vec<u64> = p.scores.iter().map(|s| s.0).collect();
        assert_eq!(&tried[..4], &[1, 2, 3, 4]);
    }

    #[test]
    fn the_timescale_rule_uses_the_slowest_and_fastest_rounds() {
        let unset = AdspConfig { period: None, min_interval: None, ..cfg() };
        let t = derive_timescale(&unset, &[0.4, 1.6, 0.2]).unwrap();
        assert_eq!(
            (t.period, t.min_interval, t.derived),
            (Duration::from_secs(16), Duration::from_secs_f64(0.2), true)
        );
        assert_eq!(derive_timescale(&unset, &[]), None);
        assert_eq!(derive_timescale(&unset, &[0.4, f64::NAN]), None);
        let half = AdspConfig { min_interval: None, ..cfg() };
        let t = derive_timescale(&half, &[0.4, 1.6]).unwrap();
        assert_eq!((t.period, t.min_interval), (Duration::from_secs(60), Duration::from_secs_f64(0.4)));
        let set = derive_timescale(&cfg(), &[]).unwrap();
        assert_eq!((set.period, set.derived), (Duration::from_secs(60), false));
    }

    #[test]
    fn unset_timescales_wait_for_every_clients_second_round() {
        let mut p = Adsp::new(AdspConfig { period: None, min_interval: None, ..cfg() });
        let round = |s: f64| RoundTime { seconds: s, steps: 10, commit_overhead_s: Some(0.05) };
        assert!(p.on_join(Duration::ZERO, 0).is_empty(), "no interval before round times");
        assert!(p.on_join(Duration::ZERO, 1).is_empty());
        // First rounds include start-up and are not used.
        assert!(p.on_round_time(Duration::from_secs(1), 0, &round(9.0)).is_empty());
        assert!(
            p.on_round_time(Duration::from_secs(1), 0, &round(0.3)).is_empty(),
            "client 1 has not reported"
        );
        assert!(p.on_round_time(Duration::from_secs(2), 1, &round(9.0)).is_empty());
        // Client 1 is waited for (a slow client's rounds come late), 60 s at most.
        assert_eq!(p.next_wakeup(), Some(Duration::from_secs(60)));
        let acts = p.on_round_time(Duration::from_secs(3), 1, &round(1.2));
        // Γ = 10 · 1.2 s, T_min = 0.3 s; C = 1: T_i = 12 − 0.05.
        let intervals: Vec<f64> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Directive { directive, .. } => directive.commit_interval_s,
                _ => None,
            })
            .collect();
        assert_eq!(intervals.len(), 2, "{acts:?}");
        assert!(intervals.iter().all(|t| (t - 11.95).abs() < 1e-9), "{intervals:?}");
        assert_eq!(p.next_wakeup(), Some(Duration::from_secs(3 + 6)), "the first period started at once");
        let st = p.state();
        assert_eq!((st["period_s"].as_f64(), st["timescale_derived"].as_bool()), (Some(12.0), Some(true)));
        // A later client is told the interval at once.
        assert_eq!(p.on_join(Duration::from_secs(4), 2).len(), 1);
    }

    #[test]
    fn clients_that_never_report_round_times_do_not_stall_the_timescale() {
        let unset = || AdspConfig { period: None, min_interval: None, ..cfg() };
        let round = |s: f64| RoundTime { seconds: s, steps: 10, commit_overhead_s: None };
        // A native trainer reports; a browser trainer never does: 60 s after the first join,
        // the native client's rounds set the timescale (Γ = 10 · 0.5 s).
        let mut p = Adsp::new(unset());
        p.on_join(Duration::from_secs(1), 0);
        p.on_join(Duration::from_secs(1), 1);
        p.on_round_time(Duration::from_secs(2), 0, &round(3.0));
        assert!(p.on_round_time(Duration::from_secs(2), 0, &round(0.5)).is_empty());
        assert_eq!(p.next_wakeup(), Some(Duration::from_secs(61)));
        assert!(p.poll(Duration::from_secs(60)).is_empty());
        let acts = p.poll(Duration::from_secs(61));
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Directive { .. })).count(), 2, "{acts:?}");
        assert_eq!(p.state()["period_s"].as_f64(), Some(5.0));
        // No client reports at all: the paper's values, 60 s after the first join.
        let mut q = Adsp::new(unset());
        q.on_join(Duration::ZERO, 0);
        assert!(q.poll(Duration::from_secs(59)).is_empty());
        assert_eq!(q.poll(Duration::from_secs(60)).len(), 1);
        assert_eq!(
            (q.state()["period_s"].as_f64(), q.state()["timescale_derived"].as_bool()),
            (Some(60.0), Some(false))
        );
        // A zero or absurd round: not kept, and no panic; Γ is capped at a day.
        let mut r = Adsp::new(unset());
        r.on_join(Duration::ZERO, 0);
        r.on_round_time(Duration::ZERO, 0, &round(0.0));
        r.on_round_time(Duration::ZERO, 0, &round(1e300));
        assert!(r.on_round_time(Duration::ZERO, 0, &round(2e18)).len() == 1);
        assert_eq!(r.state()["period_s"].as_f64(), Some(86_400.0));
    }

    #[test]
    fn a_loss_rise_forces_a_new_search() {
        let mut p = Adsp::new(cfg());
        p.search = None;
        p.c = 2;
        p.on_join(Duration::ZERO, 0);
        p.on_loss(Duration::ZERO, LossSource::Evaluator, 1.0);
        p.on_loss(Duration::from_secs(59), LossSource::Evaluator, 1.0);
        p.poll(Duration::from_secs(60));
        assert!(p.search.is_none());
        p.on_loss(Duration::from_secs(119), LossSource::Evaluator, 1.31);
        p.poll(Duration::from_secs(120));
        assert_eq!(p.search.as_ref().map(|s| s.candidate), Some(2), "re-search from the current C");
    }
}
