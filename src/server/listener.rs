//! The accept loop: connection limits (in all and per address), optional TLS, HTTP/1 with
//! upgrades, header timeouts, graceful stop.
//!
//! A connection over a limit is answered `503 Service Unavailable` with the reason and closed;
//! answering costs a bounded number of small tasks, beyond which refusals are just closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::metrics::Metrics;

/// What the accept loop enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections open at once (HTTP and WebSocket).
    pub max_connections: usize,
    /// Most connections open at once from one IP address (0: no per-address limit).
    pub max_per_ip: usize,
    /// Time to finish the TLS handshake, and then the request headers.
    pub header_timeout: Duration,
}

/// Refusals answered at once; more than this many in flight are closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let admitted = match IpSlot::take(&per_ip, peer.ip(), limits.max_per_ip) {
            None => Err((
                "too_many_from_address",
                format!(
                    "too many connections from {} (max_connections_per_ip {})",
                    peer.ip(),
                    limits.max_per_ip
                ),
            )),
            Some(slot) => match limit.clone().try_acquire_owned() {
                Ok(permit) => Ok(ConnPermit(Arc::new((permit, slot)))),
                Err(_) => Err((
                    "too_many_connections",
                    format!("too many connections (max_clients {})", limits.max_connections),
                )),
            },
        };
        let permit = match admitted {
            Ok(p) => p,
            Err((reason, message)) => {
                metrics.refused(reason);
                tracing::warn!(%peer, "connection refused: {message}");
                if let Ok(r) = refusals.clone().try_acquire_owned() {
                    let tls = tls.clone();
                    let timeout = limits.header_timeout;
                    tokio::spawn(async move {
                        let _r = r;
                        let answer = refuse(tcp, tls, &message);
                        let _ = tokio::time::timeout(timeout, answer).await;
                    });
                }
                continue;
            }
        };
        let router = router.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            match tls {
                None => serve_conn(tcp, peer, permit, router, header_timeout, metrics, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        serve_conn(stream, peer, permit, router, header_timeout, metrics, shutdown).await
                    }
                    Ok(Err(e)) => {
                        metrics.refused("tls");
                        tracing::info!(%peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        metrics.refused("header_timeout");
                        tracing::info!(%peer, "TLS handshake timed out")
                    }
                },
            }
        });
    }
}

/// Answers a refused connection `503` with `message` (over TLS when the server speaks it).
async fn refuse(tcp: tokio::net::TcpStream, tls: Option<TlsAcceptor>, message: &str) {
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    async fn write<S: AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) {
        if s.write_all(bytes).await.is_ok() {
            let _ = s.shutdown().await;
        }
    }
    match tls {
        None => write(tcp, response.as_bytes()).await,
        Some(acceptor) => {
            if let Ok(s) = acceptor.accept(tcp).await {
                write(s, response.as_bytes()).await
            }
        }
    }
}

/// One connection's count against its address's limit; gives it back when dropped.
struct IpSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { map: map.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A connection's place under the connection limits. It travels with the request, so that an
/// upgraded WebSocket session keeps counting after the HTTP connection is done.
#[derive(Clone)]
pub struct ConnPermit(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, IpSlot)>);

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    permit: ConnPermit,
    router: Router,
    header_timeout: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer);
        req.extensions_mut().insert(permit.clone());
        req
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            if e.is_timeout() {
                // hyper closes the connection without an answer: a slow or stalled request.
                metrics.refused("header_timeout");
                tracing::info!(%peer, "request headers timed out");
            } else {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        },
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Resolves when the shutdown flag turns true (without holding the watch's lock).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
