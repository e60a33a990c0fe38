//! Server settings: one flat list, read from a TOML file (`--config`) and overridden by flags.
//!
//! Every setting is declared once in the `settings!` invocation below (see src/settings.rs),
//! which generates the config struct (serde, with defaults), the clap flags (each an `Option`,
//! so that an absent flag keeps the file's value) and the merge. `--help` shows each default.
//! Each policy's own settings are declared in its file and come in as one group,
//! [`PolicySettings`](crate::policy::PolicySettings); their keys and flags are as flat as these.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::engine::GpuMode;
use crate::engine::SelectionMode;
pub use crate::policy::PolicyKind;
use crate::policy::staleness::WeightingKind;
use crate::settings::{Settings, settings};

/// How often steps broadcast a Delta, in time (`broadcast_interval_ms`). A step that does not
/// broadcast leaves its change in x − x̂ for the next one that does (docs/algorithms.md §3).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum BroadcastInterval {
    /// Every step that `broadcast_every` allows.
    #[default]
    EveryStep,
    /// At most one broadcasting step per this many milliseconds.
    Millis(f64),
    /// Keep the bytes sent within [`BroadcastInterval::AUTO_DOWNLINK_RATIO`] × the bytes
    /// received, and the time between broadcasts within [`BroadcastInterval::AUTO_MAX_PERIOD`].
    Auto,
}

impl BroadcastInterval {
    /// `auto`: bytes sent per byte received that a broadcast may bring the downlink to.
    pub const AUTO_DOWNLINK_RATIO: u64 = 2;
    /// `auto`: the longest time between two broadcasts while steps run. One second, not less:
    /// with 4,000 clients of 2^20 on two cores a 100 ms bound alone forced 8× the uplink
    /// (README Performance); at one broadcast a second the bound costs at most one Delta per
    /// client per second.
    pub const AUTO_MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);
}

impl std::str::FromStr for BroadcastInterval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            t => match t.parse::<f64>() {
                Ok(0.0) => Ok(Self::EveryStep),
                Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(Self::Millis(ms)),
                _ => Err(format!("{s:?} is not a number of milliseconds ≥ 0 or \"auto\"")),
            },
        }
    }
}

impl std::fmt::Display for BroadcastInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EveryStep => write!(f, "0"),
            Self::Millis(ms) => write!(f, "{ms}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

impl Serialize for BroadcastInterval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::EveryStep => s.serialize_f64(0.0),
            Self::Millis(ms) => s.serialize_f64(*ms),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for BroadcastInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where acknowledged updates are logged (`wal`): nowhere, a local file, or a JetStream stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WalTarget {
    #[default]
    Off,
    /// The file WAL in `checkpoint_dir`.
    File,
    Nats(NatsTarget),
}

impl WalTarget {
    pub fn is_on(&self) -> bool {
        !matches!(self, Self::Off)
    }
}

/// A JetStream stream: `nats://HOST:PORT[,HOST:PORT…]/STREAM` (each server may repeat the
/// `nats://`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsTarget {
    /// `host:port` of each server given (the client learns the rest of the cluster).
    pub servers: Vec<String>,
    pub stream: String,
}

impl std::str::FromStr for NatsTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("nats://").ok_or_else(|| format!("{s:?} does not start with nats://"))?;
        let (servers, stream) = rest
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?} names no stream (nats://HOST:PORT/STREAM)"))?;
        if stream.is_empty() || !stream.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("stream name {stream:?} must be letters, digits, '-' or '_'"));
        }
        let servers: Vec<String> = servers
            .split(',')
            .map(|h| h.trim().trim_start_matches("nats://").to_string())
            .filter(|h| !h.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(format!("{s:?} names no server"));
        }
        for h in &servers {
            let port = h.rsplit_once(':').map(|(_, p)| p);
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err(format!("server {h:?} is not HOST:PORT"));
            }
        }
        Ok(Self { servers, stream: stream.to_string() })
    }
}

impl std::fmt::Display for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats://{}/{}", self.servers.join(","), self.stream)
    }
}

impl std::str::FromStr for WalTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "false" | "0" | "no" | "off" | "none" => Ok(Self::Off),
            "true" | "1" | "yes" | "on" | "file" => Ok(Self::File),
            t if t.starts_with("nats://") => Ok(Self::Nats(t.parse()?)),
            _ => Err(format!("expected false, true, file or nats://HOST:PORT/STREAM, got {s:?}")),
        }
    }
}

