//! A protocol-level client: connect, handshake, push, and keep a replica of x̂.
//!
//! It knows the protocol, not training: tests, the load generator and the native training
//! client (`clients/native`) build on it. Deltas and snapshots are applied to the replica as
//! they arrive; a gap in the Delta chain asks the server for a resync by itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use half::f16;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::frame::{self, FrameKind, PushHeader, check_prefix};
use crate::protocol::message::{
    Ack, ClientKind, ClientMessage, Directive, ErrorMessage, Hello, Reject, Role, ServerMessage, Welcome,
};
use crate::protocol::replica::{Replica, ReplicaError};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How to reach and introduce oneself to a server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `ws://host:port/ws` or `wss://…`.
    pub url: String,
    pub client_id: String,
    pub token: Option<String>,
    pub kind: ClientKind,
    pub role: Role,
    pub model: String,
    pub device: Option<String>,
    /// PEM file of a private CA to trust for `wss://` (otherwise the Mozilla roots).
    pub ca: Option<std::path::PathBuf>,
    /// Largest message accepted from the server.
    pub max_message_bytes: usize,
    pub timeout: Duration,
    /// The `resume_secret` of an earlier Welcome to this client id (see `Hello`).
    pub resume_secret: Option<String>,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>, client_id: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id: client_id.into(),
            token: None,
            kind: ClientKind::Synthetic,
            role: Role::Trainer,
            model: model.into(),
            device: None,
            ca: None,
            max_message_bytes: 1 << 30,
            timeout: Duration::from_secs(30),
            resume_secret: None,
        }
    }
}

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: Box<tokio_tungstenite::tungstenite::Error> },
    #[error("websocket: {0}")]
    Ws(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("server refused ({field}): {message}")]
    Refused { field: String, message: String },
    /// The server's TLS certificate was refused: retrying cannot help.
    #[error("the server's certificate at {url} was refused ({problem}): {hint}")]
    Certificate { url: String, problem: String, hint: &'static str },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed")]
    Closed,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Something the server sent, after the client applied it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Ack(Ack),
    Reject(Reject),
    /// A Delta was applied; the replica is now at `version`.
    Delta {
        version: u64,
        nnz: u32,
        bytes: usize,
    },
    /// A snapshot replaced the replica.
    Snapshot {
        version: u64,
        bytes: usize,
    },
    /// The Delta chain had a gap; a resync was requested.
    Resyncing {
        have: Option<u64>,
    },
    Directive(Directive),
    Error(ErrorMessage),
    RoundDropped {
        round: u64,
        reason: String,
    },
    Bye {
        reason: String,
    },
}

/// The receiving half of a session: raw WebSocket messages, for [`Session::handle`].
pub type Messages = SplitStream<Ws>;

/// A session's state and sending half: the replica, the Welcome, the last directive.
pub struct Session {
    tx: SplitSink<Ws, Message>,
    pub welcome: Welcome,
    pub replica: Replica,
    /// The last directive received (merged).
    pub directive: Directive,
    bytes_in: u64,
    bytes_out: u64,
}

/// An open session: [`Session`] plus its message stream. Dereferences to the session.
pub struct Connection {
    session: Session,
    rx: Messages,
    timeout: Duration,
}

impl std::ops::Deref for Connection {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.session
    }
}

fn tls_connector(ca: Option<&Path>) -> Result<Connector, ClientError> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Tls(format!("{}: no certificate found", path.display())));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

