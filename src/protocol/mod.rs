//! The wire protocol: one definition in Rust, used by the server and the native client.
//!
//! * [`message`]: JSON control messages (Hello, Welcome, Ack, Reject, Directive, Error, Bye).
//! * [`frame`]: binary frames (Push, Delta, Snapshot) with zero-copy validated views.
//! * [`model`]: model layouts, seeded initialisation, safetensors.
//! * [`numerics`]: the rounding rules every replica follows to stay bit-identical.
//!
//! `docs/protocol.md` is the specification a client in another language is written from.

pub mod frame;
pub mod message;
pub mod model;
pub mod numerics;
pub mod replica;
pub mod select;
pub mod sparsify;

/// The protocol version this build speaks. A Hello with another version is refused with a
/// message that names both.
pub const PROTOCOL_VERSION: u16 = 1;
