//! The client session: connect, follow the server's policy, train, push, reconnect.
//!
//! A reader task forwards the server's messages into a channel, so that a training job
//! finishing never interrupts the handling of a message. Training runs on a blocking thread in
//! chunks of a few steps; between chunks the loop handles messages and decides, by mode:
//!
//! * plain: train `local_steps`, push, wait for the Ack, adopt the replica, repeat;
//! * ADSP: train without pause for the server's `commit_interval_s`, then push and adopt;
//! * NBSync: never stop training; when the Ack of the previous push arrives (the round closed
//!   and its Delta is applied), push Δ = x_local − x_base and adopt the new model as both,
//!   within one step (its jobs are one step long while a push is in flight);
//! * Hermes: train E epochs over D samples, then push only if the test loss passes the z-score
//!   gate, else send a skip; the threshold relaxes after λ misses in a row and stays relaxed.
//!
//! An evaluator never trains: it scores the replica on the test set and reports it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sparsync::client::{ClientError, ClientOptions, Connection, Event, Session};
use sparsync::config::ClientDefaults;
use sparsync::data::{FashionMnist, Partition};
use sparsync::protocol::frame::{PushHeader, encode_push};
use sparsync::protocol::message::{ClientKind, ClientMessage, EvalReport, Role, RoundTime, SkipReport};
use sparsync::protocol::select::k_for_density;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::emulate::Emulation;
use crate::model::ModelError;
use crate::train::{RoundStats, Score, Trainer};
use sparsync::protocol::sparsify::{Sparse, Sparsifier};

/// How the client trains between pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// From the server's policy: adsp → adsp, hermes → hermes, anything else → plain.
    Auto,
    Plain,
    Adsp,
    Nbsync,
    Hermes,
}

/// Hermes' gate parameters (algorithms.md §5).
#[derive(Clone, Debug)]
pub struct Gate {
    pub z_start: f64,
    pub window: usize,
    pub lambda: u32,
    pub beta: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Self { z_start: -1.3, window: 10, lambda: 5, beta: 0.1 }
    }
}

/// Hermes' gate over the local test losses, as the authors' `HermesWorker`: a window of the
/// latest `window` losses, z = (L − μ)/σ, push when z ≤ z_thr. A push clears the window; the
/// threshold is relaxed (z_thr ← z_thr·(1 − β), at most 0) once `lambda` rounds in a row did not
/// push, and it stays relaxed after a push (the authors never reset it). No socket, no model.
#[derive(Clone, Debug)]
pub struct GateState {
    window: VecDeque<f64>,
    misses: u32,
    z_thr: f64,
}

impl GateState {
    pub fn new(gate: &Gate) -> Self {
        Self { window: VecDeque::new(), misses: 0, z_thr: gate.z_start }
    }

    /// The threshold in force.
    pub fn threshold(&self) -> f64 {
        self.z_thr
    }

