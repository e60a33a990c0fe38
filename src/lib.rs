//! sparsync: a GPU-accelerated parameter server for distributed and federated training.
//!
//! Modules in the order one Push travels:
//!
//! 1. [`protocol`]: the wire format (JSON control messages, binary Push/Delta/Snapshot frames),
//!    model layouts, and the rounding rules replicas share.
//! 2. [`server`]: the shell that does the I/O: listener and WebSocket sessions (validation),
//!    the coordinator task that feeds the core and carries out its effects (the log, the
//!    engine, the outboxes that carry Deltas back, metrics).
//! 3. [`core`]: the coordinator's rules, with no I/O: inputs in, effects out.
//! 4. [`policy`]: when updates form a batch and who waits (BSP, ASP, SSP, FedBuff, ADSP, Hermes)
//!    and how stale updates are weighted.
//! 5. [`engine`]: the aggregation step and the Top-k broadcast, on the GPU (WGSL in `shaders/`)
//!    or the CPU reference.
//! 6. [`client`]: the protocol-level client that tests, the load generator and the native
//!    training client build on.
//!
//! [`config`] holds every server setting (each declared once with [`settings`]'s macro; a
//! policy's own in its file); [`bench`] measures the kernels and the server.

pub mod protocol;

#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod core;
#[cfg(feature = "server")]
pub mod data;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod orchestrate;
/// PNG charts shared by the benchmarks and the experiments.
#[cfg(feature = "server")]
pub(crate) mod plot;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod settings;

/// The log filter of the binaries: `RUST_LOG` when set, else `spec` (EnvFilter syntax). Either
/// way tungstenite's per-message trace lines are capped at debug: they would print every Hello,
/// tokens included, and tokens never go to the log.
#[cfg(feature = "server")]
pub fn log_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(spec));
    cap_frame_dumps(filter)
}

#[cfg(feature = "server")]
fn cap_frame_dumps(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    // Only a filter that enables TRACE somewhere could let tungstenite's frame dumps through:
    // cap that target at DEBUG then. (Adding the directive unconditionally would *raise* it to
    // DEBUG under the default INFO filter.)
    let may_trace =
        filter.max_level_hint().is_none_or(|l| l >= tracing_subscriber::filter::LevelFilter::TRACE);
    match "tungstenite::protocol=debug".parse() {
        Ok(cap) if may_trace => filter.add_directive(cap),
        _ => filter,
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn frame_dumps_are_capped_without_raising_quiet_filters() {
        // The default filter stays as quiet as asked: no tungstenite debug lines.
        let f = super::cap_frame_dumps(EnvFilter::new("info"));
        assert_eq!(f.max_level_hint(), Some(LevelFilter::INFO));
        assert!(!f.to_string().contains("tungstenite"), "{f}");
        // A filter that traces everything gets tungstenite's frames capped at debug.
        for spec in ["trace", "info,tungstenite=trace"] {
            let f = super::cap_frame_dumps(EnvFilter::new(spec));
            assert!(f.to_string().contains("tungstenite::protocol=debug"), "{spec}: {f}");
        }
    }
}
