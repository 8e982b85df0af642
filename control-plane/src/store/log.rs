//! The embedded store's file: an append-only log of checksummed records.
//!
//! ```text
//! file   := MAGIC record*
//! record := len: u32 LE | crc32: u32 LE (of payload) | payload (len bytes, len >= 1)
//! payload:= tag u8 | body
//!   tag 1 Batch { revision: i64, n: u32, op * n }   one revision's changes, applied all or nothing
//!     op := 1 key value lease: i64                   put (lease 0: none)
//!         | 2 key                                    delete
//!   tag 2 Base  { revision: i64 }                    first record of a snapshot: the revision it is at
//!   tag 3 Entry { key value create: i64 mod: i64 lease: i64 }   one live key of a snapshot
//! key, value := len: u32 LE | bytes
//! ```
//!
//! Every append is fsynced before the write is acknowledged, so only the last record can be torn by a
//! crash: replay drops a bad record at the end of the file (or followed only by zeros, as a file system
//! may leave after a crash), and refuses a bad record followed by good data (that is corruption, not a
//! torn write, and dropping it would lose acknowledged writes). A snapshot (the live keys) is written to
//! a temp file, fsynced and renamed over the log, then the directory is fsynced.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The first bytes of a log file: format name and version.
pub(super) const MAGIC: &[u8; 8] = b"WHARFKV1";

/// The log's file name inside the store directory.
pub(super) const LOG_FILE: &str = "store.log";
const TMP_FILE: &str = "store.log.tmp";

/// The largest record accepted on replay (a sanity bound against a garbage length field).
const MAX_RECORD: usize = 256 << 20;

/// One change inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Put { key: String, value: Vec<u8>, lease: i64 },
    Delete { key: String },
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record {
    Batch { revision: i64, ops: Vec<Op> },
    Base { revision: i64 },
    Entry { key: String, value: Vec<u8>, create_revision: i64, mod_revision: i64, lease: i64 },
}

const TAG_BATCH: u8 = 1;
const TAG_BASE: u8 = 2;
const TAG_ENTRY: u8 = 3;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Keys and values are far below 4 GiB (etcd's own limit is 1.5 MiB per request).
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_batch(p: &mut Vec<u8>, revision: i64, ops: &[Op]) {
    p.push(TAG_BATCH);
    p.extend_from_slice(&revision.to_le_bytes());
    p.extend_from_slice(&u32::try_from(ops.len()).unwrap_or(u32::MAX).to_le_bytes());
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                p.push(OP_PUT);
                put_bytes(p, key.as_bytes());
                put_bytes(p, value);
                p.extend_from_slice(&lease.to_le_bytes());
            }
            Op::Delete { key } => {
                p.push(OP_DELETE);
                put_bytes(p, key.as_bytes());
            }
        }
    }
}

/// Frames a payload: length, checksum, payload.
fn frame(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len() + 8);
    out.extend_from_slice(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
    out.extend_from_slice(p);
    out
}

/// Encodes `rec` as a framed record (length, checksum, payload).
pub(super) fn encode(rec: &Record) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    match rec {
        Record::Batch { revision, ops } => encode_batch(&mut p, *revision, ops),
        Record::Base { revision } => {
            p.push(TAG_BASE);
            p.extend_from_slice(&revision.to_le_bytes());
        }
        Record::Entry { key, value, create_revision, mod_revision, lease } => {
            p.push(TAG_ENTRY);
            put_bytes(&mut p, key.as_bytes());
            put_bytes(&mut p, value);
            p.extend_from_slice(&create_revision.to_le_bytes());
            p.extend_from_slice(&mod_revision.to_le_bytes());
            p.extend_from_slice(&lease.to_le_bytes());
        }
    }
    frame(&p)
}

/// A reader over one record's payload.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

/// Decodes one payload (checksum already verified). `None` when it does not parse.
fn decode_payload(p: &[u8]) -> Option<Record> {
    let mut c = Cursor { buf: p };
    let rec = match c.u8()? {
        TAG_BATCH => {
            let revision = c.i64()?;
            let n = c.u32()? as usize;
            let mut ops = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                ops.push(match c.u8()? {
                    OP_PUT => Op::Put { key: c.string()?, value: c.bytes()?, lease: c.i64()? },
                    OP_DELETE => Op::Delete { key: c.string()? },
                    _ => return None,
                });
            }
            Record::Batch { revision, ops }
        }
        TAG_BASE => Record::Base { revision: c.i64()? },
        TAG_ENTRY => Record::Entry {
            key: c.string()?,
            value: c.bytes()?,
            create_revision: c.i64()?,
            mod_revision: c.i64()?,
            lease: c.i64()?,
        },
        _ => return None,
    };
    if !c.buf.is_empty() {
        return None;
    }
    Some(rec)
}

/// What replaying a log file found.
#[derive(Debug)]
pub(super) struct Replayed {
    pub records: Vec<Record>,
    /// The length of the valid prefix of the file: the log continues from here.
    pub valid_len: u64,
    /// Whether a torn record at the end was dropped.
    pub torn_tail: bool,
}

