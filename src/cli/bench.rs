//! `sparsync bench`: kernel benchmarks, the end-to-end server benchmark, and `all` (one report).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use sparsync::bench::{self, e2e, kernels, load::LoadSpec};
use sparsync::engine::EngineError;
use sparsync::engine::gpu::device::{self, DeviceOptions, GpuContext};

use super::loadgen::{self, LoadgenArgs};

#[derive(clap::Args)]
pub struct BenchArgs {
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

#[derive(Subcommand, Clone)]
enum BenchWhat {
    /// Weighted sparse aggregation: updates/s and GB/s against a device copy.
    Aggregate,
    /// Exact Top-k of the model delta: time against a device copy of the input.
    Topk,
    /// Device copies of 4 bytes × 2^s (--log2-sizes), in one buffer pair and in 64 MiB
    /// buffers: the bandwidth reference of the other benchmarks, and whether buffer size
    /// matters on this device.
    Copy,
    /// The whole server under load: simulated clients in a separate process push over
    /// loopback WebSockets; rates, latency, queue depth, where the time goes, and the
    /// fraction of raw loopback TCP throughput.
    E2e(E2eArgs),
    /// Kernels and e2e: one JSON report, a PNG plot and a text summary to paste into an issue.
    All(AllArgs),
    /// The load generator process of `bench e2e` (internal).
    #[command(hide = true)]
    Loadgen(LoadgenArgs),
}

#[derive(clap::Args, Clone)]
struct E2eArgs {
    /// Client counts of the clients sweep [default: 1,8,64,256,1000; quick: 4,16].
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Model size of the clients sweep, log2 [default: 20; quick: 16].
    #[arg(long)]
    log2_params: Option<u32>,
    /// Clients of the model-size sweep (sizes from --log2-sizes) [default: 64; quick: 8].
    #[arg(long)]
    size_clients: Option<usize>,
    /// nnz of each push as a fraction of the model.
    #[arg(long, default_value_t = LoadSpec::default().density)]
    density: f64,
    /// Pushes per second per client (0: closed loop with --window pushes outstanding).
    #[arg(long, default_value_t = LoadSpec::default().rate)]
    rate: f64,
    /// Most unanswered pushes per client.
    #[arg(long, default_value_t = LoadSpec::default().window)]
    window: usize,
    /// Seconds of pushing per configuration [default: 10; quick: 2].
    #[arg(long)]
    duration_s: Option<f64>,
    /// Aggregation engine of the servers.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// GPU aggregation mode of the servers: deterministic or fast.
    #[arg(long, default_value = "deterministic")]
    gpu_mode: String,
    /// Skip the raw loopback TCP baseline.
    #[arg(long)]
    no_raw: bool,
    /// A flag of `sparsync serve` for the servers, as one argument (repeatable), e.g.
    /// `--server-arg=--steps-in-flight=1` or `--server-arg=--broadcast-every=4`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Measure each configuration with these logs: none, file (the local WAL) and nats (a
    /// JetStream stream, R = 3 and fsync on every write, on a local 3-node cluster started from
    /// the nats-server on PATH), e.g. `--wal none,file,nats` [default: the server's own].
    #[arg(long, value_delimiter = ',')]
    wal: Vec<String>,
}

#[derive(clap::Args, Clone)]
struct AllArgs {
    /// Directory for bench.json, bench.png and summary.txt.
    #[arg(long, default_value = "runs/bench")]
    out: PathBuf,
    #[command(flatten)]
    e2e: E2eArgs,
}

/// Runs the benchmark `args` names; starts a tokio runtime only where one is needed.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what.clone() {
        BenchWhat::Loadgen(a) => super::runtime()?.block_on(loadgen::run(a)),
        BenchWhat::E2e(e) => e2e_only(&args, &e),
        what => kernels_and_all(&args, &what),
    }
}

