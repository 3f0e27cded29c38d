//! Accepted connections that can be closed by force when the shutdown grace period runs out.
//!
//! tonic drains connections gracefully (HTTP/2 GOAWAY, then waits for in-flight streams), but it
//! cannot be told to give up: its connection tasks are spawned. Wrapping every accepted socket in
//! [`GuardedIo`] lets the server end them: once the force-close token is cancelled, every read
//! and write fails, hyper drops the connection, and tonic's serve future completes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection whose I/O fails once `force_close` is cancelled.
pub(crate) struct GuardedIo {
    inner: TcpStream,
    token: CancellationToken,
    read_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    write_wait: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl GuardedIo {
    pub(crate) fn new(inner: TcpStream, force_close: &CancellationToken) -> Self {
        GuardedIo {
            inner,
            token: force_close.clone(),
            read_wait: Box::pin(force_close.clone().cancelled_owned()),
            write_wait: Box::pin(force_close.clone().cancelled_owned()),
        }
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "shutdown grace period elapsed; connection closed by the server",
    )
}

/// `true` when the connection must be failed now. Polls the wait future (registering the waker)
/// only while the token is not cancelled, so a finished future is never polled again.
fn closed(
    token: &CancellationToken,
    wait: &mut Pin<Box<WaitForCancellationFutureOwned>>,
    cx: &mut Context<'_>,
) -> bool {
    token.is_cancelled() || wait.as_mut().poll(cx).is_ready()
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if closed(&this.token, &mut this.read_wait, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if closed(&this.token, &mut this.write_wait, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if closed(&this.token, &mut this.write_wait, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if closed(&this.token, &mut this.write_wait, cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for GuardedIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
