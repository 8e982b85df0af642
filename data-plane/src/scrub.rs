//! The scrubber: a background task that re-hashes every cached blob and manifest at a bounded rate
//! (`--scrub-rate`, MB/s) once per `--scrub-interval`, removes what does not match its digest (the
//! next request fetches it again), and marks the blobs that do as verified (their next read is not
//! hashed again). Serving never depends on it: a blob changed on disk is already never served
//! whole (see `cache::blobs`); the scrubber finds such files before a client asks for them.

use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wharf_core::{Digest, DigestHasher};

use crate::store::{EntryKind, Store};

/// What one pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub checked: u64,
    pub bytes: u64,
    pub removed: u64,
    /// What was removed, as `blob sha256:...` or `manifest sha256:...`: the first [`MAX_LISTED`].
    pub removed_entries: Vec<String>,
}

/// Removed entries a pass lists by name (the count goes on).
pub const MAX_LISTED: usize = 100;

/// Read per step, then the pace is kept by sleeping.
const CHUNK: usize = 1 << 20;

/// Runs a pass every `interval` (the first one `interval` after start) until `cancel`.
pub async fn run(store: Arc<Store>, rate_bytes_per_sec: u64, interval: Duration, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let started = Instant::now();
        let pass = tokio::select! {
            _ = cancel.cancelled() => return,
            p = pass(&store, rate_bytes_per_sec, |_| {}) => p,
        };
        metrics::counter!("wharf_scrub_passes_total").increment(1);
        metrics::gauge!("wharf_scrub_last_pass_timestamp_seconds").set(crate::store::now_secs() as f64);
        tracing::info!(
            checked = pass.checked,
            bytes = pass.bytes,
            removed = pass.removed,
            duration_ms = started.elapsed().as_millis() as u64,
            "scrub pass done"
        );
    }
}

/// One pass over everything cached now, reading at most `rate` bytes per second (0: no limit);
/// `progress` sees the figures after each entry.
pub async fn pass(store: &Arc<Store>, rate: u64, mut progress: impl FnMut(&Pass)) -> Pass {
    let mut out = Pass::default();
    let started = Instant::now();
    for entry in store.candidates(&|_| None) {
        let path = store.entry_path(entry.kind, &entry.digest);
        let Ok(file) = std::fs::File::open(&path) else {
            // Evicted since the list was taken.
            continue;
        };
        let mut reader = file;
        let mut hasher = DigestHasher::new();
        let mut read = 0u64;
        let failed = loop {
            let step = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; CHUNK];
                let n = reader.read(&mut buf);
                (reader, buf, n)
            })
            .await;
            let Ok((r, buf, n)) = step else { break Some("the read task failed".to_owned()) };
            reader = r;
            let n = match n {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) => break Some(e.to_string()),
            };
            hasher.update(&buf[..n]);
            read += n as u64;
            out.bytes += n as u64;
            metrics::counter!("wharf_scrub_bytes_total").increment(n as u64);
            // Keep the pass at `rate`: ahead of the budget, wait until it catches up.
            if rate > 0 {
                let due = Duration::from_secs_f64(out.bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        };
        out.checked += 1;
        let kind = match entry.kind {
            EntryKind::Blob => "blob",
            EntryKind::Manifest => "manifest",
        };
        metrics::counter!("wharf_scrub_checked_total", "kind" => kind).increment(1);
        let got: Option<Digest> = if failed.is_none() && read == entry.size { Some(hasher.finish()) } else { None };
        match got {
            Some(d) if d == entry.digest => {
                if entry.kind == EntryKind::Blob {
                    store.blob_verified(&entry.digest);
                }
            }
            // Gone while it was read (evicted): not corrupt.
            _ if !path.exists() => {}
            other => {
                let why = match (other, failed) {
                    (Some(d), _) => d.to_string(),
                    (None, Some(e)) => e,
                    (None, None) => format!("{read} bytes where {} were cached", entry.size),
                };
                store.corrupt(entry.kind, &entry.digest, &why);
                out.removed += 1;
                if out.removed_entries.len() < MAX_LISTED {
                    out.removed_entries.push(format!("{kind} {}", entry.digest));
                }
            }
        }
        progress(&out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pass_removes_what_does_not_match_and_keeps_its_rate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 300_000];
            let d = Digest::of(&data);
            let (staging, mut f) = store.staging_file(&d).unwrap();
            std::io::Write::write_all(&mut f, &data).unwrap();
            store.commit_blob(&staging, &f, &d, data.len() as u64).unwrap();
            digests.push(d);
        }
        let manifest = br#"{"schemaVersion":2}"#;
        let md = Digest::of(manifest);
        store.put_manifest(&md, "application/vnd.oci.image.manifest.v1+json", manifest).unwrap();
        // One blob and the manifest changed on disk.
        std::fs::write(store.blob_path(&digests[1]), vec![9u8; 300_000]).unwrap();
        std::fs::write(store.entry_path(EntryKind::Manifest, &md), b"{}").unwrap();

        let t = Instant::now();
        let mut seen = 0;
        let p = pass(&store, 2_000_000, |_| seen += 1).await;
        let took = t.elapsed();
        assert_eq!((p.checked, p.removed, seen), (4, 2, 4), "{p:?}");
        let mut listed = p.removed_entries.clone();
        listed.sort();
        assert_eq!(listed, [format!("blob {}", digests[1]), format!("manifest {md}")]);
        assert!(store.blob_size(&digests[1]).is_none() && store.blob_size(&digests[0]).is_some());
        assert!(store.get_manifest(&md).unwrap().is_none());
        // 900 kB of blobs (and a few bytes) at 2 MB/s: at least 0.45 s.
        assert!(took >= Duration::from_millis(440), "{took:?} for {} bytes", p.bytes);
    }
}
