//! Heterogeneity emulation for experiments on one machine: slow devices, slow and distant links,
//! seeded jitter.

use std::time::Duration;

use sparsync::protocol::model::SplitMix64;

/// How much slower than this machine a client pretends to be.
#[derive(Clone, Debug)]
pub struct Emulation {
    /// Each local step takes this many times its measured time (1 = as fast as this machine).
    pub slowdown: f64,
    /// Uplink bandwidth in kilobits per second (0 = unlimited): a push of B bytes waits
    /// B·8 / kbps milliseconds before it is sent.
    pub uplink_kbps: f64,
    /// Downlink bandwidth in kilobits per second (0 = unlimited): a Delta or Snapshot of B
    /// bytes reaches the client B·8 / kbps milliseconds after the previous one was taken in.
    pub downlink_kbps: f64,
    /// One-way latency added before every message the client sends.
    pub latency: Duration,
    /// Every emulated delay is multiplied by a factor uniform in [1 − jitter, 1 + jitter].
    pub jitter: f64,
    rng: SplitMix64,
}

impl Emulation {
    pub fn new(slowdown: f64, uplink_kbps: f64, latency_ms: f64, jitter: f64, seed: u64) -> Self {
        Self {
            slowdown: slowdown.max(1.0),
            uplink_kbps: uplink_kbps.max(0.0),
            downlink_kbps: 0.0,
            latency: Duration::from_secs_f64(latency_ms.max(0.0) / 1e3),
            jitter: jitter.clamp(0.0, 0.99),
            rng: SplitMix64::new(seed ^ 0x00E4_1A7E),
        }
    }

    /// The same emulation with a downlink of `kbps` kilobits per second (0: unlimited).
    pub fn with_downlink(mut self, kbps: f64) -> Self {
        self.downlink_kbps = kbps.max(0.0);
        self
    }

    /// The time receiving `bytes` takes on the emulated downlink (no jitter: a link's rate).
    pub fn recv_delay(&self, bytes: usize) -> Duration {
        if self.downlink_kbps > 0.0 {
            // At most an hour per frame, whatever rate was asked for.
            Duration::from_secs_f64((bytes as f64 * 8.0 / (self.downlink_kbps * 1e3)).min(3600.0))
        } else {
            Duration::ZERO
        }
    }

    /// No emulation.
    pub fn none() -> Self {
        Self::new(1.0, 0.0, 0.0, 0.0, 0)
    }

    fn jittered(&mut self, secs: f64) -> Duration {
        let f = 1.0 + self.jitter * (2.0 * self.rng.next_unit_f32() as f64 - 1.0);
        Duration::from_secs_f64((secs * f).max(0.0))
    }

    /// The extra time a step that took `compute_s` seconds must wait.
    pub fn step_delay(&mut self, compute_s: f64) -> Duration {
        if self.slowdown <= 1.0 {
            return Duration::ZERO;
        }
        self.jittered(compute_s * (self.slowdown - 1.0))
    }

    /// The time sending `bytes` takes on the emulated link (transfer and latency).
    pub fn send_delay(&mut self, bytes: usize) -> Duration {
        let transfer =
            if self.uplink_kbps > 0.0 { bytes as f64 * 8.0 / (self.uplink_kbps * 1e3) } else { 0.0 };
        self.jittered(transfer + self.latency.as_secs_f64())
    }

    /// One line for the client's log, so that results are traceable.
    pub fn describe(&self) -> String {
        format!(
            "slowdown {}x, uplink {}, downlink {}, latency {} ms, jitter ±{:.0}%",
            self.slowdown,
            if self.uplink_kbps > 0.0 { format!("{} kbit/s", self.uplink_kbps) } else { "unlimited".into() },
            if self.downlink_kbps > 0.0 {
                format!("{} kbit/s", self.downlink_kbps)
            } else {
                "unlimited".into()
            },
            self.latency.as_millis(),
            self.jitter * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_settings() {
        let mut e = Emulation::new(4.0, 800.0, 20.0, 0.0, 1);
        assert_eq!(e.step_delay(0.01), Duration::from_secs_f64(0.03));
        // 100 kB at 800 kbit/s is 1 s, plus 20 ms.
        assert_eq!(e.send_delay(100_000), Duration::from_secs_f64(1.02));
        assert_eq!(Emulation::none().step_delay(1.0), Duration::ZERO);
        let mut j = Emulation::new(2.0, 0.0, 0.0, 0.5, 7);
        for _ in 0..100 {
            let d = j.step_delay(1.0).as_secs_f64();
            assert!((0.5..=1.5).contains(&d), "{d}");
        }
        let mut a = Emulation::new(2.0, 0.0, 0.0, 0.5, 7);
        assert_eq!(a.step_delay(1.0), Emulation::new(2.0, 0.0, 0.0, 0.5, 7).step_delay(1.0), "seeded");
        assert!(e.describe().contains("slowdown 4x"));
        // 50 kB at 400 kbit/s downlink is 1 s; unlimited by default.
        assert_eq!(e.recv_delay(50_000), Duration::ZERO);
        let d = Emulation::none().with_downlink(400.0);
        assert_eq!(d.recv_delay(50_000), Duration::from_secs(1));
        assert!(d.describe().contains("downlink 400 kbit/s"), "{}", d.describe());
    }
}
