//! `sparsync experiment`: the same clients, data split and seeds under each synchronization
//! policy (and, for the staleness study, each weighting on ASP); time and bytes to a target
//! accuracy, final accuracy, staleness, commits per client. Writes results.csv, results.json
//! and PNG plots; prints medians over repeats.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::scenario::Regime;
use super::{ClientSpec, Launcher, OrchestrateError, io};
use crate::config::{PolicyKind, ServerConfig};
use crate::policy::staleness::WeightingKind;
use crate::server::record::Event;

/// Settings of an experiment.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// Among bsp, asp, ssp, fedbuff, adsp, hermes, nbsync.
    pub policies: Vec<String>,
    /// Staleness study: ASP once per weighting (none: no study).
    pub sweep: Vec<WeightingKind>,
    /// The weighting of the policy comparison's runs (Hermes uses `loss`).
    pub weighting: WeightingKind,
    pub clients: usize,
    /// Slowdown of each client, cycled when there are more clients than values.
    pub slowdowns: Vec<f64>,
    pub partition: String,
    pub target_accuracy: f64,
    pub repeat: usize,
    pub seed: u64,
    /// Stop a run after this many seconds even when the target is not reached.
    pub max_seconds: f64,
    pub out: PathBuf,
    pub client_bin: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub eval_samples: Option<usize>,
    /// Base server settings (model, engine, densities…); the policy's own are set per run.
    pub server: ServerConfig,
    /// Extra arguments for every trainer (e.g. --local-steps).
    pub trainer_args: Vec<String>,
    /// Extra `sparsync serve` flags for every variant's server (e.g. `--max-batch 32`),
    /// applied after the variant's own settings; `--policy` is refused (use `policies`).
    pub server_args: Vec<String>,
    /// The regimes every variant runs in (empty: one, with the settings above).
    pub regimes: Vec<Regime>,
    /// The scenario these settings come from, recorded in the results.
    pub scenario: Option<String>,
    /// Label of the regimes' swept quantity, for time_to_target.png.
    pub x_label: String,
}

/// A policy's decision over time: a Directive the server sent a trainer (ADSP's interval and
/// C, Hermes's data allocation), its fields inline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    /// Seconds since the first trainer joined.
    pub t: f64,
    pub client: String,
    #[serde(flatten)]
    pub directive: crate::protocol::message::Directive,
}

/// Decisions kept per run (the first ones: they show the policy settling).
pub const MAX_DECISIONS: usize = 400;

/// One point of a run's curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Seconds since the first trainer joined.
    pub t: f64,
    pub version: u64,
    pub accuracy: f64,
    /// The evaluator's test loss.
    #[serde(default)]
    pub loss: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// One run of one variant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    /// e.g. "asp", "nbsync", "asp-hinge".
    pub variant: String,
    pub policy: String,
    pub weighting: String,
    pub mode: String,
    pub repeat: usize,
    pub seed: u64,
    pub reached: bool,
    pub time_to_target_s: Option<f64>,
    pub bytes_up_to_target: Option<u64>,
    pub bytes_down_to_target: Option<u64>,
    pub final_accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    pub duration_s: f64,
    pub versions: u64,
    pub accepted: u64,
    /// Aggregated updates per staleness 0..=20; the last bin holds 20 and more.
    pub staleness_histogram: Vec<u64>,
    pub mean_staleness: f64,
    /// Aggregated pushes per client id.
    pub commits: BTreeMap<String, u64>,
    pub curve: Vec<Point>,
    /// Every setting of this run's server (what `sparsync serve` would take), so a run can be
    /// read and repeated without the command line.
    #[serde(default)]
    pub server: serde_json::Value,
    /// The extra arguments every trainer of this run got.
    #[serde(default)]
    pub trainer_args: Vec<String>,
    /// The regime's name (empty: the experiment had one) and swept value.
    #[serde(default)]
    pub regime: String,
    #[serde(default)]
    pub regime_x: f64,
    /// The trainers' slowdowns, in client order.
    #[serde(default)]
    pub slowdowns: Vec<f64>,
    /// Updates aggregated up to the evaluation that reached the target (Dai et al.'s measure).
    #[serde(default)]
    pub updates_to_target: Option<u64>,
    /// Pushes accepted per client id (Hermes: the ones its gate let through).
    #[serde(default)]
    pub pushes: BTreeMap<String, u64>,
    /// Rounds a client's gate held back (Hermes's Skip reports) per client id.
    #[serde(default)]
    pub skips: BTreeMap<String, u64>,
    /// The policy's directives over time (at most MAX_DECISIONS, the first ones).
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// The policy's own state at the end of the run (ADSP: C, scores r(C), Γ and T_min).
    #[serde(default)]
    pub policy_state: serde_json::Value,
}

