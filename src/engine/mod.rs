//! Aggregation engines: the model state and the math of docs/algorithms.md §2–3.
//!
//! One owner (the coordinator) holds an engine and calls, per step, [`Aggregator::aggregate`]
//! with a batch of validated updates and then [`Aggregator::broadcast`], which selects the
//! Top-k of x − x̂, applies it to x̂ and returns the Delta frame.
//!
//! * [`cpu::CpuAggregator`]: plain Rust, the reference.
//! * [`gpu::GpuAggregator`]: wgpu + WGSL, bit-identical in deterministic mode.

pub mod cpu;
pub mod fallback;
pub mod gpu;
pub mod sharded;
pub mod worker;

use crate::protocol::frame::DeltaHeader;

/// One update of a batch, borrowing its frame's bytes.
#[derive(Clone, Copy, Debug)]
pub struct UpdateRef<'a> {
    /// w_i: staleness and sample weighting already applied.
    pub weight: f32,
    /// nnz little-endian u32 indices, strictly ascending.
    pub indices: &'a [u8],
    /// nnz little-endian f16 values.
    pub values: &'a [u8],
    /// Indices, values and padding as received (what the GPU uploads).
    pub payload: &'a [u8],
}

impl<'a> UpdateRef<'a> {
    pub fn from_push(view: &crate::protocol::frame::PushView<'a>, weight: f32) -> Self {
        Self { weight, indices: view.indices_bytes(), values: view.values_bytes(), payload: view.payload() }
    }
    pub fn nnz(&self) -> usize {
        self.indices.len() / 4
    }
}

/// How the broadcast picks the entries of d = x − x̂ to send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Exact Top-k by magnitude, ties to the lower index.
    Exact { k: usize },
    /// GaussianK (approximate): threshold from the mean and deviation of d, refined up to 3
    /// times towards [2k/3, 4k/3] entries.
    GaussianK { k: usize },
}

impl Selection {
    pub fn k(&self) -> usize {
        match *self {
            Self::Exact { k } | Self::GaussianK { k } => k,
        }
    }
}

/// Which selection rule the server uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectionMode {
    #[default]
    Exact,
    Gaussiank,
}

impl std::str::FromStr for SelectionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Self::Exact),
            "gaussiank" => Ok(Self::Gaussiank),
            _ => Err(format!("unknown selection {s:?} (exact, gaussiank)")),
        }
    }
}

impl SelectionMode {
    pub fn with_k(self, k: usize) -> Selection {
        match self {
            Self::Exact => Selection::Exact { k },
            Self::Gaussiank => Selection::GaussianK { k },
        }
    }
}

/// What one broadcast produced.
#[derive(Clone, Debug)]
pub struct Broadcast {
    pub header: DeltaHeader,
    /// The whole Delta frame, header included.
    pub frame: Vec<u8>,
    /// False when the selection was approximate (GaussianK).
    pub exact: bool,
}

/// How the GPU engine sums a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuMode {
    /// Bit-identical to the CPU engine: the updates are added in batch order, each with the
    /// canonical rounding (two dispatches per chunk).
    Deterministic,
    /// The whole batch in one dispatch with atomic adds (order-dependent rounding).
    Fast,
}

/// Server optimiser settings (docs/algorithms.md §2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerSettings {
    /// Server momentum μ (0 disables the momentum buffer).
    pub momentum: f32,
    /// Server learning rate η_s.
    pub server_lr: f32,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        Self { momentum: 0.0, server_lr: 1.0 }
    }
}

/// Everything an engine holds, for checkpoints and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelState {
    pub x: Vec<f32>,
    /// Empty when momentum is 0.
    pub momentum: Vec<f32>,
    pub replica: Vec<f32>,
    pub version: u64,
    pub replica_version: u64,
}

/// What an engine is, for logs and `/api/status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EngineInfo {
    /// "cpu" or "gpu".
    pub kind: String,
    /// Adapter name (GPU) or "cpu".
    pub adapter: String,
    /// Backend (Vulkan, Metal, …) or "native".
    pub backend: String,
    /// "deterministic" (the CPU engine adds its thread count) or "fast (…)".
    pub mode: String,
}

