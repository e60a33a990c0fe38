//! Control messages: JSON in WebSocket text frames, tagged by `"type"`.

use serde::{Deserialize, Serialize};

use super::PROTOCOL_VERSION;
use super::model::TensorSpec;

/// Longest accepted client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 64;
/// Longest `device` description, token, model name and bye reason a client may send (bytes).
pub const MAX_DEVICE_LEN: usize = 256;
pub const MAX_TOKEN_LEN: usize = 512;
pub const MAX_MODEL_NAME_LEN: usize = 128;
pub const MAX_REASON_LEN: usize = 256;
/// Longest control (text) message a client may send, Hello included (bytes).
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;
/// Longest text the server echoes back or logs from what a client sent (bytes).
pub const MAX_ECHO_LEN: usize = 200;

/// `s` cut to at most `max` bytes at a character boundary; when it was cut, "… (N bytes)"
/// follows (so the result can be up to ~25 bytes longer than `max`).
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    format!("{}… ({} bytes)", cut(s, max), s.len()).into()
}

/// `s` cut to at most `max` bytes at a character boundary (for fields with a hard size, such
/// as a WebSocket close reason).
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What kind of program a client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    Native,
    Browser,
    /// A load generator or test harness.
    Synthetic,
}

/// What a client does in the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Trains and pushes updates.
    #[default]
    Trainer,
    /// Never trains: scores the public replica and reports accuracy and loss.
    Evaluator,
}

/// First message of every session, client → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    pub client_id: String,
    #[serde(default)]
    pub token: Option<String>,
    pub kind: ClientKind,
    pub model: String,
    #[serde(default)]
    pub role: Role,
    /// Free-form description of the device (shown on the dashboard, never trusted).
    #[serde(default)]
    pub device: Option<String>,
    /// The `resume_secret` of an earlier Welcome: proves that a reconnecting client is the one
    /// whose session with this client id is still open (that session is then replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_secret: Option<String>,
}

/// An evaluator's score of the public replica at `version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalReport {
    pub version: u64,
    pub accuracy: f64,
    pub loss: f64,
    pub samples: u64,
}

/// Hermes' "no significant improvement" message: a round finished without a push.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipReport {
    /// The client's local round counter.
    pub round: u64,
    /// The test loss that did not pass the gate.
    pub loss: f64,
    /// Seconds the round took (Hermes' allocation uses it).
    #[serde(default)]
    pub round_seconds: Option<f64>,
}

/// How long a client's last local round took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundTime {
    /// Seconds of local training in the round.
    pub seconds: f64,
    /// Local steps in the round.
    pub steps: u64,
    /// Seconds between sending the last Push and receiving its Ack (ADSP's commit overhead).
    #[serde(default)]
    pub commit_overhead_s: Option<f64>,
}

impl RoundTime {
    /// True when every number is finite and non-negative.
    pub fn is_valid(&self) -> bool {
        self.seconds.is_finite()
            && self.seconds >= 0.0
            && self.commit_overhead_s.is_none_or(|o| o.is_finite() && o >= 0.0)
    }
}

/// Messages a client sends as text frames.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello(Hello),
    /// Ask for a dense snapshot of the public replica (the client is behind or lost a Delta).
    SnapshotRequest,
    Eval(EvalReport),
    Skip(SkipReport),
    /// Timing the client measured for its last round (used by ADSP and Hermes).
    RoundTime(RoundTime),
    Bye {
        reason: String,
    },
}

/// Settings the server sends at Welcome that clients must follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSettings {
    /// The synchronization policy, e.g. "asp".
    pub policy: String,
    /// Upload density ρ_up: a Push carries at most ⌈ρ_up·n⌉ entries (clients should send
    /// exactly that many, Top-k with error feedback).
    pub rho_up: f64,
    /// Download density ρ_down of each Delta.
    pub rho_down: f64,
    /// Largest accepted staleness t − τ.
    pub max_staleness: u64,
    /// Largest accepted nnz of one Push.
    pub max_nnz: u64,
    /// Largest accepted WebSocket message, bytes.
    pub max_frame_bytes: u64,
    /// A client behind by more than this many versions gets a Snapshot instead of Deltas.
    pub max_delta_chain: u64,
    /// Pushes per second one client may send (token bucket; 0 = unlimited).
    pub max_push_rate: f64,
}

