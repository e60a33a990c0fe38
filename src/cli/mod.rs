//! The `sparsync` command line: one module per subcommand, each holding its flags and its
//! handler; this module holds the command list and what they share.

mod adapters;
mod bench;
mod demo;
mod experiment;
mod loadgen;
mod nats_init;
mod serve;

use std::path::Path;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sparsync", version, about = "GPU-accelerated parameter server for heterogeneous training")]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the parameter server.
    Serve(Box<serve::ServeArgs>),
    /// Measure aggregation and Top-k throughput.
    Bench(bench::BenchArgs),
    /// A server and heterogeneous native clients training mlp on Fashion-MNIST, with live
    /// progress (the first thing to run).
    Demo(demo::DemoArgs),
    /// Compare synchronization policies (and staleness weightings) on the same clients and data.
    Experiment(experiment::ExperimentArgs),
    /// List the GPU adapters wgpu finds and describe the one `--engine gpu` opens (name,
    /// backend, driver, limits, features).
    Adapters(adapters::AdaptersArgs),
    /// Make the JetStream stream, object store and lease bucket that `serve --wal nats://…`
    /// needs (on a running NATS cluster).
    NatsInit(nats_init::NatsInitArgs),
}

impl Command {
    /// Runs the subcommand (on a tokio runtime where it needs one).
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Serve(args) => runtime()?.block_on(serve::run(*args)),
            Command::Bench(args) => bench::run(args),
            Command::Demo(args) => runtime()?.block_on(demo::run(args)),
            Command::Experiment(args) => runtime()?.block_on(experiment::run(args)),
            Command::Adapters(args) => adapters::run(args),
            Command::NatsInit(args) => runtime()?.block_on(nats_init::run(args)),
        }
    }
}

/// Logs to stderr, filtered by `filter` (or RUST_LOG).
pub fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(sparsync::log_filter(filter))
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the tokio runtime")
}

/// Writes `value` as pretty JSON to `path`.
fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Resolves on SIGINT or SIGTERM.
/// Resolves at SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives right after the server says it is ready (its
/// ready file) is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                }
                (int, term) => {
                    let e = int.err().or(term.err()).map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(error = %e, "signal handlers unavailable; stopping on Ctrl-C only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn loadgen_flags_parse() {
        let args = "sparsync bench loadgen --url ws://127.0.0.1:1/ws --clients 3 --duration 1.5 --window 4";
        let cli = Cli::parse_from(args.split(' '));
        assert!(matches!(cli.command, Command::Bench(_)));
    }
}
