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
    #[command(flatten)]
    flags: ServeFlags,
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
    let state = sparsync::server::run(cfg, listener, shutdown_signal()).await?;
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
        }
    })
}
