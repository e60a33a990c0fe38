//! Kernel benchmarks: the aggregation scatter and the broadcast Top-k, each against a plain
//! device copy of the same bytes measured in the same run (the bandwidth limit).

use std::sync::Arc;
use std::time::Instant;

use half::f16;
use serde::Serialize;

use crate::config::GpuMode;
use crate::engine::cpu::CpuAggregator;
use crate::engine::gpu::aggregate::Replay;
use crate::engine::gpu::device::GpuContext;
use crate::engine::gpu::topk::{GpuTopk, TopkChunk};
use crate::engine::gpu::util::{self, Readback, Timer, UniformSlots};
use crate::engine::gpu::{GpuAggregator, GpuOptions, shaders};
use crate::engine::sharded::ShardedAggregator;
use crate::engine::{
    Aggregator, EngineError, KernelProbe, OptimizerSettings, SelectProbe, Selection, UpdateRef,
};
use crate::protocol::frame::{PushHeader, PushLimits, PushView, encode_push};
use crate::protocol::model::SplitMix64;

/// Median of repeated timings of `f` (seconds).
pub fn median_time(reps: usize, mut f: impl FnMut() -> Result<(), EngineError>) -> Result<f64, EngineError> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// A device copy kernel (`shaders/copy.wgsl`) over buffers of `bytes` bytes.
pub struct CopyKernel {
    ctx: Arc<GpuContext>,
    pipeline: wgpu::ComputePipeline,
    groups: Vec<(wgpu::BindGroup, u32, u64)>,
    timer: Option<Timer>,
    readback: Readback,
}

impl CopyKernel {
    /// Buffers of `bytes` in total, split into pieces of at most one binding.
    pub fn new(ctx: Arc<GpuContext>, bytes: u64) -> Self {
        let piece = ctx.max_binding();
        Self::with_pieces(ctx, bytes, piece)
    }

    /// Buffers of `bytes` in total, split into pieces of at most `piece` bytes.
    pub fn with_pieces(ctx: Arc<GpuContext>, bytes: u64, piece: u64) -> Self {
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("copy"),
            entries: &[util::uniform_entry(0), util::read_entry(1), util::rw_entry(2)],
        });
        let pipeline = util::pipeline(&ctx, &layout, &shaders::COPY, &[], "main");
        let piece = piece.min(ctx.max_binding()).max(16) & !15;
        let mut slots = UniformSlots::new(&ctx, "copy.params", 4);
        let mut parts = Vec::new();
        let mut left = bytes.next_multiple_of(16).max(16);
        while left > 0 {
            let b = left.min(piece);
            let src = util::storage(&ctx, "copy.src", b, wgpu::BufferUsages::empty());
            let dst = util::storage(&ctx, "copy.dst", b, wgpu::BufferUsages::empty());
            let slot = slots.push(&[(b / 16) as u32, 0, 0, 0]);
            parts.push((src, dst, slot, b / 16));
            left -= b;
        }
        slots.upload(&ctx);
        let groups = parts
            .iter()
            .map(|(src, dst, slot, words)| {
                let g = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("copy"),
                    layout: &layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: slots.binding(16) },
                        util::buf(1, src),
                        util::buf(2, dst),
                    ],
                });
                (g, *slot, *words)
            })
            .collect();
        let timer = Timer::new(&ctx);
        Self { ctx, pipeline, groups, timer, readback: Readback::new() }
    }

    /// One copy of every piece; waits for it. Returns the device seconds it took (None
    /// without timestamp queries).
    pub fn run(&mut self) -> Result<Option<f64>, EngineError> {
        let mut enc = util::encoder(&self.ctx, "copy");
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("copy"),
                timestamp_writes: self.timer.as_ref().and_then(|t| t.writes(true, true)),
            });
            pass.set_pipeline(&self.pipeline);
            for (g, slot, words) in &self.groups {
                pass.set_bind_group(0, g, &[*slot]);
                let (x, y) = util::grid(*words);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        match &self.timer {
            Some(t) => {
                t.resolve(&mut enc);
                let bytes = self.readback.read(&self.ctx, enc, &[(&t.resolved, 0, 16)])?;
                Ok(t.seconds(&bytes))
            }
            None => {
                self.ctx.queue.submit([enc.finish()]);
                self.ctx.wait().map(|_| None)
            }
        }
    }

    /// Median seconds of a copy over `reps`: device time where the device has timestamp
    /// queries, else wall time including the submission.
    pub fn median(&mut self, reps: usize) -> Result<f64, EngineError> {
        self.run()?;
        let mut t = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            let s = Instant::now();
            let device = self.run()?;
            t.push(device.unwrap_or_else(|| s.elapsed().as_secs_f64()));
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }
}

