//! `sparsync-client`: trains a built-in model with burn and synchronises through a sparsync
//! server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sparsync::data::Partition;
use sparsync::protocol::message::Role;
use sparsync_client::emulate::Emulation;
use sparsync_client::run::{self, Config, Gate, Mode};

// Every default is `Config::default()`'s (or the emulation's and the gate's): defined once, in
// the library.
#[derive(Parser, Debug)]
#[command(name = "sparsync-client", version, about = "Train with burn against a sparsync parameter server")]
struct Cli {
    /// The server's WebSocket address; several, comma-separated (a leader and its standby),
    /// are tried in turn when joining fails.
    #[arg(long, default_value_t = Config::default().server)]
    server: String,
    /// This client's id (letters, digits, '.', '_', '-'); its sequence numbers survive reconnects.
    #[arg(long, default_value_t = Config::default().client_id)]
    id: String,
    /// The model family the server serves: logreg, mlp or cnn.
    #[arg(long, default_value_t = Config::default().model)]
    model: String,
    /// Join token, when the server requires one.
    #[arg(long, env = "SPARSYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of a private CA that signed the server's certificate (for wss://).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// trainer, or evaluator (never trains; scores the replica on the test set and reports it).
    #[arg(long, value_enum, default_value_t = RoleArg::from(Config::default().role))]
    role: RoleArg,
    /// How to train between pushes; auto follows the server's policy.
    #[arg(long, value_enum, default_value_t = Config::default().mode)]
    mode: Mode,
    /// Directory with the four Fashion-MNIST IDX files (default: Debian's, else the embedded subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// How the training set is split across clients: iid or dirichlet:ALPHA.
    #[arg(long, default_value_t = Config::default().partition)]
    partition: Partition,
    /// This client's shard of the split, as I/N.
    #[arg(long, default_value_t = Shard(Config::default().shard), value_parser = parse_shard)]
    shard: Shard,
    /// Seed for the partition, batch order and jitter.
    #[arg(long, default_value_t = Config::default().seed)]
    seed: u64,
    /// Local steps per push (overrides the server's directive).
    #[arg(long)]
    local_steps: Option<u64>,
    /// Mini-batch size (overrides the server's directive).
    #[arg(long)]
    batch_size: Option<u64>,
    /// Learning rate (overrides the server's directive).
    #[arg(long)]
    lr: Option<f64>,
    /// Upload density ρ_up (overrides the server's setting).
    #[arg(long)]
    rho_up: Option<f64>,
    /// Emulate a slower device: each local step takes F times its measured time.
    #[arg(long, default_value_t = Emulation::none().slowdown)]
    slowdown: f64,
    /// Emulate an uplink of this many kilobits per second (0: unlimited).
    #[arg(long, default_value_t = Emulation::none().uplink_kbps)]
    uplink_kbps: f64,
    /// Emulate a downlink of this many kilobits per second for Deltas and Snapshots (0: unlimited).
    #[arg(long, default_value_t = Emulation::none().downlink_kbps)]
    downlink_kbps: f64,
    /// Emulate this much one-way latency before each message sent, milliseconds.
    #[arg(long, default_value_t = Emulation::none().latency.as_secs_f64() * 1e3)]
    latency_ms: f64,
    /// Multiply every emulated delay by a seeded factor in [1 - J, 1 + J].
    #[arg(long, default_value_t = Emulation::none().jitter)]
    jitter: f64,
    /// Stop after this many local rounds.
    #[arg(long)]
    max_rounds: Option<u64>,
    /// Stop once this accuracy is reached (evaluator: on the test set; trainer: on 500 test images).
    #[arg(long)]
    target_accuracy: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Evaluator: score every this many replica versions…
    #[arg(long, default_value_t = Config::default().eval_every)]
    eval_every: u64,
    /// …and at most once per this many seconds (the newest version is scored when it ends).
    #[arg(long, default_value_t = Config::default().eval_interval.as_secs_f64())]
    eval_interval_s: f64,
    /// Evaluator: score on the first N test images (default: all).
    #[arg(long)]
    eval_samples: Option<usize>,
    /// Do not reconnect when the connection drops.
    #[arg(long)]
    no_reconnect: bool,
    /// Hermes gate: initial z-score threshold.
    #[arg(long, default_value_t = Gate::default().z_start)]
    hermes_z: f64,
    /// Write a JSON summary of the run here at exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RoleArg {
    Trainer,
    Evaluator,
}

