//! The `sparsync` command: parses flags, sets up logging, and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sparsync::config::{ServeFlags, ServerConfig};

#[derive(Parser)]
#[command(name = "sparsync", version, about = "GPU-accelerated parameter server for heterogeneous training")]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the parameter server.
    Serve(Box<ServeArgs>),
    /// Measure aggregation and Top-k throughput.
    Bench(BenchArgs),
    /// A server and heterogeneous native clients training mlp on Fashion-MNIST, with live
    /// progress (the first thing to run).
    Demo(DemoArgs),
    /// Compare synchronization policies (and staleness weightings) on the same clients and data.
    Experiment(ExperimentArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Slowdown of each trainer (one trainer per value).
    #[arg(long, value_delimiter = ',', default_value = "1,1,2,2,4,4,8,8")]
    slowdowns: Vec<f64>,
    /// Synchronization policy.
    #[arg(long, value_enum, default_value = "asp")]
    policy: sparsync::config::PolicyKind,
    /// Staleness weighting.
    #[arg(long, value_enum, default_value = "polynomial")]
    weighting: sparsync::policy::staleness::WeightingKind,
    /// Model family.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Aggregation engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: sparsync::config::EngineChoice,
    /// Address of the server (and its dashboard).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_s: f64,
    /// Stop once the evaluator reports this test accuracy.
    #[arg(long, default_value_t = 0.85)]
    target_accuracy: f64,
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

#[derive(clap::Args)]
struct ExperimentArgs {
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
    staleness_weighting: Vec<sparsync::policy::staleness::WeightingKind>,
    /// Staleness weighting of the policy comparison (Hermes always weights by loss).
    #[arg(long, value_enum, default_value = "polynomial")]
    weighting: sparsync::policy::staleness::WeightingKind,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 90.0)]
    max_seconds: f64,
    /// Model family.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Aggregation engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: sparsync::config::EngineChoice,
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
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
    /// Smaller sizes and fewer repetitions: a smoke run.
    #[arg(long, global = true)]
    quick: bool,
    /// Write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, global = true, default_value_t = 5)]
    reps: usize,
    /// GPU adapter whose name contains this text.
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Skip the CPU engine's rows.
    #[arg(long, global = true)]
    no_cpu: bool,
    /// Model sizes as powers of two (e.g. 20,24).
    #[arg(long, global = true, value_delimiter = ',')]
    log2_sizes: Vec<u32>,
}

#[derive(Subcommand, Clone, Copy, PartialEq)]
enum BenchWhat {
    /// Weighted sparse aggregation: updates/s and GB/s against a device copy.
    Aggregate,
    /// Exact Top-k of the model delta: time against a device copy of the input.
    Topk,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file of settings (keys are the flag names with underscores); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Once serving, write the address (http://HOST:PORT) to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(flatten)]
    flags: ServeFlags,
}

fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(sparsync::log_filter(filter))
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    cfg.apply(args.flags);
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
    let handle = sparsync::server::start(cfg, listener).await?;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{scheme}://{}", handle.addr))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down: applying accepted updates");
    let state = handle.shutdown("server shutting down").await?;
    tracing::info!(version = state.version, "stopped");
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use sparsync::bench::{self, kernels};
    let ctx = match sparsync::engine::gpu::device::open(&sparsync::engine::gpu::device::DeviceOptions {
        adapter: args.adapter.clone(),
        ..Default::default()
    }) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("no GPU adapter ({e}); measuring the CPU engine only");
            None
        }
    };
    let env = bench::Environment::detect(ctx.as_deref());
    println!("{}", env.summary());
    let reps = if args.quick { args.reps.min(2) } else { args.reps };
    let sizes = |default: &[u32], quick: &[u32]| -> Vec<usize> {
        let l = if !args.log2_sizes.is_empty() {
            args.log2_sizes.clone()
        } else if args.quick {
            quick.to_vec()
        } else {
            default.to_vec()
        };
        l.into_iter().map(|p| 1usize << p).collect()
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let progress = |msg: &str| bar.set_message(msg.to_string());
    let report = match args.what {
        BenchWhat::Aggregate => {
            let spec = kernels::AggregateSpec {
                sizes: sizes(&[20, 24], &[16]),
                batches: if args.quick { vec![1, 16] } else { vec![1, 16, 64] },
                density: 0.01,
                reps,
                cpu: !args.no_cpu,
            };
            let rows = kernels::aggregate(ctx.as_ref(), &spec, progress)?;
            bar.finish_and_clear();
            println!("{}", bench::aggregate_table(&rows));
            serde_json::json!({ "environment": env, "aggregate": rows })
        }
        BenchWhat::Topk => {
            let spec = kernels::TopkSpec {
                sizes: sizes(&[20, 24, 26], &[16, 18]),
                densities: vec![0.001, 0.01],
                reps,
                cpu: !args.no_cpu,
            };
            let rows = kernels::topk(ctx.as_ref(), &spec, progress)?;
            bar.finish_and_clear();
            println!("{}", bench::topk_table(&rows));
            serde_json::json!({ "environment": env, "topk": rows })
        }
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    use sparsync::orchestrate::demo;
    let server = ServerConfig {
        listen: a.listen,
        model: a.model,
        engine: a.engine,
        policy: a.policy,
        weighting: a.weighting,
        ..ServerConfig::default()
    };
    let cfg = demo::DemoConfig {
        server,
        slowdowns: a.slowdowns,
        duration: std::time::Duration::from_secs_f64(a.duration_s),
        target_accuracy: Some(a.target_accuracy),
        out: a.out,
        client_bin: a.client_bin,
        data: a.data,
        eval_samples: Some(a.eval_samples),
    };
    let summary = demo::run(cfg).await?;
    print!("{}", demo::describe(&summary));
    Ok(())
}

async fn experiment(a: ExperimentArgs) -> anyhow::Result<()> {
    use sparsync::orchestrate::experiment;
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
    };
    let results = experiment::run(&cfg, &command).await?;
    println!("{}", experiment::summary_table(&results.runs));
    println!(
        "files in {}: results.csv, results.json, summary.txt, accuracy_vs_time.png, accuracy_vs_bytes.png, staleness.png",
        a.out.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log);
    if let Command::Bench(args) = cli.command {
        return bench(args);
    }
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Bench(_) => unreachable!("handled before the runtime starts"),
            Command::Demo(args) => demo(args).await,
            Command::Experiment(args) => experiment(args).await,
        }
    })
}
