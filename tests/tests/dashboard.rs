//! The Grafana dashboard (`deploy/grafana/wharf.json`) is valid dashboard JSON and every metric its
//! PromQL references is one the code emits, used as what it is (`rate` of a counter, `_bucket` of a
//! histogram, a gauge as is), and is in a real scrape of a node and a control plane that did what
//! it measures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("source folder").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `metrics::counter!("name"`, `gauge!("name"`, `histogram!("name"` in the node's and the
/// control plane's sources.
fn emitted() -> BTreeMap<String, Kind> {
    let mut files = Vec::new();
    for dir in ["data-plane/src", "control-plane/src"] {
        rust_files(&workspace().join(dir), &mut files);
    }
    let mut out = BTreeMap::new();
    for f in files {
        let src = std::fs::read_to_string(&f).expect("source file");
        for (mac, kind) in [("counter!(", Kind::Counter), ("gauge!(", Kind::Gauge), ("histogram!(", Kind::Histogram)] {
            for (i, _) in src.match_indices(mac) {
                let rest = src[i + mac.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else { continue };
                let name: String = rest.chars().take_while(|c| *c != '"').collect();
                if let Some(old) = out.insert(name.clone(), kind) {
                    assert_eq!(old, kind, "{name} is emitted as two kinds of metric");
                }
            }
        }
    }
    out
}

/// `(metric name, whether it is the argument of rate/increase/irate)` for every `wharf_` name in `expr`.
fn referenced(expr: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("wharf_") {
        let start = i + off;
        let word_start = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        if word_start {
            let before = expr[..start].trim_end();
            let in_rate = ["rate(", "increase(", "irate("].iter().any(|f| before.ends_with(f));
            out.push((expr[start..end].to_owned(), in_rate));
        }
        i = end;
    }
    out
}

fn dashboard() -> Value {
    let path = workspace().join("deploy/grafana/wharf.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/wharf.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[test]
fn dashboard_is_valid_grafana_json() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40));
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input"
    );
    let vars: BTreeSet<&str> =
        d["templating"]["list"].as_array().expect("templating").iter().filter_map(|v| v["name"].as_str()).collect();

    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut exprs = 0;
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let title = p["title"].as_str().expect("panel title");
        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else { panic!("{title}: gridPos {g}") };
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), id) {
                    panic!("{title} (id {id}) overlaps panel {other}");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: datasource");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: target without expr"));
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}: refId twice");
            assert!(!referenced(expr).is_empty(), "{title}: {expr} uses no Wharf metric");
            let depth = expr.chars().try_fold(0i32, |d, c| {
                let d = d + i32::from(c == '(' || c == '{') - i32::from(c == ')' || c == '}');
                (d >= 0).then_some(d)
            });
            assert_eq!(depth, Some(0), "{title}: unbalanced brackets in {expr}");
            for (i, _) in expr.match_indices('$') {
                let name: String =
                    expr[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                assert!(name.starts_with("__") || vars.contains(name.as_str()), "{title}: ${name} is not a variable");
            }
            exprs += 1;
        }
    }
    assert!(exprs >= 15, "only {exprs} queries");
}

#[test]
fn dashboard_uses_only_metrics_the_code_emits() {
    let emitted = emitted();
    // The names the issue asks for: a renamed metric fails here, not silently in Grafana.
    for name in [
        "wharf_requests_total",
        "wharf_served_bytes_total",
        "wharf_upstream_requests_total",
        "wharf_upstream_request_duration_seconds",
        "wharf_upstream_fetched_bytes_total",
        "wharf_inflight_fetches",
        "wharf_coalesced_waiters_total",
        "wharf_upstream_ratelimit_remaining",
        "wharf_cache_size_bytes",
        "wharf_cache_entries",
        "wharf_evictions_total",
        "wharf_evicted_bytes_total",
        "wharf_uncached_bytes_total",
        "wharf_config_revision",
        "wharf_control_api_requests_total",
        "wharf_control_api_request_duration_seconds",
        "wharf_control_connected_nodes",
    ] {
        assert!(
            emitted.contains_key(name),
            "{name} is not emitted by data-plane/src or control-plane/src: {emitted:?}"
        );
    }
    let d = dashboard();
    // (expression, whether it is a panel query rather than a variable's `label_values`).
    let mut exprs: Vec<(String, bool)> = Vec::new();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.extend(t["expr"].as_str().map(|e| (e.to_owned(), true)));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        exprs.extend(v["definition"].as_str().map(|e| (e.to_owned(), false)));
    }
    let mut used = BTreeSet::new();
    for (expr, query) in &exprs {
        for (name, in_rate) in referenced(expr) {
            let (base, kind) = match ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)) {
                Some(base) if emitted.get(base) == Some(&Kind::Histogram) => (base.to_owned(), Kind::Histogram),
                _ => {
                    let kind = *emitted.get(&name).unwrap_or_else(|| panic!("{name} (in {expr}) is not emitted"));
                    (name.clone(), kind)
                }
            };
            match kind {
                _ if !query => {}
                Kind::Histogram => {
                    assert!(name != base, "{name}: a histogram is queried by _bucket/_sum/_count ({expr})")
                }
                Kind::Counter => assert!(in_rate, "{name} is a counter: query its rate ({expr})"),
                Kind::Gauge => assert!(!in_rate, "{name} is a gauge: rate() of it means nothing ({expr})"),
            }
            if name.ends_with("_bucket") {
                assert!(expr.contains("histogram_quantile("), "{name} outside histogram_quantile ({expr})");
            }
            used.insert(base);
        }
    }
    // What the dashboard is for: each of these has a panel.
    for name in [
        "wharf_requests_total",
        "wharf_served_bytes_total",
        "wharf_upstream_request_duration_seconds",
        "wharf_evictions_total",
        "wharf_cache_size_bytes",
        "wharf_inflight_fetches",
        "wharf_coalesced_waiters_total",
        "wharf_upstream_ratelimit_remaining",
        "wharf_control_api_requests_total",
        "wharf_control_connected_nodes",
    ] {
        assert!(used.contains(name), "no panel shows {name}");
    }
}

