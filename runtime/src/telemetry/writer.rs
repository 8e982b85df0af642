//! The log writer: formatted lines go into one shared buffer, bounded in lines, and a thread of its
//! own writes them out, many per call. A logging thread never waits on the write, and never wakes
//! the writer line by line: it wakes it only when a line arrives at an empty buffer; the writer
//! then lets more gather for a moment and writes them all at once. (tracing-appender's non-blocking
//! writer sent each line through a channel as a `Vec` of its own and woke its thread for most of
//! them: a futex call and a context switch per request under load.)
//!
//! Lines that do not fit (the output is slow or stuck: a pipe nobody reads, a full disk) are
//! dropped and counted ([`LogQueue::dropped`]), never waited for. Dropping the [`WriterGuard`]
//! writes out what is queued.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer lets lines gather once woken: a busy node writes hundreds per call.
const GATHER: Duration = Duration::from_millis(2);
/// A buffer that grew beyond this (a burst) is not kept for the next round.
const KEEP_CAPACITY: usize = 1 << 20;

pub struct LogQueue {
    state: Mutex<Queued>,
    wake: Condvar,
    limit: usize,
    dropped: AtomicU64,
}

struct Queued {
    bytes: Vec<u8>,
    lines: usize,
    closed: bool,
}

impl LogQueue {
    /// Lines dropped since start because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &[u8]) {
        let mut q = self.lock();
        if q.lines >= self.limit || q.closed {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = q.lines == 0;
        q.bytes.extend_from_slice(line);
        q.lines += 1;
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

/// What the fmt layer writes through: each `write` is one formatted line.
#[derive(Clone)]
pub struct LogWriter(Arc<LogQueue>);

impl LogWriter {
    pub fn queue(&self) -> &Arc<LogQueue> {
        &self.0
    }
}

impl Write for &LogQueue {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

/// Stops the writer thread when dropped, once it wrote out every line queued, waiting at most
/// [`SHUTDOWN_WAIT`] (an output nobody reads must not keep the process from exiting).
pub struct WriterGuard {
    queue: Arc<LogQueue>,
    done: mpsc::Receiver<()>,
}

/// How long shutdown waits for the queued lines to be written.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
        // The thread drops its end when it returns.
        let _ = self.done.recv_timeout(SHUTDOWN_WAIT);
    }
}

/// A queue of at most `limit_lines` lines written to `out` by a thread named `thread_name`.
pub fn spawn(
    limit_lines: usize,
    out: impl Write + Send + 'static,
    thread_name: &str,
) -> std::io::Result<(LogWriter, WriterGuard)> {
    let queue = Arc::new(LogQueue {
        state: Mutex::new(Queued { bytes: Vec::with_capacity(64 * 1024), lines: 0, closed: false }),
        wake: Condvar::new(),
        limit: limit_lines.max(1),
        dropped: AtomicU64::new(0),
    });
    let q = queue.clone();
    let (finished, done) = mpsc::channel::<()>();
    std::thread::Builder::new().name(thread_name.into()).spawn(move || {
        write_out(&q, out);
        drop(finished);
    })?;
    Ok((LogWriter(queue.clone()), WriterGuard { queue, done }))
}

fn write_out(queue: &LogQueue, mut out: impl Write) {
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        let mut q = queue.lock();
        while q.lines == 0 && !q.closed {
            q = queue.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        if q.lines == 0 {
            return; // closed, and everything written
        }
        if !q.closed {
            drop(q);
            std::thread::sleep(GATHER);
            q = queue.lock();
        }
        std::mem::swap(&mut q.bytes, &mut spare);
        q.lines = 0;
        drop(q);
        // An output that fails (closed, full) loses these lines; the next ones are tried again.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if spare.capacity() > KEEP_CAPACITY {
            spare = Vec::with_capacity(64 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_buf::SharedBuf;
    use super::*;

    #[test]
    fn lines_from_many_threads_come_out_whole_and_all_by_shutdown() {
        let out = SharedBuf::default();
        let (writer, guard) = spawn(100_000, out.clone(), "test-log-writer").unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let w = writer.clone();
                s.spawn(move || {
                    for i in 0..5000 {
                        let mut handle = w.make_writer();
                        handle.write_all(format!("thread {t} line {i} {}\n", "x".repeat(i % 300)).as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let text = out.text();
        assert_eq!(text.lines().count(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|l| l.split(' ').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "thread {t}'s lines in order, none torn");
        }
        assert_eq!(writer.queue().dropped(), 0);
    }

    /// An output that blocks until told to go on.
    struct Stuck(mpsc::Receiver<()>, SharedBuf);

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_and_counts_lines_and_never_blocks_the_logger() {
        let (go, wait) = mpsc::channel();
        let out = SharedBuf::default();
        let (writer, guard) = spawn(10, Stuck(wait, out.clone()), "test-log-writer").unwrap();
        let started = std::time::Instant::now();
        // The first line wakes the writer, which then blocks in `write` with it (or with the few
        // that gathered): from there on, the queue holds at most 10 lines.
        for i in 0..1000 {
            writer.make_writer().write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "logging waited on the output");
        let dropped = writer.queue().dropped();
        // Unblocked, the writer writes what was queued; shutdown waits for it.
        drop(go);
        drop(guard);
        let written = out.text().lines().count() as u64;
        assert_eq!(written + dropped, 1000, "every line written or counted as dropped");
        // The batch the writer held when it blocked, and a full queue behind it.
        assert!((10..=20).contains(&written), "{written} written, {dropped} dropped");
    }

    #[test]
    fn shutdown_does_not_wait_forever_on_an_output_nobody_reads() {
        let (_go, wait) = mpsc::channel();
        let (writer, guard) = spawn(10, Stuck(wait, SharedBuf::default()), "test-log-writer").unwrap();
        writer.make_writer().write_all(b"a line\n").unwrap();
        let started = std::time::Instant::now();
        drop(guard);
        let took = started.elapsed();
        assert!(took >= SHUTDOWN_WAIT / 2 && took < SHUTDOWN_WAIT * 3, "{took:?}");
    }
}