    /// Records a round's test loss; true when the round's update should be pushed.
    pub fn decide(&mut self, gate: &Gate, loss: f64) -> bool {
        self.window.push_back(loss);
        while self.window.len() > gate.window {
            self.window.pop_front();
        }
        let n = self.window.len() as f64;
        let mean = self.window.iter().sum::<f64>() / n;
        let std = (self.window.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let z = if std > 0.0 { (loss - mean) / std } else { 0.0 };
        if self.window.len() >= 2 && z <= self.z_thr {
            self.window.clear();
            self.misses = 0;
            return true;
        }
        self.misses += 1;
        if self.misses >= gate.lambda {
            self.z_thr = (self.z_thr * (1.0 - gate.beta)).min(0.0);
        }
        false
    }
}

/// Everything a client run needs. [`Config::default`] holds `sparsync-client`'s defaults (its
/// flags default to them); training settings left at `None` follow the server's directive, else
/// [`ClientDefaults`].
#[derive(Clone, Debug)]
pub struct Config {
    pub server: String,
    pub client_id: String,
    /// The model family to build (must be the one the server serves).
    pub model: String,
    pub token: Option<String>,
    pub ca: Option<std::path::PathBuf>,
    pub role: Role,
    pub mode: Mode,
    pub partition: Partition,
    /// (this client's shard, number of shards).
    pub shard: (usize, usize),
    pub seed: u64,
    pub local_steps: Option<u64>,
    pub batch_size: Option<u64>,
    pub learning_rate: Option<f64>,
    pub rho_up: Option<f64>,
    pub max_rounds: Option<u64>,
    pub target_accuracy: Option<f64>,
    pub duration: Option<Duration>,
    /// Evaluator: score every this many replica versions…
    pub eval_every: u64,
    /// …and at most once per this interval (the newest version is scored when it ends).
    pub eval_interval: Duration,
    /// Evaluator: score on the first this many test images (all when None).
    pub eval_samples: Option<usize>,
    pub reconnect: bool,
    pub gate: Gate,
}

/// The evaluator's default cadence: twice a second. Scoring after every Delta (hundreds a second
/// on a small model) kept a core busy and crowded the trainers on small machines.
pub const DEFAULT_EVAL_INTERVAL_S: f64 = 0.5;

impl Default for Config {
    /// A trainer of mlp at the default address: shard 0/1, IID, seed 0, the server's directives
    /// for steps, batch, learning rate and density, no stop condition, reconnecting.
    fn default() -> Self {
        Self {
            server: "ws://127.0.0.1:7070/ws".into(),
            client_id: "client-0".into(),
            model: "mlp".into(),
            token: None,
            ca: None,
            role: Role::Trainer,
            mode: Mode::Auto,
            partition: Partition::Iid,
            shard: (0, 1),
            seed: 0,
            local_steps: None,
            batch_size: None,
            learning_rate: None,
            rho_up: None,
            max_rounds: None,
            target_accuracy: None,
            duration: None,
            eval_every: 1,
            eval_interval: Duration::from_secs_f64(DEFAULT_EVAL_INTERVAL_S),
            eval_samples: None,
            reconnect: true,
            gate: Gate::default(),
        }
    }
}

impl Config {
    /// A trainer of `model` at `server` with the other defaults of [`Config::default`].
    pub fn new(server: &str, client_id: &str, model: &str) -> Self {
        Self { server: server.into(), client_id: client_id.into(), model: model.into(), ..Self::default() }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub client_id: String,
    pub rounds: u64,
    pub pushes: u64,
    pub acked: u64,
    pub rejected: u64,
    /// Pushes the server could not take for a while (its log was unreachable): their values
    /// went back into the residual, and the client waited as asked before pushing again.
    pub busy: u64,
    pub skipped: u64,
    pub evaluations: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reconnects: u64,
    pub last_accuracy: Option<f64>,
    pub last_loss: Option<f64>,
    pub stop: String,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("gave up reconnecting after {0:?}")]
    GaveUp(Duration),
    #[error("the {what} thread failed: {reason}")]
    Thread { what: &'static str, reason: String },
}

impl RunError {
    fn thread(what: &'static str, e: tokio::task::JoinError) -> Self {
        Self::Thread { what, reason: e.to_string() }
    }
}

/// A push that has not been answered yet.
struct InFlight {
    seq: u64,
    frame: Vec<u8>,
    sparse: Sparse,
    sent_at: Instant,
}

/// The trainer and the emulation it trains under. A training job (on a blocking thread) holds
/// its lock while it runs: the session loop waits for the job before it touches the model.
struct Work {
    trainer: Trainer,
    emul: Emulation,
}

enum End {
    Stop(String),
    Disconnected(String),
}

struct Runner {
    cfg: Config,
    /// Training settings where neither `cfg` nor the server's directive give them.
    defaults: ClientDefaults,
    data: FashionMnist,
    /// Training indices of this client's shard (Hermes: without its local test split).
    /// This client's shard (indices into the training set), shared with the training jobs.
    train: Arc<[usize]>,
    /// Hermes' local test split (indices into the training set).
    local_test: Vec<usize>,
    /// Test-set indices that tell a trainer when it reached `target_accuracy`.
    check: Vec<usize>,
    work: Arc<Mutex<Work>>,
    sparsifier: Sparsifier,
    base: Vec<f32>,
    base_version: u64,
    seq: u64,
    inflight: Option<InFlight>,
    /// Round in progress.
    round: RoundStats,
    round_started: Instant,
    /// Hermes data chunk position.
    chunk_at: usize,
    gate: GateState,
    /// NBSync: the previous push was acknowledged while a training chunk ran.
    adopt_pending: bool,
    /// The server answered busy: no push before this time.
    busy_until: Option<Instant>,
    last_eval_version: Option<u64>,
    last_eval_at: Option<Instant>,
    summary: Summary,
    started: Instant,
}

/// The round time a client reports: Hermes' allocation equalises training time, so Hermes
/// reports the steps' time (emulated slowdown included) without its gate's evaluation, the
/// upload or the wait for the Ack; other modes report the time since the round started (ADSP's
/// rounds include the commit's overhead).
pub fn round_seconds(mode: Mode, round: &RoundStats, elapsed: Duration) -> f64 {
    match mode {
        Mode::Hermes => round.train_s,
        _ => elapsed.as_secs_f64(),
    }
}

/// Runs a client until a stop condition, the server's goodbye, or a failure.
pub async fn run(cfg: Config, data: FashionMnist, emul: Emulation) -> Result<Summary, RunError> {
    let started = Instant::now();
    let (i, n) = cfg.shard;
    let shards = sparsync::data::partition(&data.train.labels, n, cfg.partition, cfg.seed);
    let mut shard = shards.get(i).cloned().unwrap_or_default();
    let mut local_test = Vec::new();
    if cfg.role == Role::Trainer && matches!(cfg.mode, Mode::Hermes | Mode::Auto) {
        // Hermes gates on a local test split: 10% of the shard (decided again once the mode is
        // known; other modes put it back).
        let cut = shard.len() / 10;
        local_test = shard.split_off(shard.len() - cut);
    }
    tracing::info!(
        client = %cfg.client_id, data = %data.source, shard = format!("{i}/{n}"), samples = shard.len(),
        partition = %cfg.partition, emulation = %emul.describe(), role = ?cfg.role, mode = ?cfg.mode,
        "client starting"
    );
    let mut link = Link::new(&cfg);
    let (mut conn, mut rejoined) = link.join().await?;
    // The first Welcome settles the model: the trainer is built for it, checked against its
    // layout and set to the replica; it and the sparsifier are kept across reconnects.
    let mut trainer = Trainer::new(&conn.welcome.model, cfg.seed)?;
    trainer.net().check_layout(&conn.welcome.layout)?;
    trainer.set_params(conn.replica.values())?;
    let mut r = Runner {
        summary: Summary { client_id: cfg.client_id.clone(), ..Default::default() },
        defaults: ClientDefaults::default(),
        data,
        train: shard.into(),
        local_test,
        check: Vec::new(),
        work: Arc::new(Mutex::new(Work { trainer, emul })),
        sparsifier: Sparsifier::new(conn.num_params()),
        base: Vec::new(),
        base_version: 0,
        seq: 0,
        inflight: None,
        round: RoundStats::default(),
        round_started: Instant::now(),
        chunk_at: 0,
        gate: GateState::new(&cfg.gate),
        adopt_pending: false,
        busy_until: None,
        last_eval_version: None,
        last_eval_at: None,
        started,
        cfg,
    };
    loop {
        if rejoined {
            r.summary.reconnects += 1;
            tracing::info!(reconnects = r.summary.reconnects, "reconnected");
        }
        r.resolve_mode(&conn.welcome.settings.policy);
        match r.session(conn).await? {
            End::Stop(reason) => {
                r.summary.stop = reason;
                return Ok(r.summary);
            }
            End::Disconnected(why) => {
                if !r.cfg.reconnect {
                    r.summary.stop = format!("disconnected: {why}");
                    return Ok(r.summary);
                }
                tracing::warn!(reason = %why, "connection lost; reconnecting");
                link.lost();
            }
        }
        (conn, rejoined) = link.join().await?;
    }
}

/// The first wait before trying to join again; it doubles with each failure up to
/// [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long to keep trying while the server cannot be reached…
const GIVE_UP: Duration = Duration::from_secs(120);
/// …and while it still holds a session of this client id (which ends within its idle timeout).
const GIVE_UP_HELD: Duration = Duration::from_secs(400);

/// Joining the server, and joining again after a lost connection: the options of every Hello
/// (with the resume secret of the last Welcome) and the retry state.
struct Link {
    opts: ClientOptions,
    /// The server addresses (`--server a,b`: a leader and its standby); a failed join moves on
    /// to the next.
    servers: Vec<String>,
    next: usize,
    reconnect: bool,
    retry: Duration,
    /// Since when joining has failed or the connection was lost (None: connected). A join that
    /// ends such a time counts as a reconnect.
    down_since: Option<Instant>,
}

impl Link {
    fn new(cfg: &Config) -> Self {
        let servers = server_list(&cfg.server);
        let mut opts = ClientOptions::new(servers[0].clone(), cfg.client_id.clone(), cfg.model.clone());
        opts.token = cfg.token.clone();
        opts.kind = ClientKind::Native;
        opts.role = cfg.role;
        opts.ca = cfg.ca.clone();
        opts.device = Some(format!("native ({})", std::env::consts::ARCH));
        Self { opts, servers, next: 1, reconnect: cfg.reconnect, retry: RETRY_START, down_since: None }
    }