/// What `results.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// The scenario run (none: settings from the command line only).
    #[serde(default)]
    pub scenario: Option<String>,
    /// Training images the trainers shared (60,000: the full Fashion-MNIST).
    #[serde(default)]
    pub train_images: usize,
    pub target_accuracy: f64,
    pub clients: usize,
    pub slowdowns: Vec<f64>,
    pub repeat: usize,
    pub seed: u64,
    pub environment: crate::bench::Environment,
    pub command: String,
    pub runs: Vec<RunResult>,
}

/// Bins of the staleness histogram in results (0..=20, last bin 20+).
pub const STALENESS_BINS: usize = 21;

#[derive(Clone)]
struct Variant {
    name: String,
    server: ServerConfig,
    mode: Option<&'static str>,
    regime: Regime,
}

/// `--server-args`, parsed as `sparsync serve` flags.
#[derive(clap::Parser)]
#[command(no_binary_name = true, args_override_self = true)]
struct ServerArgs {
    #[command(flatten)]
    flags: crate::config::ServeFlags,
}

fn server_flags(args: &[String]) -> Result<crate::config::ServeFlags, OrchestrateError> {
    use clap::Parser;
    let parsed = ServerArgs::try_parse_from(args)
        .map_err(|e| OrchestrateError::Invalid(format!("--server-args: {}", e.render())))?;
    if parsed.flags.policy.is_some() {
        return Err(OrchestrateError::Invalid(
            "--server-args: --policy is set per variant; choose the variants with --policies".into(),
        ));
    }
    Ok(parsed.flags)
}

fn variants(cfg: &ExperimentConfig) -> Result<Vec<Variant>, OrchestrateError> {
    let flags = server_flags(&cfg.server_args)?;
    let regimes = if cfg.regimes.is_empty() { vec![Regime::default()] } else { cfg.regimes.clone() };
    let base = variants_with_defaults(cfg)?;
    let mut out = Vec::new();
    for regime in regimes {
        for mut v in base.iter().cloned() {
            if let Some(m) = &regime.model {
                v.server.model = m.clone();
            }
            if !regime.name.is_empty() {
                v.name = format!("{}@{}", v.name, regime.name);
            }
            v.server.apply(flags.clone());
            v.server.validate().map_err(|e| OrchestrateError::Invalid(format!("--server-args: {e}")))?;
            v.regime = regime.clone();
            out.push(v);
        }
    }
    Ok(out)
}

fn unknown_policy(name: &str) -> OrchestrateError {
    let names: Vec<&str> = PolicyKind::ALL.iter().map(|k| k.name()).collect();
    OrchestrateError::Invalid(format!("unknown policy {name:?} ({}, nbsync)", names.join(", ")))
}

