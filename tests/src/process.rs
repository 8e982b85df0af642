//! A child process that is killed and reaped when its guard drops, with its output captured line by line.

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Lines captured from one output stream of a child, shared with a reader thread.
#[derive(Default)]
pub struct LogBuf {
    state: Mutex<LogState>,
    cond: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

impl LogBuf {
    fn push(&self, line: String) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.lines.push(line);
        self.cond.notify_all();
    }

    fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.eof = true;
        self.cond.notify_all();
    }

    /// A copy of every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lines.clone()
    }

    /// The number of lines so far.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lines.len()
    }

    /// Waits until no line came for 30 ms (at most 1 s in all, or until the stream ended). The
    /// binaries write their log from a thread of their own, a moment after each event: a test
    /// that reads the log right after a response lets what was logged by then arrive first.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let seen = st.lines.len();
            let (next, timeout) =
                self.cond.wait_timeout(st, Duration::from_millis(30)).unwrap_or_else(|e| e.into_inner());
            st = next;
            if st.eof || Instant::now() >= deadline || (timeout.timed_out() && st.lines.len() == seen) {
                return;
            }
        }
    }

    /// Whether no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the stream has ended (the process closed it or died).
    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).eof
    }

    /// Waits until a line with index >= `from` satisfies `pred`; returns it. `None` on timeout or when
    /// the stream ends first.
    pub fn wait_for(&self, from: usize, timeout: Duration, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while next < st.lines.len() {
                if pred(&st.lines[next]) {
                    return Some(st.lines[next].clone());
                }
                next += 1;
            }
            if st.eof {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self.cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

fn pump(stream: impl Read + Send + 'static, buf: Arc<LogBuf>, echo: Option<String>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if let Some(prefix) = &echo {
                eprintln!("[{prefix}] {line}");
            }
            buf.push(line);
        }
        buf.close();
    });
}

/// A running child process. Dropping it sends SIGKILL and waits for it, so no test leaves a process
/// behind, also when it panics.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
    /// Lines the child wrote to stdout.
    pub stdout: Arc<LogBuf>,
    /// Lines the child wrote to stderr.
    pub stderr: Arc<LogBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured. Set `WHARF_TEST_ECHO=1` to also
    /// copy the child's output to the test's stderr.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let stdout = Arc::new(LogBuf::default());
        let stderr = Arc::new(LogBuf::default());
        let echo = std::env::var_os("WHARF_TEST_ECHO").is_some();
        if let Some(out) = child.stdout.take() {
            pump(out, stdout.clone(), echo.then(|| format!("{name} out")));
        }
        if let Some(err) = child.stderr.take() {
            pump(err, stderr.clone(), echo.then(|| format!("{name} err")));
        }
        Ok(Self { child: Some(child), name: name.to_string(), stdout, stderr })
    }

    /// Every stdout line that parses as JSON (the JSON log events), once the log settled
    /// ([`LogBuf::settle`]).
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.stdout.settle();
        self.stdout.lines().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Everything the process printed (stdout and stderr), for searching for leaked secrets.
    pub fn all_output(&self) -> String {
        self.stdout.settle();
        let mut s = self.stdout.lines().join("\n");
        s.push('\n');
        s.push_str(&self.stderr.lines().join("\n"));
        s
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited; `Some(status)` once it has.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (via `kill -TERM`) and waits up to `timeout` for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", child.id());
        }
        self.wait_exit(timeout).context("after SIGTERM")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of stdout and stderr (once stdout settled), for error messages and checks.
    pub fn tail(&self, n: usize) -> String {
        self.stdout.settle();
        let tail = |b: &LogBuf| {
            let l = b.lines();
            l[l.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout),
            self.name,
            tail(&self.stderr)
        )
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion with a deadline; kills it when the deadline passes. Returns
/// (status, stdout, stderr).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
    let desc = format!("{cmd:?}");
    let mut guard = ChildGuard::spawn("command", cmd)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = guard.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            guard.kill();
            bail!("{desc} did not finish within {timeout:?}\n{}", guard.tail(30));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The reader threads finish once the pipes close.
    let wait_closed = Instant::now() + Duration::from_secs(5);
    while !(guard.stdout.is_closed() && guard.stderr.is_closed()) && Instant::now() < wait_closed {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((status, guard.stdout.lines().join("\n"), guard.stderr.lines().join("\n")))
}

/// The `fields` object of a JSON log event (tracing-subscriber's JSON format).
pub fn fields(v: &serde_json::Value) -> &serde_json::Value {
    v.get("fields").unwrap_or(v)
}

/// The `fields.message` of a JSON log event.
pub fn message(v: &serde_json::Value) -> Option<&str> {
    fields(v).get("message").and_then(serde_json::Value::as_str)
}

/// Waits for the first `"listening"` event whose `target` starts with `target_prefix`; its `addr`.
pub fn wait_listening(child: &ChildGuard, target_prefix: &str, timeout: Duration) -> Option<std::net::SocketAddr> {
    let mut addr = None;
    child.stdout.wait_for(0, timeout, |l| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { return false };
        let target = v.get("target").and_then(serde_json::Value::as_str).unwrap_or("");
        if message(&v) != Some("listening") || !target.starts_with(target_prefix) {
            return false;
        }
        addr = fields(&v).get("addr").and_then(serde_json::Value::as_str).and_then(|a| a.parse().ok());
        addr.is_some()
    });
    addr
}

/// Waits for `child`'s `"listening"` event (see [`wait_listening`]); when none comes, kills it and
/// fails with `what`, its exit status and the tail of its output.
pub fn expect_listening(
    mut child: ChildGuard,
    target_prefix: &str,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<(ChildGuard, std::net::SocketAddr)> {
    if let Some(addr) = wait_listening(&child, target_prefix, timeout) {
        return Ok((child, addr));
    }
    let exited = child.try_wait();
    let tail = child.tail(40);
    child.kill();
    bail!("{what} logged no JSON \"listening\" event with an addr within {timeout:?} (exit status: {exited:?})\n{tail}")
}