impl Connection {
    /// Connects, says Hello and waits for Welcome and the first snapshot.
    pub async fn connect(opts: &ClientOptions) -> Result<Self, ClientError> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(opts.max_message_bytes))
            .max_frame_size(Some(opts.max_message_bytes));
        let connector =
            if opts.url.starts_with("wss://") { Some(tls_connector(opts.ca.as_deref())?) } else { None };
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            opts.url.as_str(),
            Some(config),
            true,
            connector,
        );
        let (ws, _) = tokio::time::timeout(opts.timeout, connect)
            .await
            .map_err(|_| ClientError::Timeout("connection"))?
            .map_err(|e| match certificate_problem(&e) {
                Some((problem, hint)) => ClientError::Certificate { url: opts.url.clone(), problem, hint },
                None => ClientError::Connect { url: opts.url.clone(), source: Box::new(e) },
            })?;
        let (mut tx, mut rx) = ws.split();
        let hello = ClientMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION as u32,
            client_id: opts.client_id.clone(),
            token: opts.token.clone(),
            kind: opts.kind,
            model: opts.model.clone(),
            role: opts.role,
            device: opts.device.clone(),
            resume_secret: opts.resume_secret.clone(),
        });
        let text = serde_json::to_string(&hello).expect("hello serializes");
        tx.send(Message::text(text)).await.map_err(|e| ClientError::Ws(Box::new(e)))?;
        let welcome = loop {
            let m = tokio::time::timeout(opts.timeout, rx.next())
                .await
                .map_err(|_| ClientError::Timeout("welcome"))?;
            match m {
                None => return Err(ClientError::Closed),
                Some(Err(e)) => return Err(ClientError::Ws(Box::new(e))),
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(t.as_str()) {
                    Ok(ServerMessage::Welcome(w)) => break w,
                    Ok(ServerMessage::Error(e)) => {
                        return Err(ClientError::Refused { field: e.field, message: e.message });
                    }
                    Ok(other) => {
                        return Err(ClientError::Protocol(format!("expected welcome, got {other:?}")));
                    }
                    Err(e) => return Err(ClientError::Protocol(format!("bad welcome: {e}"))),
                },
                Some(Ok(Message::Close(_))) => return Err(ClientError::Closed),
                Some(Ok(_)) => {}
            }
        };
        let n =
            usize::try_from(welcome.params).map_err(|_| ClientError::Protocol("params overflow".into()))?;
        let session = Session {
            tx,
            replica: Replica::new(n),
            welcome,
            directive: Directive::default(),
            bytes_in: 0,
            bytes_out: 0,
        };
        let mut conn = Connection { session, rx, timeout: opts.timeout };
        // The server sends the snapshot right after Welcome.
        loop {
            match conn.next_event().await? {
                Event::Snapshot { .. } => break,
                Event::Error(e) => return Err(ClientError::Refused { field: e.field, message: e.message }),
                _ => {}
            }
        }
        Ok(conn)
    }

    /// Waits for the next event, applying Deltas and snapshots to the replica.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            let m = match tokio::time::timeout(self.timeout, self.rx.next()).await {
                Err(_) => return Err(ClientError::Timeout("a server message")),
                Ok(None) => return Err(ClientError::Closed),
                Ok(Some(Err(e))) => return Err(ClientError::Ws(Box::new(e))),
                Ok(Some(Ok(m))) => m,
            };
            if let Some(e) = self.session.handle(m).await? {
                return Ok(e);
            }
        }
    }

    /// Like [`Connection::next_event`] but returns `None` after `wait` with nothing received.
    pub async fn next_event_within(&mut self, wait: Duration) -> Result<Option<Event>, ClientError> {
        match tokio::time::timeout(wait, self.next_event()).await {
            Err(_) => Ok(None),
            Ok(r) => r.map(Some),
        }
    }

    /// Says Bye and closes.
    pub async fn close(self, reason: &str) {
        self.session.close(reason).await;
    }

    /// The session and its message stream, to read messages in another task.
    pub fn into_parts(self) -> (Session, Messages) {
        (self.session, self.rx)
    }
}

impl Session {
    pub fn num_params(&self) -> usize {
        self.replica.values().len()
    }

    /// The replica version (the base of the next update).
    pub fn version(&self) -> u64 {
        self.replica.version().unwrap_or(0)
    }

    /// (bytes received, bytes sent) in WebSocket payloads.
    pub fn traffic(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }

    /// Sends a Push built from ascending indices and their values.
    pub async fn push(
        &mut self,
        header: &PushHeader,
        indices: &[u32],
        values: &[f16],
    ) -> Result<(), ClientError> {
        self.send_binary(frame::encode_push(header, indices, values)).await
    }

