//! Bad input: traversal, names breaking the grammar, bad digests, huge tags. Each gets a 400 with an
//! OCI error (a tag no manifest can have, or a sha512 digest: 404 `MANIFEST_UNKNOWN` or
//! `BLOB_UNKNOWN`, as the distribution spec's conformance suite expects), nothing reaches the
//! upstream, nothing appears outside the cache dir, no panic.

use wharf_tests::http::{Resp, get, raw_request_async};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy, ProxyOptions, entries_under};

const HEX64: &str = "8c49f9510e473c7c938da643fff57028db485c582f3834d596eceb6bceacfa39";

/// (path under /v2/, acceptable OCI codes)
fn cases() -> Vec<(String, &'static [&'static str])> {
    const NAME: &[&str] = &["NAME_INVALID"];
    const REF: &[&str] = &["MANIFEST_UNKNOWN", "MANIFEST_INVALID", "DIGEST_INVALID"];
    const DIGEST: &[&str] = &["DIGEST_INVALID"];
    let long_tag = "t".repeat(300);
    let upper = HEX64.to_uppercase();
    let mut v: Vec<(String, &'static [&'static str])> = vec![
        // Traversal in names.
        ("lab/../../../etc/manifests/latest".into(), NAME),
        (format!("lab/org/../../../../tmp/x/blobs/sha256:{HEX64}"), NAME),
        ("lab/%2e%2e/%2e%2e/etc/manifests/latest".into(), NAME),
        ("lab/org/%2E%2E/manifests/latest".into(), NAME),
        ("lab/foo%2fbar/manifests/latest".into(), NAME),
        ("lab/foo%2F..%2F..%2Fetc/manifests/latest".into(), NAME),
        ("lab/./org/manifests/latest".into(), NAME),
        // Names breaking the grammar.
        ("lab/Uppercase/manifests/latest".into(), NAME),
        ("lab/a//b/manifests/latest".into(), NAME),
        ("lab/org/-img/manifests/latest".into(), NAME),
        ("lab/org/img-/manifests/latest".into(), NAME),
        ("lab/org/im%00g/manifests/latest".into(), NAME),
        // Traversal and junk in references.
        ("lab/org/img/manifests/..".into(), REF),
        ("lab/org/img/manifests/%2e%2e".into(), REF),
        ("lab/org/img/manifests/..%2f..%2f..%2fetc%2fpasswd".into(), REF),
        ("lab/org/img/manifests/v1%2f..%2f..".into(), REF),
        ("lab/org/img/manifests/-v1".into(), REF),
        ("lab/org/img/manifests/.hidden".into(), REF),
        (format!("lab/org/img/manifests/{long_tag}"), REF),
        ("lab/org/img/manifests/sha256:xyz".into(), REF),
        (format!("lab/org/img/manifests/sha256:{upper}"), REF),
        // Digests on blobs.
        (format!("lab/org/img/blobs/sha512:{HEX64}{HEX64}"), &["BLOB_UNKNOWN"]),
        (format!("lab/org/img/blobs/md5:{}", &HEX64[..32]), DIGEST),
        ("lab/org/img/blobs/sha256:abc".into(), DIGEST),
        (format!("lab/org/img/blobs/sha256:{upper}"), DIGEST),
        (format!("lab/org/img/blobs/sha256:{}g", &HEX64[..63]), DIGEST),
        (format!("lab/org/img/blobs/sha256:{HEX64}0"), DIGEST),
        ("lab/org/img/blobs/notadigest".into(), DIGEST),
        ("lab/org/img/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd".into(), DIGEST),
        ("lab/org/img/blobs/sha256:%2e%2e".into(), DIGEST),
        ("lab/org/img/blobs/..".into(), DIGEST),
        (format!("lab/org/img/blobs/sha256:{long_tag}"), DIGEST),
    ];
    v.push(("lab/org/img/manifests/sha256:".into(), REF));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_400_with_an_oci_error_and_touches_nothing() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let root = tempfile::tempdir()?;
    let cache = root.path().join("cache");
    let mut proxy = Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(cache.clone()),
        ..ProxyOptions::new(&repo_config("lab", &fake.url(), "generic", "5m"), &[])
    })?;

    let mut failures = Vec::new();
    for (path, codes) in cases() {
        for method in ["GET", "HEAD"] {
            let raw = format!("/v2/{path}");
            let resp: Resp = match raw_request_async(proxy.addr(), method, &raw, &[]).await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{method} {raw}: no response: {e:#}"));
                    continue;
                }
            };
            // What no manifest or blob can be (a tag breaking the grammar, a sha512 digest): 404.
            let unknown = resp.status == 404 && codes.iter().any(|c| c.ends_with("_UNKNOWN"));
            if resp.status != 400 && !unknown {
                failures.push(format!("{method} {raw}: status {} (expected 400) {}", resp.status, resp.text()));
                continue;
            }
            if method == "HEAD" {
                continue;
            }
            // A path with percent-encoded `.` or `/` may be refused as a whole, before it is split into
            // name and reference: then NAME_INVALID fits too.
            let encoded = raw.contains('%');
            match resp.oci_errors() {
                Ok(errors) if codes.contains(&errors[0].0.as_str()) => {}
                Ok(errors) if encoded && errors[0].0.ends_with("_INVALID") => {}
                Ok(errors) => {
                    failures.push(format!("{method} {raw}: code {} (expected one of {codes:?})", errors[0].0))
                }
                Err(e) => failures.push(format!("{method} {raw}: {e:#}")),
            }
        }
    }

    assert!(proxy.is_running(), "the proxy died:\n{}", proxy.log_tail(30));
    let ping = get(&proxy.v2("/"), &[]).await?;
    assert_eq!(ping.status, 200, "the proxy no longer answers /v2/");

    // Nothing reached the upstream but version checks and tokens.
    let upstream: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path != "/v2/" && r.path != "/token")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    // Nothing appeared outside the cache dir, nor in the working directory.
    let outside: Vec<_> = entries_under(root.path()).into_iter().filter(|p| !p.starts_with("cache")).collect();
    let in_cwd = entries_under(&proxy.cwd());
    let escaped: Vec<_> = entries_under(&cache)
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains("etc") || s.contains("passwd") || s.contains("..")
        })
        .collect();

    assert!(failures.is_empty(), "{} bad inputs were mishandled:\n{}", failures.len(), failures.join("\n"));
    assert!(upstream.is_empty(), "bad input reached the upstream: {upstream:#?}");
    assert!(outside.is_empty(), "created outside the cache dir: {outside:?}");
    assert!(in_cwd.is_empty(), "created in the working directory: {in_cwd:?}");
    assert!(escaped.is_empty(), "suspicious cache entries: {escaped:?}");
    proxy.kill_9();
    Ok(())
}
