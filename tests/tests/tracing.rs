//! Tracing: a cold blob pull's span tree as exported over OTLP (continuing the client's
//! `traceparent`, sending it upstream), no secret in any span or log line, and a dead collector
//! that does not slow pulls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use wharf_tests::http::get;
use wharf_tests::otlp::{Collector, RecordedSpan};
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// `span`'s ancestors' names, nearest first (as far as they were exported).
fn ancestors<'a>(span: &'a RecordedSpan, by_id: &HashMap<&str, &'a RecordedSpan>) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut cur = span;
    while let Some(p) = by_id.get(cur.parent_span_id.as_str()) {
        out.push(p.name.as_str());
        cur = p;
    }
    out
}

fn one<'a>(spans: &'a [RecordedSpan], name: &str) -> &'a RecordedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name && s.trace_id == TRACE_ID).collect();
    assert_eq!(found.len(), 1, "exactly one {name} span in the trace: {found:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_blob_pull_exports_its_span_tree_and_no_secret() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let password = format!("upstream-pw-{}", wharf_tests::random_name("x"));
    let fake = FakeUpstream::start_with(AuthMode::Basic { username: "bot".into(), password: password.clone() }).await?;
    let blob = fake.add_random_blob(300_000);
    let env_var = "WHARF_TEST_TRACING_PASSWORD".to_string();
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"{env_var}\"\n",
        repo_config("lab", &fake.url(), "generic", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![(env_var, password.clone()), ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..ProxyOptions::new(&config, &["--otlp-endpoint", &collector.endpoint()])
    })?;

    let client_secret = format!("client-secret-{}", wharf_tests::random_name("y"));
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let auth = format!("Bearer {client_secret}");
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let resp = get(&url, &[("traceparent", &traceparent), ("authorization", &auth)]).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.digest(), blob.digest);

    let spans = collector
        .wait_for(Duration::from_secs(15), "the cold pull's spans", |spans| {
            ["wharf.request", "cache.lookup", "blob.fetch", "upstream.fetch", "blob.stream"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n && s.trace_id == TRACE_ID))
        })
        .await?;
    let by_id: HashMap<&str, &RecordedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let len = blob.data.len().to_string();

    // The server span continues the client's trace.
    let request = one(&spans, "wharf.request");
    assert_eq!(request.parent_span_id, PARENT_ID, "{request:#?}");
    assert_eq!(request.kind, 2, "server kind: {request:#?}");
    assert_eq!(request.service, "wharf-proxy");
    assert_eq!(request.attr("repo_key"), Some("lab"));
    assert_eq!(request.attr("name"), Some("org/img"));
    assert_eq!(request.attr("kind"), Some("blob"));
    assert_eq!(request.attr("reference"), Some(blob.digest.as_str()));
    assert_eq!(request.attr("cache"), Some("miss"));
    assert_eq!(request.attr("http.response.status_code"), Some("200"));
    assert_eq!(request.attr("bytes"), Some(len.as_str()));

    let lookup = one(&spans, "cache.lookup");
    assert_eq!(lookup.parent_span_id, request.span_id);
    assert_eq!(lookup.attr("cache"), Some("miss"));
    // Nothing its parent already says.
    assert_eq!(lookup.attributes.keys().collect::<Vec<_>>(), ["cache"], "{lookup:#?}");

    let fetch = one(&spans, "blob.fetch");
    assert_eq!(fetch.parent_span_id, request.span_id, "the fetch is a child of the first client's request");
    assert_eq!(fetch.attr("digest"), Some(blob.digest.as_str()));
    assert_eq!(fetch.attr("bytes"), Some(len.as_str()));
    assert_eq!(fetch.attr("outcome"), Some("verified"));

    // Basic auth: the first attempt is challenged (401), the second succeeds.
    let upstream: Vec<&RecordedSpan> =
        spans.iter().filter(|s| s.name == "upstream.fetch" && s.trace_id == TRACE_ID).collect();
    let ok = upstream
        .iter()
        .find(|s| s.attr("http.response.status_code") == Some("200"))
        .unwrap_or_else(|| panic!("no upstream.fetch answered 200: {upstream:#?}"));
    assert_eq!(ancestors(ok, &by_id), ["blob.fetch", "wharf.request"], "{ok:#?}");
    assert_eq!(ok.kind, 3, "client kind");
    assert_eq!(ok.attr("repo_key"), Some("lab"));
    assert_eq!(ok.attr("http.request.method"), Some("GET"));
    assert!(ok.attr("url.full").is_some_and(|u| u.ends_with(&format!("/v2/org/img/blobs/{}", blob.digest))), "{ok:#?}");
    assert_eq!(ok.attr("bytes"), Some(len.as_str()));
    assert!(ok.attr("ttfb_ms").is_some() && ok.attr("duration_ms").is_some(), "{ok:#?}");
    let sent = ok.attr("http.request.headers").unwrap_or_default();
    assert!(sent.contains("authorization: <redacted>"), "{sent}");
    assert!(sent.contains(&format!("traceparent: 00-{TRACE_ID}-")), "{sent}");

    let stream = one(&spans, "blob.stream");
    assert_eq!(stream.parent_span_id, request.span_id);
    assert_eq!(stream.attr("digest"), Some(blob.digest.as_str()));
    assert_eq!(stream.attr("bytes"), Some(len.as_str()));

    // The upstream received the trace.
    let blob_gets = fake.requests_matching("GET", &format!("/blobs/{}", blob.digest));
    assert!(!blob_gets.is_empty());
    for r in &blob_gets {
        let tp = r.header("traceparent").unwrap_or_default();
        assert!(tp.starts_with(&format!("00-{TRACE_ID}-")), "upstream got traceparent {tp:?}");
    }

    // The request log line carries the trace id; the round-tripper wrote its debug line.
    let line = proxy.wait_request_log(Duration::from_secs(5), |f| f["kind"] == "blob")?;
    assert_eq!(line["trace_id"], TRACE_ID, "{line}");
    let logs = proxy.logs();
    let round_trip = logs
        .iter()
        .filter_map(|v| v.get("fields"))
        .find(|f| f["message"] == "upstream request" && f["status"] == 200)
        .unwrap_or_else(|| panic!("no `upstream request` debug line:\n{}", proxy.log_tail(40)));
    assert!(round_trip["request_headers"].as_str().is_some_and(|h| h.contains("authorization: <redacted>")));

    // No secret anywhere: neither the client's nor the upstream's, in any form.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{password}"));
    let everything = format!(
        "{}\n{}",
        proxy.all_output(),
        spans.iter().flat_map(|s| s.attributes.values()).cloned().collect::<Vec<_>>().join("\n")
    );
    for secret in [client_secret.as_str(), password.as_str(), basic.as_str()] {
        assert!(!everything.contains(secret), "secret {secret:?} leaked into a span or log line");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_collector_does_not_slow_pulls() -> anyhow::Result<()> {
    // A port that nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..10).map(|_| fake.add_random_blob(50_000)).collect();
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into())],
        ..ProxyOptions::new(
            &repo_config("lab", &fake.url(), "generic", "5m"),
            &["--otlp-endpoint", &format!("http://{dead}")],
        )
    })?;
    let started = Instant::now();
    for round in 0..3 {
        for b in &blobs {
            let t = Instant::now();
            let resp = get(&proxy.v2(&format!("lab/org/img/blobs/{}", b.digest)), &[]).await?;
            assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
            assert_eq!(resp.digest(), b.digest);
            assert!(t.elapsed() < Duration::from_secs(2), "a pull took {:?} with the collector down", t.elapsed());
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10), "30 pulls took {:?}", started.elapsed());
    // The spans that could not be exported are counted.
    let metrics = proxy.url() + "/metrics";
    let deadline = Instant::now() + Duration::from_secs(15);
    let dropped = loop {
        let m = get(&metrics, &[]).await?.text();
        if let Some(l) = m.lines().find(|l| l.starts_with("wharf_spans_dropped_total")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no wharf_spans_dropped_total within 15 s:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dropped.contains("reason=\"export_failed\""), "{dropped}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_traces_api_calls_and_store_operations() -> anyhow::Result<()> {
    use wharf_tests::control::{ControlOptions, ControlPlane, rest_json};

    let collector = Collector::start().await?;
    let cp = ControlPlane::spawn(ControlOptions {
        args: vec!["--otlp-endpoint".into(), collector.endpoint()],
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..Default::default()
    })?;
    let password = format!("repo-pw-{}", wharf_tests::random_name("z"));
    let body = serde_json::json!({
        "key": "traced", "kind": "generic", "upstream": "https://registry.example",
        "username": "bot", "password": password,
    });
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let resp = rest_json("POST", &cp.api("/api/repos"), &[("traceparent", &traceparent)], &body).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());

    let spans = collector
        .wait_for(Duration::from_secs(15), "the API call and its store spans", |spans| {
            spans.iter().any(|s| s.name == "control.api" && s.trace_id == TRACE_ID)
                && spans.iter().any(|s| s.name == "store.create" && s.trace_id == TRACE_ID)
        })
        .await?;
    let api = one(&spans, "control.api");
    assert_eq!(api.parent_span_id, PARENT_ID, "continues the caller's trace: {api:#?}");
    assert_eq!(api.service, "wharf-control");
    assert_eq!(api.attr("api"), Some("rest"));
    assert_eq!(api.attr("http.response.status_code"), Some("201"));
    let create = one(&spans, "store.create");
    assert_eq!(create.parent_span_id, api.span_id, "{create:#?}");
    assert_eq!(create.attr("key"), Some("repos/traced"));
    assert_eq!(create.attr("outcome"), Some("ok"));
    assert!(create.attr("revision").is_some_and(|r| r.parse::<i64>().is_ok_and(|r| r > 0)), "{create:#?}");

    let everything = format!(
        "{}\n{}",
        cp.all_output(),
        spans.iter().flat_map(|s| s.attributes.values()).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(!everything.contains(&password), "the repo's password leaked into a span or log line");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_requests_are_round_tripped_without_credentials_or_tokens() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let password = format!("token-pw-{}", wharf_tests::random_name("t"));
    let fake = FakeUpstream::start_with(AuthMode::Bearer {
        credentials: Some(("bot".into(), password.clone())),
        expires_in: None,
    })
    .await?;
    let blob = fake.add_random_blob(10_000);
    let env_var = "WHARF_TEST_TRACING_TOKEN_PASSWORD".to_string();
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"{env_var}\"\n",
        repo_config("lab", &fake.url(), "generic", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![(env_var, password.clone()), ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..ProxyOptions::new(&config, &["--otlp-endpoint", &collector.endpoint()])
    })?;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let resp = get(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[("traceparent", &traceparent)]).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(fake.tokens_issued() >= 1);

    // The token exchange is an upstream.fetch of its own in the pull's trace.
    let spans = collector
        .wait_for(Duration::from_secs(15), "the token request's span", |spans| {
            spans.iter().any(|s| {
                s.name == "upstream.fetch"
                    && s.trace_id == TRACE_ID
                    && s.attr("url.full").is_some_and(|u| u.contains("/token"))
                    && s.attr("http.response.status_code") == Some("200")
            }) && spans.iter().any(|s| s.name == "wharf.request" && s.trace_id == TRACE_ID)
        })
        .await?;
    let token_span = spans
        .iter()
        .find(|s| s.name == "upstream.fetch" && s.attr("url.full").is_some_and(|u| u.contains("/token")))
        .map(|s| s.attr("http.request.headers").unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(token_span.contains("authorization: <redacted>"), "{token_span}");

    // Tokens the fake issued (Bearer values sent upstream afterwards) and the password stay out.
    let bearer: Vec<String> = fake
        .requests_matching("GET", "/blobs/")
        .iter()
        .filter_map(|r| r.header("authorization").and_then(|a| a.strip_prefix("Bearer ")).map(str::to_owned))
        .collect();
    assert!(!bearer.is_empty(), "{}", fake.describe_requests());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{password}"));
    let everything = format!(
        "{}\n{}",
        proxy.all_output(),
        spans.iter().flat_map(|s| s.attributes.values()).cloned().collect::<Vec<_>>().join("\n")
    );
    for secret in bearer.iter().map(String::as_str).chain([password.as_str(), basic.as_str()]) {
        assert!(!everything.contains(secret), "secret {secret:?} leaked into a span or log line");
    }
    Ok(())
}

/// A failed request's span says so: an unknown tag (404) carries the error, an upstream that cannot
/// be reached (5xx) also sets the span's status to error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_requests_carry_their_error_and_server_errors_an_error_status() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let fake = FakeUpstream::start().await?;
    let config = format!(
        "{}{}",
        repo_config("lab", &fake.url(), "generic", "5m"),
        repo_config("gone", "http://127.0.0.1:1", "generic", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into())],
        ..ProxyOptions::new(&config, &["--otlp-endpoint", &collector.endpoint()])
    })?;
    let accept = [("accept", wharf_tests::image::OCI_MANIFEST)];
    let unknown = get(&proxy.v2("lab/org/img/manifests/nope"), &accept).await?;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let down = get(&proxy.v2("gone/org/img/manifests/v1"), &accept).await?;
    assert!(down.status >= 500, "an unreachable upstream answered {}: {}", down.status, down.text());
    let requests = |spans: &[RecordedSpan]| -> Vec<RecordedSpan> {
        spans.iter().filter(|s| s.name == "wharf.request").cloned().collect()
    };
    let spans =
        collector.wait_for(Duration::from_secs(15), "both requests' spans", |spans| requests(spans).len() >= 2).await?;
    let by_key = |key: &str| requests(&spans).into_iter().find(|s| s.attr("repo_key") == Some(key)).unwrap();
    let (unknown_span, down_span) = (by_key("lab"), by_key("gone"));
    assert_eq!(unknown_span.attr("http.response.status_code"), Some("404"));
    assert!(unknown_span.attr("error").is_some_and(|e| !e.is_empty()), "{unknown_span:#?}");
    assert_eq!(unknown_span.status, 0, "a 404 is the client's error, not the server's: {unknown_span:#?}");
    assert_eq!(down_span.attr("http.response.status_code"), Some(down.status.to_string().as_str()));
    assert!(down_span.attr("error").is_some_and(|e| !e.is_empty()), "{down_span:#?}");
    assert_eq!(down_span.status, 2, "a 5xx sets the span's status to error: {down_span:#?}");
    assert_eq!(down_span.attr("reference"), Some("v1"));
    assert_eq!(down_span.attr("kind"), Some("manifest"));
    Ok(())
}

