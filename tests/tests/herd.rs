//! Herd: 20 clients on a cold 50 MB blob make exactly one upstream GET, and all get the right bytes.

use std::time::Duration;

use wharf_tests::http::{client, get_hashed};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Fault, Proxy};

const CLIENTS: usize = 20;
const SIZE: usize = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_clients_on_a_cold_blob_make_one_upstream_get() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(SIZE);
    // Slow enough (about 1.5 s) that all clients arrive while the fetch runs.
    fake.set_fault(&blob.digest, Fault::Slow { chunk: 1024 * 1024, delay: Duration::from_millis(30) });
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let url = proxy.v2(&format!("lab/org/big/blobs/{}", blob.digest));

    let http = client();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { get_hashed(&http, &url).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, len, digest) = t.await??;
        assert_eq!(status, 200, "client {i}");
        assert_eq!(len, SIZE as u64, "client {i}");
        assert_eq!(digest, blob.digest, "client {i}");
    }
    assert_eq!(fake.count("GET", &blob.digest), 1, "upstream GETs for the blob:\n{}", fake.describe_requests());
    // One miss; everyone else joined it (or, arriving late, hit the cache).
    let lines = wharf_tests::wait_until_async(Duration::from_secs(10), "a request log line per client", || {
        let l: Vec<_> = proxy.request_logs().into_iter().filter(|f| f["reference"] == blob.digest.as_str()).collect();
        (l.len() >= CLIENTS).then_some(l)
    })
    .await?;
    let misses = lines.iter().filter(|f| f["cache"] == "miss").count();
    assert_eq!(misses, 1, "{lines:#?}");
    assert!(
        lines.iter().all(|f| ["miss", "coalesced", "hit"].contains(&f["cache"].as_str().unwrap_or(""))),
        "{lines:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_client_does_not_slow_the_others() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    // Larger than the socket buffers between the node and a client that reads nothing.
    let blob = fake.add_random_blob(24 * 1024 * 1024);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let http = client();

    let mut stalled = http.get(&url).send().await?;
    assert_eq!(stalled.status(), 200);
    assert!(stalled.chunk().await?.is_some());
    // `stalled` reads nothing more; another client still gets the whole blob.
    let (status, len, digest) = tokio::time::timeout(Duration::from_secs(30), get_hashed(&http, &url))
        .await
        .map_err(|_| anyhow::anyhow!("a stalled client held up another one"))??;
    assert_eq!((status, len, digest), (200, blob.size() as u64, blob.digest.clone()));
    drop(stalled);
    assert_eq!(fake.count("GET", &blob.digest), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_does_not_stop_the_fetch() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(4 * 1024 * 1024);
    fake.set_fault(&blob.digest, Fault::Pause { after: 256 * 1024 });
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--idle-timeout", "30s"])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));

    let mut gone = client().get(&url).send().await?;
    assert_eq!(gone.status(), 200);
    assert!(gone.chunk().await?.is_some());
    drop(gone);
    fake.release();
    wharf_tests::checks::expect_cached(&proxy, &blob).await?;
    let again = wharf_tests::http::get(&url, &[]).await?;
    assert_eq!((again.status, again.digest()), (200, blob.digest.clone()));
    assert_eq!(fake.count("GET", &blob.digest), 1, "{}", fake.describe_requests());
    Ok(())
}
