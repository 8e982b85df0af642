//! The `regctl` binary, run as an operator would: arguments, environment, standard input; its exit
//! code, stdout and stderr captured whole. And golden files under `tests/golden/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The path of `regctl` (`$REGCTL_BIN` overrides), next to the running test executable.
pub fn regctl_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("REGCTL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no grandparent folder")?;
    let bin = profile_dir.join("regctl");
    if !bin.exists() {
        bail!("{} does not exist: run `cargo build --bins` first (or set REGCTL_BIN)", bin.display());
    }
    Ok(bin)
}

/// What one run printed and returned.
#[derive(Debug, Clone)]
pub struct Out {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// stdout as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self:?}"))
    }

    /// Fails unless the exit code is `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> anyhow::Result<&Self> {
        if self.code != code {
            bail!(
                "{what}: expected exit code {code}, got {}\nstdout:\n{}\nstderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Fails unless it exited 1 with exactly one line on stderr, `regctl: error: ...` containing
    /// `contains`.
    pub fn expect_error(&self, contains: &str, what: &str) -> anyhow::Result<&Self> {
        self.expect_code(1, what)?;
        let lines: Vec<&str> = self.stderr.lines().collect();
        if lines.len() != 1 || !lines[0].starts_with("regctl: error: ") || !lines[0].contains(contains) {
            bail!("{what}: expected one stderr line `regctl: error: ...{contains}...`, got:\n{}", self.stderr);
        }
        Ok(self)
    }
}

/// A way to run `regctl` against one control plane (`--server` given through `WHARF_SERVER`).
#[derive(Clone, Debug, Default)]
pub struct Regctl {
    pub server: Option<String>,
    pub env: Vec<(String, String)>,
}

impl Regctl {
    /// `regctl` talking to `server`.
    pub fn new(server: &str) -> Self {
        Self { server: Some(server.to_owned()), env: Vec::new() }
    }

    /// With an extra environment variable.
    pub fn with_env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Runs `regctl args...` with nothing on standard input.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<Out> {
        self.run_with_stdin(args, None).await
    }

    /// Runs `regctl args...`, writing `stdin` (then closing it) when given.
    pub async fn run_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Out> {
        let bin = regctl_bin()?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WHARF_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_PROXY", "*").env_remove("RUST_LOG");
        if let Some(s) = &self.server {
            cmd.env("WHARF_SERVER", s);
        }
        cmd.env("WHARF_TOKEN", crate::control::admin_token());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data).await?;
            drop(pipe);
        }
        let mut out_pipe = child.stdout.take().context("no stdout pipe")?;
        let mut err_pipe = child.stderr.take().context("no stderr pipe")?;
        let run = async {
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let (r1, r2, status) =
                tokio::join!(out_pipe.read_to_end(&mut o), err_pipe.read_to_end(&mut e), child.wait());
            r1?;
            r2?;
            anyhow::Ok((status?, o, e))
        };
        let (status, o, e) = tokio::time::timeout(RUN_TIMEOUT, run)
            .await
            .with_context(|| format!("regctl {args:?} did not finish within {RUN_TIMEOUT:?}"))??;
        Ok(Out {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o).into_owned(),
            stderr: String::from_utf8_lossy(&e).into_owned(),
        })
    }
}

/// `tests/golden/<name>`.
pub fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(name)
}

/// Compares `actual` with the golden file `name`; with `UPDATE_GOLDEN=1` writes it instead.
pub fn assert_golden(name: &str, actual: &str) -> anyhow::Result<()> {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().context("golden dir")?)?;
        std::fs::write(&path, actual)?;
        return Ok(());
    }
    let want = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (UPDATE_GOLDEN=1 writes it)", path.display()))?;
    if want != actual {
        bail!("{} differs (UPDATE_GOLDEN=1 rewrites it)\n--- want\n{want}--- got\n{actual}---", path.display());
    }
    Ok(())
}

/// Replaces RFC 3339 timestamps (`2026-11-29T01:56:48Z`) with a placeholder of the same width.
pub fn mask_timestamps(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let is_ts = |w: &[u8]| {
        w.len() == 20
            && w.iter().enumerate().all(|(j, c)| match j {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            })
    };
    while i < b.len() {
        if i + 20 <= b.len() && is_ts(&b[i..i + 20]) {
            out.push_str("YYYY-MM-DDTHH:MM:SSZ");
            i += 20;
        } else {
            let ch = s[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// A table with its dynamic numbers masked: cells (split on runs of 2+ spaces) joined with ` | `,
/// every run of digits replaced by `#`.
pub fn squash_table(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        let cells: Vec<String> = line
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                let mut m = String::new();
                let mut in_digits = false;
                for ch in c.chars() {
                    if ch.is_ascii_digit() {
                        if !in_digits {
                            m.push('#');
                        }
                        in_digits = true;
                    } else {
                        m.push(ch);
                        in_digits = false;
                    }
                }
                m
            })
            .collect();
        out.push_str(&cells.join(" | "));
        out.push('\n');
    }
    out
}

/// Checks that every row of a table starts its columns where the header does.
pub fn expect_aligned(table: &str) -> anyhow::Result<()> {
    let mut lines = table.lines();
    let header = lines.next().context("empty table")?;
    let starts = |l: &str| -> Vec<usize> {
        let b = l.as_bytes();
        (0..b.len()).filter(|&i| b[i] != b' ' && (i == 0 || (i >= 3 && &b[i - 3..i] == b"   "))).collect()
    };
    let hs = starts(header);
    for l in lines {
        if l.trim().is_empty() {
            break;
        }
        let ls = starts(l);
        if !ls.iter().all(|s| hs.contains(s)) {
            bail!("row is not aligned with the header:\n{header}\n{l}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_squashes() {
        assert_eq!(mask_timestamps("at 2026-11-29T01:56:48Z."), "at YYYY-MM-DDTHH:MM:SSZ.");
        assert_eq!(squash_table("ID   ADDRESS\nn1   127.0.0.1:40000\n"), "ID | ADDRESS\nn# | #.#.#.#:#\n");
        assert!(expect_aligned("A    B\nxx   y\n").is_ok());
        assert!(expect_aligned("A    B\nxxx   y\n").is_err());
    }
}
