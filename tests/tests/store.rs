//! The `ConfigStore` suite, run against both implementations: `EtcdStore` on a real etcd the harness
//! starts, and `EmbeddedStore` in a temp dir. Each behaviour is one generic async fn; the `suite!` macro
//! makes a `#[tokio::test]` per behaviour and store (`etcd_store::crud`, `embedded_store::crud`, ...).
//! Backend-specific tests (durability across reopen, history bound, unreachable etcd) follow.

// The behaviours are test code that clippy cannot see as such (plain async fns called by the tests).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use wharf_control::store::{
    ConfigStore, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, EventKind, StoreError, WatchEvent, WatchStream,
};
use wharf_tests::etcd::{EtcdCluster, closed_port};

/// How long to wait for an event that should come at once.
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// A store under test and what keeps its backend alive.
struct Fixture {
    store: Arc<dyn ConfigStore>,
    _etcd: Option<EtcdCluster>,
    _dir: Option<tempfile::TempDir>,
}

async fn etcd_fixture() -> Fixture {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await.unwrap().expect("start etcd");
    let mut opts = EtcdOptions::new(etcd.endpoints());
    // A prefix of its own, as a second control plane sharing the cluster would have.
    opts.prefix = format!("/{}/", wharf_tests::random_name("wharf-test-"));
    let store = EtcdStore::connect(opts).await.expect("connect to etcd");
    Fixture { store: Arc::new(store), _etcd: Some(etcd), _dir: None }
}

async fn embedded_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.expect("open embedded store");
    Fixture { store: Arc::new(store), _etcd: None, _dir: Some(dir) }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod etcd_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::etcd_fixture().await;
                    super::$name(&*f.store).await;
                }
            )*
        }
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::embedded_fixture().await;
                    super::$name(&*f.store).await;
                }
            )*
        }
    };
}

suite!(
    crud,
    compare_and_swap,
    concurrent_updates_one_wins,
    revisions_strictly_increase,
    watch_from_revision_and_resume,
    watch_filters_by_prefix_and_follows_live_changes,
    compacted_revision_ends_the_watch,
    lease_expiry_deletes_and_notifies,
    lease_keep_alive_and_revoke,
);

/// The next event, failing the test after [`EVENT_WAIT`].
async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
    }
}

