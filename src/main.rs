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
    /// List the GPU adapters wgpu finds and describe the one `--engine gpu` opens (name,
    /// backend, driver, limits, features).
    Adapters(AdaptersArgs),
}

#[derive(clap::Args)]
struct AdaptersArgs {
    /// Open the adapter whose name contains this text (as `serve --adapter`).
    #[arg(long)]
    adapter: Option<String>,
    /// Fail (exit 1) when the adapter opened is a software one (a CPU emulating a GPU, such
    /// as lavapipe): a measurement on it says nothing about a GPU.
    #[arg(long)]
    require_hardware: bool,
    /// Write the description as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
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
    #[arg(long, default_value_t = 0.01)]
    density: f64,
    /// Pushes per second per client (0: closed loop with --window pushes outstanding).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Most unanswered pushes per client.
    #[arg(long, default_value_t = 2)]
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
}

#[derive(clap::Args, Clone)]
struct AllArgs {
    /// Directory for bench.json, bench.png and summary.txt.
    #[arg(long, default_value = "runs/bench")]
    out: PathBuf,
    #[command(flatten)]
    e2e: E2eArgs,
}

#[derive(clap::Args, Clone)]
struct LoadgenArgs {
    #[arg(long, default_value = "")]
    url: String,
    #[arg(long, default_value = "flat-65536")]
    model: String,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 0.01)]
    density: f64,
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 2)]
    window: usize,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, env = "SPARSYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Write the report here (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Raw TCP baseline: blast --frame-bytes writes at this address instead.
    #[arg(long)]
    raw: Option<String>,
    #[arg(long, default_value_t = 65536)]
    frame_bytes: usize,
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
    use sparsync::bench;
    let rt = || tokio::runtime::Runtime::new().context("starting the tokio runtime");
    match args.what.clone() {
        BenchWhat::Loadgen(a) => return rt()?.block_on(loadgen(a)),
        BenchWhat::E2e(e) => {
            let spec = e2e_spec(&args, &e)?;
            // Describe the adapter the servers will pick (dropped before they start theirs).
            let ctx = (spec.engine != "cpu")
                .then(|| {
                    sparsync::engine::gpu::device::open(&sparsync::engine::gpu::device::DeviceOptions {
                        adapter: args.adapter.clone(),
                        ..Default::default()
                    })
                    .ok()
                })
                .flatten();
            let env = bench::Environment::detect(ctx.as_deref());
            drop(ctx);
            println!("{}", env.summary());
            let report = rt()?.block_on(run_e2e(&spec))?;
            println!("{}", bench::e2e::table(&report.rows));
            let json = serde_json::json!({ "environment": env, "e2e": report });
            return write_json(&args, &json);
        }
        _ => {}
    }
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
    let report = match &args.what {
        BenchWhat::Aggregate => {
            let rows = bench_aggregate(&args, ctx.as_ref())?;
            println!("{}", bench::aggregate_table(&rows));
            serde_json::json!({ "environment": env, "aggregate": rows })
        }
        BenchWhat::Copy => {
            let Some(ctx) = ctx.as_ref() else { anyhow::bail!("bench copy needs a GPU adapter") };
            let sizes: Vec<u64> =
                log2_sizes(&args, &[20, 24, 26, 28], &[16]).into_iter().map(|n| 4 * n as u64).collect();
            let rows = sparsync::bench::kernels::copy_sweep(ctx, &sizes, 64 << 20, args.reps)?;
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
            let rows = bench_topk(&args, ctx.as_ref())?;
            println!("{}", bench::topk_table(&rows));
            serde_json::json!({ "environment": env, "topk": rows })
        }
        BenchWhat::All(a) => {
            let agg = bench_aggregate(&args, ctx.as_ref())?;
            let topk = bench_topk(&args, ctx.as_ref())?;
            // The GPU context is dropped before the servers start theirs.
            drop(ctx);
            let spec = e2e_spec(&args, &a.e2e)?;
            let e2e = rt()?.block_on(run_e2e(&spec))?;
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let summary = bench::summary(&env, &command, &agg, &topk, &e2e);
            std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
            bench::plot_e2e(&a.out.join("bench.png"), &e2e.rows)?;
            std::fs::write(a.out.join("summary.txt"), &summary)?;
            let json = serde_json::json!({
                "environment": env, "command": command, "aggregate": agg, "topk": topk, "e2e": e2e,
            });
            std::fs::write(a.out.join("bench.json"), serde_json::to_string_pretty(&json)?)?;
            println!("{summary}");
            println!("wrote {}/bench.json, bench.png, summary.txt", a.out.display());
            json
        }
        BenchWhat::E2e(_) | BenchWhat::Loadgen(_) => unreachable!("handled above"),
    };
    write_json(&args, &report)
}

