//! Eviction on a node: LRU down to the low watermark, TTL on last access, a blob evicted while a
//! client streams it still arrives whole, and a cache with no room serves pulls uncached.

use std::time::Duration;

use wharf_tests::http::get;
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy};

const KB: usize = 1024;

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lru_order_down_to_the_low_watermark() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..5).map(|_| fake.add_random_blob(100 * KB)).collect();
    // Cap 400 KiB: high 90% = 368,640 B, low 50% = 204,800 B.
    let args = ["--cache-max-size", "400KiB", "--cache-high-watermark", "0.9", "--cache-low-watermark", "0.5"];
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &args)?;
    let url = |i: usize| proxy.v2(&format!("lab/org/img/blobs/{}", blobs[i].digest));
    // 0, 1, 2 cached (300 KiB, under the high mark); then 0 used again, so 1 is the oldest.
    for (i, blob) in blobs.iter().enumerate().take(3) {
        assert_eq!(get(&url(i), &[]).await?.status, 200);
        wharf_tests::checks::expect_cached(&proxy, blob).await?;
        // Distinct last-access times (millisecond resolution), not a wait for readiness.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&url(0), &[]).await?.status, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // 3 takes the cache to 400 KiB > high: evict LRU (1, then 2) until <= 200 KiB: 0 and 3 stay.
    assert_eq!(get(&url(3), &[]).await?.status, 200);
    wharf_tests::wait_until_async(Duration::from_secs(10), "eviction down to the low watermark", || {
        (proxy.cached_blob(&blobs[1].digest).is_none() && proxy.cached_blob(&blobs[2].digest).is_none()).then_some(())
    })
    .await?;
    assert!(proxy.cached_blob(&blobs[0].digest).is_some(), "the recently used blob was evicted");
    assert!(proxy.cached_blob(&blobs[3].digest).is_some(), "the newest blob was evicted");
    // Evicted blobs are fetched again, whole.
    let again = get(&url(1), &[]).await?;
    assert_eq!((again.status, again.digest()), (200, blobs[1].digest.clone()));
    assert_eq!(fake.count("GET", &blobs[1].digest), 2);
    let metrics = get(&format!("{}/metrics", proxy.url()), &[]).await?.text();
    assert!(metrics.contains("wharf_evictions_total{reason=\"size\"} 2"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_not_accessed_for_the_ttl_go() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(10 * KB);
    let args = ["--cache-ttl", "1s", "--eviction-interval", "200ms"];
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &args)?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    assert_eq!(get(&url, &[]).await?.status, 200);
    wharf_tests::checks::expect_cached(&proxy, &blob).await?;
    wharf_tests::wait_until_async(Duration::from_secs(10), "TTL eviction", || {
        proxy.cached_blob(&blob.digest).is_none().then_some(())
    })
    .await?;
    let again = get(&url, &[]).await?;
    assert_eq!((again.status, again.digest()), (200, blob.digest.clone()));
    assert_eq!(fake.count("GET", &blob.digest), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_evicted_while_streamed_arrives_whole() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(16 * 1024 * KB);
    let args = ["--cache-ttl", "1s", "--eviction-interval", "100ms"];
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &args)?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    assert_eq!(get(&url, &[]).await?.status, 200);
    // A slow reader of the cached blob; eviction takes the file meanwhile.
    let mut resp = client().get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    let mut body = Vec::with_capacity(blob.size());
    let first = resp.chunk().await?.unwrap_or_default();
    body.extend_from_slice(&first);
    wharf_tests::wait_until_async(Duration::from_secs(10), "eviction of the blob being read", || {
        proxy.cached_blob(&blob.digest).is_none().then_some(())
    })
    .await?;
    while let Some(c) = resp.chunk().await? {
        body.extend_from_slice(&c);
    }
    assert_eq!(body.len(), blob.size());
    assert_eq!(wharf_tests::sha256_digest(&body), blob.digest);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_room_pulls_are_served_uncached() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let big = fake.add_random_blob(300 * KB);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--cache-max-size", "100KiB"])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", big.digest));
    for _ in 0..2 {
        let r = get(&url, &[]).await?;
        assert_eq!((r.status, r.digest()), (200, big.digest.clone()));
    }
    wharf_tests::checks::expect_not_cached(&proxy, &big.digest).await?;
    // A range is passed on to the upstream.
    let r = get(&url, &[("range", "bytes=10-19")]).await?;
    assert_eq!((r.status, &r.body[..]), (206, &big.data[10..20]));
    let log = proxy.wait_request_log(Duration::from_secs(5), |l| l["cache"] == "bypass")?;
    assert_eq!(log["status"], 200);
    let metrics = get(&format!("{}/metrics", proxy.url()), &[]).await?.text();
    assert!(metrics.contains("wharf_uncached_bytes_total{repo_key=\"lab\"}"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repo_cache_ttl_overrides_the_nodes() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let (short, kept) = (fake.add_random_blob(10 * KB), fake.add_random_blob(10 * KB));
    let config = format!(
        "[[repo]]\nkey = \"short\"\nupstream = \"{u}\"\ncache_ttl = \"1s\"\n\n[[repo]]\nkey = \"keep\"\nupstream = \"{u}\"\n",
        u = fake.url()
    );
    let proxy = Proxy::spawn(&config, &["--eviction-interval", "200ms"])?;
    for (key, blob) in [("short", &short), ("keep", &kept)] {
        let r = get(&proxy.v2(&format!("{key}/org/img/blobs/{}", blob.digest)), &[]).await?;
        assert_eq!((r.status, r.digest()), (200, blob.digest.clone()));
        wharf_tests::checks::expect_cached(&proxy, blob).await?;
    }
    wharf_tests::wait_until_async(Duration::from_secs(10), "the short-TTL repo's blob to be evicted", || {
        proxy.cached_blob(&short.digest).is_none().then_some(())
    })
    .await?;
    assert!(proxy.cached_blob(&kept.digest).is_some(), "a repo without a TTL lost its blob");
    Ok(())
}
