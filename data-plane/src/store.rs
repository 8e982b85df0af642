//! The content-addressed disk cache and its in-memory index.
//!
//! ```text
//! <cache-dir>/
//!   blobs/sha256/<2 hex>/<hex>             verified blobs, shared by all repos
//!   manifests/sha256/<2 hex>/<hex>         verified manifests, media type in <hex>.type
//!   repos/<repoKey>/<name>/_tags/<tag>     tag cache: digest, media type, fetched-at (JSON)
//!   repos/<repoKey>/<name>/_links/<hex>    empty: this repo and name were seen to hold <hex>
//!   staging/                               partial downloads; emptied at start-up
//! ```
//!
//! Nothing enters `blobs/` or `manifests/` but by an atomic rename after its bytes matched its
//! digest and were fsynced. `_tags` and `_links` sit under a `_` folder because name components
//! cannot start with `_`, so `a/b` (name) and `a` + tag `b` never collide.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use wharf_core::{Digest, RepoKey};

use crate::mapped::{MapCache, MappedFile};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cache entry {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

impl StoreError {
    /// What a client may be told: the kind of failure, never a path on the node's disk (the log
    /// has the whole error).
    pub fn client_message(&self) -> String {
        match self {
            StoreError::Io { source, .. } if no_space(source) => "the node's cache has no room left".into(),
            StoreError::Io { source, .. } => format!("the node's cache failed: {}", source.kind()),
            StoreError::Corrupt { .. } => "the node's cache holds a corrupt entry".into(),
        }
    }

    /// Whether the disk (or the user's quota) is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if no_space(source))
    }
}

fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Size and last access of one cached entry, for eviction and metrics.
#[derive(Debug)]
pub struct Entry {
    pub size: u64,
    /// Milliseconds since the epoch; refreshed in memory on every hit, never written per hit.
    pub last_access: AtomicU64,
    /// Blobs: when this process last saw the file's bytes match its digest (written from a verified
    /// fetch, or hashed while served); 0: not since the node started.
    pub verified_at: AtomicU64,
}

/// Blob or manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Blob,
    Manifest,
}

/// One cached entry, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub kind: EntryKind,
    pub digest: Digest,
    pub size: u64,
    /// Milliseconds since the epoch.
    pub last_access: u64,
    /// The TTL of the repos that hold it, when they override the node's (the longest of them).
    pub ttl: Option<Duration>,
}

/// What the tag cache knows about one tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// Seconds since the epoch when upstream last confirmed this digest.
    pub fetched_at: u64,
}

#[derive(Default)]
struct Index {
    blobs: HashMap<Digest, Entry>,
    manifests: HashMap<Digest, Entry>,
    links: HashSet<(RepoKey, String, Digest)>,
}

/// Hot tags and manifests, kept in memory so that a warm manifest pull touches no disk. Bounded;
/// what falls out is read from disk (and verified) again.
#[derive(Default)]
struct Memo {
    tags: HashMap<(RepoKey, String, String), TagEntry>,
    manifests: HashMap<Digest, MemoManifest>,
    manifest_bytes: usize,
}

#[derive(Clone)]
struct MemoManifest {
    media_type: String,
    bytes: Bytes,
    /// What the manifest references: refreshed whenever it is served.
    referenced: Arc<[Digest]>,
}

const MEMO_MANIFEST_BYTES: usize = 32 << 20;
const MEMO_TAGS: usize = 100_000;

impl Memo {
    fn put_manifest(&mut self, d: &Digest, media_type: &str, bytes: Bytes) -> Arc<[Digest]> {
        if self.manifest_bytes + bytes.len() > MEMO_MANIFEST_BYTES {
            // Drop an arbitrary quarter: cheap, and anything dropped is still on disk.
            let drop: Vec<Digest> = self.manifests.keys().take(self.manifests.len() / 4 + 1).cloned().collect();
            for k in drop {
                if let Some(m) = self.manifests.remove(&k) {
                    self.manifest_bytes -= m.bytes.len();
                }
            }
        }
        self.manifest_bytes += bytes.len();
        let referenced: Arc<[Digest]> = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(|j| crate::oci::referenced(&j))
            .unwrap_or_default()
            .into();
        let m = MemoManifest { media_type: media_type.to_owned(), bytes, referenced: referenced.clone() };
        if let Some(old) = self.manifests.insert(d.clone(), m) {
            self.manifest_bytes -= old.bytes.len();
        }
        referenced
    }

