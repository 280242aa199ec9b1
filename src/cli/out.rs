//! Writing to stdout: lines, JSON lines and aligned tables. A closed stdout (e.g. `| head`) is
//! not an error.

use std::io::Write;

pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

pub fn json(v: &serde_json::Value) {
    line(&v.to_string());
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            s.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(c.chars().count()),
            ));
        }
        s.trim_end().to_string()
    };
    line(&fmt(&mut headers.iter().copied()));
    for r in rows {
        line(&fmt(&mut r.iter().map(String::as_str)));
    }
}

/// `m 16, ef_construction 200, ef_search 64[, seed 42]`, or `-` when unset.
pub fn config(c: &Option<vectord::pb::HnswConfig>) -> String {
    match c {
        None => "-".into(),
        Some(c) => {
            let mut s = format!(
                "m {}, ef_construction {}, ef_search {}",
                c.m, c.ef_construction, c.ef_search
            );
            if let Some(seed) = c.seed {
                s.push_str(&format!(", seed {seed}"));
            }
            s
        }
    }
}

/// `16/200/64` (m/ef_construction/ef_search), or `-`.
pub fn config_short(c: &Option<vectord::pb::HnswConfig>) -> String {
    c.as_ref().map_or("-".into(), |c| {
        format!("{}/{}/{}", c.m, c.ef_construction, c.ef_search)
    })
}

pub fn timestamp(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map_or("-".into(), |t| t.to_string())
}

/// Metric enum value as the short lower-case name the flags use.
pub fn metric(m: i32) -> String {
    super::json::metric_name(m)
        .trim_start_matches("METRIC_")
        .to_ascii_lowercase()
}
