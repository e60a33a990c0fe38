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
//! (period-relative times would favour later candidates, which start from a lower loss). The
//! loss is the evaluator's score (the authors' server scores its own model on test data), each
//! point the first score at or after its time; only without an evaluator the clients' push
//! losses, never a mix. A search period ends behind a barrier, as the authors' `allStop` /
//! `allStart`: every client's next commit is applied but its Ack held until every client has
//! committed; a score of that model ends the curve; then all are released together with the new
//! interval. The search starts at C = 1 and tries C + 1 while the score does not fall (a tie
//! goes on, toward more commits; a period that could not be scored is passed over), keeping the
//! best. It runs again every `research_every`, or at once when the global loss rises by 30% or
//! more between two periods (then from the current C, as the authors' code does). Commits are
//! applied as they arrive with `w = 1/M`, M the active clients, as the authors' `recv_commit`
//! adds Δ/M (no staleness factor: docs/seeds.md A1).
//!
//! Γ and T_min left unset are derived from measured round times (`derive_timescale`): the
//! paper's 60 s and 10 s suit hours of training, not a run of minutes. Until every client has
//! reported two rounds, no interval is sent and clients commit every `local_steps` steps.

use std::collections::BTreeMap;
use std::time::Duration;

use super::staleness::Normalization;
use super::{Action, Common, LossSource, Policy, PushId, PushMeta, Ready, SessionId, SyncPolicy};
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

/// The global loss the search is fitted to, from one source (the authors score their own model
/// on test data): the evaluator's latest score once any evaluator has reported, else, in a run
/// without an evaluator, the mean of the clients' latest push losses. The two are never mixed.
#[derive(Clone, Debug, Default)]
pub struct GlobalLoss {
    evaluator: Option<f64>,
    per_client: BTreeMap<SessionId, f64>,
}

impl GlobalLoss {
    pub fn record(&mut self, source: LossSource, loss: f64) {
        if !loss.is_finite() {
            return;
        }
        match source {
            LossSource::Evaluator => self.evaluator = Some(loss),
            LossSource::Push(c) => {
                self.per_client.insert(c, loss);
            }
        }
    }

    pub fn forget(&mut self, client: SessionId) {
        self.per_client.remove(&client);
    }

    /// True once an evaluator has reported: from then on only its scores count.
    pub fn from_evaluator(&self) -> bool {
        self.evaluator.is_some()
    }

