//! `sparsync experiment`: synchronization policies compared on the same clients and data.

use std::path::PathBuf;

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::orchestrate::experiment;
use sparsync::policy::staleness::WeightingKind;

#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// Policies to compare (nbsync = BSP server with pipelining clients).
    #[arg(long, value_delimiter = ',', default_value = "bsp,asp,ssp,fedbuff,adsp,hermes,nbsync")]
    policies: Vec<String>,
    /// Trainers per run.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Slowdown of each trainer, cycled over the trainers.
    #[arg(long, value_delimiter = ',', default_value = "1,1,2,2,4,4,8,8")]
    slowdowns: Vec<f64>,
    /// Time and bytes are measured to this test accuracy.
    #[arg(long, default_value_t = 0.8)]
    target_accuracy: f64,
    /// Runs per policy (medians are reported).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Seed of the data split, client seeds and model initialisation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for results.csv, results.json, plots and client logs.
    #[arg(long, default_value = "runs/experiment")]
    out: PathBuf,
    /// Staleness study: also run ASP with each of these weightings.
    #[arg(long, value_delimiter = ',', value_enum)]
    staleness_weighting: Vec<WeightingKind>,
    /// Staleness weighting of the policy comparison (Hermes always weights by loss).
    #[arg(long, value_enum, default_value = "polynomial")]
    weighting: WeightingKind,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 90.0)]
    max_seconds: f64,
    /// Model family.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Aggregation engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineChoice,
    /// How the training set is split: iid or dirichlet:ALPHA.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// The evaluator scores the first N test images.
    #[arg(long, default_value_t = 2000)]
    eval_samples: usize,
    /// Fashion-MNIST IDX directory (default: Debian's, else the embedded subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The sparsync-client executable (default: next to this one).
    #[arg(long)]
    client_bin: Option<PathBuf>,
    /// Extra arguments passed to every trainer (e.g. --trainer-args=--local-steps,20).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    trainer_args: Vec<String>,
    /// Extra `sparsync serve` flags for every variant's server, applied after the variant's own
    /// settings and recorded in results.json (e.g. --server-args=--max-batch,32,--rho-down,0.02).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    server_args: Vec<String>,
}

pub async fn run(a: ExperimentArgs) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let cfg = experiment::ExperimentConfig {
        policies: a.policies,
        sweep: a.staleness_weighting,
        weighting: a.weighting,
        clients: a.clients,
        slowdowns: a.slowdowns,
        partition: a.partition,
        target_accuracy: a.target_accuracy,
        repeat: a.repeat,
        seed: a.seed,
        max_seconds: a.max_seconds,
        out: a.out.clone(),
        client_bin: a.client_bin,
        data: a.data,
        eval_samples: Some(a.eval_samples),
        server: ServerConfig { model: a.model, engine: a.engine, ..ServerConfig::default() },
        trainer_args: a.trainer_args,
        server_args: a.server_args,
    };
    let results = experiment::run(&cfg, &command).await?;
    println!("{}", experiment::summary_table(&results.runs));
    println!(
        "files in {}: results.csv, results.json, summary.txt, accuracy_vs_time.png, accuracy_vs_bytes.png, staleness.png",
        a.out.display()
    );
    Ok(())
}