    fn remove_manifest(&mut self, d: &Digest) {
        if let Some(m) = self.manifests.remove(d) {
            self.manifest_bytes -= m.bytes.len();
        }
    }

    fn put_tag(&mut self, key: (RepoKey, String, String), entry: TagEntry) {
        if self.tags.len() >= MEMO_TAGS {
            self.tags.clear();
        }
        self.tags.insert(key, entry);
    }
}

/// The disk cache of one node.
pub struct Store {
    root: PathBuf,
    index: Mutex<Index>,
    memo: Mutex<Memo>,
    limits: Limits,
    /// Woken when the cache grows past the high watermark.
    evict: Arc<Notify>,
    /// Set while cache writes fail (a full disk): the episode is logged once, at its start and end.
    degraded: AtomicBool,
    /// Bytes that fetches in flight reserved and have not written yet ([`Store::reserve`]).
    reserved: AtomicU64,
    /// Shared read-only maps of hot verified blob files ([`Store::mapped_blob`]).
    maps: MapCache,
}

/// Room reserved in the cache for one fetch; given back on drop.
pub struct Reservation {
    store: Arc<Store>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How large the cache may grow.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// The size cap in bytes (`None`: only the disk limits it).
    pub max_size: Option<u64>,
    /// The fraction of `max_size` above which eviction starts.
    pub high: f64,
    /// How long a blob verified in this process is trusted before its next read hashes it again
    /// (`--blob-reverify-after`; `None`: for the life of the process).
    pub reverify_after: Option<Duration>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch: the resolution of last access.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (creating) a cache dir: empties `staging/` and rebuilds the index from the folder,
    /// reading metadata only, never blob contents.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        if !root.exists() {
            // Private images' blobs and manifests land here: a directory of the service user's.
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).map_err(io(&root))?;
        }
        for d in ["blobs/sha256", "manifests/sha256", "repos", "staging"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let removed = empty_staging(&root.join("staging"))?;
        if removed > 0 {
            tracing::info!(removed, "emptied staging: partial downloads from an earlier run");
        }
        let mut index = Index::default();
        // Metadata only, shards in parallel: on a cold page cache the scan waits on the disk, and
        // several outstanding stats keep it busy (100,000 entries: ~2 s serial, well under with 8).
        std::thread::scope(|scope| -> Result<(), StoreError> {
            let links = scope.spawn(|| scan_links(&root.join("repos"), &mut index.links));
            index.blobs = scan_content(&root.join("blobs/sha256"))?;
            index.manifests = scan_content(&root.join("manifests/sha256"))?;
            links.join().map_err(|_| StoreError::Corrupt { path: root.join("repos"), why: "scan panicked".into() })?
        })?;
        tracing::info!(
            blobs = index.blobs.len(),
            manifests = index.manifests.len(),
            links = index.links.len(),
            "cache index rebuilt"
        );
        Ok(Self {
            root,
            index: Mutex::new(index),
            memo: Mutex::default(),
            limits: Limits::default(),
            evict: Arc::default(),
            degraded: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            maps: MapCache::default(),
        })
    }

    /// Something could not be cached (`kind`: blob, manifest, tag) and is served uncached: counted,
    /// and logged at warning once per episode (until a write succeeds again).
    pub fn degraded(&self, kind: &'static str, reason: &dyn std::fmt::Display) {
        metrics::counter!("wharf_cache_write_failures_total", "kind" => kind).increment(1);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(kind, %reason, "cache writes fail: serving from upstream uncached until they succeed again");
        }
    }

    /// Whether cache writes fail now (a full disk), as the node's report says.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// A blob or manifest was written: ends a degraded episode (logged). Tag files, a few bytes,
    /// may still fit on a disk too full for content: they end nothing.
    fn writes_ok(&self) {
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!("cache writes succeed again");
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// At shutdown: fetches still running are abandoned, and their partial files go with them.
    pub fn abandon_staging(&self) -> Result<usize, StoreError> {
        empty_staging(&self.root.join("staging"))
    }

    /// Sets the size cap; the returned `Notify` is woken when the cache grows past the high mark.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn eviction_wake(&self) -> Arc<Notify> {
        self.evict.clone()
    }

    /// Content was added (a blob or a manifest written): ends a degraded episode, and wakes
    /// eviction past the high watermark.
    fn grew(&self) {
        self.writes_ok();
        if let Some(max) = self.limits.max_size
            && self.usage().1 as f64 > self.limits.high * max as f64
        {
            self.evict.notify_one();
        }
    }

    /// Reserves room for `bytes` more (a blob about to be fetched): under the size cap and free on
    /// the disk, counting what fetches in flight reserved before. `None`: it does not fit. The
    /// room is given back when the reservation drops (the fetch wrote its bytes, or failed).
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let free = rustix::fs::statvfs(&self.root).map_or(u64::MAX, |st| st.f_bavail.saturating_mul(st.f_frsize));
        let used = self.usage().1;
        let mut reserved = self.reserved.load(Ordering::Relaxed);
        loop {
            let capped = self.limits.max_size.is_some_and(|max| used + reserved + bytes > max);
            if capped || free.saturating_sub(reserved) <= bytes {
                return None;
            }
            match self.reserved.compare_exchange_weak(reserved, reserved + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Reservation { store: self.clone(), bytes }),
                Err(now) => reserved = now,
            }
        }
    }

    /// Every cached entry, for the eviction policy, with the TTL override of the repos that hold it
    /// (`repo_ttl`; the longest when several do).
    pub fn candidates(&self, repo_ttl: &dyn Fn(&RepoKey) -> Option<Duration>) -> Vec<Candidate> {
        let idx = self.index();
        let mut ttls: HashMap<&Digest, Duration> = HashMap::new();
        for (repo, _, d) in &idx.links {
            if let Some(t) = repo_ttl(repo) {
                let e = ttls.entry(d).or_insert(t);
                *e = (*e).max(t);
            }
        }
        let one = |kind: EntryKind| {
            let ttls = &ttls;
            move |(d, e): (&Digest, &Entry)| Candidate {
                kind,
                digest: d.clone(),
                size: e.size,
                last_access: e.last_access.load(Ordering::Relaxed),
                ttl: ttls.get(d).copied(),
            }
        };
        idx.blobs.iter().map(one(EntryKind::Blob)).chain(idx.manifests.iter().map(one(EntryKind::Manifest))).collect()
    }

    /// Removes an entry: from the index first (no new reader finds it), then its file (readers that
    /// have it open keep reading). Returns whether it was there.
    pub fn remove_entry(&self, kind: EntryKind, d: &Digest) -> Result<bool, StoreError> {
        let path = match kind {
            EntryKind::Blob => {
                if self.index().blobs.remove(d).is_none() {
                    return Ok(false);
                }
                // After the index: a map made meanwhile is either forgotten here or never kept.
                self.maps.forget(d);
                self.blob_path(d)
            }
            EntryKind::Manifest => {
                if self.index().manifests.remove(d).is_none() {
                    return Ok(false);
                }
                self.memo().remove_manifest(d);
                let path = self.content_path("manifests", d);
                let _ = std::fs::remove_file(path.with_extension("type"));
                path
            }
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Refreshes the last access of what a served manifest references.
    fn touch(&self, digests: &[Digest]) {
        let now = now_ms();
        let idx = self.index();
        for d in digests {
            if let Some(e) = idx.blobs.get(d).or_else(|| idx.manifests.get(d)) {
                e.last_access.store(now, Ordering::Relaxed);
            }
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn content_path(&self, kind: &str, d: &Digest) -> PathBuf {
        self.root.join(kind).join("sha256").join(&d.hex()[..2]).join(d.hex())
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.content_path("blobs", d)
    }

    /// A cached blob to read: its size, and whether its bytes are trusted (verified by this process,
    /// less than `reverify_after` ago); refreshes its last access.
    pub fn blob_for_read(&self, d: &Digest) -> Option<(u64, bool)> {
        let idx = self.index();
        let e = idx.blobs.get(d)?;
        let now = now_ms();
        e.last_access.store(now, Ordering::Relaxed);
        let at = e.verified_at.load(Ordering::Relaxed);
        let fresh = self.limits.reverify_after.is_none_or(|age| now.saturating_sub(at) < age.as_millis() as u64);
        Some((e.size, at != 0 && fresh))
    }

    /// A shared read-only map of a cached blob's whole file, `size` bytes, for serving it verified
    /// over plaintext ([`crate::mapped`]). `None` when the file is too large to keep mapped or
    /// cannot be mapped: the caller maps it window by window or reads it.
    pub fn mapped_blob(&self, d: &Digest, size: u64) -> Option<Arc<MappedFile>> {
        use std::os::unix::fs::MetadataExt as _;
        if let Some(m) = self.maps.get(d) {
            return Some(m);
        }
        if !self.maps.fits(size) {
            return None;
        }
        let path = self.blob_path(d);
        let map = MappedFile::new(&std::fs::File::open(&path).ok()?, size)?;
        // Kept only if it is of the file the index holds now: a blob removed (or removed and
        // fetched again) while it was being mapped must not leave its old file mapped.
        let idx = self.index();
        if idx.blobs.get(d).is_some_and(|e| e.size == size)
            && std::fs::metadata(&path).is_ok_and(|m| m.ino() == map.inode())
        {
            self.maps.insert(d, map.clone());
        }
        Some(map)
    }

    /// Shared maps kept, and the bytes of file they map.
    pub fn mapped_usage(&self) -> (usize, u64) {
        self.maps.usage()
    }

    /// The blob's bytes were just read whole and matched its digest.
    pub fn blob_verified(&self, d: &Digest) {
        if let Some(e) = self.index().blobs.get(d) {
            e.verified_at.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// An entry's file does not match its digest (`got`, or why it could not be read whole): it
    /// leaves the index and the disk, so the next request fetches it again. Logged and counted.
    pub fn corrupt(&self, kind: EntryKind, d: &Digest, got: &str) {
        let label = match kind {
            EntryKind::Blob => "blob",
            EntryKind::Manifest => "manifest",
        };
        metrics::counter!("wharf_cache_corrupt_total", "kind" => label).increment(1);
        match self.remove_entry(kind, d) {
            Ok(_) => {
                tracing::error!(kind = label, digest = %d, got, "cached content does not match its digest: removed; the next request fetches it again")
            }
            Err(e) => {
                tracing::error!(kind = label, digest = %d, got, error = %e, "cached content does not match its digest, and could not be removed")
            }
        }
    }

    /// The file of a blob or manifest.
    pub fn entry_path(&self, kind: EntryKind, d: &Digest) -> PathBuf {
        match kind {
            EntryKind::Blob => self.blob_path(d),
            EntryKind::Manifest => self.content_path("manifests", d),
        }
    }

    /// The size of a cached blob, refreshing its last access.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        let idx = self.index();
        let e = idx.blobs.get(d)?;
        e.last_access.store(now_ms(), Ordering::Relaxed);
        Some(e.size)
    }

    /// Number of cached blobs and manifests, and their total size.
    pub fn usage(&self) -> (usize, u64) {
        let idx = self.index();
        let n = idx.blobs.len() + idx.manifests.len();
        let size = idx.blobs.values().chain(idx.manifests.values()).map(|e| e.size).sum();
        (n, size)
    }

    /// A new, empty file in `staging/`.
    pub fn staging_file(&self, d: &Digest) -> Result<(PathBuf, std::fs::File), StoreError> {
        let path = self.root.join("staging").join(format!("{}.{:016x}", d.hex(), rand::random::<u64>()));
        let f = std::fs::OpenOptions::new().create_new(true).write(true).read(true).open(&path).map_err(io(&path))?;
        Ok((path, f))
    }

    /// Moves a verified staging file into `blobs/`: fsync, atomic rename, fsync of the folder.
    /// Blocking: call from a blocking context.
    pub fn commit_blob(&self, staging: &Path, file: &std::fs::File, d: &Digest, size: u64) -> Result<(), StoreError> {
        let dest = self.blob_path(d);
        commit(staging, file, &dest)?;
        let now = now_ms();
        self.index()
            .blobs
            .insert(d.clone(), Entry { size, last_access: AtomicU64::new(now), verified_at: AtomicU64::new(now) });
        self.grew();
        Ok(())
    }

    /// Stores a verified manifest and its media type.
    pub fn put_manifest(&self, d: &Digest, media_type: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dest = self.content_path("manifests", d);
        let (staging, mut f) = self.staging_file(d)?;
        let result = (|| {
            f.write_all(bytes).map_err(io(&staging))?;
            write_atomic(&self.root.join("staging"), &dest.with_extension("type"), media_type.as_bytes(), true)?;
            commit(&staging, &f, &dest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        result?;
        self.index().manifests.insert(
            d.clone(),
            Entry { size: bytes.len() as u64, last_access: AtomicU64::new(now_ms()), verified_at: AtomicU64::new(0) },
        );
        self.memo().put_manifest(d, media_type, Bytes::copy_from_slice(bytes));
        self.grew();
        Ok(())
    }

    /// A cached manifest and its media type.
    pub fn get_manifest(&self, d: &Digest) -> Result<Option<(String, Bytes)>, StoreError> {
        {
            let idx = self.index();
            match idx.manifests.get(d) {
                Some(e) => e.last_access.store(now_ms(), Ordering::Relaxed),
                None => return Ok(None),
            }
        }
        let hit = self.memo().manifests.get(d).cloned();
        if let Some(m) = hit {
            self.touch(&m.referenced);
            return Ok(Some((m.media_type, m.bytes)));
        }
        let path = self.content_path("manifests", d);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index().manifests.remove(d);
                return Ok(None);
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let tpath = path.with_extension("type");
        let media_type = std::fs::read_to_string(&tpath).map_err(io(&tpath))?;
        let got = Digest::of(&bytes);
        if got != *d {
            // Changed on disk: gone, and the caller fetches it again (a miss).
            self.corrupt(EntryKind::Manifest, d, &got.to_string());
            return Ok(None);
        }
        let bytes = Bytes::from(bytes);
        let referenced = self.memo().put_manifest(d, &media_type, bytes.clone());
        self.touch(&referenced);
        Ok(Some((media_type, bytes)))
    }

    fn repo_dir(&self, repo: &RepoKey, name: &str) -> PathBuf {
        // repo and name are validated (grammar: no '..', no '_' prefix), so this stays in the cache dir.
        self.root.join("repos").join(repo.as_str()).join(name)
    }

    pub fn get_tag(&self, repo: &RepoKey, name: &str, tag: &str) -> Option<TagEntry> {
        let key = (repo.clone(), name.to_owned(), tag.to_owned());
        if let Some(e) = self.memo().tags.get(&key) {
            return Some(e.clone());
        }
        let path = self.repo_dir(repo, name).join("_tags").join(tag);
        let entry: TagEntry = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        self.memo().put_tag(key, entry.clone());
        Some(entry)
    }

    pub fn put_tag(&self, repo: &RepoKey, name: &str, tag: &str, entry: &TagEntry) -> Result<(), StoreError> {
        // In memory first: when the file cannot be written (a full disk), the node still knows the
        // tag until it restarts.
        self.memo().put_tag((repo.clone(), name.to_owned(), tag.to_owned()), entry.clone());
        let dir = self.repo_dir(repo, name).join("_tags");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let bytes =
            serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt { path: dir.clone(), why: e.to_string() })?;
        // Not fsynced: a tag entry lost in a crash is fetched again; a torn one fails to parse, same.
        write_atomic(&self.root.join("staging"), &dir.join(tag), &bytes, false)
    }

    pub fn remove_tag(&self, repo: &RepoKey, name: &str, tag: &str) {
        self.memo().tags.remove(&(repo.clone(), name.to_owned(), tag.to_owned()));
        let _ = std::fs::remove_file(self.repo_dir(repo, name).join("_tags").join(tag));
    }

    /// Whether this repo and name were seen to hold `d` (a manifest referencing it, or upstream).
    pub fn is_linked(&self, repo: &RepoKey, name: &str, d: &Digest) -> bool {
        self.index().links.contains(&(repo.clone(), name.to_owned(), d.clone()))
    }

    /// Records that this repo and name hold these digests.
    pub fn link<'a>(
        &self,
        repo: &RepoKey,
        name: &str,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> Result<(), StoreError> {
        let dir = self.repo_dir(repo, name).join("_links");
        let mut created = false;
        for d in digests {
            if !self.index().links.insert((repo.clone(), name.to_owned(), d.clone())) {
                continue;
            }
            if !created {
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                created = true;
            }
            let p = dir.join(d.hex());
            std::fs::File::create(&p).map_err(io(&p))?;
        }
        Ok(())
    }
}

/// Removes everything in `staging/`; returns how many entries went.
fn empty_staging(staging: &Path) -> Result<usize, StoreError> {
    let mut removed = 0usize;
    for e in std::fs::read_dir(staging).map_err(io(staging))? {
        let path = e.map_err(io(staging))?.path();
        let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        r.map_err(io(&path))?;
        removed += 1;
    }
    Ok(removed)
}

/// fsync `file`, rename `staging` to `dest` (creating its folder), fsync the folder.
fn commit(staging: &Path, file: &std::fs::File, dest: &Path) -> Result<(), StoreError> {
    file.sync_all().map_err(io(staging))?;
    rename_into(staging, dest)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn rename_into(from: &Path, dest: &Path) -> Result<(), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::rename(from, dest).map_err(io(dest))
}

/// Writes `dest` through a temporary file and a rename: readers see the old or the new content.
fn write_atomic(staging_dir: &Path, dest: &Path, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
    let tmp = staging_dir.join(format!("w.{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        if durable { commit(&tmp, &f, dest) } else { rename_into(&tmp, dest) }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Threads statting shards at once at start-up.
const SCAN_THREADS: usize = 8;

fn scan_content(dir: &Path) -> Result<HashMap<Digest, Entry>, StoreError> {
    let shards: Vec<PathBuf> = std::fs::read_dir(dir).map_err(io(dir))?.flatten().map(|e| e.path()).collect();
    let chunk = shards.len().div_ceil(SCAN_THREADS).max(1);
    let parts: Vec<Vec<(Digest, Entry)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = shards.chunks(chunk).map(|c| scope.spawn(move || scan_shards(c))).collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    Ok(parts.into_iter().flatten().collect())
}

fn scan_shards(shards: &[PathBuf]) -> Vec<(Digest, Entry)> {
    let mut out = Vec::new();
    for shard in shards {
        let Ok(entries) = std::fs::read_dir(shard) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(d) = name.to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) else {
                continue; // media-type files and strays
            };
            let Ok(meta) = e.metadata() else { continue };
            let last = meta
                .accessed()
                .or_else(|_| meta.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |t| t.as_millis() as u64);
            out.push((
                d,
                Entry { size: meta.len(), last_access: AtomicU64::new(last), verified_at: AtomicU64::new(0) },
            ));
        }
    }
    out
}

fn scan_links(repos: &Path, into: &mut HashSet<(RepoKey, String, Digest)>) -> Result<(), StoreError> {
    for repo in std::fs::read_dir(repos).map_err(io(repos))?.flatten() {
        let Some(key) = repo.file_name().to_str().and_then(|k| k.parse::<RepoKey>().ok()) else {
            continue;
        };
        let mut stack = vec![repo.path()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if e.file_name() == "_links" {
                    let name =
                        dir.strip_prefix(repo.path()).ok().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                    for l in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                        if let Some(d) =
                            l.file_name().to_str().and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                        {
                            into.insert((key.clone(), name.clone(), d));
                        }
                    }
                } else if e.file_name() != "_tags" && e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_tags_links_survive_reopen_and_staging_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"{}");
        let repo: RepoKey = "lab".parse().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_manifest(&d, "application/vnd.oci.image.manifest.v1+json", b"{}").unwrap();
            let t = TagEntry { digest: d.to_string(), media_type: "x".into(), fetched_at: 1 };
            s.put_tag(&repo, "a/b", "v1", &t).unwrap();
            s.link(&repo, "a/b", [&d]).unwrap();
            let (path, _f) = s.staging_file(&d).unwrap();
            assert!(path.exists());
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
        let (mt, bytes) = s.get_manifest(&d).unwrap().unwrap();
        assert_eq!((mt.as_str(), &bytes[..]), ("application/vnd.oci.image.manifest.v1+json", &b"{}"[..]));
        assert_eq!(s.get_tag(&repo, "a/b", "v1").unwrap().digest, d.to_string());
        assert!(s.is_linked(&repo, "a/b", &d));
        assert!(!s.is_linked(&repo, "a", &d));
    }

    fn commit(s: &Store, bytes: &[u8]) -> Digest {
        use std::io::Write as _;
        let d = Digest::of(bytes);
        let (path, mut f) = s.staging_file(&d).unwrap();
        f.write_all(bytes).unwrap();
        s.commit_blob(&path, &f, &d, bytes.len() as u64).unwrap();
        d
    }

    fn mapped_bytes(s: &Store, d: &Digest, size: u64) -> Vec<u8> {
        let m = s.mapped_blob(d, size).expect("mapped");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use futures_util::TryStreamExt as _;
            let chunks: Vec<Bytes> =
                crate::mapped::stream(crate::mapped::Source::Shared(m), 0, size).try_collect().await.unwrap();
            chunks.concat()
        })
    }

    #[test]
    fn a_removed_blob_leaves_no_shared_map_and_its_successor_is_mapped_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = commit(&s, b"first bytes");
        assert_eq!(mapped_bytes(&s, &d, 11), b"first bytes");
        assert_eq!(s.mapped_usage(), (1, 11));
        assert!(s.remove_entry(EntryKind::Blob, &d).unwrap());
        assert_eq!(s.mapped_usage(), (0, 0), "the map goes with the blob, so its disk space comes back");
        // The same digest fetched again (a new file): its map is of the new file, not the old one.
        commit(&s, b"first bytes");
        std::fs::write(s.blob_path(&d), b"FIRST BYTES").unwrap();
        assert_eq!(mapped_bytes(&s, &d, 11), b"FIRST BYTES");
        // A size the index does not hold is mapped for the caller but never kept.
        s.remove_entry(EntryKind::Blob, &d).unwrap();
        let other = commit(&s, b"other");
        std::fs::write(s.blob_path(&d), b"stray bytes").unwrap();
        assert!(s.mapped_blob(&d, 11).is_some());
        assert_eq!(s.mapped_usage(), (0, 0), "no index entry: not kept");
        assert!(s.mapped_blob(&other, 6).is_none(), "a size that is not the file's");
    }

    #[test]
    fn a_new_cache_dir_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("cache");
        Store::open(&root).unwrap();
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn corrupt_manifest_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"{}");
        let s = Store::open(dir.path()).unwrap();
        s.put_manifest(&d, "t", b"{}").unwrap();
        std::fs::write(s.content_path("manifests", &d), b"{x}").unwrap();
        // Served from memory, where it was verified on the way in; a fresh start reads the disk.
        assert!(s.get_manifest(&d).unwrap().is_some());
        let s = Store::open(dir.path()).unwrap();
        // A miss (the caller fetches it again), and the file is gone.
        assert!(s.get_manifest(&d).unwrap().is_none());
        assert!(!s.content_path("manifests", &d).exists());
        assert!(s.get_manifest(&d).unwrap().is_none());
    }
}