/// Asserts that no event arrives for a short while.
async fn no_event(w: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

async fn crud(s: &dyn ConfigStore) {
    assert!(s.get("repos/a").await.unwrap().is_none());
    let r1 = s.create("repos/a", b"one".to_vec()).await.unwrap();
    let kv = s.get("repos/a").await.unwrap().expect("created key");
    assert_eq!(kv.key, "repos/a", "keys are relative to the prefix");
    assert_eq!(kv.value, b"one");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (r1, r1, None));

    match s.create("repos/a", b"again".to_vec()).await {
        Err(StoreError::AlreadyExists { key }) => assert_eq!(key, "repos/a"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(s.get("repos/a").await.unwrap().unwrap().value, b"one", "a failed create writes nothing");

    let r2 = s.create("repos/b", b"two".to_vec()).await.unwrap();
    s.create("policies/p", b"p".to_vec()).await.unwrap();
    let (kvs, rev) = s.list("repos/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["repos/a", "repos/b"], "sorted, only the prefix");
    assert!(rev >= r2);
    let (all, _) = s.list("").await.unwrap();
    assert_eq!(all.len(), 3);

    let r3 = s.update("repos/a", b"uno".to_vec(), None).await.unwrap();
    let kv = s.get("repos/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (&b"uno"[..], r1, r3));

    let r4 = s.delete("repos/a", None).await.unwrap();
    assert!(r4 > r3);
    assert!(s.get("repos/a").await.unwrap().is_none());
    assert!(matches!(s.update("repos/a", vec![], None).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(s.update("repos/a", vec![], Some(r3)).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(s.delete("repos/a", None).await, Err(StoreError::NotFound { .. })));
    assert!(s.get("repos/a").await.unwrap().is_none(), "a failed update does not create the key");

    // Re-creating a deleted key starts a new life: a new create revision.
    let r5 = s.create("repos/a", b"new".to_vec()).await.unwrap();
    assert_eq!(s.get("repos/a").await.unwrap().unwrap().create_revision, r5);

    assert!(matches!(s.get("").await, Err(StoreError::InvalidArgument(_))));
    assert!(matches!(s.update("repos/a", vec![], Some(0)).await, Err(StoreError::InvalidArgument(_))));
}

async fn compare_and_swap(s: &dyn ConfigStore) {
    let r1 = s.create("repos/cas", b"v1".to_vec()).await.unwrap();
    let r2 = s.update("repos/cas", b"v2".to_vec(), Some(r1)).await.unwrap();
    match s.update("repos/cas", b"stale".to_vec(), Some(r1)).await {
        Err(StoreError::RevisionMismatch { key, expected, current }) => {
            assert_eq!((key.as_str(), expected, current), ("repos/cas", r1, r2));
        }
        other => panic!("expected RevisionMismatch, got {other:?}"),
    }
    match s.delete("repos/cas", Some(r1)).await {
        Err(StoreError::RevisionMismatch { current, .. }) => assert_eq!(current, r2),
        other => panic!("expected RevisionMismatch, got {other:?}"),
    }
    let kv = s.get("repos/cas").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"v2"[..], r2), "nothing written on a mismatch");
    assert_eq!(s.current_revision().await.unwrap(), r2, "a failed write makes no revision");
    let r3 = s.delete("repos/cas", Some(r2)).await.unwrap();
    assert!(r3 > r2);
    assert!(s.get("repos/cas").await.unwrap().is_none());
}

async fn concurrent_updates_one_wins(s: &dyn ConfigStore) {
    let mut rev = s.create("repos/race", b"0".to_vec()).await.unwrap();
    for round in 0..10u8 {
        let (a, b) = tokio::join!(
            s.update("repos/race", vec![b'a', round], Some(rev)),
            s.update("repos/race", vec![b'b', round], Some(rev)),
        );
        let (winner, loser, value) = match (a, b) {
            (Ok(r), Err(e)) => (r, e, vec![b'a', round]),
            (Err(e), Ok(r)) => (r, e, vec![b'b', round]),
            (a, b) => panic!("round {round}: expected exactly one winner, got {a:?} and {b:?}"),
        };
        match loser {
            StoreError::RevisionMismatch { current, .. } => assert_eq!(current, winner),
            e => panic!("round {round}: the loser should see RevisionMismatch, got {e}"),
        }
        assert_eq!(s.get("repos/race").await.unwrap().unwrap().value, value);
        rev = winner;
    }
    // Concurrent creates of one key: one wins, the other finds it.
    let (a, b) = tokio::join!(s.create("repos/new", b"a".to_vec()), s.create("repos/new", b"b".to_vec()));
    assert!(a.is_ok() != b.is_ok(), "exactly one create wins: {a:?} {b:?}");
    assert!(matches!(a.err().or(b.err()), Some(StoreError::AlreadyExists { .. })));
}

async fn revisions_strictly_increase(s: &dyn ConfigStore) {
    let mut last = s.current_revision().await.unwrap();
    for i in 0..20 {
        let key = format!("repos/k{}", i % 4);
        let r = match s.create(&key, vec![i]).await {
            Ok(r) => r,
            Err(StoreError::AlreadyExists { .. }) => s.update(&key, vec![i], None).await.unwrap(),
            Err(e) => panic!("{e}"),
        };
        assert!(r > last, "revision {r} after {last}");
        assert_eq!(s.current_revision().await.unwrap(), r);
        last = r;
    }
    let (_, list_rev) = s.list("").await.unwrap();
    assert_eq!(list_rev, last);
}

async fn watch_from_revision_and_resume(s: &dyn ConfigStore) {
    s.create("repos/before", b"x".to_vec()).await.unwrap();
    let (_, listed) = s.list("repos/").await.unwrap();
    let c = s.create("repos/a", b"1".to_vec()).await.unwrap();
    let u = s.update("repos/a", b"2".to_vec(), Some(c)).await.unwrap();
    let d = s.delete("repos/before", None).await.unwrap();
    let c2 = s.create("repos/b", b"3".to_vec()).await.unwrap();

    let mut w = s.watch("repos/", listed + 1).await.unwrap();
    let e1 = next_event(&mut w).await;
    assert_eq!((e1.kind, e1.revision, e1.kv.key.as_str()), (EventKind::Put, c, "repos/a"));
    assert_eq!((e1.kv.value.as_slice(), e1.kv.create_revision, e1.kv.mod_revision), (&b"1"[..], c, c));
    assert_eq!(e1.prev_kv, None, "a create has no previous value");
    let e2 = next_event(&mut w).await;
    assert_eq!((e2.kind, e2.revision, e2.kv.value.as_slice()), (EventKind::Put, u, &b"2"[..]));
    assert_eq!(e2.kv.create_revision, c);
    assert_eq!(e2.prev_kv.as_ref().map(|p| p.value.as_slice()), Some(&b"1"[..]));
    let e3 = next_event(&mut w).await;
    assert_eq!((e3.kind, e3.revision, e3.kv.key.as_str()), (EventKind::Delete, d, "repos/before"));
    assert_eq!((e3.kv.mod_revision, e3.kv.value.len()), (d, 0));
    assert_eq!(e3.prev_kv.as_ref().map(|p| p.value.as_slice()), Some(&b"x"[..]));
    // Stop after three events, as a watcher that lost its connection would.
    drop(w);

    // Resume from the last revision seen + 1: the rest, nothing twice, then live changes.
    let mut w = s.watch("repos/", e3.revision + 1).await.unwrap();
    let e4 = next_event(&mut w).await;
    assert_eq!((e4.kind, e4.revision, e4.kv.key.as_str()), (EventKind::Put, c2, "repos/b"));
    no_event(&mut w).await;
    let live = s.update("repos/b", b"4".to_vec(), None).await.unwrap();
    let e5 = next_event(&mut w).await;
    assert_eq!((e5.revision, e5.kv.value.as_slice()), (live, &b"4"[..]));

    // From a revision in the middle: starts exactly there.
    let mut w = s.watch("repos/", u).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, u);
}

async fn watch_filters_by_prefix_and_follows_live_changes(s: &dyn ConfigStore) {
    // From "now": only changes made after the watch starts.
    s.create("repos/old", vec![]).await.unwrap();
    let mut w = s.watch("repos/", 0).await.unwrap();
    no_event(&mut w).await;
    let mut expected = Vec::new();
    for i in 0..5u8 {
        s.create(&format!("policies/p{i}"), vec![i]).await.unwrap();
        expected.push(s.create(&format!("repos/r{i}"), vec![i]).await.unwrap());
        s.create(&format!("repository/{i}"), vec![i]).await.unwrap();
    }
    for (i, rev) in expected.iter().enumerate() {
        let ev = next_event(&mut w).await;
        assert_eq!((ev.revision, ev.kv.key.clone()), (*rev, format!("repos/r{i}")));
    }
    no_event(&mut w).await;
}

async fn compacted_revision_ends_the_watch(s: &dyn ConfigStore) {
    let first = s.create("repos/c", b"0".to_vec()).await.unwrap();
    let mut rev = first;
    for i in 1..10u8 {
        rev = s.update("repos/c", vec![i], None).await.unwrap();
    }
    let compact_at = rev - 3;
    s.compact(compact_at).await.unwrap();
    s.compact(compact_at).await.expect("compacting again is fine");
    assert!(matches!(s.compact(rev + 100).await, Err(StoreError::InvalidArgument(_))));

    // Older than the compaction: Compacted first, then the end. Never a silent gap.
    let mut w = s.watch("repos/", first).await.unwrap();
    match tokio::time::timeout(EVENT_WAIT, w.next()).await.expect("an answer") {
        Some(Err(StoreError::Compacted { compact_revision, .. })) => assert!(compact_revision > first),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(tokio::time::timeout(EVENT_WAIT, w.next()).await.expect("the end").is_none());

    // The recovery: list again and watch from the list's revision + 1.
    let (kvs, listed) = s.list("repos/").await.unwrap();
    assert_eq!(kvs[0].value, vec![9]);
    let mut w = s.watch("repos/", listed + 1).await.unwrap();
    let next = s.update("repos/c", b"after".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, next);

    // From the compaction revision itself the history is still there.
    let mut w = s.watch("repos/", compact_at).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, compact_at);
}

async fn lease_expiry_deletes_and_notifies(s: &dyn ConfigStore) {
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    assert!(lease.ttl >= Duration::from_secs(1) && lease.ttl <= Duration::from_secs(5), "granted {:?}", lease.ttl);
    let put = s.put_with_lease("nodes/n1", b"node".to_vec(), lease.id).await.unwrap();
    let kv = s.get("nodes/n1").await.unwrap().unwrap();
    assert_eq!((kv.lease, kv.mod_revision), (Some(lease.id), put));
    let mut w = s.watch("nodes/", put + 1).await.unwrap();

    // No keep-alive: the key goes within the TTL plus the store's expiry check interval.
    let started = Instant::now();
    let ev = tokio::time::timeout(lease.ttl + Duration::from_secs(5), w.next())
        .await
        .expect("the leased key is deleted after its TTL")
        .expect("the watch goes on")
        .expect("no watch error");
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "nodes/n1"));
    assert!(ev.revision > put);
    eprintln!("lease of {:?} expired after {:?}", lease.ttl, started.elapsed());
    assert!(s.get("nodes/n1").await.unwrap().is_none());
    let ka = s.keep_alive(lease.id).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound { .. })), "keep_alive of an expired lease: {ka:?}");
    assert!(matches!(s.put_with_lease("nodes/n2", vec![], lease.id).await, Err(StoreError::LeaseNotFound { .. })));
    assert!(s.get("nodes/n2").await.unwrap().is_none());
}

