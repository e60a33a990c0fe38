//! `sparsync demo`: a server and heterogeneous native clients training `mlp` on Fashion-MNIST,
//! with live progress and a summary. Runs on a machine without GPU or network.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use super::{ClientSpec, Launcher, OrchestrateError, io};
use crate::config::ServerConfig;
use crate::server::status::Status;

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The server (listen address, policy, weighting, model, engine…).
    pub server: ServerConfig,
    /// One trainer per entry, this many times slower than the machine.
    pub slowdowns: Vec<f64>,
    /// Stop after this long…
    pub duration: Duration,
    /// …or once the evaluator reports this accuracy (None: the dataset's, see
    /// [`default_target`])…
    pub target_accuracy: Option<f64>,
    /// …or once the accuracy has not gained [`PLATEAU_GAIN`] for this long (None: never).
    pub plateau: Option<Duration>,
    /// Runs go in a new directory under this one.
    pub out: PathBuf,
    pub client_bin: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// Evaluator: score on the first this many test images…
    pub eval_samples: Option<usize>,
    /// …at most once per this interval (None: the client's default).
    pub eval_interval: Option<Duration>,
}

/// A gain smaller than this (half a percentage point) does not count as progress.
pub const PLATEAU_GAIN: f64 = 0.005;

/// The target a dataset can reach in a demo on a small machine. The full Fashion-MNIST
/// reaches 85% with `mlp` in about half a minute on 2 cores. On the embedded subset (4,000
/// training images over 8 trainers) the test accuracy passes 82% within 2 s and then levels
/// off at 83–84.5%: its target is 84%, first reached after 10–20 s; when a run does not get
/// there, the plateau rule ends it.
pub fn default_target(source: &crate::data::Source) -> f64 {
    match source {
        crate::data::Source::Embedded => 0.84,
        crate::data::Source::Directory(_) => 0.85,
    }
}

/// One trainer's part in a demo.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClientRow {
    pub client_id: String,
    pub connected_s: f64,
    pub pushes: u64,
    pub pushes_per_s: f64,
    /// Pushes aggregated into the model.
    pub commits: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub mean_staleness: f64,
    /// The training loss of its last push.
    pub last_loss: f32,
}

/// What a demo did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoSummary {
    pub dir: PathBuf,
    pub data: String,
    pub seconds: f64,
    pub target_accuracy: f64,
    /// Seconds from the start until the evaluator first reported the target.
    pub target_reached_s: Option<f64>,
    /// The evaluator's first and last report (seconds since the server started).
    pub curve_span_s: Option<(f64, f64)>,
    pub evaluations: u64,
    pub version: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub clients: usize,
    pub best_accuracy: Option<f64>,
    pub final_accuracy: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub engine: String,
    pub policy: String,
    pub stop: String,
    /// Why the model ended where it did, from what the run measured.
    pub why: Vec<String>,
    pub trainers: Vec<ClientRow>,
}

/// Tracks the best accuracy and when it last grew by at least [`PLATEAU_GAIN`].
#[derive(Default)]
struct Plateau {
    best: f64,
    since: f64,
    last_t: f64,
}

impl Plateau {
    fn see(&mut self, evals: &[crate::server::coordinator::EvalPoint]) {
        let after = self.last_t;
        for e in evals.iter().filter(|e| e.t > after) {
            if e.accuracy >= self.best + PLATEAU_GAIN {
                self.since = e.t;
            }
            self.best = self.best.max(e.accuracy);
            self.last_t = e.t;
        }
    }

    /// Seconds without progress, as of the newest report.
    fn flat_for(&self) -> f64 {
        self.last_t - self.since
    }
}

fn progress_line(s: &Status, rate: f64) -> String {
    let acc = s.evals.last().map(|e| format!("{:.1}%", 100.0 * e.accuracy)).unwrap_or_else(|| "-".into());
    format!(
        "version {} | accuracy {acc} | {rate:.0} updates/s | up {:.1} MB, down {:.1} MB | {} clients",
        s.version,
        s.bytes_in as f64 / 1e6,
        s.bytes_out as f64 / 1e6,
        s.clients.len()
    )
}

