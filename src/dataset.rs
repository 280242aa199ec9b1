//! Reading vector files: fvecs (TEXMEX: per vector a little-endian i32 dimension, then that
//! many little-endian f32 values, no header). Used by the benchmarks.

use std::path::Path;

use crate::error::{Error, Result};

/// Reads up to `limit` vectors (all when None); returns (dimension, vectors). A malformed file
/// fails naming the vector number.
pub fn read_fvecs(path: &Path, limit: Option<usize>) -> Result<(u32, Vec<Vec<f32>>)> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("reading {}: {e}", path.display())))?;
    let bad = |msg: String| Error::invalid(format!("{}: {msg}", path.display()));
    let mut vectors = Vec::new();
    let mut dimension: Option<usize> = None;
    let mut rest = bytes.as_slice();
    while !rest.is_empty() && limit.is_none_or(|n| vectors.len() < n) {
        let (head, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
            bad(format!(
                "vector {}: truncated dimension header",
                vectors.len()
            ))
        })?;
        let d = i32::from_le_bytes(*head);
        let d = usize::try_from(d)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| bad(format!("vector {}: bad dimension {d}", vectors.len())))?;
        if let Some(first) = dimension.filter(|first| *first != d) {
            return Err(bad(format!(
                "vector {} has dimension {d}, not {first}",
                vectors.len()
            )));
        }
        dimension = Some(d);
        if tail.len() < d * 4 {
            return Err(bad(format!("vector {} is truncated", vectors.len())));
        }
        let (body, tail) = tail.split_at(d * 4);
        vectors.push(
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
        rest = tail;
    }
    let dimension = dimension.ok_or_else(|| bad("no vectors".into()))?;
    Ok((dimension as u32, vectors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.fvecs");
        let mut bytes = Vec::new();
        for v in [[1.0f32, 2.0], [3.0, 4.0]] {
            bytes.extend_from_slice(&2i32.to_le_bytes());
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        std::fs::write(&p, &bytes).unwrap();
        let (d, v) = read_fvecs(&p, None).unwrap();
        assert_eq!((d, v), (2, vec![vec![1.0, 2.0], vec![3.0, 4.0]]));
        assert_eq!(read_fvecs(&p, Some(1)).unwrap().1.len(), 1);
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = read_fvecs(&p, None).unwrap_err().to_string();
        assert!(e.contains("vector 1 is truncated"), "{e}");
    }
}