async fn lease_keep_alive_and_revoke(s: &dyn ConfigStore) {
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    s.put_with_lease("nodes/a", b"a".to_vec(), lease.id).await.unwrap();
    s.put_with_lease("nodes/b", b"b".to_vec(), lease.id).await.unwrap();
    s.create("nodes/unleased", vec![]).await.unwrap();

    // Kept alive for well past its TTL, the lease holds.
    let until = Instant::now() + lease.ttl * 2 + Duration::from_millis(500);
    while Instant::now() < until {
        let ttl = s.keep_alive(lease.id).await.unwrap();
        assert_eq!(ttl, lease.ttl);
        tokio::time::sleep(lease.ttl / 4).await;
    }
    assert!(s.get("nodes/a").await.unwrap().is_some(), "kept alive, the key stays");

    let (_, rev) = s.list("nodes/").await.unwrap();
    let mut w = s.watch("nodes/", rev + 1).await.unwrap();
    s.revoke_lease(lease.id).await.unwrap();
    // Gone at once, both keys, the unleased one untouched.
    assert!(s.get("nodes/a").await.unwrap().is_none());
    assert!(s.get("nodes/b").await.unwrap().is_none());
    assert!(s.get("nodes/unleased").await.unwrap().is_some());
    let mut deleted = [next_event(&mut w).await, next_event(&mut w).await];
    deleted.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    assert!(deleted.iter().all(|e| e.kind == EventKind::Delete));
    assert_eq!(deleted.iter().map(|e| e.kv.key.as_str()).collect::<Vec<_>>(), ["nodes/a", "nodes/b"]);
    assert!(matches!(s.revoke_lease(lease.id).await, Err(StoreError::LeaseNotFound { .. })));

    // A plain update detaches a key from its lease: it outlives the lease.
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    s.put_with_lease("nodes/c", b"c".to_vec(), lease.id).await.unwrap();
    s.update("nodes/c", b"kept".to_vec(), None).await.unwrap();
    s.revoke_lease(lease.id).await.unwrap();
    assert_eq!(s.get("nodes/c").await.unwrap().map(|kv| kv.value), Some(b"kept".to_vec()));
}