/// Runs the demo; returns its summary (also written to the run's directory).
pub async fn run(cfg: DemoConfig) -> Result<DemoSummary, OrchestrateError> {
    let bin = super::find_client(cfg.client_bin.as_deref())?;
    let data = crate::data::load(cfg.data.as_deref())
        .map_err(|e| OrchestrateError::Invalid(format!("the demo's data: {e}")))?;
    let target = cfg.target_accuracy.unwrap_or_else(|| default_target(&data.source));
    let dir = super::run_dir(&cfg.out, "demo")?;
    let logs = dir.join("clients");
    std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .map_err(io(format!("binding {}", cfg.server.listen)))?;
    let model = cfg.server.model.clone();
    let server = crate::server::start(cfg.server.clone(), listener).await?;
    let addr = server.addr;
    eprintln!(
        "sparsync demo: server on http://{addr} (dashboard at http://{addr}/), files in {}\n\
         \x20 data: {}; stops at {:.0}% test accuracy, when accuracy stops improving, or after {:.0} s",
        dir.display(),
        data.source,
        100.0 * target,
        cfg.duration.as_secs_f64()
    );
    let launcher =
        Launcher { bin, url: format!("ws://{addr}/ws"), model, data: cfg.data.clone(), log_dir: logs };
    let n = cfg.slowdowns.len();
    let mut children = Vec::new();
    let mut ev = ClientSpec::evaluator("evaluator");
    if let Some(s) = cfg.eval_samples {
        ev.extra = vec!["--eval-samples".into(), s.to_string()];
    }
    if let Some(i) = cfg.eval_interval {
        ev.extra.extend(["--eval-interval-s".into(), i.as_secs_f64().to_string()]);
    }
    children.push(launcher.spawn(&ev)?);
    for (i, &slow) in cfg.slowdowns.iter().enumerate() {
        let spec = ClientSpec::trainer(format!("trainer-{i}-x{slow}"), (i, n), slow, i as u64 + 1);
        children.push(launcher.spawn(&spec)?);
    }

    let tty = console_is_terminal();
    let bar = if tty { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let start = Instant::now();
    let mut last = (start, 0u64);
    let mut last_print = start;
    let mut rate = 0.0;
    let mut plateau = Plateau::default();
    let mut reached: Option<f64> = None;
    let stop = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = server.status();
        let now = Instant::now();
        if now - last.0 >= Duration::from_secs(1) {
            rate = (s.accepted - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, s.accepted);
        }
        let line = progress_line(&s, rate);
        bar.set_message(line.clone());
        if !tty && now - last_print >= Duration::from_secs(5) {
            eprintln!("[{:>5.1}s] {line}", start.elapsed().as_secs_f64());
            last_print = now;
        }
        plateau.see(&s.evals);
        if let Some(e) = s.evals.iter().find(|e| e.accuracy >= target) {
            reached.get_or_insert(e.t);
            break format!("reached the target accuracy {:.1}%", 100.0 * target);
        }
        if let Some(p) = cfg.plateau
            && plateau.flat_for() >= p.as_secs_f64()
        {
            break format!(
                "accuracy plateaued at {:.1}% (no gain of {:.1} points in {:.0} s)",
                100.0 * plateau.best,
                100.0 * PLATEAU_GAIN,
                p.as_secs_f64()
            );
        }
        if start.elapsed() >= cfg.duration {
            break format!("ran for {:.0} s", cfg.duration.as_secs_f64());
        }
        let mut exited = 0;
        for c in children.iter_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                exited += 1;
            }
        }
        if exited == children.len() {
            break "every client exited (see their logs)".into();
        }
    };
    bar.finish_and_clear();
    let status = server.status();
    let seconds = start.elapsed().as_secs_f64();
    let _ = server.shutdown("demo finished").await?;
    super::reap(&mut children, Duration::from_secs(5)).await;

    // Files.
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))
    };
    write("status.json", serde_json::to_string_pretty(&*status).expect("status serializes"))?;
    let mut csv = String::from("t,version,accuracy,loss,bytes_in,bytes_out\n");
    for e in &status.evals {
        csv.push_str(&format!(
            "{:.3},{},{:.4},{:.4},{},{}\n",
            e.t, e.version, e.accuracy, e.loss, e.bytes_in, e.bytes_out
        ));
    }
    write("evals.csv", csv)?;
    let curve: Vec<(f64, f64)> = status.evals.iter().map(|e| (e.t, e.accuracy)).collect();
    crate::plot::lines(
        &dir.join("accuracy.png"),
        &format!("sparsync demo: {} clients, {}", n, status.policy),
        "seconds",
        "test accuracy",
        &[("evaluator".to_string(), curve)],
    )?;
    let mut trainers: Vec<ClientRow> = status
        .clients
        .iter()
        .filter(|c| c.role == crate::protocol::message::Role::Trainer)
        .map(|c| ClientRow {
            client_id: c.client_id.clone(),
            connected_s: c.connected_s,
            pushes: c.accepted,
            pushes_per_s: c.accepted as f64 / c.connected_s.max(1e-9),
            commits: c.commits,
            bytes_up: c.bytes_in,
            bytes_down: c.bytes_out,
            mean_staleness: c.mean_staleness,
            last_loss: c.last_loss,
        })
        .collect();
    trainers.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let last = status.evals.last();
    let mut summary = DemoSummary {
        dir: dir.clone(),
        data: data.source.to_string(),
        seconds,
        target_accuracy: target,
        target_reached_s: reached,
        curve_span_s: status.evals.first().zip(last).map(|(a, b)| (a.t, b.t)),
        evaluations: status.evals_seen,
        version: status.version,
        accepted: status.accepted,
        rejected: status.rejected,
        clients: n,
        best_accuracy: status.evals.iter().map(|e| e.accuracy).reduce(f64::max),
        final_accuracy: last.map(|e| e.accuracy),
        bytes_in: status.bytes_in,
        bytes_out: status.bytes_out,
        engine: format!("{} ({})", status.engine.kind, status.engine.adapter),
        policy: status.policy.clone(),
        stop,
        why: Vec::new(),
        trainers,
    };
    summary.why = explain(&summary, &status, data.train.len());
    write("summary.json", serde_json::to_string_pretty(&summary).expect("summary serializes"))?;
    Ok(summary)
}

