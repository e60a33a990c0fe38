//! `sparsync._native`: the Python client's core, from the same Rust code as the server.
//!
//! The wire format, the replica (Deltas and Snapshots applied bit for bit as the server
//! computes x̂) and Top-k with error feedback are `sparsync::protocol` and `sparsync::client`:
//! there is one definition of the protocol. Every network wait releases the GIL
//! (`Python::detach`), so other Python threads (a data loader, a second client) run meanwhile.
//! One client is used by one thread at a time: a call that waits (`wait_ack`, `next_event`,
//! `sync`) holds the client for its wait, and another thread's call on the same client waits
//! for it.
//! Arrays cross the boundary as bytes and are viewed with numpy on the Python side of the call.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use half::f16;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use sparsync::client::{ClientError, ClientOptions, Connection, Event};
use sparsync::protocol::frame::PushHeader;
use sparsync::protocol::message::{ClientKind, ClientMessage, EvalReport, Reject, Role};
use sparsync::protocol::replica::checksum;
use sparsync::protocol::select::k_for_density;
use sparsync::protocol::sparsify::{Sparse, Sparsifier};

pyo3::create_exception!(
    _native,
    SparsyncError,
    PyException,
    "A refusal or failure; `field` names what was wrong (a Hello or Push field, \"connection\", \"timeout\", …) and `reason` says why."
);
pyo3::create_exception!(
    _native,
    RejectedError,
    SparsyncError,
    "The server rejected a Push: `seq` names it, `field` and `reason` say why. Its entries went back into the residual. With field \"busy\" (the server cannot make pushes durable now), `retry_after_s` says how long to wait before pushing again (None otherwise)."
);

fn error(py: Python<'_>, field: &str, reason: impl Into<String>) -> PyErr {
    let reason = reason.into();
    let e = SparsyncError::new_err(format!("{field}: {reason}"));
    let v = e.value(py);
    let _ = v.setattr("field", field);
    let _ = v.setattr("reason", reason);
    e
}

fn rejected(py: Python<'_>, r: &Reject) -> PyErr {
    let e = RejectedError::new_err(format!("push {} rejected ({}): {}", r.seq, r.field, r.reason));
    let v = e.value(py);
    let _ = v.setattr("field", &r.field);
    let _ = v.setattr("reason", &r.reason);
    let _ = v.setattr("seq", r.seq);
    let _ = v.setattr("retry_after_s", r.retry_after_ms.map(|ms| ms as f64 / 1000.0));
    e
}

fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    match e {
        ClientError::Refused { field, message } => error(py, &field, message),
        ClientError::Timeout(what) => error(py, "timeout", format!("timed out waiting for {what}")),
        ClientError::Closed => error(py, "connection", "the server closed the connection"),
        ClientError::Connect { .. } | ClientError::Ws(_) => error(py, "connection", e.to_string()),
        ClientError::Certificate { .. } | ClientError::Tls(_) => error(py, "certificate", e.to_string()),
        other => error(py, "protocol", other.to_string()),
    }
}

/// Seconds from Python as a wait: negative is 0, infinite (or beyond a day) is a day.
fn seconds(py: Python<'_>, field: &str, s: f64) -> PyResult<Duration> {
    if s.is_nan() {
        return Err(error(py, field, "is not a number"));
    }
    Ok(Duration::try_from_secs_f64(s.clamp(0.0, 86_400.0)).unwrap_or(Duration::from_secs(86_400)))
}

/// Answers (Acks and Rejects) kept for a later `wait_ack` after another call consumed them.
const ANSWERS_KEPT: usize = 4096;

/// A Python value from JSON (made with the `json` module).
fn json<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// `x` as a contiguous little-endian array of `dtype`, as bytes (numpy converts).
fn array_bytes(py: Python<'_>, x: &Bound<'_, PyAny>, dtype: &str) -> PyResult<Vec<u8>> {
    let np = py.import("numpy")?;
    let a = np.call_method1("ascontiguousarray", (x, np.getattr(dtype)?))?;
    let a = a.call_method0("ravel")?;
    let bytes = a.call_method1("astype", (np.getattr("dtype")?.call1((format!("<{}", code(dtype)),))?,))?;
    bytes.call_method0("tobytes")?.extract::<Vec<u8>>()
}