// ---- Embedded store only ----

#[tokio::test]
async fn embedded_store_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = {
        let s = EmbeddedStore::open(dir.path()).await.unwrap();
        let r1 = s.create("repos/a", b"1".to_vec()).await.unwrap();
        let r2 = s.create("repos/b", b"2".to_vec()).await.unwrap();
        let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
        s.put_with_lease("nodes/n", vec![], lease.id).await.unwrap();
        (r1, r2)
    };
    let s = EmbeddedStore::open(dir.path()).await.unwrap();
    let (kvs, rev) = s.list("").await.unwrap();
    let got: Vec<_> = kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision)).collect();
    assert_eq!(got, [("repos/a", &b"1"[..], r1), ("repos/b", &b"2"[..], r2)], "leased keys do not survive");
    assert!(rev > r2);
    let r = s.update("repos/a", b"x".to_vec(), Some(r1)).await.unwrap();
    assert!(r > rev);
}

#[tokio::test]
async fn embedded_store_history_bound_means_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EmbeddedOptions { history_limit: 5, ..EmbeddedOptions::default() };
    let s = EmbeddedStore::open_with(dir.path(), opts).await.unwrap();
    let first = s.create("repos/h", vec![0]).await.unwrap();
    let mut rev = first;
    for i in 1..10u8 {
        rev = s.update("repos/h", vec![i], None).await.unwrap();
    }
    let mut w = s.watch("", first).await.unwrap();
    match w.next().await {
        Some(Err(StoreError::Compacted { requested, compact_revision })) => {
            assert_eq!((requested, compact_revision), (first, rev - 4));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(w.next().await.is_none());
    // The last 5 are still there.
    let mut w = s.watch("", rev - 4).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, rev - 4);

    // A watcher that falls behind by more than the bound is told, not skipped ahead.
    let mut slow = s.watch("", rev + 1).await.unwrap();
    for i in 0..10u8 {
        s.update("repos/h", vec![i], None).await.unwrap();
    }
    let mut seen = 0;
    loop {
        match slow.next().await {
            Some(Ok(_)) => seen += 1,
            Some(Err(StoreError::Compacted { .. })) => break,
            other => panic!("expected events then Compacted, got {other:?} after {seen}"),
        }
    }
    assert!(seen < 10);
}