/// One device copy measurement (`sparsync bench copy`).
#[derive(Clone, Debug, Serialize)]
pub struct CopyRow {
    /// Bytes read (and as many written).
    pub bytes: u64,
    /// Largest buffer of the copy.
    pub piece_bytes: u64,
    pub time_s: f64,
    /// (read + written bytes) / time.
    pub gbps: f64,
    pub timing: String,
}

/// Device copies of `sizes` bytes, in one buffer pair and in `piece`-byte buffers (to tell
/// whether large buffers copy slower).
pub fn copy_sweep(
    ctx: &Arc<GpuContext>,
    sizes: &[u64],
    piece: u64,
    reps: usize,
) -> Result<Vec<CopyRow>, EngineError> {
    let timing = if ctx.timestamps { "device" } else { "wall" };
    let mut rows = Vec::new();
    for &bytes in sizes {
        for p in [ctx.max_binding(), piece] {
            let mut c = CopyKernel::with_pieces(ctx.clone(), bytes, p);
            let t = c.median(reps)?;
            rows.push(CopyRow {
                bytes,
                piece_bytes: p.min(bytes),
                time_s: t,
                gbps: 2.0 * bytes as f64 / t / 1e9,
                timing: timing.into(),
            });
        }
    }
    Ok(rows)
}

/// A batch of `updates` random updates of `density` over `n` parameters, as Push frames.
pub fn random_batch(n: usize, density: f64, updates: usize, seed: u64) -> Vec<Vec<u8>> {
    let nnz = ((n as f64 * density).ceil() as usize).clamp(1, n);
    let mut rng = SplitMix64::new(seed);
    (0..updates)
        .map(|u| {
            // Evenly spread random indices (one per stride window): ascending, unique, and the
            // same contention profile as real Top-k updates.
            let stride = n / nnz;
            let idx: Vec<u32> =
                (0..nnz).map(|i| (i * stride + (rng.next_u64() as usize % stride)) as u32).collect();
            let vals: Vec<f16> =
                (0..nnz).map(|_| f16::from_f32((rng.next_unit_f32() - 0.5) * 0.01)).collect();
            let h = PushHeader {
                base_version: 0,
                seq: u as u64,
                samples: 32,
                local_steps: 1,
                loss: 1.0,
                nnz: nnz as u32,
            };
            encode_push(&h, &idx, &vals)
        })
        .collect()
}

fn refs(frames: &[Vec<u8>], n: usize) -> Vec<UpdateRef<'_>> {
    let limits = PushLimits { num_params: n as u64, max_nnz: n as u64 };
    let w = 1.0 / frames.len() as f32;
    frames
        .iter()
        .map(|f| UpdateRef::from_push(&PushView::decode(f, &limits).expect("bench frames are valid"), w))
        .collect()
}

/// The floor the CPU engine is measured against: a plain single-threaded loop with the
/// engine's rounding rules (split weights, exact products, canonicalised adds, batch order)
/// over the same batch, then the apply of every touched entry (no momentum, η = 1).
struct FloorKernel {
    x: Vec<f32>,
    acc: Vec<f32>,
}

impl FloorKernel {
    fn new(x0: &[f32]) -> Self {
        Self { x: x0.to_vec(), acc: vec![0.0; x0.len()] }
    }

