//! `/metrics` after a scripted sequence: exact counter values per repoKey and outcome on a node
//! (hits, misses, coalesced followers, a 404, a stale tag, a revalidated tag, a rate-limited
//! upstream), and the control plane's API counters, connected nodes and a node's config revision.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::Method;
use serde_json::json;
use wharf_tests::control::{ControlPlane, Node, create_repo, poll, repo_json, rest, rest_json};
use wharf_tests::fake::FaultRule;
use wharf_tests::http::get;
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::prom::{Scrape, key};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Fault, Proxy, TestImage};

const KB: usize = 1024;
const WAIT: Duration = Duration::from_secs(15);

async fn scrape(base: &str) -> anyhow::Result<Scrape> {
    let r = get(&format!("{base}/metrics"), &[]).await?;
    anyhow::ensure!(r.status == 200, "GET {base}/metrics: {} {}", r.status, r.text());
    Scrape::parse(&r.text())
}

/// Polls `/metrics` until `ready` holds (request counters are written when a response body ends,
/// which may be a moment after the client has read its last byte). Also returns how many scrapes
/// it took.
async fn scrape_when(base: &str, what: &str, ready: impl Fn(&Scrape) -> bool) -> anyhow::Result<(Scrape, usize)> {
    let last = std::sync::Mutex::new((None, 0));
    let got = poll(WAIT, what, || async {
        let s = scrape(base).await;
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        last.1 += 1;
        let s = s.ok()?;
        last.0 = Some(s.clone());
        ready(&s).then_some((s, last.1))
    })
    .await;
    got.map_err(|e| e.context(format!("last scrape: {:#?}", last.lock().unwrap_or_else(|e| e.into_inner()).0)))
}

fn expected(name: &str, rows: &[(&[(&str, &str)], f64)]) -> BTreeMap<String, f64> {
    rows.iter().map(|(labels, v)| (key(name, labels), *v)).collect()
}

