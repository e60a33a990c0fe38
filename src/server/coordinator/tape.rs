//! A tape of a run: every input the coordinator gave the core, with its time, and the effects
//! the core answered, so that a test can feed the same inputs to a fresh core alone (no
//! sockets, no engine) and compare. Resume secrets are credentials: the tape keeps only their
//! SHA-256, in the inputs and in the effects alike (the core only compares secrets, so a run
//! replayed with the hashes in place of the secrets decides the same).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::core::{Effect, Input};

/// One input and what it gave (the effects as `{:?}` text, secrets hashed).
#[derive(Clone, Debug)]
pub struct TapeEntry {
    pub now: Duration,
    pub input: Input,
    pub effects: String,
}

/// A shared, growing tape (see the module documentation). Cloning shares it.
#[derive(Clone, Default)]
pub struct Tape(Arc<Mutex<TapeInner>>);

#[derive(Default)]
struct TapeInner {
    entries: Vec<TapeEntry>,
    /// (secret, its hash) of every secret seen, to hash it wherever it shows in the effects.
    /// Held in memory only, never in an entry.
    secrets: Vec<(String, String)>,
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Tape {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `input` (given at `now`) and the `effects` it gave.
    pub fn keep(&self, now: Duration, mut input: Input, effects: &[Effect]) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Input::Join { hello, secret, .. } = &mut input {
            for s in [Some(secret), hello.resume_secret.as_mut()].into_iter().flatten() {
                let h = sha256_hex(s);
                if !t.secrets.iter().any(|(k, _)| k == s) {
                    t.secrets.push((s.clone(), h.clone()));
                }
                *s = h;
            }
        }
        let mut text = format!("{effects:?}");
        for (s, h) in &t.secrets {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), h);
            }
        }
        t.entries.push(TapeEntry { now, input, effects: text });
    }

    /// Everything kept so far, in order.
    pub fn entries(&self) -> Vec<TapeEntry> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).entries.clone()
    }
}
