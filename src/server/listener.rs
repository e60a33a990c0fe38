//! The accept loop: a connection limit, optional TLS, HTTP/1 with upgrades, graceful stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "connection refused: too many connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        // The permit travels with the request, so that an upgraded WebSocket session keeps
        // counting against the limit after the HTTP connection is done.
        let permit = ConnPermit(Arc::new(permit));
        tokio::spawn(async move {
            match tls {
                None => serve_conn(tcp, peer, permit, router, header_timeout, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        serve_conn(stream, peer, permit, router, header_timeout, shutdown).await
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// A connection's place under the connection limit.
#[derive(Clone)]
pub struct ConnPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

async fn serve_conn<IO>(
    io: IO,
    peer: SocketAddr,
    permit: ConnPermit,
    router: Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
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
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended") },
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