/// `bench e2e`.
fn e2e_only(args: &BenchArgs, e: &E2eArgs) -> anyhow::Result<()> {
    let spec = e2e_spec(args, e)?;
    // Describe the adapter the servers will pick (dropped before they start theirs).
    let ctx = (spec.engine != "cpu").then(|| open_gpu(args).ok()).flatten();
    let env = bench::Environment::detect(ctx.as_deref());
    drop(ctx);
    println!("{}", env.summary());
    let report = super::runtime()?.block_on(run_e2e(&spec))?;
    println!("{}", e2e::table(&report.rows));
    let json = serde_json::json!({ "environment": env, "e2e": report });
    write_json(args, &json)
}

/// `bench aggregate`, `topk`, `copy` and `all`.
fn kernels_and_all(args: &BenchArgs, what: &BenchWhat) -> anyhow::Result<()> {
    let ctx = match open_gpu(args) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("no GPU adapter ({e}); measuring the CPU engine only");
            None
        }
    };
    let env = bench::Environment::detect(ctx.as_deref());
    println!("{}", env.summary());
    let report = match what {
        BenchWhat::Aggregate => {
            let rows = bench_aggregate(args, ctx.as_ref())?;
            println!("{}", bench::aggregate_table(&rows));
            serde_json::json!({ "environment": env, "aggregate": rows })
        }
        BenchWhat::Copy => {
            let Some(ctx) = ctx.as_ref() else { anyhow::bail!("bench copy needs a GPU adapter") };
            let sizes: Vec<u64> =
                log2_sizes(args, &[20, 24, 26, 28], &[16]).into_iter().map(|n| 4 * n as u64).collect();
            let rows = kernels::copy_sweep(ctx, &sizes, 64 << 20, args.reps)?;
            for r in &rows {
                println!(
                    "copy {:>12} bytes in buffers of {:>12}: {:9.3} ms {:8.1} GB/s ({})",
                    r.bytes,
                    r.piece_bytes,
                    r.time_s * 1e3,
                    r.gbps,
                    r.timing
                );
            }
            serde_json::json!({ "environment": env, "copy": rows })
        }
        BenchWhat::Topk => {
            let rows = bench_topk(args, ctx.as_ref())?;
            println!("{}", bench::topk_table(&rows));
            serde_json::json!({ "environment": env, "topk": rows })
        }
        BenchWhat::All(a) => {
            let agg = bench_aggregate(args, ctx.as_ref())?;
            let topk = bench_topk(args, ctx.as_ref())?;
            // The GPU context is dropped before the servers start theirs.
            drop(ctx);
            let spec = e2e_spec(args, &a.e2e)?;
            let e2e = super::runtime()?.block_on(run_e2e(&spec))?;
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let summary = bench::summary(&env, &command, &agg, &topk, &e2e);
            std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
            bench::plot_e2e(&a.out.join("bench.png"), &e2e.rows)?;
            std::fs::write(a.out.join("summary.txt"), &summary)?;
            let json = serde_json::json!({
                "environment": env, "command": command, "aggregate": agg, "topk": topk, "e2e": e2e,
            });
            super::write_json(&a.out.join("bench.json"), &json)?;
            println!("{summary}");
            println!("wrote {}/bench.json, bench.png, summary.txt", a.out.display());
            json
        }
        BenchWhat::E2e(_) | BenchWhat::Loadgen(_) => unreachable!("handled by `run`"),
    };
    write_json(args, &report)
}

fn open_gpu(args: &BenchArgs) -> Result<Arc<GpuContext>, EngineError> {
    device::open(&DeviceOptions { adapter: args.adapter.clone(), ..Default::default() })
}

