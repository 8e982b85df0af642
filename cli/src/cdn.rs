//! `regctl check-cdn URL`: is a blob or manifest served the way CDNs and registry clients need?

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde::Serialize;
use wharf_core::{Digest, DigestHasher};

use crate::args::{CheckCdnArgs, Global};
use crate::client::error_chain;
use crate::error::CliError;
use crate::output::{self, Table};
use crate::registry::MANIFEST_ACCEPT;

/// Bytes asked for in the Range check.
const RANGE_LEN: u64 = 4096;

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

#[derive(Serialize, Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub result: Outcome,
    pub detail: String,
    /// What a failure means for clients and CDNs (empty unless failed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub meaning: String,
}

#[derive(Serialize, Debug)]
struct Report {
    url: String,
    ok: bool,
    checks: Vec<Check>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, result: Outcome::Pass, detail: detail.into(), meaning: String::new() }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, result: Outcome::Fail, detail: detail.into(), meaning: meaning(name).into() }
}

fn skip(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, result: Outcome::Skip, detail: detail.into(), meaning: String::new() }
}

/// Every check, in the order they are printed.
pub const CHECKS: [&str; 8] =
    ["status", "etag", "cache-control", "accept-ranges", "range", "if-none-match", "head", "digest"];

fn meaning(name: &str) -> &'static str {
    match name {
        "status" => "clients cannot pull this URL at all",
        "etag" => {
            "without a strong ETag, CDNs cannot revalidate a cached copy and clients cannot resume with If-Range: every miss is a full download"
        }
        "cache-control" => {
            "CDNs will not cache the response (or revalidate it every time): every pull reaches the node"
        }
        "accept-ranges" => {
            "clients do not know they may resume an interrupted download or read part of a layer (lazy pulling)"
        }
        "range" => {
            "interrupted layer downloads restart from zero, and lazy-pulling clients (stargz, SOCI) break or read wrong bytes"
        }
        "if-none-match" => {
            "revalidations download the whole body again instead of a 304: CDNs and clients waste bandwidth"
        }
        "head" => {
            "clients check for blobs and manifests with HEAD: a HEAD that disagrees with GET makes them skip, repeat or refuse a pull"
        }
        "digest" => {
            "clients verify content against Docker-Content-Digest: a missing or wrong one fails pulls by tag, and wrong bytes mean something altered them on the way"
        }
        _ => "",
    }
}

/// What the full GET returned.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    len: u64,
    digest: Digest,
    /// The range that was kept while streaming, and its bytes.
    range: Option<(u64, u64, Vec<u8>)>,
}

