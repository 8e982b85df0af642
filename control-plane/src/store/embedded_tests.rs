//! The embedded store across reopen: revisions kept, torn tails dropped, leases gone, snapshots.

use super::*;
use crate::store::log::LOG_FILE;
use futures_util::StreamExt as _;

async fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir).await.unwrap()
}

#[tokio::test]
async fn reopen_keeps_keys_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let r1 = s.create("repos/a", b"1".to_vec()).await.unwrap();
    let r2 = s.create("repos/b", b"2".to_vec()).await.unwrap();
    let r3 = s.update("repos/a", b"1b".to_vec(), Some(r1)).await.unwrap();
    let r4 = s.delete("repos/b", None).await.unwrap();
    assert!(r1 < r2 && r2 < r3 && r3 < r4);
    drop(s);

    let s = open(dir.path()).await;
    assert_eq!(s.current_revision().await.unwrap(), r4);
    let a = s.get("repos/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.create_revision, a.mod_revision), (&b"1b"[..], r1, r3));
    assert!(s.get("repos/b").await.unwrap().is_none());
    // The next write continues the sequence; history from before the restart is gone.
    assert!(s.create("repos/c", vec![]).await.unwrap() > r4);
    let mut w = s.watch("", r4).await.unwrap();
    assert!(matches!(w.next().await, Some(Err(StoreError::Compacted { .. }))));
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn a_torn_last_record_is_ignored_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    s.create("repos/a", b"1".to_vec()).await.unwrap();
    let rev = s.create("repos/b", b"2".to_vec()).await.unwrap();
    drop(s);
    // Cut the last record short, as a crash during its write would.
    let path = dir.path().join(LOG_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();

    let s = open(dir.path()).await;
    assert!(s.get("repos/a").await.unwrap().is_some());
    assert!(s.get("repos/b").await.unwrap().is_none(), "the torn write was never acknowledged");
    assert_eq!(s.current_revision().await.unwrap(), rev - 1);
    // Writing goes on after the valid prefix, and survives another reopen.
    let next = s.create("repos/c", b"3".to_vec()).await.unwrap();
    assert_eq!(next, rev);
    drop(s);
    let s = open(dir.path()).await;
    assert_eq!(s.get("repos/c").await.unwrap().unwrap().mod_revision, next);
}

#[tokio::test]
async fn leased_keys_are_gone_after_reopen_with_a_delete_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    s.create("repos/a", b"1".to_vec()).await.unwrap();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    let put = s.put_with_lease("nodes/n1", b"n".to_vec(), lease.id).await.unwrap();
    drop(s);

    let s = open(dir.path()).await;
    assert!(s.get("nodes/n1").await.unwrap().is_none());
    assert!(s.get("repos/a").await.unwrap().is_some());
    let rev = s.current_revision().await.unwrap();
    assert_eq!(rev, put + 1, "the deletion is a change of its own");
    assert!(matches!(s.keep_alive(lease.id).await, Err(StoreError::LeaseNotFound { .. })));
    // A node that held revision `put` and resumes from put + 1 sees the deletion.
    let mut w = s.watch("nodes/", put + 1).await.unwrap();
    let ev = w.next().await.unwrap().unwrap();
    assert_eq!((ev.kind, ev.kv.key.as_str(), ev.revision), (EventKind::Delete, "nodes/n1", rev));
}

#[tokio::test]
async fn the_log_is_rewritten_as_a_snapshot_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EmbeddedOptions { rewrite_min_bytes: 4096, ..EmbeddedOptions::default() };
    let s = EmbeddedStore::open_with(dir.path(), opts.clone()).await.unwrap();
    let mut rev = s.create("repos/k", vec![0; 100]).await.unwrap();
    let mut rewrites = 0;
    for i in 0..200u8 {
        let before = s.log_len();
        rev = s.update("repos/k", vec![i; 100], Some(rev)).await.unwrap();
        rewrites += usize::from(s.log_len() < before);
    }
    // 200 records of ~140 bytes: rewritten every ~30 writes, never past the threshold plus one record.
    assert!(rewrites >= 5, "rewrites: {rewrites}");
    assert!(s.log_len() <= 4096 + 200, "log: {} bytes", s.log_len());
    drop(s);
    let s = EmbeddedStore::open_with(dir.path(), opts).await.unwrap();
    let kv = s.get("repos/k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.mod_revision), (vec![199; 100], rev));
    assert_eq!(s.current_revision().await.unwrap(), rev);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("in use"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened twice"),
    }
    drop(s);
    open(dir.path()).await;
}

#[tokio::test]
async fn watch_streams_end_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path()).await;
    let mut w = s.watch("", 0).await.unwrap();
    drop(s);
    assert!(matches!(w.next().await, Some(Err(StoreError::Unavailable(_)))));
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn the_store_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let s = open(&dir).await;
    s.create("repos/a", b"secret".to_vec()).await.unwrap();
    drop(s);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(LOG_FILE)), 0o600);
    // A log left readable by others (as older versions wrote it) is made private at open.
    std::fs::set_permissions(dir.join(LOG_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
    let s = open(&dir).await;
    assert_eq!(mode(&dir.join(LOG_FILE)), 0o600);
    assert!(s.get("repos/a").await.unwrap().is_some());
}
