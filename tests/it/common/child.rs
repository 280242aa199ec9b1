//! A `vectord serve` child process for tests that run the real binary (`binary` and `crash`;
//! `benches/perf.rs` includes this file through `#[path]`). Readiness is the child's own
//! log line and health's Watch stream; every wait is bounded by `DEADLINE`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The longest any single step (start, readiness, a call, exit) may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Removes ANSI escape sequences (`ESC [ ... final-byte`), which tracing's fmt layer may emit
/// even when stderr is not a terminal.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameter and intermediate bytes, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A running `vectord serve` child. Its stderr is read on a thread and forwarded line by line
/// (ANSI stripped) through a channel, so the pipe never fills up. Dropping it kills the child
/// if it is still running.
pub struct Vectord {
    child: Option<Child>,
    pub pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line received so far, for assertions and failure messages.
    pub seen: Vec<String>,
    what: &'static str,
}

impl Vectord {
    /// Starts `vectord serve` with `args`, plus `envs` in an environment cleared of any
    /// VECTORD_* / RUST_LOG the test runner may have.
    pub fn spawn(what: &'static str, args: &[&str], envs: &[(&str, &Path)]) -> Self {
        Self::spawn_program(env!("CARGO_BIN_EXE_vectord").as_ref(), what, args, envs)
    }

    /// [`Vectord::spawn`] of another build of vectord (a benchmark comparing two builds).
    pub fn spawn_program(
        program: &Path,
        what: &'static str,
        args: &[&str],
        envs: &[(&str, &Path)],
    ) -> Self {
        let mut cmd = Command::new(program);
        cmd.arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "VECTORD_ADDR",
            "VECTORD_DATA_DIR",
            "VECTORD_LOG",
            "VECTORD_MAX_REQUEST_BYTES",
            "VECTORD_SHUTDOWN_GRACE_SECS",
            "VECTORD_MAX_POINTS_PER_UPSERT",
            "VECTORD_MAX_PENDING_WRITES",
            "VECTORD_MAX_UNINDEXED_POINTS",
            "VECTORD_TEST_INDEXER_DELAY_MS",
            "VECTORD_MAX_CONCURRENT_REQUESTS",
            "VECTORD_REQUEST_TIMEOUT_SECS",
            "VECTORD_MAX_CONCURRENT_JOBS",
            "VECTORD_MAX_HARNESS_QUERIES",
            "VECTORD_API_KEY",
            "VECTORD_API_KEY_FILE",
            "VECTORD_READ_ONLY_API_KEY",
            "VECTORD_READ_ONLY_API_KEY_FILE",
            "VECTORD_TLS_CERT",
            "VECTORD_TLS_KEY",
            "VECTORD_TLS_CLIENT_CA",
            "VECTORD_INSECURE",
            "VECTORD_ENGINE",
            "VECTORD_REFRESH_PROBE_SECS",
            "VECTORD_METRICS_ADDR",
            "VECTORD_MAX_IDS_PER_DELETE",
            "VECTORD_STORE_CACHE_MB",
            "VECTORD_MAP_FLOAT_VECTORS",
            "VECTORD_SNAPSHOT_IDLE_SECS",
            "VECTORD_COMPACT_DELETED_FRACTION",
            "VECTORD_MAX_BATCH_QUERIES",
            "VECTORD_MAX_BATCH_RESULTS",
            "VECTORD_MAX_RESPONSE_BYTES",
            "VECTORD_MAX_CONNECTIONS",
            "VECTORD_HANDSHAKE_TIMEOUT_SECS",
            "VECTORD_HTTP2_MAX_CONCURRENT_STREAMS",
            "VECTORD_HTTP2_KEEPALIVE_INTERVAL_SECS",
            "VECTORD_HTTP2_KEEPALIVE_TIMEOUT_SECS",
            "VECTORD_TCP_KEEPALIVE_SECS",
            "VECTORD_ETCD",
            "VECTORD_NATS",
            "VECTORD_NODE_ID",
            "VECTORD_ADVERTISE_ADDR",
            "VECTORD_ETCD_CA",
            "VECTORD_ETCD_CERT",
            "VECTORD_ETCD_KEY",
            "VECTORD_ETCD_USER",
            "VECTORD_ETCD_PASSWORD",
            "VECTORD_NATS_CA",
            "VECTORD_NATS_CERT",
            "VECTORD_NATS_KEY",
            "VECTORD_NATS_USER",
            "VECTORD_NATS_PASSWORD",
            "VECTORD_LAB_LOG_MAX_DEAD",
            "VECTORD_LOG_KEEP_MESSAGES",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {:?}: {e}", cmd.get_program()));
        let stderr = child.stderr.take().expect("child stderr is piped");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Vectord {
            pid: child.id(),
            child: Some(child),
            lines,
            seen: Vec::new(),
            what,
        }
    }