/// Parses a whole log file's bytes.
pub(super) fn replay(data: &[u8]) -> Result<Replayed, StoreError> {
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(StoreError::Corrupt(format!(
            "log does not start with {:?}: not a wharf store log, or a newer format",
            String::from_utf8_lossy(MAGIC)
        )));
    }
    let mut pos = MAGIC.len();
    let mut records = Vec::new();
    while pos < data.len() {
        match frame_at(data, pos) {
            Some((rec, next)) => {
                records.push(rec);
                pos = next;
            }
            None => {
                if tail_is_torn(data, pos) {
                    return Ok(Replayed { records, valid_len: pos as u64, torn_tail: true });
                }
                return Err(StoreError::Corrupt(format!(
                    "bad record at offset {pos} of {} bytes followed by more data",
                    data.len()
                )));
            }
        }
    }
    Ok(Replayed { records, valid_len: pos as u64, torn_tail: false })
}

/// The record at `pos` and the offset after it, when it is complete and intact.
fn frame_at(data: &[u8], pos: usize) -> Option<(Record, usize)> {
    let header = data.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = data.get(pos + 8..pos + 8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some((decode_payload(payload)?, pos + 8 + len))
}

/// Whether the bad record at `pos` is a torn final write: it runs to (or past) the end of the file, or
/// everything after its header is zeros.
fn tail_is_torn(data: &[u8], pos: usize) -> bool {
    let rest = &data[pos..];
    if rest.len() < 8 || rest.iter().all(|&b| b == 0) {
        return true;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    len > 0 && 8 + len >= rest.len()
}

/// Reads and replays the log in `dir`; `None` when there is none yet (a new store). Truncates a torn
/// tail so the next append starts on a record boundary.
pub(super) fn open_existing(dir: &Path) -> Result<Option<(Replayed, File)>, StoreError> {
    let _ = std::fs::remove_file(dir.join(TMP_FILE));
    let path = dir.join(LOG_FILE);
    let mut file = match OpenOptions::new().read(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening", &path, e)),
    };
    // It holds upstream passwords and token hashes: the service user's alone (older stores were
    // created 0644).
    let mode = file.metadata().map_err(|e| io_err("reading the mode of", &path, e))?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err("restricting", &path, e))?;
        tracing::info!(path = %path.display(), was = format!("{:o}", mode & 0o777), "store log made private (0600)");
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(|e| io_err("reading", &path, e))?;
    let replayed = replay(&data)?;
    if replayed.torn_tail {
        tracing::warn!(
            path = %path.display(),
            valid_len = replayed.valid_len,
            file_len = data.len(),
            "dropping a torn record at the end of the store log (a write cut short by a crash)"
        );
        file.set_len(replayed.valid_len).map_err(|e| io_err("truncating", &path, e))?;
        file.sync_all().map_err(|e| io_err("syncing", &path, e))?;
    }
    Ok(Some((replayed, file)))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Internal(format!("{what} {}: {e}", path.display()))
}

/// Appends to the log, and replaces it with a snapshot.
pub(super) struct LogWriter {
    dir: PathBuf,
    file: File,
    len: u64,
    /// Set when a failed append could not be rolled back: the log's end is unknown, refuse writes.
    poisoned: Option<String>,
}

impl LogWriter {
    /// Continues the log `file` whose valid length is `len`.
    pub fn new(dir: &Path, file: File, len: u64) -> Self {
        Self { dir: dir.to_path_buf(), file, len, poisoned: None }
    }

    /// Creates a log holding `records` (a snapshot) atomically, replacing any log in `dir`.
    pub fn create(dir: &Path, records: &[Record]) -> Result<Self, StoreError> {
        let mut data = MAGIC.to_vec();
        for r in records {
            data.extend_from_slice(&encode(r));
        }
        let file = write_atomically(dir, &data)?;
        Ok(Self { dir: dir.to_path_buf(), file, len: data.len() as u64, poisoned: None })
    }

    /// The log's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Refuses to go on after an unrecoverable write error.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.poisoned {
            Some(why) => Err(StoreError::Internal(format!("store log unusable after an earlier error: {why}"))),
            None => Ok(()),
        }
    }

    /// Appends one revision's batch and fsyncs. On failure the log is cut back to its previous length,
    /// so a failed write leaves nothing behind.
    pub fn append_batch(&mut self, revision: i64, ops: &[Op]) -> Result<(), StoreError> {
        let mut p = Vec::with_capacity(64);
        encode_batch(&mut p, revision, ops);
        self.append_frame(&frame(&p))
    }

    fn append_frame(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        let res = self.file.write_all(buf).and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let path = self.dir.join(LOG_FILE);
                if let Err(e2) = self.file.set_len(self.len).and_then(|()| self.file.sync_data()) {
                    self.poisoned = Some(format!("rolling back a failed append to {}: {e2}", path.display()));
                }
                Err(io_err("appending to", &path, e))
            }
        }
    }

    /// Replaces the log with `records` (a snapshot of the live keys) via temp file + rename.
    pub fn rewrite(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.check()?;
        let fresh = Self::create(&self.dir, records)?;
        self.file = fresh.file;
        self.len = fresh.len;
        Ok(())
    }
}

/// Writes `data` to the log path via a fsynced temp file, a rename and a directory fsync. Returns the
/// new log, open for appending.
fn write_atomically(dir: &Path, data: &[u8]) -> Result<File, StoreError> {
    let tmp = dir.join(TMP_FILE);
    let path = dir.join(LOG_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err("creating", &tmp, e))?;
    f.set_len(0).map_err(|e| io_err("truncating", &tmp, e))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| io_err("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err("renaming over", &path, e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing directory", dir, e))?;
    Ok(f)
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