/// Server → client answer to Hello.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// Server-assigned session number.
    pub session: u64,
    pub model: String,
    /// Ordered tensors; values are flattened row-major, tensor after tensor.
    pub layout: Vec<TensorSpec>,
    /// Total parameters (sum of the layout's element counts).
    pub params: u64,
    /// The public replica version at the time of Welcome.
    pub version: u64,
    pub settings: SessionSettings,
    /// A secret of this client id, the same for every session of it: a reconnecting client
    /// sends it in its Hello to replace a session of its own that the server still holds.
    #[serde(default)]
    pub resume_secret: String,
}

/// A Push was accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The Push's sequence number.
    pub seq: u64,
    /// The server version when the Push was accepted.
    pub version: u64,
    /// Staleness t − τ at acceptance.
    pub staleness: u64,
}

/// A Push was refused; the session continues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub seq: u64,
    /// The Push field at fault (e.g. "indices", "base_version"), or "busy": the server could
    /// not take it now (its log is unreachable), nothing of it was kept.
    pub field: String,
    pub reason: String,
    /// With "busy": wait this long before pushing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A frame or message could not be used. When `fatal`, the server closes the session after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// The field or part at fault (e.g. "magic", "token", "handshake").
    pub field: String,
    pub message: String,
    pub fatal: bool,
}

/// What the policy asks of one client. Absent fields keep their previous value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Directive {
    /// Push every this many seconds (ADSP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_interval_s: Option<f64>,
    /// Local steps between pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_steps: Option<u64>,
    /// Mini-batch size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    /// Samples per local round (Hermes' D).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// Local epochs per round (Hermes' E).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_epochs: Option<u64>,
    /// Suggested local learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Why the directive was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Directive {
    /// Takes every field `other` sets.
    pub fn merge(&mut self, other: &Directive) {
        macro_rules! m {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f.clone(); } )* };
        }
        m!(commit_interval_s, local_steps, batch_size, chunk_size, local_epochs, learning_rate, reason);
    }
}

/// Messages the server sends as text frames.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome(Welcome),
    Ack(Ack),
    Reject(Reject),
    Directive(Directive),
    Error(ErrorMessage),
    /// BSP: the client missed the round deadline and was dropped from round `round`.
    RoundDropped {
        round: u64,
        reason: String,
    },
    Bye {
        reason: String,
    },
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
    /// An Error; the message is clipped to [`MAX_ECHO_LEN`] bytes (it may quote client input).
    pub fn error(field: &str, message: impl Into<String>, fatal: bool) -> Self {
        let message = message.into();
        let message = clip(&message, MAX_ECHO_LEN).into_owned();
        Self::Error(ErrorMessage { field: clip(field, 64).into_owned(), message, fatal })
    }
}

/// Why a Hello was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandshakeError {
    #[error("malformed hello: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: client speaks {client}, server speaks {server}")]
    Protocol { client: u32, server: u32 },
    #[error("client_id must be 1 to {MAX_CLIENT_ID_LEN} characters of [A-Za-z0-9._-]")]
    ClientId,
    #[error("model {requested:?} is not served here; this server serves {served:?}")]
    Model { requested: String, served: String },
    #[error("missing or invalid token")]
    Token,
    #[error("the first message must be a JSON hello text frame")]
    NotHello,
    #[error("{field} is {len} bytes; at most {max} are allowed")]
    TooLong { field: &'static str, len: usize, max: usize },
}

impl HandshakeError {
    pub fn field(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::NotHello => "handshake",
            Self::Protocol { .. } => "protocol",
            Self::ClientId => "client_id",
            Self::Model { .. } => "model",
            Self::Token => "token",
            Self::TooLong { field, .. } => field,
        }
    }
}