/// Each variant with the settings that scale its policy to a short run.
fn variants_with_defaults(cfg: &ExperimentConfig) -> Result<Vec<Variant>, OrchestrateError> {
    let mut out = Vec::new();
    let base = || ServerConfig { weighting: cfg.weighting, ..cfg.server.clone() };
    for p in &cfg.policies {
        // nbsync: a BSP server with pipelining clients.
        let (policy, mode) = match p.as_str() {
            "nbsync" => (PolicyKind::Bsp, Some("nbsync")),
            name => (name.parse::<PolicyKind>().map_err(|_| unknown_policy(name))?, None),
        };
        let mut server = ServerConfig { policy, ..base() };
        if mode == Some("nbsync") {
            // The authors' server adds update / NumWorkers: no staleness factor (every NBSync
            // push lands one round late, s = 1, and α(1) would damp every round) and no sample
            // weighting (docs/seeds.md N1, N2).
            server.weighting = WeightingKind::Constant;
            server.sample_weighting = false;
        }
        let own = &mut server.policies;
        match policy {
            PolicyKind::Bsp => own.bsp.bsp_deadline_s = 10.0,
            PolicyKind::Fedbuff => own.fedbuff.fedbuff_k = cfg.clients.clamp(2, 10),
            // Scaled: rounds of 512 samples, one epoch; updates weighted by inverse loss.
            PolicyKind::Hermes => {
                own.hermes.hermes_samples = 512;
                own.hermes.hermes_epochs = 1;
                own.hermes.hermes_tolerance_s = 0.25;
                server.weighting = WeightingKind::Loss;
            }
            // ADSP: Γ and T_min derived from the measured round times (docs/algorithms.md §5)
            // unless --server-args sets them. The others (and any new policy): their defaults.
            _ => {}
        }
        out.push(Variant { name: p.clone(), server, mode, regime: Regime::default() });
    }
    for w in &cfg.sweep {
        let name = format!(
            "asp-{}",
            serde_json::to_value(w).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        );
        out.push(Variant {
            name,
            server: ServerConfig { policy: PolicyKind::Asp, weighting: *w, ..cfg.server.clone() },
            mode: None,
            regime: Regime::default(),
        });
    }
    Ok(out)
}