fn code(dtype: &str) -> &'static str {
    match dtype {
        "float32" => "f4",
        "float64" => "f8",
        "uint32" => "u4",
        _ => "f4",
    }
}

/// A numpy array (a copy) of little-endian `bytes` as `dtype`.
fn to_array<'py>(py: Python<'py>, bytes: &[u8], dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let a = np.call_method1("frombuffer", (PyBytes::new(py, bytes), format!("<{}", code(dtype))))?;
    a.call_method1("astype", (np.getattr(dtype)?,))
}

struct Inner {
    conn: Option<Connection>,
    /// The session number and resume secret of the current (or last) connection.
    session: u64,
    resume_secret: String,
    /// Every address given, and the one of the current connection.
    urls: Vec<String>,
    at: usize,
    /// How to connect again (the served model, the token, role, …).
    opts: ClientOptions,
    sparsifier: Sparsifier,
    next_seq: u64,
    /// Pushes not yet answered (their header, for a resend after a reconnect), to restore
    /// into the residual if they are rejected.
    inflight: HashMap<u64, (PushHeader, Sparse)>,
    /// Pushes sent again after a reconnect and not answered yet: a `reject` with field `seq`
    /// says the server had accepted it before (it is held, not refused).
    resent: HashSet<u64>,
    /// Resent pushes the server said it held (at most [`ANSWERS_KEPT`]).
    held: std::collections::VecDeque<u64>,
    /// The latest answers by seq (at most [`ANSWERS_KEPT`]): `wait_ack` finds an Ack that
    /// `sync` or `next_event` already handled.
    answers: std::collections::VecDeque<(u64, Event)>,
    timeout: Duration,
}

/// One session with a sparsync server (see the package docs).
#[pyclass(module = "sparsync._native")]
struct Client {
    inner: Mutex<Inner>,
    rt: tokio::runtime::Runtime,
    model: String,
    num_params: usize,
    layout: Vec<(String, Vec<usize>)>,
    settings: serde_json::Value,
}

impl Client {
    /// Runs `f` on the client's state with the GIL released: the lock is only ever taken
    /// without the GIL, so a thread waiting for it never blocks one that needs the GIL back.
    fn with_inner<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner, &tokio::runtime::Runtime) -> T + Send,
    ) -> T {
        py.detach(|| {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut g, &self.rt)
        })
    }
}

/// An event as a dict for Python (what `Client.next_event` returns).
fn event_json(e: &Event) -> serde_json::Value {
    use serde_json::json;
    match e {
        Event::Ack(a) => json!({"type": "ack", "seq": a.seq, "version": a.version, "staleness": a.staleness}),
        Event::Reject(r) => {
            json!({"type": "reject", "seq": r.seq, "field": r.field, "reason": r.reason, "retry_after_ms": r.retry_after_ms})
        }
        Event::Delta { version, nnz, bytes } => {
            json!({"type": "delta", "version": version, "nnz": nnz, "bytes": bytes})
        }
        Event::Snapshot { version, bytes } => json!({"type": "snapshot", "version": version, "bytes": bytes}),
        Event::Resyncing { have } => json!({"type": "resyncing", "have": have}),
        Event::Directive(d) => {
            let mut v = serde_json::to_value(d).unwrap_or_else(|_| json!({}));
            if let Some(m) = v.as_object_mut() {
                m.retain(|_, x| !x.is_null());
                m.insert("type".into(), json!("directive"));
            }
            v
        }
        Event::Error(e) => json!({"type": "error", "field": e.field, "message": e.message, "fatal": e.fatal}),
        Event::RoundDropped { round, reason } => {
            json!({"type": "round_dropped", "round": round, "reason": reason})
        }
        Event::Bye { reason } => json!({"type": "bye", "reason": reason}),
    }
}