    fn step(&mut self, batch: &[UpdateRef<'_>]) {
        for u in batch {
            let (hi, lo) = crate::protocol::numerics::split_weight(u.weight);
            for (i, v) in u.indices.chunks_exact(4).zip(u.values.chunks_exact(2)) {
                let i = u32::from_le_bytes([i[0], i[1], i[2], i[3]]) as usize;
                let v = f16::from_le_bytes([v[0], v[1]]).to_f32();
                self.acc[i] = crate::protocol::numerics::accumulate(self.acc[i], hi, lo, v);
            }
        }
        for u in batch {
            for i in u.indices.chunks_exact(4) {
                let i = u32::from_le_bytes([i[0], i[1], i[2], i[3]]) as usize;
                let g = std::mem::take(&mut self.acc[i]);
                if g != 0.0 {
                    self.x[i] = crate::protocol::numerics::add(self.x[i], g);
                }
            }
        }
        std::hint::black_box(&self.x);
    }
}

/// One aggregation measurement.
#[derive(Clone, Debug, Serialize)]
pub struct AggregateRow {
    pub engine: String,
    pub params: usize,
    pub batch: usize,
    pub density: f64,
    /// (index, value) pairs in the batch.
    pub entries: u64,
    /// Bytes of indices and values read.
    pub payload_bytes: u64,
    /// Payload plus accumulator traffic (read and write, 8 bytes per entry).
    pub traffic_bytes: u64,
    /// Median seconds of the step's kernels alone (GPU: the sum and the apply, data already
    /// on the device; device time where the device has timestamp queries, else wall time).
    pub scatter_s: f64,
    /// Median wall seconds of a whole aggregation step (staging, upload, kernels, waited).
    pub step_s: f64,
    /// GPU dispatches per step (CPU: 0).
    pub dispatches_per_step: f64,
    /// Staging buffers created during the timed steps (steady state: 0).
    pub staging_allocations: u64,
    /// "device" (timestamp queries) or "wall" for scatter_s and the copy.
    pub timing: String,
    /// GPU: median seconds of the bounds passes alone, and of the block passes alone.
    pub bounds_s: f64,
    pub blocks_s: f64,
    /// CPU engine rows: step_s ÷ the cpu-floor row's (a plain single-threaded loop with the
    /// same rounding rules over the same batch, same run).
    pub ratio_to_floor: Option<f64>,
    pub updates_per_s: f64,
    /// traffic_bytes / scatter_s.
    pub effective_gbps: f64,
    /// A plain copy of traffic_bytes / 2 (read) + traffic_bytes / 2 (write), same run.
    pub copy_gbps: f64,
    /// effective_gbps / copy_gbps.
    pub ratio_to_copy: f64,
}

/// Settings of `sparsync bench aggregate`.
#[derive(Clone, Debug)]
pub struct AggregateSpec {
    pub sizes: Vec<usize>,
    pub batches: Vec<usize>,
    pub density: f64,
    pub reps: usize,
    pub cpu: bool,
}

fn cpu_copy_gbps(bytes: u64, reps: usize) -> f64 {
    let half = (bytes / 2).max(1) as usize;
    let src = vec![1u8; half];
    let mut dst = vec![0u8; half];
    let t = median_time(reps, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        Ok(())
    })
    .unwrap_or(f64::NAN);
    (2 * half) as f64 / t / 1e9
}

