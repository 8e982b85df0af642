//! `regctl check-cdn`: passes against a node (blobs and manifests), and fails naming the right
//! checks against in-process servers that drop Range support and ETags, or alter the bytes.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse as _;
use serde_json::Value;
use wharf_tests::regctl::{Regctl, expect_aligned};
use wharf_tests::{Proxy, Registry, TestImage, random_bytes, sha256_digest};

fn config(key: &str, upstream: &str) -> String {
    format!("[[repo]]\nkey = \"{key}\"\nupstream = \"{upstream}\"\nkind = \"generic\"\ntag_ttl = \"5m\"\n")
}

/// check name -> result, from `-o json`.
fn results(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| (c["name"].as_str().unwrap_or("").to_owned(), c["result"].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn failed(report: &Value) -> Vec<String> {
    results(report).into_iter().filter(|(_, r)| r == "fail").map(|(n, _)| n).collect()
}

const ALL: [&str; 8] = ["status", "etag", "cache-control", "accept-ranges", "range", "if-none-match", "head", "digest"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_check_cdn_passes_against_a_node() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[300_000, 10])?;
    image.push(&registry.host(), "team/app")?;
    let proxy = Proxy::spawn(&config("lab", &registry.url()), &[])?;
    let rc = Regctl::default();
    let base = format!("http://{}/v2/lab/team/app", proxy.addr());

    let urls = [
        format!("{base}/blobs/{}", image.layers[0].digest),
        format!("{base}/blobs/{}", image.layers[1].digest),
        format!("{base}/manifests/{}", image.digest()),
        format!("{base}/manifests/v1"),
    ];
    for url in &urls {
        let out = rc.run(&["check-cdn", url, "-o", "json"]).await?;
        out.expect_code(0, url)?;
        let report = out.json()?;
        assert_eq!(report["ok"], true, "{report}");
        let names: Vec<String> = results(&report).into_iter().map(|(n, r)| format!("{n}={r}")).collect();
        // The node serves no ranges of manifests: noted (skip) rather than failed.
        let manifest = url.contains("/manifests/");
        let want: Vec<String> = ALL
            .iter()
            .map(|n| match *n {
                "accept-ranges" | "range" if manifest => format!("{n}=skip"),
                _ => format!("{n}=pass"),
            })
            .collect();
        assert_eq!(names, want, "{url}: {report}");
    }
    let out = rc.run(&["check-cdn", &urls[0]]).await?;
    out.expect_code(0, "table")?;
    expect_aligned(&out.stdout)?;
    assert!(out.stdout.starts_with("CHECK"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().filter(|l| l.contains("   pass   ")).count(), 8, "{}", out.stdout);
    assert!(out.stdout.contains("all checks passed"), "{}", out.stdout);

    // An unknown blob: the status fails, the rest is skipped.
    let missing = format!("{base}/blobs/sha256:{}", "0".repeat(64));
    let out = rc.run(&["check-cdn", &missing, "-o", "json"]).await?;
    out.expect_code(1, "unknown blob")?;
    let report = out.json()?;
    assert_eq!(failed(&report), ["status"], "{report}");
    assert!(results(&report).iter().skip(1).all(|(_, r)| r == "skip"), "{report}");
    Ok(())
}

/// A server that serves `body` at every path as a blob would, but with no ETag, no
/// Accept-Ranges, Range ignored; Docker-Content-Digest says `digest`.
async fn plain_server(body: Vec<u8>, digest: String) -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let app = axum::Router::new().fallback(move |_h: HeaderMap| {
        let body = body.clone();
        let digest = digest.clone();
        async move {
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CACHE_CONTROL, "public, max-age=3600".to_owned()),
                    (header::HeaderName::from_static("docker-content-digest"), digest),
                ],
                body,
            )
                .into_response()
        }
    });
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_check_cdn_names_what_a_server_without_range_and_etag_breaks() -> anyhow::Result<()> {
    let body = random_bytes(50_000);
    let digest = sha256_digest(&body);
    let server = plain_server(body.clone(), digest.clone()).await?;
    let rc = Regctl::default();
    let url = format!("{server}/v2/lab/app/blobs/{digest}");

    let out = rc.run(&["check-cdn", &url, "-o", "json"]).await?;
    out.expect_code(1, "no range, no etag")?;
    let report = out.json()?;
    assert_eq!(report["ok"], false);
    assert_eq!(failed(&report), ["etag", "accept-ranges", "range", "if-none-match"], "{report}");
    for c in report["checks"].as_array().cloned().unwrap_or_default() {
        if c["result"] == "fail" {
            assert!(c["meaning"].as_str().is_some_and(|m| m.len() > 20), "a failure without its meaning: {c}");
        }
    }
    let range = report["checks"].as_array().and_then(|a| a.iter().find(|c| c["name"] == "range")).cloned();
    assert!(range.is_some_and(|c| c["detail"].as_str().is_some_and(|d| d.contains("200"))), "{report}");

    // The table names the failures and what they mean; the error line lists them.
    let out = rc.run(&["check-cdn", &url]).await?;
    out.expect_code(1, "table")?;
    expect_aligned(&out.stdout)?;
    for name in ["etag", "accept-ranges", "range", "if-none-match"] {
        assert!(out.stdout.lines().any(|l| l.starts_with(name) && l.contains("   FAIL   ")), "{name}:\n{}", out.stdout);
        assert!(out.stdout.contains(&format!("  {name}: ")), "no meaning for {name}:\n{}", out.stdout);
    }
    assert!(out.stdout.contains("what the failures mean:"), "{}", out.stdout);
    out.expect_error("4 check(s) failed", "error line")?;
    assert!(out.stderr.contains("etag, accept-ranges, range, if-none-match"), "{}", out.stderr);

    // Bytes that are not what the URL's digest and Docker-Content-Digest say.
    let other = random_bytes(1000);
    let lying = plain_server(other, digest.clone()).await?;
    let out = rc.run(&["check-cdn", &format!("{lying}/v2/lab/app/blobs/{digest}"), "-o", "json"]).await?;
    out.expect_code(1, "altered bytes")?;
    let report = out.json()?;
    assert!(failed(&report).contains(&"digest".to_owned()), "{report}");

    // Nothing listening.
    let port = wharf_tests::control::free_port()?;
    rc.run(&["check-cdn", &format!("http://127.0.0.1:{port}/v2/lab/app/blobs/{digest}")])
        .await?
        .expect_error(&format!("127.0.0.1:{port}"), "unreachable")?;
    Ok(())
}
