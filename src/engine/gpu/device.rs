//! Adapter choice and device setup.

use std::sync::Arc;

use super::super::EngineError;

/// How to pick and configure the device.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Only adapters whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Do not use SHADER_F16 even when offered (tests the fallback path).
    pub no_f16: bool,
    /// Skip software adapters (a CPU emulating a GPU, such as lavapipe): slower than the CPU
    /// engine, so `--engine auto` and `--engine gpu` (unless an adapter is named) do not
    /// pick them.
    pub hardware_only: bool,
    /// Open the device with these limits instead of the adapter's (each at most the
    /// adapter's): tests run the engine as on a device with smaller buffers and bindings.
    pub limits: Option<wgpu::Limits>,
}

/// Largest storage binding the engine uses, whatever the device allows: element offsets stay
/// within 32 bits everywhere (Metal reports no binding limit; elements past 2^30 of one
/// binding read as zero there), and a chunk this size allocates on every backend.
pub const MAX_BINDING_BYTES: u64 = 1 << 30;

/// A device and what it can do.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// SHADER_F16 is enabled.
    pub f16: bool,
    /// TIMESTAMP_QUERY is enabled.
    pub timestamps: bool,
    /// Errors wgpu reported outside any error scope (each is also logged).
    pub uncaptured: Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({} on {:?})", self.info.name, self.info.backend)
    }
}

/// Rank of an adapter: discrete GPUs first, CPU adapters last; native APIs before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (device, backend)
}

/// Lists every adapter wgpu finds: (name, backend, type).
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| a.get_info())
        .collect()
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    desc.flags = wgpu::InstanceFlags::empty().with_env();
    wgpu::Instance::new(desc)
}

/// Picks the best adapter (or the one named) and opens a device on it.
pub fn open(opts: &DeviceOptions) -> Result<Arc<GpuContext>, EngineError> {
    let instance = instance();
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let names: Vec<String> =
        adapters.iter().map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend)).collect();
    if let Some(want) = &opts.adapter {
        let want = want.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want));
        if adapters.is_empty() {
            return Err(EngineError::NoAdapter(format!(
                " matching {want:?}; adapters present: {}",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        }
    }
    // Compute needs storage buffers in compute shaders: GL adapters without them are skipped.
    adapters.retain(|a| a.limits().max_storage_buffers_per_shader_stage >= 8);
    let had_software = adapters.iter().any(|a| a.get_info().device_type == wgpu::DeviceType::Cpu);
    if opts.hardware_only {
        adapters.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
    }
    adapters.sort_by_key(|a| rank(&a.get_info()));
    let adapter = adapters.into_iter().next().ok_or_else(|| {
        let hint = if opts.hardware_only && had_software {
            " (only software adapters, skipped: --engine gpu uses them)"
        } else if cfg!(target_os = "linux") {
            " (on Linux without a GPU, install mesa-vulkan-drivers for lavapipe)"
        } else {
            ""
        };
        EngineError::NoAdapter(format!(
            "{hint}; adapters present: {}",
            if names.is_empty() { "none".into() } else { names.join(", ") }
        ))
    })?;
    let info = adapter.get_info();
    let offered = adapter.features();
    let mut wanted = wgpu::Features::empty();
    if !opts.no_f16 {
        wanted |= wgpu::Features::SHADER_F16;
    }
    wanted |= wgpu::Features::TIMESTAMP_QUERY;
    let features = offered & wanted;
    let offered_limits = adapter.limits();
    let limits = match &opts.limits {
        Some(l) => {
            let mut over = Vec::new();
            l.check_limits_with_fail_fn(&offered_limits, false, |name, want, have| {
                over.push(format!("{name} {want} > {have}"))
            });
            if !over.is_empty() {
                return Err(EngineError::Device(format!(
                    "requested limits exceed the adapter's: {}",
                    over.join(", ")
                )));
            }
            l.clone()
        }
        None => offered_limits,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("sparsync"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| EngineError::Device(e.to_string()))?;
    let ctx = GpuContext {
        device,
        queue,
        f16: features.contains(wgpu::Features::SHADER_F16),
        timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        uncaptured: Arc::default(),
        info,
        limits,
    };
    // wgpu's default for an error outside an error scope is to panic, in whatever thread hit
    // it. The engine scopes everything it does; anything else is logged and kept, never a
    // panic inside the server.
    let seen = ctx.uncaptured.clone();
    ctx.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        tracing::error!(error = %e, "GPU error outside an error scope");
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
    }));
    tracing::info!(
        adapter = %ctx.info.name,
        backend = ?ctx.info.backend,
        device_type = ?ctx.info.device_type,
        driver = %ctx.info.driver,
        max_storage_binding = ctx.limits.max_storage_buffer_binding_size,
        max_buffer = ctx.limits.max_buffer_size,
        shader_f16 = ctx.f16,
        "GPU device opened"
    );
    Ok(Arc::new(ctx))
}

impl GpuContext {
    /// Blocks until the queue is idle.
    pub fn wait(&self) -> Result<(), EngineError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| EngineError::Gpu(e.to_string()))
    }

    /// Largest storage binding the engine uses, in bytes (a multiple of 256, at most
    /// [`MAX_BINDING_BYTES`]).
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size).min(MAX_BINDING_BYTES)
            & !255
    }

    /// Runs `f` inside error scopes for out-of-memory, validation and internal errors, and
    /// turns the first error any of them caught into an `Err` (wgpu would otherwise panic).
    /// The scopes are per thread: `f` must do its GPU work on the calling thread.
    pub fn scoped<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let r = f();
        // Popped innermost first.
        let errors = [internal.pop(), validation.pop(), oom.pop()].map(pollster::block_on);
        let first = errors.into_iter().flatten().next();
        match (r, first) {
            (_, Some(e)) => Err(EngineError::Gpu(format!("{what}: {e}"))),
            (r, None) => r,
        }
    }
}
