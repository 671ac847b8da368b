//! Accepting connections: how many at once, and how long a client may stall.
//!
//! `axum::serve` has neither a connection limit nor timeouts, so a client that opens
//! connections and sends nothing (or half a header, or a body one byte a minute, or never reads
//! its answer) held them until the file-descriptor limit, and then every other client timed out.
//! Here each connection holds one of `max_connections` permits; one past the limit is answered
//! 503 at once and closed. hyper's header timer covers a connection waiting for its next request
//! (idle keep-alive included); the request body must arrive whole within the same time (see
//! [`crate::routes`]); and a write that makes no progress for `write_timeout` ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

/// Bounds on connections and on how long a client may stall one.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time to send a request's headers, counted from the connection's start or its previous
    /// response (so it is also the keep-alive idle limit), and, again, to send its body.
    pub read_timeout: Duration,
    /// Time a write to the client may make no progress (a client that stopped reading).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then gives open requests a few
/// seconds to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, or a client gone before its accept: neither ends the
                // server. The pause lets descriptors free up instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, limits));
            continue;
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.read_timeout);
        let io = TokioIo::new(StallLimit::new(stream, limits.write_timeout));
        let connection = builder.serve_connection(io, TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

/// The answer to a connection past the limit: a 503 in OpenAI's error shape, then close.
async fn refuse_busy(mut stream: TcpStream, limits: Limits) {
    let body = crate::error::ApiError::invalid(format!(
        "the server is at its limit of {} connections; retry shortly",
        limits.max_connections
    ))
    .with_status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for `limit`.
/// Reads are left alone: a client waiting for a long answer rightly sends nothing.
pub struct StallLimit<S> {
    inner: S,
    limit: Duration,
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<S> StallLimit<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled_since: None,
        }
    }

    /// Passes a write's result through, starting the clock when it stalls and stopping it when
    /// it moves; a stall past the limit becomes an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled_since = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_limit() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut stream = StallLimit::new(ours, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let error = stream.write_all(&[0; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(5));
        // A reader that keeps up is never timed out, however long the whole write takes.
        let (ours, mut theirs2) = tokio::io::duplex(64);
        let mut stream = StallLimit::new(ours, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let mut buf = [0; 16];
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match tokio::io::AsyncReadExt::read(&mut theirs2, &mut buf).await {
                    Ok(0) | Err(_) => break sink,
                    Ok(n) => sink.extend_from_slice(&buf[..n]),
                }
            }
        });
        stream.write_all(&[7; 1024]).await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap().len(), 1024);
        drop(theirs);
    }
}
