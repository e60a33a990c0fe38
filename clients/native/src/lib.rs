//! sparsync's native training client: burn models, local training, sparsification with error
//! feedback, heterogeneity emulation, and the session loop that follows the server's policy.
//!
//! Modules in the order a round uses them: [`model`] (burn models and the flat parameter
//! vector), [`train`] (local SGD, evaluation), (Top-k with error feedback is `sparsync::protocol::sparsify`, shared with the Python client),
//! [`emulate`] (slow devices and links), [`run`] (the session: modes, directives, reconnects).

pub mod emulate;
pub mod model;
pub mod run;
pub mod train;