fn weighting_name(w: WeightingKind) -> String {
    serde_json::to_value(w).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

async fn run_one(
    cfg: &ExperimentConfig,
    v: &Variant,
    repeat: usize,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<RunResult, OrchestrateError> {
    let seed = cfg.seed.wrapping_mul(1000).wrapping_add(repeat as u64);
    let logs = dir.join("clients").join(format!("{}-{repeat}", v.name));
    std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
    let server_cfg =
        ServerConfig { listen: "127.0.0.1:0".parse().expect("static address"), seed, ..v.server.clone() };
    let listener =
        tokio::net::TcpListener::bind(server_cfg.listen).await.map_err(io("binding a loopback port"))?;
    let h = crate::server::start(server_cfg.clone(), listener).await?;
    let launcher = Launcher {
        bin: bin.to_path_buf(),
        url: format!("ws://{}/ws", h.addr),
        model: server_cfg.model.clone(),
        data: cfg.data.clone(),
        log_dir: logs,
    };
    let mut children = Vec::new();
    let mut ev = ClientSpec::evaluator("evaluator");
    if let Some(s) = cfg.eval_samples {
        ev.extra = vec!["--eval-samples".into(), s.to_string()];
    }
    children.push(launcher.spawn(&ev)?);
    let slowdowns_of = v.regime.slowdowns.as_ref().unwrap_or(&cfg.slowdowns);
    let slowdowns: Vec<f64> = (0..cfg.clients)
        .map(|i| slowdowns_of.get(i % slowdowns_of.len().max(1)).copied().unwrap_or(1.0))
        .collect();
    let trainer_args: Vec<String> = cfg.trainer_args.iter().chain(&v.regime.trainer_args).cloned().collect();
    for (i, &slow) in slowdowns.iter().enumerate() {
        let mut spec = ClientSpec::trainer(format!("c{i}-x{slow}"), (i, cfg.clients), slow, seed + i as u64);
        spec.partition = cfg.partition.clone();
        spec.mode = v.mode.map(String::from);
        spec.extra = trainer_args.clone();
        children.push(launcher.spawn(&spec)?);
    }
    let start = Instant::now();
    let max = Duration::from_secs_f64(cfg.max_seconds);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = h.status();
        if s.evals.iter().any(|e| e.accuracy >= cfg.target_accuracy) || start.elapsed() >= max {
            break;
        }
        let mut exited = 0;
        for c in children.iter_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                exited += 1;
            }
        }
        if exited == children.len() {
            break;
        }
    }
    let status = h.status();
    let (_, events) = h.record(0).await?;
    let _ = h.shutdown("experiment run finished").await?;
    super::reap(&mut children, Duration::from_secs(5)).await;

    let mut names = BTreeMap::new();
    let mut t0 = None;
    let mut hist = vec![0u64; STALENESS_BINS];
    let mut commits: BTreeMap<String, u64> = BTreeMap::new();
    let mut pushes: BTreeMap<String, u64> = BTreeMap::new();
    let mut skips: BTreeMap<String, u64> = BTreeMap::new();
    let mut decisions = Vec::new();
    // (version, updates aggregated so far) after each step.
    let mut aggregated: Vec<(u64, u64)> = Vec::new();
    let name_of = |names: &BTreeMap<_, String>, s: &crate::policy::SessionId| {
        names.get(s).cloned().unwrap_or_else(|| s.to_string())
    };
    for e in &events {
        match e {
            Event::Accept { session, .. } => *pushes.entry(name_of(&names, session)).or_default() += 1,
            Event::Skip { session, .. } => *skips.entry(name_of(&names, session)).or_default() += 1,
            Event::Directive { t, session, directive } if decisions.len() < MAX_DECISIONS => decisions
                .push(Decision { t: *t, client: name_of(&names, session), directive: directive.clone() }),
            Event::Join { t, session, client_id, role, .. } => {
                names.insert(*session, client_id.clone());
                if *role == crate::protocol::message::Role::Trainer {
                    t0.get_or_insert(*t);
                }
            }
            Event::Aggregate { version, items, .. } => {
                let before = aggregated.last().map_or(0, |a| a.1);
                aggregated.push((*version, before + items.len() as u64));
                for i in items {
                    hist[(i.staleness as usize).min(STALENESS_BINS - 1)] += 1;
                    *commits
                        .entry(names.get(&i.session).cloned().unwrap_or_else(|| i.session.to_string()))
                        .or_default() += 1;
                }
            }
            _ => {}
        }
    }
    let t0 = t0.unwrap_or(0.0);
    for d in &mut decisions {
        d.t = (d.t - t0).max(0.0);
    }
    let curve: Vec<Point> = status
        .evals
        .iter()
        .map(|e| Point {
            t: (e.t - t0).max(0.0),
            version: e.version,
            accuracy: e.accuracy,
            loss: e.loss,
            bytes_up: e.bytes_in,
            bytes_down: e.bytes_out,
        })
        .collect();
    let hit = curve.iter().find(|p| p.accuracy >= cfg.target_accuracy);
    // The updates aggregated into the version that reached the target.
    let updates_to_target =
        hit.map(|p| aggregated.iter().take_while(|a| a.0 <= p.version).last().map_or(0, |a| a.1));
    let total: u64 = hist.iter().sum();
    let mean_staleness = if total == 0 {
        0.0
    } else {
        hist.iter().enumerate().map(|(s, &c)| s as f64 * c as f64).sum::<f64>() / total as f64
    };
    Ok(RunResult {
        variant: v.name.clone(),
        policy: v.server.policy.name().into(),
        weighting: weighting_name(v.server.weighting),
        mode: v.mode.unwrap_or("auto").into(),
        repeat,
        seed,
        reached: hit.is_some(),
        time_to_target_s: hit.map(|p| p.t),
        bytes_up_to_target: hit.map(|p| p.bytes_up),
        bytes_down_to_target: hit.map(|p| p.bytes_down),
        final_accuracy: curve.last().map(|p| p.accuracy),
        best_accuracy: curve.iter().map(|p| p.accuracy).reduce(f64::max),
        duration_s: start.elapsed().as_secs_f64(),
        versions: status.version,
        accepted: status.accepted,
        staleness_histogram: hist,
        mean_staleness,
        commits,
        curve,
        server: serde_json::to_value(&server_cfg).unwrap_or_default(),
        trainer_args,
        regime: v.regime.name.clone(),
        regime_x: v.regime.x,
        slowdowns,
        updates_to_target,
        pushes,
        skips,
        decisions,
        policy_state: status.policy_state.clone(),
    })
}

/// Median of present values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

/// CSV: one row per run.
pub fn to_csv(runs: &[RunResult]) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
    let opt_u = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut s = String::from(
        "variant,regime,policy,weighting,mode,repeat,seed,reached,time_to_target_s,bytes_up_to_target,bytes_down_to_target,\
         updates_to_target,final_accuracy,best_accuracy,duration_s,versions,accepted,mean_staleness,commits,skips\n",
    );
    for r in runs {
        let commits: Vec<String> = r.commits.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let skips: Vec<String> = r.skips.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{},{},{:.3},{},{}\n",
            r.variant,
            r.regime,
            r.policy,
            r.weighting,
            r.mode,
            r.repeat,
            r.seed,
            r.reached,
            opt(r.time_to_target_s),
            opt_u(r.bytes_up_to_target),
            opt_u(r.bytes_down_to_target),
            opt_u(r.updates_to_target),
            opt(r.final_accuracy),
            opt(r.best_accuracy),
            r.duration_s,
            r.versions,
            r.accepted,
            r.mean_staleness,
            commits.join(";"),
            skips.join(";")
        ));
    }
    s
}