/// What waiting for an Ack ended with.
enum AckWait {
    Acked(Event),
    /// A push resent after a reconnect that the server had accepted before.
    Held(u64),
    Rejected(Reject),
    Failed(&'static str, String),
}

impl Inner {
    fn conn(&mut self) -> Result<&mut Connection, (&'static str, String)> {
        self.conn.as_mut().ok_or(("connection", "the client is closed".to_string()))
    }

    /// Keeps the residual whole: a rejected push's entries go back into it (not those of a
    /// resent push the server held already).
    fn settle(&mut self, e: &Event) {
        let seq = match e {
            Event::Ack(a) => {
                self.inflight.remove(&a.seq);
                self.resent.remove(&a.seq);
                a.seq
            }
            Event::Reject(r) => {
                let held = self.resent.remove(&r.seq) && r.field == "seq";
                if let Some((_, sent)) = self.inflight.remove(&r.seq) {
                    if held {
                        if self.held.len() == ANSWERS_KEPT {
                            self.held.pop_front();
                        }
                        self.held.push_back(r.seq);
                    } else {
                        self.sparsifier.restore(&sent);
                    }
                }
                r.seq
            }
            _ => return,
        };
        if self.answers.len() == ANSWERS_KEPT {
            self.answers.pop_front();
        }
        self.answers.push_back((seq, e.clone()));
    }

    /// What an answer to `seq` means for `wait_ack`.
    fn outcome(&self, seq: u64, e: &Event) -> AckWait {
        match e {
            Event::Reject(r) if r.field == "seq" && self.held.contains(&seq) => AckWait::Held(seq),
            Event::Reject(r) => AckWait::Rejected(r.clone()),
            e => AckWait::Acked(e.clone()),
        }
    }

    /// Connects to the addresses in turn (the next one first) with this client's resume
    /// secret until one serves or `deadline` passes, then sends every unanswered push again
    /// with its seq. Returns the new session.
    async fn reconnect(&mut self, deadline: Instant) -> Result<u64, (String, String)> {
        self.conn = None;
        let mut wait = Duration::from_millis(200);
        let mut tried = 0usize;
        let conn = loop {
            self.at = (self.at + 1) % self.urls.len();
            let mut o = self.opts.clone();
            o.url = self.urls[self.at].clone();
            o.resume_secret = Some(self.resume_secret.clone());
            let left = deadline.saturating_duration_since(Instant::now());
            o.timeout = o.timeout.min(left.max(Duration::from_millis(100)));
            let e = match Connection::connect(&o).await {
                Ok(c) => break c,
                Err(e) => e,
            };
            // A refusal is final, except one that passes: a server still holding this client
            // id's old session, or one that cannot make pushes durable just now.
            if let ClientError::Refused { field, message } = &e
                && field != "client_id"
                && field != "busy"
            {
                return Err((field.clone(), format!("{}: {message}", o.url)));
            }
            tried += 1;
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    "connection".into(),
                    format!("no server of {} took the client again: {}: {e}", self.urls.join(","), o.url),
                ));
            }
            if tried.is_multiple_of(self.urls.len()) {
                tokio::time::sleep(wait.min(deadline - now)).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        };
        self.session = conn.welcome.session;
        self.resume_secret = conn.welcome.resume_secret.clone();
        let conn = self.conn.insert(conn);
        let mut seqs: Vec<u64> = self.inflight.keys().copied().collect();
        seqs.sort_unstable();
        for seq in seqs {
            let (header, sparse) = &self.inflight[&seq];
            if let Err(e) = conn.push(header, &sparse.indices, &sparse.values).await {
                // Lost again: closed, so the next call says so (a later reconnect resends
                // every unanswered push).
                self.conn = None;
                return Err(("connection".to_string(), e.to_string()));
            }
            self.resent.insert(seq);
            self.answers.retain(|(s, _)| *s != seq);
        }
        Ok(self.session)
    }

    /// The answer to `seq` if one arrived already.
    fn answered(&self, seq: u64) -> Option<&Event> {
        self.answers.iter().rev().find(|(s, _)| *s == seq).map(|(_, e)| e)
    }

    async fn next(&mut self, wait: Duration) -> Result<Option<Event>, ClientError> {
        let Some(conn) = self.conn.as_mut() else { return Err(ClientError::Closed) };
        // The connection's own timeout (for a single wait) is not an error here: the caller's
        // deadline decides.
        let e = match conn.next_event_within(wait).await {
            Err(ClientError::Timeout(_)) => None,
            r => r?,
        };
        if let Some(e) = &e {
            self.settle(e);
        }
        Ok(e)
    }
}

