//! GPU test support: one shared device per test binary. With SPARSYNC_REQUIRE_GPU=1 (CI) a
//! missing adapter fails the test; otherwise the test says loudly that it did not run.

use std::sync::{Arc, OnceLock};

use sparsync::engine::gpu::device::{self, DeviceOptions, GpuContext};

pub fn require_gpu() -> bool {
    std::env::var("SPARSYNC_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Opens a device with `opts`, or handles its absence as described above.
pub fn open(opts: &DeviceOptions) -> Option<Arc<GpuContext>> {
    match device::open(opts) {
        Ok(ctx) => Some(ctx),
        Err(e) if require_gpu() => panic!("SPARSYNC_REQUIRE_GPU=1 and no GPU adapter: {e}"),
        Err(e) => {
            eprintln!("GPU TEST NOT RUN: {e} (set SPARSYNC_REQUIRE_GPU=1 to make this a failure)");
            None
        }
    }
}

/// The shared default device.
pub fn shared() -> Option<Arc<GpuContext>> {
    static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
    CTX.get_or_init(|| open(&DeviceOptions::default())).clone()
}
