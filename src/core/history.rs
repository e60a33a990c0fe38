//! A series that covers a whole run in bounded memory.
//!
//! Every point is kept until the series holds `cap` of them. Then every second point is
//! dropped and from then on only every second new point is kept, and so on: after `k` halvings
//! the series holds every `2^k`-th point of the run, from its first point on, evenly spread
//! over the whole run, and never more than `cap` of them. The newest point is always shown as
//! well, so the series ends where the run is now. This is the scheme of a decimating
//! oscilloscope buffer; a run of hours costs the same memory as a run of seconds.

/// The default number of kept points: enough for a smooth curve, small enough for `/api/status`.
pub const DEFAULT_CAP: usize = 512;

/// A decimating series (see the module documentation).
#[derive(Clone, Debug)]
pub struct History<T> {
    cap: usize,
    /// Keep every `stride`-th point of the run.
    stride: u64,
    /// Points seen so far.
    seen: u64,
    kept: Vec<T>,
    /// The newest point when it is not one of the kept ones.
    newest: Option<T>,
}

impl<T: Clone> History<T> {
    /// A series of at most `cap` points (at least 2; plus the newest point).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(2);
        Self { cap, stride: 1, seen: 0, kept: Vec::with_capacity(cap), newest: None }
    }

    pub fn push(&mut self, p: T) {
        let i = self.seen;
        self.seen += 1;
        if !i.is_multiple_of(self.stride) {
            self.newest = Some(p);
            return;
        }
        self.newest = None;
        self.kept.push(p);
        if self.kept.len() >= self.cap {
            // Point j of `kept` is point j·stride of the run: keep the even ones. When the
            // point just pushed is an odd one, it stays as the newest.
            if self.kept.len().is_multiple_of(2) {
                self.newest = self.kept.last().cloned();
            }
            let mut j = 0;
            self.kept.retain(|_| {
                j += 1;
                j % 2 == 1
            });
            self.stride *= 2;
        }
    }

    /// The kept points, oldest first, ending with the newest point.
    pub fn points(&self) -> Vec<T> {
        let mut v = Vec::with_capacity(self.kept.len() + 1);
        v.extend(self.kept.iter().cloned());
        v.extend(self.newest.iter().cloned());
        v
    }

    /// How many points were pushed in all.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// One kept point stands for this many points of the run.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    pub fn last(&self) -> Option<&T> {
        self.newest.as_ref().or(self.kept.last())
    }
}

impl<T: Clone> Default for History<T> {
    fn default() -> Self {
        Self::new(DEFAULT_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_until_full() {
        let mut h = History::new(8);
        for i in 0..7 {
            h.push(i);
        }
        assert_eq!(h.points(), (0..7).collect::<Vec<_>>());
        assert_eq!(h.stride(), 1);
    }

    #[test]
    fn covers_the_whole_run_in_bounded_memory() {
        for n in [1u64, 2, 9, 10, 15, 16, 17, 32, 100, 511, 512, 513, 10_000, 1_000_003] {
            let mut h = History::new(16);
            for i in 0..n {
                h.push(i);
            }
            let p = h.points();
            assert!(p.len() <= 17, "n={n}: {} points", p.len());
            assert_eq!(p[0], 0, "n={n}: starts at the run's first point");
            assert_eq!(*p.last().unwrap(), n - 1, "n={n}: ends at the newest point");
            assert_eq!(h.seen(), n);
            // Evenly spaced: every kept point is a multiple of the stride, consecutive.
            let s = h.stride();
            let kept = if (n - 1).is_multiple_of(s) { &p[..] } else { &p[..p.len() - 1] };
            for (j, &x) in kept.iter().enumerate() {
                assert_eq!(x, j as u64 * s, "n={n}: point {j}");
            }
            // The gap between points never exceeds the stride, so the curve has no holes.
            assert!(p.windows(2).all(|w| w[1] - w[0] <= s), "n={n}");
            if n >= 16 {
                assert!(p.len() >= 8, "n={n}: at least half full once it has halved");
            }
        }
    }
}
