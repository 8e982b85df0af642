//! Prometheus metrics of a node (names and units after Prometheus conventions), recorded into the
//! process-wide recorder ([`wharf_runtime::metrics::install`]).

use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);
static MISSES: AtomicU64 = AtomicU64::new(0);

/// Records one finished registry request.
pub fn request(repo_key: &str, kind: &'static str, cache: &'static str, status: u16, bytes: u64, seconds: f64) {
    let repo_key = repo_key.to_owned();
    // Answered before any cache decision (a bad request, an unknown repo, a refusal, an upstream
    // error): a label value of its own rather than an empty one.
    let cache = if cache.is_empty() { "none" } else { cache };
    metrics::counter!("wharf_requests_total", "repo_key" => repo_key.clone(), "kind" => kind, "cache" => cache, "status" => status.to_string())
        .increment(1);
    metrics::histogram!("wharf_request_duration_seconds", "repo_key" => repo_key.clone(), "kind" => kind)
        .record(seconds);
    let source = match cache {
        "hit" | "stale" | "revalidated" => {
            HITS.fetch_add(1, Ordering::Relaxed);
            "cache"
        }
        "miss" | "coalesced" | "bypass" => {
            MISSES.fetch_add(1, Ordering::Relaxed);
            "upstream"
        }
        _ => return,
    };
    metrics::counter!("wharf_served_bytes_total", "repo_key" => repo_key, "source" => source).increment(bytes);
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