    /// Joins, retrying failures that may pass when reconnecting is allowed. Returns the
    /// connection and whether it ends a time without one.
    async fn join(&mut self) -> Result<(Connection, bool), RunError> {
        loop {
            let e = match Connection::connect(&self.opts).await {
                Ok(conn) => {
                    // The server's resume secret for this client id, sent again when reconnecting.
                    self.opts.resume_secret = Some(conn.welcome.resume_secret.clone());
                    self.retry = RETRY_START;
                    return Ok((conn, self.down_since.take().is_some()));
                }
                Err(e) => e,
            };
            // A refusal is final, except one on the client id: the server still holds a session
            // of this id (this process restarted and lost the session's secret, or the old
            // connection is half-open), which ends within the server's idle timeout, so it is
            // retried like a lost connection, for longer.
            // A server that is busy (its log unreachable) takes joins again once it returns.
            let held =
                matches!(&e, ClientError::Refused { field, .. } if field == "client_id" || field == "busy");
            let final_ = !held && matches!(e, ClientError::Refused { .. } | ClientError::Certificate { .. });
            if final_ || !self.reconnect {
                return Err(e.into());
            }
            let give_up = if held { GIVE_UP_HELD } else { GIVE_UP };
            let since = *self.down_since.get_or_insert_with(Instant::now);
            if since.elapsed() > give_up {
                return Err(RunError::GaveUp(since.elapsed()));
            }
            if self.servers.len() > 1 {
                // Another address may serve (a standby that took over): try each in turn,
                // waiting only after a full round.
                self.opts.url = self.servers[self.next % self.servers.len()].clone();
                self.next += 1;
                if !(self.next - 1).is_multiple_of(self.servers.len()) {
                    tracing::warn!(error = %e, next = %self.opts.url, "cannot join the server; trying the next address");
                    continue;
                }
            }
            tracing::warn!(error = %e, retry_in = ?self.retry, "cannot join the server; retrying");
            tokio::time::sleep(self.retry).await;
            self.retry = (self.retry * 2).min(RETRY_MAX);
        }
    }

