//! `GpuAggregator`: the aggregation engine on wgpu, with the kernels of `shaders/`.
//!
//! The model lives in chunks (x, x̂, d = x − x̂, the partial-sum buffer, and the momentum
//! when μ ≠ 0), each at most one storage binding, so any model size works on any adapter.
//! One step is one command buffer: the batch's payloads, copied as received through a pooled
//! staging buffer, then per chunk the sum of the batch and the apply (`aggregate.wgsl`), which
//! also keeps d exact where x changed. A broadcast selects the Top-k of d (`topk.wgsl`), which
//! applies the sent values to x̂ and d. Everything the engine asks of the device runs inside
//! error scopes: a failure is an `Err` (the server falls back or stops cleanly), never a panic.

pub mod aggregate;
pub mod device;
mod probe;
pub mod shaders;
pub mod topk;
pub mod util;

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use self::aggregate::{Order, Step, StepChunk};
use self::device::{DeviceOptions, GpuContext};
use self::topk::{GpuTopk, TopkChunk};
use self::util::{Ctx, Readback, UniformSlots};
use super::{
    Aggregator, Broadcast, EngineCounters, EngineError, EngineInfo, ModelState, OptimizerSettings, Selection,
    UpdateRef,
};
use crate::engine::GpuMode;
use crate::protocol::frame::{DeltaHeader, encode_delta_with_body};
use crate::protocol::numerics::canon;

/// Keep in sync: `DeltaParams` in shaders/delta.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct DeltaParams {
    n: u32,
    _p: [u32; 3],
}

/// A failure to inject, for tests of the error paths (`--inject-gpu-fault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A kernel that does not compile, while the engine is set up.
    Shader,
    /// A buffer larger than the device allows, while the engine is set up.
    Allocation,
    /// A buffer larger than the device allows, in aggregation step `n` (counted from 1),
    /// before anything of that step reaches the device.
    StepAllocation(u64),
    /// The same in broadcast `n` (counted from 1).
    BroadcastAllocation(u64),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shader => write!(f, "shader"),
            Self::Allocation => write!(f, "alloc"),
            Self::StepAllocation(n) => write!(f, "step-alloc:{n}"),
            Self::BroadcastAllocation(n) => write!(f, "broadcast-alloc:{n}"),
        }
    }
}

impl serde::Serialize for Fault {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shader" => Ok(Self::Shader),
            "alloc" => Ok(Self::Allocation),
            _ => {
                let numbered = |prefix: &str| {
                    s.strip_prefix(prefix).and_then(|n| n.parse::<u64>().ok()).filter(|&n| n >= 1)
                };
                numbered("step-alloc:")
                    .map(Self::StepAllocation)
                    .or_else(|| numbered("broadcast-alloc:").map(Self::BroadcastAllocation))
                    .ok_or_else(|| {
                        format!("unknown fault {s:?} (shader, alloc, step-alloc:N, broadcast-alloc:N)")
                    })
            }
        }
    }
}

/// GPU engine options.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub mode: GpuMode,
    /// Elements per storage chunk (default: as many as one binding holds).
    pub chunk_elems: Option<usize>,
    pub device: DeviceOptions,
    /// A failure to inject (tests).
    pub fault: Option<Fault>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            mode: GpuMode::Deterministic,
            chunk_elems: None,
            device: DeviceOptions::default(),
            fault: None,
        }
    }
}

/// One chunk of the model on the device.
pub struct ModelChunk {
    /// Global index of the first element.
    pub base: usize,
    pub len: usize,
    pub x: wgpu::Buffer,
    pub xhat: wgpu::Buffer,
    pub acc: wgpu::Buffer,
    pub d: wgpu::Buffer,
    pub m: Option<wgpu::Buffer>,
    delta_group: wgpu::BindGroup,
}

