//! Reading points to import: fvecs, npy (2-D little-endian float32, C order) and JSONL
//! (`{"id": <u64>, "vector": [..]}` per line, id optional). A whole file is read and checked
//! against the index before anything is sent; errors name the line (JSONL, 1-based) or the
//! vector (fvecs and npy, 0-based).

use std::path::Path;

use vectord::pb;

use super::error::CliError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Fvecs,
    Npy,
    Jsonl,
}

impl Format {
    /// The format named by the file's extension.
    pub fn detect(path: &Path) -> Result<Format, CliError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("fvecs") => Ok(Format::Fvecs),
            Some("npy") => Ok(Format::Npy),
            Some("jsonl") | Some("ndjson") => Ok(Format::Jsonl),
            _ => Err(CliError::invalid(format!(
                "{}: cannot tell the format from the extension (.fvecs, .npy, .jsonl); pass --format",
                path.display()
            ))),
        }
    }
}

/// What every vector must satisfy to be accepted by the index.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub dimension: u32,
    /// A cosine index refuses zero vectors.
    pub cosine: bool,
}

/// Reads and checks every point of the file. Points without an id in the file get
/// `start_id` + their record number (0-based).
pub fn read_points(
    path: &Path,
    format: Format,
    start_id: u64,
    expect: Option<Expect>,
) -> Result<Vec<pb::Point>, CliError> {
    let bad = |msg: String| CliError::invalid(format!("{}: {msg}", path.display()));
    // (where, id from the file, vector)
    let records: Vec<(String, Option<u64>, Vec<f32>)> = match format {
        Format::Fvecs => vectord::dataset::read_fvecs(path, None)
            .map_err(|e| CliError::invalid(e.to_string()))?
            .1
            .into_iter()
            .enumerate()
            .map(|(n, v)| (format!("vector {n}"), None, v))
            .collect(),
        Format::Npy => parse_npy(&read(path)?)
            .map_err(bad)?
            .into_iter()
            .enumerate()
            .map(|(n, v)| (format!("vector {n}"), None, v))
            .collect(),
        Format::Jsonl => {
            let text =
                String::from_utf8(read(path)?).map_err(|e| bad(format!("not UTF-8: {e}")))?;
            parse_jsonl(&text).map_err(bad)?
        }
    };
    if records.is_empty() {
        return Err(bad("no vectors".into()));
    }
    let mut points = Vec::with_capacity(records.len());
    for (n, (at, id, vector)) in records.into_iter().enumerate() {
        let id = match id {
            Some(id) => id,
            None => start_id
                .checked_add(n as u64)
                .ok_or_else(|| bad(format!("{at}: --start-id {start_id} + {n} overflows u64")))?,
        };
        if let Some(e) = expect {
            check(&vector, e).map_err(|msg| bad(format!("{at} (id {id}): {msg}")))?;
        }
        points.push(pb::Point { id, vector });
    }
    Ok(points)
}

fn check(v: &[f32], e: Expect) -> Result<(), String> {
    if v.len() != e.dimension as usize {
        return Err(format!(
            "{} values, but the index has dimension {}",
            v.len(),
            e.dimension
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("value {i} is not finite"));
    }
    if e.cosine && v.iter().all(|x| *x == 0.0) {
        return Err("a zero vector cannot be stored in a cosine index".into());
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::invalid(format!("reading {}: {e}", path.display())))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPoint {
    id: Option<u64>,
    vector: Vec<f32>,
}

type Record = (String, Option<u64>, Vec<f32>);

fn parse_jsonl(text: &str) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let p: JsonPoint = serde_json::from_str(line).map_err(|e| {
            // serde_json appends " at line 1 column C"; the line is ours, the column is its.
            let text = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let what = text.strip_suffix(&suffix).unwrap_or(&text);
            format!("{at}, column {}: {what}", e.column())
        })?;
        out.push((at, p.id, p.vector));
    }
    Ok(out)
}