impl std::fmt::Display for WalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => write!(f, "false"),
            Self::File => write!(f, "file"),
            Self::Nats(t) => t.fmt(f),
        }
    }
}

impl Serialize for WalTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::File => s.serialize_bool(true),
            Self::Nats(t) => s.serialize_str(&t.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for WalTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(if b { Self::File } else { Self::Off }),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Which engine aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The GPU engine when a hardware adapter exists, else the CPU engine (with a warning).
    /// Software adapters (lavapipe) are only used with `gpu`.
    Auto,
    Gpu,
    Cpu,
}

/// A list of tokens: comma-separated on the command line, an array in TOML.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tokens(pub Vec<String>);

impl std::str::FromStr for Tokens {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()))
    }
}

/// `FromStr` for the clap value enums, so defaults and TOML share one spelling.
macro_rules! value_enum_from_str {
    ($($t:ty),*) => {$(
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t as clap::ValueEnum>::from_str(s, false)
            }
        }
    )*};
}
value_enum_from_str!(EngineChoice, GpuMode, PolicyKind, WeightingKind);

settings! {
    /// The server's settings (see `sparsync serve --help` for each one's meaning).
    pub struct ServerConfig;
    /// Flags of `sparsync serve`: each overrides the config file's value when given.
    pub struct ServeFlags;

    ["Server"]
    listen: val SocketAddr = "127.0.0.1:7070", "Address to listen on (HTTP and WebSocket on one port)";
    model: val String = "mlp", "Built-in model: logreg, mlp, cnn, or flat-N (N parameters, for benchmarks); ignored with --init";
    init: opt PathBuf = "none", "Start from this safetensors file (any layout of F32 tensors)";
    seed: val u64 = "0", "Seed of the built-in model's initialisation";
        data_dir: opt PathBuf = "auto", "Fashion-MNIST IDX directory for browser shards (auto: Debian's, else the embedded subset)";
    browser_shards: val u16 = "8", "Browsers joining at /join get one of this many IID shards of the training set, in turn";
    browser_samples: val u32 = "2000", "Images per browser shard (at most)";
    web_dir: opt PathBuf = "embedded", "Serve the dashboard and browser client from this directory instead of the built-in copy";

    ["Engine"]
    engine: val EngineChoice = "auto", "Aggregation engine: auto (a hardware GPU if present, else CPU, also when the GPU fails), gpu (a hardware GPU; a software one such as lavapipe only when --adapter names it) or cpu";
    adapter: opt String = "best", "GPU adapter whose name contains this text";
    require_gpu: flag bool = "false", "Fail instead of falling back to the CPU engine when no adapter is found";
    gpu_mode: val GpuMode = "deterministic", "GPU aggregation mode: deterministic (bit-identical to CPU) or fast (atomics)";
    chunk_elems: opt usize = "adapter limit", "GPU storage chunk size in elements";
    cpu_threads: opt usize = "available cores from 2^19 parameters, else 1", "Threads of the CPU engine (results are the same for any count)";
    shards: val usize = "1", "Split the model by key range across this many CPU engines, each on cpu_threads / shards threads (results are the same for any count; --engine cpu and --selection exact only)";
    inject_gpu_fault: opt crate::engine::gpu::Fault = "none", "Testing: make the GPU engine fail (shader or alloc: while it is set up; step-alloc:N or broadcast-alloc:N: in aggregation step or broadcast N)";
    momentum: val f32 = "0", "Server momentum μ (FedAvgM when > 0)";
    server_lr: val f32 = "1", "Server learning rate η_s";
    max_batch: val usize = "64", "Most updates aggregated in one step";
    steps_in_flight: val usize = "2", "Aggregation steps the engine may hold at once: step n+1 is formed and logged while step n runs (1: one at a time)";

    ["Policy"]
    policy: val PolicyKind = "asp", crate::policy::policy_help!();
    ["Policy"]
    // Each policy's own settings (bsp_deadline_s, ssp_bound, …), from src/policy/<name>.rs.
    ..policies: crate::policy::PolicySettings;
    local_steps: val u64 = "10", "Local steps per push that clients are told at join";
    batch_size: val u64 = "32", "Mini-batch size that clients are told at join";
    learning_rate: val f64 = "0.05", "Local learning rate that clients are told at join";

    ["Weighting"]
    weighting: val WeightingKind = "constant", "Staleness weighting α(s): constant, polynomial, hinge, exponential, or loss (Hermes)";
    poly_a: val f64 = "0.5", "Polynomial α: exponent a";
    hinge_a: val f64 = "10", "Hinge α: slope a";
    hinge_b: val f64 = "4", "Hinge α: knee b";
    exp_beta: val f64 = "0.5", "Exponential α: rate β";
    exp_cap: val f64 = "16", "Exponential α: staleness cap S";
    sample_weighting: flag bool = "true", "Weight updates by their sample counts";
    max_staleness: val u64 = "64", "Reject updates staler than this";

    ["Broadcast"]
    rho_up: val f64 = "0.01", "Upload density ρ_up that clients are told";
    rho_down: val f64 = "0.01", "Download density ρ_down of each Delta";
    selection: val SelectionMode = "exact", "Delta selection: exact (Top-k) or gaussiank (approximate)";
    broadcast_every: val u64 = "1", "Broadcast a Delta every this many aggregation steps";
    broadcast_interval_ms: val BroadcastInterval = "0", "Broadcast a Delta at most every this many milliseconds (0: every step that broadcast_every allows; auto: keep the downlink within 2x the uplink, and broadcast at least once a second while steps run)";
    max_delta_chain: val u64 = "32", "Clients further behind than this get a snapshot instead of Deltas";

    ["Limits"]
    max_frame_bytes: val usize = "0", "Largest WebSocket message accepted, bytes (0: derived from the model: a full-density Push, 6 bytes per parameter, plus 64 KiB)";
    frame_timeout_s: val f64 = "10", "Close a session whose WebSocket message has begun but not completed within this many seconds (a half-sent frame holds memory)";
    max_nnz: opt u64 = "parameter count", "Largest nnz accepted in one Push";
            max_clients: val usize = "1024", "Most concurrent connections";
    record_events: val usize = "200000", "Events the server keeps for /api/record (oldest dropped first)";
    max_connections_per_ip: val usize = "64", "Most concurrent connections from one IP address (0: no per-address limit); one address cannot take every slot of max_clients";
    max_push_rate: val f64 = "0", "Pushes per second per client (0: unlimited)";
    max_samples: val u32 = "65536", "Largest sample count a Push may claim; larger claims are clipped to it (logged, and counted in sparsync_updates_rejected_total{reason=\"samples_clipped\"}). A round at the defaults claims 320; ADSP and Hermes rounds up to tens of thousands";
    max_pending_bytes: val usize = "8388608", "Bytes queued to one client before it is switched to a later snapshot (snapshots are shared and always queued)";
    handshake_timeout_s: val f64 = "10", "Seconds a connection has to complete HTTP headers and Hello";
    idle_timeout_s: val f64 = "300", "Close sessions silent for this many seconds";

    ["Security"]
    token: val Tokens = "", "Join tokens accepted from any client, comma-separated (none: no auth unless --token-file)";
    token_file: opt PathBuf = "none", "File of tokens: lines `TOKEN` (join token) or `CLIENT_ID TOKEN` (per client)";
    tls_cert: opt PathBuf = "none", "TLS certificate chain (PEM); with --tls-key serves https and wss";
    tls_key: opt PathBuf = "none", "TLS private key (PEM)";

    ["Durability"]
    checkpoint_dir: opt PathBuf = "none", "Directory for checkpoints (safetensors)";
    checkpoint_every_s: val f64 = "0", "Checkpoint every this many seconds (0: only at shutdown; with --wal nats://… and no cadence set, every 10 s)";
    checkpoint_every_versions: val u64 = "0", "Checkpoint every this many versions (0: off)";
    resume: opt PathBuf = "none", "Resume from the newest valid checkpoint in this directory";
    wal: switch WalTarget = "false", "Log of acknowledged updates: false (none), true or file (a local file in --checkpoint-dir: a crashed process loses none), or nats://HOST:PORT[,HOST:PORT…]/STREAM (a JetStream stream made by `sparsync nats-init`, with checkpoints in its object store: a lost machine loses none, and a --standby server takes over)";
    keep_log: flag bool = "false", "With --wal nats://…: keep every record in the stream (by default a checkpoint lets the records before the previous checkpoint go): the whole run stays in the log, for audit or replay";
    standby: flag bool = "false", "With --wal nats://…: follow the leader's log into this server's engine until the leader's lease lapses, then take over (fence the stream, listen, serve)";
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ServerConfig {
    /// Overrides every setting that a flag gave.
    pub fn apply(&mut self, flags: ServeFlags) {
        Settings::apply(self, flags);
    }

    /// What policies may use beyond their own settings.
    pub fn policy_common(&self) -> crate::policy::Common {
        crate::policy::Common { max_batch: self.max_batch }
    }

    /// Reads a TOML file (keys are the flag names with underscores).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })
    }

    /// Checks ranges that the types do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        if !(self.rho_down > 0.0 && self.rho_down <= 1.0) {
            return bad("rho_down", "must be in (0, 1]");
        }
        if !(self.rho_up > 0.0 && self.rho_up <= 1.0) {
            return bad("rho_up", "must be in (0, 1]");
        }
        if self.broadcast_every == 0 {
            return bad("broadcast_every", "must be at least 1");
        }
        if self.max_batch == 0 {
            return bad("max_batch", "must be at least 1");
        }
        if !(1..=256).contains(&self.shards) {
            return bad("shards", "must be in 1..=256");
        }
        if self.shards > 1 && self.engine != EngineChoice::Cpu {
            return bad("shards", "several shards need --engine cpu (GPU shards are not built yet)");
        }
        if self.shards > 1 && self.selection != SelectionMode::Exact {
            return bad(
                "shards",
                "several shards need --selection exact (GaussianK's global threshold cannot be split exactly)",
            );
        }
        if !(1..=64).contains(&self.steps_in_flight) {
            return bad("steps_in_flight", "must be in 1..=64");
        }
        if !(self.momentum >= 0.0 && self.momentum < 1.0) {
            return bad("momentum", "must be in [0, 1)");
        }
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return bad("server_lr", "must be positive");
        }
        if let Err(e) = self.policies.validate() {
            return bad(e.field, e.reason);
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "--tls-cert and --tls-key go together");
        }
        match &self.wal {
            WalTarget::File if self.checkpoint_dir.is_none() => return bad("wal", "needs --checkpoint-dir"),
            WalTarget::Nats(_) if self.checkpoint_dir.is_some() || self.resume.is_some() => {
                return bad(
                    "wal",
                    "a nats:// log keeps its checkpoints in the stream's object store: drop --checkpoint-dir and --resume",
                );
            }
            WalTarget::Off | WalTarget::File if self.standby => {
                return bad("standby", "needs --wal nats://…: a standby follows a JetStream stream");
            }
            _ => {}
        }
        if self.max_frame_bytes != 0 && self.max_frame_bytes < 64 {
            return bad("max_frame_bytes", "must be 0 (derived from the model) or at least 64");
        }
        if !(self.frame_timeout_s.is_finite() && self.frame_timeout_s > 0.0) {
            return bad("frame_timeout_s", "must be a positive number of seconds");
        }
        Ok(())
    }

    pub fn weighting(&self) -> crate::policy::staleness::Weighting {
        crate::policy::staleness::Weighting {
            kind: self.weighting,
            poly_a: self.poly_a,
            hinge_a: self.hinge_a,
            hinge_b: self.hinge_b,
            exp_beta: self.exp_beta,
            exp_cap: self.exp_cap,
            samples: self.sample_weighting,
        }
    }
}

