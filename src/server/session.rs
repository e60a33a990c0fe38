//! One WebSocket session: handshake, then frames in (validated) and frames out (from the outbox).
//!
//! The handshake must complete within the handshake timeout: a Hello text frame whose protocol
//! version, client id, model and token are right. After it, binary frames are Pushes, validated
//! completely before anything sized by the client is allocated; text frames are control
//! messages. A bad Push gets a Reject naming the Push and the field; a bad frame an Error naming
//! the field; neither affects any other session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Shared;
use super::coordinator::Inbound;
use super::outbox::{Next, Outbound, Outbox};
use crate::core::Input;
use crate::policy::SessionId;
use crate::protocol::frame::{PushLimits, PushView, ValidatedPush};
use crate::protocol::message::{
    ClientMessage, HandshakeError, Hello, MAX_CONTROL_BYTES, MAX_ECHO_LEN, MAX_REASON_LEN, Reject,
    ServerMessage, clip, cut, parse_hello,
};

/// Runs a session to its end.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    peer: std::net::SocketAddr,
    started: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let handshake = Duration::from_secs_f64(shared.cfg.handshake_timeout_s);

    // 1. Handshake.
    let first = tokio::time::timeout(handshake, stream.next()).await;
    let hello: Result<Hello, (String, HandshakeError)> = match first {
        Err(_) => {
            shared.metrics.refused("handshake_timeout");
            let _ = send_error(&mut sink, "handshake", "no hello within the handshake timeout", true).await;
            return;
        }
        Ok(Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })))) => {
            shared.metrics.refused("frame");
            let message = format!("frame of {size} bytes exceeds max_frame_bytes {max_size}");
            let _ = send_error(&mut sink, "frame", &message, true).await;
            return;
        }
        Ok(None) | Ok(Some(Err(_))) => return,
        Ok(Some(Ok(Message::Text(t)))) => {
            parse_hello(t.as_str(), &shared.layout.name).map_err(|e| (t.to_string(), e))
        }
        Ok(Some(Ok(Message::Binary(_)))) => {
            shared.metrics.refused("handshake");
            let _ = send_error(
                &mut sink,
                "handshake",
                "binary frame before handshake: the first message must be a hello text frame",
                true,
            )
            .await;
            return;
        }
        Ok(Some(Ok(_))) => Err((String::new(), HandshakeError::NotHello)),
    };
    let hello = match hello {
        Ok(h) => h,
        Err((_, e)) => {
            shared.metrics.refused(e.field());
            tracing::info!(%peer, field = e.field(), "handshake refused: {e}");
            let _ = send_error(&mut sink, e.field(), &e.to_string(), true).await;
            return;
        }
    };
    if shared.auth.enabled()
        && let Some(wait) = shared.throttle.blocked(peer.ip())
    {
        shared.metrics.refused("auth_throttled");
        let message = format!(
            "too many failed tokens from {}: the next attempt is checked in {:.0} s",
            peer.ip(),
            wait.as_secs_f64().ceil()
        );
        let _ = send_error(&mut sink, "token", &message, true).await;
        return;
    }
    let token_ok = shared.auth.check(&hello.client_id, hello.token.as_deref());
    if shared.auth.enabled() {
        if token_ok {
            shared.throttle.succeeded(peer.ip());
        } else {
            shared.throttle.failed(peer.ip());
        }
    }
    if !token_ok {
        shared.metrics.refused("token");
        tracing::info!(%peer, client = %hello.client_id, "handshake refused: missing or invalid token");
        let _ = send_error(&mut sink, "token", &HandshakeError::Token.to_string(), true).await;
        return;
    }

    // 2. Join.
    let outbox = Arc::new(Outbox::new(shared.cfg.max_pending_bytes));
    let (reply_tx, reply_rx) = oneshot::channel();
    let name = hello.client_id.clone();
    let proven = shared.auth.is_bound(&hello.client_id);
    if shared.tx.send(Inbound::Join { hello, proven, outbox: outbox.clone(), reply: reply_tx }).await.is_err()
    {
        let _ = send_error(&mut sink, "server", "server is shutting down", true).await;
        return;
    }
    let session = match reply_rx.await {
        Ok(Ok(id)) => id,
        Ok(Err((field, reason))) => {
            shared.metrics.refused(field);
            tracing::info!(%peer, client = %name, field, "join refused: {reason}");
            let _ = send_error(&mut sink, field, &reason, true).await;
            return;
        }
        Err(_) => return,
    };
    shared.metrics.session_opened();

    // 3. Writer: outbox → socket.
    let writer_tx = shared.tx.clone();
    let writer_outbox = outbox.clone();
    let writer_metrics = shared.clone();
    let mut writer = tokio::spawn(async move {
        loop {
            // Messages are fed without flushing while more are queued, and flushed once the
            // queue is empty: a burst of Acks and a Delta leave in one write.
            let msg = match writer_outbox.next().await {
                Next::Send(Outbound::Text(t)) => Message::text(t),
                Next::Send(
                    Outbound::Binary(b)
                    | Outbound::Delta { frame: b, .. }
                    | Outbound::Snapshot { frame: b, .. },
                ) if b.len() > FRAGMENT_BYTES => {
                    let t0 = std::time::Instant::now();
                    for f in fragments(b) {
                        sink.feed(Message::Frame(f)).await?;
                    }
                    if writer_outbox.is_empty() {
                        sink.flush().await?;
                    }
                    writer_metrics.metrics.stage("send", t0.elapsed());
                    continue;
                }
                Next::Send(
                    Outbound::Binary(b)
                    | Outbound::Delta { frame: b, .. }
                    | Outbound::Snapshot { frame: b, .. },
                ) => Message::Binary(b),
                Next::Send(Outbound::Close(code, reason)) => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: cut(&reason, 120).into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return Ok::<(), WsError>(());
                }
                Next::Closed => {
                    let _ = sink.close().await;
                    return Ok(());
                }
                Next::Resync(have) => {
                    if writer_tx.send(Inbound::Core(Input::Resync { session, have })).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            };
            let t0 = std::time::Instant::now();
            sink.feed(msg).await?;
            if writer_outbox.is_empty() {
                sink.flush().await?;
            }
            writer_metrics.metrics.stage("send", t0.elapsed());
        }
    });

    // 4. Reader: socket → validation → coordinator.
    let reader = read_loop(&mut stream, &shared, session, &outbox, &started);
    let mut writer_done = false;
    let (code, reason) = tokio::select! {
        r = reader => r,
        w = &mut writer => {
            writer_done = true;
            match w {
                Ok(Ok(())) => (1000, "closed by server".to_string()),
                Ok(Err(e)) => (1011, format!("write failed: {e}")),
                Err(e) => (1011, format!("writer task failed: {e}")),
            }
        },
        _ = shared.shutdown_started() => (1001, "server shutting down".to_string()),
    };
    let _ = shared.tx.send(Inbound::Core(Input::Leave { session, reason: reason.clone() })).await;
    // Let the writer flush what is queued (e.g. a Bye) for a moment, then stop it. A finished
    // JoinHandle must not be polled again.
    outbox.close_with(code, reason.clone());
    if !writer_done && tokio::time::timeout(Duration::from_secs(5), &mut writer).await.is_err() {
        writer.abort();
    }
    shared.metrics.session_closed();
    tracing::debug!(session, %name, %reason, "session ended");
}

