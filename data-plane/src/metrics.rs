//! Prometheus metrics of a node (names and units after Prometheus conventions), recorded into the
//! process-wide recorder ([`wharf_runtime::metrics::install`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use metrics::{Counter, Histogram};

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);

/// The series one finished request records into.
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    /// `wharf_served_bytes_total` with its source, and which of the two totals it counts in.
    served: Option<(Counter, &'static AtomicU64)>,
}

type SeriesKey = (&'static str, &'static str, u16);
type SeriesByRepo = HashMap<String, HashMap<SeriesKey, Arc<RequestSeries>>>;

/// Handles per repo and (kind, cache, status), made once: building a labelled key and finding it
/// in the registry on every request cost a twentieth of a manifest hit.
static SERIES: LazyLock<RwLock<SeriesByRepo>> = LazyLock::new(RwLock::default);

/// Records one finished registry request.
pub fn request(repo_key: &str, kind: &'static str, cache: &'static str, status: u16, bytes: u64, seconds: f64) {
    // Answered before any cache decision (a bad request, an unknown repo, a refusal, an upstream
    // error): a label value of its own rather than an empty one.
    let cache = if cache.is_empty() { "none" } else { cache };
    let key = (kind, cache, status);
    let known = SERIES.read().unwrap_or_else(|e| e.into_inner()).get(repo_key).and_then(|m| m.get(&key)).cloned();
    let series = known.unwrap_or_else(|| {
        let made = Arc::new(series(repo_key, kind, cache, status));
        let mut all = SERIES.write().unwrap_or_else(|e| e.into_inner());
        all.entry(repo_key.to_owned()).or_default().entry(key).or_insert(made).clone()
    });
    series.requests.increment(1);
    series.duration.record(seconds);
    if let Some((served, total)) = &series.served {
        total.fetch_add(1, Ordering::Relaxed);
        served.increment(bytes);
    }
}

fn series(repo_key: &str, kind: &'static str, cache: &'static str, status: u16) -> RequestSeries {
    let repo_key = repo_key.to_owned();
    let source = match cache {
        "hit" | "stale" | "revalidated" => Some(("cache", &HITS)),
        "miss" | "coalesced" | "bypass" => Some(("upstream", &MISSES)),
        "peer" => Some(("peer", &MISSES)),
        _ => None,
    };
    RequestSeries {
        requests: metrics::counter!("wharf_requests_total", "repo_key" => repo_key.clone(), "kind" => kind, "cache" => cache, "status" => status.to_string()),
        duration: metrics::histogram!("wharf_request_duration_seconds", "repo_key" => repo_key.clone(), "kind" => kind),
        served: source.map(|(source, total)| {
            (metrics::counter!("wharf_served_bytes_total", "repo_key" => repo_key, "source" => source), total)
        }),
    }
}

/// Requests answered from the cache and from upstream since start (for the node's report).
pub fn hits_and_misses() -> (u64, u64) {
    (HITS.load(Ordering::Relaxed), MISSES.load(Ordering::Relaxed))
}

/// One upstream request that got an answer (`status`) or none (`"error"`).
pub fn upstream(repo_key: &str, method: &str, status: &str, seconds: f64) {
    metrics::counter!("wharf_upstream_requests_total", "repo_key" => repo_key.to_owned(), "method" => method.to_owned(), "status" => status.to_owned())
        .increment(1);
    metrics::histogram!("wharf_upstream_request_duration_seconds", "repo_key" => repo_key.to_owned()).record(seconds);
}

/// Docker Hub's `ratelimit-remaining: 100;w=21600`.
pub fn ratelimit_remaining(repo_key: &str, header: &str) {
    if let Some(n) = header.split(';').next().and_then(|n| n.trim().parse::<f64>().ok()) {
        metrics::gauge!("wharf_upstream_ratelimit_remaining", "repo_key" => repo_key.to_owned()).set(n);
    }
}
