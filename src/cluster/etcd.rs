//! The control plane in etcd: the key layout, the records, and calls bounded in time.
//!
//! Every key is under [`PREFIX`] (docs/cluster.md has the layout):
//! - `/vectord/v1/indexes/<name>` -> JSON [`IndexEntry`]. Created and deleted by compare-and-
//!   swap transactions; the key's create revision is the index's cluster uid (unique for each
//!   incarnation of a name), which names its write log streams.
//! - `/vectord/v1/nodes/<node-id>` -> JSON [`NodeRecord`], attached to the node's lease.
//! - `/vectord/v1/profiles/<name>` -> JSON `model::Profile`.
//! - `/vectord/v1/promotions/<index>` -> JSON [`PromotionEntry`]: the index's registry
//!   (current + history), tagged with the index's uid.
//! - `/vectord/v1/active/<index>` -> JSON [`Desired`]: the index's desired active generation.
//! - `/vectord/v1/jobs/<index>` -> JSON [`JobLeaseEntry`], attached to the job's own lease; the
//!   key's create revision is the job's fencing token. `cancel_by` is set (CancelJob through
//!   another node) to ask the node running the job to cancel it.
//! - `/vectord/v1/refresh/<index>` -> JSON `refresh::SharedRecord`: the index's refresh
//!   policy, tune mark and status, tagged with the index's uid.
//! - `/vectord/v1/job-seq` -> JSON u64: the number of the last job started in the cluster
//!   (raised in the transaction that takes a job lease: job ids are `job-<n>`, unique).
//! - `/vectord/v1/job-records/<n, 20 digits>` -> JSON `autotune::jobs::JobRecord`: every
//!   node's job records, bounded like a single node's (`--jobs-kept` finished ones).
//! - `/vectord/v1/lab-horizon` -> JSON u64: the lab log's records up to this sequence may be
//!   trimmed (raised before any is deleted); `/vectord/v1/lab-trim` -> JSON node id, on that
//!   node's lease, while it trims the lab log (`cluster::lab`).
//!
//! Every change of these is one transaction: a read of the keys it depends on ([`read`]),
//! then a commit ([`commit`]) conditioned on each of them being unchanged ([`unchanged`]),
//! retried from a fresh read when another node changed one first.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::index::engine::EngineKind;
use crate::model::{ConfigSource, HnswConfig, Metric};
use crate::promotion::Record;

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
pub fn profiles_prefix() -> String {
    format!("{PREFIX}profiles/")
}
pub fn profile_key(name: &str) -> String {
    format!("{PREFIX}profiles/{name}")
}
pub fn promotions_prefix() -> String {
    format!("{PREFIX}promotions/")
}
pub fn promotion_key(index: &str) -> String {
    format!("{PREFIX}promotions/{index}")
}
pub fn active_prefix() -> String {
    format!("{PREFIX}active/")
}
pub fn active_key(index: &str) -> String {
    format!("{PREFIX}active/{index}")
}
pub fn job_key(index: &str) -> String {
    format!("{PREFIX}jobs/{index}")
}
pub fn refresh_prefix() -> String {
    format!("{PREFIX}refresh/")
}
pub fn refresh_key(index: &str) -> String {
    format!("{PREFIX}refresh/{index}")
}
pub fn jobs_prefix() -> String {
    format!("{PREFIX}jobs/")
}
/// The cluster's job counter: the number of the last job started (JSON u64).
pub fn job_seq_key() -> String {
    format!("{PREFIX}job-seq")
}
pub fn job_records_prefix() -> String {
    format!("{PREFIX}job-records/")
}
/// Job `seq`'s record (zero-padded: keys list in job order).
pub fn job_record_key(seq: u64) -> String {
    format!("{PREFIX}job-records/{seq:020}")
}