/// What a client trains with where neither its own settings nor the server's directive say:
/// the defaults of the settings a server tells clients (`local_steps`, `batch_size`,
/// `learning_rate`, and Hermes' `hermes_samples` per round). They are read from
/// [`ServerConfig::default`], so each is defined once, in `settings!` above.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientDefaults {
    pub local_steps: u64,
    pub batch_size: u64,
    pub learning_rate: f64,
    /// Samples per local round (Hermes' D).
    pub chunk_size: u64,
}

impl Default for ClientDefaults {
    fn default() -> Self {
        let c = ServerConfig::default();
        Self {
            local_steps: c.local_steps,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            chunk_size: c.policies.hermes.hermes_samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: ServeFlags,
    }

    #[test]
    fn defaults_parse_and_validate() {
        let c = ServerConfig::default();
        assert_eq!(c.listen.port(), 7070);
        assert_eq!(c.policy, PolicyKind::Asp);
        assert!(c.sample_weighting);
        c.validate().unwrap();
    }

    #[test]
    fn flags_override_file() {
        let mut c: ServerConfig =
            toml::from_str("policy = \"ssp\"\nssp_bound = 2\nrho_down = 0.05\n").unwrap();
        let cli = Cli::parse_from([
            "x",
            "--ssp-bound",
            "3",
            "--require-gpu",
            "--sample-weighting",
            "false",
            "--token",
            "a,b",
        ]);
        c.apply(cli.flags);
        assert_eq!(c.policy, PolicyKind::Ssp);
        assert_eq!(c.policies.ssp.ssp_bound, 3);
        assert_eq!(c.rho_down, 0.05);
        assert!(c.require_gpu);
        assert!(!c.sample_weighting);
        assert_eq!(c.token.0, vec!["a", "b"]);
        assert_eq!(c.init, None);
        let cli = Cli::parse_from(["x", "--init", "w.safetensors"]);
        c.apply(cli.flags);
        assert_eq!(c.init, Some(PathBuf::from("w.safetensors")));
    }

    #[test]
    fn broadcast_intervals_parse_from_files_and_flags() {
        for (text, want) in [
            ("broadcast_interval_ms = 20", BroadcastInterval::Millis(20.0)),
            ("broadcast_interval_ms = 0", BroadcastInterval::EveryStep),
            ("broadcast_interval_ms = \"auto\"", BroadcastInterval::Auto),
            ("broadcast_interval_ms = \"12.5\"", BroadcastInterval::Millis(12.5)),
        ] {
            let c: ServerConfig = toml::from_str(text).unwrap();
            assert_eq!(c.broadcast_interval_ms, want, "{text}");
            // What a config file written from it holds reads back the same.
            let back: ServerConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
            assert_eq!(back.broadcast_interval_ms, want, "{text}");
        }
        for bad in ["-1", "soon", "NaN", "inf"] {
            let e = bad.parse::<BroadcastInterval>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(toml::from_str::<ServerConfig>("broadcast_interval_ms = -3").is_err());
    }

    #[test]
    fn several_shards_need_the_cpu_engine_and_exact_selection() {
        let base = ServerConfig { shards: 3, engine: EngineChoice::Cpu, ..Default::default() };
        assert!(base.validate().is_ok());
        let gpu = ServerConfig { engine: EngineChoice::Auto, ..base.clone() };
        assert!(gpu.validate().unwrap_err().to_string().contains("--engine cpu"));
        let gk = ServerConfig { selection: SelectionMode::Gaussiank, ..base.clone() };
        assert!(gk.validate().unwrap_err().to_string().contains("GaussianK"));
        assert!(ServerConfig { shards: 0, ..base }.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ServerConfig>("polcy = \"ssp\"").is_err());
        // Also next to the policies' own keys, which are flattened in.
        let e = toml::from_str::<ServerConfig>("ssp_bound = 2\nssp_bond = 3\n").unwrap_err();
        assert!(e.to_string().contains("ssp_bond"), "{e}");
    }

    #[test]
    fn policy_settings_are_keys_and_flags_like_any_other() {
        let mut c: ServerConfig =
            toml::from_str("bsp_deadline_s = 5\nadsp_period_s = 2.5\nhermes_samples = 7\nmax_batch = 3\n")
                .unwrap();
        assert_eq!(c.policies.bsp.bsp_deadline_s, 5.0);
        assert_eq!(c.policies.adsp.adsp_period_s, Some(2.5));
        assert_eq!(c.policies.hermes.hermes_samples, 7);
        assert_eq!(c.policies.fedbuff.fedbuff_k, 10, "the default");
        let cli = Cli::parse_from(["x", "--fedbuff-k", "3", "--adsp-min-interval-s", "0.5"]);
        c.apply(cli.flags);
        assert_eq!((c.policies.fedbuff.fedbuff_k, c.policies.adsp.adsp_min_interval_s), (3, Some(0.5)));
        assert_eq!(c.policies.bsp.bsp_deadline_s, 5.0, "no flag: the file's value");
        // Written back flat, as read.
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!((v["bsp_deadline_s"].as_f64(), v["fedbuff_k"].as_u64()), (Some(5.0), Some(3)));
        assert_eq!(toml::from_str::<ServerConfig>(&toml::to_string(&c).unwrap()).unwrap(), c);
        // A policy's range check is the config's.
        c.policies.fedbuff.fedbuff_k = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "fedbuff_k", .. })));
    }
}