/// The table of medians over repeats, one line per variant (in the order run).
pub fn summary_table(runs: &[RunResult]) -> String {
    let mut order: Vec<&str> = Vec::new();
    for r in runs {
        if !order.contains(&r.variant.as_str()) {
            order.push(&r.variant);
        }
    }
    let mb = |v: Option<f64>| v.map(|x| format!("{:.2}", x / 1e6)).unwrap_or_else(|| "-".into());
    let f = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = order
        .iter()
        .map(|name| {
            let rs: Vec<&RunResult> = runs.iter().filter(|r| r.variant == *name).collect();
            let med =
                |g: &dyn Fn(&RunResult) -> Option<f64>| median(rs.iter().filter_map(|r| g(r)).collect());
            vec![
                name.to_string(),
                format!("{}/{}", rs.iter().filter(|r| r.reached).count(), rs.len()),
                f(med(&|r| r.time_to_target_s), 1),
                mb(med(&|r| r.bytes_up_to_target.map(|b| b as f64))),
                mb(med(&|r| r.bytes_down_to_target.map(|b| b as f64))),
                f(med(&|r| r.updates_to_target.map(|u| u as f64)), 0),
                f(med(&|r| r.final_accuracy), 3),
                f(med(&|r| Some(r.mean_staleness)), 2),
                f(med(&|r| Some(r.versions as f64)), 0),
            ]
        })
        .collect();
    crate::bench::table(
        &[
            "variant",
            "reached",
            "s to target",
            "MB up",
            "MB down",
            "updates",
            "final acc",
            "staleness",
            "versions",
        ],
        &rows,
    )
}

/// Runs the experiment and writes its files; returns the results.
pub async fn run(cfg: &ExperimentConfig, command: &str) -> Result<Results, OrchestrateError> {
    if cfg.clients == 0 || cfg.repeat == 0 {
        return Err(OrchestrateError::Invalid("--clients and --repeat must be at least 1".into()));
    }
    let bin = super::find_client(cfg.client_bin.as_deref())?;
    std::fs::create_dir_all(&cfg.out).map_err(io(format!("creating {}", cfg.out.display())))?;
    let vs = variants(cfg)?;
    let train_images = crate::data::load(cfg.data.as_deref()).map(|d| d.train.len()).unwrap_or(0);
    if cfg.scenario.is_some() && cfg.data.is_none() && train_images < 60_000 {
        eprintln!(
            "experiment: warning: the full Fashion-MNIST is not installed ({}); the trainers use the \
             embedded {train_images}-image subset, on which the scenario's target may not be reached \
             (Debian: apt install dataset-fashion-mnist)",
            crate::data::DEBIAN_DIR
        );
    }
    let mut runs = Vec::new();
    let total = cfg.repeat * vs.len();
    let began = std::time::Instant::now();
    for repeat in 0..cfg.repeat {
        for v in &vs {
            let done = runs.len();
            let eta = if done == 0 {
                format!("at most {:.0} min", total as f64 * (cfg.max_seconds + 10.0) / 60.0)
            } else {
                format!(
                    "~{:.0} min left",
                    began.elapsed().as_secs_f64() / done as f64 * (total - done) as f64 / 60.0
                )
            };
            eprintln!(
                "experiment{}: run {}/{total}: {} (repeat {}/{}; {eta})",
                cfg.scenario.as_deref().map(|s| format!(" {s}")).unwrap_or_default(),
                done + 1,
                v.name,
                repeat + 1,
                cfg.repeat
            );
            let r = run_one(cfg, v, repeat, &bin, &cfg.out).await?;
            eprintln!(
                "  {}: {} in {:.1} s, final accuracy {}",
                v.name,
                if r.reached { "reached the target" } else { "did not reach the target" },
                r.time_to_target_s.unwrap_or(r.duration_s),
                r.final_accuracy.map(|a| format!("{a:.3}")).unwrap_or_else(|| "-".into())
            );
            runs.push(r);
        }
    }
    let results = Results {
        scenario: cfg.scenario.clone(),
        train_images,
        target_accuracy: cfg.target_accuracy,
        clients: cfg.clients,
        slowdowns: cfg.slowdowns.clone(),
        repeat: cfg.repeat,
        seed: cfg.seed,
        environment: crate::bench::Environment::detect(None),
        command: command.into(),
        runs,
    };
    write_files(cfg, &results)?;
    Ok(results)
}