    /// The connection was lost: the next join is a reconnect.
    fn lost(&mut self) {
        self.down_since = Some(Instant::now());
    }
}

/// The addresses of `--server`: comma-separated, in the order tried.
pub fn server_list(s: &str) -> Vec<String> {
    let list: Vec<String> = s.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
    if list.is_empty() { vec![s.to_string()] } else { list }
}

/// Steps per training job: the loop handles messages between jobs.
const CHUNK_STEPS: u64 = 8;

/// The most steps one training job runs. An NBSync client with a push in flight runs one step
/// at a time, so that it swaps its push within one step of the Ack, as the authors' worker
/// re-sends each key at its next pull (docs/seeds.md N3); a chunk of 8 slow steps delayed
/// every round.
pub fn max_job_steps(mode: Mode, push_in_flight: bool) -> u64 {
    if mode == Mode::Nbsync && push_in_flight { 1 } else { CHUNK_STEPS }
}

impl Runner {
    fn n(&self) -> usize {
        self.base.len()
    }

    /// Settles `Mode::Auto` from the server's policy, and gives non-Hermes modes their local
    /// test split back as training data.
    fn resolve_mode(&mut self, policy: &str) {
        if self.cfg.mode == Mode::Auto {
            self.cfg.mode = match policy {
                "adsp" => Mode::Adsp,
                "hermes" => Mode::Hermes,
                _ => Mode::Plain,
            };
            tracing::info!(policy, mode = ?self.cfg.mode, "mode chosen from the server's policy");
        }
        if self.cfg.mode != Mode::Hermes && self.cfg.role == Role::Trainer && !self.local_test.is_empty() {
            let mut all = self.train.to_vec();
            all.append(&mut self.local_test);
            all.sort_unstable();
            self.train = all.into();
        }
        if self.cfg.target_accuracy.is_some() {
            self.check = (0..self.data.test.len().min(500)).collect();
        }
    }

    /// x_local = x_base = the replica.
    async fn adopt(&mut self, s: &Session) -> Result<(), ModelError> {
        self.base = s.replica.values().to_vec();
        self.base_version = s.replica.version().unwrap_or(0);
        self.work.lock().await.trainer.set_params(&self.base)
    }

    fn local_steps(&self, s: &Session) -> u64 {
        self.cfg.local_steps.or(s.directive.local_steps).unwrap_or(self.defaults.local_steps).max(1)
    }

    fn batch(&self, s: &Session) -> usize {
        self.cfg.batch_size.or(s.directive.batch_size).unwrap_or(self.defaults.batch_size).max(1) as usize
    }

    fn lr(&self, s: &Session) -> f64 {
        self.cfg.learning_rate.or(s.directive.learning_rate).unwrap_or(self.defaults.learning_rate)
    }

