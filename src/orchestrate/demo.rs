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
    /// …or once the evaluator reports this accuracy.
    pub target_accuracy: Option<f64>,
    /// Runs go in a new directory under this one.
    pub out: PathBuf,
    pub client_bin: Option<PathBuf>,
    pub data: Option<PathBuf>,
    /// Evaluator: score on the first this many test images.
    pub eval_samples: Option<usize>,
}

/// What a demo did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoSummary {
    pub dir: PathBuf,
    pub seconds: f64,
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
        "sparsync demo: server on http://{addr} (dashboard at http://{addr}/), files in {}",
        dir.display()
    );
    let launcher =
        Launcher { bin, url: format!("ws://{addr}/ws"), model, data: cfg.data.clone(), log_dir: logs };
    let n = cfg.slowdowns.len();
    let mut children = Vec::new();
    let mut ev = ClientSpec::evaluator("evaluator");
    if let Some(s) = cfg.eval_samples {
        ev.extra = vec!["--eval-samples".into(), s.to_string()];
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
        if let (Some(t), Some(e)) = (cfg.target_accuracy, s.evals.last())
            && e.accuracy >= t
        {
            break format!("reached the target accuracy {:.1}%", 100.0 * t);
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
    super::plot::lines(
        &dir.join("accuracy.png"),
        &format!("sparsync demo: {} clients, {}", n, status.policy),
        "seconds",
        "test accuracy",
        &[("evaluator".to_string(), curve)],
    )?;
    let summary = DemoSummary {
        dir: dir.clone(),
        seconds,
        version: status.version,
        accepted: status.accepted,
        rejected: status.rejected,
        clients: n,
        best_accuracy: status.evals.iter().map(|e| e.accuracy).reduce(f64::max),
        final_accuracy: status.evals.last().map(|e| e.accuracy),
        bytes_in: status.bytes_in,
        bytes_out: status.bytes_out,
        engine: format!("{} ({})", status.engine.kind, status.engine.adapter),
        policy: status.policy.clone(),
        stop,
    };
    write("summary.json", serde_json::to_string_pretty(&summary).expect("summary serializes"))?;
    Ok(summary)
}

/// The summary as a few lines for the terminal.
pub fn describe(s: &DemoSummary) -> String {
    let pct = |a: Option<f64>| a.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(|| "-".into());
    format!(
        "sparsync demo finished: {} ({:.0} s)\n\
         \x20 {} trainers + 1 evaluator, policy {}, engine {}\n\
         \x20 {} updates accepted ({} rejected), model version {}, {:.1} updates/s\n\
         \x20 accuracy: final {}, best {}\n\
         \x20 traffic: {:.1} MB up, {:.1} MB down\n\
         \x20 files: {} (evals.csv, accuracy.png, status.json, clients/*.log)\n",
        s.stop,
        s.seconds,
        s.clients,
        s.policy,
        s.engine,
        s.accepted,
        s.rejected,
        s.version,
        s.accepted as f64 / s.seconds.max(1e-9),
        pct(s.final_accuracy),
        pct(s.best_accuracy),
        s.bytes_in as f64 / 1e6,
        s.bytes_out as f64 / 1e6,
        s.dir.display()
    )
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
