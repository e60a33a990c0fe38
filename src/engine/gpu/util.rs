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
        compilation_options: Default::default(),
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

    /// The binding of one slot's struct of `size` bytes.
    pub fn binding(&self, size: u64) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: 0,
            size: wgpu::BufferSize::new(size),
        })
    }
}

/// A MAP_READ buffer reused for readbacks.
pub struct Readback {
    buffer: Option<wgpu::Buffer>,
    capacity: u64,
}

impl Readback {
    pub fn new() -> Self {
        Self { buffer: None, capacity: 0 }
    }

    /// Copies `(buffer, offset, bytes)` ranges one after another into the staging buffer,
    /// submits, waits, and returns the bytes.
    pub fn read(
        &mut self,
        ctx: &GpuContext,
        mut encoder: wgpu::CommandEncoder,
        ranges: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<u8>, EngineError> {
        let total: u64 = ranges.iter().map(|r| r.2).sum();
        if total > self.capacity || self.buffer.is_none() {
            self.capacity = total.max(256).next_power_of_two();
            self.buffer = Some(ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: self.capacity,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let staging = self.buffer.as_ref().expect("allocated above");
        let mut at = 0;
        for &(src, off, bytes) in ranges {
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(src, off, staging, at, bytes);
            }
            at += bytes;
        }
        ctx.queue.submit([encoder.finish()]);
        if total == 0 {
            return Ok(Vec::new());
        }
        let slice = staging.slice(..total);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.wait()?;
        rx.recv()
            .map_err(|e| EngineError::Map(e.to_string()))?
            .map_err(|e| EngineError::Map(e.to_string()))?;
        let out = slice.get_mapped_range().map_err(|e| EngineError::Map(format!("{e:?}")))?.to_vec();
        staging.unmap();
        Ok(out)
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