    /// Hermes: (E, D, b) and the steps of one round.
    fn hermes_round(&self, s: &Session) -> (u64, usize, usize, u64) {
        let e = s.directive.local_epochs.unwrap_or(1).max(1);
        let d = (s.directive.chunk_size.unwrap_or(self.defaults.chunk_size) as usize)
            .clamp(1, self.train.len().max(1));
        let b = self.batch(s).min(d);
        (e, d, b, e * d.div_ceil(b) as u64)
    }

    /// Steps the current round still needs, or None when the mode is not training now.
    fn steps_wanted(&self, s: &Session) -> Option<u64> {
        if self.cfg.role == Role::Evaluator {
            return None;
        }
        match self.cfg.mode {
            Mode::Nbsync => Some(CHUNK_STEPS),
            _ if self.inflight.is_some() => None,
            Mode::Adsp => Some(CHUNK_STEPS),
            Mode::Hermes => Some(self.hermes_round(s).3.saturating_sub(self.round.steps)),
            _ => Some(self.local_steps(s).saturating_sub(self.round.steps)),
        }
        .filter(|&st| st > 0)
        .map(|st| st.min(max_job_steps(self.cfg.mode, self.inflight.is_some())))
    }

    /// The indices a training job draws batches from.
    fn job_data(&self, s: &Session) -> Arc<[usize]> {
        if self.cfg.mode != Mode::Hermes {
            return self.train.clone();
        }
        let (_, d, _, _) = self.hermes_round(s);
        let n = self.train.len();
        (0..d).map(|j| self.train[(self.chunk_at + j) % n.max(1)]).collect::<Vec<_>>().into()
    }

    /// Trains `steps` steps on a blocking thread, which holds the trainer until it is done.
    async fn start_job(&self, s: &Session, steps: u64) -> JoinHandle<RoundStats> {
        let mut work = self.work.clone().lock_owned().await;
        let data = self.data.train.clone();
        let idx = self.job_data(s);
        let (batch, lr) = (self.batch(s), self.lr(s));
        tokio::task::spawn_blocking(move || {
            let Work { trainer, emul } = &mut *work;
            trainer.train(&data, &idx, steps, batch, lr, |dt| {
                let wait = emul.step_delay(dt);
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            })
        })
    }

    fn stop_reason(&self) -> Option<String> {
        if let Some(m) = self.cfg.max_rounds
            && self.summary.rounds >= m
        {
            return Some(format!("reached --max-rounds {m}"));
        }
        if let Some(d) = self.cfg.duration
            && self.started.elapsed() >= d
        {
            return Some(format!("ran for --duration {:.0} s", d.as_secs_f64()));
        }
        if let (Some(t), Some(a)) = (self.cfg.target_accuracy, self.summary.last_accuracy)
            && a >= t
        {
            return Some(format!("reached --target-accuracy {t} ({a:.3})"));
        }
        None
    }

    async fn send_push(&mut self, s: &mut Session) -> Result<(), ClientError> {
        if let Some(t) = self.busy_until.take() {
            tokio::time::sleep_until(t).await;
        }
        let x = self.work.lock().await.trainer.params();
        let delta: Vec<f32> = x.iter().zip(&self.base).map(|(a, b)| a - b).collect();
        let rho = self.cfg.rho_up.unwrap_or(s.welcome.settings.rho_up);
        let k = k_for_density(rho, self.n()).min(s.welcome.settings.max_nnz as usize);
        let sparse = self.sparsifier.sparsify(&delta, k);
        self.seq += 1;
        let loss = if self.round.loss.is_finite() && self.round.loss >= 0.0 { self.round.loss } else { 0.0 };
        let h = PushHeader {
            base_version: self.base_version,
            seq: self.seq,
            samples: self.round.samples.clamp(1, u32::MAX as u64) as u32,
            local_steps: self.round.steps.min(u32::MAX as u64) as u32,
            loss,
            nnz: sparse.indices.len() as u32,
        };
        let frame = encode_push(&h, &sparse.indices, &sparse.values);
        let sent_at = Instant::now();
        self.inflight = Some(InFlight { seq: self.seq, frame: frame.clone(), sparse, sent_at });
        let wait = self.work.lock().await.emul.send_delay(frame.len());
        tokio::time::sleep(wait).await;
        self.summary.pushes += 1;
        s.send_binary(frame).await
    }

    async fn report_round(&mut self, s: &mut Session, overhead: Option<f64>) -> Result<(), ClientError> {
        let report = RoundTime {
            seconds: round_seconds(self.cfg.mode, &self.round, self.round_started.elapsed()),
            steps: self.round.steps,
            commit_overhead_s: overhead,
        };
        self.summary.rounds += 1;
        s.send(&ClientMessage::RoundTime(report)).await
    }

