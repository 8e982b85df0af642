//! Connection-level limits of a node: slow headers are cut off, oversized heads get 431, the
//! connection cap closes extra connections, and upstream fetches beyond the cap wait their turn.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use wharf_tests::http::get;
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy};

/// Reads until the server closes the connection (or `limit` passes); what it sent.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--header-read-timeout", "500ms"])?;
    let mut s = TcpStream::connect(proxy.addr())?;
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")?; // never finishes its head
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(closed, "a client that never finished its headers kept its connection");
    assert!(started.elapsed() < Duration::from_secs(5), "cut off after {:?}", started.elapsed());
    // The node still serves others.
    assert_eq!(get(&format!("{}/v2/", proxy.url()), &[]).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--max-header-bytes", "16384"])?;
    let mut s = TcpStream::connect(proxy.addr())?;
    let big = "a".repeat(64 * 1024);
    let _ = s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    let head = String::from_utf8_lossy(&resp);
    assert!(head.starts_with("HTTP/1.1 431"), "expected 431, got {:?}", head.lines().next());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--max-connections", "2"])?;
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(proxy.addr())).collect::<Result<_, _>>()?;
    // The two held connections are accepted (they answer); a third is closed without an answer.
    for mut h in &held {
        h.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = [0u8; 12];
        h.set_read_timeout(Some(Duration::from_secs(10)))?;
        h.read_exact(&mut buf)?;
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    let mut third = TcpStream::connect(proxy.addr())?;
    let _ = third.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    let (resp, closed) = read_until_closed(&mut third, Duration::from_secs(10));
    assert!(closed && resp.is_empty(), "a connection past the cap was served: {:?}", String::from_utf8_lossy(&resp));
    drop(held);
    // Slots come back when connections close.
    let ok = wharf_tests::wait_until_async(Duration::from_secs(10), "a free connection slot", || {
        let mut s = TcpStream::connect(proxy.addr()).ok()?;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let (resp, _) = read_until_closed(&mut s, Duration::from_secs(2));
        resp.starts_with(b"HTTP/1.1 200").then_some(())
    })
    .await;
    assert!(ok.is_ok(), "no slot came back after the held connections closed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_fetches_past_the_cap_wait_their_turn() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..3).map(|_| fake.add_random_blob(64 * 1024)).collect();
    for b in &blobs {
        fake.set_fault(&b.digest, wharf_tests::fake::Fault::Pause { after: 1024 });
    }
    let proxy = Proxy::spawn(
        &repo_config("lab", &fake.url(), "generic", "5m"),
        &["--max-upstream-fetches", "1", "--idle-timeout", "30s"],
    )?;
    let urls: Vec<String> = blobs.iter().map(|b| proxy.v2(&format!("lab/org/img/blobs/{}", b.digest))).collect();
    let pulls: Vec<_> = urls.iter().cloned().map(|u| tokio::spawn(async move { get(&u, &[]).await })).collect();
    // While the first fetch is paused, only one upstream GET has been made.
    wharf_tests::wait_until_async(Duration::from_secs(10), "the first upstream GET", || {
        blobs.iter().any(|b| fake.count("GET", &b.digest) == 1).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // give a wrongly started second fetch time to show
    let started: usize = blobs.iter().map(|b| fake.count("GET", &b.digest)).sum();
    assert_eq!(started, 1, "more upstream fetches than the cap: {}", fake.describe_requests());
    fake.release();
    for (p, b) in pulls.into_iter().zip(&blobs) {
        let r = p.await??;
        assert_eq!((r.status, r.digest()), (200, b.digest.clone()));
    }
    Ok(())
}