/// Runs the aggregation benchmark; `ctx` is None when there is no GPU (CPU rows only).
pub fn aggregate(
    ctx: Option<&Arc<GpuContext>>,
    spec: &AggregateSpec,
    mut progress: impl FnMut(&str),
) -> Result<Vec<AggregateRow>, EngineError> {
    let mut rows = Vec::new();
    for &n in &spec.sizes {
        let x0: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
        for &b in &spec.batches {
            let frames = random_batch(n, spec.density, b, n as u64 ^ b as u64);
            let batch = refs(&frames, n);
            let entries: u64 = batch.iter().map(|u| u.nnz() as u64).sum();
            let payload: u64 = batch.iter().map(|u| u.payload.len() as u64).sum();
            let traffic = payload + 8 * entries;
            let mut row = |engine: &str,
                           parts: (f64, f64),
                           scatter_s: f64,
                           step_s: f64,
                           copy_gbps: f64,
                           dispatches_per_step: f64,
                           staging_allocations: u64,
                           timing: &str,
                           ratio_to_floor: Option<f64>| {
                let effective = traffic as f64 / scatter_s / 1e9;
                rows.push(AggregateRow {
                    engine: engine.into(),
                    params: n,
                    batch: b,
                    density: spec.density,
                    entries,
                    payload_bytes: payload,
                    traffic_bytes: traffic,
                    scatter_s,
                    step_s,
                    updates_per_s: b as f64 / step_s,
                    effective_gbps: effective,
                    copy_gbps,
                    ratio_to_copy: effective / copy_gbps,
                    dispatches_per_step,
                    staging_allocations,
                    timing: timing.into(),
                    bounds_s: parts.0,
                    blocks_s: parts.1,
                    ratio_to_floor,
                });
            };
            if let Some(ctx) = ctx {
                let mut copy = CopyKernel::new(ctx.clone(), traffic / 2);
                let copy_s = copy.median(spec.reps)?;
                let copy_gbps = traffic as f64 / copy_s / 1e9;
                let timing = if ctx.timestamps { "device" } else { "wall" };
                for mode in [GpuMode::Deterministic, GpuMode::Fast] {
                    progress(&format!("aggregate n={n} batch={b} gpu {mode:?}"));
                    let opts = GpuOptions { mode, ..Default::default() };
                    let mut e =
                        GpuAggregator::with_context(ctx.clone(), &x0, OptimizerSettings::default(), &opts)?;
                    e.time_kernels();
                    // Warm-up: pipelines, buffers, the staging pool.
                    e.aggregate(&batch)?;
                    e.wait()?;
                    let before = e.counters();
                    let step_s = median_time(spec.reps, || {
                        e.aggregate(&batch)?;
                        e.wait()
                    })?;
                    let after = e.counters();
                    let steps = (after.steps - before.steps).max(1) as f64;
                    let mut replays = |which: Replay| -> Result<f64, EngineError> {
                        let mut t = Vec::with_capacity(spec.reps);
                        for _ in 0..spec.reps.max(1) {
                            let s = Instant::now();
                            if !e.replay(which)? {
                                break;
                            }
                            let wall = s.elapsed().as_secs_f64();
                            t.push(e.device_time()?.unwrap_or(wall));
                        }
                        t.sort_by(f64::total_cmp);
                        Ok(t.get(t.len() / 2).copied().unwrap_or(f64::NAN))
                    };
                    let scatter_s = replays(Replay::All)?;
                    let parts = (replays(Replay::Bounds)?, replays(Replay::Main)?);
                    let scatter_s = if scatter_s.is_nan() { step_s } else { scatter_s };
                    let name = match mode {
                        GpuMode::Deterministic => "gpu-deterministic".to_string(),
                        GpuMode::Fast => format!("gpu-fast ({})", e.fast_kind()),
                    };
                    row(
                        &name,
                        parts,
                        scatter_s,
                        step_s,
                        copy_gbps,
                        (after.dispatches - before.dispatches) as f64 / steps,
                        after.staging_allocations - before.staging_allocations,
                        timing,
                        None,
                    );
                }
            }
            if spec.cpu {
                let copy_gbps = cpu_copy_gbps(traffic, spec.reps);
                progress(&format!("aggregate n={n} batch={b} cpu floor"));
                let mut floor = FloorKernel::new(&x0);
                let floor_s = median_time(spec.reps, || {
                    floor.step(&batch);
                    Ok(())
                })?;
                row("cpu-floor", (f64::NAN, f64::NAN), floor_s, floor_s, copy_gbps, 0.0, 0, "wall", None);
                let mut time_cpu = |name: String, e: &mut dyn Aggregator| -> Result<(), EngineError> {
                    progress(&format!("aggregate n={n} batch={b} {name}"));
                    let step_s = median_time(spec.reps, || e.aggregate(&batch))?;
                    let ratio = Some(step_s / floor_s);
                    row(&name, (f64::NAN, f64::NAN), step_s, step_s, copy_gbps, 0.0, 0, "wall", ratio);
                    Ok(())
                };
                let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
                let mut counts = vec![1, cores];
                counts.dedup();
                for threads in counts {
                    let mut e =
                        CpuAggregator::with_threads(x0.clone(), OptimizerSettings::default(), threads);
                    time_cpu(
                        format!("cpu ({threads} thread{})", if threads == 1 { "" } else { "s" }),
                        &mut e,
                    )?;
                }
                // The same cores as key-range shards of one thread each (`serve --shards`).
                if cores > 1 {
                    let mut e = ShardedAggregator::new(x0.clone(), OptimizerSettings::default(), cores, 1);
                    time_cpu(format!("cpu ({cores} shards × 1 thread)"), &mut e)?;
                }
            }
        }
    }
    Ok(rows)
}