fn assert_family(s: &Scrape, name: &str, rows: &[(&[(&str, &str)], f64)]) {
    assert_eq!(s.family(name), expected(name, rows), "{name}: every series, exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_metrics_count_every_outcome_per_repo_key() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let app = TestImage::random("v1", &[64 * KB])?;
    fake.put_image("org/app", &app);
    let slow = fake.add_random_blob(256 * KB);
    let web = TestImage::random("v1", &[8 * KB])?;
    fake.put_image("org/web", &web);
    fake.put_manifest("org/web", Some("v2"), OCI_MANIFEST, web.manifest.data.clone());
    // `lab` trusts tags for 5 minutes; `edge` revalidates every tag request.
    let config = format!(
        "{}{}",
        repo_config("lab", &fake.url(), "generic", "5m"),
        repo_config("edge", &fake.url(), "generic", "0s")
    );
    let proxy = Proxy::spawn(&config, &["--retries", "2", "--retry-backoff", "10ms"])?;
    let base = proxy.url();
    let accept = [("accept", OCI_MANIFEST)];

    // lab: a cold manifest by tag, then cached.
    let app_url = proxy.v2("lab/org/app/manifests/v1");
    for _ in 0..2 {
        let r = get(&app_url, &accept).await?;
        assert_eq!((r.status, r.digest()), (200, app.manifest.digest.clone()));
    }
    // lab: a cold blob, then a hit.
    let layer = &app.layers[0];
    let layer_url = proxy.v2(&format!("lab/org/app/blobs/{}", layer.digest));
    for _ in 0..2 {
        let r = get(&layer_url, &[]).await?;
        assert_eq!((r.status, r.digest()), (200, layer.digest.clone()));
    }
    // lab: three clients on one cold blob that the upstream holds back: 1 miss, 2 coalesced.
    fake.add_fault(FaultRule {
        pattern: slow.digest.clone(),
        methods: Some(vec![Method::GET]),
        fault: Fault::Pause { after: 64 * KB },
        times: None,
    });
    let slow_url = proxy.v2(&format!("lab/org/app/blobs/{}", slow.digest));
    let pull = |url: String| tokio::spawn(async move { get(&url, &[]).await });
    let mut pulls = vec![pull(slow_url.clone())];
    wharf_tests::wait_until_async(WAIT, "the leader's upstream GET", || {
        (fake.count("GET", &slow.digest) == 1).then_some(())
    })
    .await?;
    pulls.push(pull(slow_url.clone()));
    pulls.push(pull(slow_url.clone()));
    let (during, _) = scrape_when(&base, "2 coalesced waiters", |s| {
        s.get("wharf_coalesced_waiters_total", &[("repo_key", "lab")]) == Some(2.0)
    })
    .await?;
    assert_eq!(during.get("wharf_inflight_fetches", &[]), Some(1.0), "one fetch in flight while held back");
    fake.release();
    for p in pulls {
        let r = p.await??;
        assert_eq!((r.status, r.digest()), (200, slow.digest.clone()));
    }
    assert_eq!(fake.count("GET", &slow.digest), 1, "{}", fake.describe_requests());
    // lab: a manifest the upstream does not have.
    let r = get(&proxy.v2("lab/org/app/manifests/nope"), &accept).await?;
    assert_eq!(r.status, 404, "{}", r.text());

    // edge: a cold tag; then upstream fails its revalidation (stale); then confirms it.
    let web_url = proxy.v2("edge/org/web/manifests/v1");
    let r = get(&web_url, &accept).await?;
    assert_eq!((r.status, r.digest()), (200, web.manifest.digest.clone()));
    fake.add_fault(FaultRule {
        pattern: "/org/web/manifests/v1".into(),
        methods: Some(vec![Method::HEAD]),
        fault: Fault::Status { status: 500, retry_after: None },
        times: Some(1),
    });
    let r = get(&web_url, &accept).await?;
    assert_eq!((r.status, r.digest()), (200, web.manifest.digest.clone()));
    assert!(r.header("warning").is_some_and(|w| w.starts_with("299 - ")), "a stale answer carries a Warning");
    let r = get(&web_url, &accept).await?;
    assert_eq!((r.status, r.header("warning")), (200, None));
    // edge: the upstream rate-limits (3 attempts: 1 + 2 retries) and reports what is left.
    fake.set_response_header("ratelimit-remaining", "42;w=21600");
    fake.add_fault(FaultRule {
        pattern: "/org/web/manifests/v2".into(),
        methods: Some(vec![Method::GET]),
        fault: Fault::Status { status: 429, retry_after: None },
        times: None,
    });
    let r = get(&proxy.v2("edge/org/web/manifests/v2"), &accept).await?;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(fake.count("GET", "/org/web/manifests/v2"), 3, "{}", fake.describe_requests());

    let (s, _) = scrape_when(&base, "12 requests counted", |s| s.sum("wharf_requests_total") == 12.0).await?;

    let m = "manifest";
    let b = "blob";
    assert_family(
        &s,
        "wharf_requests_total",
        &[
            (&[("repo_key", "lab"), ("kind", m), ("cache", "miss"), ("status", "200")], 1.0),
            (&[("repo_key", "lab"), ("kind", m), ("cache", "hit"), ("status", "200")], 1.0),
            // An upstream 404 or 429 is counted with an empty outcome (see the report).
            (&[("repo_key", "lab"), ("kind", m), ("cache", "none"), ("status", "404")], 1.0),
            (&[("repo_key", "lab"), ("kind", b), ("cache", "miss"), ("status", "200")], 2.0),
            (&[("repo_key", "lab"), ("kind", b), ("cache", "hit"), ("status", "200")], 1.0),
            (&[("repo_key", "lab"), ("kind", b), ("cache", "coalesced"), ("status", "200")], 2.0),
            (&[("repo_key", "edge"), ("kind", m), ("cache", "miss"), ("status", "200")], 1.0),
            (&[("repo_key", "edge"), ("kind", m), ("cache", "stale"), ("status", "200")], 1.0),
            (&[("repo_key", "edge"), ("kind", m), ("cache", "revalidated"), ("status", "200")], 1.0),
            (&[("repo_key", "edge"), ("kind", m), ("cache", "none"), ("status", "429")], 1.0),
        ],
    );
    let (app_m, layer_n, slow_n, web_m) =
        (app.manifest.size() as f64, layer.size() as f64, slow.size() as f64, web.manifest.size() as f64);
    assert_family(
        &s,
        "wharf_served_bytes_total",
        &[
            (&[("repo_key", "lab"), ("source", "cache")], app_m + layer_n),
            (&[("repo_key", "lab"), ("source", "upstream")], app_m + layer_n + 3.0 * slow_n),
            (&[("repo_key", "edge"), ("source", "cache")], 2.0 * web_m),
            (&[("repo_key", "edge"), ("source", "upstream")], web_m),
        ],
    );
    assert_family(
        &s,
        "wharf_upstream_requests_total",
        &[
            (&[("repo_key", "lab"), ("method", "GET"), ("status", "200")], 3.0),
            (&[("repo_key", "lab"), ("method", "GET"), ("status", "404")], 1.0),
            (&[("repo_key", "edge"), ("method", "GET"), ("status", "200")], 1.0),
            (&[("repo_key", "edge"), ("method", "HEAD"), ("status", "500")], 1.0),
            (&[("repo_key", "edge"), ("method", "HEAD"), ("status", "200")], 1.0),
            (&[("repo_key", "edge"), ("method", "GET"), ("status", "429")], 3.0),
        ],
    );
    assert_family(
        &s,
        "wharf_upstream_request_duration_seconds_count",
        &[(&[("repo_key", "lab")], 4.0), (&[("repo_key", "edge")], 6.0)],
    );
    assert_family(
        &s,
        "wharf_request_duration_seconds_count",
        &[
            (&[("repo_key", "lab"), ("kind", m)], 3.0),
            (&[("repo_key", "lab"), ("kind", b)], 5.0),
            (&[("repo_key", "edge"), ("kind", m)], 4.0),
        ],
    );
    assert_family(&s, "wharf_upstream_fetched_bytes_total", &[(&[("repo_key", "lab")], layer_n + slow_n)]);
    assert_family(&s, "wharf_coalesced_waiters_total", &[(&[("repo_key", "lab")], 2.0)]);
    assert_family(&s, "wharf_inflight_fetches", &[(&[], 0.0)]);
    // Only where the upstream reported it.
    assert_family(&s, "wharf_upstream_ratelimit_remaining", &[(&[("repo_key", "edge")], 42.0)]);
    // Cached: two manifests and two blobs (the config blob was never asked for).
    assert_family(&s, "wharf_cache_entries", &[(&[], 4.0)]);
    assert_family(&s, "wharf_cache_size_bytes", &[(&[], app_m + web_m + layer_n + slow_n)]);
    // The one blob hit (plain HTTP, verified by its fetch) was served from a shared map, still kept.
    assert_family(&s, "wharf_cache_mapped_bytes", &[(&[], layer_n)]);
    // Nothing evicted, nothing served uncached, no control plane: those series do not exist yet.
    for absent in ["wharf_evictions_total", "wharf_evicted_bytes_total", "wharf_uncached_bytes_total"] {
        assert_family(&s, absent, &[]);
    }
    assert_family(&s, "wharf_config_revision", &[]);
    // Histogram buckets are cumulative and end with +Inf = count.
    let inf = s.get("wharf_upstream_request_duration_seconds_bucket", &[("repo_key", "edge"), ("le", "+Inf")]);
    assert_eq!(inf, Some(6.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_metrics_count_api_calls_and_connected_nodes() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let base = cp.url();
    let node = Node::spawn("metrics-node", std::slice::from_ref(&base))?;

    let rev = create_repo(&base, &repo_json("lab", "http://127.0.0.1:1")).await?;
    let r = rest("GET", &cp.api("/api/repos"), &[], None).await?;
    assert_eq!(r.status, 200);
    let r = rest("GET", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(r.status, 200);
    let r = rest("GET", &cp.api("/api/repos/nope"), &[], None).await?;
    assert_eq!(r.status, 404);
    let r = rest_json("POST", &cp.api("/api/repos"), &[], &json!({ "key": "Bad Key!" })).await?;
    assert_eq!(r.status, 400);
    let r = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("lab", "http://127.0.0.1:1")).await?;
    assert_eq!(r.status, 409);
    let r = rest("DELETE", &cp.api("/api/repos/nope"), &[], None).await?;
    assert_eq!(r.status, 404);

    node.wait_applied(rev, WAIT)?;
    let (s, scrapes) =
        scrape_when(&base, "the node connected", |s| s.get("wharf_control_connected_nodes", &[]) == Some(1.0)).await?;
    // REST calls exactly: scrapes (and health checks) are not API calls, however many there were.
    assert!(scrapes >= 1);
    let rest_rows = s.family_where("wharf_control_api_requests_total", &[("api", "rest")]);
    let row = |method: &str, code: &str| {
        key("wharf_control_api_requests_total", &[("api", "rest"), ("method", method), ("code", code)])
    };
    let want: BTreeMap<String, f64> = [
        (row("POST", "201"), 1.0),
        (row("GET", "200"), 2.0),
        (row("GET", "404"), 1.0),
        (row("POST", "400"), 1.0),
        (row("POST", "409"), 1.0),
        (row("DELETE", "404"), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(rest_rows, want, "REST calls by method and code");
    // The node's gRPC calls: at least its Watch stream, all OK so far.
    let grpc = s.family_where("wharf_control_api_requests_total", &[("api", "grpc")]);
    assert!(grpc.keys().any(|k| k.contains("method=\"Watch\"")), "{grpc:#?}");
    assert!(grpc.keys().all(|k| k.contains("code=\"0\"")), "{grpc:#?}");
    // Every call was timed.
    let timed: f64 = s.family("wharf_control_api_request_duration_seconds_count").values().sum();
    let counted: f64 = s.sum("wharf_control_api_requests_total");
    assert_eq!(timed, counted, "one duration per counted call");

    // The node reports the revision it applied.
    let (ns, _) = scrape_when(&format!("http://{}", node.addr()), "the node's config revision", |s| {
        s.get("wharf_config_revision", &[]) == Some(rev as f64)
    })
    .await?;
    assert_family(&ns, "wharf_requests_total", &[]);
    Ok(())
}