    fn new_round(&mut self) {
        self.round = RoundStats::default();
        self.round_started = Instant::now();
    }

    /// A training job finished: decide by mode what happens next.
    async fn after_job(&mut self, s: &mut Session, stats: RoundStats) -> Result<(), RunError> {
        let r = &mut self.round;
        let total = r.loss as f64 * r.steps as f64 + stats.loss as f64 * stats.steps as f64;
        r.steps += stats.steps;
        r.samples += stats.samples;
        r.compute_s += stats.compute_s;
        r.train_s += stats.train_s;
        r.loss = if r.steps > 0 { (total / r.steps as f64) as f32 } else { 0.0 };
        match self.cfg.mode {
            Mode::Plain | Mode::Auto => {
                if self.round.steps >= self.local_steps(s) {
                    self.send_push(s).await?;
                }
            }
            Mode::Adsp => {
                let interval = s.directive.commit_interval_s.unwrap_or(0.0);
                let due = self.round_started.elapsed().as_secs_f64() >= interval && self.round.steps >= 1;
                let by_steps =
                    s.directive.commit_interval_s.is_none() && self.round.steps >= self.local_steps(s);
                if (s.directive.commit_interval_s.is_some() && due) || by_steps {
                    self.send_push(s).await?;
                }
            }
            Mode::Nbsync => {
                if self.adopt_pending
                    || (self.inflight.is_none() && self.seq == 0 && self.round.steps >= self.local_steps(s))
                {
                    // The round closed (or this is the first push): send what was learned since
                    // the base, and adopt the new model; training goes on meanwhile.
                    self.adopt_pending = false;
                    let overhead = self.inflight.take().map(|f| f.sent_at.elapsed().as_secs_f64());
                    self.send_push(s).await?;
                    if self.seq > 1 {
                        self.report_round(s, overhead).await?;
                    }
                    self.adopt(s).await?;
                    self.new_round();
                }
            }
            Mode::Hermes => {
                let (_, d, _, steps) = self.hermes_round(s);
                if self.round.steps >= steps {
                    self.chunk_at = (self.chunk_at + d) % self.train.len().max(1);
                    self.hermes_gate(s).await?;
                }
            }
        }
        Ok(())
    }

    /// Hermes: push only when the test loss improved significantly.
    async fn hermes_gate(&mut self, s: &mut Session) -> Result<(), RunError> {
        let score = self.work.lock().await.trainer.evaluate(&self.data.train, Some(&self.local_test));
        self.summary.last_loss = Some(score.loss);
        let l = score.loss;
        if self.gate.decide(&self.cfg.gate, l) {
            self.send_push(s).await?;
        } else {
            self.summary.skipped += 1;
            // Training time only: the gate's evaluation (whose size does not scale with D) is
            // not part of the round the allocation equalises (docs/seeds.md H3).
            let seconds = self.round.train_s;
            s.send(&ClientMessage::Skip(SkipReport {
                round: self.summary.rounds + 1,
                loss: l,
                round_seconds: Some(seconds),
            }))
            .await?;
            // The Skip carries the round time: a RoundTime as well would make Hermes count
            // this round twice (and reallocate a second time from a stale measurement).
            self.summary.rounds += 1;
            self.new_round();
        }
        Ok(())
    }

    /// Handles one event from the server.
    async fn on_event(
        &mut self,
        s: &mut Session,
        e: Event,
        job_running: bool,
    ) -> Result<Option<End>, RunError> {
        match e {
            Event::Ack(a) => {
                if self.inflight.as_ref().is_some_and(|f| f.seq == a.seq) {
                    self.summary.acked += 1;
                    self.push_answered(s).await?;
                }
            }
            Event::Reject(rj) => {
                if let Some(f) = self.inflight.as_ref().filter(|f| f.seq == rj.seq) {
                    if rj.field == "seq" {
                        // A resent push the server had already accepted before a disconnect.
                        self.summary.acked += 1;
                    } else if rj.field == "busy" {
                        // Nothing of it was kept: its values go into the next push, sent
                        // after the wait the server asked for.
                        tracing::info!(seq = rj.seq, reason = %rj.reason, "the server is busy; pushing again later");
                        self.summary.busy += 1;
                        self.sparsifier.restore(&f.sparse);
                        // (At most 5 s: the wait holds up reading the server's messages.)
                        let wait = Duration::from_millis(rj.retry_after_ms.unwrap_or(1000).min(5_000));
                        self.busy_until = Some(Instant::now() + wait);
                    } else {
                        tracing::warn!(seq = rj.seq, field = %rj.field, reason = %rj.reason, "push rejected; its values go back into the residual");
                        self.summary.rejected += 1;
                        self.sparsifier.restore(&f.sparse);
                    }
                    self.push_answered(s).await?;
                }
            }
            Event::Error(e) if e.fatal => {
                return Ok(Some(End::Disconnected(format!("server error ({}): {}", e.field, e.message))));
            }
            Event::Error(e) => {
                tracing::warn!(field = %e.field, message = %e.message, "server reported an error")
            }
            Event::Bye { reason } => {
                return Ok(Some(End::Disconnected(format!("server said bye: {reason}"))));
            }
            Event::Delta { version, .. } | Event::Snapshot { version, .. } => {
                if self.cfg.role == Role::Evaluator
                    && !job_running
                    && self.eval_due(version).is_some_and(|t| t <= Instant::now())
                {
                    self.evaluate(s).await?;
                }
            }
            Event::RoundDropped { round, reason } => tracing::info!(round, %reason, "dropped from a round"),
            Event::Directive(_) | Event::Resyncing { .. } => {}
        }
        Ok(None)
    }