/// Head sampling (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`): requests that are not sampled
/// build no spans at all, and a later sampled one (a `traceparent` with the sampled flag) is
/// exported whole, also after unsampled requests went through every callsite first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsampled_requests_export_nothing_and_sampled_ones_everything() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..3).map(|_| fake.add_random_blob(20_000)).collect();
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()),
            ("OTEL_TRACES_SAMPLER".into(), "parentbased_traceidratio".into()),
            ("OTEL_TRACES_SAMPLER_ARG".into(), "0".into()),
        ],
        ..ProxyOptions::new(
            &repo_config("lab", &fake.url(), "generic", "5m"),
            &["--otlp-endpoint", &collector.endpoint()],
        )
    })?;
    // Ratio 0, no traceparent (or one whose flag says not sampled): cold and warm pulls, no span.
    let not_sampled = format!("00-{TRACE_ID}-{PARENT_ID}-00");
    for b in &blobs[..2] {
        for headers in [&[][..], &[("traceparent", not_sampled.as_str())][..]] {
            let resp = get(&proxy.v2(&format!("lab/org/img/blobs/{}", b.digest)), headers).await?;
            assert_eq!(resp.status, 200, "{}", resp.text());
        }
    }
    // The sampled flag: the whole tree of a cold pull, in the caller's trace.
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blobs[2].digest));
    assert_eq!(get(&url, &[("traceparent", &traceparent)]).await?.status, 200);
    let spans = collector
        .wait_for(Duration::from_secs(15), "the sampled pull's spans", |spans| {
            ["wharf.request", "cache.lookup", "blob.fetch", "upstream.fetch", "blob.stream"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n))
        })
        .await?;
    let request = one(&spans, "wharf.request");
    assert_eq!(request.parent_span_id, PARENT_ID);
    // Nothing else: every exported span belongs to the sampled pull (blob.fetch is its own trace,
    // linked to it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = collector.spans();
    let others: Vec<_> = all.iter().filter(|s| s.trace_id != TRACE_ID && s.name != "blob.fetch").collect();
    assert!(others.is_empty(), "spans of unsampled requests were exported: {others:#?}");
    assert_eq!(all.iter().filter(|s| s.name == "wharf.request").count(), 1, "{all:#?}");
    Ok(())
}