/// The lab log's horizon (JSON u64): records at or below it may have been trimmed from the
/// lab log, so a node that mirrored less re-reads the whole log (`cluster::lab`).
pub fn lab_horizon_key() -> String {
    format!("{PREFIX}lab-horizon")
}
/// Held (JSON node id, on the node's lease) while a node trims the lab log.
pub fn lab_trim_key() -> String {
    format!("{PREFIX}lab-trim")
}

/// An index's promotion registry in etcd.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromotionEntry {
    /// The index incarnation (catalog uid) it belongs to: a record of an older incarnation of
    /// the name reads as empty.
    pub uid: u64,
    #[serde(flatten)]
    pub record: Record,
}

/// A trial by the node whose journal holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrialRef {
    pub node: String,
    pub id: u64,
}

/// An index's desired active generation: what every node builds (or adopts) and serves.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Desired {
    /// The index incarnation it is for.
    pub uid: u64,
    /// 1 for the first activation in the cluster, then one more for each; 0 (no key) means
    /// the generation made at creation.
    pub number: u64,
    pub config: HnswConfig,
    pub source: ConfigSource,
    /// The profile whose activation set it; empty for an autotune job's activation.
    #[serde(default)]
    pub profile: String,
    /// The promoted trial whose config it is: the node holding that trial's graph adopts it.
    #[serde(default)]
    pub trial: Option<TrialRef>,
    pub set_by: String,
    pub set_time_ms: u64,
}

/// The holder of an index's autotune job lease.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobLeaseEntry {
    pub node_id: String,
    pub job_id: String,
    pub lease: i64,
    pub start_time_ms: u64,
    /// The node through which CancelJob asked to cancel the job (empty: nobody asked).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cancel_by: String,
}

/// A node's rollout state of one index, as it reports it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeGeneration {
    /// The desired generation number this node serves (0: none was set yet).
    pub served: u64,
    /// The node's own active generation number.
    pub local: u64,
    /// Why its last attempt to build the desired generation failed; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A key as read: its value and revisions.
#[derive(Clone, Debug)]
pub struct Read {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl Read {
    /// The value as JSON `T`; CORRUPT naming the key when it is not.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        decode(key, &self.value)
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt(format!("etcd key {key}: {e}")))
}

pub fn encode<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("encoding {what}: {e}")))
}

/// The compare that holds while `key` is as `read` saw it (absent, or unchanged since).
pub fn unchanged(key: &str, read: &Option<Read>) -> Compare {
    match read {
        Some(r) => Compare::mod_revision(key, CompareOp::Equal, r.mod_revision),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// The compare that holds while `key` is the incarnation created at `revision` (an index's
/// uid, a job lease's fencing token).
pub fn incarnation(key: &str, revision: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, revision)
}

/// Reads `keys` at one revision (one transaction of gets).
pub async fn read(
    etcd: &mut Client,
    urls: &[String],
    what: &str,
    keys: &[String],
) -> Result<Vec<Option<Read>>> {
    let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
    let resp = bounded!(urls, what, etcd.txn(Txn::new().and_then(ops.clone()))).await?;
    let mut out = Vec::with_capacity(keys.len());
    for r in resp.op_responses() {
        match r {
            etcd_client::TxnOpResponse::Get(g) => out.push(g.kvs().first().map(|kv| Read {
                value: kv.value().to_vec(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            })),
            _ => {
                return Err(Error::Internal(
                    "etcd answered a get with another op".into(),
                ))
            }
        }
    }
    if out.len() != keys.len() {
        return Err(Error::Internal(format!(
            "etcd answered {} of {} reads",
            out.len(),
            keys.len()
        )));
    }
    Ok(out)
}

/// Commits `ops` if every compare holds: true when it did (the revision of the commit).
pub async fn commit(
    etcd: &mut Client,
    urls: &[String],
    what: &str,
    when: Vec<Compare>,
    ops: Vec<TxnOp>,
) -> Result<Option<i64>> {
    let resp = bounded!(
        urls,
        what,
        etcd.txn(Txn::new().when(when.clone()).and_then(ops.clone()))
    )
    .await?;
    Ok(resp
        .succeeded()
        .then(|| resp.header().map_or(0, |h| h.revision())))
}

/// Every key under `prefix` with its value, and the revision the list was read at.
pub async fn list(
    etcd: &mut Client,
    urls: &[String],
    what: &str,
    prefix: String,
) -> Result<(Vec<(String, Read)>, i64)> {
    let resp = bounded!(
        urls,
        what,
        etcd.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let out = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                Read {
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                },
            )
        })
        .collect();
    Ok((out, rev))
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
    /// Per index name, the generation the node serves.
    #[serde(default)]
    pub generations: BTreeMap<String, NodeGeneration>,
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

/// Attempts of one etcd call that could not connect (see [`bounded!`]).
pub const CONNECT_ATTEMPTS: u32 = 4;

/// Whether an etcd call failed before its request was sent: it could not connect to the member
/// it was routed to (a member that is down: etcd-client's balanced channel still routes some
/// calls to it until it is back), so repeating it cannot apply it twice.
pub fn never_sent(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("tcp connect error"))
}

