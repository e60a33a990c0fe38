//! sparsync: a GPU-accelerated parameter server for distributed and federated training.
//!
//! Modules in the order one Push travels:
//!
//! 1. [`protocol`]: the wire format (JSON control messages, binary Push/Delta/Snapshot frames),
//!    model layouts, and the rounding rules replicas share.
//! 2. [`server`]: listener and WebSocket sessions (validation), then the coordinator that owns
//!    the engine and the policy, and the outboxes that carry Deltas back.
//! 3. [`policy`]: when updates form a batch and who waits (BSP, ASP, SSP, FedBuff, ADSP, Hermes)
//!    and how stale updates are weighted.
//! 4. [`engine`]: the aggregation step and the Top-k broadcast, on the GPU (WGSL in `shaders/`)
//!    or the CPU reference.
//! 5. [`client`]: the protocol-level client that tests, the load generator and the native
//!    training client build on.
//!
//! [`config`] holds every server setting; [`bench`] measures the kernels and the server.

pub mod protocol;

#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod data;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod orchestrate;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod server;
