//! Connection admission: what a client may hold open before any call is made.
//!
//! Every accepted TCP connection first has to send its first bytes: the whole HTTP/2 client
//! preface on plaintext, the first byte of its TLS ClientHello with TLS (the TLS handshake then
//! has its own 10 s limit). Until then it is *pending*:
//! - a pending connection that has not sent them within `--handshake-timeout-secs` is closed;
//! - at most `--max-connections` connections are pending at once: one more closes the oldest
//!   pending one, so a client that opens connections and sends nothing (slow-loris) cannot
//!   keep out a client that sends its preface at once, as every real client does;
//! - the accept loop never waits on a connection: each pending one is its own task.
//!
//! A connection past its first bytes takes one of `--max-connections` slots for as long as it
//! is open; when none is free it is closed at once (the client sees UNAVAILABLE and may
//! retry). TCP keepalive (`--tcp-keepalive-secs`) and TCP_NODELAY are set on every accepted
//! connection; tonic's own `tcp_keepalive` does not apply to an incoming stream like this one.
//!
//! The bytes read to decide are replayed to the server by [`Conn`]: hyper has such a type
//! (`Rewind`) but does not export it, and this one is a few lines.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The limits on connections, from the config.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Most connections served at once, and most pending at once.
    pub max: usize,
    /// How long a pending connection has to send its first bytes.
    pub handshake_timeout: Duration,
    /// Idle time before TCP keepalive probes; None: off.
    pub tcp_keepalive: Option<Duration>,
    /// TLS on the listener: wait for one byte, not for the HTTP/2 preface.
    pub tls: bool,
}

/// An admitted connection: the bytes read while deciding, then the socket. Holds its slot
/// until it is dropped (closed).
pub struct Conn {
    inner: TcpStream,
    prefix: Vec<u8>,
    pos: usize,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Pending connections, oldest first, by id.
type Pending = Arc<Mutex<VecDeque<(u64, AbortHandle)>>>;

/// The admitted connections of `listener`, under `limits`. The accept loop and the pending
/// connections' tasks are owned by `tasks`; the loop ends when the stream is dropped (the
/// server stopped) and closes the connections still pending as it ends.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    tasks: crate::tasks::Tasks,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tasks.spawn(accept_loop(listener, limits, tx, tasks.clone()));
    ReceiverStream::new(rx)
}

fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    // Nagle off: a small unary reply goes out at once instead of waiting for a delayed ACK.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set: {e}");
    }
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new().with_time(idle).with_interval(
            idle.min(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
        );
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
            tracing::debug!("TCP keepalive not set: {e}");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnLimits,
    tx: mpsc::Sender<io::Result<Conn>>,
    tasks: crate::tasks::Tasks,
) {
    let max = limits.max.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let pending: Pending = Arc::new(Mutex::new(VecDeque::new()));
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = tx.closed() => {
                // No one takes connections any more: the pending ones are closed now rather
                // than at their handshake timeout, so shutdown need not wait for them.
                for (_, task) in pending.lock().drain(..) {
                    task.abort();
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tune(&stream, limits.tcp_keepalive);
        let id = next_id;
        next_id += 1;
        let mut p = pending.lock();
        while p.len() >= max {
            if let Some((_, oldest)) = p.pop_front() {
                oldest.abort();
                tracing::warn!(
                    max,
                    "closed the oldest connection still waiting for its first bytes: too many \
                     pending (--max-connections)"
                );
            }
        }
        let task = tasks.spawn(admit(
            stream,
            peer,
            limits,
            slots.clone(),
            pending.clone(),
            id,
            tx.clone(),
        ));
        p.push_back((id, task.abort_handle()));
        drop(p);
    }
}

/// Reads the first bytes of a pending connection within the handshake timeout, then gives it a
/// slot or closes it.
async fn admit(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    limits: ConnLimits,
    slots: Arc<Semaphore>,
    pending: Pending,
    id: u64,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let need = if limits.tls { 1 } else { PREFACE.len() };
    let mut prefix = vec![0u8; need];
    let mut got = 0;
    let read = tokio::time::timeout(limits.handshake_timeout, async {
        while got < need {
            let n = stream.read(&mut prefix[got..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            got += n;
            // Not HTTP/2: hand it over at once; the server answers it with its error.
            if !limits.tls && !PREFACE.starts_with(&prefix[..got]) {
                break;
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
    pending.lock().retain(|(i, _)| *i != id);
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection closed before its first bytes");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?limits.handshake_timeout, "closed a connection that sent nothing in time (--handshake-timeout-secs)");
            return;
        }
    }
    prefix.truncate(got);
    let slot = match slots.try_acquire_owned() {
        Ok(s) => s,
        Err(_) => {
            tracing::warn!(%peer, max = limits.max, "connection refused: --max-connections connections are open");
            return;
        }
    };
    let _ = tx
        .send(Ok(Conn {
            inner: stream,
            prefix,
            pos: 0,
            _slot: slot,
        }))
        .await;
}