/// Runs one etcd call, bounded by [`TIMEOUT`] in all: `$call` is an expression evaluated again
/// for each attempt. A call that could not connect ([`never_sent`]) is repeated, up to
/// [`CONNECT_ATTEMPTS`] times within the bound, so that another member takes it: with one
/// member of three down, calls go on. Any other failure is UNAVAILABLE naming etcd at once.
macro_rules! bounded {
    ($urls:expr, $what:expr, $call:expr $(,)?) => {
        async {
            let deadline = tokio::time::Instant::now() + $crate::cluster::etcd::TIMEOUT;
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                match tokio::time::timeout_at(deadline, $call).await {
                    Ok(Ok(v)) => break Ok(v),
                    Ok(Err(e))
                        if attempts < $crate::cluster::etcd::CONNECT_ATTEMPTS
                            && $crate::cluster::etcd::never_sent(&e) =>
                    {
                        continue
                    }
                    Ok(Err(e)) => break Err($crate::cluster::etcd::unavailable($urls, $what, e)),
                    Err(_) => {
                        break Err($crate::cluster::etcd::unavailable(
                            $urls,
                            $what,
                            format!(
                                "no answer within {} s",
                                $crate::cluster::etcd::TIMEOUT.as_secs()
                            ),
                        ))
                    }
                }
            }
        }
    };
}
pub(crate) use bounded;

/// A watch of one key, or of every key under a prefix, from a revision on, read one response
/// at a time. Every follower of etcd reads its watch through this, so they all fail the same
/// way: a watch that errs, ends or is cancelled by etcd (a compacted revision, say) is
/// UNAVAILABLE naming etcd, and the follower resyncs from a fresh read.
pub struct Watch {
    stream: etcd_client::WatchStream,
    urls: Vec<String>,
    what: String,
}

impl Watch {
    /// Opens the watch of `key` (every key under it when `prefix`) from revision `from`.
    pub async fn open(
        etcd: &mut Client,
        urls: &[String],
        what: &str,
        key: String,
        prefix: bool,
        from: i64,
    ) -> Result<Watch> {
        let mut opts = etcd_client::WatchOptions::new().with_start_revision(from);
        if prefix {
            opts = opts.with_prefix();
        }
        let stream = bounded!(urls, what, etcd.watch(key.clone(), Some(opts.clone()))).await?;
        Ok(Watch {
            stream,
            urls: urls.to_vec(),
            what: what.to_string(),
        })
    }

    /// The next response (its events, and its header's revision).
    pub async fn next(&mut self) -> Result<etcd_client::WatchResponse> {
        let (urls, what) = (&self.urls, self.what.as_str());
        let resp = self
            .stream
            .message()
            .await
            .map_err(|e| unavailable(urls, what, e))?
            .ok_or_else(|| unavailable(urls, what, "the watch ended"))?;
        if resp.canceled() {
            return Err(unavailable(
                urls,
                what,
                format!("the watch was cancelled: {}", resp.cancel_reason()),
            ));
        }
        Ok(resp)
    }

