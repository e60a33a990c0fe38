//! The pages the server serves: the dashboard at `/`, the browser client at `/join`, their
//! assets under `/assets/`, the live status stream, and the data shards browsers train on.
//!
//! The pages are `clients/browser/dist/` (built by `npm run build` there), embedded in the
//! binary at compile time; `--web-dir` serves a directory instead (for front-end work).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::oneshot;

use super::Shared;
use super::coordinator::Inbound;

#[derive(rust_embed::RustEmbed)]
#[folder = "clients/browser/dist/"]
struct Dist;

/// The routes of this module.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(|s: State<Arc<Shared>>| async move { file(&s, "index.html") }))
        .route("/join", get(|s: State<Arc<Shared>>| async move { file(&s, "join.html") }))
        .route(
            "/assets/{*path}",
            get(|s: State<Arc<Shared>>, Path(p): Path<String>| async move { file(&s, &p) }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/events", get(events))
}

/// The routes that hand out the model or the data: behind the join token when auth is on.
pub fn protected_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/replica", get(replica))
        .route("/api/data/shard", get(shard))
        .route("/api/data/test", get(test_set))
}

fn file(shared: &Shared, path: &str) -> Response {
    if path.split('/').any(|part| part == ".." || part.is_empty()) {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let body: Option<Vec<u8>> = match &shared.cfg.web_dir {
        Some(dir) => std::fs::read(dir.join(path)).ok(),
        None => Dist::get(path).map(|f| f.data.into_owned()),
    };
    match body {
        Some(bytes) => {
            let mut r = bytes.into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
            r
        }
        None => (StatusCode::NOT_FOUND, format!("{path}: not found")).into_response(),
    }
}

/// The content type of the files `dist/` holds.
fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Server-sent events: the status JSON each time the coordinator publishes it.
async fn events(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = shared.status.clone();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let s = rx.borrow_and_update().clone();
        let data = serde_json::to_string(&*s).unwrap_or_default();
        Some((Ok(Event::default().data(data)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `{"version": v, "checksum": "…", "params": n}` of the public replica x̂.
async fn replica(State(shared): State<Arc<Shared>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if shared.tx.send(Inbound::Replica { reply: tx }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response();
    }
    match rx.await {
        Ok(Ok((version, values))) => json_response(&serde_json::json!({
            "version": version,
            "params": values.len(),
            "checksum": format!("{:016x}", crate::protocol::replica::checksum(&values)),
        })),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "server is shutting down").into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ShardQuery {
    shard: Option<u16>,
    samples: Option<u32>,
}

/// The dataset, loaded on first use.
async fn dataset(shared: &Shared) -> Result<Arc<crate::data::FashionMnist>, Response> {
    let dir = shared.cfg.data_dir.clone();
    shared
        .data
        .get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || crate::data::load(dir.as_deref()).map(Arc::new))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
        .await
        .cloned()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("dataset: {e}")).into_response())
}

/// Binary data shard: "SPDS", count u32, rows u8, cols u8, shard u16, shards u16, 2 bytes 0,
/// then `count` labels, then `count` images of rows×cols bytes.
fn encode_shard(d: &crate::data::Dataset, idx: &[usize], shard: u16, shards: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + idx.len() * (1 + d.pixels()));
    out.extend_from_slice(b"SPDS");
    out.extend_from_slice(&(idx.len() as u32).to_le_bytes());
    out.push(d.rows as u8);
    out.push(d.cols as u8);
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&shards.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend(idx.iter().map(|&i| d.labels[i]));
    for &i in idx {
        out.extend_from_slice(d.image(i));
    }
    out
}

fn binary(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

/// The next browser's share of the training set (IID shards, handed out in turn).
async fn shard(State(shared): State<Arc<Shared>>, Query(q): Query<ShardQuery>) -> Response {
    let data = match dataset(&shared).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let shards = shared.cfg.browser_shards.max(1);
    let shard = q
        .shard
        .unwrap_or_else(|| (shared.next_shard.fetch_add(1, Ordering::Relaxed) % shards as usize) as u16)
        % shards;
    let parts = crate::data::partition(
        &data.train.labels,
        shards as usize,
        crate::data::Partition::Iid,
        shared.cfg.seed,
    );
    let cap = q.samples.unwrap_or(shared.cfg.browser_samples).min(shared.cfg.browser_samples) as usize;
    let idx: Vec<usize> = parts[shard as usize].iter().copied().take(cap).collect();
    binary(encode_shard(&data.train, &idx, shard, shards))
}

/// The first `samples` test images, in the same format.
async fn test_set(State(shared): State<Arc<Shared>>, Query(q): Query<ShardQuery>) -> Response {
    let data = match dataset(&shared).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let n = (q.samples.unwrap_or(1000) as usize).min(data.test.len());
    let idx: Vec<usize> = (0..n).collect();
    binary(encode_shard(&data.test, &idx, 0, 1))
}

/// A JSON body with its content type.
pub fn json_response<T: serde::Serialize + ?Sized>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