fn header(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the URL names a manifest (`.../manifests/<reference>`).
fn is_manifest(url: &str) -> bool {
    url.split(['?', '#']).next().unwrap_or("").rsplit('/').nth(1) == Some("manifests")
}

/// The digest a `/blobs/<digest>` or `/manifests/<digest>` URL names.
fn url_digest(url: &str) -> Option<Digest> {
    let path = url.split(['?', '#']).next()?;
    let last = path.rsplit('/').next()?;
    last.parse().ok()
}

pub async fn run(global: &Global, args: CheckCdnArgs) -> Result<(), CliError> {
    let url = args.url.clone();
    let parsed = reqwest::Url::parse(&url).map_err(|e| CliError::Usage(format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CliError::Usage(format!("{url:?} is not an http:// or https:// URL")));
    }
    let http = crate::tls::http_client(global)?
        .timeout(args.request_timeout)
        .build()
        .map_err(|e| CliError::Failed(format!("building the HTTP client: {}", error_chain(&e))))?;
    let checks = check(&http, &url).await?;
    let ok = checks.iter().all(|c| c.result != Outcome::Fail);
    let report = Report { url: url.clone(), ok, checks };
    output::emit(global.output, &report, || table(&report))?;
    if ok {
        Ok(())
    } else {
        let failed: Vec<&str> = report.checks.iter().filter(|c| c.result == Outcome::Fail).map(|c| c.name).collect();
        Err(CliError::Failed(format!("{} check(s) failed for {url}: {}", failed.len(), failed.join(", "))))
    }
}

fn get(http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    http.get(url).header(header::ACCEPT, MANIFEST_ACCEPT)
}

/// Runs every check against `url`. Fails only when the first GET gets no response at all.
pub async fn check(http: &reqwest::Client, url: &str) -> Result<Vec<Check>, CliError> {
    let got = full_get(http, url).await?;
    let mut out = Vec::new();
    if got.status != StatusCode::OK {
        out.push(fail("status", format!("GET answered {} (expected 200)", got.status)));
        for name in &CHECKS[1..] {
            out.push(skip(name, "no 200 response to check"));
        }
        return Ok(out);
    }
    out.push(pass("status", format!("200, {} bytes", got.len)));

    // ETag
    let etag = header(&got.headers, header::ETAG).map(str::to_owned);
    out.push(match &etag {
        None => fail("etag", "no ETag header"),
        Some(e) if e.starts_with("W/") => fail("etag", format!("{e} is a weak ETag")),
        Some(e) if e.contains(&got.digest.to_string()) => pass("etag", e.clone()),
        Some(e) => pass("etag", format!("{e} (strong; not the digest)")),
    });

    // Cache-Control
    out.push(cache_control(header(&got.headers, header::CACHE_CONTROL), url_digest(url).is_some()));

    // Accept-Ranges and Range. Registry clients never ask for part of a manifest: for manifests,
    // no range support is noted, not failed (a wrong answer to a range still fails).
    let manifest = is_manifest(url);
    let ranges = header(&got.headers, header::ACCEPT_RANGES);
    out.push(match ranges {
        Some(v) if v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes")) => pass("accept-ranges", v),
        _ if manifest => skip("accept-ranges", "not advertised (manifests: clients do not need ranges)"),
        Some(v) => fail("accept-ranges", format!("Accept-Ranges: {v}")),
        None => fail("accept-ranges", "no Accept-Ranges header"),
    });
    let range = range_check(http, url, &got).await;
    out.push(match range.result {
        Outcome::Fail if manifest && ranges.is_none() && range.detail.contains("answered 200") => {
            skip("range", "ranges not served (manifests: clients do not need ranges)")
        }
        _ => range,
    });

    // If-None-Match
    out.push(match &etag {
        None => fail("if-none-match", "no ETag to revalidate with"),
        Some(e) => match get(http, url).header(header::IF_NONE_MATCH, e.as_str()).send().await {
            Ok(r) if r.status() == StatusCode::NOT_MODIFIED => pass("if-none-match", "304 Not Modified"),
            Ok(r) => fail("if-none-match", format!("If-None-Match: {e} answered {} (expected 304)", r.status())),
            Err(err) => fail("if-none-match", format!("request failed: {}", error_chain(&err))),
        },
    });

    // HEAD
    out.push(head_check(http, url, &got).await);

    // Docker-Content-Digest
    let named = url_digest(url);
    out.push(match (header(&got.headers, "docker-content-digest"), named) {
        (_, Some(n)) if n != got.digest => {
            fail("digest", format!("the bytes hash to {}, the URL names {n}", got.digest))
        }
        (None, _) => fail("digest", format!("no Docker-Content-Digest header (the bytes hash to {})", got.digest)),
        (Some(h), _) if h != got.digest.to_string() => {
            fail("digest", format!("Docker-Content-Digest: {h}, but the bytes hash to {}", got.digest))
        }
        (Some(h), _) => pass("digest", format!("{h} matches the bytes")),
    });
    Ok(out)
}

async fn full_get(http: &reqwest::Client, url: &str) -> Result<Got, CliError> {
    let failed = |e: reqwest::Error| CliError::Failed(format!("GET {url}: {}", error_chain(&e)));
    let mut resp = get(http, url).send().await.map_err(failed)?;
    let status = resp.status();
    let headers = resp.headers().clone();
    // The range to check: from the middle when the length is known, else the start.
    let (start, end) = match resp.content_length() {
        Some(0) => (0, 0),
        Some(l) => {
            let s = l / 2;
            (s, (s + RANGE_LEN).min(l) - 1)
        }
        None => (0, RANGE_LEN - 1),
    };
    let mut kept = Vec::new();
    let mut hasher = DigestHasher::new();
    let mut len = 0u64;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) if status == StatusCode::OK => {
                return Err(CliError::Failed(format!(
                    "GET {url}: the body broke off after {len} bytes: {}",
                    error_chain(&e)
                )));
            }
            Err(_) => break,
        };
        hasher.update(&chunk);
        let (c0, c1) = (len, len + chunk.len() as u64);
        let (a, b) = (start.max(c0), (end + 1).min(c1));
        if a < b {
            kept.extend_from_slice(&chunk[(a - c0) as usize..(b - c0) as usize]);
        }
        len = c1;
    }
    let range = if len == 0 {
        None
    } else {
        let end = end.min(len - 1);
        kept.truncate((end + 1 - start) as usize);
        (start < len).then_some((start, end, kept))
    };
    Ok(Got { status, headers, len, digest: hasher.finish(), range })
}