/// Writes the report to `--json`, when given.
fn write_json(args: &BenchArgs, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        super::write_json(path, report)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `--log2-sizes` as sizes, else `quick` with `--quick`, else `default`.
fn log2_sizes(args: &BenchArgs, default: &[u32], quick: &[u32]) -> Vec<usize> {
    let l = if !args.log2_sizes.is_empty() {
        args.log2_sizes.clone()
    } else if args.quick {
        quick.to_vec()
    } else {
        default.to_vec()
    };
    l.into_iter().map(|p| 1usize << p).collect()
}

/// Repetitions per measurement: at most 2 with `--quick`.
fn reps(args: &BenchArgs) -> usize {
    if args.quick { args.reps.min(2) } else { args.reps }
}

/// Runs `f` with a spinner that shows the progress messages `f` gives it.
fn with_spinner<T>(f: impl FnOnce(&dyn Fn(&str)) -> Result<T, EngineError>) -> anyhow::Result<T> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = f(&|m: &str| bar.set_message(m.to_string()));
    bar.finish_and_clear();
    result.map_err(anyhow::Error::from)
}

fn bench_aggregate(
    args: &BenchArgs,
    ctx: Option<&Arc<GpuContext>>,
) -> anyhow::Result<Vec<kernels::AggregateRow>> {
    let spec = kernels::AggregateSpec {
        sizes: log2_sizes(args, &[20, 24], &[16]),
        batches: if args.quick { vec![1, 16] } else { vec![1, 16, 64] },
        density: 0.01,
        reps: reps(args),
        cpu: !args.no_cpu,
    };
    with_spinner(|progress| kernels::aggregate(ctx, &spec, progress))
}

fn bench_topk(args: &BenchArgs, ctx: Option<&Arc<GpuContext>>) -> anyhow::Result<Vec<kernels::TopkRow>> {
    let spec = kernels::TopkSpec {
        sizes: log2_sizes(args, &[20, 24, 26], &[16, 18]),
        densities: vec![0.001, 0.01],
        reps: reps(args),
        cpu: !args.no_cpu,
    };
    with_spinner(|progress| kernels::topk(ctx, &spec, progress))
}

fn e2e_spec(args: &BenchArgs, e: &E2eArgs) -> anyhow::Result<e2e::E2eSpec> {
    let q = args.quick;
    let clients = if !e.clients.is_empty() {
        e.clients.clone()
    } else if q {
        vec![4, 16]
    } else {
        vec![1, 8, 64, 256, 1000]
    };
    if clients.contains(&0) {
        anyhow::bail!("--clients: each count must be at least 1");
    }
    if !(e.density > 0.0 && e.density <= 1.0) {
        anyhow::bail!("--density must be in (0, 1], got {}", e.density);
    }
    Ok(e2e::E2eSpec {
        exe: std::env::current_exe().context("locating the sparsync executable")?,
        engine: e.engine.clone(),
        gpu_mode: e.gpu_mode.clone(),
        clients,
        params: 1usize << e.log2_params.unwrap_or(if q { 16 } else { 20 }),
        sizes: log2_sizes(args, &[16, 18, 20, 22], &[14, 16]),
        size_clients: e.size_clients.unwrap_or(if q { 8 } else { 64 }),
        density: e.density,
        rate: e.rate,
        window: e.window.max(1),
        duration_s: e.duration_s.unwrap_or(if q { 2.0 } else { 10.0 }),
        raw_baseline: !e.no_raw,
        adapter: args.adapter.clone(),
        server_args: e.server_args.clone(),
        wal: e.wal.clone(),
    })
}

/// A progress bar over the seconds an e2e run pushes.
struct Bar(indicatif::ProgressBar);

impl e2e::Progress for Bar {
    fn config(&self, label: &str) {
        self.0.set_message(label.to_string());
    }
    fn advance(&self, seconds: f64) {
        self.0.inc((seconds * 10.0).round().max(0.0) as u64);
    }
}

async fn run_e2e(spec: &e2e::E2eSpec) -> anyhow::Result<e2e::E2eReport> {
    let total = (e2e::planned_seconds(spec) * 10.0) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {percent:>3}% ~{eta} left  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let bar = Bar(bar);
    let report = e2e::run(spec, &bar).await;
    bar.0.finish_and_clear();
    report
}
