//! HTTP routes (axum) and the WebSocket upgrade (hyper + tokio-tungstenite).
//!
//! axum routes the plain HTTP endpoints; the `/ws` upgrade is done by hand with hyper's upgrade
//! future and `tokio-tungstenite` 0.30, so the project controls the tungstenite version and its
//! size limits (checked on the frame header, before the payload is read).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::Shared;
use super::coordinator::Inbound;
use super::web::json_response;

/// The router for one server.
///
/// With tokens configured, the endpoints that hand out the model, the data or the update
/// record ask for one (`Authorization: Bearer TOKEN` or `?token=TOKEN`); the WebSocket checks
/// its Hello instead. Status, metrics and the pages stay open: they carry no model.
pub fn router(shared: Arc<Shared>) -> Router {
    let protected = Router::new()
        .route("/api/record", get(record))
        .route("/api/model.safetensors", get(model))
        .merge(super::web::protected_routes())
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), require_token));
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .merge(super::web::routes())
        .merge(protected)
        .with_state(shared)
}

/// Refuses a request to a protected endpoint that carries no accepted token (401, naming what
/// to send). The token is never logged.
async fn require_token(
    State(shared): State<Arc<Shared>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    if !shared.auth.enabled() {
        return next.run(req).await;
    }
    let ip = req.extensions().get::<SocketAddr>().map(|a| a.ip());
    if let Some(wait) = ip.and_then(|ip| shared.throttle.blocked(ip)) {
        shared.metrics.refused("auth_throttled");
        let secs = wait.as_secs_f64().ceil() as u64;
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed tokens from this address: retry in {secs} s\n"),
        )
            .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let query = Query::<TokenQuery>::try_from_uri(req.uri()).ok().and_then(|q| q.0.token);
    let ok = match bearer.or(query.as_deref()) {
        Some(t) => shared.auth.check_any(Some(t)),
        None => false,
    };
    // A wrong token counts against the address; no token at all is not a guess.
    if let Some(ip) = ip {
        if ok {
            shared.throttle.succeeded(ip);
        } else if bearer.is_some() || query.is_some() {
            shared.throttle.failed(ip);
        }
    }
    if ok {
        next.run(req).await
    } else {
        let what = if bearer.is_none() && query.is_none() { "missing" } else { "invalid" };
        shared.metrics.refused(if what == "missing" { "http_token_missing" } else { "http_token_invalid" });
        let mut r = (
            StatusCode::UNAUTHORIZED,
            format!("token {what}: send `Authorization: Bearer TOKEN` or `?token=TOKEN`\n"),
        )
            .into_response();
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let s = shared.status.borrow().clone();
    json_response(&*s)
}

#[derive(serde::Deserialize)]
struct Since {
    #[serde(default)]
    since: usize,
    limit: Option<usize>,
}

/// A page of the event record from event number `since` on (`limit` events, default 10,000,
/// at most 100,000): `{"next": N, "end": E, "events": [...]}`; ask again from `next` until it
/// equals `end`. Read from the shared record, never through the coordinator, and serialized
/// off its lock: readers do not slow the server down.
async fn record(State(shared): State<Arc<Shared>>, Query(q): Query<Since>) -> Response {
    use super::record::{DEFAULT_PAGE, MAX_PAGE};
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let record = shared.record.clone();
    let since = q.since;
    match tokio::task::spawn_blocking(move || serde_json::to_vec(&record.page(since, limit))).await {
        Ok(Ok(body)) => {
            let mut r = body.into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "record could not be serialized").into_response(),
    }
}

/// The current model x as a safetensors file (layout order in its metadata).
async fn model(State(shared): State<Arc<Shared>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if shared.tx.send(Inbound::State { reply: tx }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response();
    }
    let state = match rx.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response(),
    };
    match shared.layout.to_safetensors(&state.x) {
        Ok(bytes) => {
            let mut r = bytes.into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            r.headers_mut().insert("x-sparsync-version", HeaderValue::from(state.version));
            r
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut r = shared.metrics.encode().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
}

/// Upgrades `/ws` to a WebSocket session.
async fn ws_upgrade(State(shared): State<Arc<Shared>>, mut req: Request<Body>) -> Response {
    let h = req.headers();
    let key = match h.get(header::SEC_WEBSOCKET_KEY) {
        // A key is 16 random bytes in base64 (RFC 6455 §4.1): 24 characters.
        Some(k)
            if k.len() == 24
                && header_has(h, header::CONNECTION, "upgrade")
                && header_has(h, header::UPGRADE, "websocket") =>
        {
            k.clone()
        }
        _ => return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade request").into_response(),
    };
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return (StatusCode::BAD_REQUEST, "unsupported Sec-WebSocket-Version (need 13)").into_response();
    }
    let peer = req.extensions().get::<SocketAddr>().copied().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let permit = req.extensions().get::<super::listener::ConnPermit>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let accept = derive_accept_key(key.as_bytes());
    let max = shared.cfg.max_frame_bytes;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "upgrade failed");
                return;
            }
        };
        // A 16 KiB read buffer (tungstenite preallocates 128 KiB per connection): it grows for
        // a larger frame, and 1000 idle sessions then cost 16 MB instead of 128 MB.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .accept_unmasked_frames(false);
        let io = super::session::Counted::new(TokioIo::new(upgraded));
        let started = io.message_started();
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        super::session::run(ws, shared, peer, started).await;
        drop(permit);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("static response parts are valid")
}