/// One Top-k measurement.
#[derive(Clone, Debug, Serialize)]
pub struct TopkRow {
    pub engine: String,
    pub n: usize,
    pub k: usize,
    pub density: f64,
    /// Median seconds of a steady-state selection (the previous one's threshold known): device
    /// time of its kernels where the device has timestamp queries, else wall time.
    pub time_s: f64,
    /// Median wall seconds of a steady-state selection, readback of the k entries included.
    pub wall_s: f64,
    /// A cold selection (no previous threshold), timed like time_s.
    pub cold_s: f64,
    pub elements_per_s: f64,
    /// Median seconds of one copy of the input (read 4n bytes, write 4n bytes), same run, timed
    /// like time_s.
    pub copy_s: f64,
    /// time_s / copy_s.
    pub passes_equivalent: f64,
    /// cold_s / copy_s.
    pub cold_passes_equivalent: f64,
    /// Full passes over the input per steady-state selection (the engine's counter).
    pub input_passes: f64,
    /// Full passes over the input of the cold selection.
    pub cold_input_passes: u64,
    /// "device" or "wall", as for the aggregation rows.
    pub timing: String,
}

/// Settings of `sparsync bench topk`.
#[derive(Clone, Debug)]
pub struct TopkSpec {
    pub sizes: Vec<usize>,
    pub densities: Vec<f64>,
    pub reps: usize,
    pub cpu: bool,
}

/// Gaussian values (Box–Muller), the usual shape of a model delta.
pub fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let (u1, u2) = (r.next_unit_f32().max(1e-7) as f64, r.next_unit_f32() as f64);
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 1e-3) as f32
        })
        .collect()
}

