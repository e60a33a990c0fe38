//! Small pieces every GPU kernel family uses: grid sizes, uniform slots addressed by dynamic
//! offsets, buffers, pipelines, readback.

use std::sync::Arc;

use super::device::GpuContext;
use super::shaders::{Composed, ShaderFile, compose};
use crate::engine::EngineError;

/// Invocations per workgroup in every kernel (`WG` in common.wgsl).
pub const WG: u64 = 256;
const MAX_DIM: u64 = 65535;

/// A 2-D grid of `groups` workgroups (x at most 65535).
pub fn grid_groups(groups: u64) -> (u32, u32) {
    let groups = groups.max(1);
    let x = groups.min(MAX_DIM);
    (x as u32, groups.div_ceil(x) as u32)
}

/// A grid with one invocation per item.
pub fn grid(items: u64) -> (u32, u32) {
    grid_groups(items.div_ceil(WG))
}

pub fn storage(ctx: &GpuContext, label: &str, bytes: u64, extra: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC
            | extra,
        mapped_at_creation: false,
    })
}

/// Bind group layout entry for a compute-stage buffer.
pub fn entry(binding: u32, ty: wgpu::BufferBindingType, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: dynamic, min_binding_size: None },
        count: None,
    }
}

pub fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    entry(binding, wgpu::BufferBindingType::Uniform, true)
}

pub fn read_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    entry(binding, wgpu::BufferBindingType::Storage { read_only: true }, false)
}

pub fn rw_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    entry(binding, wgpu::BufferBindingType::Storage { read_only: false }, false)
}

/// Compiles `file` (with `defines`) and builds a compute pipeline for `entry_point`.
pub fn pipeline(
    ctx: &GpuContext,
    layout: &wgpu::BindGroupLayout,
    file: &ShaderFile,
    defines: &[&str],
    entry_point: &str,
) -> wgpu::ComputePipeline {
    let module = module(ctx, file, defines);
    pipeline_from(ctx, layout, &module, file.name, entry_point)
}

pub fn module(ctx: &GpuContext, file: &ShaderFile, defines: &[&str]) -> wgpu::ShaderModule {
    let Composed { source, .. } = compose(file, defines);
    ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(file.name),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    })
}

pub fn pipeline_from(
    ctx: &GpuContext,
    layout: &wgpu::BindGroupLayout,
    module: &wgpu::ShaderModule,
    label: &str,
    entry_point: &str,
) -> wgpu::ComputePipeline {
    let pl = ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(layout)],
        immediate_size: 0,
    });
    ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry_point),
        layout: Some(&pl),
        module,
        entry_point: Some(entry_point),
        // Every kernel writes each workgroup variable before it reads it, so the zeroing wgpu
        // would add at the start of every workgroup (one invocation doing all of it on DX12
        // and Metal) is pure cost.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    })
}

/// A uniform buffer of 256-byte slots, one per dispatch, addressed by dynamic offset.
pub struct UniformSlots {
    pub buffer: wgpu::Buffer,
    capacity: usize,
    staged: Vec<u8>,
    label: &'static str,
    /// Bumped when the buffer is replaced (bind groups must be rebuilt).
    pub generation: u64,
}

pub const SLOT: usize = 256;

impl UniformSlots {
    pub fn new(ctx: &GpuContext, label: &'static str, capacity: usize) -> Self {
        Self { buffer: Self::alloc(ctx, label, capacity), capacity, staged: Vec::new(), label, generation: 0 }
    }

    fn alloc(ctx: &GpuContext, label: &str, capacity: usize) -> wgpu::Buffer {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (capacity.max(1) * SLOT) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Starts a new set of slots.
    pub fn clear(&mut self) {
        self.staged.clear();
    }

    /// Adds a slot; returns its dynamic offset.
    pub fn push<T: bytemuck::Pod>(&mut self, value: &T) -> u32 {
        let off = self.staged.len();
        self.staged.extend_from_slice(bytemuck::bytes_of(value));
        self.staged.resize(off + SLOT, 0);
        off as u32
    }

    /// Uploads the staged slots, growing the buffer when needed. Returns true when the buffer
    /// was replaced.
    pub fn upload(&mut self, ctx: &GpuContext) -> bool {
        let needed = self.staged.len() / SLOT;
        let mut grew = false;
        if needed > self.capacity {
            self.capacity = needed.next_power_of_two();
            self.buffer = Self::alloc(ctx, self.label, self.capacity);
            self.generation += 1;
            grew = true;
        }
        if !self.staged.is_empty() {
            ctx.queue.write_buffer(&self.buffer, 0, &self.staged);
        }
        grew
    }

    /// Grows the buffer to hold the staged slots without uploading them (the caller copies
    /// [`UniformSlots::staged`] in its own command buffer). Returns true when it was replaced.
    pub fn reserve(&mut self, ctx: &GpuContext) -> bool {
        let needed = self.staged.len() / SLOT;
        if needed > self.capacity {
            self.capacity = needed.next_power_of_two();
            self.buffer = Self::alloc(ctx, self.label, self.capacity);
            self.generation += 1;
            return true;
        }
        false
    }

    /// The staged slots' bytes.
    pub fn staged(&self) -> &[u8] {
        &self.staged
    }

    /// The binding of one slot's struct of `size` bytes.
    pub fn binding(&self, size: u64) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: 0,
            size: wgpu::BufferSize::new(size),
        })
    }
}

