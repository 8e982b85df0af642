//! kill -9 mid-download, restart on the same cache dir: staging is emptied, the blob is fetched
//! again and verified.

use std::time::Duration;

use wharf_tests::checks::expect_cached;
use wharf_tests::http::{client, get};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Fault, Proxy, wait_until_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_download_then_restart() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(8 * 1024 * 1024);
    // The upstream sends 2 MB, then stalls: the node is killed while the fetch is in flight.
    fake.set_fault(&blob.digest, Fault::Pause { after: 2 * 1024 * 1024 });
    let mut proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--idle-timeout", "30s"])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));

    let mut resp = client().get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await?;
    assert!(first.is_some_and(|c| !c.is_empty()));
    let partial = wait_until_async(Duration::from_secs(10), "a partial file in staging/", || {
        let files = proxy.staging_files();
        (!files.is_empty()).then_some(files)
    })
    .await?;

    proxy.kill_9();
    // The client's response breaks off: it never completes.
    let mut rest = 0usize;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await {
            Ok(Ok(Some(c))) => rest += c.len(),
            Ok(Ok(None)) => break "complete",
            Ok(Err(_)) => break "error",
            Err(_) => break "hang",
        }
    };
    assert_eq!(ended, "error", "after kill -9 the response ended with {ended} ({rest} more bytes)");

    fake.clear_faults();
    fake.release();
    proxy.restart()?;
    let leftover = wait_until_async(Duration::from_secs(5), "staging/ emptied at start-up", || {
        proxy.staging_files().is_empty().then_some(())
    })
    .await;
    assert!(leftover.is_ok(), "staging/ still holds {:?} after restart (before: {partial:?})", proxy.staging_files());
    assert!(proxy.cached_blob(&blob.digest).is_none(), "a partial blob was cached");

    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let again = get(&url, &[]).await?;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.digest(), blob.digest);
    assert_eq!(fake.count("GET", &blob.digest), 2, "{}", fake.describe_requests());
    expect_cached(&proxy, &blob).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_verified_cache() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(100_000);
    let mut proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let path = format!("lab/org/img/blobs/{}", blob.digest);
    let r = get(&proxy.v2(&path), &[]).await?;
    assert_eq!((r.status, r.digest()), (200, blob.digest.clone()));
    expect_cached(&proxy, &blob).await?;
    proxy.kill_9();
    proxy.restart()?;
    let r = get(&proxy.v2(&path), &[]).await?;
    assert_eq!((r.status, r.digest()), (200, blob.digest.clone()));
    assert_eq!(fake.count("GET", &blob.digest), 1, "the restarted node refetched a cached blob");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_in_flight_responses_finish() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(2 * 1024 * 1024);
    fake.set_fault(&blob.digest, Fault::Pause { after: 512 * 1024 });
    let mut proxy = Proxy::spawn(
        &repo_config("lab", &fake.url(), "generic", "5m"),
        &["--idle-timeout", "30s", "--shutdown-grace", "10s"],
    )?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let mut resp = client().get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.chunk().await?.map(|c| c.to_vec()).unwrap_or_default();

    let pid = proxy.pid().expect("running");
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    // It stops accepting: a new connection is refused (or closed without an answer).
    let addr = proxy.addr();
    wait_until_async(Duration::from_secs(5), "the node to stop accepting", || {
        wharf_tests::http::raw_request(addr, "GET", "/v2/", &[]).is_err().then_some(())
    })
    .await?;
    assert!(proxy.is_running(), "the node exited with a response in flight");

    fake.release();
    while let Some(c) = resp.chunk().await? {
        body.extend_from_slice(&c);
    }
    assert_eq!(wharf_tests::sha256_digest(&body), blob.digest);
    // With nothing left in flight it exits by itself, cleanly, well within the grace period.
    let status = proxy.wait_exit(Duration::from_secs(8))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