/// Parses and checks a Hello text frame (everything but the token, which needs the server's
/// secret store). Never panics, whatever the input.
pub fn parse_hello(text: &str, served_model: &str) -> Result<Hello, HandshakeError> {
    if text.len() > MAX_CONTROL_BYTES {
        return Err(HandshakeError::TooLong { field: "handshake", len: text.len(), max: MAX_CONTROL_BYTES });
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| HandshakeError::Malformed(clip(&e.to_string(), MAX_ECHO_LEN).into()))?;
    if value.get("type").and_then(|t| t.as_str()) != Some("hello") {
        return Err(HandshakeError::NotHello);
    }
    // Check the version before the rest, so that a newer client with new fields is told the
    // real reason.
    if let Some(p) = value.get("protocol").and_then(|p| p.as_u64())
        && p != PROTOCOL_VERSION as u64
    {
        return Err(HandshakeError::Protocol {
            client: p.min(u32::MAX as u64) as u32,
            server: PROTOCOL_VERSION as u32,
        });
    }
    let hello = match serde_json::from_value::<ClientMessage>(value) {
        Ok(ClientMessage::Hello(h)) => h,
        Ok(_) => return Err(HandshakeError::NotHello),
        Err(e) => return Err(HandshakeError::Malformed(clip(&e.to_string(), MAX_ECHO_LEN).into())),
    };
    let id_ok = !hello.client_id.is_empty()
        && hello.client_id.len() <= MAX_CLIENT_ID_LEN
        && hello.client_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !id_ok {
        return Err(HandshakeError::ClientId);
    }
    let too_long = |field: &'static str, len: usize, max: usize| {
        (len > max).then_some(HandshakeError::TooLong { field, len, max })
    };
    if let Some(e) = too_long("device", hello.device.as_ref().map_or(0, String::len), MAX_DEVICE_LEN)
        .or_else(|| too_long("token", hello.token.as_ref().map_or(0, String::len), MAX_TOKEN_LEN))
        .or_else(|| too_long("model", hello.model.len(), MAX_MODEL_NAME_LEN))
        .or_else(|| too_long("resume_secret", hello.resume_secret.as_ref().map_or(0, String::len), 128))
    {
        return Err(e);
    }
    if hello.model != served_model {
        return Err(HandshakeError::Model { requested: hello.model, served: served_model.into() });
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(protocol: u32, id: &str, model: &str) -> String {
        format!(
            r#"{{"type":"hello","protocol":{protocol},"client_id":"{id}","kind":"native","model":"{model}"}}"#
        )
    }

    #[test]
    fn hello_is_checked() {
        let h = parse_hello(&hello(1, "c-1", "mlp"), "mlp").unwrap();
        assert_eq!(h.client_id, "c-1");
        assert_eq!(h.role, Role::Trainer);
        let e = parse_hello(&hello(2, "c-1", "mlp"), "mlp").unwrap_err();
        assert_eq!(e.to_string(), "protocol version mismatch: client speaks 2, server speaks 1");
        assert_eq!(parse_hello(&hello(1, "", "mlp"), "mlp").unwrap_err().field(), "client_id");
        assert_eq!(parse_hello(&hello(1, "a b", "mlp"), "mlp").unwrap_err().field(), "client_id");
        assert_eq!(parse_hello(&hello(1, "a", "cnn"), "mlp").unwrap_err().field(), "model");
        assert_eq!(parse_hello("{", "mlp").unwrap_err().field(), "handshake");
        assert_eq!(parse_hello(r#"{"type":"bye","reason":""}"#, "mlp").unwrap_err().field(), "handshake");
    }

    #[test]
    fn messages_have_stable_json() {
        let m = ServerMessage::Ack(Ack { seq: 3, version: 7, staleness: 1 });
        assert_eq!(m.to_json(), r#"{"type":"ack","seq":3,"version":7,"staleness":1}"#);
        let c: ClientMessage = serde_json::from_str(r#"{"type":"snapshot_request"}"#).unwrap();
        assert_eq!(c, ClientMessage::SnapshotRequest);
        let d = ServerMessage::Directive(Directive { local_steps: Some(5), ..Default::default() });
        assert_eq!(d.to_json(), r#"{"type":"directive","local_steps":5}"#);
    }
}