/// Parses a .npy file: magic `\x93NUMPY`, version 1.x (u16 header length) or 2.x/3.x (u32),
/// a Python dict header with 'descr': '<f4', 'fortran_order': False and a 2-D 'shape', then
/// the float32 values.
pub fn parse_npy(bytes: &[u8]) -> Result<Vec<Vec<f32>>, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not a .npy file (no \\x93NUMPY magic)")?;
    let (&[major, _minor], rest) = rest
        .split_first_chunk::<2>()
        .ok_or("truncated .npy header")?;
    let (header_len, rest) = match major {
        1 => {
            let (len, rest) = rest
                .split_first_chunk::<2>()
                .ok_or("truncated .npy header")?;
            (u16::from_le_bytes(*len) as usize, rest)
        }
        2 | 3 => {
            let (len, rest) = rest
                .split_first_chunk::<4>()
                .ok_or("truncated .npy header")?;
            (u32::from_le_bytes(*len) as usize, rest)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    if rest.len() < header_len {
        return Err("truncated .npy header".into());
    }
    let (header, data) = rest.split_at(header_len);
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let descr = dict_value(header, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if descr != "<f4" {
        return Err(format!(
            "dtype {descr:?} is not supported: only little-endian float32 ('<f4')"
        ));
    }
    match dict_value(header, "fortran_order")? {
        "False" => {}
        "True" => return Err("fortran_order True is not supported: save in C order".into()),
        v => return Err(format!("bad fortran_order {v:?}")),
    }
    let shape = dict_value(header, "shape")?;
    let dims: Vec<usize> = shape
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape}")))
        .collect::<Result<_, _>>()?;
    let [n, d] = dims[..] else {
        return Err(format!("shape {shape} is not 2-D (n, d)"));
    };
    if d == 0 {
        return Err(format!("shape {shape}: dimension 0"));
    }
    let expected = n
        .checked_mul(d)
        .and_then(|x| x.checked_mul(4))
        .ok_or_else(|| format!("shape {shape} is too large"))?;
    if data.len() != expected {
        return Err(format!(
            "shape {shape} needs {expected} bytes of data, the file has {}",
            data.len()
        ));
    }
    Ok(data
        .chunks_exact(d * 4)
        .map(|row| {
            row.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect())
}

/// The raw text of `key`'s value in a Python dict literal (a quoted string, a tuple, or a word).
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str, String> {
    let missing = || format!("the .npy header has no '{key}'");
    let start = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))
        .ok_or_else(missing)?;
    let after = &header[start + key.len() + 2..];
    let after = after
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(missing)?
        .trim_start();
    let end = if after.starts_with('(') {
        after.find(')').map(|i| i + 1)
    } else if let Some(q @ ('\'' | '"')) = after.chars().next() {
        after[1..].find(q).map(|i| i + 2)
    } else {
        after.find([',', '}'])
    }
    .ok_or_else(|| format!("bad '{key}' in the .npy header"))?;
    Ok(after[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(dict: &str, data: &[f32]) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    #[test]
    fn npy_parses_and_rejects() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n";
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rows = parse_npy(&npy(ok, &data)).unwrap();
        assert_eq!(rows, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
        let e = parse_npy(&npy(&ok.replace("<f4", "<f8"), &data)).unwrap_err();
        assert!(e.contains("float32"), "{e}");
        let e = parse_npy(&npy(&ok.replace("False", "True"), &data)).unwrap_err();
        assert!(e.contains("fortran_order"), "{e}");
        let e = parse_npy(&npy(&ok.replace("(2, 3)", "(6,)"), &data)).unwrap_err();
        assert!(e.contains("2-D"), "{e}");
        let e = parse_npy(&npy(ok, &data[..5])).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        assert!(parse_npy(b"nope").is_err());
    }

    #[test]
    fn jsonl_names_the_line() {
        let recs =
            parse_jsonl("{\"id\": 5, \"vector\": [1, 2]}\n\n{\"vector\": [3, 4]}\n").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].0, "line 3");
        let e = parse_jsonl("{\"vector\": [1]}\n{\"vector\": [1]}\n{oops\n").unwrap_err();
        assert!(e.starts_with("line 3, column 2:"), "{e}");
    }
}
