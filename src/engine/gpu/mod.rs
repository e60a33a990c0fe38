//! `GpuAggregator`: the aggregation engine on wgpu, with the kernels of `shaders/`.
//!
//! The model lives in chunks (x, x̂, the accumulator, d, and the momentum when μ ≠ 0), each at
//! most one storage binding, so any model size works on any adapter. One step is: the
//! scatter-add of the batch into the accumulators (deterministic: one dispatch per update
//! segment in batch order; fast: one dispatch per chunk with atomics), then the dense apply
//! (momentum, x update, d = x − x̂), then — on broadcast — the Top-k selection of d, which also
//! applies the sent values to x̂.

pub mod aggregate;
pub mod device;
pub mod shaders;
pub mod topk;
pub mod util;

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use self::aggregate::{Scatter, ScatterChunk};
use self::device::{DeviceOptions, GpuContext};
use self::topk::{GpuTopk, TopkChunk};
use self::util::{Ctx, Readback, UniformSlots};
use super::{
    Aggregator, Broadcast, EngineError, EngineInfo, ModelState, OptimizerSettings, Selection, UpdateRef,
};
use crate::config::{GpuMode, ServerConfig};
use crate::protocol::frame::{DeltaHeader, encode_delta_with_body};
use crate::protocol::numerics::canon;

/// Keep in sync: `ApplyParams` in shaders/apply.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct ApplyParams {
    n: u32,
    mu: f32,
    eta: f32,
    flags: u32,
}

/// GPU engine options.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub mode: GpuMode,
    /// Elements per storage chunk (default: as many as one binding holds).
    pub chunk_elems: Option<usize>,
    pub device: DeviceOptions,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self { mode: GpuMode::Deterministic, chunk_elems: None, device: DeviceOptions::default() }
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
    apply_group: wgpu::BindGroup,
}