fn write_json(args: &BenchArgs, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

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

fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn bench_aggregate(
    args: &BenchArgs,
    ctx: Option<&std::sync::Arc<sparsync::engine::gpu::device::GpuContext>>,
) -> anyhow::Result<Vec<sparsync::bench::kernels::AggregateRow>> {
    use sparsync::bench::kernels;
    let bar = spinner();
    let spec = kernels::AggregateSpec {
        sizes: log2_sizes(args, &[20, 24], &[16]),
        batches: if args.quick { vec![1, 16] } else { vec![1, 16, 64] },
        density: 0.01,
        reps: if args.quick { args.reps.min(2) } else { args.reps },
        cpu: !args.no_cpu,
    };
    let rows = kernels::aggregate(ctx, &spec, |m: &str| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    Ok(rows)
}

fn bench_topk(
    args: &BenchArgs,
    ctx: Option<&std::sync::Arc<sparsync::engine::gpu::device::GpuContext>>,
) -> anyhow::Result<Vec<sparsync::bench::kernels::TopkRow>> {
    use sparsync::bench::kernels;
    let bar = spinner();
    let spec = kernels::TopkSpec {
        sizes: log2_sizes(args, &[20, 24, 26], &[16, 18]),
        densities: vec![0.001, 0.01],
        reps: if args.quick { args.reps.min(2) } else { args.reps },
        cpu: !args.no_cpu,
    };
    let rows = kernels::topk(ctx, &spec, |m: &str| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    Ok(rows)
}

fn e2e_spec(args: &BenchArgs, e: &E2eArgs) -> anyhow::Result<sparsync::bench::e2e::E2eSpec> {
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
    Ok(sparsync::bench::e2e::E2eSpec {
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
    })
}

/// A progress bar over the seconds an e2e run pushes.
struct Bar(indicatif::ProgressBar);

impl sparsync::bench::e2e::Progress for Bar {
    fn config(&self, label: &str) {
        self.0.set_message(label.to_string());
    }
    fn advance(&self, seconds: f64) {
        self.0.inc((seconds * 10.0).round().max(0.0) as u64);
    }
}

async fn run_e2e(spec: &sparsync::bench::e2e::E2eSpec) -> anyhow::Result<sparsync::bench::e2e::E2eReport> {
    let total = (sparsync::bench::e2e::planned_seconds(spec) * 10.0) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {percent:>3}% ~{eta} left  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let bar = Bar(bar);
    let report = sparsync::bench::e2e::run(spec, &bar).await;
    bar.0.finish_and_clear();
    report
}

/// `sparsync bench loadgen`: prints `pushing S` and `draining` lines, writes the report.
async fn loadgen(a: LoadgenArgs) -> anyhow::Result<()> {
    use sparsync::bench::load;
    use std::io::Write;
    if let Some(addr) = &a.raw {
        let bytes =
            load::raw_blast(addr, a.clients, a.frame_bytes, a.duration).await.map_err(anyhow::Error::msg)?;
        println!("{bytes}");
        return Ok(());
    }
    let spec = load::LoadSpec {
        url: a.url,
        token: a.token,
        model: a.model,
        clients: a.clients,
        density: a.density,
        rate: a.rate,
        window: a.window,
        duration_s: a.duration,
        ..Default::default()
    };
    let report = load::run(&spec, |p| {
        let mut out = std::io::stdout().lock();
        let _ = match p {
            load::Phase::Pushing(s) => writeln!(out, "pushing {s}"),
            load::Phase::Draining => writeln!(out, "draining"),
        };
        let _ = out.flush();
    })
    .await;
    let json = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
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
        target_accuracy: a.target_accuracy,
        plateau: (a.plateau_s > 0.0).then(|| std::time::Duration::from_secs_f64(a.plateau_s)),
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

/// `sparsync adapters`: what wgpu sees, and the device `--engine gpu` would open.
fn adapters(args: AdaptersArgs) -> anyhow::Result<()> {
    use sparsync::engine::gpu::device;
    let all: Vec<serde_json::Value> = device::list_adapters()
        .iter()
        .map(|a| {
            println!(
                "adapter: {} | {:?} | {:?} | driver {} {}",
                a.name, a.backend, a.device_type, a.driver, a.driver_info
            );
            serde_json::json!({
                "name": a.name, "backend": format!("{:?}", a.backend),
                "device_type": format!("{:?}", a.device_type), "driver": a.driver,
                "driver_info": a.driver_info, "vendor": a.vendor, "device": a.device,
            })
        })
        .collect();
    let opened = device::open(&device::DeviceOptions { adapter: args.adapter.clone(), ..Default::default() });
    let report = match &opened {
        Ok(ctx) => {
            let i = &ctx.info;
            println!(
                "opened: {} | {:?} | {:?} | driver {} {} | f16 {} | timestamps {}",
                i.name, i.backend, i.device_type, i.driver, i.driver_info, ctx.f16, ctx.timestamps
            );
            println!(
                "limits: max_buffer_size {} | max_storage_buffer_binding_size {} | max_compute_workgroups_per_dimension {} | max_compute_workgroup_storage_size {}",
                ctx.limits.max_buffer_size,
                ctx.limits.max_storage_buffer_binding_size,
                ctx.limits.max_compute_workgroups_per_dimension,
                ctx.limits.max_compute_workgroup_storage_size
            );
            serde_json::json!({
                "adapters": all,
                "opened": {
                    "name": i.name, "backend": format!("{:?}", i.backend),
                    "device_type": format!("{:?}", i.device_type), "driver": i.driver,
                    "driver_info": i.driver_info, "shader_f16": ctx.f16, "timestamps": ctx.timestamps,
                    "features": format!("{:?}", ctx.device.features()),
                    "limits": format!("{:?}", ctx.limits),
                },
            })
        }
        Err(e) => {
            println!("opened: none ({e})");
            serde_json::json!({ "adapters": all, "opened": null, "error": e.to_string() })
        }
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let ctx = opened.context("no GPU adapter could be opened")?;
    if args.require_hardware && ctx.info.device_type == wgpu::DeviceType::Cpu {
        anyhow::bail!(
            "--require-hardware: the adapter opened, {} ({:?}), is a software adapter on the CPU",
            ctx.info.name,
            ctx.info.backend
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let cli = match cli.command {
        Command::Bench(args) => return bench(args),
        Command::Adapters(args) => return adapters(args),
        command => Cli { command, ..cli },
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Bench(_) | Command::Adapters(_) => unreachable!("handled before the runtime starts"),
            Command::Demo(args) => demo(args).await,
            Command::Experiment(args) => experiment(args).await,
        }
    })
}