/// Reads frames until the socket closes or the session must end; returns why it ended.
async fn read_loop<S>(
    stream: &mut futures_util::stream::SplitStream<WebSocketStream<S>>,
    shared: &Shared,
    session: SessionId,
    outbox: &Outbox,
    started: &std::sync::Mutex<Option<tokio::time::Instant>>,
) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let idle = Duration::from_secs_f64(shared.cfg.idle_timeout_s);
    let frame_timeout = Duration::from_secs_f64(shared.cfg.frame_timeout_s);
    let limits = PushLimits { num_params: shared.num_params, max_nnz: shared.max_nnz };
    let mut rate = RateLimiter::new(shared.cfg.max_push_rate);
    let mut last_msg = tokio::time::Instant::now();
    let tick = frame_timeout.min(idle).min(Duration::from_secs(1)).max(Duration::from_millis(10));
    loop {
        let msg = match tokio::time::timeout(tick, stream.next()).await {
            Err(_) => {
                let now = tokio::time::Instant::now();
                let begun = *started.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(since) = begun
                    && now - since >= frame_timeout
                {
                    shared.metrics.rejected("frame_timeout");
                    error_to(
                        outbox,
                        "frame",
                        &format!(
                            "a message was begun but not completed within {:.0} s",
                            frame_timeout.as_secs_f64()
                        ),
                        true,
                    );
                    return (1008, "partial frame timeout".into());
                } else if begun.is_none() && now - last_msg >= idle {
                    error_to(outbox, "idle", "no message within the idle timeout", true);
                    return (1000, "idle timeout".into());
                }
                continue;
            }
            Ok(None) => return (1000, "connection closed".into()),
            Ok(Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })))) => {
                shared.metrics.rejected("frame");
                error_to(
                    outbox,
                    "frame",
                    &format!("frame of {size} bytes exceeds max_frame_bytes {max_size}"),
                    true,
                );
                return (1009, "oversized frame".into());
            }
            Ok(Some(Err(e))) => return (1002, format!("connection error: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        // Only data messages count as activity: a Ping every few seconds does not keep a
        // silent (or half-sent) session open.
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            last_msg = tokio::time::Instant::now();
        }
        match msg {
            Message::Binary(frame) => handle_push(frame, shared, session, outbox, &limits, &mut rate).await,
            Message::Text(text) if text.len() > MAX_CONTROL_BYTES => {
                error_to(
                    outbox,
                    "json",
                    &format!("control message of {} bytes exceeds {MAX_CONTROL_BYTES}", text.len()),
                    false,
                );
            }
            Message::Text(text) => match serde_json::from_str::<ClientMessage>(text.as_str()) {
                Ok(ClientMessage::Hello(_)) => error_to(outbox, "handshake", "already joined", false),
                Ok(ClientMessage::Bye { reason }) => {
                    return (1000, format!("client said bye: {}", clip(&reason, MAX_REASON_LEN)));
                }
                Ok(ClientMessage::SnapshotRequest) => {
                    let _ = shared.tx.send(Inbound::Core(Input::SnapshotRequest { session })).await;
                }
                Ok(ClientMessage::Eval(report)) => {
                    let _ = shared.tx.send(Inbound::Core(Input::Eval { session, report })).await;
                }
                Ok(ClientMessage::Skip(report)) => {
                    let _ = shared.tx.send(Inbound::Core(Input::Skip { session, report })).await;
                }
                Ok(ClientMessage::RoundTime(report)) => {
                    let _ = shared.tx.send(Inbound::Core(Input::RoundTime { session, report })).await;
                }
                Err(e) => error_to(outbox, "json", &format!("malformed control message: {e}"), false),
            },
            Message::Close(_) => return (1000, "client closed".into()),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        if let Some(why) = outbox.overflowed() {
            shared.metrics.rejected("unread_replies");
            return (1008, why);
        }
    }
}