fn write_files(cfg: &ExperimentConfig, results: &Results) -> Result<(), OrchestrateError> {
    let write = |name: &str, text: String| {
        let p = cfg.out.join(name);
        std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))
    };
    write("results.csv", to_csv(&results.runs))?;
    write("results.json", serde_json::to_string_pretty(results).expect("results serialize"))?;
    write("summary.txt", summary_table(&results.runs))?;
    // Plots of the first repeat: one line per variant, one plot per regime.
    let first: Vec<&RunResult> = results.runs.iter().filter(|r| r.repeat == 0).collect();
    let mut regimes: Vec<&str> = Vec::new();
    for r in &first {
        if !regimes.contains(&r.regime.as_str()) {
            regimes.push(&r.regime);
        }
    }
    if regimes.len() > 1 {
        for regime in &regimes {
            let rs: Vec<&RunResult> = first.iter().copied().filter(|r| r.regime == *regime).collect();
            plot_comparison(cfg, results, &rs, &format!("_{regime}"), &format!(", {regime}"))?;
        }
        time_to_target_plot(cfg, results)?;
        return staleness_plots(cfg, results, &first);
    }
    // One regime: the weighting sweep (asp-…) has its own plot.
    let comparison: Vec<&RunResult> =
        first.iter().copied().filter(|r| !r.variant.starts_with("asp-")).collect();
    plot_comparison(cfg, results, &comparison, "", "")?;
    staleness_plots(cfg, results, &first)
}

/// Median time to target per policy (the variant's name before `@`) over the regimes' x.
fn time_to_target_plot(cfg: &ExperimentConfig, results: &Results) -> Result<(), OrchestrateError> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut keys: Vec<(String, String, f64)> = Vec::new();
    for r in &results.runs {
        let base = r.variant.split('@').next().unwrap_or(&r.variant).to_string();
        if !keys.iter().any(|k| k.0 == base && k.1 == r.regime) {
            keys.push((base, r.regime.clone(), r.regime_x));
        }
    }
    for (base, regime, x) in keys {
        let times: Vec<f64> = results
            .runs
            .iter()
            .filter(|r| r.regime == regime && r.variant.split('@').next() == Some(base.as_str()))
            .filter_map(|r| r.time_to_target_s)
            .collect();
        let Some(m) = median(times) else { continue };
        match series.iter_mut().find(|s| s.0 == base) {
            Some(s) => s.1.push((x, m)),
            None => series.push((base, vec![(x, m)])),
        }
    }
    crate::plot::lines(
        &cfg.out.join("time_to_target.png"),
        &format!("Median seconds to {:.0}% test accuracy", results.target_accuracy * 100.0),
        if cfg.x_label.is_empty() { "regime" } else { &cfg.x_label },
        "seconds",
        &series,
    )?;
    Ok(())
}

fn plot_comparison(
    cfg: &ExperimentConfig,
    results: &Results,
    first: &[&RunResult],
    suffix: &str,
    title: &str,
) -> Result<(), OrchestrateError> {
    let comparison: Vec<&RunResult> = first.to_vec();
    let target = format!("target {:.0}%", results.target_accuracy * 100.0);
    let series = |rs: &[&RunResult], x: &dyn Fn(&Point) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        rs.iter().map(|r| (r.variant.clone(), r.curve.iter().map(|p| (x(p), p.accuracy)).collect())).collect()
    };
    if !comparison.is_empty() {
        crate::plot::lines(
            &cfg.out.join(format!("accuracy_vs_time{suffix}.png")),
            &format!("Test accuracy over time ({} clients, {target}{title})", results.clients),
            "seconds",
            "accuracy",
            &series(&comparison, &|p| p.t),
        )?;
        crate::plot::lines(
            &cfg.out.join(format!("accuracy_vs_bytes{suffix}.png")),
            &format!("Test accuracy over uplink traffic ({} clients{title})", results.clients),
            "uplink MB",
            "accuracy",
            &series(&comparison, &|p| p.bytes_up as f64 / 1e6),
        )?;
    }
    Ok(())
}

