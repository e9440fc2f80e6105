//! What the server knows of a client's connection beyond its request: whether the client is still
//! there, and a deadline for its request body.
//!
//! actix-web does not drop a handler when its client disconnects (actix/actix-web#3462), so a
//! request waiting for a worker, or running on one, would go on for nobody. Each connection's
//! socket is recorded when it is accepted ([`on_connect`]); handlers of expensive requests watch
//! it ([`client_gone`]) and give up their queue place or cancel their work when the peer closes.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Extensions, Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, HttpRequest};
use futures_util::Stream;

/// How often a waiting or running request checks that its client is still connected.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The raw socket of a client connection (Unix file descriptor). Only read while a handler of
/// that connection runs: the connection, and so the descriptor, lives at least as long.
#[derive(Debug, Clone, Copy)]
pub struct PeerSocket(#[cfg(unix)] std::os::fd::RawFd);

/// `HttpServer::on_connect` hook: remember the socket of each accepted TCP connection.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    #[cfg(unix)]
    if let Some(s) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsRawFd;
        ext.insert(PeerSocket(s.as_raw_fd()));
    }
    #[cfg(not(unix))]
    let _ = (conn, ext);
}

impl PeerSocket {
    /// Whether the peer has closed or reset the connection. Linux reports a peer's close as
    /// POLLRDHUP even while unread request bytes are buffered; elsewhere only hang-ups and errors
    /// are seen.
    pub fn gone(&self) -> bool {
        #[cfg(unix)]
        {
            #[cfg(target_os = "linux")]
            let events = libc::POLLRDHUP;
            #[cfg(not(target_os = "linux"))]
            let events = 0;
            let mut p = libc::pollfd { fd: self.0, events, revents: 0 };
            // SAFETY: one valid pollfd, zero timeout; the descriptor is open (see the type's doc).
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            n > 0 && p.revents & (events | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        }
        #[cfg(not(unix))]
        false
    }
}

/// Resolves once the client of `req` has gone; never for a request without a socket (in-process
/// tests).
pub async fn client_gone(req: &HttpRequest) {
    match req.conn_data::<PeerSocket>().copied() {
        Some(sock) => loop {
            actix_web::rt::time::sleep(WATCH_INTERVAL).await;
            if sock.gone() {
                return;
            }
        },
        None => std::future::pending().await,
    }
}

/// A request body that fails with `TimedOut` once its deadline passes, so a client that sends a
/// body slowly (or never finishes it) cannot hold a connection open.
struct Deadline {
    inner: Payload,
    sleep: Pin<Box<actix_web::rt::time::Sleep>>,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(PayloadError::Io(std::io::ErrorKind::TimedOut.into())))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Middleware: the whole request body must arrive within the server's `body_timeout` of the
/// request head.
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let limit = req.app_data::<actix_web::web::Data<super::AppState>>().map_or(Duration::from_secs(10), |s| s.config.body_timeout);
    let inner = req.take_payload();
    let sleep = Box::pin(actix_web::rt::time::sleep(limit));
    req.set_payload(Payload::Stream { payload: Box::pin(Deadline { inner, sleep }) });
    next.call(req).await
}

/// Whether a payload error is the body deadline passing.
pub fn is_timeout(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}