async fn handle_push(
    frame: Bytes,
    shared: &Shared,
    session: SessionId,
    outbox: &Outbox,
    limits: &PushLimits,
    rate: &mut RateLimiter,
) {
    let t0 = std::time::Instant::now();
    // The frame moves to the coordinator as is: no copy of the arrays.
    let decoded = ValidatedPush::decode(frame.clone(), limits);
    shared.metrics.stage("decode", t0.elapsed());
    match decoded {
        Ok(push) => {
            if !rate.allow(tokio::time::Instant::now()) {
                shared.metrics.rejected("rate");
                let reason = format!("push rate exceeds max_push_rate {}/s", shared.cfg.max_push_rate);
                reject_to(outbox, push.header().seq, "rate", &reason);
                return;
            }
            let _ = shared.tx.send(Inbound::Core(Input::Push { session, push })).await;
        }
        Err(e) => {
            shared.metrics.rejected(e.field());
            match PushView::peek_header(&frame) {
                Ok(h) if e.header_was_readable() => reject_to(outbox, h.seq, e.field(), &e.to_string()),
                _ => error_to(outbox, e.field(), &e.to_string(), false),
            }
        }
    }
}

fn error_to(outbox: &Outbox, field: &str, message: &str, fatal: bool) {
    outbox.push(Outbound::Text(ServerMessage::error(field, message, fatal).to_json()));
}