// ---- etcd only ----

/// Every kind of call against `s` fails with `Unavailable` within `timeout` (plus slack), never hangs.
async fn all_calls_unavailable(s: &EtcdStore, timeout: Duration) {
    type Call<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Option<StoreError>> + Send + 'a>>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        ("get", Box::pin(async { s.get("repos/a").await.err() })),
        ("list", Box::pin(async { s.list("").await.err() })),
        ("create", Box::pin(async { s.create("repos/a", vec![]).await.err() })),
        ("update", Box::pin(async { s.update("repos/a", vec![], Some(3)).await.err() })),
        ("delete", Box::pin(async { s.delete("repos/a", None).await.err() })),
        ("watch", Box::pin(async { s.watch("", 1).await.err() })),
        ("grant_lease", Box::pin(async { s.grant_lease(Duration::from_secs(5)).await.err() })),
        ("keep_alive", Box::pin(async { s.keep_alive(wharf_control::store::LeaseId(7)).await.err() })),
        ("current_revision", Box::pin(async { s.current_revision().await.err() })),
    ];
    // All at once: each is bounded by itself, and the test stays short.
    let results = futures_util::future::join_all(calls.into_iter().map(|(name, call)| async move {
        let started = Instant::now();
        let err = tokio::time::timeout(timeout * 3, call).await.unwrap_or_else(|_| panic!("{name} hung"));
        (name, err, started.elapsed())
    }))
    .await;
    for (name, err, took) in results {
        match err {
            Some(StoreError::Unavailable(msg)) => eprintln!("{name}: {msg} ({took:?})"),
            other => panic!("{name}: expected Unavailable, got {other:?}"),
        }
        assert!(took < timeout + Duration::from_millis(500), "{name} took {took:?}");
    }
}

