//! Verified blob files served from read-only memory maps, so a warm hit costs one copy per byte
//! (the kernel's, from the page cache into the socket) instead of two (into a buffer, then out),
//! and no read syscall per chunk.
//!
//! The one module that allows `unsafe`: mapping a file is unsafe because another process may
//! change or truncate it while it is mapped. What keeps that safe here:
//!
//! - **Only committed, verified blob files are mapped.** Wharf never writes or truncates a file
//!   once it is renamed into the cache: fetches write staging files, eviction, the scrubber and
//!   corruption handling unlink. An unlinked file stays readable through its map until the map is
//!   dropped, as through an open descriptor; the store drops its shared map of a blob when it
//!   removes the blob ([`MapCache::forget`]), so the disk space comes back once the responses
//!   still reading it end.
//! - **Only the kernel reads the mapped bytes.** Maps are handed only to responses on plaintext
//!   connections, where hyper passes the bytes to `writev(2)` and no code of ours reads them (byte
//!   counts only). Should something outside Wharf truncate a mapped file, the kernel's copy from
//!   the missing pages fails with `EFAULT` and the connection ends in an error: no signal is raised,
//!   since the fault is taken in the kernel. TLS connections (rustls encrypts in user space, where a
//!   missing page would raise `SIGBUS`) and unverified files (hashed in user space) keep reading
//!   the file into buffers.
//! - **Changed bytes are no worse than a read.** A verified file changed in place is served as a
//!   read would serve it, until the next verification (`--blob-reverify-after`, the scrubber).
//! - **No page fault waits for the disk on the runtime.** A window goes out once `mincore(2)` says
//!   each of its pages is in the page cache; otherwise its pages are faulted in first by a blocking
//!   task (`MADV_POPULATE_READ`).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use memmap2::{Advice, Mmap, MmapOptions};
use wharf_core::Digest;

/// The most of a file one response holds mapped at once when the file is not in the
/// [`MapCache`]: a large blob goes out as a sequence of windows, each unmapped once written.
pub const WINDOW: usize = 4 * 1024 * 1024;
/// Shared maps the store keeps of hot blobs, in bytes of file mapped at most. Mapped pages are page
/// cache (shared, reclaimable, charged as any read would charge them) but count in the process's
/// resident set while mapped.
pub const CACHE_BYTES: u64 = 512 * 1024 * 1024;
/// Blobs larger than this are served through per-response windows, never kept mapped.
pub const CACHE_MAX_FILE: u64 = 64 * 1024 * 1024;
/// Shared maps kept at most (each keeps its file's inode alive).
const CACHE_MAX_ENTRIES: usize = 4096;

/// A whole blob file, mapped once and shared by the responses that read it.
pub struct MappedFile {
    map: Mmap,
    inode: u64,
}

impl MappedFile {
    /// Maps `file`, which must be `size` bytes long (`None` otherwise, for an empty file, or when
    /// mapping fails: the caller reads the file instead).
    pub fn new(file: &File, size: u64) -> Option<Arc<Self>> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = file.metadata().ok()?;
        if size == 0 || meta.len() != size {
            return None;
        }
        // SAFETY: a committed cache file is never written or truncated by Wharf, and the mapped
        // bytes are read only by the kernel (see the module comment).
        let map = unsafe { MmapOptions::new().len(usize::try_from(size).ok()?).map(file) }.ok()?;
        Some(Arc::new(Self { map, inode: meta.ino() }))
    }

    /// The inode the map is of: the store checks it against the blob's path before sharing the map.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where the mapped bytes of one response come from.
pub enum Source {
    /// The store's shared map of the whole file.
    Shared(Arc<MappedFile>),
    /// The open file, mapped one [`WINDOW`] at a time.
    Windows(File),
}

/// Streams `[start, end)` of a committed, verified blob file from memory maps, one [`WINDOW`] per
/// chunk, each chunk faulted in by a blocking task first if the page cache does not hold it.
pub fn stream(
    source: Source,
    start: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::try_unfold((source, start), move |(source, pos)| async move {
        if pos >= end {
            return Ok(None);
        }
        let len = (end - pos).min(WINDOW as u64) as usize;
        let window = match &source {
            Source::Shared(m) => Window::shared(m.clone(), pos, len)?,
            Source::Windows(file) => Window::map(file, pos, len)?,
        };
        let window = if window.resident() {
            window
        } else {
            tokio::task::spawn_blocking(move || window.populate().map(|()| window))
                .await
                .map_err(std::io::Error::other)??
        };
        Ok(Some((window.into_bytes(), (source, pos + len as u64))))
    })
}