    /// Sends raw bytes as a binary frame (tests use it to send malformed frames).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.bytes_out += bytes.len() as u64;
        self.tx.send(Message::binary(bytes)).await.map_err(|e| ClientError::Ws(Box::new(e)))
    }

    /// Sends a control message.
    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(msg).expect("client messages serialize");
        self.send_text(text).await
    }

    /// Sends raw text (tests use it to send malformed messages).
    pub async fn send_text(&mut self, text: String) -> Result<(), ClientError> {
        self.bytes_out += text.len() as u64;
        self.tx.send(Message::text(text)).await.map_err(|e| ClientError::Ws(Box::new(e)))
    }

    /// Applies one message from the server (Deltas and snapshots to the replica) and says what
    /// it was; `None` for messages that carry nothing (pings).
    pub async fn handle(&mut self, m: Message) -> Result<Option<Event>, ClientError> {
        match m {
            Message::Binary(b) => {
                self.bytes_in += b.len() as u64;
                match check_prefix(&b).map_err(|e| ClientError::Protocol(e.to_string()))? {
                    FrameKind::Snapshot => {
                        let version = self.replica.apply_snapshot_frame(&b)?;
                        Ok(Some(Event::Snapshot { version, bytes: b.len() }))
                    }
                    FrameKind::Delta => match self.replica.apply_delta_frame(&b) {
                        Ok(version) => {
                            let nnz = frame::DeltaView::decode(&b, self.num_params() as u64)
                                .map(|d| d.header.nnz)
                                .unwrap_or(0);
                            Ok(Some(Event::Delta { version, nnz, bytes: b.len() }))
                        }
                        Err(ReplicaError::Gap { have, .. }) => {
                            self.send(&ClientMessage::SnapshotRequest).await?;
                            Ok(Some(Event::Resyncing { have: Some(have) }))
                        }
                        Err(e) => Err(e.into()),
                    },
                    FrameKind::Push => Err(ClientError::Protocol("server sent a Push frame".into())),
                }
            }
            Message::Text(t) => {
                self.bytes_in += t.len() as u64;
                let msg: ServerMessage = serde_json::from_str(t.as_str())
                    .map_err(|e| ClientError::Protocol(format!("bad server message: {e}")))?;
                Ok(Some(match msg {
                    ServerMessage::Ack(a) => Event::Ack(a),
                    ServerMessage::Reject(r) => Event::Reject(r),
                    ServerMessage::Directive(d) => {
                        self.directive.merge(&d);
                        Event::Directive(d)
                    }
                    ServerMessage::Error(e) => Event::Error(e),
                    ServerMessage::RoundDropped { round, reason } => Event::RoundDropped { round, reason },
                    ServerMessage::Bye { reason } => Event::Bye { reason },
                    ServerMessage::Welcome(_) => return Err(ClientError::Protocol("second welcome".into())),
                }))
            }
            Message::Close(_) => Err(ClientError::Closed),
            _ => Ok(None),
        }
    }

    /// Says Bye and closes.
    pub async fn close(mut self, reason: &str) {
        let _ = self.send(&ClientMessage::Bye { reason: reason.into() }).await;
        let _ = self.tx.close().await;
    }
}

/// The certificate error inside a connection error, with what to do about it.
fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<(String, &'static str)> {
    use tokio_rustls::rustls::{CertificateError, Error as TlsError};
    let mut cur = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<TlsError>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<TlsError>())
        });
        if let Some(TlsError::InvalidCertificate(c)) = tls {
            let hint = match c {
                CertificateError::Other(o) if format!("{o:?}").contains("CaUsedAsEndEntity") => CA_AS_LEAF,
                CertificateError::UnknownIssuer => {
                    "pass the certificate of the CA that signed the server's certificate with --ca \
                     (a self-signed server certificate cannot be trusted directly; see the README, TLS)"
                }
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    "the certificate does not name the host in the URL: connect with a name or address \
                     listed in its subjectAltName"
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the certificate has expired: the server needs a new one"
                }
                _ => "check the server's certificate and the CA passed with --ca (README, TLS)",
            };
            return Some((format!("{c:?}"), hint));
        }
        cur = err.source();
    }
    None
}

const CA_AS_LEAF: &str = "the certificate is marked as a CA (as `openssl req -x509` makes it) but the \
     server uses it as its own: make a CA and a server certificate signed by it, serve the \
     server certificate and pass the CA with --ca (README, TLS)";