/// A MAP_READ buffer reused for readbacks. Reads larger than one buffer may be (the device's
/// `max_buffer_size`, or [`READBACK_PIECE`]) go through it in pieces.
pub struct Readback {
    buffer: Option<wgpu::Buffer>,
    capacity: u64,
}

/// Largest readback staging buffer: big reads (snapshots, checkpoints) go in pieces of this.
pub const READBACK_PIECE: u64 = 64 << 20;

impl Readback {
    pub fn new() -> Self {
        Self { buffer: None, capacity: 0 }
    }

    fn staging(&mut self, ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
        if bytes > self.capacity || self.buffer.is_none() {
            self.capacity = bytes.max(256).next_power_of_two().min(piece_limit(ctx));
            self.buffer = Some(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: self.capacity,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        self.buffer.clone().expect("allocated above")
    }

    /// Copies `(buffer, offset, bytes)` ranges one after another into staging, submits (after
    /// whatever `encoder` already holds), waits, and returns the bytes. Offsets and sizes are
    /// multiples of 4.
    pub fn read(
        &mut self,
        ctx: &GpuContext,
        mut encoder: wgpu::CommandEncoder,
        ranges: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<u8>, EngineError> {
        let total: u64 = ranges.iter().map(|r| r.2).sum();
        if total == 0 {
            ctx.queue.submit([encoder.finish()]);
            return Ok(Vec::new());
        }
        let piece = piece_limit(ctx);
        let mut out = Vec::with_capacity(total as usize);
        // Walk the ranges, filling one staging piece at a time.
        let (mut ri, mut within) = (0usize, 0u64);
        while out.len() < total as usize {
            let staging = self.staging(ctx, (total - out.len() as u64).min(piece));
            let room = staging.size().min(total - out.len() as u64);
            let mut at = 0;
            while at < room {
                let (src, off, bytes) = ranges[ri];
                let take = (bytes - within).min(room - at);
                if take > 0 {
                    encoder.copy_buffer_to_buffer(src, off + within, &staging, at, take);
                }
                at += take;
                within += take;
                if within == bytes {
                    ri += 1;
                    within = 0;
                }
            }
            ctx.queue.submit([encoder.finish()]);
            let slice = staging.slice(..room);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            ctx.wait()?;
            rx.recv()
                .map_err(|e| EngineError::Map(e.to_string()))?
                .map_err(|e| EngineError::Map(e.to_string()))?;
            out.extend_from_slice(&slice.get_mapped_range().map_err(|e| EngineError::Map(format!("{e:?}")))?);
            staging.unmap();
            encoder = self::encoder(ctx, "readback");
        }
        Ok(out)
    }
}

fn piece_limit(ctx: &GpuContext) -> u64 {
    READBACK_PIECE.min(ctx.limits.max_buffer_size) & !255
}

/// A pool of host-writable staging buffers (MAP_WRITE | COPY_SRC) for uploads: a step writes
/// its data into one, copies it to the device buffers in its command buffer, and the buffer
/// is mapped again for a later step once the device is done with it. New buffers are made
/// only when none is free and large enough ([`UploadRing::allocations`] counts them).
pub struct UploadRing {
    free: Vec<wgpu::Buffer>,
    pending: Vec<(wgpu::Buffer, std::sync::Arc<std::sync::atomic::AtomicU8>)>,
    /// Staging buffers created so far.
    pub allocations: u64,
    /// Bytes written through the ring so far.
    pub bytes: u64,
}

const MAP_PENDING: u8 = 0;
const MAP_READY: u8 = 1;
const MAP_FAILED: u8 = 2;
/// Free buffers kept for reuse.
const RING_KEEP: usize = 4;

impl UploadRing {
    pub fn new() -> Self {
        Self { free: Vec::new(), pending: Vec::new(), allocations: 0, bytes: 0 }
    }

    /// A mapped staging buffer of at least `bytes` (a multiple of 4).
    pub fn acquire(&mut self, ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
        // Let finished copies re-map their buffers (non-blocking).
        let _ = ctx.device.poll(wgpu::PollType::Poll);
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].1.load(std::sync::atomic::Ordering::Acquire) {
                MAP_READY => {
                    let (b, _) = self.pending.swap_remove(i);
                    self.free.push(b);
                }
                MAP_FAILED => {
                    self.pending.swap_remove(i);
                }
                _ => i += 1,
            }
        }
        let fit = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size() >= bytes)
            .min_by_key(|(_, b)| b.size())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            return self.free.swap_remove(i);
        }
        if self.free.len() >= RING_KEEP {
            // Too small for today's batches: let the smallest go.
            if let Some((i, _)) = self.free.iter().enumerate().min_by_key(|(_, b)| b.size()) {
                self.free.swap_remove(i);
            }
        }
        self.allocations += 1;
        // Rounded up for reuse, within what the device allows (the caller keeps `bytes` there).
        let size = bytes.max(4096).next_power_of_two().min(ctx.limits.max_buffer_size & !3).max(bytes);
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("upload"),
            size,
            usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        })
    }

    /// Hands a buffer back after the submission that copies from it: it is mapped again when
    /// the device is done with it.
    pub fn release(&mut self, buffer: wgpu::Buffer) {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(MAP_PENDING));
        let f = flag.clone();
        buffer.map_async(wgpu::MapMode::Write, .., move |r| {
            f.store(if r.is_ok() { MAP_READY } else { MAP_FAILED }, std::sync::atomic::Ordering::Release);
        });
        self.pending.push((buffer, flag));
    }
}