/// The GPU aggregation engine.
pub struct GpuAggregator {
    ctx: Ctx,
    n: usize,
    opt: OptimizerSettings,
    mode: GpuMode,
    chunks: Vec<ModelChunk>,
    placeholder: wgpu::Buffer,
    version: u64,
    replica_version: u64,
    step: Step,
    delta: wgpu::ComputePipeline,
    delta_slots: Vec<u32>,
    _delta_uniforms: UniformSlots,
    topk: GpuTopk,
    readback: Readback,
    /// Identifies this engine's chunk buffers for the step's bind group cache.
    id: u64,
    fault: Option<Fault>,
    broadcasts: u64,
    encode_time: std::time::Duration,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl GpuAggregator {
    /// Opens the device `opts` names and uploads the model.
    ///
    /// Software adapters (lavapipe and the like) are slower than the CPU engine: the server
    /// sets `hardware_only` unless `--adapter` names one.
    pub fn new(values: &[f32], opt: OptimizerSettings, opts: &GpuOptions) -> Result<Self, EngineError> {
        let ctx = device::open(&opts.device)?;
        Self::with_context(ctx, values, opt, opts)
    }

    /// Builds the engine on an open device (tests and benches share one device). Any device
    /// error while setting up (a kernel that does not compile, an allocation that fails) is
    /// an `Err`.
    pub fn with_context(
        ctx: Arc<GpuContext>,
        values: &[f32],
        opt: OptimizerSettings,
        opts: &GpuOptions,
    ) -> Result<Self, EngineError> {
        if values.is_empty() {
            return Err(EngineError::StateSize { expected: 1, got: 0 });
        }
        let mut engine =
            ctx.scoped("setting up the GPU engine", || Self::build(ctx.clone(), values.len(), opt, opts))?;
        let values: Vec<f32> = values.iter().copied().map(canon).collect();
        engine.load_state(&ModelState {
            replica: values.clone(),
            x: values,
            momentum: Vec::new(),
            version: 0,
            replica_version: 0,
        })?;
        Ok(engine)
    }

    fn build(ctx: Ctx, n: usize, opt: OptimizerSettings, opts: &GpuOptions) -> Result<Self, EngineError> {
        match opts.fault {
            Some(Fault::Shader) => {
                let _ = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("injected fault"),
                    source: wgpu::ShaderSource::Wgsl("fn main( {".into()),
                });
            }
            Some(Fault::Allocation) => {
                let _ = over_limit_buffer(&ctx);
            }
            _ => {}
        }
        let max_chunk = (ctx.max_binding() / 4) as usize;
        let chunk = opts.chunk_elems.unwrap_or(max_chunk).clamp(1, max_chunk);
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("delta"),
            entries: &[util::uniform_entry(0), util::read_entry(1), util::read_entry(2), util::rw_entry(3)],
        });
        let delta = util::pipeline(&ctx, &layout, &shaders::DELTA, &[], "main");
        let placeholder = util::storage(&ctx, "placeholder", 4, wgpu::BufferUsages::empty());
        let mut uniforms = UniformSlots::new(&ctx, "delta.params", n.div_ceil(chunk).max(1));
        let momentum = opt.momentum != 0.0;
        let mut chunks = Vec::new();
        let mut delta_slots = Vec::new();
        let mut base = 0;
        while base < n {
            let len = chunk.min(n - base);
            let bytes = 4 * len as u64;
            let mk = |name: &str| util::storage(&ctx, name, bytes, wgpu::BufferUsages::empty());
            let (x, xhat, acc, d) = (mk("x"), mk("xhat"), mk("acc"), mk("d"));
            let m = momentum.then(|| mk("momentum"));
            delta_slots.push(uniforms.push(&DeltaParams { n: len as u32, _p: [0; 3] }));
            chunks.push((base, len, x, xhat, acc, d, m));
            base += len;
        }
        uniforms.upload(&ctx);
        let chunks = chunks
            .into_iter()
            .map(|(base, len, x, xhat, acc, d, m)| {
                let delta_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("delta"),
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: uniforms.binding(16) },
                        util::buf(1, &x),
                        util::buf(2, &xhat),
                        util::buf(3, &d),
                    ],
                });
                ModelChunk { base, len, x, xhat, acc, d, m, delta_group }
            })
            .collect();
        let order = match opts.mode {
            GpuMode::Deterministic => Order::Deterministic,
            GpuMode::Fast => Order::Fast,
        };
        Ok(Self {
            step: Step::new(ctx.clone(), order),
            topk: GpuTopk::new(ctx.clone()),
            n,
            opt,
            mode: opts.mode,
            chunks,
            placeholder,
            version: 0,
            replica_version: 0,
            delta,
            delta_slots,
            _delta_uniforms: uniforms,
            readback: Readback::new(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fault: opts.fault,
            broadcasts: 0,
            encode_time: std::time::Duration::ZERO,
            ctx,
        })
    }

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Number of storage chunks.
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// How the step adds (deterministic batch order, or the fast mode's kind).
    pub fn fast_kind(&self) -> String {
        self.step.kind()
    }

    /// Recomputes d = x − x̂ over the whole model (after the state was replaced).
    fn refresh_delta(&mut self) {
        let mut enc = util::encoder(&self.ctx, "delta");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("delta"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.delta);
            for (c, &slot) in self.chunks.iter().zip(&self.delta_slots) {
                pass.set_bind_group(0, &c.delta_group, &[slot]);
                let (x, y) = util::grid(c.len as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    fn read_chunks(&mut self, pick: impl Fn(&ModelChunk) -> &wgpu::Buffer) -> Result<Vec<f32>, EngineError> {
        let enc = util::encoder(&self.ctx, "read");
        let ranges: Vec<(&wgpu::Buffer, u64, u64)> =
            self.chunks.iter().map(|c| (pick(c), 0, 4 * c.len as u64)).collect();
        let bytes = self.readback.read(&self.ctx, enc, &ranges)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn write_chunks(&self, values: &[f32], pick: impl Fn(&ModelChunk) -> &wgpu::Buffer) {
        for c in &self.chunks {
            if c.len > 0 && c.base < values.len() {
                let part: Vec<f32> = values[c.base..c.base + c.len].iter().copied().map(canon).collect();
                self.ctx.queue.write_buffer(pick(c), 0, bytemuck::cast_slice(&part));
            }
        }
    }

    fn momentum(&self) -> Option<f32> {
        (self.opt.momentum != 0.0).then_some(self.opt.momentum)
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<(), EngineError> {
        self.ctx.wait()
    }

    /// The Top-k kernels' own counters.
    pub fn topk_counters(&self) -> topk::TopkCounters {
        self.topk.counters()
    }
}

/// A buffer one byte over the device's limit: a validation error, like a failed allocation.
fn over_limit_buffer(ctx: &GpuContext) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("injected fault"),
        size: ctx.limits.max_buffer_size.saturating_add(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

impl Aggregator for GpuAggregator {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "gpu".into(),
            adapter: self.ctx.info.name.clone(),
            backend: format!("{:?}", self.ctx.info.backend),
            mode: match self.mode {
                GpuMode::Deterministic => "deterministic".into(),
                GpuMode::Fast => format!("fast ({})", self.step.kind()),
            },
        }
    }

    fn num_params(&self) -> usize {
        self.n
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn replica_version(&self) -> u64 {
        self.replica_version
    }

    fn aggregate(&mut self, batch: &[UpdateRef<'_>]) -> Result<(), EngineError> {
        let ctx = self.ctx.clone();
        let step_number = self.step.counters().steps + 1;
        if self.fault == Some(Fault::StepAllocation(step_number)) {
            return ctx.scoped("aggregation step", || {
                let _ = over_limit_buffer(&ctx);
                Ok(())
            });
        }
        let momentum = self.momentum();
        let eta = self.opt.server_lr;
        let id = self.id;
        let chunks: Vec<StepChunk<'_>> = self
            .chunks
            .iter()
            .map(|c| StepChunk {
                base: c.base as u64,
                len: c.len as u64,
                acc: &c.acc,
                x: &c.x,
                xhat: &c.xhat,
                d: &c.d,
                m: c.m.as_ref().unwrap_or(&self.placeholder),
            })
            .collect();
        let step = &mut self.step;
        ctx.scoped("aggregation step", || step.run(batch, &chunks, id, momentum, eta))?;
        self.version += 1;
        Ok(())
    }

    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError> {
        let ctx = self.ctx.clone();
        if self.fault == Some(Fault::BroadcastAllocation(self.broadcasts + 1)) {
            return ctx
                .scoped("broadcast selection", || {
                    let _ = over_limit_buffer(&ctx);
                    Ok(())
                })
                .and_then(|_| Err(EngineError::Gpu("injected fault did not fail".into())));
        }
        let chunks: Vec<TopkChunk<'_>> = self
            .chunks
            .iter()
            .map(|c| TopkChunk { d: &c.d, replica: Some((&c.xhat, &c.x)), len: c.len })
            .collect();
        let topk = &mut self.topk;
        let sel = ctx.scoped("broadcast selection", || topk.select(&chunks, selection, true))?;
        self.broadcasts += 1;
        let header = DeltaHeader { version: self.version, base_version: self.replica_version, nnz: sel.nnz };
        self.replica_version = self.version;
        let t0 = std::time::Instant::now();
        let frame = encode_delta_with_body(&header, &sel.body);
        self.encode_time += t0.elapsed();
        Ok(Broadcast { header, frame, exact: matches!(selection, Selection::Exact { .. }) })
    }

    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError> {
        let ctx = self.ctx.clone();
        ctx.scoped("reading the replica", || self.read_chunks(|c| &c.xhat))
    }

    fn take_stage_times(&mut self) -> crate::engine::StageTimes {
        crate::engine::StageTimes {
            upload: std::mem::take(&mut self.step.upload_time),
            encode: std::mem::take(&mut self.encode_time),
        }
    }

    fn counters(&self) -> EngineCounters {
        let s = self.step.counters();
        let t = self.topk.counters();
        EngineCounters {
            steps: s.steps,
            broadcasts: self.broadcasts,
            topk_input_passes: t.input_passes,
            topk_recollections: t.recollections,
            topk_misses: t.misses,
            dispatches: s.dispatches + t.dispatches,
            submits: s.submits + t.waits,
            waits: t.waits,
            staging_allocations: s.staging_allocations,
            uploaded_bytes: s.uploaded_bytes,
        }
    }

    fn read_state(&mut self) -> Result<ModelState, EngineError> {
        let ctx = self.ctx.clone();
        ctx.scoped("reading the state", || {
            let x = self.read_chunks(|c| &c.x)?;
            let replica = self.read_chunks(|c| &c.xhat)?;
            let momentum = if self.opt.momentum != 0.0 {
                self.read_chunks(|c| c.m.as_ref().expect("momentum buffers exist when momentum is on"))?
            } else {
                Vec::new()
            };
            Ok(ModelState {
                x,
                momentum,
                replica,
                version: self.version,
                replica_version: self.replica_version,
            })
        })
    }

    fn load_state(&mut self, s: &ModelState) -> Result<(), EngineError> {
        for len in [s.x.len(), s.replica.len()] {
            if len != self.n {
                return Err(EngineError::StateSize { expected: self.n, got: len });
            }
        }
        let ctx = self.ctx.clone();
        ctx.scoped("loading the state", || {
            self.write_chunks(&s.x, |c| &c.x);
            self.write_chunks(&s.replica, |c| &c.xhat);
            let mut enc = util::encoder(&self.ctx, "load");
            for c in &self.chunks {
                enc.clear_buffer(&c.acc, 0, None);
                if let Some(m) = &c.m
                    && s.momentum.len() != self.n
                {
                    enc.clear_buffer(m, 0, None);
                }
            }
            self.ctx.queue.submit([enc.finish()]);
            if self.opt.momentum != 0.0 && s.momentum.len() == self.n {
                self.write_chunks(&s.momentum, |c| c.m.as_ref().expect("momentum buffers exist"));
            }
            self.refresh_delta();
            self.topk.forget();
            self.version = s.version;
            self.replica_version = s.replica_version;
            self.wait()
        })
    }
}
