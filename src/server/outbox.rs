//! A session's outgoing queue, bounded in bytes.
//!
//! Control messages always queue (they are small and answer something the client sent). Deltas
//! queue while the session is within its byte budget; a Delta that would exceed it drops every
//! queued Delta and marks the session *lagging*: it gets no more Deltas until the coordinator
//! sends a fresh snapshot (or the chain of Deltas from the version it last had). A slow reader
//! therefore costs the server a bounded amount of memory and never stalls anyone else.
//!
//! Control messages (Acks, Rejects, Errors, Directives) have a budget of their own, the same
//! number of bytes: a client that sends requests but never reads the answers (each bad frame
//! earns an Error) fills it, and then its session is closed instead of the queue growing.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// One outgoing WebSocket message.
#[derive(Clone, Debug)]
pub enum Outbound {
    Text(String),
    Binary(Bytes),
    /// Delta frame for replica version `version` (Deltas can be dropped when lagging).
    Delta {
        version: u64,
        frame: Bytes,
    },
    /// Snapshot frame of replica version `version`.
    Snapshot {
        version: u64,
        frame: Bytes,
    },
    /// Close the session after everything queued before it, with this WebSocket close code
    /// (RFC 6455 §7.4.1: 1000 normal, 1001 going away, 1008 policy, 1009 too big, 1011 error).
    Close(u16, String),
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) | Self::Delta { frame: b, .. } | Self::Snapshot { frame: b, .. } => b.len(),
            Self::Close(_, r) => r.len(),
        }
    }
}

impl Inner {
    /// Drops queued Deltas and marks the session lagging; what the client will have is then
    /// the last snapshot still queued, or else what was delivered.
    fn drop_deltas(&mut self) {
        self.queue.retain(|m| !matches!(m, Outbound::Delta { .. }));
        self.bytes = self.queue.iter().map(Outbound::len).sum();
        self.queued_version = self
            .queue
            .iter()
            .rev()
            .find_map(|m| match m {
                Outbound::Snapshot { version, .. } => Some(*version),
                _ => None,
            })
            .or(self.delivered_version);
        self.lagging = true;
    }
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Outbound>,
    bytes: usize,
    lagging: bool,
    /// The replica version of the last snapshot or Delta queued (what the client will have).
    queued_version: Option<u64>,
    /// The replica version of the last snapshot or Delta handed to the writer.
    delivered_version: Option<u64>,
    /// A resync was asked for and the coordinator has not answered yet.
    resync_pending: bool,
    closed: bool,
    /// Bytes of queued control messages (Text, Binary).
    control: usize,
    /// Why the session must end: its control messages exceeded the budget.
    overflow: Option<String>,
}

/// What [`Outbox::next`] hands the writer.
#[derive(Debug)]
pub enum Next {
    Send(Outbound),
    /// The queue is empty and the session lags: ask the coordinator to resynchronise it from
    /// this version (the last one it was sent, if any).
    Resync(Option<u64>),
    Closed,
}

