//! The server's record of what happened (the core's [`Event`]s), bounded, for `/api/record`.

pub use crate::core::event::{AggregatedPush, Event};
use serde::Serialize;

/// A bounded event log: the newest `cap` events, numbered from the first ever recorded.
pub struct Record {
    /// Shared with the pages being served: a reader copies pointers, not events.
    events: std::collections::VecDeque<std::sync::Arc<Event>>,
    /// Number of the oldest event held.
    first: usize,
    cap: usize,
    /// Staleness at aggregation, counted over the whole run (0..=64, then 65+ in the last).
    staleness: Vec<u64>,
}

/// Staleness histogram buckets: 0 to 64, and a last bucket for anything larger.
pub const STALENESS_BUCKETS: usize = 66;

impl Record {
    pub fn new(cap: usize) -> Self {
        Self { events: Default::default(), first: 0, cap, staleness: vec![0; STALENESS_BUCKETS] }
    }

    pub fn push(&mut self, e: Event) {
        if let Event::Aggregate { items, .. } = &e {
            for i in items {
                self.staleness[(i.staleness as usize).min(STALENESS_BUCKETS - 1)] += 1;
            }
        }
        if self.events.len() == self.cap {
            self.events.pop_front();
            self.first += 1;
        }
        self.events.push_back(std::sync::Arc::new(e));
    }

    /// Events numbered `since` and later, and the number to ask from next time.
    pub fn since(&self, since: usize) -> (usize, Vec<Event>) {
        let skip = since.saturating_sub(self.first);
        (self.first + self.events.len(), self.events.iter().skip(skip).map(|e| Event::clone(e)).collect())
    }

    /// Aggregated updates per staleness (index = staleness; the last bucket is 65 and more).
    pub fn staleness_histogram(&self) -> Vec<u64> {
        self.staleness.clone()
    }
}

/// The record, shared by the coordinator (which appends) and the HTTP handler (which reads a
/// page at a time under a short lock): readers never wait for the coordinator, and the
/// coordinator waits at most for one page of pointers to be copied (serializing happens after
/// the lock is released, on a blocking thread).
#[derive(Clone)]
pub struct SharedRecord(std::sync::Arc<std::sync::Mutex<Record>>);

/// One page of the record.
#[derive(Debug, Serialize)]
pub struct Page {
    /// The number of the event after this page: ask from it next.
    pub next: usize,
    /// The number of the next event the server will record (the page is the last one when
    /// `next == end`).
    pub end: usize,
    pub events: Vec<std::sync::Arc<Event>>,
}

/// Events per page of `/api/record` unless the request asks for fewer (or more, up to
/// [`MAX_PAGE`]).
pub const DEFAULT_PAGE: usize = 10_000;
pub const MAX_PAGE: usize = 100_000;

impl SharedRecord {
    pub fn new(cap: usize) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Record::new(cap))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, e: Event) {
        self.lock().push(e);
    }

    /// At most `limit` events from number `since` on (from the oldest held when `since` is
    /// older).
    pub fn page(&self, since: usize, limit: usize) -> Page {
        let g = self.lock();
        let end = g.first + g.events.len();
        let from = since.max(g.first).min(end);
        let events: Vec<std::sync::Arc<Event>> =
            g.events.iter().skip(from - g.first).take(limit).cloned().collect();
        Page { next: from + events.len(), end, events }
    }

    /// Every event from number `since` on, and the number to ask from next time.
    pub fn since(&self, since: usize) -> (usize, Vec<Event>) {
        self.lock().since(since)
    }

    pub fn staleness_histogram(&self) -> Vec<u64> {
        self.lock().staleness_histogram()
    }
}