    /// Panics with `msg`, naming this child and showing its stderr so far.
    pub fn fail(&mut self, msg: impl std::fmt::Display) -> ! {
        let log = self.log();
        panic!("{}: {msg}; stderr:\n{log}", self.what)
    }

    /// The stderr seen so far, one line each, for failure messages.
    pub fn log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// Waits (bounded) for a stderr line for which `pred` holds and returns it.
    pub async fn wait_line(&mut self, expected: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if pred(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => self.fail(format!("stderr closed (exited?) before {expected}")),
            Err(_) => self.fail(format!("no {expected} within {DEADLINE:?}")),
        }
    }

    /// Waits for the `vectord listening` line and returns the address in its `addr=` field.
    pub async fn wait_listening(&mut self) -> SocketAddr {
        let line = self
            .wait_line("`vectord listening` line", |l| {
                l.contains("vectord listening")
            })
            .await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("{}: no addr= in {line:?}", self.what));
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("{}: bad addr= in {line:?}: {e}", self.what));
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "listening on {addr}");
        assert_ne!(addr.port(), 0, "the OS-chosen port is reported, not 0");
        addr
    }

    /// Waits (bounded) until health's Watch stream says SERVING for the whole server.
    pub async fn wait_serving(&mut self, addr: SocketAddr) {
        let serving = tokio::time::timeout(DEADLINE, async {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("url: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut stream = HealthClient::new(channel)
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|e| format!("health watch: {e}"))?
                .into_inner();
            while let Some(msg) = stream
                .message()
                .await
                .map_err(|e| format!("health stream: {e}"))?
            {
                if msg.status == ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
            Err("health stream ended before SERVING".to_string())
        })
        .await;
        match serving {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(e),
            Err(_) => self.fail(format!("not SERVING within {DEADLINE:?}")),
        }
    }

    /// Sends a signal (`TERM`, `INT`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill -{sig} {} failed: {status}",
            self.pid
        );
    }

    /// Waits (bounded) for the child to exit and for its stderr to close; returns the status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("the child has not been waited for");
        let waited =
            tokio::time::timeout(DEADLINE, tokio::task::spawn_blocking(move || child.wait())).await;
        let status = match waited {
            Ok(Ok(Ok(status))) => status,
            Ok(Ok(Err(e))) => panic!("{}: waiting for the child: {e}", self.what),
            Ok(Err(e)) => panic!("{}: the waiting task failed: {e}", self.what),
            Err(_) => {
                // Unblocks the waiting task, which then reaps the child.
                let _ = Command::new("kill")
                    .args(["-KILL", &self.pid.to_string()])
                    .status();
                self.fail(format!("did not exit within {DEADLINE:?}"));
            }
        };
        let closed = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line);
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{}: stderr still open {DEADLINE:?} after exit",
            self.what
        );
        status
    }
}

impl Drop for Vectord {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A path as the UTF-8 string a command-line flag takes.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp dir path is UTF-8")
}

/// Starts `vectord serve` on `dir` (a loopback port) and waits until it is SERVING.
pub async fn start(what: &'static str, dir: &Path) -> (Vectord, SocketAddr) {
    let mut s = Vectord::spawn(
        what,
        &["--addr", "127.0.0.1:0", "--data-dir", path_str(dir)],
        &[],
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    (s, addr)
}

/// A channel to `addr`, connected within [`DEADLINE`].
pub async fn channel(addr: SocketAddr) -> Channel {
    tokio::time::timeout(
        DEADLINE,
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}