impl Client {
    /// One address: the served model (when not given), then the connection. The error says
    /// whether another address is worth trying (not after the server refused the Hello: every
    /// server of a log would).
    #[allow(clippy::type_complexity)]
    fn connect_one(
        py: Python<'_>,
        rt: &tokio::runtime::Runtime,
        url: &str,
        client_id: &str,
        model: Option<String>,
        (token, role, device, ca, resume_secret): (
            Option<String>,
            Role,
            Option<String>,
            Option<String>,
            Option<String>,
        ),
        timeout: f64,
    ) -> Result<(Connection, ClientOptions), (PyErr, bool)> {
        let retry = |e: PyErr| (e, true);
        let model = match model {
            Some(m) => m,
            None => py
                .import("sparsync._served")
                .and_then(|m| m.call_method1("served_model", (url, ca.as_deref(), timeout)))
                .and_then(|v| v.extract::<String>())
                .map_err(retry)?,
        };
        let mut opts = ClientOptions::new(url, client_id, model);
        opts.token = token;
        opts.kind = ClientKind::Synthetic;
        opts.role = role;
        opts.device = device.or_else(|| Some("python".into()));
        opts.ca = ca.map(Into::into);
        opts.resume_secret = resume_secret;
        opts.timeout = seconds(py, "timeout", timeout).map_err(|e| (e, false))?;
        let conn = py.detach(|| rt.block_on(Connection::connect(&opts))).map_err(|e| {
            let refused = matches!(e, ClientError::Refused { .. });
            (client_error(py, e), !refused)
        })?;
        Ok((conn, opts))
    }

    fn from_connection(
        conn: Connection,
        opts: ClientOptions,
        (urls, at): (Vec<String>, usize),
        first_seq: u64,
        rt: tokio::runtime::Runtime,
    ) -> Self {
        let w = &conn.welcome;
        let num_params = conn.num_params();
        Client {
            model: w.model.clone(),
            num_params,
            layout: w.layout.iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
            settings: serde_json::to_value(&w.settings).unwrap_or_default(),
            inner: Mutex::new(Inner {
                session: w.session,
                resume_secret: w.resume_secret.clone(),
                conn: Some(conn),
                urls,
                at,
                timeout: opts.timeout,
                opts,
                sparsifier: Sparsifier::new(num_params),
                next_seq: first_seq,
                inflight: HashMap::new(),
                resent: HashSet::new(),
                held: std::collections::VecDeque::new(),
                answers: std::collections::VecDeque::new(),
            }),
            rt,
        }
    }
}

