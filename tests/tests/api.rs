//! The registry API surface: version check, unknown repoKey, read-only methods, the request log.

use std::time::Duration;

use wharf_tests::http::{get, request};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy, TestImage};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_check_answers_registry_2_0() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let resp = get(&proxy.v2("/"), &[]).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("docker-distribution-api-version"), Some("registry/2.0"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_repo_key_is_name_unknown() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    for path in [
        "nope/library/alpine/manifests/3.20",
        "nope/alpine/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "nope/alpine/tags/list",
    ] {
        let resp = get(&proxy.v2(path), &[]).await?;
        assert_eq!(resp.status, 404, "{path}: {}", resp.text());
        let errors = resp.oci_errors()?;
        assert_eq!(errors[0].0, "NAME_UNKNOWN", "{path}: {}", resp.text());
        assert!(!errors[0].1.is_empty(), "{path}: empty message");
    }
    assert_eq!(
        fake.count("GET", "/v2/nope") + fake.count("GET", "alpine"),
        0,
        "an unknown repoKey reached the upstream:\n{}",
        fake.describe_requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_methods_are_405_unsupported() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let paths = [
        "lab/org/img/manifests/v1".to_string(),
        format!("lab/org/img/manifests/{digest}"),
        format!("lab/org/img/blobs/{digest}"),
        "lab/org/img/blobs/uploads/".to_string(),
    ];
    for method in ["PUT", "POST", "PATCH", "DELETE"] {
        for path in &paths {
            let resp = request(method, &proxy.v2(path), &[("content-type", "application/json")]).await?;
            assert_eq!(resp.status, 405, "{method} {path}: {}", resp.text());
            let errors = resp.oci_errors()?;
            assert_eq!(errors[0].0, "UNSUPPORTED", "{method} {path}: {}", resp.text());
            let msg = errors[0].1.to_lowercase();
            assert!(
                msg.contains("read") && msg.contains("only"),
                "{method} {path}: the message should say this is a read-only cache: {:?}",
                errors[0].1
            );
        }
    }
    let writes: Vec<_> = fake.requests().into_iter().filter(|r| r.method != "GET" && r.method != "HEAD").collect();
    assert!(writes.is_empty(), "writes reached the upstream: {writes:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_structured_log_line_per_request() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[10_000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;

    let m = get(&proxy.v2("lab/org/img/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    let layer = &image.layers[0];
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", layer.digest));
    assert_eq!(get(&url, &[]).await?.status, 200);
    assert_eq!(get(&url, &[]).await?.status, 200);

    let miss = proxy.wait_request_log(Duration::from_secs(5), |f| f["kind"] == "manifest" && f["reference"] == "v1")?;
    for field in ["repo_key", "name", "kind", "reference", "upstream_url", "cache", "status", "bytes", "duration_ms"] {
        assert!(miss.get(field).is_some(), "request log line lacks {field}: {miss}");
    }
    assert_eq!(miss["repo_key"], "lab", "{miss}");
    assert_eq!(miss["name"], "org/img", "{miss}");
    assert_eq!(miss["cache"], "miss", "{miss}");
    assert_eq!(miss["status"], 200, "{miss}");
    let upstream_url = miss["upstream_url"].as_str().unwrap_or_default();
    assert!(upstream_url.starts_with(&fake.url()), "upstream_url {upstream_url:?} should name the upstream");

    proxy.wait_request_log(Duration::from_secs(5), |f| {
        f["kind"] == "blob" && f["reference"] == layer.digest.as_str() && f["cache"] == "hit"
    })?;
    let blob_lines = proxy.request_logs().into_iter().filter(|f| f["reference"] == layer.digest.as_str()).count();
    assert_eq!(blob_lines, 2, "{:#?}", proxy.request_logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_list_is_passed_through_with_pagination() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    for tag in ["v1", "v2", "v3"] {
        fake.put_manifest("team/tags", Some(tag), OCI_MANIFEST, format!("{{\"tag\":\"{tag}\"}}"));
    }
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;

    let all = get(&proxy.v2("lab/team/tags/tags/list"), &[]).await?;
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(all.json()?["tags"], serde_json::json!(["v1", "v2", "v3"]));

    let page = get(&proxy.v2("lab/team/tags/tags/list?n=2"), &[]).await?;
    assert_eq!(page.status, 200, "{}", page.text());
    let seen = fake.requests_matching("GET", "/tags/list");
    assert_eq!(
        seen.last().and_then(|r| r.query.clone()).as_deref(),
        Some("n=2"),
        "n must reach the upstream:\n{}",
        fake.describe_requests()
    );
    assert_eq!(page.json()?["tags"], serde_json::json!(["v1", "v2"]));
    let link = page.header("link").unwrap_or_default().to_string();
    assert!(link.contains("last=v2") && link.contains("rel=\"next\""), "Link {link:?}");
    // The next page must come back through the node, under the repoKey.
    let target = link.trim_start_matches('<').split('>').next().unwrap_or_default();
    let next_url = if target.starts_with('/') { format!("{}{target}", proxy.url()) } else { target.to_string() };
    assert!(
        next_url.starts_with(&proxy.v2("lab/team/tags/tags/list")),
        "Link {link:?} does not point back at the node under its repoKey"
    );
    let next = get(&next_url, &[]).await?;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.json()?["tags"], serde_json::json!(["v3"]));
    // n=0: an empty list and no Link (the spec), after the upstream's 200 for the repository.
    let none = get(&proxy.v2("lab/team/tags/tags/list?n=0"), &[]).await?;
    assert_eq!(none.status, 200, "{}", none.text());
    assert_eq!(none.json()?, serde_json::json!({"name": "lab/team/tags", "tags": []}));
    assert_eq!(none.header("link"), None);
    assert_eq!(
        fake.requests_matching("GET", "/tags/list").last().and_then(|r| r.query.clone()).as_deref(),
        Some("n=0")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_headers_accept_forwarding_and_cache_control() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[1000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let by_tag = proxy.v2("lab/org/img/manifests/v1");
    let by_digest = proxy.v2(&format!("lab/org/img/manifests/{}", image.digest()));
    let len = image.manifest.size().to_string();

    let accept = format!("{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json");
    let m = get(&by_tag, &[("accept", &accept)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.body, image.manifest.data);
    let upstream = fake.requests_matching("GET", "/manifests/v1");
    let sent_accept = upstream.first().and_then(|r| r.header("accept")).unwrap_or_default().to_string();
    assert!(sent_accept.contains(OCI_MANIFEST), "the client's Accept was not forwarded: {sent_accept:?}");

    for (url, method) in [(&by_tag, "GET"), (&by_tag, "HEAD"), (&by_digest, "GET"), (&by_digest, "HEAD")] {
        let r = request(method, url, &[("accept", &accept)]).await?;
        assert_eq!(r.status, 200, "{method} {url}");
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST), "{method} {url}");
        assert_eq!(r.header("docker-content-digest"), Some(image.digest()), "{method} {url}");
        assert_eq!(r.header("content-length"), Some(len.as_str()), "{method} {url}");
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", image.digest()).as_str()), "{method} {url}");
        let cc = r.header("cache-control").unwrap_or_default();
        if url == &by_digest {
            assert!(cc.contains("immutable"), "{method} by digest: Cache-Control {cc:?}");
        } else {
            assert!(!cc.contains("immutable"), "{method} by tag: Cache-Control {cc:?}");
            assert!(cc.contains("max-age"), "{method} by tag: Cache-Control {cc:?}");
        }
    }
    // Served from the cache: one upstream GET of the tag, none by digest.
    assert_eq!(fake.count("GET", "/manifests/"), 1, "{}", fake.describe_requests());

    // A client that does not accept the cached media type is not handed it from the cache.
    let docker_only = "application/vnd.docker.distribution.manifest.v2+json";
    let _ = get(&by_tag, &[("accept", docker_only)]).await?;
    assert!(
        fake.count("GET", "/manifests/") + fake.count("HEAD", "/manifests/") >= 2,
        "a manifest of a media type the client did not accept was served from the cache:\n{}",
        fake.describe_requests()
    );
    Ok(())
}

/// Referrers are passed through, typed exactly as the distribution spec says
/// (`application/vnd.oci.image.index.v1+json`) whatever parameters the upstream added.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_are_typed_as_the_spec_says() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let digest = wharf_tests::sha256_digest(b"subject");
    let r = get(&proxy.v2(&format!("lab/team/app/referrers/{digest}")), &[]).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/vnd.oci.image.index.v1+json"));
    assert_eq!(r.json()?["manifests"], serde_json::json!([]));
    Ok(())
}