#[tokio::test]
async fn etcd_store_unreachable_fails_within_the_timeout() {
    let timeout = Duration::from_secs(1);
    // Nothing listening: connections are refused.
    let mut opts = EtcdOptions::new([format!("http://127.0.0.1:{}", closed_port())]);
    opts.timeout = timeout;
    let s = EtcdStore::connect(opts).await.expect("connecting is lazy");
    all_calls_unavailable(&s, timeout).await;

    // A black hole: the kernel accepts the connection, nobody ever answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut opts = EtcdOptions::new([format!("http://{}", hole.local_addr().unwrap())]);
    opts.timeout = timeout;
    let s = EtcdStore::connect(opts).await.expect("connecting is lazy");
    all_calls_unavailable(&s, timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_killed_etcd_fails_calls_and_ends_watches() {
    let mut etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await.unwrap().unwrap();
    let mut opts = EtcdOptions::new(etcd.endpoints());
    opts.timeout = Duration::from_secs(1);
    let s = EtcdStore::connect(opts).await.unwrap();
    let rev = s.create("repos/a", vec![]).await.unwrap();
    let mut w = s.watch("", rev + 1).await.unwrap();
    etcd.kill_all();

    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(20), w.next()).await.expect("the watch ends, not hangs") {
        Some(Err(StoreError::Unavailable(msg))) => eprintln!("watch: {msg} after {:?}", started.elapsed()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(w.next().await.is_none());
    let started = Instant::now();
    assert!(matches!(s.get("repos/a").await, Err(StoreError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
}

/// A CAS update retried while the store is Unavailable, as a client of the API would retry a 503. A
/// write whose answer was lost may have been applied: then the retry sees a mismatch against a key that
/// already holds our value, which counts as success.
async fn update_retrying(s: &dyn ConfigStore, key: &str, value: Vec<u8>, expected: i64) -> (i64, u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut failures = 0;
    loop {
        match s.update(key, value.clone(), Some(expected)).await {
            Ok(r) => return (r, failures),
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("write to {key}: {e}");
                failures += 1;
            }
            Err(StoreError::RevisionMismatch { current, .. }) if failures > 0 => {
                let kv = s.get(key).await.unwrap().unwrap();
                assert_eq!((kv.value, kv.mod_revision), (value, current), "a lost answer, not a lost race");
                return (current, failures);
            }
            Err(e) => panic!("write to {key}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_three_members_survive_losing_one() {
    let mut etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(3)).await.unwrap().unwrap();
    let s = EtcdStore::connect(EtcdOptions::new(etcd.endpoints())).await.unwrap();
    let mut rev = s.create("repos/ha", b"0".to_vec()).await.unwrap();
    let leader = tokio::task::block_in_place(|| etcd.leader()).expect("a leader");

    // Two of three keep a quorum, whichever member dies. Reads always succeed (repeated past a dead
    // connection or an election); a write sent just as a member dies may fail with Unavailable (etcd
    // cannot tell whether it was applied), and a retry succeeds.
    for (what, victim) in [("a follower", (leader + 1) % 3), ("the leader", leader)] {
        etcd.kill(victim);
        let started = Instant::now();
        let mut failures = 0;
        for i in 1..=10u8 {
            let (r, f) = update_retrying(&s, "repos/ha", vec![i], rev).await;
            (rev, failures) = (r, failures + f);
            let kv = s.get("repos/ha").await.unwrap_or_else(|e| panic!("read {i} with {what} down: {e}"));
            assert_eq!(kv.unwrap().mod_revision, rev);
        }
        eprintln!("{what} down: 10 writes and reads in {:?}, {failures} writes retried", started.elapsed());
        assert!(failures <= 2, "{failures} writes failed with {what} down");
        tokio::task::block_in_place(|| etcd.restart(victim)).unwrap();
    }
    let (kvs, _) = s.list("").await.unwrap();
    assert_eq!(kvs[0].value, vec![10]);
}
