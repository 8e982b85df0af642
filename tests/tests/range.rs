//! Range requests, conditional requests and CDN-friendly headers, on cached and cold blobs.

use wharf_tests::http::{get, head};
use wharf_tests::image::{Blob, OCI_MANIFEST};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy};

const SIZE: usize = 100_000;

async fn warm_blob() -> anyhow::Result<(FakeUpstream, Proxy, Blob, String)> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(SIZE);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let full = get(&url, &[]).await?;
    assert_eq!(full.status, 200, "{}", full.text());
    assert_eq!(full.digest(), blob.digest);
    wharf_tests::checks::expect_cached(&proxy, &blob).await?;
    Ok((fake, proxy, blob, url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_on_a_cached_blob() -> anyhow::Result<()> {
    let (fake, _proxy, blob, url) = warm_blob().await?;
    let cases: [(&str, usize, usize); 4] = [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, SIZE - 1),
        ("bytes=-5", SIZE - 5, SIZE - 1),
        ("bytes=99990-200000", 99_990, SIZE - 1),
    ];
    for (range, start, end) in cases {
        let r = get(&url, &[("range", range)]).await?;
        assert_eq!(r.status, 206, "{range}: {}", r.text());
        assert_eq!(r.header("content-range"), Some(format!("bytes {start}-{end}/{SIZE}").as_str()), "{range}");
        assert_eq!(r.body, &blob.data[start..=end], "{range}");
        assert_eq!(r.header("content-length"), Some((end - start + 1).to_string().as_str()), "{range}");
    }
    assert_eq!(fake.count("GET", &blob.digest), 1, "ranges on a cached blob went upstream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsatisfiable_range_is_416_and_malformed_ranges_are_ignored() -> anyhow::Result<()> {
    let (_fake, _proxy, blob, url) = warm_blob().await?;
    for range in [format!("bytes={SIZE}-"), format!("bytes={}-{}", SIZE + 10, SIZE + 20)] {
        let r = get(&url, &[("range", &range)]).await?;
        assert_eq!(r.status, 416, "{range}: {}", r.text());
        assert_eq!(r.header("content-range"), Some(format!("bytes */{SIZE}").as_str()), "{range}");
    }
    // RFC 9110: a Range that does not parse (or has an unknown unit) is ignored.
    for range in ["bytes=abc", "bytes=", "items=0-5", "bytes=5", "bytes=--1", "bytes=9-x"] {
        let r = get(&url, &[("range", range)]).await?;
        assert_eq!(r.status, 200, "{range}: {}", r.text());
        assert_eq!(r.digest(), blob.digest, "{range}: full body expected");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_none_match_gives_304() -> anyhow::Result<()> {
    let (fake, proxy, blob, url) = warm_blob().await?;
    let etag = format!("\"{}\"", blob.digest);
    let r = get(&url, &[("if-none-match", &etag)]).await?;
    assert_eq!(r.status, 304, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let other = "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"";
    let r = get(&url, &[("if-none-match", other)]).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.digest(), blob.digest);

    // Manifests by digest too.
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let digest = fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    let murl = proxy.v2(&format!("lab/org/img/manifests/{digest}"));
    let m = get(&murl, &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    let m = get(&murl, &[("accept", OCI_MANIFEST), ("if-none-match", &format!("\"{digest}\""))]).await?;
    assert_eq!(m.status, 304, "{}", m.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdn_friendly_headers() -> anyhow::Result<()> {
    let (_fake, _proxy, blob, url) = warm_blob().await?;
    for resp in [get(&url, &[]).await?, head(&url, &[]).await?] {
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("etag"), Some(format!("\"{}\"", blob.digest).as_str()));
        assert_eq!(resp.header("accept-ranges"), Some("bytes"));
        assert_eq!(resp.header("docker-content-digest"), Some(blob.digest.as_str()));
        assert_eq!(resp.header("content-length"), Some(SIZE.to_string().as_str()));
        let cc = resp.header("cache-control").unwrap_or_default();
        assert!(
            cc.contains("max-age=31536000") && cc.contains("immutable") && cc.contains("public"),
            "Cache-Control {cc:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_on_a_cold_blob() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let near = fake.add_random_blob(2 * 1024 * 1024);
    let far = fake.add_random_blob(2 * 1024 * 1024);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let len = near.size();

    let url = proxy.v2(&format!("lab/org/img/blobs/{}", near.digest));
    let r = get(&url, &[("range", "bytes=10-19")]).await?;
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(r.header("content-range"), Some(format!("bytes 10-19/{len}").as_str()));
    assert_eq!(r.body, &near.data[10..20]);

    // A footer read (lazy-pull formats).
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", far.digest));
    let r = get(&url, &[("range", "bytes=-16")]).await?;
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(r.header("content-range"), Some(format!("bytes {}-{}/{len}", len - 16, len - 1).as_str()));
    assert_eq!(r.body, &far.data[len - 16..]);

    // The full blob afterwards is right, and the cache ends up holding it.
    for blob in [&near, &far] {
        let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
        let full = get(&url, &[]).await?;
        assert_eq!((full.status, full.digest()), (200, blob.digest.clone()));
        wharf_tests::checks::expect_cached(&proxy, blob).await?;
    }
    Ok(())
}

/// A range far ahead of a download in progress (a lazy-pulling client reading a footer while the
/// blob trickles in) is fetched upstream on its own: answered long before the download ends, with
/// exactly one ranged upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_far_ahead_of_a_slow_download_is_fetched_on_its_own() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let fake = FakeUpstream::start().await?;
    // 24 MiB at 64 KiB per 50 ms (about 1.3 MB/s): the whole takes about 19 s.
    let blob = fake.add_random_blob(24 << 20);
    fake.set_fault(&blob.digest, wharf_tests::fake::Fault::Slow { chunk: 64 << 10, delay: Duration::from_millis(50) });
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let whole = tokio::spawn({
        let url = url.clone();
        async move { get(&url, &[]).await }
    });
    // The download is under way before the range is asked.
    wharf_tests::wait_until_async(Duration::from_secs(10), "the download to start", || {
        (fake.count("GET", &blob.digest) >= 1).then_some(())
    })
    .await?;
    let started = Instant::now();
    let (start, end) = (20_000_000usize, 20_000_099usize);
    let r = get(&url, &[("range", &format!("bytes={start}-{end}"))]).await?;
    let took = started.elapsed();
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(r.body, blob.data[start..=end]);
    assert!(took < Duration::from_secs(5), "the far range took {took:?}: it waited on the download");
    assert!(!whole.is_finished(), "the download ended first: the test proves nothing");
    let ranged: Vec<_> =
        fake.requests_matching("GET", &blob.digest).into_iter().filter(|q| q.header("range").is_some()).collect();
    assert_eq!(ranged.len(), 1, "one ranged upstream request:\n{}", fake.describe_requests());
    assert_eq!(ranged[0].header("range"), Some(format!("bytes={start}-{end}").as_str()));
    whole.abort();
    Ok(())
}