/// One chunk of a response: `len` bytes at `lead` in a map whose start is page-aligned.
struct Window {
    map: Arc<MappedFile>,
    lead: usize,
    len: usize,
}

impl Window {
    fn shared(map: Arc<MappedFile>, pos: u64, len: usize) -> std::io::Result<Self> {
        if pos.checked_add(len as u64).is_none_or(|e| e > map.len()) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the mapped blob"));
        }
        Ok(Self { map, lead: pos as usize, len })
    }

    fn map(file: &File, pos: u64, len: usize) -> std::io::Result<Self> {
        let page = rustix::param::page_size() as u64;
        let aligned = pos - pos % page;
        let lead = (pos - aligned) as usize;
        if file.metadata()?.len() < pos + len as u64 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a file shorter than its size"));
        }
        // SAFETY: as for `MappedFile::new`.
        let map = unsafe { MmapOptions::new().offset(aligned).len(lead + len).map(file) }?;
        let _ = map.advise(Advice::Sequential);
        Ok(Self { map: Arc::new(MappedFile { map, inode: 0 }), lead, len })
    }

    /// The page-aligned span of the map this window covers.
    fn pages(&self) -> (usize, usize) {
        let page = rustix::param::page_size();
        let first = self.lead - self.lead % page;
        (first, self.lead + self.len - first)
    }

    /// Whether every page of the window is in the page cache (`mincore(2)`).
    fn resident(&self) -> bool {
        let (first, span) = self.pages();
        let page = rustix::param::page_size();
        let mut vec = vec![0u8; span.div_ceil(page)];
        // SAFETY: `[first, first + span)` lies within the live mapping and starts at a page
        // boundary; `vec` holds one byte per page of it, as mincore(2) writes.
        let rc =
            unsafe { libc::mincore(self.map.map.as_ptr().add(first) as *mut libc::c_void, span, vec.as_mut_ptr()) };
        rc == 0 && vec.iter().all(|v| v & 1 == 1)
    }

    /// Faults the window's pages in (blocking: it may wait for the disk).
    fn populate(&self) -> std::io::Result<()> {
        let (first, span) = self.pages();
        self.map.map.advise_range(Advice::PopulateRead, first, span).or_else(|e| {
            // Kernels before 5.14 know no MADV_POPULATE_READ: read-ahead, and the faults happen
            // on the kernel's copy.
            if e.raw_os_error() == Some(libc::EINVAL) {
                self.map.map.advise_range(Advice::WillNeed, first, span)
            } else {
                Err(e)
            }
        })
    }

    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map.map[self.lead..self.lead + self.len]
    }
}

/// The store's shared maps of hot blob files, least recently used dropped first, bounded in bytes
/// mapped ([`CACHE_BYTES`] by default) and in entries ([`CACHE_MAX_ENTRIES`]).
pub struct MapCache {
    inner: Mutex<Maps>,
    budget: u64,
    max_file: u64,
}

impl Default for MapCache {
    fn default() -> Self {
        Self::new(CACHE_BYTES, CACHE_MAX_FILE)
    }
}

#[derive(Default)]
struct Maps {
    entries: HashMap<Digest, (Arc<MappedFile>, u64)>,
    bytes: u64,
    tick: u64,
}

impl Maps {
    fn remove(&mut self, d: &Digest) {
        if let Some((old, _)) = self.entries.remove(d) {
            self.bytes -= old.len();
        }
    }
}

impl MapCache {
    /// At most `budget` bytes mapped, no file over `max_file`.
    pub fn new(budget: u64, max_file: u64) -> Self {
        Self { inner: Mutex::default(), budget, max_file }
    }

