//! Server settings: one flat list, read from a TOML file (`--config`) and overridden by flags.
//!
//! Every setting is declared once in the `settings!` invocation below, which generates the
//! config struct (serde, with defaults), the clap flags (each an `Option`, so that an absent
//! flag keeps the file's value) and the merge. `--help` shows each default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::engine::GpuMode;
use crate::engine::SelectionMode;
use crate::policy::staleness::WeightingKind;

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

/// Synchronization policy (docs/algorithms.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Bulk synchronous: one update from every active client per round, with a deadline.
    Bsp,
    /// Asynchronous: every update as soon as possible (what queued while busy is one batch).
    Asp,
    /// Stale synchronous: no client more than `ssp_bound` pushes ahead of the slowest.
    Ssp,
    /// Buffered asynchronous: aggregate every `fedbuff_k` updates.
    Fedbuff,
    /// ADSP: equal commit counts per check period, per-client commit intervals.
    Adsp,
    /// Hermes: clients push only significant updates; the server equalises round times.
    Hermes,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bsp => "bsp",
            Self::Asp => "asp",
            Self::Ssp => "ssp",
            Self::Fedbuff => "fedbuff",
            Self::Adsp => "adsp",
            Self::Hermes => "hermes",
        }
    }
}

fn parse_default<T: std::str::FromStr>(name: &str, text: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    text.parse().unwrap_or_else(|e| panic!("default of {name} ({text:?}) does not parse: {e:?}"))
}

/// Parses a bool flag value (`--flag`, `--flag true`, `--flag false`).
fn bool_value(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {s:?}")),
    }
}

macro_rules! settings {
    (
        $(
            [$heading:literal]
            $(
                $name:ident : $kind:ident $ty:ty = $default:literal, $help:literal;
            )*
        )*
    ) => {
        /// The server's settings (see `sparsync serve --help` for each one's meaning).
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct ServerConfig {
            $($( #[doc = $help] pub $name: settings!(@field $kind $ty), )*)*
        }

        impl Default for ServerConfig {
            fn default() -> Self {
                Self { $($( $name: settings!(@default $kind $ty, $name, $default), )*)* }
            }
        }

        /// Flags of `sparsync serve`: each overrides the config file's value when given.
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct ServeFlags {
            $($(
                #[arg(
                    long,
                    help_heading = $heading,
                    help = concat!($help, " [default: ", $default, "]"),
                    num_args = settings!(@nargs $kind),
                    default_missing_value = settings!(@missing $kind),
                    value_parser = settings!(@parser $kind $ty),
                )]
                pub $name: Option<settings!(@inner $kind $ty)>,
            )*)*
        }

        impl ServerConfig {
            /// Overrides every setting that a flag gave.
            pub fn apply(&mut self, flags: ServeFlags) {
                $($( if let Some(v) = flags.$name { self.$name = settings!(@wrap $kind v); } )*)*
            }
        }
    };

    (@field val $ty:ty) => { $ty };
    (@field flag $ty:ty) => { bool };
    (@field opt $ty:ty) => { Option<$ty> };

    (@inner val $ty:ty) => { $ty };
    (@inner flag $ty:ty) => { bool };
    (@inner opt $ty:ty) => { $ty };

    (@default val $ty:ty, $name:ident, $d:literal) => { parse_default::<$ty>(stringify!($name), $d) };
    (@default flag $ty:ty, $name:ident, $d:literal) => { parse_default::<bool>(stringify!($name), $d) };
    (@default opt $ty:ty, $name:ident, $d:literal) => { None };

    (@nargs flag) => { 0..=1 };
    (@nargs $k:ident) => { 1 };
    (@missing flag) => { Some("true") };
    (@missing $k:ident) => { None::<&'static str> };
    (@parser flag $ty:ty) => { bool_value };
    (@parser $k:ident $ty:ty) => { clap::value_parser!($ty) };

    (@wrap opt $v:ident) => { Some($v) };
    (@wrap $k:ident $v:ident) => { $v };
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
    inject_gpu_fault: opt crate::engine::gpu::Fault = "none", "Testing: make the GPU engine fail (shader or alloc: while it is set up; step-alloc:N or broadcast-alloc:N: in aggregation step or broadcast N)";
    momentum: val f32 = "0", "Server momentum μ (FedAvgM when > 0)";
    server_lr: val f32 = "1", "Server learning rate η_s";
    max_batch: val usize = "64", "Most updates aggregated in one step";

    ["Policy"]
    policy: val PolicyKind = "asp", "Synchronization policy: bsp, asp, ssp, fedbuff, adsp, hermes";
    bsp_deadline_s: val f64 = "30", "BSP: round deadline in seconds; late clients are dropped from the round";
    ssp_bound: val u64 = "4", "SSP: staleness bound b in clocks (pushes)";
    fedbuff_k: val usize = "10", "FedBuff: aggregate every K buffered updates";
    adsp_period_s: opt f64 = "10 rounds of the slowest client", "ADSP: check period Γ in seconds (unset: ten times the slowest client's measured round time; the paper used 60 s for hours of training)";
    adsp_min_interval_s: opt f64 = "the fastest client's round", "ADSP: smallest commit interval T_min in seconds (unset: the fastest client's measured round time; the paper used 10 s)";
    adsp_research_s: val f64 = "1000", "ADSP: search C again after this many seconds";
    adsp_target_loss: val f64 = "0.35", "ADSP: target loss l_target of the score r(C)";
    hermes_samples: val u64 = "2500", "Hermes: initial samples per round D";
    hermes_batch: val u64 = "16", "Hermes: initial batch size b";
    hermes_epochs: val u64 = "5", "Hermes: local epochs per round E";
    hermes_tolerance_s: val f64 = "1", "Hermes: round-time tolerance around the median, seconds";
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
    checkpoint_every_s: val f64 = "0", "Checkpoint every this many seconds (0: only at shutdown)";
    checkpoint_every_versions: val u64 = "0", "Checkpoint every this many versions (0: off)";
    resume: opt PathBuf = "none", "Resume from the newest valid checkpoint in this directory";
    wal: flag bool = "false", "Write-ahead log of acknowledged updates (needs --checkpoint-dir): a crash loses none";
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
        if self.fedbuff_k == 0 {
            return bad("fedbuff_k", "must be at least 1");
        }
        if !(self.momentum >= 0.0 && self.momentum < 1.0) {
            return bad("momentum", "must be in [0, 1)");
        }
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return bad("server_lr", "must be positive");
        }
        if self.bsp_deadline_s.is_nan() || self.bsp_deadline_s <= 0.0 {
            return bad("bsp_deadline_s", "must be positive");
        }
        if self.adsp_period_s.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            return bad("adsp_period_s", "must be positive");
        }
        if self.adsp_min_interval_s.is_some_and(|p| !(p.is_finite() && p >= 0.0)) {
            return bad("adsp_min_interval_s", "must be zero or positive");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "--tls-cert and --tls-key go together");
        }
        if self.wal && self.checkpoint_dir.is_none() {
            return bad("wal", "needs --checkpoint-dir");
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
            chunk_size: c.hermes_samples,
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
        assert_eq!(c.ssp_bound, 3);
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
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ServerConfig>("polcy = \"ssp\"").is_err());
    }
}