/// Why the run ended where it did, in a few sentences built from its measurements.
fn explain(s: &DemoSummary, status: &Status, train_images: usize) -> Vec<String> {
    let mut why = Vec::new();
    let eval_loss = status.evals.last().map(|e| e.loss);
    let losses: Vec<f64> = s.trainers.iter().map(|t| t.last_loss as f64).filter(|l| l.is_finite()).collect();
    if let (Some(test), false) = (eval_loss, losses.is_empty()) {
        let train = losses.iter().sum::<f64>() / losses.len() as f64;
        if train < 0.5 * test {
            why.push(format!(
                "the trainers fit their own data far better than unseen data (training loss {train:.3}, \
                 test loss {test:.3}): each of the {} trainers holds about {} of the {train_images} \
                 training images and memorises them, so the test accuracy levels off",
                s.clients,
                train_images / s.clients.max(1),
            ));
        } else {
            why.push(format!(
                "training loss {train:.3} (trainers' last pushes), test loss {test:.3} (evaluator)"
            ));
        }
    }
    if s.version > 0 && s.bytes_out > 0 {
        let receivers = status.clients.len().max(1);
        let per_delta = s.bytes_out as f64 / (s.version as f64 * receivers as f64);
        let per_push = s.bytes_in as f64 / s.accepted.max(1) as f64;
        why.push(format!(
            "down is {:.0}× up: each of the {} model versions went to all {receivers} clients as a \
             Delta (~{:.1} kB each), while a trainer sends one push (~{:.1} kB) per round",
            s.bytes_out as f64 / s.bytes_in.max(1) as f64,
            s.version,
            per_delta / 1e3,
            per_push / 1e3
        ));
    }
    why
}

/// The summary as a few lines for the terminal.
pub fn describe(s: &DemoSummary) -> String {
    use std::fmt::Write;
    let pct = |a: Option<f64>| a.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "sparsync demo finished: {} ({:.0} s)\n\
         \x20 data: {}\n\
         \x20 {} trainers + 1 evaluator, policy {}, engine {}\n\
         \x20 {} updates accepted ({} rejected), model version {}, {:.1} updates/s\n\
         \x20 accuracy: final {}, best {}, target {:.0}% {}\n\
         \x20 traffic: {:.1} MB up, {:.1} MB down\n",
        s.stop,
        s.seconds,
        s.data,
        s.clients,
        s.policy,
        s.engine,
        s.accepted,
        s.rejected,
        s.version,
        s.accepted as f64 / s.seconds.max(1e-9),
        pct(s.final_accuracy),
        pct(s.best_accuracy),
        100.0 * s.target_accuracy,
        s.target_reached_s.map(|t| format!("reached at {t:.1} s")).unwrap_or_else(|| "not reached".into()),
        s.bytes_in as f64 / 1e6,
        s.bytes_out as f64 / 1e6,
    );
    for w in &s.why {
        let _ = writeln!(out, "  why: {w}");
    }
    let _ = writeln!(
        out,
        "  {:<16} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10}",
        "trainer", "pushes", "push/s", "commits", "staleness", "up MB", "down MB"
    );
    for t in &s.trainers {
        let _ = writeln!(
            out,
            "  {:<16} {:>8} {:>8.1} {:>8} {:>9.2} {:>10.2} {:>10.2}",
            t.client_id,
            t.pushes,
            t.pushes_per_s,
            t.commits,
            t.mean_staleness,
            t.bytes_up as f64 / 1e6,
            t.bytes_down as f64 / 1e6
        );
    }
    if let Some((a, b)) = s.curve_span_s {
        let _ = writeln!(out, "  accuracy curve: {} evaluations, t = {a:.1}…{b:.1} s", s.evaluations);
    }
    let _ = writeln!(
        out,
        "  files: {} (evals.csv, accuracy.png, summary.json, status.json, clients/*.log)",
        s.dir.display()
    );
    out
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
