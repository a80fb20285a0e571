//! The admin server's connections: HTTP/1.1 served by hyper directly (not
//! `axum::serve`) so that a client gets `--admin-header-timeout-ms` to send
//! its request headers — a slow client that trickles bytes is cut off —
//! and each request knows its peer's address (failed credentials are
//! counted per address).
//!
//! ```text
//!   listener ──accept──► task per connection: http1 (header timeout)
//!                          └─ request + Remote(addr) ──► router (gate, handlers)
//!   stop ──► every connection finishes its request in flight, then closes
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{router, AdminState};

/// The peer of an admin request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Remote(pub SocketAddr);

/// Serves on `listener` (TCP, or TLS connections) until `stop`.
pub async fn serve<L>(mut listener: L, state: Arc<AdminState>, stop: CancellationToken)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let header_timeout = state.cfg.header_timeout;
    let app = router(state);
    let conns = TaskTracker::new();
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Remote(remote));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
        let stop = stop.clone();
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
}