    /// The in-flight push was answered: adopt the replica and start a new round. (Other modes
    /// pause training while a push is in flight, so no job is running here; NBSync keeps
    /// training and adopts after the running step.)
    async fn push_answered(&mut self, s: &mut Session) -> Result<(), RunError> {
        if self.cfg.mode == Mode::Nbsync {
            self.adopt_pending = true;
            return Ok(());
        }
        let Some(f) = self.inflight.take() else { return Ok(()) };
        let overhead = f.sent_at.elapsed().as_secs_f64();
        self.report_round(s, Some(overhead)).await?;
        self.adopt(s).await?;
        if !self.check.is_empty() {
            let sc = self.work.lock().await.trainer.evaluate(&self.data.test, Some(&self.check));
            self.summary.last_accuracy = Some(sc.accuracy);
        }
        self.new_round();
        Ok(())
    }

    /// When the evaluator should score `version` (None: not due, too few new versions).
    fn eval_due(&self, version: u64) -> Option<Instant> {
        if self.cfg.role != Role::Evaluator
            || self.last_eval_version.is_some_and(|v| version < v + self.cfg.eval_every.max(1))
        {
            return None;
        }
        Some(self.last_eval_at.map_or_else(Instant::now, |t| t + self.cfg.eval_interval))
    }

    async fn evaluate(&mut self, s: &mut Session) -> Result<(), RunError> {
        let version = s.replica.version().unwrap_or(0);
        let values = s.replica.values().to_vec();
        let mut work = self.work.clone().lock_owned().await;
        let test = self.data.test.clone();
        let limit = self.cfg.eval_samples.unwrap_or(usize::MAX).min(test.len());
        let score = tokio::task::spawn_blocking(move || -> Result<Score, ModelError> {
            let idx: Vec<usize> = (0..limit).collect();
            work.trainer.set_params(&values)?;
            Ok(work.trainer.evaluate(&test, Some(&idx)))
        })
        .await
        .map_err(|e| RunError::thread("evaluation", e))??;
        self.last_eval_version = Some(version);
        self.last_eval_at = Some(Instant::now());
        self.summary.evaluations += 1;
        self.summary.last_accuracy = Some(score.accuracy);
        self.summary.last_loss = Some(score.loss);
        tracing::info!(
            version,
            accuracy = format!("{:.4}", score.accuracy),
            loss = format!("{:.4}", score.loss),
            "evaluated"
        );
        let report =
            EvalReport { version, accuracy: score.accuracy, loss: score.loss, samples: score.samples };
        s.send(&ClientMessage::Eval(report)).await?;
        Ok(())
    }