impl From<Role> for RoleArg {
    fn from(role: Role) -> Self {
        match role {
            Role::Trainer => Self::Trainer,
            Role::Evaluator => Self::Evaluator,
        }
    }
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Trainer => Self::Trainer,
            RoleArg::Evaluator => Self::Evaluator,
        }
    }
}

/// Shard I of N, written `I/N`.
#[derive(Clone, Copy, Debug)]
struct Shard((usize, usize));

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Shard((i, n)) = self;
        write!(f, "{i}/{n}")
    }
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
    let (i, n): (usize, usize) =
        (i.parse().map_err(|_| "I is not a number")?, n.parse().map_err(|_| "N is not a number")?);
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: need 0 <= I < N"));
    }
    Ok(Shard((i, n)))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(sparsync::log_filter(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let data = sparsync::data::load(cli.data.as_deref()).context("loading Fashion-MNIST")?;
    let emul = Emulation::new(cli.slowdown, cli.uplink_kbps, cli.latency_ms, cli.jitter, cli.seed)
        .with_downlink(cli.downlink_kbps);
    let cfg = Config {
        server: cli.server,
        client_id: cli.id,
        model: cli.model,
        token: cli.token,
        ca: cli.ca,
        role: cli.role.into(),
        mode: cli.mode,
        partition: cli.partition,
        shard: cli.shard.0,
        seed: cli.seed,
        local_steps: cli.local_steps,
        batch_size: cli.batch_size,
        learning_rate: cli.lr,
        rho_up: cli.rho_up,
        max_rounds: cli.max_rounds,
        target_accuracy: cli.target_accuracy,
        duration: cli.duration_s.map(Duration::from_secs_f64),
        eval_every: cli.eval_every,
        eval_interval: Duration::from_secs_f64(cli.eval_interval_s.max(0.0)),
        eval_samples: cli.eval_samples,
        reconnect: !cli.no_reconnect,
        gate: Gate { z_start: cli.hermes_z, ..Gate::default() },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let summary = rt.block_on(run::run(cfg, data, emul))?;
    tracing::info!(
        rounds = summary.rounds, pushes = summary.pushes, acked = summary.acked, rejected = summary.rejected, busy = summary.busy,
        bytes_up = summary.bytes_up, bytes_down = summary.bytes_down, stop = %summary.stop, "client finished"
    );
    if let Some(path) = cli.report {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_default_to_the_library_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["sparsync-client"]);
        let d = Config::default();
        assert_eq!((cli.server, cli.id, cli.model), (d.server, d.client_id, d.model));
        assert_eq!((cli.shard.0, cli.seed, cli.eval_every), (d.shard, d.seed, d.eval_every));
        assert_eq!((cli.mode, cli.partition), (d.mode, d.partition));
        assert_eq!(Role::from(cli.role), d.role);
        assert_eq!(Duration::from_secs_f64(cli.eval_interval_s), d.eval_interval);
        assert_eq!(cli.hermes_z, d.gate.z_start);
        assert_eq!(cli.slowdown, 1.0);
        assert_eq!((cli.uplink_kbps, cli.downlink_kbps, cli.latency_ms, cli.jitter), (0.0, 0.0, 0.0, 0.0));
        assert_eq!(parse_shard("2/4").map(|s| s.to_string()), Ok("2/4".to_string()));
        assert!(parse_shard("4/4").is_err());
    }
}