impl Default for UploadRing {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for Readback {
    fn default() -> Self {
        Self::new()
    }
}

pub fn encoder(ctx: &GpuContext, label: &str) -> wgpu::CommandEncoder {
    ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
}

/// Shared handle type.
pub type Ctx = Arc<GpuContext>;

/// A bind group entry for a whole buffer.
pub fn buf(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource: buffer.as_entire_binding() }
}

/// Device time of a span of compute passes (TIMESTAMP_QUERY): the first pass writes the start,
/// the last pass the end, and [`Timer::resolve`] puts both into a buffer that a readback can
/// include.
pub struct Timer {
    set: wgpu::QuerySet,
    /// The two resolved timestamps (u64 ticks) at offset 0.
    pub resolved: wgpu::Buffer,
    period_ns: f32,
}

impl Timer {
    /// None when the device has no timestamp queries.
    pub fn new(ctx: &GpuContext) -> Option<Self> {
        if !ctx.timestamps {
            return None;
        }
        Some(Self {
            set: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timer.resolved"),
                size: 256,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            period_ns: ctx.queue.get_timestamp_period(),
        })
    }

    /// The timestamp writes of a pass that starts (`begin`) and/or ends (`end`) the span
    /// (None for a pass in the middle).
    pub fn writes(&self, begin: bool, end: bool) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        (begin || end).then_some(wgpu::ComputePassTimestampWrites {
            query_set: &self.set,
            beginning_of_pass_write_index: begin.then_some(0),
            end_of_pass_write_index: end.then_some(1),
        })
    }

    pub fn resolve(&self, enc: &mut wgpu::CommandEncoder) {
        enc.resolve_query_set(&self.set, 0..2, &self.resolved, 0);
    }

    /// Seconds between the two timestamps in `bytes` (16 bytes read from `resolved`).
    pub fn seconds(&self, bytes: &[u8]) -> Option<f64> {
        let t = |i: usize| u64::from_le_bytes(bytes.get(8 * i..8 * i + 8)?.try_into().ok()?).into();
        let (a, b): (Option<u64>, Option<u64>) = (t(0), t(1));
        let (a, b) = (a?, b?);
        (b >= a).then(|| (b - a) as f64 * self.period_ns as f64 * 1e-9)
    }

    /// Reads the span back (waits for the device).
    pub fn read(&self, ctx: &GpuContext, readback: &mut Readback) -> Result<Option<f64>, EngineError> {
        let bytes = readback.read(ctx, encoder(ctx, "timer"), &[(&self.resolved, 0, 16)])?;
        Ok(self.seconds(&bytes))
    }
}