fn cache_control(v: Option<&str>, by_digest: bool) -> Check {
    let Some(v) = v else {
        return fail("cache-control", "no Cache-Control header");
    };
    let directives: Vec<String> = v.split(',').map(|d| d.trim().to_ascii_lowercase()).collect();
    let has = |name: &str| directives.iter().any(|d| d == name);
    let max_age = directives.iter().find_map(|d| {
        let (k, val) = d.split_once('=')?;
        matches!(k.trim(), "max-age" | "s-maxage").then(|| val.trim().trim_matches('"').parse::<u64>().ok()).flatten()
    });
    if has("no-store") || has("private") || has("no-cache") {
        return fail("cache-control", format!("{v}: shared caches may not store or reuse it"));
    }
    match max_age {
        None | Some(0) => fail("cache-control", format!("{v}: no positive max-age")),
        Some(_) if by_digest && !has("immutable") => {
            pass("cache-control", format!("{v} (content by digest could be immutable)"))
        }
        Some(_) => pass("cache-control", v),
    }
}

async fn range_check(http: &reqwest::Client, url: &str, got: &Got) -> Check {
    let Some((start, end, want)) = &got.range else {
        return skip("range", "empty body: nothing to ask a range of");
    };
    let resp = match get(http, url).header(header::RANGE, format!("bytes={start}-{end}")).send().await {
        Ok(r) => r,
        Err(e) => return fail("range", format!("request failed: {}", error_chain(&e))),
    };
    let status = resp.status();
    let content_range = header(resp.headers(), header::CONTENT_RANGE).map(str::to_owned);
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return fail("range", format!("the body broke off: {}", error_chain(&e))),
    };
    let asked = format!("bytes={start}-{end}");
    if status != StatusCode::PARTIAL_CONTENT {
        return fail("range", format!("Range: {asked} answered {status} (expected 206 Partial Content)"));
    }
    let expected = format!("bytes {start}-{end}/{}", got.len);
    if content_range.as_deref() != Some(expected.as_str()) {
        return fail("range", format!("Content-Range: {:?}, expected {expected:?}", content_range.unwrap_or_default()));
    }
    if body.as_ref() != want.as_slice() {
        return fail(
            "range",
            format!("Range: {asked} returned {} bytes that differ from those of the full GET", body.len()),
        );
    }
    pass("range", format!("206, {expected}"))
}

async fn head_check(http: &reqwest::Client, url: &str, got: &Got) -> Check {
    let resp = match http.head(url).header(header::ACCEPT, MANIFEST_ACCEPT).send().await {
        Ok(r) => r,
        Err(e) => return fail("head", format!("request failed: {}", error_chain(&e))),
    };
    if resp.status() != StatusCode::OK {
        return fail("head", format!("HEAD answered {} while GET answered 200", resp.status()));
    }
    let h = resp.headers();
    let mut diffs = Vec::new();
    let len = header(h, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if len != Some(got.len) {
        diffs.push(format!(
            "Content-Length {} (GET sent {} bytes)",
            len.map_or_else(|| "missing".to_owned(), |l| l.to_string()),
            got.len
        ));
    }
    for name in [header::ETAG.as_str(), "docker-content-digest", header::CONTENT_TYPE.as_str()] {
        let (a, b) = (header(h, name), header(&got.headers, name));
        if a != b {
            diffs.push(format!("{name} {:?} (GET: {:?})", a.unwrap_or(""), b.unwrap_or("")));
        }
    }
    if diffs.is_empty() {
        pass("head", "200 with the same length, ETag, digest and type")
    } else {
        fail("head", format!("HEAD differs: {}", diffs.join("; ")))
    }
}

fn table(r: &Report) -> String {
    let mut t = Table::new(&["CHECK", "RESULT", "DETAIL"]);
    for c in &r.checks {
        let result = match c.result {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        t.row(vec![c.name.to_owned(), result.to_owned(), c.detail.clone()]);
    }
    let mut out = t.render();
    let failed: Vec<&Check> = r.checks.iter().filter(|c| c.result == Outcome::Fail).collect();
    if failed.is_empty() {
        out.push_str(&format!("\nall checks passed for {}\n", r.url));
    } else {
        out.push_str("\nwhat the failures mean:\n");
        for c in failed {
            out.push_str(&format!("  {}: {}\n", c.name, c.meaning));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_rules() {
        assert_eq!(cache_control(Some("public, max-age=31536000, immutable"), true).result, Outcome::Pass);
        assert_eq!(cache_control(Some("public, max-age=60"), false).result, Outcome::Pass);
        assert_eq!(cache_control(Some("no-store"), true).result, Outcome::Fail);
        assert_eq!(cache_control(Some("public"), true).result, Outcome::Fail);
        assert_eq!(cache_control(None, true).result, Outcome::Fail);
    }

    #[test]
    fn digests_in_urls() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(url_digest(&format!("http://n/v2/k/a/blobs/{d}")).map(|d| d.to_string()), Some(d.clone()));
        assert!(url_digest("http://n/v2/k/a/manifests/latest").is_none());
    }
}