#[pymethods]
impl Client {
    /// Connects, says Hello and waits for the Welcome and the first Snapshot. With `model`
    /// None the client asks the server's `/api/status` which model it serves (one HTTP
    /// request, in `sparsync._served`); a given `model` is an assertion: the server refuses
    /// the Hello (field `model`) when it serves another. `url` may name several servers,
    /// comma-separated (a leader and its standby, `serve --standby`): each is tried in turn
    /// until one serves; the error of the last is raised when none does.
    #[new]
    #[pyo3(signature = (url, client_id, model = None, token = None, role = "trainer", device = None, ca = None, resume_secret = None, timeout = 30.0, first_seq = 1))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: &str,
        client_id: &str,
        model: Option<String>,
        token: Option<String>,
        role: &str,
        device: Option<String>,
        ca: Option<String>,
        resume_secret: Option<String>,
        timeout: f64,
        first_seq: u64,
    ) -> PyResult<Self> {
        let role = match role {
            "trainer" => Role::Trainer,
            "evaluator" => Role::Evaluator,
            other => return Err(error(py, "role", format!("{other:?} is not \"trainer\" or \"evaluator\""))),
        };
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(error(py, "timeout", "must be a positive number of seconds"));
        }
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(error(py, "url", "no server address given"));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| error(py, "runtime", e.to_string()))?;
        let mut last = None;
        for (i, url) in urls.iter().enumerate() {
            let attempt = Self::connect_one(
                py,
                &rt,
                url,
                client_id,
                model.clone(),
                (token.clone(), role, device.clone(), ca.clone(), resume_secret.clone()),
                timeout,
            );
            match attempt {
                Ok((conn, mut opts)) => {
                    opts.model = conn.welcome.model.clone();
                    let urls = urls.iter().map(|u| u.to_string()).collect();
                    return Ok(Self::from_connection(conn, opts, (urls, i), first_seq, rt));
                }
                Err((e, true)) if i + 1 < urls.len() => last = Some(e),
                Err((e, _)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| error(py, "url", "no server address given")))
    }

    /// The session number the server gave this connection.
    #[getter]
    fn session(&self, py: Python<'_>) -> u64 {
        self.with_inner(py, |g, _| g.session)
    }

    /// The secret that lets a reconnect with the same client id replace this session.
    #[getter]
    fn resume_secret(&self, py: Python<'_>) -> String {
        self.with_inner(py, |g, _| g.resume_secret.clone())
    }

    /// The server addresses this client was given, in the order tried.
    #[getter]
    fn servers(&self, py: Python<'_>) -> Vec<String> {
        self.with_inner(py, |g, _| g.urls.clone())
    }

    /// The address of the current (or last) connection.
    #[getter]
    fn server(&self, py: Python<'_>) -> String {
        self.with_inner(py, |g, _| g.urls[g.at].clone())
    }

    /// Connects again after the connection was lost (or to move on): tries each address in
    /// turn, the next one first, with this client's resume secret, until one serves or
    /// `timeout` seconds pass (a growing wait after each round of them). Then sends every
    /// push not yet answered again, with its seq: a push the server had accepted before is
    /// answered as held (`wait_ack` returns `{"type": "ack", "seq": s, "held": True}`) and
    /// is not applied twice; one it never got is answered as usual. Returns the new session
    /// number. Raises `SparsyncError` (field `connection`) when none served, or with the
    /// refused Hello field when a server refused.
    #[pyo3(signature = (timeout = 120.0))]
    fn reconnect(&self, py: Python<'_>, timeout: f64) -> PyResult<u64> {
        let deadline = Instant::now() + seconds(py, "timeout", timeout)?;
        let r = self.with_inner(py, |g, rt| rt.block_on(g.reconnect(deadline)));
        r.map_err(|(f, w)| error(py, &f, w))
    }

    #[getter]
    fn model(&self) -> &str {
        &self.model
    }

    #[getter]
    fn num_params(&self) -> usize {
        self.num_params
    }

    /// (name, shape) of each tensor, in the order of the flat parameter vector.
    #[getter]
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyTuple>)>> {
        self.layout.iter().map(|(name, shape)| Ok((name.clone(), PyTuple::new(py, shape)?))).collect()
    }

    /// The session settings of the Welcome (policy, rho_up, rho_down, max_nnz, …).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json(py, &self.settings)
    }

    /// The replica version held: the base version of the next push.
    #[getter]
    fn version(&self, py: Python<'_>) -> u64 {
        self.with_inner(py, |g, _| g.conn.as_ref().map_or(0, |c| c.version()))
    }

    /// The server's directive so far (fields it set), merged.
    #[getter]
    fn directive<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.with_inner(py, |g, _| {
            g.conn.as_ref().map(|c| event_json(&Event::Directive(c.directive.clone())))
        });
        let mut v = v.unwrap_or_else(|| serde_json::json!({}));
        if let Some(m) = v.as_object_mut() {
            m.remove("type");
        }
        json(py, &v)
    }

    /// A copy of the replica x̂ (float32, flat, layout order).
    fn replica<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let bytes = self.with_inner(py, |g, _| {
            g.conn
                .as_ref()
                .map(|c| c.replica.values().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
        });
        let Some(bytes) = bytes else { return Err(error(py, "connection", "the client is closed")) };
        to_array(py, &bytes, "float32")
    }

    /// FNV-1a 64 of the replica's f32 bytes, as `/api/replica` reports it.
    fn checksum(&self, py: Python<'_>) -> PyResult<String> {
        let sum = self.with_inner(py, |g, _| g.conn.as_ref().map(|c| checksum(c.replica.values())));
        let Some(sum) = sum else { return Err(error(py, "connection", "the client is closed")) };
        Ok(format!("{sum:016x}"))
    }

    /// The error-feedback memory: what was not sent yet (float64).
    fn residual<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let bytes: Vec<u8> = self
            .with_inner(py, |g, _| g.sparsifier.residual().iter().flat_map(|v| v.to_le_bytes()).collect());
        to_array(py, &bytes, "float64")
    }

    /// Pushes `delta` (the model change, float32, flat) with Top-k and error feedback; returns
    /// its seq. k = ⌈rho · n⌉ (rho defaults to the session's rho_up), at most max_nnz.
    #[pyo3(signature = (delta, samples, loss, local_steps = 1, rho = None))]
    fn push(
        &self,
        py: Python<'_>,
        delta: &Bound<'_, PyAny>,
        samples: i64,
        loss: f64,
        local_steps: i64,
        rho: Option<f64>,
    ) -> PyResult<u64> {
        let bytes = array_bytes(py, delta, "float32")?;
        let delta: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if delta.len() != self.num_params {
            return Err(error(
                py,
                "delta",
                format!(
                    "has {} values; the model {} has {} parameters",
                    delta.len(),
                    self.model,
                    self.num_params
                ),
            ));
        }
        if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
            return Err(error(py, "delta", format!("value {i} is not finite ({})", delta[i])));
        }
        let (samples, loss, local_steps) = check_counts(py, samples, loss, local_steps)?;
        let rho = rho.unwrap_or_else(|| self.settings["rho_up"].as_f64().unwrap_or(0.01));
        if !(rho > 0.0 && rho <= 1.0) {
            return Err(error(py, "rho", format!("{rho} is not in (0, 1]")));
        }
        let max_nnz = self.settings["max_nnz"].as_u64().unwrap_or(self.num_params as u64) as usize;
        let k = k_for_density(rho, self.num_params).min(max_nnz);
        let r = self.with_inner(py, |g, rt| {
            let sparse = g.sparsifier.sparsify(&delta, k);
            let seq = g.next_seq;
            let sent = match g.conn.as_mut() {
                None => Err(("connection", "the client is closed".to_string())),
                Some(conn) => {
                    let header = PushHeader {
                        base_version: conn.version(),
                        seq,
                        samples,
                        local_steps,
                        loss,
                        nnz: sparse.indices.len() as u32,
                    };
                    rt.block_on(conn.push(&header, &sparse.indices, &sparse.values))
                        .map(|()| header)
                        .map_err(|e| ("connection", e.to_string()))
                }
            };
            match sent {
                Ok(header) => {
                    g.next_seq += 1;
                    g.inflight.insert(seq, (header, sparse));
                    Ok(seq)
                }
                Err(e) => {
                    // Not sent: nothing of it is lost.
                    g.sparsifier.restore(&sparse);
                    Err(e)
                }
            }
        });
        r.map_err(|(f, w)| error(py, f, w))
    }

    /// Pushes given entries as they are (no error feedback): indices (uint32, ascending) and
    /// values (rounded to f16). For tests and custom sparsifiers; returns the seq used.
    #[pyo3(signature = (indices, values, samples, loss, local_steps = 1, base_version = None, seq = None))]
    #[allow(clippy::too_many_arguments)]
    fn push_raw(
        &self,
        py: Python<'_>,
        indices: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        samples: i64,
        loss: f64,
        local_steps: i64,
        base_version: Option<u64>,
        seq: Option<u64>,
    ) -> PyResult<u64> {
        let ib = array_bytes(py, indices, "uint32")?;
        let vb = array_bytes(py, values, "float32")?;
        let indices: Vec<u32> =
            ib.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let values: Vec<f16> =
            vb.chunks_exact(4).map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
        if indices.len() != values.len() {
            return Err(error(
                py,
                "values",
                format!("{} values for {} indices", values.len(), indices.len()),
            ));
        }
        // Samples and loss go out as given (a test may send what the server must refuse), but
        // they must fit the header's types.
        let samples = u32::try_from(samples).map_err(|_| error(py, "samples", "must fit in 32 bits"))?;
        let local_steps =
            u32::try_from(local_steps).map_err(|_| error(py, "local_steps", "must fit in 32 bits"))?;
        let r = self.with_inner(py, |g, rt| {
            let seq = seq.unwrap_or(g.next_seq);
            let conn = g.conn()?;
            let header = PushHeader {
                base_version: base_version.unwrap_or_else(|| conn.version()),
                seq,
                samples,
                local_steps,
                loss: loss as f32,
                nnz: indices.len() as u32,
            };
            rt.block_on(conn.push(&header, &indices, &values)).map_err(|e| ("connection", e.to_string()))?;
            // A seq sent again (a test of duplicates) waits for its new answer.
            g.answers.retain(|(s, _)| *s != seq);
            g.next_seq = g.next_seq.max(seq.saturating_add(1));
            Ok(seq)
        });
        r.map_err(|(f, w)| error(py, f, w))
    }

    /// The next event from the server (a dict), after applying it; None when nothing arrived
    /// within `timeout` seconds (default: the client's timeout).
    #[pyo3(signature = (timeout = None))]
    fn next_event<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let wait = timeout.map(|t| seconds(py, "timeout", t)).transpose()?;
        let e = self
            .with_inner(py, |g, rt| {
                let wait = wait.unwrap_or(g.timeout);
                rt.block_on(g.next(wait))
            })
            .map_err(|e| client_error(py, e))?;
        e.map(|e| json(py, &event_json(&e))).transpose()
    }

    /// Handles events (applying Deltas) until the Ack of `seq`, and returns it.
    #[pyo3(signature = (seq, timeout = 30.0))]
    fn wait_ack<'py>(&self, py: Python<'py>, seq: u64, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let deadline = Instant::now() + seconds(py, "timeout", timeout)?;
        let outcome = self.with_inner(py, |g, rt| {
            match g.answered(seq) {
                Some(e) => return g.outcome(seq, e),
                None if seq >= g.next_seq => {
                    return AckWait::Failed("seq", format!("no push with seq {seq} was sent"));
                }
                None => {}
            }
            rt.block_on(async {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return AckWait::Failed(
                            "timeout",
                            format!("no answer to push {seq} within {timeout} s"),
                        );
                    }
                    match g.next(left).await {
                        Err(e) => return AckWait::Failed("connection", e.to_string()),
                        Ok(None) => {}
                        Ok(Some(e)) => match &e {
                            Event::Ack(a) if a.seq == seq => return AckWait::Acked(e),
                            Event::Reject(r) if r.seq == seq => return g.outcome(seq, &e),
                            Event::Error(err) if err.fatal => {
                                return AckWait::Failed(
                                    "connection",
                                    format!("{}: {}", err.field, err.message),
                                );
                            }
                            Event::Bye { reason } => {
                                return AckWait::Failed("connection", format!("bye: {reason}"));
                            }
                            _ => {}
                        },
                    }
                }
            })
        });
        match outcome {
            AckWait::Acked(e) => json(py, &event_json(&e)),
            AckWait::Held(seq) => json(py, &serde_json::json!({"type": "ack", "seq": seq, "held": true})),
            AckWait::Rejected(r) => Err(rejected(py, &r)),
            AckWait::Failed(field, why) => Err(error(py, field, why)),
        }
    }

    /// Handles events until none arrives within `timeout` seconds; returns the replica version.
    #[pyo3(signature = (timeout = 0.05))]
    fn sync(&self, py: Python<'_>, timeout: f64) -> PyResult<u64> {
        let wait = seconds(py, "timeout", timeout)?;
        let r = self.with_inner(py, |g, rt| {
            rt.block_on(async {
                while g.next(wait).await?.is_some() {}
                Ok::<_, ClientError>(g.conn.as_ref().map_or(0, |c| c.version()))
            })
        });
        r.map_err(|e| client_error(py, e))
    }

    /// Asks for a Snapshot of x̂ (`snapshot_request`); it arrives as an event.
    fn request_snapshot(&self, py: Python<'_>) -> PyResult<()> {
        self.send_message(py, &ClientMessage::SnapshotRequest)
    }

    /// Reports an evaluation of the replica at `version` (evaluator role).
    fn report_eval(
        &self,
        py: Python<'_>,
        version: u64,
        accuracy: f64,
        loss: f64,
        samples: u64,
    ) -> PyResult<()> {
        self.send_message(py, &ClientMessage::Eval(EvalReport { version, accuracy, loss, samples }))
    }

    /// Sends a raw control message (text frame).
    fn send_text(&self, py: Python<'_>, text: String) -> PyResult<()> {
        let r = self.with_inner(py, |g, rt| {
            let conn = g.conn()?;
            rt.block_on(conn.send_text(text)).map_err(|e| ("connection", e.to_string()))
        });
        r.map_err(|(f, w)| error(py, f, w))
    }

    /// Says Bye and closes; later calls raise.
    #[pyo3(signature = (reason = "done"))]
    fn close(&self, py: Python<'_>, reason: &str) {
        self.with_inner(py, |g, rt| {
            if let Some(conn) = g.conn.take() {
                rt.block_on(conn.close(reason));
            }
        });
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Client(session={}, model={:?}, params={}, version={})",
            self.session(py),
            self.model,
            self.num_params,
            self.version(py)
        )
    }
}

