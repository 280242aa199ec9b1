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
//! An admitted connection is *idle* while no call is in flight on it (calls are counted by
//! [`ActivityLayer`], from the call's start until its response body, a stream's included, has
//! ended; HTTP/2 PINGs are not calls). Idle connections do not hold a node forever:
//! - one idle for `--idle-timeout-secs` is closed (the client's channel reconnects at its next
//!   call);
//! - when all `--max-connections` slots are taken, a new connection (past its first bytes)
//!   closes the connection that has been idle longest and takes its slot; only when every open
//!   connection has a call in flight is the new one refused.
//!
//! So a client that completes its handshakes (with or without TLS) and then sends nothing, or
//! only answers PINGs, cannot keep a client that makes calls out.
//!
//! Closing is graceful ([`serve`]): the connection's task tells hyper to shut it down, which
//! sends an HTTP/2 GOAWAY and a PING. A call the client sent before it read the GOAWAY is still
//! served (the first GOAWAY admits every stream; the final one, sent once the PING is
//! answered, names the last stream served), and the client opens a new connection for its
//! next call, so no call fails because its connection was closed as idle or to make room. The
//! connection closes once its calls are done; one whose peer leaves the PING unanswered and
//! has no call in flight is closed [`CLOSE_GRACE`] later. Shutdown closes every connection the
//! same way.
//!
//! The bytes read to decide are replayed to the server by [`Conn`]: hyper has such a type
//! (`Rewind`) but does not export it, and this one is a few lines.
//!
//! Serving is ours rather than tonic's `Server` because tonic has no hook to close one
//! connection gracefully (only `max_connection_age`, which closes busy ones too): [`serve`]
//! does what tonic's does (TLS with a 10 s handshake, HTTP/2 with the configured limits, the
//! services behind tonic's `RecoverError`, graceful shutdown) with hyper's HTTP/2 server
//! defaults otherwise, and sets a [`PeerAddr`] on each call instead of tonic's connect info.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    /// How long an admitted connection may stay idle (no call in flight); None: no limit.
    pub idle_timeout: Option<Duration>,
}

/// What an admitted connection's calls and its reader share.
struct ConnState {
    /// Calls in flight on the connection.
    in_flight: AtomicUsize,
    /// When the last call started or ended (or the connection was admitted).
    last_busy: Mutex<Instant>,
    /// Set once the connection was chosen to make room for a new one.
    evicted: AtomicBool,
    /// Wakes the connection's watch future to close it.
    evict: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_busy: Mutex::new(Instant::now()),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    /// How long the connection has been idle: zero while a call is in flight.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            Duration::ZERO
        } else {
            self.last_busy.lock().elapsed()
        }
    }
}

/// The admitted connections of one listener, by peer address (unique while open): what
/// [`ActivityLayer`] counts calls on, and what a new connection may evict from.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<HashMap<SocketAddr, Arc<ConnState>>>>);

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The layer that counts each call on the connection it came on.
    pub fn layer(&self) -> ActivityLayer {
        ActivityLayer(self.clone())
    }

    /// Open connections, for tests and logs.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for a new connection: tells the connection idle longest to close. False if
    /// there is none and none is closing already: every connection has a call in flight.
    fn make_room(&self) -> bool {
        let map = self.0.lock();
        let idlest = map
            .iter()
            .filter(|(_, c)| !c.evicted.load(Ordering::Acquire))
            .map(|(peer, c)| (c.idle_for(), peer, c))
            .filter(|(idle, _, _)| !idle.is_zero())
            .max_by_key(|(idle, _, _)| *idle);
        match idlest {
            Some((idle, peer, c)) => {
                c.evicted.store(true, Ordering::Release);
                c.evict.notify_one();
                tracing::info!(%peer, ?idle, "closing the longest idle connection to make room for a new one (--max-connections)");
                true
            }
            None => map.values().any(|c| c.evicted.load(Ordering::Acquire)),
        }
    }
}