fn staleness_plots(
    cfg: &ExperimentConfig,
    results: &Results,
    first: &[&RunResult],
) -> Result<(), OrchestrateError> {
    let target = format!("target {:.0}%", results.target_accuracy * 100.0);
    let series = |rs: &[&RunResult], x: &dyn Fn(&Point) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        rs.iter().map(|r| (r.variant.clone(), r.curve.iter().map(|p| (x(p), p.accuracy)).collect())).collect()
    };
    let sweep: Vec<&RunResult> = first.iter().copied().filter(|r| r.variant.starts_with("asp-")).collect();
    let hist = |rs: &[&RunResult]| -> Vec<(String, Vec<f64>)> {
        rs.iter()
            .map(|r| {
                let total: u64 = r.staleness_histogram.iter().sum::<u64>().max(1);
                (r.variant.clone(), r.staleness_histogram.iter().map(|&c| c as f64 / total as f64).collect())
            })
            .collect()
    };
    let all: Vec<&RunResult> = first.to_vec();
    if !all.is_empty() {
        crate::plot::histograms(
            &cfg.out.join("staleness.png"),
            "Staleness of aggregated updates (fraction; last bin 20+)",
            "staleness",
            &hist(&all),
        )?;
    }
    if !sweep.is_empty() {
        crate::plot::lines(
            &cfg.out.join("staleness_weighting.png"),
            &format!("ASP with each staleness weighting ({target})"),
            "seconds",
            "accuracy",
            &series(&sweep, &|p| p.t),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn config(policies: &[&str]) -> ExperimentConfig {
        ExperimentConfig {
            policies: args(policies),
            sweep: vec![],
            weighting: WeightingKind::Polynomial,
            clients: 4,
            slowdowns: vec![1.0],
            partition: "iid".into(),
            target_accuracy: 0.5,
            repeat: 1,
            seed: 1,
            max_seconds: 10.0,
            out: PathBuf::from("unused"),
            client_bin: None,
            data: None,
            eval_samples: None,
            server: ServerConfig::default(),
            trainer_args: vec![],
            server_args: vec![],
            regimes: vec![],
            scenario: None,
            x_label: String::new(),
        }
    }

    /// N1, N2: NBSync's rounds are a plain mean, as the authors' server's; BSP keeps the
    /// comparison's weighting.
    #[test]
    fn nbsync_aggregates_without_staleness_or_sample_weighting() {
        let vs = variants(&config(&["bsp", "nbsync"])).unwrap();
        let (bsp, nb) = (&vs[0], &vs[1]);
        assert_eq!(
            (nb.name.as_str(), nb.server.policy, nb.mode),
            ("nbsync", PolicyKind::Bsp, Some("nbsync"))
        );
        assert_eq!(nb.server.weighting().alpha(1), 1.0, "a push one round late is not damped");
        assert_eq!((nb.server.weighting, nb.server.sample_weighting), (WeightingKind::Constant, false));
        assert_eq!((bsp.server.weighting, bsp.server.sample_weighting), (WeightingKind::Polynomial, true));
        // An explicit --server-args flag still wins.
        let mut cfg = config(&["nbsync"]);
        cfg.server_args = args(&["--weighting", "hinge"]);
        assert_eq!(variants(&cfg).unwrap()[0].server.weighting, WeightingKind::Hinge);
    }

    #[test]
    fn server_args_are_serve_flags_and_policy_is_refused() {
        assert_eq!(server_flags(&args(&["--max-batch", "3"])).unwrap().max_batch, Some(3));
        let e = server_flags(&args(&["--policy", "asp"])).unwrap_err().to_string();
        assert!(e.contains("--policies"), "{e}");
        // A scenario's flag and the command line's: the later one wins.
        assert_eq!(
            server_flags(&args(&["--max-batch", "3", "--max-batch", "5"])).unwrap().max_batch,
            Some(5)
        );
        let e = server_flags(&args(&["--max-batch", "many"])).unwrap_err().to_string();
        assert!(e.contains("--server-args") && e.contains("max-batch"), "{e}");
    }
}