impl Client {
    fn send_message(&self, py: Python<'_>, msg: &ClientMessage) -> PyResult<()> {
        let r = self.with_inner(py, |g, rt| {
            let conn = g.conn()?;
            rt.block_on(conn.send(msg)).map_err(|e| ("connection", e.to_string()))
        });
        r.map_err(|(f, w)| error(py, f, w))
    }
}

/// Samples ≥ 1, a finite loss ≥ 0, local steps that fit the header.
fn check_counts(py: Python<'_>, samples: i64, loss: f64, local_steps: i64) -> PyResult<(u32, f32, u32)> {
    let samples = u32::try_from(samples)
        .ok()
        .filter(|&s| s >= 1)
        .ok_or_else(|| error(py, "samples", format!("{samples} is not a sample count in [1, 2^32)")))?;
    // Checked as the f32 the header carries (1e39 is finite in f64, infinite in f32).
    if !((loss as f32).is_finite() && loss >= 0.0) {
        return Err(error(py, "loss", format!("{loss} is not a finite 32-bit number ≥ 0")));
    }
    let local_steps = u32::try_from(local_steps)
        .map_err(|_| error(py, "local_steps", format!("{local_steps} is not in [0, 2^32)")))?;
    Ok((samples, loss as f32, local_steps))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add("SparsyncError", m.py().get_type::<SparsyncError>())?;
    m.add("RejectedError", m.py().get_type::<RejectedError>())?;
    Ok(())
}