/// The GPU aggregation engine.
pub struct GpuAggregator {
    ctx: Ctx,
    n: usize,
    opt: OptimizerSettings,
    mode: GpuMode,
    chunks: Vec<ModelChunk>,
    version: u64,
    replica_version: u64,
    scatter: Scatter,
    apply: wgpu::ComputePipeline,
    apply_slots: Vec<u32>,
    topk: GpuTopk,
    readback: Readback,
    /// d no longer reflects x − x̂ (after a broadcast or a load): recompute before selecting.
    d_stale: bool,
    /// Identifies this engine's chunk buffers for the scatter's bind group cache.
    id: u64,
    encode_time: std::time::Duration,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl GpuAggregator {
    /// Opens the device the config names and uploads the model.
    ///
    /// With `--engine auto`, software adapters (lavapipe and the like) are not considered: on
    /// such a machine the CPU engine is faster.
    pub fn from_config(
        cfg: &ServerConfig,
        values: &[f32],
        opt: OptimizerSettings,
    ) -> Result<Self, EngineError> {
        let auto = cfg.engine == crate::config::EngineChoice::Auto && !cfg.require_gpu;
        let opts = GpuOptions {
            mode: cfg.gpu_mode,
            chunk_elems: cfg.chunk_elems,
            device: DeviceOptions { adapter: cfg.adapter.clone(), hardware_only: auto, ..Default::default() },
        };
        Self::new(values, opt, &opts)
    }

    pub fn new(values: &[f32], opt: OptimizerSettings, opts: &GpuOptions) -> Result<Self, EngineError> {
        let ctx = device::open(&opts.device)?;
        Self::with_context(ctx, values, opt, opts)
    }

    /// Builds the engine on an open device (tests and benches share one device).
    pub fn with_context(
        ctx: Arc<GpuContext>,
        values: &[f32],
        opt: OptimizerSettings,
        opts: &GpuOptions,
    ) -> Result<Self, EngineError> {
        let n = values.len();
        if n == 0 {
            return Err(EngineError::StateSize { expected: 1, got: 0 });
        }
        let max_chunk = (ctx.max_binding() / 4) as usize;
        let chunk = opts.chunk_elems.unwrap_or(max_chunk).clamp(1, max_chunk);
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("apply"),
            entries: &[
                util::uniform_entry(0),
                util::rw_entry(1),
                util::rw_entry(2),
                util::read_entry(3),
                util::rw_entry(4),
                util::rw_entry(5),
            ],
        });
        let apply = util::pipeline(&ctx, &layout, &shaders::APPLY, &[], "main");
        let placeholder = util::storage(&ctx, "placeholder", 4, wgpu::BufferUsages::empty());
        let mut slots = UniformSlots::new(&ctx, "apply.params", n.div_ceil(chunk).max(1));
        let momentum = opt.momentum != 0.0;
        let flags = (momentum as u32) | (((opt.server_lr != 1.0) as u32) << 1);
        let mut chunks = Vec::new();
        let mut apply_slots = Vec::new();
        let mut base = 0;
        while base < n {
            let len = chunk.min(n - base);
            let bytes = 4 * len as u64;
            let mk = |name: &str| util::storage(&ctx, name, bytes, wgpu::BufferUsages::empty());
            let (x, xhat, acc, d) = (mk("x"), mk("xhat"), mk("acc"), mk("d"));
            let m = momentum.then(|| mk("momentum"));
            apply_slots.push(slots.push(&ApplyParams {
                n: len as u32,
                mu: opt.momentum,
                eta: opt.server_lr,
                flags,
            }));
            chunks.push((base, len, x, xhat, acc, d, m));
            base += len;
        }
        slots.upload(&ctx);
        let chunks = chunks
            .into_iter()
            .map(|(base, len, x, xhat, acc, d, m)| {
                let apply_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("apply"),
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: slots.binding(16) },
                        util::buf(1, &acc),
                        util::buf(2, &x),
                        util::buf(3, &xhat),
                        util::buf(4, &d),
                        util::buf(5, m.as_ref().unwrap_or(&placeholder)),
                    ],
                });
                ModelChunk { base, len, x, xhat, acc, d, m, apply_group }
            })
            .collect();
        let mut engine = Self {
            scatter: Scatter::new(ctx.clone()),
            topk: GpuTopk::new(ctx.clone()),
            n,
            opt,
            mode: opts.mode,
            chunks,
            version: 0,
            replica_version: 0,
            apply,
            apply_slots,
            readback: Readback::new(),
            d_stale: true,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            encode_time: std::time::Duration::ZERO,
            ctx,
        };
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

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Number of storage chunks.
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// How the fast mode adds ("native f32 atomicAdd" or "compare-exchange loop").
    pub fn fast_kind(&self) -> String {
        self.scatter.fast_kind()
    }

    fn dense_step(&mut self) {
        let mut enc = util::encoder(&self.ctx, "apply");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("apply"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.apply);
            for (c, &slot) in self.chunks.iter().zip(&self.apply_slots) {
                pass.set_bind_group(0, &c.apply_group, &[slot]);
                let (x, y) = util::grid(c.len as u64);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        self.d_stale = false;
    }

    fn read_chunks(&mut self, pick: impl Fn(&ModelChunk) -> &wgpu::Buffer) -> Result<Vec<f32>, EngineError> {
        if self.n == 0 {
            return Ok(Vec::new());
        }
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

    /// Benchmarks: uploads a batch for [`GpuAggregator::bench_scatter`] (no step is taken).
    pub fn bench_prepare(
        &mut self,
        batch: &[UpdateRef<'_>],
        fast: bool,
    ) -> Result<aggregate::Plan, EngineError> {
        let chunks: Vec<ScatterChunk<'_>> = self
            .chunks
            .iter()
            .map(|c| ScatterChunk { acc: &c.acc, base: c.base as u64, len: c.len as u64 })
            .collect();
        self.scatter.prepare(batch, &chunks, self.id, fast)
    }

    /// Benchmarks: runs the scatter kernels of a prepared batch again (into the accumulators;
    /// the model is unchanged until the next step).
    pub fn bench_scatter(&self, plan: &aggregate::Plan) {
        self.scatter.dispatch(plan);
    }

    /// Benchmarks: the dense apply alone.
    pub fn bench_apply(&mut self) {
        self.dense_step();
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<(), EngineError> {
        self.ctx.wait()
    }
}

impl Aggregator for GpuAggregator {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "gpu".into(),
            adapter: self.ctx.info.name.clone(),
            backend: format!("{:?}", self.ctx.info.backend),
            mode: match self.mode {
                GpuMode::Deterministic => "deterministic".into(),
                GpuMode::Fast => format!("fast ({})", self.scatter.fast_kind()),
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
        let chunks: Vec<ScatterChunk<'_>> = self
            .chunks
            .iter()
            .map(|c| ScatterChunk { acc: &c.acc, base: c.base as u64, len: c.len as u64 })
            .collect();
        self.scatter.run(batch, &chunks, self.id, self.mode == GpuMode::Fast)?;
        self.dense_step();
        self.version += 1;
        Ok(())
    }

    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError> {
        if self.d_stale {
            // Accumulators are zero: this recomputes d and leaves x unchanged.
            self.dense_step();
        }
        let chunks: Vec<TopkChunk<'_>> =
            self.chunks.iter().map(|c| TopkChunk { d: &c.d, xhat: &c.xhat, len: c.len }).collect();
        let sel = self.topk.select(&chunks, selection, true)?;
        self.d_stale = true;
        let header = DeltaHeader { version: self.version, base_version: self.replica_version, nnz: sel.nnz };
        self.replica_version = self.version;
        let t0 = std::time::Instant::now();
        let frame = encode_delta_with_body(&header, &sel.body);
        self.encode_time += t0.elapsed();
        Ok(Broadcast { header, frame, exact: matches!(selection, Selection::Exact { .. }) })
    }

    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError> {
        self.read_chunks(|c| &c.xhat)
    }

    fn take_stage_times(&mut self) -> crate::engine::StageTimes {
        crate::engine::StageTimes {
            upload: std::mem::take(&mut self.scatter.upload_time),
            encode: std::mem::take(&mut self.encode_time),
        }
    }

    fn read_state(&mut self) -> Result<ModelState, EngineError> {
        let x = self.read_chunks(|c| &c.x)?;
        let replica = self.read_chunks(|c| &c.xhat)?;
        let momentum = if self.opt.momentum != 0.0 {
            self.read_chunks(|c| c.m.as_ref().expect("momentum buffers exist when momentum is on"))?
        } else {
            Vec::new()
        };
        Ok(ModelState { x, momentum, replica, version: self.version, replica_version: self.replica_version })
    }

    fn load_state(&mut self, s: &ModelState) -> Result<(), EngineError> {
        for len in [s.x.len(), s.replica.len()] {
            if len != self.n {
                return Err(EngineError::StateSize { expected: self.n, got: len });
            }
        }
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
        self.version = s.version;
        self.replica_version = s.replica_version;
        self.d_stale = true;
        self.wait()
    }
}
