//! Printing: aligned tables for people, JSON and YAML of the full objects for scripts.

use std::io::Write;

use serde::Serialize;

use crate::args::Output;
use crate::error::CliError;

/// A plain table: columns separated by three spaces, padded to the widest cell, no trailing spaces.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|s| (*s).to_owned()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("   ");
                }
                line.push_str(c);
                if i + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key/value lines for one object: `key:   value`.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let label = format!("{k}:");
        out.push_str(format!("{label:<w$}   {v}").trim_end());
        out.push('\n');
    }
    out
}

/// Writes `s` to stdout.
pub fn print(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes()).and_then(|()| out.flush()).map_err(|e| CliError::Output(e.to_string()))
}

/// Prints `value` as JSON or YAML, or `table()` for the table format.
pub fn emit<T: Serialize>(format: Output, value: &T, table: impl FnOnce() -> String) -> Result<(), CliError> {
    let text = match format {
        Output::Table => table(),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?;
            s.push('\n');
            s
        }
        Output::Yaml => serde_norway::to_string(value).map_err(|e| CliError::Output(e.to_string()))?,
    };
    print(&text)
}

/// `1.5 MiB`, `300 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// RFC 3339 in UTC, to the second.
pub fn timestamp(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.seconds > 0 => {
            let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.seconds as u64);
            humantime::format_rfc3339_seconds(st).to_string()
        }
        _ => String::new(),
    }
}

/// `10m`, `1h 30m`: a duration as the REST API writes it.
pub fn duration(d: Option<&prost_types::Duration>) -> String {
    let d = d.map_or(std::time::Duration::ZERO, |d| {
        std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
    });
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_without_trailing_spaces() {
        let mut t = Table::new(&["KEY", "KIND", "NOTE"]);
        t.row(vec!["dockerhub".into(), "x".into(), String::new()]);
        t.row(vec!["a".into(), "generic".into(), "n".into()]);
        assert_eq!(t.render(), "KEY         KIND      NOTE\ndockerhub   x\na           generic   n\n");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn fields_align() {
        assert_eq!(fields(&[("key", "a".into()), ("upstream", String::new())]), "key:        a\nupstream:\n");
    }
}