/// Runs the Top-k benchmark.
pub fn topk(
    ctx: Option<&Arc<GpuContext>>,
    spec: &TopkSpec,
    mut progress: impl FnMut(&str),
) -> Result<Vec<TopkRow>, EngineError> {
    let mut rows = Vec::new();
    for &n in &spec.sizes {
        let d = gaussian(n, n as u64);
        if let Some(ctx) = ctx {
            let chunk = (ctx.max_binding() / 4) as usize;
            let bufs: Vec<(wgpu::Buffer, usize)> = d
                .chunks(chunk)
                .map(|part| {
                    let b = util::storage(ctx, "bench.d", 4 * part.len() as u64, wgpu::BufferUsages::empty());
                    ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(part));
                    (b, part.len())
                })
                .collect();
            let chunks: Vec<TopkChunk<'_>> =
                bufs.iter().map(|(b, len)| TopkChunk { d: b, replica: None, len: *len }).collect();
            let mut copy = CopyKernel::new(ctx.clone(), 4 * n as u64);
            let copy_s = copy.median(spec.reps)?;
            let timing = if ctx.timestamps { "device" } else { "wall" };
            let mut t = GpuTopk::new(ctx.clone());
            t.time_kernels();
            for &rho in &spec.densities {
                let k = crate::protocol::select::k_for_density(rho, n);
                progress(&format!("topk n={n} k={k} gpu"));
                let sel = Selection::Exact { k };
                // Compile and size everything, then a cold selection.
                t.select(&chunks, sel, false)?;
                t.forget();
                let c0 = t.counters();
                let s = Instant::now();
                t.select(&chunks, sel, false)?;
                let cold_wall = s.elapsed().as_secs_f64();
                let cold_s = t.last_device_time().unwrap_or(cold_wall);
                let c1 = t.counters();
                let (mut walls, mut devices) = (Vec::new(), Vec::new());
                for _ in 0..spec.reps.max(1) {
                    let s = Instant::now();
                    t.select(&chunks, sel, false)?;
                    let wall = s.elapsed().as_secs_f64();
                    walls.push(wall);
                    devices.push(t.last_device_time().unwrap_or(wall));
                }
                let c2 = t.counters();
                walls.sort_by(f64::total_cmp);
                devices.sort_by(f64::total_cmp);
                let time_s = devices[devices.len() / 2];
                rows.push(TopkRow {
                    engine: "gpu-exact".into(),
                    n,
                    k,
                    density: rho,
                    time_s,
                    wall_s: walls[walls.len() / 2],
                    cold_s,
                    elements_per_s: n as f64 / time_s,
                    copy_s,
                    passes_equivalent: time_s / copy_s,
                    cold_passes_equivalent: cold_s / copy_s,
                    input_passes: (c2.input_passes - c1.input_passes) as f64
                        / (c2.selections - c1.selections).max(1) as f64,
                    cold_input_passes: c1.input_passes - c0.input_passes,
                    timing: timing.into(),
                });
            }
        }
        if spec.cpu {
            let mut src = vec![0u8; 4 * n];
            let mut dst = vec![0u8; 4 * n];
            src.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            let copy_s = median_time(spec.reps, || {
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&dst);
                Ok(())
            })?;
            // The engine's selection: d = x − x̂ with x̂ = 0, so d is the vector above.
            let state = crate::engine::ModelState {
                x: d.clone(),
                momentum: Vec::new(),
                replica: vec![0.0; n],
                version: 1,
                replica_version: 0,
            };
            let mut engine = CpuAggregator::new(d.clone(), OptimizerSettings::default());
            engine.load_state(&state).map_err(|e| EngineError::Gpu(e.to_string()))?;
            let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
            let mut sharded =
                ShardedAggregator::new(d.clone(), OptimizerSettings::default(), cores.max(2), 1);
            sharded.load_state(&state).map_err(|e| EngineError::Gpu(e.to_string()))?;
            for &rho in &spec.densities {
                let k = crate::protocol::select::k_for_density(rho, n);
                progress(&format!("topk n={n} k={k} cpu"));
                let c0 = engine.counters();
                let time_s = median_time(spec.reps, || {
                    std::hint::black_box(engine.select_only(k));
                    Ok(())
                })?;
                let c1 = engine.counters();
                let passes = (c1.topk_input_passes - c0.topk_input_passes) as f64 / spec.reps.max(1) as f64;
                // The same selection across key-range shards, one thread each, and their merge.
                let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
                if cores > 1 {
                    progress(&format!("topk n={n} k={k} cpu {cores} shards"));
                    let sharded_s = median_time(spec.reps, || {
                        std::hint::black_box(sharded.select_only(k));
                        Ok(())
                    })?;
                    rows.push(TopkRow {
                        engine: format!("cpu-exact ({cores} shards × 1 thread)"),
                        n,
                        k,
                        density: rho,
                        time_s: sharded_s,
                        wall_s: sharded_s,
                        cold_s: sharded_s,
                        elements_per_s: n as f64 / sharded_s,
                        copy_s,
                        passes_equivalent: sharded_s / copy_s,
                        cold_passes_equivalent: sharded_s / copy_s,
                        input_passes: f64::NAN,
                        cold_input_passes: 0,
                        timing: "wall".into(),
                    });
                }
                rows.push(TopkRow {
                    engine: "cpu-exact".into(),
                    n,
                    k,
                    density: rho,
                    time_s,
                    wall_s: time_s,
                    cold_s: time_s,
                    elements_per_s: n as f64 / time_s,
                    copy_s,
                    passes_equivalent: time_s / copy_s,
                    cold_passes_equivalent: time_s / copy_s,
                    input_passes: passes,
                    cold_input_passes: passes.round() as u64,
                    timing: "wall".into(),
                });
            }
        }
    }
    Ok(rows)
}