/// Engine failures. Client data never causes one: it is validated before it gets here.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error("GPU device request failed: {0}")]
    Device(String),
    #[error("GPU buffer mapping failed: {0}")]
    Map(String),
    #[error("state has {got} parameters, engine has {expected}")]
    StateSize { expected: usize, got: usize },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("engine stopped: {0}")]
    Stopped(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// An aggregation engine (docs/algorithms.md §2–3). Implementations must agree bit for bit with
/// [`cpu::CpuAggregator`] in deterministic mode.
pub trait Aggregator: Send {
    fn info(&self) -> EngineInfo;
    fn num_params(&self) -> usize;
    /// The model version t.
    fn version(&self) -> u64;
    /// The version of the public replica x̂.
    fn replica_version(&self) -> u64;
    /// g = Σ w_i Δ_i; m = μm + g; x = x + η m; t = t + 1.
    fn aggregate(&mut self, batch: &[UpdateRef<'_>]) -> Result<(), EngineError>;
    /// Selects entries of d = x − x̂, applies their f16 values to x̂, and returns the Delta.
    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError>;
    /// x̂, for snapshots.
    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError>;
    fn read_state(&mut self) -> Result<ModelState, EngineError>;
    /// Replaces the whole state (values are canonicalised on load).
    fn load_state(&mut self, state: &ModelState) -> Result<(), EngineError>;
    /// Time spent inside `aggregate` copying updates to the device and inside `broadcast`
    /// encoding the Delta frame since the last call (then reset). The server's stage
    /// breakdown subtracts these from the calls' wall time.
    fn take_stage_times(&mut self) -> StageTimes {
        StageTimes::default()
    }
    /// What the engine has done so far (totals since it was built).
    fn counters(&self) -> EngineCounters {
        EngineCounters::default()
    }
}

/// Totals an engine keeps, for `/metrics`, benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineCounters {
    /// Aggregation steps.
    pub steps: u64,
    /// Broadcast selections.
    pub broadcasts: u64,
    /// Full passes the selections made over the model delta d (or its keys): the GPU's
    /// steady state is 1 per selection, a radix select 4.
    pub topk_input_passes: u64,
    /// Selections whose first collection of candidates missed and took a second pass.
    pub topk_recollections: u64,
    /// Selections where both collections missed and a full radix select ran.
    pub topk_misses: u64,
    /// GPU dispatches recorded.
    pub dispatches: u64,
    /// GPU submissions.
    pub submits: u64,
    /// GPU submissions waited on (round trips).
    pub waits: u64,
    /// Staging buffers created for uploads.
    pub staging_allocations: u64,
    /// Bytes uploaded to the device.
    pub uploaded_bytes: u64,
}

/// Parts of an engine call that are not computation (see [`Aggregator::take_stage_times`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// Host-to-device copies of update payloads (zero on the CPU engine).
    pub upload: std::time::Duration,
    /// Writing the Delta frame.
    pub encode: std::time::Duration,
}

/// What the kernel benchmarks (`sparsync bench`, `benches/kernels.rs`) may ask of the GPU
/// engine beyond [`Aggregator`]: device times of a step's kernels and replays of the last
/// step. The server never uses it; it keeps benchmark hooks out of the engine's own API.
pub trait KernelProbe {
    /// Runs the kernels of the last step again on the device (its data is still there; the
    /// batch is applied once more) and waits. False when the last step had to be cut into
    /// sub-batches.
    fn replay(&mut self, which: gpu::aggregate::Replay) -> Result<bool, EngineError>;
    /// Times every step's (and replay's) kernels from now on.
    fn time_kernels(&mut self);
    /// Device seconds of the last step's (or replay's) kernels; waits. None without timestamp
    /// queries or before [`KernelProbe::time_kernels`].
    fn device_time(&mut self) -> Result<Option<f64>, EngineError>;
}

/// The CPU engine's selection alone, for the Top-k benchmark.
pub trait SelectProbe {
    /// The exact Top-k of |d| (as a broadcast would select it, nothing applied); returns how
    /// many entries were selected.
    fn select_only(&mut self, k: usize) -> usize;
}