/// Every metric the dashboard queries, in a scrape of a node and a control plane that did what
/// each family measures: a managed node (config revision) with a size cap, cold and warm pulls,
/// a herd on a slow blob (coalesced waiters, in-flight fetches), a blob larger than the cap
/// (uncached bytes), enough blobs to evict, an upstream sending `ratelimit-remaining`; the control
/// plane answered API calls, did store operations and has the node connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_queries_is_in_a_scrape_of_an_exercised_node() -> anyhow::Result<()> {
    use std::time::Duration;
    use wharf_tests::control::{ControlPlane, Node, create_repo, repo_json};
    use wharf_tests::fake::Fault;
    use wharf_tests::http::get;

    let fake = wharf_tests::FakeUpstream::start().await?;
    fake.set_response_header("ratelimit-remaining", "100;w=21600");
    let image = wharf_tests::TestImage::random("v1", &[1_000])?;
    fake.put_image("org/img", &image);
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &fake.url())).await?;
    let node = Node::spawn_with("dash", &[cp.url()], None, &["--cache-max-size", "300KB"])?;
    node.wait_applied(rev, Duration::from_secs(10))?;

    let m = get(&node.v2("lab/org/img/manifests/v1"), &[("accept", wharf_tests::image::OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    let blob_url = |d: &str| node.v2(&format!("lab/org/img/blobs/{d}"));
    // A herd on a slow blob.
    let slow = fake.add_random_blob(100_000);
    fake.set_fault(&slow.digest, Fault::Slow { chunk: 10_000, delay: Duration::from_millis(30) });
    let herd: Vec<_> = (0..3).map(|_| tokio::spawn(get_owned(blob_url(&slow.digest)))).collect();
    for h in herd {
        assert_eq!(h.await??, slow.digest);
    }
    // Past the high watermark (270 kB of 300 kB): evictions; larger than the cap: uncached.
    for _ in 0..4 {
        let b = fake.add_random_blob(90_000);
        assert_eq!(get_owned(blob_url(&b.digest)).await?, b.digest);
        assert_eq!(get_owned(blob_url(&b.digest)).await?, b.digest, "a warm hit");
    }
    let big = fake.add_random_blob(400_000);
    assert_eq!(get_owned(blob_url(&big.digest)).await?, big.digest);

    let scrape = |url: String| async move { wharf_tests::prom::Scrape::parse(&get(&url, &[]).await?.text()) };
    let node_metrics = format!("http://{}/metrics", node.addr());
    wharf_tests::control::poll(Duration::from_secs(20), "an eviction to be counted", || {
        let url = node_metrics.clone();
        async move { scrape(url).await.ok()?.names().contains("wharf_evictions_total").then_some(()) }
    })
    .await?;
    let mut names = scrape(node_metrics).await?.names();
    names.extend(scrape(format!("{}/metrics", cp.url())).await?.names());

    let d = dashboard();
    let mut missing = BTreeSet::new();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            for (name, _) in referenced(t["expr"].as_str().unwrap_or_default()) {
                if !names.contains(&name) {
                    missing.insert(name);
                }
            }
        }
    }
    assert!(missing.is_empty(), "queried by the dashboard, absent from the scrapes: {missing:?}\nscraped: {names:?}");
    Ok(())
}

/// GET `url`: the body's digest (an error unless 200).
async fn get_owned(url: String) -> anyhow::Result<String> {
    let r = wharf_tests::http::get(&url, &[]).await?;
    anyhow::ensure!(r.status == 200, "{url}: {} {}", r.status, r.text());
    Ok(r.digest())
}