/// Resolves when the connection should close: evicted, or idle for `idle`.
async fn watch(state: Arc<ConnState>, idle: Option<Duration>, peer: SocketAddr) {
    let Some(limit) = idle else {
        state.evict.notified().await;
        return;
    };
    loop {
        // Never a zero sleep: a busy connection is looked at again one `limit` later.
        let wait = limit
            .saturating_sub(state.idle_for())
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = state.evict.notified() => return,
            _ = tokio::time::sleep(wait) => {
                if state.idle_for() >= limit {
                    tracing::debug!(%peer, ?limit, "closing an idle connection (--idle-timeout-secs)");
                    return;
                }
            }
        }
    }
}

/// An admitted connection: the bytes read while deciding, then the socket. Holds its slot
/// until it is dropped (closed).
pub struct Conn {
    inner: TcpStream,
    prefix: Vec<u8>,
    pos: usize,
    _slot: OwnedSemaphorePermit,
    peer: SocketAddr,
    registry: Registry,
    state: Arc<ConnState>,
    /// `--idle-timeout-secs`.
    idle_timeout: Option<Duration>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.registry.0.lock().remove(&self.peer);
    }
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

/// Pending connections, oldest first, by id.
type Pending = Arc<Mutex<VecDeque<(u64, AbortHandle)>>>;

/// The admitted connections of `listener`, under `limits`. The accept loop and the pending
/// connections' tasks are owned by `tasks`; the loop ends when the receiver is dropped (the
/// server stopped) and closes the connections still pending as it ends.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    registry: Registry,
    tasks: crate::tasks::Tasks,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    tasks.spawn(accept_loop(listener, limits, registry, tx, tasks.clone()));
    rx
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
    registry: Registry,
    tx: mpsc::Sender<Conn>,
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
            registry.clone(),
            tx.clone(),
        ));
        p.push_back((id, task.abort_handle()));
        drop(p);
    }
}

/// Reads the first bytes of a pending connection within the handshake timeout, then gives it a
/// slot or closes it. (Its one caller is the accept loop, which owns every argument.)
#[allow(clippy::too_many_arguments)]
async fn admit(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    limits: ConnLimits,
    slots: Arc<Semaphore>,
    pending: Pending,
    id: u64,
    registry: Registry,
    tx: mpsc::Sender<Conn>,
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
    // Full: the idlest connection makes room, and a slot is ours once one has closed. A
    // connection told to close may take its GOAWAY's grace to go, so while one is closing the
    // wait goes on, looking for a newly idle one to close every grace, within the handshake
    // timeout.
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let slot = loop {
        if let Ok(s) = slots.clone().try_acquire_owned() {
            break s;
        }
        if !registry.make_room() {
            tracing::warn!(%peer, max = limits.max, "connection refused: --max-connections connections are open, each with a call in flight");
            return;
        }
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(CLOSE_GRACE);
        match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
            Ok(Ok(s)) => break s,
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            _ => {
                tracing::warn!(%peer, max = limits.max, "connection refused: no slot freed in time (--max-connections)");
                return;
            }
        }
    };
    let state = Arc::new(ConnState::new());
    registry.0.lock().insert(peer, state.clone());
    let _ = tx
        .send(Conn {
            inner: stream,
            prefix,
            pos: 0,
            _slot: slot,
            peer,
            registry,
            state,
            idle_timeout: limits.idle_timeout,
        })
        .await;
}

