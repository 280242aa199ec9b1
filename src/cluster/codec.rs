//! The write log's message format: one write (an upsert batch or a delete) per JetStream
//! message, little-endian, versioned by its first byte.
//!
//! ```text
//! upsert: 1 (version) 0 (kind) dimension:u32 count:u32 then count x (id:u64 vector:dimension x f32)
//! delete: 1 (version) 1 (kind) count:u32 then count x id:u64
//! ```
//!
//! Vectors are logged as the node that took the write prepared them (checked, normalised for
//! cosine), so every node applies the same bits.

use crate::error::{Error, Result};
use crate::model::Point;
use crate::store::WriteOp;

const VERSION: u8 = 1;
const UPSERT: u8 = 0;
const DELETE: u8 = 1;

/// The message of one write.
pub fn encode(op: &WriteOp) -> Vec<u8> {
    match op {
        WriteOp::Upsert(points) => {
            let dim = points.first().map_or(0, |p| p.vector.len());
            let mut out = Vec::with_capacity(10 + points.len() * (8 + 4 * dim));
            out.extend_from_slice(&[VERSION, UPSERT]);
            out.extend_from_slice(&(dim as u32).to_le_bytes());
            out.extend_from_slice(&(points.len() as u32).to_le_bytes());
            for p in points {
                out.extend_from_slice(&p.id.to_le_bytes());
                for x in &p.vector {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            out
        }
        WriteOp::Delete(ids) => {
            let mut out = Vec::with_capacity(6 + ids.len() * 8);
            out.extend_from_slice(&[VERSION, DELETE]);
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            out
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.0.len() < N {
            return Err(Error::Corrupt("a write log message ends early".into()));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into()
            .map_err(|_| Error::Corrupt("a write log message ends early".into()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// The write in a message of an index of `dimension`: `Corrupt` for anything malformed (a
/// wrong version, kind, dimension, length, or a non-finite value).
pub fn decode(bytes: &[u8], dimension: u32) -> Result<WriteOp> {
    let mut r = Reader(bytes);
    let [version, kind] = r.take()?;
    if version != VERSION {
        return Err(Error::Corrupt(format!(
            "a write log message of version {version} (this vectord reads {VERSION})"
        )));
    }
    let op = match kind {
        UPSERT => {
            let dim = r.u32()?;
            if dim != dimension {
                return Err(Error::Corrupt(format!(
                    "a logged upsert of dimension {dim} for an index of dimension {dimension}"
                )));
            }
            let count = r.u32()? as usize;
            let each = 8 + 4 * dim as usize;
            if r.0.len() != count.saturating_mul(each) {
                return Err(Error::Corrupt(
                    "a logged upsert whose length does not match its count".into(),
                ));
            }
            let mut points = Vec::with_capacity(count);
            for _ in 0..count {
                let id = r.u64()?;
                let mut vector = Vec::with_capacity(dim as usize);
                for _ in 0..dim {
                    let x = f32::from_le_bytes(r.take()?);
                    if !x.is_finite() {
                        return Err(Error::Corrupt(
                            "a logged upsert with a non-finite value".into(),
                        ));
                    }
                    vector.push(x);
                }
                points.push(Point { id, vector });
            }
            WriteOp::Upsert(points)
        }
        DELETE => {
            let count = r.u32()? as usize;
            if r.0.len() != count.saturating_mul(8) {
                return Err(Error::Corrupt(
                    "a logged delete whose length does not match its count".into(),
                ));
            }
            WriteOp::Delete((0..count).map(|_| r.u64()).collect::<Result<_>>()?)
        }
        k => return Err(Error::Corrupt(format!("a write log message of kind {k}"))),
    };
    if !r.0.is_empty() {
        return Err(Error::Corrupt(
            "a write log message with trailing bytes".into(),
        ));
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_malformed() {
        let up = WriteOp::Upsert(vec![
            Point {
                id: 7,
                vector: vec![1.0, -2.5, 0.0],
            },
            Point {
                id: u64::MAX,
                vector: vec![f32::MIN_POSITIVE, 3.0, 4.0],
            },
        ]);
        let bytes = encode(&up);
        assert_eq!(bytes.len(), 10 + 2 * (8 + 12));
        match decode(&bytes, 3).unwrap() {
            WriteOp::Upsert(p) => {
                assert_eq!(p.len(), 2);
                assert_eq!((p[0].id, p[1].id), (7, u64::MAX));
                assert_eq!(p[0].vector, vec![1.0, -2.5, 0.0]);
                assert_eq!(p[1].vector, vec![f32::MIN_POSITIVE, 3.0, 4.0]);
            }
            WriteOp::Delete(_) => panic!("an upsert decoded as a delete"),
        }
        let del = WriteOp::Delete(vec![1, 2, 99]);
        match decode(&encode(&del), 3).unwrap() {
            WriteOp::Delete(ids) => assert_eq!(ids, vec![1, 2, 99]),
            WriteOp::Upsert(_) => panic!("a delete decoded as an upsert"),
        }
        // Wrong dimension, truncated, trailing bytes, unknown version and kind, NaN.
        assert!(decode(&bytes, 4).is_err());
        assert!(decode(&bytes[..bytes.len() - 1], 3).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long, 3).is_err());
        let mut v = bytes.clone();
        v[0] = 9;
        assert!(decode(&v, 3).is_err());
        let mut k = bytes.clone();
        k[1] = 7;
        assert!(decode(&k, 3).is_err());
        let nan = encode(&WriteOp::Upsert(vec![Point {
            id: 1,
            vector: vec![f32::NAN, 0.0, 0.0],
        }]));
        assert!(decode(&nan, 3).is_err());
        assert!(decode(&[], 3).is_err());
    }
}
