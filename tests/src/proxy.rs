//! The real `wharf-proxy` binary, started on 127.0.0.1:0 with its JSON log captured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{ChildGuard, LogBuf, expect_listening, fields, message};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// The standalone TOML configuration.
    pub config_toml: String,
    /// Extra command-line arguments (e.g. `--idle-timeout 1s`).
    pub args: Vec<String>,
    /// Extra environment variables (e.g. for `password_env`).
    pub env: Vec<(String, String)>,
    /// The cache dir; a fresh temp dir when `None`.
    pub cache_dir: Option<PathBuf>,
}

impl ProxyOptions {
    /// Options with `config_toml` and `args`, everything else default.
    pub fn new(config_toml: &str, args: &[&str]) -> Self {
        Self {
            config_toml: config_toml.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// A running `wharf-proxy`. Killed (SIGKILL) and reaped when dropped.
pub struct Proxy {
    child: ChildGuard,
    addr: SocketAddr,
    opts: ProxyOptions,
    cache_dir: PathBuf,
    work_dir: TempDir,
    _cache_tmp: Option<TempDir>,
}

/// The path of the `wharf-proxy` binary: `$WHARF_PROXY_BIN`, or `target/<profile>/wharf-proxy` next to
/// the running test executable (`target/<profile>/deps/<test>`).
pub fn proxy_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WHARF_PROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no grandparent folder")?;
    let bin = profile_dir.join("wharf-proxy");
    if !bin.exists() {
        bail!("{} does not exist: run `cargo build --bins` first (or set WHARF_PROXY_BIN)", bin.display());
    }
    Ok(bin)
}

impl Proxy {
    /// Starts `wharf-proxy` with `config_toml`, a fresh cache dir and `extra_args`.
    pub fn spawn(config_toml: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with(ProxyOptions::new(config_toml, extra_args))
    }

    /// Starts `wharf-proxy` with `opts`.
    pub fn spawn_with(opts: ProxyOptions) -> anyhow::Result<Self> {
        let work_dir = tempfile::Builder::new().prefix("wharf-proxy-").tempdir()?;
        std::fs::write(work_dir.path().join("config.toml"), &opts.config_toml)?;
        std::fs::create_dir_all(work_dir.path().join("cwd"))?;
        let (cache_dir, cache_tmp) = match &opts.cache_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("wharf-cache-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let (child, addr) = start(&opts, work_dir.path(), &cache_dir)?;
        Ok(Self { child, addr, opts, cache_dir, work_dir, _cache_tmp: cache_tmp })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/v2/<path>`.
    pub fn v2(&self, path: &str) -> String {
        format!("http://{}/v2/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The cache dir.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The process's working directory (empty at start).
    pub fn cwd(&self) -> PathBuf {
        self.work_dir.path().join("cwd")
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill_9(&mut self) {
        self.child.kill();
    }

    /// SIGTERM, and wait up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.child.terminate(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.child.wait_exit(timeout)
    }

    /// Kills the process if it runs, then starts it again with the same configuration, arguments and
    /// cache dir (on a new port).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill();
        let (child, addr) = start(&self.opts, self.work_dir.path(), &self.cache_dir)?;
        self.child = child;
        self.addr = addr;
        Ok(())
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none() && self.child.id().is_some()
    }

    /// With `--mirror-listen 127.0.0.1:0`: the mirror-only port (its `"listening as a mirror only"`
    /// event of the current run).
    pub fn mirror_addr(&self) -> anyhow::Result<SocketAddr> {
        let mut addr = None;
        self.child.stdout.wait_for(0, START_TIMEOUT, |l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else { return false };
            if message(&v) != Some("listening as a mirror only") {
                return false;
            }
            addr = fields(&v).get("addr").and_then(Value::as_str).and_then(|a| a.parse().ok());
            addr.is_some()
        });
        addr.with_context(|| format!("no mirror-only port in the log\n{}", self.child.tail(30)))
    }

    /// The raw stdout lines so far.
    pub fn stdout(&self) -> &LogBuf {
        &self.child.stdout
    }

    /// Everything the process printed (stdout and stderr), for searching for leaked secrets.
    pub fn all_output(&self) -> String {
        self.child.all_output()
    }

    /// Every stdout line that parses as JSON.
    pub fn logs(&self) -> Vec<Value> {
        self.child.json_logs()
    }

    /// Waits until a stdout line contains `text` (log lines are written by a thread of their own,
    /// a moment after the event); returns it.
    pub fn wait_log_line(&self, timeout: Duration, text: &str) -> anyhow::Result<String> {
        self.child
            .stdout
            .wait_for(0, timeout, |l| l.contains(text))
            .ok_or_else(|| anyhow::anyhow!("no log line with {text:?} within {timeout:?}:\n{}", self.log_tail(30)))
    }

    /// The per-request log events (`fields.message == "request"`), as their `fields` objects.
    pub fn request_logs(&self) -> Vec<Value> {
        self.logs().iter().filter(|v| message(v) == Some("request")).map(|v| fields(v).clone()).collect()
    }

    /// Waits until a request log event's fields satisfy `pred`; returns those fields.
    pub fn wait_request_log(&self, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> anyhow::Result<Value> {
        let line = self.child.stdout.wait_for(0, timeout, |l| {
            serde_json::from_str::<Value>(l).ok().is_some_and(|v| message(&v) == Some("request") && pred(fields(&v)))
        });
        match line {
            Some(l) => Ok(fields(&serde_json::from_str(&l)?).clone()),
            None => bail!(
                "no matching request log line within {timeout:?}; request lines:\n{}",
                self.request_logs().iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
            ),
        }
    }

    /// Files in `<cache>/staging`.
    pub fn staging_files(&self) -> Vec<PathBuf> {
        crate::files_under(&self.cache_dir.join("staging"))
    }

    /// The cached file of a blob, if any: a file below `<cache>/blobs` named by the digest's hex.
    pub fn cached_blob(&self, digest: &str) -> Option<PathBuf> {
        cached_file(&self.cache_dir.join("blobs"), digest)
    }

    /// The cached file of a manifest, if any.
    pub fn cached_manifest(&self, digest: &str) -> Option<PathBuf> {
        cached_file(&self.cache_dir.join("manifests"), digest)
    }

    /// Process output tail, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.tail(n)
    }
}

fn cached_file(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    crate::files_under(dir).into_iter().find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == hex))
}

fn start(opts: &ProxyOptions, work_dir: &Path, cache_dir: &Path) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let bin = proxy_bin()?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(work_dir.join("config.toml"))
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(if opts.args.iter().any(|a| a == "--log-level") { &[][..] } else { &["--log-level", "debug"][..] })
        .args(&opts.args)
        .current_dir(work_dir.join("cwd"))
        .env_remove("RUST_LOG")
        .env("NO_PROXY", "*");
    // Settings from the environment (WHARF_LISTEN, ...) must not leak into the test's node.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WHARF_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child = ChildGuard::spawn("wharf-proxy", &mut cmd)?;
    expect_listening(child, "wharf_proxy", START_TIMEOUT, &format!("wharf-proxy ({})", bin.display()))
}

/// A standalone config with one repo.
pub fn repo_config(key: &str, upstream: &str, kind: &str, tag_ttl: &str) -> String {
    format!("[[repo]]\nkey = \"{key}\"\nupstream = \"{upstream}\"\nkind = \"{kind}\"\ntag_ttl = \"{tag_ttl}\"\n")
}