fn reject_to(outbox: &Outbox, seq: u64, field: &str, reason: &str) {
    let reason = clip(reason, MAX_ECHO_LEN).into_owned();
    outbox.push(Outbound::Text(
        ServerMessage::Reject(Reject { seq, field: field.into(), reason, retry_after_ms: None }).to_json(),
    ));
}

/// Sends an Error straight to the socket (before a session has an outbox) and closes.
async fn send_error<S>(
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    field: &str,
    message: &str,
    fatal: bool,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    sink.send(Message::text(ServerMessage::error(field, message, fatal).to_json())).await?;
    if fatal {
        let frame = CloseFrame { code: CloseCode::Policy, reason: cut(message, 120).into() };
        sink.send(Message::Close(Some(frame))).await?;
    }
    sink.flush().await
}

/// Token bucket: `rate` pushes per second, bursts of up to max(1, rate) pushes.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Option<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(rate: f64) -> Self {
        Self { rate, tokens: rate.max(1.0), last: None }
    }

    fn allow(&mut self, now: tokio::time::Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if let Some(last) = self.last {
            self.tokens = (self.tokens + (now - last).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Largest WebSocket frame the server writes; longer binary messages go out as fragments.
///
/// tungstenite copies each outgoing frame into its write buffer, and that buffer keeps its
/// largest size for the life of the session: one 4 MB Snapshot would otherwise pin 4 MB per
/// client (4 GB for 1,000 clients of a 2^20-parameter model). Fragments are reassembled by
/// every WebSocket client (RFC 6455 §5.4), so the protocol is unchanged.
pub const FRAGMENT_BYTES: usize = 64 * 1024;

/// `message` as a binary WebSocket message in fragments of at most [`FRAGMENT_BYTES`] (shared
/// slices of the same bytes, no copy).
fn fragments(
    message: bytes::Bytes,
) -> impl Iterator<Item = tokio_tungstenite::tungstenite::protocol::frame::Frame> {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let n = message.len().div_ceil(FRAGMENT_BYTES).max(1);
    (0..n).map(move |i| {
        let start = i * FRAGMENT_BYTES;
        let end = (start + FRAGMENT_BYTES).min(message.len());
        let opcode = OpCode::Data(if i == 0 { Data::Binary } else { Data::Continue });
        Frame::message(message.slice(start..end), opcode, i + 1 == n)
    })
}

/// A connection that follows the WebSocket frames read from it, so that the session can tell a
/// silent client from one whose data message has begun and stalled (the WebSocket layer only
/// hands over complete messages). It parses the frame headers of what it reads (client frames
/// are masked: RFC 6455 §5.2) and records when the current data message began; control frames
/// (Ping, Pong, Close) between fragments do not end or restart it.
pub struct Counted<T> {
    inner: T,
    frames: FrameTracker,
    started: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// Where the reader is in the frame stream.
#[derive(Default)]
struct FrameTracker {
    head: [u8; 14],
    have: usize,
    /// Payload bytes left in the current frame (after its header).
    payload_left: u64,
    in_payload: bool,
    /// The current frame is a data frame (text, binary, continuation) with FIN set.
    data_fin: bool,
    data: bool,
    /// A data message has begun and not ended.
    in_message: bool,
}

impl FrameTracker {
    /// Feeds bytes; returns (a data message began, a data message ended) in them, in order:
    /// the last event wins.
    fn feed(&mut self, mut b: &[u8]) -> Option<bool> {
        let mut last = None;
        while !b.is_empty() {
            if self.in_payload {
                let n = (self.payload_left.min(b.len() as u64)) as usize;
                self.payload_left -= n as u64;
                b = &b[n..];
                if self.payload_left == 0 {
                    self.in_payload = false;
                    if self.data && self.data_fin {
                        self.in_message = false;
                        last = Some(false);
                    }
                }
                continue;
            }
            self.head[self.have] = b[0];
            self.have += 1;
            b = &b[1..];
            if self.have == 1 {
                let opcode = self.head[0] & 0x0F;
                if opcode < 8 && !self.in_message {
                    self.in_message = true;
                    last = Some(true);
                }
                continue;
            }
            let len7 = self.head[1] & 0x7F;
            let ext = match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
            if self.have < 2 + ext + mask {
                continue;
            }
            let len = match ext {
                0 => len7 as u64,
                2 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
                _ => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            };
            let opcode = self.head[0] & 0x0F;
            self.data = opcode < 8;
            self.data_fin = self.head[0] & 0x80 != 0;
            self.have = 0;
            self.payload_left = len;
            self.in_payload = true;
            if len == 0 {
                self.in_payload = false;
                if self.data && self.data_fin {
                    self.in_message = false;
                    last = Some(false);
                }
            }
        }
        last
    }
}

impl<T> Counted<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, frames: FrameTracker::default(), started: Arc::default() }
    }

    /// When the data message being read began (None: none is in progress).
    pub fn message_started(&self) -> Arc<std::sync::Mutex<Option<tokio::time::Instant>>> {
        self.started.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let this = &mut *self;
        if let Some(began) = this.frames.feed(&buf.filled()[before..]) {
            let mut g = this.started.lock().unwrap_or_else(|p| p.into_inner());
            *g = began.then(tokio::time::Instant::now);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::FrameTracker;

    fn frame(fin: bool, opcode: u8, payload: usize) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload < 126 {
            v.push(0x80 | payload as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload as u16).to_be_bytes());
        }
        v.extend_from_slice(&[9, 9, 9, 9]);
        v.extend(std::iter::repeat_n(7u8, payload));
        v
    }

    #[test]
    fn tracks_data_messages_across_fragments_and_control_frames() {
        let mut t = FrameTracker::default();
        // A whole message in one read: began and ended, ended last.
        assert_eq!(t.feed(&frame(true, 2, 300)), Some(false));
        assert!(!t.in_message);
        // A message and the first half of the next in one read: the next one has begun.
        let mut b = frame(true, 1, 10);
        let next = frame(true, 2, 1000);
        b.extend_from_slice(&next[..500]);
        assert_eq!(t.feed(&b), Some(true));
        assert!(t.in_message);
        assert_eq!(t.feed(&next[500..]), Some(false));
        // Fragments with a Ping between them: the message stays begun until its last fragment.
        assert_eq!(t.feed(&frame(false, 2, 50)), Some(true));
        assert_eq!(t.feed(&frame(true, 9, 4)), None, "a ping does not end it");
        assert!(t.in_message);
        assert_eq!(t.feed(&frame(false, 0, 50)), None);
        assert_eq!(t.feed(&frame(true, 0, 0)), Some(false));
        // Byte by byte.
        let f = frame(true, 2, 200);
        let mut events = Vec::new();
        for byte in &f {
            if let Some(e) = t.feed(std::slice::from_ref(byte)) {
                events.push(e);
            }
        }
        assert_eq!(events, vec![true, false]);
    }
}