/// A collector that accepts connections and never answers (a hung process, a black-holing proxy):
/// pulls take the same time as on a node exporting nothing. Both nodes pull the same blobs in
/// interleaved rounds; the ratio of their times is printed and bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_accepts_and_hangs_does_not_slow_pulls() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Accepts every connection and holds it, reading nothing, until the test ends.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let hung = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let holder = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            held.len()
        }
    });
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..10).map(|_| fake.add_random_blob(50_000)).collect();
    let spawn = |otlp: Option<String>| {
        let mut args = Vec::new();
        if let Some(o) = &otlp {
            args = vec!["--otlp-endpoint".to_owned(), o.clone()];
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proxy::spawn_with(ProxyOptions {
            env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into())],
            ..ProxyOptions::new(&repo_config("lab", &fake.url(), "generic", "5m"), &args)
        })
    };
    let with_hung = spawn(Some(format!("http://{hung}")))?;
    let without = spawn(None)?;
    let pull_all = |proxy: &Proxy| {
        let urls: Vec<String> = blobs.iter().map(|b| proxy.v2(&format!("lab/org/img/blobs/{}", b.digest))).collect();
        async move {
            let t = Instant::now();
            for u in &urls {
                let r = get(u, &[]).await?;
                anyhow::ensure!(r.status == 200, "{}", r.text());
            }
            Ok::<_, anyhow::Error>(t.elapsed())
        }
    };
    let mut ratios = Vec::new();
    for _ in 0..5 {
        let a = pull_all(&with_hung).await?;
        let b = pull_all(&without).await?;
        ratios.push(a.as_secs_f64() / b.as_secs_f64().max(1e-6));
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    eprintln!("pull time with a hung collector / without export: median {median:.2} of {ratios:?}");
    stop.store(true, Ordering::Relaxed);
    let held = holder.join().map_err(|_| anyhow::anyhow!("the holder thread panicked"))?;
    assert!(held >= 1, "the node never connected to the hung collector");
    assert!(median < 2.0, "pulls are {median:.2}x slower with a hung collector");
    Ok(())
}
