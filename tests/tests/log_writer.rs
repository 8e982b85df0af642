//! Request logs off the request path: a node whose stdout nobody reads (a stuck pipe, a full disk,
//! a slow terminal) goes on answering; the lines it could not queue are counted in
//! `wharf_log_lines_dropped_total` and said in the log once it is read again.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use wharf_tests::control::free_port;
use wharf_tests::proxy::{proxy_bin, repo_config};
use wharf_tests::wait_until_async;

/// Kills the node when the test ends, also when it fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_nobody_reads_keeps_serving_and_counts_what_it_dropped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("wharf.toml"), repo_config("lab", "http://127.0.0.1:9", "generic", "5m"))?;
    let port = free_port()?;
    let mut node = Killed(
        Command::new(proxy_bin()?)
            .arg("--config")
            .arg(dir.path().join("wharf.toml"))
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--log-level", "debug", "--log-queue-lines", "64"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?;
    wait_until_async(Duration::from_secs(30), "the node to answer", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .await?;

    // The pipe (64 KiB) fills after a few hundred lines; a writer on the request path would now hold
    // every request. Each of these must be answered within its 5 s timeout.
    for i in 0..2_000 {
        let r = client.get(format!("{base}/v2/")).send().await;
        let status = r.map(|r| r.status().as_u16()).map_err(|e| anyhow::anyhow!("request {i}: {e}"))?;
        assert_eq!(status, 200, "request {i}");
    }
    let dropped = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("wharf_log_lines_dropped_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut counted = 0.0;
    for _ in 0..100 {
        let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
        counted = dropped(&text);
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted > 0.0, "no dropped line counted while nobody read the log");

    // Read again: the count is said in the log itself.
    let mut stdout = node.0.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !seen.contains("log lines dropped") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no line about dropped log lines once the log was read again");
        if let Ok(chunk) = rx.recv_timeout(left) {
            seen.push_str(&chunk);
        }
    }
    Ok(())
}
