//! `sparsync experiment`: synchronization policies compared on the same clients and data.

use std::path::PathBuf;

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::orchestrate::experiment;
use sparsync::orchestrate::scenario::{self, Scenario};
use sparsync::policy::staleness::WeightingKind;

#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// A research claim's own regime: adsp (heterogeneity sweep), nbsync (slow WAN links),
    /// hermes (time and bytes), staleness (several models), or all (each, into OUT/NAME/).
    /// It sets every option below that the command line leaves unset.
    #[arg(long, value_parser = ["adsp", "nbsync", "hermes", "staleness", "all"])]
    scenario: Option<String>,
    /// Policies to compare (nbsync = BSP server with pipelining clients)
    /// [default: bsp,asp,ssp,fedbuff,adsp,hermes,nbsync].
    #[arg(long, value_delimiter = ',')]
    policies: Option<Vec<String>>,
    /// Trainers per run [default: 8].
    #[arg(long)]
    clients: Option<usize>,
    /// Slowdown of each trainer, cycled over the trainers [default: 1,1,2,2,4,4,8,8].
    #[arg(long, value_delimiter = ',')]
    slowdowns: Option<Vec<f64>>,
    /// Time and bytes are measured to this test accuracy [default: 0.86].
    #[arg(long)]
    target_accuracy: Option<f64>,
    /// Runs per variant; medians are reported [default: 1; 3 with --scenario].
    #[arg(long)]
    repeat: Option<usize>,
    /// Seed of the data split, client seeds and model initialisation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for results.csv, results.json, plots and client logs.
    #[arg(long, default_value = "runs/experiment")]
    out: PathBuf,
    /// Staleness study: also run ASP with each of these weightings.
    #[arg(long, value_delimiter = ',', value_enum)]
    staleness_weighting: Option<Vec<WeightingKind>>,
    /// Staleness weighting of the policy comparison (Hermes always weights by loss)
    /// [default: polynomial].
    #[arg(long, value_enum)]
    weighting: Option<WeightingKind>,
    /// Give up on a run after this many seconds [default: 90].
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Model family (a scenario's model regimes override it) [default: mlp].
    #[arg(long)]
    model: Option<String>,
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

impl ExperimentArgs {
    /// The experiment's settings: the command line's, then the scenario's, then the defaults.
    fn config(&self, sc: Option<&Scenario>, out: PathBuf) -> experiment::ExperimentConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let model = self.model.clone().or(sc.map(|s| s.model.to_string())).unwrap_or_else(|| "mlp".into());
        experiment::ExperimentConfig {
            policies: self
                .policies
                .clone()
                .or(sc.map(|s| s.policies.clone()))
                .unwrap_or_else(|| strings(&["bsp", "asp", "ssp", "fedbuff", "adsp", "hermes", "nbsync"])),
            sweep: self.staleness_weighting.clone().or(sc.map(|s| s.sweep.clone())).unwrap_or_default(),
            weighting: self.weighting.or(sc.map(|s| s.weighting)).unwrap_or(WeightingKind::Polynomial),
            clients: self.clients.or(sc.map(|s| s.clients)).unwrap_or(8),
            slowdowns: self
                .slowdowns
                .clone()
                .or(sc.map(|s| s.slowdowns.clone()))
                .unwrap_or_else(|| vec![1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0]),
            partition: self.partition.clone(),
            target_accuracy: self.target_accuracy.or(sc.map(|s| s.target_accuracy)).unwrap_or(0.86),
            repeat: self.repeat.unwrap_or(if sc.is_some() { 3 } else { 1 }),
            seed: self.seed,
            max_seconds: self.max_seconds.or(sc.map(|s| s.max_seconds)).unwrap_or(90.0),
            out,
            client_bin: self.client_bin.clone(),
            data: self.data.clone(),
            eval_samples: Some(self.eval_samples),
            server: ServerConfig { model, engine: self.engine, ..ServerConfig::default() },
            trainer_args: self.trainer_args.clone(),
            server_args: sc
                .map(|s| s.server_args.clone())
                .unwrap_or_default()
                .into_iter()
                .chain(self.server_args.clone())
                .collect(),
            regimes: sc.map(|s| s.regimes.clone()).unwrap_or_default(),
            scenario: sc.map(|s| s.name.to_string()),
            x_label: sc.map(|s| s.x_label.to_string()).unwrap_or_default(),
        }
    }
}

pub async fn run(a: ExperimentArgs) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let names: Vec<&str> = match a.scenario.as_deref() {
        Some("all") => scenario::NAMES.to_vec(),
        Some(n) => vec![n],
        None => vec![],
    };
    if names.is_empty() {
        let cfg = a.config(None, a.out.clone());
        let results = experiment::run(&cfg, &command).await?;
        println!("{}", experiment::summary_table(&results.runs));
        println!(
            "files in {}: results.csv, results.json, summary.txt, accuracy_vs_time.png, accuracy_vs_bytes.png, staleness.png",
            a.out.display()
        );
        return Ok(());
    }
    let several = names.len() > 1;
    for (i, name) in names.iter().enumerate() {
        let sc = scenario::scenario(name).ok_or_else(|| anyhow::anyhow!("unknown scenario {name:?}"))?;
        let out = if several { a.out.join(name) } else { a.out.clone() };
        eprintln!("scenario {name} ({}/{}): {}", i + 1, names.len(), sc.claim);
        let cfg = a.config(Some(&sc), out.clone());
        let results = experiment::run(&cfg, &command).await?;
        println!("scenario {name}: {}\n{}", sc.claim, experiment::summary_table(&results.runs));
        println!("files in {}", out.display());
    }
    Ok(())
}