/// A session's bounded outgoing queue.
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), notify: Notify::new(), limit: limit_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a control message (never dropped). When the queued control messages would
    /// exceed the byte budget, the queue is emptied and closed instead, and
    /// [`Self::overflowed`] says why: the session must end.
    pub fn push(&self, msg: Outbound) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        if matches!(msg, Outbound::Text(_) | Outbound::Binary(_)) {
            if g.control + msg.len() > self.limit {
                let reason = format!(
                    "more than {} bytes of replies queued: the client does not read them",
                    self.limit
                );
                g.queue.clear();
                g.control = 0;
                g.closed = true;
                g.overflow = Some(reason.clone());
                g.bytes = reason.len();
                g.queue.push_back(Outbound::Close(1008, reason));
                drop(g);
                self.notify.notify_one();
                return;
            }
            g.control += msg.len();
        }
        g.bytes += msg.len();
        g.queue.push_back(msg);
        drop(g);
        self.notify.notify_one();
    }

    /// Queues a snapshot at `version`: the session is synchronised again.
    pub fn push_snapshot(&self, version: u64, frame: Bytes) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        // Deltas and snapshots still queued are older than this snapshot: drop them. At most
        // one snapshot is ever queued, however often a client asks for one without reading.
        g.queue.retain(|m| !matches!(m, Outbound::Delta { .. } | Outbound::Snapshot { .. }));
        g.bytes = g.queue.iter().map(Outbound::len).sum();
        g.lagging = false;
        g.resync_pending = false;
        g.queued_version = Some(version);
        g.bytes += frame.len();
        g.queue.push_back(Outbound::Snapshot { version, frame });
        drop(g);
        self.notify.notify_one();
    }

    /// Queues a Delta that applies to `base` and yields `version`; returns false (and marks
    /// the session lagging) when it does not fit or does not follow what was queued.
    pub fn push_delta(&self, base: u64, version: u64, frame: Bytes) -> bool {
        let mut g = self.lock();
        if g.closed || g.lagging {
            return false;
        }
        if g.queued_version != Some(base) || g.bytes + frame.len() > self.limit {
            g.drop_deltas();
            drop(g);
            self.notify.notify_one();
            return false;
        }
        g.bytes += frame.len();
        g.queued_version = Some(version);
        g.queue.push_back(Outbound::Delta { version, frame });
        drop(g);
        self.notify.notify_one();
        true
    }

    /// Answers a resync with the chain of Deltas from `from` (what the client has). Returns
    /// false if the session's position moved meanwhile or the chain does not fit the byte
    /// budget (the coordinator then sends a snapshot).
    pub fn resync_with_deltas(&self, from: u64, chain: &[(u64, u64, Bytes)]) -> bool {
        let mut g = self.lock();
        let chain_bytes: usize = chain.iter().map(|(_, _, f)| f.len()).sum();
        if g.closed || g.queued_version != Some(from) || g.bytes + chain_bytes > self.limit {
            return false;
        }
        g.lagging = false;
        g.resync_pending = false;
        for (_, version, frame) in chain {
            g.bytes += frame.len();
            g.queued_version = Some(*version);
            g.queue.push_back(Outbound::Delta { version: *version, frame: frame.clone() });
        }
        drop(g);
        self.notify.notify_one();
        true
    }

    /// Marks the session as needing a resync (e.g. the client asked for a snapshot).
    pub fn mark_lagging(&self) {
        let mut g = self.lock();
        g.drop_deltas();
        drop(g);
        self.notify.notify_one();
    }

    /// Queues a normal close (1000) after what is queued; nothing is queued after it.
    pub fn close(&self, reason: impl Into<String>) {
        self.close_with(1000, reason)
    }

    /// Queues a close with `code` after what is queued; nothing is queued after it.
    pub fn close_with(&self, code: u16, reason: impl Into<String>) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        let msg = Outbound::Close(code, reason.into());
        g.bytes += msg.len();
        g.queue.push_back(msg);
        g.closed = true;
        drop(g);
        self.notify.notify_one();
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    pub fn is_lagging(&self) -> bool {
        self.lock().lagging
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Why the session must end, once its control messages exceeded the budget.
    pub fn overflowed(&self) -> Option<String> {
        self.lock().overflow.clone()
    }

    /// Waits for the next thing to do. A lagging session with an empty queue gets one
    /// [`Next::Resync`] and then waits for the coordinator's answer (a snapshot or a chain of
    /// Deltas); lagging again later asks again.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.lock();
                if let Some(m) = g.queue.pop_front() {
                    g.bytes -= m.len();
                    if matches!(m, Outbound::Text(_) | Outbound::Binary(_)) {
                        g.control -= m.len();
                    }
                    if let Outbound::Delta { version, .. } | Outbound::Snapshot { version, .. } = &m {
                        g.delivered_version = Some(*version);
                    }
                    return Next::Send(m);
                }
                if g.closed {
                    return Next::Closed;
                }
                if g.lagging && !g.resync_pending {
                    g.resync_pending = true;
                    return Next::Resync(g.delivered_version);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[tokio::test]
    async fn lagging_drops_deltas_and_asks_once_for_resync() {
        let o = Outbox::new(100);
        o.push_snapshot(0, frame(10));
        assert!(o.push_delta(0, 1, frame(50)));
        assert!(!o.push_delta(1, 2, frame(50))); // 110 > 100: lagging
        assert!(o.is_lagging());
        assert!(!o.push_delta(2, 3, frame(1)));
        assert!(matches!(o.next().await, Next::Send(Outbound::Snapshot { version: 0, .. })));
        // The Delta to version 1 was dropped, so the client has version 0.
        assert!(matches!(o.next().await, Next::Resync(Some(0))));
        o.push_snapshot(3, frame(10));
        assert!(!o.is_lagging());
        assert!(matches!(o.next().await, Next::Send(Outbound::Snapshot { version: 3, .. })));
        assert!(o.push_delta(3, 4, frame(10)));
        assert!(matches!(o.next().await, Next::Send(Outbound::Delta { version: 4, .. })));
        assert_eq!(o.queued_bytes(), 0);
        // Lagging again after a resync was answered (with the queue never empty in between)
        // asks again.
        assert!(o.push_delta(4, 5, frame(60)));
        assert!(!o.push_delta(5, 6, frame(60)));
        assert!(matches!(o.next().await, Next::Resync(Some(4))));
        assert!(o.resync_with_deltas(4, &[(4, 5, frame(20)), (5, 6, frame(20))]));
        assert!(!o.is_lagging());
        assert!(o.push_delta(6, 7, frame(30)));
        assert!(!o.push_delta(7, 8, frame(40)), "over the budget");
        assert!(matches!(o.next().await, Next::Resync(Some(4))));
        // A chain over the budget is declined: the coordinator sends a snapshot instead.
        assert!(!o.resync_with_deltas(4, &[(4, 5, frame(60)), (5, 6, frame(60))]));
        o.push_snapshot(8, frame(10));
        assert!(matches!(o.next().await, Next::Send(Outbound::Snapshot { version: 8, .. })));
    }

    #[tokio::test]
    async fn close_is_accounted_and_ends_the_queue() {
        let o = Outbox::new(1000);
        o.push(Outbound::Text("bye".into()));
        o.close("shutting down");
        o.push(Outbound::Text("ignored after close".into()));
        assert!(matches!(o.next().await, Next::Send(Outbound::Text(_))));
        assert!(matches!(o.next().await, Next::Send(Outbound::Close(..))));
        assert!(matches!(o.next().await, Next::Closed));
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn replies_nobody_reads_are_bounded_and_end_the_session() {
        let o = Outbox::new(1000);
        o.push_snapshot(0, frame(5000)); // A snapshot may be larger than the control budget.
        for _ in 0..10 {
            o.push(Outbound::Text("x".repeat(99)));
        }
        assert!(o.overflowed().is_none(), "990 bytes of replies fit");
        o.push(Outbound::Text("x".repeat(20)));
        let why = o.overflowed().expect("over the budget");
        assert!(why.contains("1000 bytes"), "{why}");
        assert!(o.queued_bytes() < 200, "the queue was emptied: {}", o.queued_bytes());
        o.push(Outbound::Text("ignored".into()));
        assert!(matches!(o.next().await, Next::Send(Outbound::Close(1008, _))));
        assert!(matches!(o.next().await, Next::Closed));
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn delta_that_does_not_follow_marks_lagging() {
        let o = Outbox::new(1000);
        o.push_snapshot(5, frame(1));
        assert!(!o.push_delta(4, 6, frame(1)));
        assert!(o.is_lagging());
    }

    #[test]
    fn a_new_snapshot_replaces_queued_deltas_and_snapshots() {
        let o = Outbox::new(1 << 20);
        o.push_snapshot(1, Bytes::from(vec![0; 1000]));
        assert!(o.push_delta(1, 2, Bytes::from(vec![0; 100])));
        o.push(Outbound::Text("ack".into()));
        for v in 2..100 {
            o.push_snapshot(v, Bytes::from(vec![0; 1000]));
        }
        assert_eq!(o.queued_bytes(), 1000 + 3, "one snapshot and the text stay queued");
        assert!(o.push_delta(99, 100, Bytes::from(vec![0; 100])), "Deltas follow the newest snapshot");
    }
}
