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