    /// The changes of the next response to keys under `prefix` (others are passed over; for
    /// a watch of one key, that key), and the revision its header gives (0 without one).
    pub async fn changes(&mut self, prefix: &str) -> Result<(Vec<Change>, i64)> {
        let resp = self.next().await?;
        let changes = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key.strip_prefix(prefix)?.to_string();
                let value = match ev.event_type() {
                    etcd_client::EventType::Put => Some(kv.value().to_vec()),
                    etcd_client::EventType::Delete => None,
                };
                Some(Change {
                    name,
                    key,
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    value,
                })
            })
            .collect();
        Ok((changes, resp.header().map_or(0, |h| h.revision())))
    }
}

/// One watched key's change ([`Watch::changes`]).
pub struct Change {
    /// The key after the watched prefix.
    pub name: String,
    pub key: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The value put; None: the key was deleted.
    pub value: Option<Vec<u8>>,
}

impl Change {
    /// The value put, decoded (an error names the key); None: the key was deleted.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Option<Result<T>> {
        self.value.as_ref().map(|v| decode(&self.key, v))
    }
}

/// Renews `lease` once: its remaining TTL in seconds, 0 when etcd no longer has it (it
/// expired or was revoked). The etcd client reports a lease etcd answered "not found" (TTL 0)
/// as an error of its own: that is an answer, not a failure.
pub async fn keep_alive(etcd: &mut Client, urls: &[String], what: &str, lease: i64) -> Result<i64> {
    bounded!(urls, what, async {
        match etcd.lease_keep_alive(lease).await {
            Ok((mut keeper, mut answers)) => {
                keeper.keep_alive().await?;
                Ok(answers.message().await?.map_or(0, |a| a.ttl()))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(0),
            Err(e) => Err(e),
        }
    })
    .await
}

/// The catalog: every index with its uid, and the revision the list was read at.
pub async fn list_indexes(
    etcd: &mut Client,
    urls: &[String],
) -> Result<(Vec<(IndexEntry, u64)>, i64)> {
    let resp = bounded!(
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
    let resp = bounded!(urls, "creating the index", etcd.txn(txn.clone())).await?;
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
    let resp = bounded!(urls, "reading the catalog", etcd.get(index_key(name), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let e = serde_json::from_slice::<IndexEntry>(kv.value())
        .map_err(|e| Error::Corrupt(format!("the catalog entry of {name:?} in etcd: {e}")))?;
    Ok(Some((e, kv.create_revision() as u64)))
}

/// Deletes the entry of `name` if it is still incarnation `uid`, with its promotions, desired
/// generation, job lease and refresh record (one transaction); false if it is not.
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
        .and_then([
            TxnOp::delete(key, None),
            TxnOp::delete(promotion_key(name), None),
            TxnOp::delete(active_key(name), None),
            TxnOp::delete(job_key(name), None),
            TxnOp::delete(refresh_key(name), None),
        ]);
    let resp = bounded!(urls, "deleting the index", etcd.txn(txn.clone())).await?;
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
    bounded!(
        urls,
        "registering the node",
        etcd.put(
            node_key(&rec.node_id),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    Ok(())
}

/// Every registered (live) node, in node id order.
pub async fn list_nodes(etcd: &mut Client, urls: &[String]) -> Result<Vec<NodeRecord>> {
    let resp = bounded!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;
    use crate::promotion::{Promotion, HISTORY_CAP};

    fn promotion(i: u64, node: &str) -> Promotion {
        Promotion {
            index: Name::parse("index", "idx").unwrap(),
            trial_id: i,
            config: HnswConfig {
                m: 8,
                ef_construction: 40,
                ef_search: 20,
                seed: Some(i),
            },
            promoted_by: "test".into(),
            note: format!("note {i}"),
            promote_time_ms: 1000 + i,
            recall: 0.9,
            p50_micros: 12.5,
            trial_node: node.into(),
        }
    }

    #[test]
    fn a_promotion_record_round_trips_with_its_uid_and_node() {
        let mut entry = PromotionEntry {
            uid: 77,
            ..Default::default()
        };
        assert_eq!(entry.record.promote(promotion(1, "n1")), 0);
        assert_eq!(entry.record.promote(promotion(2, "n2")), 1);
        let bytes = encode("a promotion record", &entry).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        // The record's fields sit next to the uid (flattened), and the node is kept.
        assert!(
            text.contains("\"uid\":77") && text.contains("\"current\""),
            "{text}"
        );
        assert!(text.contains("\"trial_node\":\"n2\""), "{text}");
        let back: PromotionEntry = decode("k", &bytes).unwrap();
        assert_eq!(back, entry);
        // Not JSON: CORRUPT naming the key.
        let err = decode::<PromotionEntry>("/vectord/v1/promotions/idx", b"{").unwrap_err();
        assert!(matches!(err, Error::Corrupt(ref m) if m.contains("/vectord/v1/promotions/idx")));
    }

    #[test]
    fn a_single_nodes_promotion_has_no_node_field() {
        let text = serde_json::to_string(&promotion(1, "")).unwrap();
        assert!(!text.contains("trial_node"), "{text}");
        let back: Promotion = serde_json::from_str(&text).unwrap();
        assert_eq!(back.trial_node, "");
    }

    #[test]
    fn history_keeps_the_newest_fifty_and_rollback_pops_it() {
        let idx = Name::parse("index", "idx").unwrap();
        let mut rec = Record::default();
        assert!(matches!(rec.rollback(&idx), Err(Error::Precondition(_))));
        for i in 0..60 {
            let depth = rec.promote(promotion(i, "n1"));
            assert_eq!(depth as usize, (i as usize).min(HISTORY_CAP));
        }
        assert_eq!(rec.current.as_ref().map(|p| p.trial_id), Some(59));
        assert_eq!(rec.history.len(), HISTORY_CAP);
        assert_eq!(rec.history[0].trial_id, 58);
        assert_eq!(rec.history[HISTORY_CAP - 1].trial_id, 9);
        let (current, depth) = rec.rollback(&idx).unwrap();
        assert_eq!((current.map(|p| p.trial_id), depth), (Some(58), 49));
        let mut one = Record::default();
        one.promote(promotion(1, "n1"));
        assert_eq!(one.rollback(&idx).unwrap(), (None, 0));
        assert!(one.rollback(&idx).is_err());
    }

    #[test]
    fn desired_generations_and_node_reports_round_trip() {
        let d = Desired {
            uid: 5,
            number: 3,
            config: HnswConfig {
                m: 16,
                ef_construction: 80,
                ef_search: 30,
                seed: None,
            },
            source: ConfigSource::Promoted,
            profile: "serve".into(),
            trial: Some(TrialRef {
                node: "n2".into(),
                id: 9,
            }),
            set_by: "n3".into(),
            set_time_ms: 42,
        };
        let back: Desired = decode("k", &encode("d", &d).unwrap()).unwrap();
        assert_eq!(back, d);
        // A node record written before `generations` existed still reads.
        let old = br#"{"node_id":"n1","advertise_addr":"127.0.0.1:1","start_time_ms":1,"applied":{"a":4}}"#;
        let rec: NodeRecord = decode("k", old).unwrap();
        assert!(rec.generations.is_empty());
        assert_eq!(rec.applied.get("a"), Some(&4));
        let g = NodeGeneration {
            served: 3,
            local: 7,
            error: String::new(),
        };
        let text = serde_json::to_string(&g).unwrap();
        assert!(!text.contains("error"), "{text}");
    }
}