    pub fn value(&self) -> Option<f64> {
        if let Some(l) = self.evaluator {
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
/// None when neither predicts that the target is ever reached: the period says nothing about
/// C, which is not the same as a score of 0 (two such periods must not tie, docs/seeds.md A5).
pub fn score(points: [(f64, f64); 3], target: f64) -> Option<f64> {
    if let Some(f) = fit(points) {
        if target <= f.c0 {
            return None; // the curve never gets there
        }
        let t = (1.0 / (target - f.c0) - f.b) / f.a2;
        return Some(if t <= points[0].0 { f64::MAX } else { 1.0 / t });
    }
    let [(t0, l0), _, (t2, l2)] = points;
    let slope = (l0 - l2) / (t2 - t0);
    if slope <= 0.0 || !slope.is_finite() {
        return None;
    }
    if l2 <= target {
        return Some(f64::MAX);
    }
    Some(1.0 / (t2 + (l2 - target) / slope))
}

/// The largest C a search tries: beyond Γ/T_min every interval is T_min and nothing changes.
const MAX_SEARCH_C: u64 = 64;

#[derive(Clone, Debug)]
struct Search {
    /// The C the search started from (kept when no period could be scored).
    start: u64,
    candidate: u64,
    best: Option<(u64, f64)>,
}

/// The end of a search period, as the authors' `allStop`/`allStart`: every client's next
/// commit is applied but its Ack held, until every active client has committed once and those
/// commits are aggregated; the loss of that frozen model ends the period's curve; then every
/// client is released at once with the new interval (clients time their interval from the Ack).
#[derive(Clone, Debug, Default)]
struct Barrier {
    /// When the period ended.
    since: Duration,
    /// Held Acks, per client.
    held: BTreeMap<SessionId, Vec<PushId>>,
    /// Held pushes not yet aggregated.
    unaggregated: std::collections::BTreeSet<PushId>,
    /// When every client had committed and its commit was aggregated.
    frozen: Option<Duration>,
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
    /// Loss samples of this search period (seconds since `origin`, loss): start, middle, end.
    points: Vec<(f64, f64)>,
    /// Points requested and not yet taken: each is the next evaluator score that arrives at or
    /// after its time (only when the evaluator is the loss source).
    awaiting: std::collections::VecDeque<Duration>,
    mid_recorded: bool,
    barrier: Option<Barrier>,
    last_search: Duration,
    prev_period_loss: Option<f64>,
    loss: GlobalLoss,
    pending: Ready,
    /// Per finished period: (C, commits per client).
    /// (the latest MAX_KEPT; memory stays bounded however long a run).
    history: std::collections::VecDeque<(u64, BTreeMap<SessionId, u64>)>,
    /// Periods finished since the start.
    periods: u64,
    /// Every score computed: (C, r(C)), None where the period could not be scored.
    scores: Vec<(u64, Option<f64>)>,
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
            search: Some(Search { start: 1, candidate: 1, best: None }),
            period_start: None,
            origin: Duration::ZERO,
            points: Vec::new(),
            awaiting: Default::default(),
            mid_recorded: false,
            barrier: None,
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

    /// How long a barrier waits for commits and a score before releasing everyone unscored.
    fn barrier_limit(&self) -> Duration {
        self.period().max(Duration::from_secs(5))
    }

    /// T_i = max(T_min, Γ/C − o_i).
    fn interval(&self, scale: Timescale, overhead: f64) -> f64 {
        (scale.period.as_secs_f64() / self.c as f64 - overhead).max(scale.min_interval.as_secs_f64())
    }

    /// The largest C worth trying: ⌈Γ/T_min⌉, at most MAX_SEARCH_C.
    fn max_c(&self) -> u64 {
        let Some(s) = self.scale else { return MAX_SEARCH_C };
        let t_min = s.min_interval.as_secs_f64();
        if t_min <= 0.0 {
            return MAX_SEARCH_C;
        }
        ((s.period.as_secs_f64() / t_min).ceil() as u64).clamp(1, MAX_SEARCH_C)
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

    fn clock(&self, now: Duration) -> f64 {
        now.saturating_sub(self.origin).as_secs_f64()
    }

    /// Asks for a point of the curve at `now`: the next evaluator score (one at or after
    /// `now`), or, in a run without an evaluator, the clients' mean push loss at once.
    fn request_point(&mut self, now: Duration) {
        if self.loss.from_evaluator() {
            self.awaiting.push_back(now);
        } else if let Some(l) = self.loss.value() {
            let t = self.clock(now);
            if self.points.last().is_none_or(|p| p.0 < t) {
                self.points.push((t, l));
            }
        }
    }

    /// Records a finished period's commit counts and starts counting afresh.
    fn close_period(&mut self) {
        let commits: BTreeMap<SessionId, u64> = self.clients.iter().map(|(&c, s)| (c, s.commits)).collect();
        if self.history.len() == MAX_KEPT {
            self.history.pop_front();
        }
        self.history.push_back((self.c, commits));
        self.periods += 1;
        for s in self.clients.values_mut() {
            s.commits = 0;
        }
    }

    /// A period ends: during a search, a barrier starts; otherwise the next period starts at
    /// once, searching again when due.
    fn end_period(&mut self, now: Duration) -> Vec<Action> {
        let start = self.period_start.expect("a period is running");
        self.close_period();
        if self.search.is_some() {
            self.period_start = None;
            self.barrier = Some(Barrier { since: now, ..Default::default() });
            return Vec::new();
        }
        let end_loss = self.loss.value();
        let rose = matches!((self.prev_period_loss, end_loss), (Some(p), Some(l)) if p > 0.0 && (l - p) / p >= self.cfg.rise);
        if end_loss.is_some() {
            self.prev_period_loss = end_loss;
        }
        self.period_start = Some(start + self.period());
        self.mid_recorded = false;
        self.points.clear();
        self.awaiting.clear();
        if rose || now.saturating_sub(self.last_search) >= self.cfg.research_every {
            self.search = Some(Search { start: self.c, candidate: self.c, best: None });
            self.request_point(now);
        }
        self.directives(false)
    }

    /// Advances the barrier; when it is over, scores the period, moves the search on and
    /// releases every client with its new interval.
    fn poll_barrier(&mut self, now: Duration) -> Vec<Action> {
        let Some(b) = self.barrier.as_mut() else { return Vec::new() };
        let everyone = self.clients.keys().all(|c| b.held.contains_key(c));
        if b.frozen.is_none() && everyone && b.unaggregated.is_empty() {
            b.frozen = Some(now);
            self.request_point(now);
        }
        let b = self.barrier.as_ref().expect("checked above");
        let scored = b.frozen.is_some() && self.awaiting.is_empty();
        if !scored && now < b.since + self.barrier_limit() {
            return Vec::new();
        }
        let b = self.barrier.take().expect("checked above");
        let s = (scored && self.points.len() == 3)
            .then(|| score([self.points[0], self.points[1], self.points[2]], self.cfg.target_loss))
            .flatten();
        let end = if scored { self.points.last().copied() } else { None };
        if let Some((_, l)) = end {
            self.prev_period_loss = Some(l);
        }
        self.advance_search(now, s);
        // The next period starts now, from the frozen model's point.
        self.period_start = Some(now);
        self.mid_recorded = false;
        self.awaiting.clear();
        self.points = end.into_iter().collect();
        if self.search.is_some() && self.points.is_empty() {
            self.request_point(now);
        }
        for s in self.clients.values_mut() {
            s.commits = 0;
        }
        let mut out = self.directives(true);
        out.extend(b.held.into_values().flatten().map(Action::Ack));
        out
    }

    /// The search's rule (the authors' `while next_reward > cur_reward`): go on to C + 1 while
    /// the score does not fall; a tie goes on too (toward more commits), and a period that
    /// could not be scored is passed over rather than scored 0. It ends at the first fall, or
    /// past the largest useful C, with the best C scored.
    fn advance_search(&mut self, now: Duration, s: Option<f64>) {
        let max_c = self.max_c();
        let Some(search) = self.search.as_mut() else { return };
        if self.scores.len() == MAX_KEPT {
            self.scores.remove(0);
        }
        self.scores.push((search.candidate, s));
        let fell = match (s, search.best) {
            (Some(s), Some((_, b))) if s < b => true,
            (Some(s), _) => {
                search.best = Some((search.candidate, s));
                false
            }
            (None, _) => false,
        };
        if fell || search.candidate >= max_c {
            self.c = search.best.map_or(search.start, |b| b.0);
            self.search = None;
            self.last_search = now;
        } else {
            search.candidate += 1;
            self.c = search.candidate;
        }
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
        self.points.clear();
        self.awaiting.clear();
        if self.search.is_some() {
            self.request_point(now);
        }
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
        // (During a barrier no period runs; the joining client is waited for too.)
        if self.scale.is_some() && self.period_start.is_none() && self.barrier.is_none() {
            self.start_periods(now);
        }
        self.directives(false)
    }

    fn on_leave(&mut self, _now: Duration, client: SessionId) -> Vec<Action> {
        self.clients.remove(&client);
        self.loss.forget(client);
        // It is no longer waited for; its held pushes are still aggregated and acknowledged.
        let held = self.barrier.as_mut().and_then(|b| b.held.remove(&client)).unwrap_or_default();
        held.into_iter().map(Action::Ack).collect()
    }

    fn on_push(&mut self, _now: Duration, push: &PushMeta) -> Vec<Action> {
        if let Some(s) = self.clients.get_mut(&push.session) {
            s.commits += 1;
        }
        self.pending.push(push.id);
        if let Some(b) = self.barrier.as_mut()
            && self.clients.contains_key(&push.session)
        {
            b.held.entry(push.session).or_default().push(push.id);
            b.unaggregated.insert(push.id);
            return Vec::new();
        }
        vec![Action::Ack(push.id)]
    }

    fn on_aggregated(&mut self, _now: Duration, _version: u64, pushes: &[PushId]) -> Vec<Action> {
        if let Some(b) = self.barrier.as_mut() {
            for p in pushes {
                b.unaggregated.remove(p);
            }
        }
        Vec::new()
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
        if !loss.is_finite() {
            return;
        }
        let first_score = source == LossSource::Evaluator && !self.loss.from_evaluator();
        self.loss.record(source, loss);
        if first_score {
            // Points taken from push losses are not mixed with scores: the period restarts
            // its curve here.
            self.points.clear();
            self.awaiting.clear();
            if self.search.is_some() && (self.period_start.is_some() || self.barrier.is_some()) {
                self.awaiting.push_back(now);
            }
        }
        if source != LossSource::Evaluator {
            // Without an evaluator, a search period that started before any loss was known
            // starts its curve at the first one.
            if !self.loss.from_evaluator()
                && self.search.is_some()
                && self.period_start.is_some()
                && self.points.is_empty()
            {
                self.request_point(now);
            }
            return;
        }
        let t = self.clock(now);
        if let Some(&asked) = self.awaiting.front()
            && asked <= now
            && self.points.last().is_none_or(|p| p.0 < t)
        {
            self.awaiting.pop_front();
            self.points.push((t, loss));
        }
    }

    fn poll(&mut self, now: Duration) -> Vec<Action> {
        let mut out = self.try_derive(now);
        if let Some(start) = self.period_start {
            let half = start + self.period() / 2;
            if !self.mid_recorded && now >= half {
                self.mid_recorded = true;
                if self.search.is_some() {
                    self.request_point(now);
                }
            }
            if now >= start + self.period() {
                out.extend(self.end_period(now));
            }
        }
        out.extend(self.poll_barrier(now));
        let m = self.clients.len().max(1);
        out.extend(self.pending.next_batch(Normalization::Uniform(m)));
        out
    }

    fn next_wakeup(&self) -> Option<Duration> {
        if self.scale.is_none() {
            return self.candidate().map(|(_, wait, _)| self.origin + wait);
        }
        if let Some(b) = &self.barrier {
            return Some(b.since + self.barrier_limit());
        }
        let start = self.period_start?;
        Some(if self.mid_recorded { start + self.period() } else { start + self.period() / 2 })
    }

    fn drain(&mut self) -> Vec<Action> {
        let m = self.clients.len().max(1);
        self.pending.drain(Normalization::Uniform(m))
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "commits_per_period": self.c,
            "searching": self.search.as_ref().map(|s| s.candidate),
            "barrier": self.barrier.is_some(),
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
        let r = score([(0.0, l(0.0)), (30.0, l(30.0)), (60.0, l(60.0))], 0.3).unwrap();
        assert!((1.0 / r - 450.0).abs() < 1e-3, "{}", 1.0 / r);
        assert!(fit([(0.0, 1.0), (30.0, 0.5), (60.0, 0.0)]).is_none(), "a straight line has no such curve");
        assert!(score([(0.0, 1.0), (30.0, 0.9), (60.0, 0.8)], 0.3).unwrap() > 0.0, "linear fallback");
    }

    /// Scripted clients' state: each waits for its commit's Ack and then trains for T_i (its
    /// interval is timed from the Ack). Every Aggregate is reported back as done at once.
    struct Sim {
        overheads: Vec<f64>,
        next_commit: Vec<f64>,
        interval: Vec<f64>,
        waiting: Vec<Option<PushId>>,
        version: u64,
    }

    impl Sim {
        fn handle(&mut self, p: &mut Adsp, acts: Vec<Action>, t: f64) {
            let mut queue = std::collections::VecDeque::from(acts);
            while let Some(a) = queue.pop_front() {
                match a {
                    Action::Directive { session, directive } => {
                        self.interval[session as usize] = directive.commit_interval_s.unwrap();
                    }
                    Action::Ack(push) => {
                        if let Some(i) = self.waiting.iter().position(|w| *w == Some(push)) {
                            self.waiting[i] = None;
                            // Train for T_i, then commit (which takes o_i).
                            self.next_commit[i] = t + self.interval[i] + self.overheads[i];
                        }
                    }
                    Action::Aggregate { pushes, .. } => {
                        self.version += 1;
                        queue.extend(p.on_aggregated(Duration::from_secs_f64(t), self.version, &pushes));
                    }
                    Action::RoundDropped { .. } => unreachable!(),
                }
            }
        }
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
        let n = overheads.len();
        let mut sim = Sim {
            overheads: overheads.to_vec(),
            next_commit: vec![f64::INFINITY; n],
            interval: vec![f64::NAN; n],
            waiting: vec![None; n],
            version: 0,
        };
        let mut id = 0;
        let mut t = 0.0;
        for (i, &o) in overheads.iter().enumerate() {
            let acts = p.on_join(Duration::from_secs_f64(t), i as SessionId);
            sim.handle(p, acts, t);
            p.on_round_time(
                Duration::ZERO,
                i as SessionId,
                &RoundTime { seconds: 1.0, steps: 1, commit_overhead_s: Some(o) },
            );
        }
        for (i, &o) in overheads.iter().enumerate() {
            sim.next_commit[i] = sim.interval[i] + o;
        }
        while t < seconds {
            t += dt;
            let now = Duration::from_secs_f64(t);
            let l = loss_of(p.c, dt);
            p.on_loss(now, LossSource::Evaluator, l);
            for i in 0..n {
                if sim.waiting[i].is_none() && t >= sim.next_commit[i] {
                    id += 1;
                    sim.waiting[i] = Some(id);
                    let acts = p.on_push(now, &PushMeta::for_test(id, i as SessionId));
                    sim.handle(p, acts, t);
                }
            }
            let acts = p.poll(now);
            sim.handle(p, acts, t);
        }
        p.history.iter().cloned().collect()
    }

    #[test]
    fn commit_counts_are_equal_across_speeds() {
        let mut p = Adsp::new(cfg());
        // Overheads of 0.1 s, 1 s and 4 s: very different clients.
        let mut progress = 0.0;
        // Long enough for nine periods: a search period ends behind a barrier, which waits for
        // each client's next commit (up to one interval).
        let hist = run_clients(&mut p, &[0.1, 1.0, 4.0], 1500.0, &mut |_, dt| {
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
        let intervals = intervals(&acts);
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

    /// The commit intervals the directives among `acts` set, in order.
    fn intervals(acts: &[Action]) -> Vec<f64> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Directive { directive, .. } => directive.commit_interval_s,
                _ => None,
            })
            .collect()
    }

    fn acks(acts: &[Action]) -> Vec<PushId> {
        acts.iter().filter_map(|a| if let Action::Ack(id) = a { Some(*id) } else { None }).collect()
    }

    fn aggregate_all(p: &mut Adsp, now: Duration, acts: &[Action]) {
        for a in acts {
            if let Action::Aggregate { pushes, .. } = a {
                p.on_aggregated(now, 1, pushes);
            }
        }
    }

    /// A1: the authors add each commit's Δ / M; α(s) on top damped stale commits twice.
    #[test]
    fn a_commit_is_weighted_one_over_m_whatever_its_staleness() {
        let mut p = Adsp::new(cfg());
        for c in 0..4 {
            p.on_join(Duration::ZERO, c);
        }
        let stale = PushMeta { staleness: 7, ..PushMeta::for_test(1, 0) };
        assert_eq!(acks(&p.on_push(Duration::from_secs(1), &stale)), vec![1]);
        let acts = p.poll(Duration::from_secs(1));
        let Some(Action::Aggregate { normalization, .. }) = acts.last() else { panic!("{acts:?}") };
        let w = crate::policy::staleness::Weighting {
            kind: crate::policy::staleness::WeightingKind::Polynomial,
            ..Default::default()
        };
        let mut out = Vec::new();
        let input = crate::policy::staleness::WeightInput { staleness: 7, samples: 32, loss: 1.0 };
        crate::policy::staleness::batch_weights(&w, *normalization, &[input], &mut out);
        assert_eq!(out, vec![0.25]);
    }

    /// A3: at the end of a search period every client's next commit is held until all have
    /// committed, the frozen model is scored, and everyone is released with the new interval.
    #[test]
    fn a_search_period_ends_with_a_barrier_and_c_moves() {
        let ms = |m: u64| Duration::from_millis(m);
        let mut p = Adsp::new(AdspConfig { period: Some(Duration::from_secs(10)), ..cfg() });
        p.on_join(Duration::ZERO, 0);
        p.on_join(Duration::ZERO, 1);
        // Falling evaluator scores: the start, middle and end points.
        p.on_loss(ms(100), LossSource::Evaluator, 2.0);
        p.poll(ms(5000));
        p.on_loss(ms(5200), LossSource::Evaluator, 1.2);
        assert!(p.poll(ms(10_000)).is_empty(), "the period ended: no directive yet");
        assert!(p.state()["barrier"].as_bool().unwrap());
        // Client 0 commits: applied, not acknowledged.
        assert!(acks(&p.on_push(ms(10_100), &PushMeta::for_test(1, 0))).is_empty());
        let acts = p.poll(ms(10_100));
        aggregate_all(&mut p, ms(10_150), &acts);
        assert!(acks(&p.poll(ms(10_200))).is_empty(), "client 1 has not committed");
        // A score before the barrier is complete does not end the period.
        p.on_loss(ms(10_300), LossSource::Evaluator, 1.1);
        assert!(acks(&p.poll(ms(10_300))).is_empty());
        assert!(acks(&p.on_push(ms(10_400), &PushMeta::for_test(2, 1))).is_empty());
        let acts = p.poll(ms(10_400));
        aggregate_all(&mut p, ms(10_450), &acts);
        assert!(acks(&p.poll(ms(10_500))).is_empty(), "waiting for a score of the frozen model");
        p.on_loss(ms(10_600), LossSource::Evaluator, 0.9);
        let acts = p.poll(ms(10_600));
        // Released together: the new interval first, then both Acks.
        assert_eq!(p.commits_per_period(), 2, "scores: {:?}", p.scores);
        let intervals = intervals(&acts);
        assert_eq!(intervals, vec![5.0, 5.0], "{acts:?}");
        assert!(matches!(acts[0], Action::Directive { .. }));
        assert_eq!(acks(&acts), vec![1, 2]);
        assert!(p.scores[0].1.is_some_and(|s| s > 0.0), "{:?}", p.scores);
        assert_eq!(p.points, vec![(10.6, 0.9)], "the next period starts from the frozen model's score");
        assert_eq!(p.next_wakeup(), Some(ms(15_600)), "the next period starts at the release");
        // Not searching: a period end holds nothing.
        let mut q = Adsp::new(cfg());
        q.search = None;
        q.on_join(Duration::ZERO, 0);
        q.poll(Duration::from_secs(60));
        assert_eq!(acks(&q.on_push(Duration::from_secs(61), &PushMeta::for_test(1, 0))), vec![1]);
    }

    /// A client that joins during a barrier is waited for and does not restart the period; one
    /// that leaves is not waited for, and its held commit is acknowledged.
    #[test]
    fn clients_joining_or_leaving_during_a_barrier() {
        let mut p = Adsp::new(AdspConfig { period: Some(Duration::from_secs(10)), ..cfg() });
        p.on_join(Duration::ZERO, 0);
        p.on_join(Duration::ZERO, 1);
        p.poll(Duration::from_secs(10));
        assert!(acks(&p.on_push(Duration::from_secs(11), &PushMeta::for_test(1, 0))).is_empty());
        assert_eq!(p.on_leave(Duration::from_secs(11), 0), vec![Action::Ack(1)]);
        p.on_join(Duration::from_secs(12), 2);
        assert!(p.barrier.is_some() && p.period_start.is_none(), "still in the barrier");
        assert!(acks(&p.on_push(Duration::from_secs(13), &PushMeta::for_test(2, 1))).is_empty());
        let acts = p.poll(Duration::from_secs(13));
        aggregate_all(&mut p, Duration::from_secs(13), &acts);
        assert!(p.poll(Duration::from_secs(13)).is_empty(), "client 2 has not committed");
        assert!(acks(&p.on_push(Duration::from_secs(14), &PushMeta::for_test(3, 2))).is_empty());
        let acts = p.poll(Duration::from_secs(14));
        aggregate_all(&mut p, Duration::from_secs(14), &acts);
        // No evaluator and no push losses: nothing to score, but everyone is released.
        assert_eq!(acks(&p.poll(Duration::from_secs(14))), vec![2, 3]);
    }

    /// A barrier whose client never commits does not stall the run.
    #[test]
    fn a_barrier_gives_up_after_a_period() {
        let mut p = Adsp::new(AdspConfig { period: Some(Duration::from_secs(10)), ..cfg() });
        p.on_join(Duration::ZERO, 0);
        p.on_join(Duration::ZERO, 1);
        p.poll(Duration::from_secs(10));
        assert!(acks(&p.on_push(Duration::from_secs(11), &PushMeta::for_test(1, 0))).is_empty());
        assert_eq!(p.next_wakeup(), Some(Duration::from_secs(20)));
        assert!(acks(&p.poll(Duration::from_secs(19))).is_empty());
        assert_eq!(acks(&p.poll(Duration::from_secs(20))), vec![1]);
        assert_eq!(p.scores, vec![(1, None)]);
    }

    /// A4: the curve's points are evaluator scores taken at or after each point's time, never
    /// an older score and never the trainers' training losses.
    #[test]
    fn the_curve_uses_only_fresh_evaluator_scores() {
        let mut p = Adsp::new(AdspConfig { period: Some(Duration::from_secs(10)), ..cfg() });
        p.on_join(Duration::ZERO, 0);
        // On l(t) = 1/(0.1·t + 0.5) + 0.1: 2.1 at 0 s, 1.009 at 6 s, 0.485 at 21 s.
        p.on_loss(Duration::ZERO, LossSource::Evaluator, 2.1);
        for s in 1..10 {
            p.on_loss(Duration::from_secs(s), LossSource::Push(0), 0.1);
        }
        p.poll(Duration::from_secs(5));
        assert_eq!(p.points, vec![(0.0, 2.1)], "the middle point waits for a score after 5 s");
        p.on_loss(Duration::from_secs(6), LossSource::Evaluator, 1.009);
        assert_eq!(p.points, vec![(0.0, 2.1), (6.0, 1.009)]);
        // The end, after no score for longer than Γ: still only the evaluator's.
        p.poll(Duration::from_secs(20));
        p.on_push(Duration::from_secs(20), &PushMeta::for_test(1, 0));
        let acts = p.poll(Duration::from_secs(20));
        aggregate_all(&mut p, Duration::from_secs(20), &acts);
        p.poll(Duration::from_secs(20));
        p.on_loss(Duration::from_secs(21), LossSource::Evaluator, 0.485);
        p.poll(Duration::from_secs(21));
        assert_eq!(p.scores.len(), 1);
        assert!(p.scores[0].1.is_some(), "{:?}", p.scores);
        assert_eq!(p.points, vec![(21.0, 0.485)]);
    }

    /// A5: a period that cannot be scored is not a score of 0, so two of them do not tie and
    /// end the search; a tie goes on toward more commits.
    #[test]
    fn unscored_periods_and_ties_do_not_end_the_search() {
        // A flat loss: no fit, no line; the search goes on upward instead of stopping at C = 1.
        let mut p = Adsp::new(cfg());
        run_clients(&mut p, &[0.1, 0.5], 400.0, &mut |_, _| 1.0);
        assert!(p.scores.iter().all(|s| s.1.is_none()), "{:?}", p.scores);
        assert!(p.scores.len() >= 3, "{:?}", p.scores);
        assert_eq!(p.search.as_ref().map(|s| s.candidate), Some(p.scores.len() as u64 + 1));
        // A loss already below the target: every C ties (the target is reached at once).
        let mut q = Adsp::new(cfg());
        let mut progress = 1.0;
        run_clients(&mut q, &[0.1, 0.5], 400.0, &mut |_, dt| {
            progress += 0.1 * dt;
            0.2 / progress
        });
        assert!(q.scores.len() >= 3 && q.scores.iter().all(|s| s.1 == Some(f64::MAX)), "{:?}", q.scores);
        assert!(q.commits_per_period() >= 3);
        // The search ends past the largest useful C (Γ/T_min), at the best C it scored.
        let mut r = Adsp::new(AdspConfig { min_interval: Some(Duration::from_secs(20)), ..cfg() });
        r.on_join(Duration::ZERO, 0);
        assert_eq!(r.max_c(), 3);
        for _ in 0..3 {
            r.advance_search(Duration::ZERO, None);
        }
        assert!(r.search.is_none());
        assert_eq!(r.commits_per_period(), 1, "nothing scored: the C it started from");
    }
}
