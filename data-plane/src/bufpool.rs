//! Read buffers that come back when the response body that carried them is dropped.
//!
//! Serving a blob reads the file in chunks into memory before hyper writes them out. A fresh
//! buffer per chunk costs a zero-fill and, past malloc's mmap threshold, fresh pages: the bench
//! showed that as a sixth of a node's CPU. Buffers from this pool are initialised once and reused:
//! a chunk is a `Bytes` whose owner puts its buffer back into the pool on drop.

use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;

/// Size of every buffer in the pool: the largest chunk read at once.
pub const CHUNK: usize = 512 * 1024;
/// Buffers kept for reuse at most (16 MiB); more in use at once are allocated and freed.
const MAX_FREE: usize = 32;

static POOL: LazyLock<Arc<BufPool>> = LazyLock::new(|| Arc::new(BufPool { free: Mutex::new(Vec::new()) }));

pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// A buffer of `CHUNK` initialised bytes, from the pool or new.
pub fn take() -> Vec<u8> {
    POOL.free.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_else(|| vec![0; CHUNK])
}

/// The first `len` bytes of `buf` as `Bytes`; the buffer returns to the pool when they are dropped.
pub fn freeze(buf: Vec<u8>, len: usize) -> Bytes {
    Bytes::from_owner(Pooled { buf, len, pool: POOL.clone() })
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() == CHUNK {
            let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < MAX_FREE {
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back() {
        let mut b = take();
        b[..3].copy_from_slice(b"abc");
        let ptr = b.as_ptr();
        let bytes = freeze(b, 3);
        assert_eq!(&bytes[..], b"abc");
        drop(bytes);
        // Another test may race for the pool; look for ours among the free buffers.
        let free = POOL.free.lock().unwrap();
        assert!(free.iter().any(|f| f.as_ptr() == ptr));
    }
}