    /// Whether a file of `size` bytes may be kept.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.max_file
    }

    pub fn get(&self, d: &Digest) -> Option<Arc<MappedFile>> {
        let mut m = self.lock();
        m.tick += 1;
        let tick = m.tick;
        let (map, used) = m.entries.get_mut(d)?;
        *used = tick;
        Some(map.clone())
    }

    /// Keeps `map` as `d`'s shared map, dropping the least recently used to make room. A file
    /// larger than the per-file bound is not kept.
    pub fn insert(&self, d: &Digest, map: Arc<MappedFile>) {
        if !self.fits(map.len()) {
            return;
        }
        let mut m = self.lock();
        m.remove(d);
        while m.bytes + map.len() > self.budget || m.entries.len() >= CACHE_MAX_ENTRIES {
            let Some(oldest) = m.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) else {
                break;
            };
            m.remove(&oldest);
        }
        m.tick += 1;
        let tick = m.tick;
        m.bytes += map.len();
        m.entries.insert(d.clone(), (map, tick));
    }

    /// Drops `d`'s shared map (the blob left the cache).
    pub fn forget(&self, d: &Digest) {
        self.lock().remove(d);
    }

    /// Shared maps kept, and the bytes of file they map.
    pub fn usage(&self) -> (usize, u64) {
        let m = self.lock();
        (m.entries.len(), m.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use futures_util::TryStreamExt as _;

    use super::*;

    fn file_of(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn collect(source: Source, start: u64, end: u64) -> std::io::Result<(Vec<u8>, usize)> {
        let chunks: Vec<Bytes> = stream(source, start, end).try_collect().await?;
        Ok((chunks.concat(), chunks.len()))
    }

    #[tokio::test]
    async fn streams_any_range_from_windows_and_from_a_shared_map() {
        let d = data(2 * WINDOW + 3 * 4096 + 123);
        for (start, end) in [(0, d.len()), (1, 11), (4095, 4097), (WINDOW - 1, WINDOW + 1), (5000, d.len())] {
            let (got, chunks) = collect(Source::Windows(file_of(&d)), start as u64, end as u64).await.unwrap();
            assert_eq!(got, &d[start..end], "windows {start}..{end}");
            assert_eq!(chunks, (end - start).div_ceil(WINDOW), "one chunk per window");
            let shared = MappedFile::new(&file_of(&d), d.len() as u64).unwrap();
            let (got, _) = collect(Source::Shared(shared), start as u64, end as u64).await.unwrap();
            assert_eq!(got, &d[start..end], "shared {start}..{end}");
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_the_range_is_an_error_not_a_signal() {
        let f = file_of(&data(100));
        let err = collect(Source::Windows(f), 0, 101).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let shared = MappedFile::new(&file_of(&data(100)), 100).unwrap();
        assert_eq!(
            collect(Source::Shared(shared), 50, 101).await.unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        assert!(MappedFile::new(&file_of(&data(100)), 99).is_none(), "a size that is not the file's");
        assert!(MappedFile::new(&file_of(&[]), 0).is_none(), "an empty file");
    }

    #[tokio::test]
    async fn an_unlinked_file_stays_readable_through_its_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"immutable bytes").unwrap();
        let shared = MappedFile::new(&File::open(&path).unwrap(), 15).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(collect(Source::Shared(shared), 0, 15).await.unwrap().0, b"immutable bytes");
    }

    #[test]
    fn the_cache_keeps_the_recently_used_within_its_budget() {
        let c = MapCache::new(8 * 4096, 4096);
        let maps: Vec<(Digest, Arc<MappedFile>)> =
            (0..9u8).map(|i| (Digest::of(&[i]), MappedFile::new(&file_of(&[i; 4096]), 4096).unwrap())).collect();
        for (d, m) in &maps[..8] {
            c.insert(d, m.clone());
        }
        assert_eq!(c.usage(), (8, 8 * 4096));
        assert!(c.get(&maps[0].0).is_some(), "touch the first");
        c.insert(&maps[8].0, maps[8].1.clone());
        assert_eq!(c.usage(), (8, 8 * 4096), "one dropped for the new one");
        assert!(c.get(&maps[0].0).is_some(), "the recently used stays");
        assert!(c.get(&maps[1].0).is_none(), "the least recently used went");
        c.insert(&maps[0].0, maps[0].1.clone());
        assert_eq!(c.usage(), (8, 8 * 4096), "kept again: replaced, not counted twice");
        c.forget(&maps[0].0);
        assert!(c.get(&maps[0].0).is_none());
        assert_eq!(c.usage(), (7, 7 * 4096));
        let big = MappedFile::new(&file_of(&[0; 4097]), 4097).unwrap();
        assert!(!c.fits(4097));
        c.insert(&Digest::of(b"big"), big);
        assert_eq!(c.usage().0, 7, "a file over the per-file bound is not kept");
    }
}