/// The peer of the connection a call came on, in the call's request extensions (set by
/// [`serve`]); [`ActivityLayer`] finds the call's connection by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// How long a TLS handshake may take once its first byte has come.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection told to close (GOAWAY sent) that is still open this much later with no call in
/// flight is closed: its peer did not answer the GOAWAY's PING. A client that did answer is
/// gone long before (one round trip).
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How [`serve`] serves the admitted connections.
#[derive(Clone)]
pub struct Serving {
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// A PING this often (None: never), and the connection is closed when one goes unanswered
    /// for `keepalive_timeout`.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// TLS on every connection (None: plaintext).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A connection's byte stream: the admitted socket, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// What [`serve`] serves: tonic's routes behind the edge layers, boxed (as tonic's own server
/// boxes them), so the serving code is compiled once. Its error is a concrete type: with a
/// boxed `dyn Error` one, checking that a connection's future is `Send` trips
/// rust-lang/rust#102211 (what tonic's server works around for its own `serve_connection`).
pub type Edge = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::Status,
>;

/// Serves every connection from `incoming` (see [`incoming`]) with `svc` until `stop` is
/// cancelled; then stops taking connections, closes every open one gracefully (each once its
/// calls are done) and returns when all are closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Conn>,
    svc: Edge,
    serving: Serving,
    stop: CancellationToken,
) {
    let mut h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    h2.timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(serving.max_concurrent_streams)
        .keep_alive_interval(serving.keepalive_interval)
        .keep_alive_timeout(serving.keepalive_timeout);
    let open = TaskTracker::new();
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => break,
            c = incoming.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        open.spawn(serve_conn(
            conn,
            svc.clone(),
            h2.clone(),
            serving.tls.clone(),
            stop.clone(),
        ));
    }
    // The accept loop ends and closes the connections still pending.
    drop(incoming);
    open.close();
    open.wait().await;
}

/// Serves one connection until it ends, closing it gracefully when it is idle too long, must
/// make room ([`watch`]), or the server stops.
async fn serve_conn(
    conn: Conn,
    svc: Edge,
    h2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let peer = conn.peer;
    let state = conn.state.clone();
    // Resolves once the connection is to close: idle too long, evicted, or the server stops.
    let watched = watch(state.clone(), conn.idle_timeout, peer);
    let close = async {
        tokio::select! {
            () = watched => {}
            () = stop.cancelled() => {}
        }
    };
    tokio::pin!(close);
    let io: Box<dyn Io> = match tls {
        None => Box::new(conn),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(conn));
            tokio::select! {
                r = handshake => match r {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, timeout = ?TLS_HANDSHAKE_TIMEOUT, "closed a connection whose TLS handshake took too long");
                        return;
                    }
                },
                // Nothing was served on it yet: closing it drops no call.
                () = &mut close => return,
            }
        }
    };
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let mut req = req.map(tonic::body::Body::new);
        req.extensions_mut().insert(PeerAddr(peer));
        // The span names the method only: metadata (and so the API key) is never recorded.
        let span = tracing::info_span!("rpc", method = %req.uri().path());
        tower::ServiceExt::oneshot(svc.clone(), req).instrument(span)
    });
    let served = h2.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(served);
    // Once the GOAWAY is sent: when to look whether the connection is still open with no call
    // in flight (a deadline, so frames the peer keeps sending do not push it back).
    let mut grace: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        tokio::select! {
            // The connection first: what its peer sent before a grace ran out is read (and a
            // call in it counted) before that grace is looked at.
            biased;
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut close, if grace.is_none() => {
                served.as_mut().graceful_shutdown();
                grace = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            () = tokio::time::sleep_until(grace.unwrap_or(far)), if grace.is_some() => {
                if state.in_flight.load(Ordering::Acquire) == 0 {
                    tracing::debug!(%peer, "closed a connection that did not answer its GOAWAY's PING");
                    return;
                }
                grace = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// A tower layer that counts each call as in flight on its connection, from its start until
/// its response body has ended (or was dropped), so that [`Registry`] knows which connections
/// are idle. Calls whose connection it cannot find (none in tests that serve without
/// [`incoming`]) pass through uncounted.
#[derive(Clone)]
pub struct ActivityLayer(Registry);

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Activity<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Activity {
            inner,
            registry: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Activity<S> {
    inner: S,
    registry: Registry,
}

/// One call in flight on a connection; ends it when dropped.
struct Busy(Arc<ConnState>);

impl Busy {
    fn start(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        *state.last_busy.lock() = Instant::now();
        Self(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_busy.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Activity<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
        let busy = peer
            .and_then(|p| self.registry.0.lock().get(&p).cloned())
            .map(Busy::start);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Tracked { inner, _busy: busy }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted as in flight until it is dropped.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        _busy: Option<Busy>,
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
