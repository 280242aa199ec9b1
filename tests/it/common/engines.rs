//! etcd and NATS JetStream for a test or a bench: started by `scripts/cluster.sh` on free
//! loopback ports in a temp dir, stopped (and their data removed) when dropped. Shared by
//! tests/it/cluster.rs and benches/cluster.rs, each using a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Engines {
    pub dir: tempfile::TempDir,
    /// `VECTORD_ETCD`: the etcd client URLs, comma-separated.
    pub etcd: String,
    /// `VECTORD_NATS`: the NATS URLs, comma-separated.
    pub nats: String,
    /// (etcd members, NATS servers)
    pub sizes: (usize, usize),
    /// With `SECURE=1` engines: a node's TLS files and passwords for etcd, for NATS.
    pub etcd_access: vectord::cluster::EngineAccess,
    pub nats_access: vectord::cluster::EngineAccess,
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh")
}

impl Engines {
    /// Starts `etcd_members` etcd members and `nats_servers` NATS servers (the script installs
    /// the pinned versions when missing); why not, as text.
    pub fn try_start(etcd_members: usize, nats_servers: usize) -> Result<Engines, String> {
        Self::try_start_secure(etcd_members, nats_servers, false)
    }

    /// [`Engines::try_start`]; with `secure`, TLS and passwords on both engines (the script's
    /// `SECURE=1`), their files and passwords in [`Engines::etcd_access`] and `nats_access`.
    pub fn try_start_secure(
        etcd_members: usize,
        nats_servers: usize,
        secure: bool,
    ) -> Result<Engines, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("a temp dir: {e}"))?;
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .env("ETCD_MEMBERS", etcd_members.to_string())
            .env("NATS_SERVERS", nats_servers.to_string())
            .env("SECURE", if secure { "1" } else { "0" })
            .output()
            .map_err(|e| format!("running scripts/cluster.sh: {e}"))?;
        // A failed start may leave some engines running: they are stopped before the error
        // returns (the temp dir's removal alone would not stop them).
        let stop = |why: String| {
            stop_engines(dir.path());
            why
        };
        if !out.status.success() {
            return Err(stop(format!(
                "the cluster's engines did not start ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let env = std::fs::read_to_string(dir.path().join("env"))
            .map_err(|e| stop(format!("the script's env file: {e}")))?;
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .ok_or_else(|| format!("no {k} in the script's env file: {env}"))
        };
        let access = |engine: &str| {
            let var = |k: &str| get(&format!("VECTORD_{engine}_{k}")).ok();
            vectord::cluster::EngineAccess {
                ca: var("CA").map(Into::into),
                cert: var("CERT").map(Into::into).zip(var("KEY").map(Into::into)),
                user: var("USER"),
                password: var("PASSWORD"),
            }
        };
        let (etcd, nats) = match (get("VECTORD_ETCD"), get("VECTORD_NATS")) {
            (Ok(etcd), Ok(nats)) => (etcd, nats),
            (Err(e), _) | (_, Err(e)) => return Err(stop(e)),
        };
        Ok(Engines {
            etcd,
            nats,
            etcd_access: access("ETCD"),
            nats_access: access("NATS"),
            dir,
            sizes: (etcd_members, nats_servers),
        })
    }
}

/// `scripts/cluster.sh stop DIR`: stops every engine started in `dir`.
fn stop_engines(dir: &Path) {
    let _ = Command::new("bash")
        .arg(script())
        .arg("stop")
        .arg(dir)
        .output();
}

impl Drop for Engines {
    fn drop(&mut self) {
        stop_engines(self.dir.path());
    }
}