    /// One connected session, until a stop or a disconnect.
    async fn session(&mut self, conn: Connection) -> Result<End, RunError> {
        let (mut s, mut stream) = conn.into_parts();
        let (tx, mut rx) = mpsc::channel(4096);
        let downlink = self.work.lock().await.emul.clone();
        let reader = tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                let end = m.is_err();
                // An emulated slow downlink: each binary frame (Delta, Snapshot) takes its
                // transfer time before the next one is read; the server's queue fills meanwhile.
                if let Ok(frame) = &m
                    && frame.is_binary()
                {
                    tokio::time::sleep(downlink.recv_delay(frame.len())).await;
                }
                if tx.send(m).await.is_err() || end {
                    break;
                }
            }
        });
        self.adopt(&s).await?;
        self.new_round();
        if let Some(f) = &self.inflight {
            // Answered as a duplicate if the server had it already: exactly once either way.
            let frame = f.frame.clone();
            s.send_binary(frame).await.map_err(RunError::from)?;
        }
        if self.cfg.role == Role::Evaluator {
            self.evaluate(&mut s).await?;
        }
        // The training job running, if any (it holds the trainer).
        let mut job: Option<JoinHandle<RoundStats>> = None;
        let end = loop {
            if let Some(reason) = self.stop_reason() {
                break End::Stop(reason);
            }
            if job.is_none()
                && let Some(steps) = self.steps_wanted(&s)
            {
                job = Some(self.start_job(&s, steps).await);
            }
            let deadline = self.cfg.duration.map(|d| self.started + d);
            let eval_at =
                if job.is_none() { s.replica.version().and_then(|v| self.eval_due(v)) } else { None };
            tokio::select! {
                m = rx.recv() => match m {
                    None => break End::Disconnected("connection closed".into()),
                    Some(Err(e)) => break End::Disconnected(e.to_string()),
                    Some(Ok(m)) => {
                        let ev = match s.handle(m).await {
                            Ok(Some(ev)) => ev,
                            Ok(None) => continue,
                            Err(e) => break End::Disconnected(e.to_string()),
                        };
                        if let Some(end) = self.on_event(&mut s, ev, job.is_some()).await? {
                            break end;
                        }
                    }
                },
                r = finished(&mut job), if job.is_some() => {
                    job = None;
                    let stats = r.map_err(|e| RunError::thread("training", e))?;
                    self.after_job(&mut s, stats).await?;
                },
                _ = sleep_until(deadline) => {}
                _ = sleep_until(eval_at) => self.evaluate(&mut s).await?,
            }
        };
        if let Some(j) = job {
            // The next session starts from the model the running chunk leaves.
            let _ = j.await;
        }
        let (down, up) = s.traffic();
        self.summary.bytes_down += down;
        self.summary.bytes_up += up;
        if let End::Stop(reason) = &end {
            s.close(reason).await;
        }
        reader.abort();
        Ok(end)
    }
}

/// What the running job returns; never resolves when none runs.
async fn finished(job: &mut Option<JoinHandle<RoundStats>>) -> Result<RoundStats, tokio::task::JoinError> {
    match job {
        Some(j) => j.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H4: the threshold relaxes at the λ-th miss in a row, and a push keeps it relaxed.
    #[test]
    fn server_addresses_are_comma_separated() {
        assert_eq!(server_list("ws://a:1/ws"), ["ws://a:1/ws"]);
        assert_eq!(server_list("ws://a:1/ws, ws://b:2/ws,"), ["ws://a:1/ws", "ws://b:2/ws"]);
    }

    #[test]
    fn the_hermes_gate_keeps_its_relaxed_threshold_after_a_push() {
        let gate = Gate { z_start: -1.2, window: 10, lambda: 2, beta: 0.5 };
        let mut g = GateState::new(&gate);
        // Flat losses: z = 0, no push.
        assert!(!g.decide(&gate, 1.0));
        assert_eq!(g.threshold(), -1.2, "one miss");
        assert!(!g.decide(&gate, 1.0));
        assert_eq!(g.threshold(), -0.6, "relaxed at the λ-th miss");
        // A drop: z = (0.5 − 0.833)/0.236 = −1.41 ≤ −0.6: push, window cleared.
        assert!(g.decide(&gate, 0.5));
        assert_eq!(g.threshold(), -0.6, "not reset to z_start after a push");
        assert!(!g.decide(&gate, 0.5), "one loss in the window: no z yet");
        // Two losses give z = −1: a push under the kept −0.6 (not under a reset −1.2).
        assert!(g.decide(&gate, 0.4));
    }

    /// N3: NBSync looks for the Ack after every step once a push is in flight.
    #[test]
    fn nbsync_checks_for_the_ack_after_every_step() {
        assert_eq!(max_job_steps(Mode::Nbsync, true), 1);
        assert_eq!(max_job_steps(Mode::Nbsync, false), CHUNK_STEPS, "before its first push");
        assert_eq!(max_job_steps(Mode::Adsp, true), CHUNK_STEPS);
    }

    /// H3: Hermes reports training time only; other modes the whole round.
    #[test]
    fn hermes_reports_training_time_only() {
        let round = RoundStats { steps: 10, train_s: 0.2, ..Default::default() };
        let elapsed = Duration::from_millis(900); // with the gate's evaluation and the Ack wait
        assert_eq!(round_seconds(Mode::Hermes, &round, elapsed), 0.2);
        assert_eq!(round_seconds(Mode::Adsp, &round, elapsed), 0.9);
    }
}
