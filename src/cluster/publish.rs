//! Group publish: the upserts without a `request_id` that reach a node for one index while its
//! previous write-log message is being acknowledged share the next message.
//!
//! The engines are set up so that JetStream fsyncs every message before acknowledging it
//! (`sync_interval: always`): one message per write caps a node at one write per fsync, however
//! many clients write (measured: 537 acknowledged writes/s from 64 writers, against 2,146/s with
//! JetStream's default periodic sync; `cargo bench --bench cluster`). Like the single node's
//! group commit, one message, and so one fsync, then carries every write that arrived meanwhile.
//!
//! Invariants:
//! - Order is arrival order: the writes are concatenated as they were queued, and where two
//!   name the same id the later one wins (as within one call), so applying the message equals
//!   applying them one after another. Only upserts are grouped: a delete's answer counts the
//!   points it removed, which needs a message of its own.
//! - A write with a `request_id` is never grouped: its message carries that id, so JetStream
//!   drops a retried publish (the at-most-once promise of `request_id`).
//! - Every write of a message gets the same answer: its stream sequence once JetStream has
//!   acknowledged the message, or the same error (then none of them is acknowledged).
//! - The queue is bounded ([`PUBLISH_QUEUE`] writes per index): past it a write is refused at
//!   once with RESOURCE_EXHAUSTED, never left waiting without bound. A message holds at most
//!   [`MAX_GROUP_WRITES`] writes and [`MAX_GROUP_BYTES`] (and never more than the NATS server's
//!   `max_payload`); a write larger than that alone goes alone (and is refused by the log if it
//!   is over `max_payload`, as before).
//! - One publisher task per index on a node, spawned on the server's `Tasks` on its first
//!   grouped write; it ends when the node stops or the index's replica is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::Point;
use crate::store::WriteOp;
use crate::tasks::Tasks;

use super::log::WriteLog;

/// Writes waiting for a message, per index on a node.
pub const PUBLISH_QUEUE: usize = 4096;
/// Most writes one message carries.
pub const MAX_GROUP_WRITES: usize = 1024;
/// Most bytes of points one grouped message carries.
pub const MAX_GROUP_BYTES: usize = 8 << 20;

struct Pending {
    points: Vec<Point>,
    bytes: usize,
    reply: oneshot::Sender<Result<u64>>,
}

/// The node's publisher tasks, by index uid.
pub struct Publishers {
    log: Arc<WriteLog>,
    node_id: String,
    tasks: Tasks,
    stop: CancellationToken,
    queues: Mutex<HashMap<u64, (mpsc::Sender<Pending>, CancellationToken)>>,
}

impl Publishers {
    pub fn new(log: Arc<WriteLog>, node_id: String, tasks: Tasks, stop: CancellationToken) -> Self {
        Publishers {
            log,
            node_id,
            tasks,
            stop,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Logs an upsert of `points` (checked and deduplicated already) in the next message of
    /// index `uid`'s log: its stream sequence once JetStream has acknowledged that message.
    pub async fn upsert(&self, uid: u64, points: Vec<Point>) -> Result<u64> {
        let bytes = points.iter().map(|p| 8 + 4 * p.vector.len()).sum::<usize>();
        let (reply, answer) = oneshot::channel();
        let queue = self.queue(uid);
        queue
            .try_send(Pending {
                points,
                bytes,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Limit(format!(
                    "{PUBLISH_QUEUE} writes of this index are already waiting for the write log on this node: retry shortly, or write to another node"
                )),
                mpsc::error::TrySendError::Closed(_) => stopping(),
            })?;
        answer.await.map_err(|_| stopping())?
    }

    /// Stops index `uid`'s publisher (its replica was dropped); writes still queued are
    /// answered UNAVAILABLE.
    pub fn forget(&self, uid: u64) {
        if let Some((_, cancel)) = self.queues.lock().remove(&uid) {
            cancel.cancel();
        }
    }

    fn queue(&self, uid: u64) -> mpsc::Sender<Pending> {
        let mut queues = self.queues.lock();
        if let Some((tx, _)) = queues.get(&uid).filter(|(tx, _)| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let cancel = self.stop.child_token();
        queues.insert(uid, (tx.clone(), cancel.clone()));
        self.tasks
            .spawn(run(self.log.clone(), self.node_id.clone(), uid, rx, cancel));
        tx
    }
}

fn stopping() -> Error {
    Error::Unavailable(
        "the node stopped publishing this index's writes (it is stopping, or the index was dropped): retry, or write to another node".into(),
    )
}

/// One index's publisher: takes what is queued, publishes it as one message, answers every
/// write in it, again.
async fn run(
    log: Arc<WriteLog>,
    node_id: String,
    uid: u64,
    mut queue: mpsc::Receiver<Pending>,
    stop: CancellationToken,
) {
    let limit = MAX_GROUP_BYTES.min(log.max_payload().unwrap_or(usize::MAX) / 2);
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = stop.cancelled() => return,
                p = queue.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
            },
        };
        let mut bytes = first.bytes;
        let mut group = vec![first];
        while group.len() < MAX_GROUP_WRITES {
            match queue.try_recv() {
                Ok(p) if bytes + p.bytes <= limit => {
                    bytes += p.bytes;
                    group.push(p);
                }
                Ok(p) => {
                    carried = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        let (points, replies) = merge(group);
        let msg_id = format!("{node_id}-{:032x}", rand::random::<u128>());
        let op = WriteOp::Upsert(points);
        let outcome = tokio::select! {
            _ = stop.cancelled() => Err(stopping()),
            r = log.publish(uid, &op, &msg_id) => r.map(|(seq, _)| seq),
        };
        for reply in replies {
            let _ = reply.send(outcome.clone());
        }
    }
}

/// The points of a group as one upsert (arrival order, the later of two writes of an id
/// winning) and the writers to answer.
fn merge(group: Vec<Pending>) -> (Vec<Point>, Vec<oneshot::Sender<Result<u64>>>) {
    let mut replies = Vec::with_capacity(group.len());
    let mut points = Vec::with_capacity(group.iter().map(|p| p.points.len()).sum());
    for p in group {
        points.extend(p.points);
        replies.push(p.reply);
    }
    if replies.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(points.len());
        points.reverse();
        points.retain(|p| seen.insert(p.id));
        points.reverse();
    }
    (points, replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(ids: &[(u64, f32)]) -> (Pending, oneshot::Receiver<Result<u64>>) {
        let (reply, rx) = oneshot::channel();
        let points: Vec<Point> = ids
            .iter()
            .map(|&(id, x)| Point {
                id,
                vector: vec![x, 0.0],
            })
            .collect();
        (
            Pending {
                bytes: points.len() * 16,
                points,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn a_merged_group_keeps_arrival_order_and_the_later_write_of_an_id() {
        let (a, _ra) = pending(&[(1, 1.0), (2, 1.0)]);
        let (b, _rb) = pending(&[(3, 2.0), (1, 2.0)]);
        let (c, _rc) = pending(&[(2, 3.0)]);
        let (points, replies) = merge(vec![a, b, c]);
        assert_eq!(replies.len(), 3);
        let got: Vec<(u64, f32)> = points.iter().map(|p| (p.id, p.vector[0])).collect();
        // id 1's later write (b's) and id 2's later write (c's) win, in their arrival places.
        assert_eq!(got, vec![(3, 2.0), (1, 2.0), (2, 3.0)]);
    }
}
