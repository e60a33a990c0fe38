//! `sparsync demo`: a server and heterogeneous native clients, with live progress.

use std::path::PathBuf;
use std::time::Duration;

use sparsync::config::{EngineChoice, PolicyKind, ServerConfig};
use sparsync::orchestrate::demo;
use sparsync::policy::staleness::WeightingKind;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Slowdown of each trainer (one trainer per value).
    #[arg(long, value_delimiter = ',', default_value = "1,1,2,2,4,4,8,8")]
    slowdowns: Vec<f64>,
    /// Synchronization policy.
    #[arg(long, value_enum, default_value = "asp")]
    policy: PolicyKind,
    /// Staleness weighting.
    #[arg(long, value_enum, default_value = "polynomial")]
    weighting: WeightingKind,
    /// Model family.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Aggregation engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineChoice,
    /// Broadcast a Delta at most every this many milliseconds (0: every step; auto: keep the
    /// downlink within twice the uplink), as `sparsync serve --broadcast-interval-ms`.
    #[arg(long, default_value = "0")]
    broadcast_interval_ms: sparsync::config::BroadcastInterval,
    /// Address of the server (and its dashboard).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_s: f64,
    /// Stop once the evaluator reports this test accuracy (default: 0.85 on the full
    /// Fashion-MNIST, 0.84 on the embedded subset).
    #[arg(long)]
    target_accuracy: Option<f64>,
    /// Stop once the accuracy has not gained half a point for this many seconds (0: never).
    #[arg(long, default_value_t = 20.0)]
    plateau_s: f64,
    /// The evaluator scores the first N test images.
    #[arg(long, default_value_t = 2000)]
    eval_samples: usize,
    /// Directory for the run's files (a new subdirectory per run).
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// Fashion-MNIST IDX directory (default: Debian's, else the embedded subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The sparsync-client executable (default: next to this one).
    #[arg(long)]
    client_bin: Option<PathBuf>,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let server = ServerConfig {
        listen: a.listen,
        model: a.model,
        engine: a.engine,
        policy: a.policy,
        weighting: a.weighting,
        broadcast_interval_ms: a.broadcast_interval_ms,
        ..ServerConfig::default()
    };
    let cfg = demo::DemoConfig {
        server,
        slowdowns: a.slowdowns,
        duration: Duration::from_secs_f64(a.duration_s),
        target_accuracy: a.target_accuracy,
        plateau: (a.plateau_s > 0.0).then(|| Duration::from_secs_f64(a.plateau_s)),
        out: a.out,
        client_bin: a.client_bin,
        data: a.data,
        eval_samples: Some(a.eval_samples),
        eval_interval: None,
    };
    let summary = demo::run(cfg).await?;
    print!("{}", demo::describe(&summary));
    Ok(())
}
