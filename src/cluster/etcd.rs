//! The control plane in etcd: the key layout, the records, and calls bounded in time.
//!
//! Every key is under [`PREFIX`] (docs/cluster.md has the layout):
//! - `/vectord/v1/indexes/<name>` -> JSON [`IndexEntry`]. Created and deleted by compare-and-
//!   swap transactions; the key's create revision is the index's cluster uid (unique for each
//!   incarnation of a name), which names its write log streams.
//! - `/vectord/v1/nodes/<node-id>` -> JSON [`NodeRecord`], attached to the node's lease.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::index::engine::EngineKind;
use crate::model::{HnswConfig, Metric};

pub const PREFIX: &str = "/vectord/v1/";
/// Longest any one etcd call may take before it is UNAVAILABLE.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// A node's registration outlives the node by at most this (the lease's TTL).
pub const LEASE_TTL_SECS: i64 = 10;

pub fn indexes_prefix() -> String {
    format!("{PREFIX}indexes/")
}
pub fn index_key(name: &str) -> String {
    format!("{PREFIX}indexes/{name}")
}
pub fn nodes_prefix() -> String {
    format!("{PREFIX}nodes/")
}
pub fn node_key(node_id: &str) -> String {
    format!("{PREFIX}nodes/{node_id}")
}

/// An index in the cluster's catalog.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub default_config: HnswConfig,
    pub create_time_ms: u64,
    /// The HNSW engine of every node's graphs of the index: the one CreateIndex named, or the
    /// creating node's `--engine` (so every node builds the same kind). None in an entry
    /// written before the field existed: each node's `--engine`.
    #[serde(default)]
    pub engine: Option<EngineKind>,
    /// Write log shards (streams `VECTORD_<uid>_S<n>`); 1 for now: the layout leaves room for
    /// more.
    pub shards: u32,
}

/// A node as registered.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub advertise_addr: String,
    pub start_time_ms: u64,
    /// Per index name, the last write-log sequence applied.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
}

/// An etcd failure as the client sees it: UNAVAILABLE naming etcd.
pub fn unavailable(urls: &[String], what: &str, e: impl std::fmt::Display) -> Error {
    Error::Engine {
        engine: "etcd",
        endpoints: urls.join(","),
        what: format!(" did not answer {what}"),
        detail: e.to_string(),
    }
}

/// Runs one etcd call, bounded by [`TIMEOUT`].
pub async fn bounded<T>(
    urls: &[String],
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(urls, what, e)),
        Err(_) => Err(unavailable(
            urls,
            what,
            format!("no answer within {} s", TIMEOUT.as_secs()),
        )),
    }
}

/// The catalog: every index with its uid, and the revision the list was read at.
pub async fn list_indexes(
    etcd: &mut Client,
    urls: &[String],
) -> Result<(Vec<(IndexEntry, u64)>, i64)> {
    let resp = bounded(
        urls,
        "listing the catalog",
        etcd.get(indexes_prefix(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice::<IndexEntry>(kv.value()) {
            Ok(e) => out.push((e, kv.create_revision() as u64)),
            Err(e) => {
                tracing::error!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable catalog entry in etcd: ignored")
            }
        }
    }
    Ok((out, rev))
}

/// Creates the entry if its name is free: Some(uid), or None when the name is taken.
pub async fn create_index(
    etcd: &mut Client,
    urls: &[String],
    entry: &IndexEntry,
) -> Result<Option<u64>> {
    let key = index_key(&entry.name);
    let value = serde_json::to_vec(entry)
        .map_err(|e| Error::Internal(format!("encoding a catalog entry: {e}")))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    let resp = bounded(urls, "creating the index", etcd.txn(txn)).await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    // The put is the transaction's only write: its revision is the key's create revision.
    Ok(resp.header().map(|h| h.revision() as u64))
}

/// The entry of `name` with its uid, if any.
pub async fn get_index(
    etcd: &mut Client,
    urls: &[String],
    name: &str,
) -> Result<Option<(IndexEntry, u64)>> {
    let resp = bounded(urls, "reading the catalog", etcd.get(index_key(name), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let e = serde_json::from_slice::<IndexEntry>(kv.value())
        .map_err(|e| Error::Corrupt(format!("the catalog entry of {name:?} in etcd: {e}")))?;
    Ok(Some((e, kv.create_revision() as u64)))
}

/// Deletes the entry of `name` if it is still incarnation `uid`; false if it is not.
pub async fn delete_index(
    etcd: &mut Client,
    urls: &[String],
    name: &str,
    uid: u64,
) -> Result<bool> {
    let key = index_key(name);
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            uid as i64,
        )])
        .and_then([TxnOp::delete(key, None)]);
    let resp = bounded(urls, "deleting the index", etcd.txn(txn)).await?;
    Ok(resp.succeeded())
}

/// Writes the node's record under its lease.
pub async fn put_node(
    etcd: &mut Client,
    urls: &[String],
    rec: &NodeRecord,
    lease: i64,
) -> Result<()> {
    let value = serde_json::to_vec(rec)
        .map_err(|e| Error::Internal(format!("encoding a node record: {e}")))?;
    bounded(
        urls,
        "registering the node",
        etcd.put(
            node_key(&rec.node_id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    Ok(())
}

/// Every registered (live) node, in node id order.
pub async fn list_nodes(etcd: &mut Client, urls: &[String]) -> Result<Vec<NodeRecord>> {
    let resp = bounded(
        urls,
        "listing the nodes",
        etcd.get(nodes_prefix(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(n) => out.push(n),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable node record in etcd: not listed")
            }
        }
    }
    out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(out)
}
