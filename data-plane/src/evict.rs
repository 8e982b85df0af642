//! Eviction, on each node by itself: entries not accessed for the TTL go, and above the high
//! watermark the least recently used go until the cache is under the low one.
//!
//! Eviction removes an entry from the index first, then unlinks its file: a client already reading
//! it keeps its open file descriptor and receives every byte. Staging files are not in the index
//! and are never evicted. Serving a manifest refreshes the last access of the blobs it references,
//! so a pull that has its manifest finds its blobs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wharf_core::RepoKey;

use crate::config::{Config, Snapshot};
use crate::store::{Candidate, Store, now_ms};

/// `--cache-max-size`: bytes (`500MB`, `10GiB`, `1073741824`) or a share of the disk (`80%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeSpec {
    Bytes(u64),
    PercentOfDisk(f64),
}

impl std::str::FromStr for SizeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("{s:?}: not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{s:?}: a percentage of the disk is in (0, 100]"));
            }
            return Ok(SizeSpec::PercentOfDisk(p / 100.0));
        }
        let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a size like 500MB, 10GiB or 80%"))?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "t" | "tb" => 1e12,
            "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => return Err(format!("{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)")),
        };
        Ok(SizeSpec::Bytes((n * mult) as u64))
    }
}

impl SizeSpec {
    /// In bytes, for a cache on a disk of `disk_bytes`.
    pub fn resolve(self, disk_bytes: u64) -> u64 {
        match self {
            SizeSpec::Bytes(b) => b,
            SizeSpec::PercentOfDisk(p) => (disk_bytes as f64 * p) as u64,
        }
    }
}

/// Why an entry was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Ttl,
    Size,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ttl => "ttl",
            Reason::Size => "size",
        }
    }
}

/// Chooses what to evict.
pub trait EvictionPolicy: Send + Sync {
    /// The entries to remove from `entries` (the whole cache) at `now` (ms since the epoch).
    fn victims(&self, entries: &[Candidate], now: u64) -> Vec<(usize, Reason)>;
}

/// Size watermarks with LRU order, plus a TTL on last access.
#[derive(Debug, Clone)]
pub struct LruWatermarks {
    /// The cap in bytes; `None`: no size limit.
    pub max_size: Option<u64>,
    /// Eviction starts above `high × max_size` and stops under `low × max_size`.
    pub high: f64,
    pub low: f64,
    /// Entries not accessed for this long go.
    pub ttl: Option<Duration>,
}

impl EvictionPolicy for LruWatermarks {
    fn victims(&self, entries: &[Candidate], now: u64) -> Vec<(usize, Reason)> {
        let mut out = Vec::new();
        let mut keep: Vec<usize> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            match e.ttl.or(self.ttl) {
                Some(ttl) if now.saturating_sub(e.last_access) > ttl.as_millis() as u64 => out.push((i, Reason::Ttl)),
                _ => keep.push(i),
            }
        }
        if let Some(max) = self.max_size {
            let mut total: u64 = keep.iter().map(|&i| entries[i].size).sum();
            if total as f64 > self.high * max as f64 {
                let target = (self.low * max as f64) as u64;
                keep.sort_by_key(|&i| entries[i].last_access);
                for i in keep {
                    if total <= target {
                        break;
                    }
                    total -= entries[i].size;
                    out.push((i, Reason::Size));
                }
            }
        }
        out
    }
}

/// Runs eviction every `interval` and whenever the store asks (it grew past the high watermark).
pub async fn run(
    store: Arc<Store>,
    config: Arc<Config>,
    policy: Arc<dyn EvictionPolicy>,
    interval: Duration,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {}
        }
        let (s, p, c) = (store.clone(), policy.clone(), config.snapshot());
        match tokio::task::spawn_blocking(move || evict_once(&s, &*p, &c)).await {
            Ok(n) if n > 0 => tracing::info!(evicted = n, "eviction pass"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "eviction pass panicked"),
        }
    }
}

/// One pass: asks the policy, removes its victims. Returns how many entries went.
pub fn evict_once(store: &Store, policy: &dyn EvictionPolicy, config: &Snapshot) -> usize {
    let entries = store.candidates(&|repo: &RepoKey| config.repos.get(repo).and_then(|r| r.cache_ttl));
    let victims = policy.victims(&entries, now_ms());
    let mut n = 0;
    for (i, reason) in victims {
        let e = &entries[i];
        match store.remove_entry(e.kind, &e.digest) {
            Ok(true) => {
                n += 1;
                metrics::counter!("wharf_evictions_total", "reason" => reason.as_str()).increment(1);
                metrics::counter!("wharf_evicted_bytes_total", "reason" => reason.as_str()).increment(e.size);
                tracing::debug!(digest = %e.digest, size = e.size, reason = reason.as_str(), "evicted");
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(digest = %e.digest, %error, "eviction failed"),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use wharf_core::Digest;

    use super::*;
    use crate::store::EntryKind;

    fn c(n: u8, size: u64, last_access: u64) -> Candidate {
        Candidate { kind: EntryKind::Blob, digest: Digest::of(&[n]), size, last_access, ttl: None }
    }

    #[test]
    fn lru_down_to_the_low_watermark() {
        let p = LruWatermarks { max_size: Some(100), high: 0.9, low: 0.5, ttl: None };
        // 4 x 25 = 100 > 90: evict oldest until <= 50.
        let entries = [c(1, 25, 40), c(2, 25, 10), c(3, 25, 30), c(4, 25, 20)];
        let v: Vec<usize> = p.victims(&entries, 100).into_iter().map(|(i, _)| i).collect();
        assert_eq!(v, vec![1, 3]);
        // Under the high watermark: nothing.
        assert!(p.victims(&entries[..3], 100).is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!("500MB".parse(), Ok(SizeSpec::Bytes(500_000_000)));
        assert_eq!("1GiB".parse(), Ok(SizeSpec::Bytes(1 << 30)));
        assert_eq!("1.5 KiB".parse(), Ok(SizeSpec::Bytes(1536)));
        assert_eq!("123".parse(), Ok(SizeSpec::Bytes(123)));
        assert_eq!("80%".parse(), Ok(SizeSpec::PercentOfDisk(0.8)));
        assert_eq!(SizeSpec::PercentOfDisk(0.5).resolve(1000), 500);
        for bad in ["", "x", "10XB", "0%", "150%", "-1"] {
            assert!(bad.parse::<SizeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ttl_on_last_access() {
        let p = LruWatermarks { max_size: None, high: 0.9, low: 0.8, ttl: Some(Duration::from_secs(60)) };
        let entries = [c(1, 1, 100_000), c(2, 1, 100_000 - 60_001), c(3, 1, 100_000 - 60_000)];
        assert_eq!(p.victims(&entries, 100_000), vec![(1, Reason::Ttl)]);
        // A repo's own TTL overrides the node's, both ways.
        let short = Candidate { ttl: Some(Duration::from_secs(1)), ..c(4, 1, 100_000 - 1_001) };
        let long = Candidate { ttl: Some(Duration::from_secs(3600)), ..c(5, 1, 100_000 - 60_001) };
        assert_eq!(p.victims(&[short, long], 100_000), vec![(0, Reason::Ttl)]);
    }
}
