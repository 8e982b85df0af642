//! Upstream faults: a failed fetch ends in a clean error, caches nothing, and the next pull works; a
//! failing revalidation serves the cached tag stale with a `Warning`; a follower streams a slow
//! fetch as it arrives.

use std::time::Duration;

use axum::http::Method;
use wharf_tests::checks::{expect_cached, expect_clean_failure, expect_not_cached};
use wharf_tests::fake::FaultRule;
use wharf_tests::http::{client, get, get_outcome};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Fault, Proxy};

const ARGS: [&str; 8] =
    ["--connect-timeout", "1s", "--first-byte-timeout", "2s", "--idle-timeout", "1s", "--retries", "1"];

/// Blobs tried at once per fault: whether a wrong body slips through complete can depend on timing,
/// so several concurrent tries make such a race show up reliably.
const TRIES: usize = 6;

/// With `fault` on 1 MB blobs: each client's response fails cleanly, nothing is cached; with the
/// fault off, the next pull succeeds and caches the blob.
async fn fault_then_recovery(fault: Fault) -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..TRIES).map(|_| fake.add_random_blob(1024 * 1024)).collect();
    for blob in &blobs {
        fake.set_fault(&blob.digest, fault.clone());
    }
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &ARGS)?;
    let url = |digest: &str| proxy.v2(&format!("lab/org/img/blobs/{digest}"));

    let outcomes = futures_util::future::join_all(blobs.iter().map(|b| {
        let u = url(&b.digest);
        async move { tokio::time::timeout(Duration::from_secs(30), get_outcome(&u, &[])).await }
    }))
    .await;
    let mut failures = Vec::new();
    for (blob, out) in blobs.iter().zip(outcomes) {
        let Ok(out) = out else {
            failures.push(format!("{}: the proxy's response hung for 30 s", blob.digest));
            continue;
        };
        if let Err(e) = expect_clean_failure(&out, blob) {
            failures.push(format!("{e:#}"));
        }
    }
    assert!(failures.is_empty(), "{fault:?}: {} of {TRIES} clients:\n{}", failures.len(), failures.join("\n"));
    for blob in &blobs {
        expect_not_cached(&proxy, &blob.digest).await.map_err(|e| anyhow::anyhow!("{fault:?}: {e:#}"))?;
        assert!(fake.count("GET", &blob.digest) >= 1);
    }

    fake.clear_faults();
    let blob = &blobs[0];
    let ok = get(&url(&blob.digest), &[]).await?;
    assert_eq!(ok.status, 200, "after {fault:?}: {}", ok.text());
    assert_eq!(ok.digest(), blob.digest, "after {fault:?}");
    expect_cached(&proxy, blob).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_mid_body() -> anyhow::Result<()> {
    fault_then_recovery(Fault::ResetMidBody).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_bytes() -> anyhow::Result<()> {
    fault_then_recovery(Fault::WrongBytes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hang_mid_body_hits_the_idle_timeout() -> anyhow::Result<()> {
    fault_then_recovery(Fault::HangMidBody).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_few_bytes_for_the_content_length() -> anyhow::Result<()> {
    fault_then_recovery(Fault::ShortBody).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_few_bytes_for_the_digest() -> anyhow::Result<()> {
    fault_then_recovery(Fault::Truncated).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_bytes_for_the_digest() -> anyhow::Result<()> {
    fault_then_recovery(Fault::Extended).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hang_before_headers_is_a_504() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(10_000);
    fake.set_fault(&blob.digest, Fault::HangBeforeHeaders);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &ARGS)?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let resp = tokio::time::timeout(Duration::from_secs(30), get(&url, &[]))
        .await
        .map_err(|_| anyhow::anyhow!("the proxy's response hung for 30 s"))??;
    assert_eq!(resp.status, 504, "{}", resp.text());
    resp.oci_errors()?;
    expect_not_cached(&proxy, &blob.digest).await?;
    fake.clear_faults();
    let ok = get(&url, &[]).await?;
    assert_eq!((ok.status, ok.digest()), (200, blob.digest.clone()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_errors_are_reported_with_status_and_url() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(10_000);
    fake.set_fault(&blob.digest, Fault::Status { status: 500, retry_after: None });
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &ARGS)?;
    let resp = get(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[]).await?;
    assert!(resp.status >= 500, "{} {}", resp.status, resp.text());
    resp.oci_errors()?;
    let text = resp.text();
    assert!(text.contains("500"), "the error should name the upstream status: {text}");
    assert!(text.contains(&fake.addr().to_string()), "the error should name the upstream URL: {text}");
    // Retried (5xx, nothing sent yet) at most --retries times more.
    let gets = fake.count("GET", &blob.digest);
    assert!((1..=2).contains(&gets), "{gets} upstream GETs with --retries 1");
    expect_not_cached(&proxy, &blob.digest).await?;
    Ok(())
}

/// A tag cached with `tag_ttl = "0s"` is revalidated on every pull; when revalidation meets
/// `fault`, the cached manifest is served with a `Warning: 299` header.
async fn stale_on_revalidation_failure(fault: Fault) -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let digest = fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "0s"), &ARGS)?;
    let url = proxy.v2("lab/org/img/manifests/v1");

    let first = get(&url, &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.body, manifest);
    assert_eq!(first.header("warning"), None);

    fake.set_fault("/manifests/v1", fault.clone());
    let before = fake.count("HEAD", "/manifests/v1") + fake.count("GET", "/manifests/v1");
    let stale = tokio::time::timeout(Duration::from_secs(20), get(&url, &[("accept", OCI_MANIFEST)]))
        .await
        .map_err(|_| anyhow::anyhow!("{fault:?}: no answer within 20 s"))??;
    assert_eq!(stale.status, 200, "{fault:?}: {}", stale.text());
    assert_eq!(stale.body, manifest, "{fault:?}");
    assert_eq!(stale.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(stale.header("content-type"), Some(OCI_MANIFEST));
    let warning = stale.header("warning").unwrap_or_default();
    // The distribution spec's form: warn-code 299, warn-agent "-".
    assert!(warning.starts_with("299 - \"Response is stale"), "{fault:?}: Warning header {warning:?}");
    let after = fake.count("HEAD", "/manifests/v1") + fake.count("GET", "/manifests/v1");
    assert!(after > before, "{fault:?}: the tag was not revalidated upstream");
    proxy.wait_request_log(Duration::from_secs(5), |f| f["reference"] == "v1" && f["cache"] == "stale")?;

    // Once the upstream is back, the tag is revalidated and served without a warning.
    fake.clear_faults();
    let fresh = get(&url, &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.header("warning"), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_500_serves_stale_with_warning() -> anyhow::Result<()> {
    stale_on_revalidation_failure(Fault::Status { status: 500, retry_after: None }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_429_serves_stale_with_warning() -> anyhow::Result<()> {
    stale_on_revalidation_failure(Fault::Status { status: 429, retry_after: Some("1".into()) }).await
}

/// An upstream that accepts the revalidation and never answers: stale once `--first-byte-timeout`
/// (2 s here) is over, well within the client's patience.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_timeout_serves_stale_with_warning() -> anyhow::Result<()> {
    stale_on_revalidation_failure(Fault::HangBeforeHeaders).await
}

/// An upstream that is gone (its port closed): stale at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_with_the_upstream_unreachable_serves_stale_with_warning() -> anyhow::Result<()> {
    let mut fake = FakeUpstream::start().await?;
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "0s"), &ARGS)?;
    let url = proxy.v2("lab/org/img/manifests/v1");
    assert_eq!(get(&url, &[("accept", OCI_MANIFEST)]).await?.status, 200);
    fake.stop().await;
    let started = std::time::Instant::now();
    let stale = get(&url, &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!((stale.status, stale.body.as_slice()), (200, &manifest[..]), "{}", stale.text());
    assert!(stale.header("warning").unwrap_or_default().starts_with("299 - \"Response is stale"));
    assert!(started.elapsed() < Duration::from_secs(5), "stale after {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_with_an_unchanged_digest_fetches_no_body() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest.to_vec());
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "0s"), &ARGS)?;
    let url = proxy.v2("lab/org/img/manifests/v1");
    for _ in 0..3 {
        let r = get(&url, &[("accept", OCI_MANIFEST)]).await?;
        assert_eq!((r.status, r.body.as_slice()), (200, &manifest[..]));
    }
    assert_eq!(
        fake.count("GET", "/manifests/v1"),
        1,
        "an unchanged tag should be revalidated with HEAD only:\n{}",
        fake.describe_requests()
    );
    assert!(fake.count("HEAD", "/manifests/v1") >= 2, "{}", fake.describe_requests());
    proxy.wait_request_log(Duration::from_secs(5), |f| f["cache"] == "revalidated")?;

    // A changed tag is followed.
    let mut manifest2 = manifest.to_vec();
    manifest2.push(b' ');
    let d2 = fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest2.clone());
    let r = get(&url, &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.header("docker-content-digest"), Some(d2.as_str()));
    assert_eq!(r.body, manifest2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_gets_bytes_before_a_slow_upstream_finishes() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(4 * 1024 * 1024);
    // The upstream sends 1 MB, then stalls until released.
    fake.add_fault(FaultRule {
        pattern: blob.digest.clone(),
        methods: Some(vec![Method::GET]),
        fault: Fault::Pause { after: 1024 * 1024 },
        times: None,
    });
    // Generous idle timeout: the stall is ours, not a fault.
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--idle-timeout", "30s"])?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let http = client();

    let mut leader = http.get(&url).send().await?;
    assert_eq!(leader.status(), 200);
    let mut leader_body = leader.chunk().await?.map(|c| c.to_vec()).unwrap_or_default();
    assert!(!leader_body.is_empty());

    let mut follower = http.get(&url).send().await?;
    assert_eq!(follower.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), follower.chunk())
        .await
        .map_err(|_| anyhow::anyhow!("the follower got no byte while the upstream was stalled"))??
        .expect("a first chunk");
    assert!(!first.is_empty());
    let upstream = fake.requests_matching("GET", &blob.digest);
    assert_eq!(upstream.len(), 1, "{}", fake.describe_requests());
    assert!(!upstream[0].is_completed(), "the upstream had finished before the follower's first bytes");
    assert_eq!(&first[..], &blob.data[..first.len()], "the follower's first bytes");

    fake.release();
    let mut follower_body = first.to_vec();
    while let Some(c) = follower.chunk().await? {
        follower_body.extend_from_slice(&c);
    }
    while let Some(c) = leader.chunk().await? {
        leader_body.extend_from_slice(&c);
    }
    assert_eq!(wharf_tests::sha256_digest(&leader_body), blob.digest);
    assert_eq!(wharf_tests::sha256_digest(&follower_body), blob.digest);
    assert_eq!(fake.count("GET", &blob.digest), 1);
    Ok(())
}
