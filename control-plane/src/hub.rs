//! The configuration a replica streams to its nodes: one store watch per replica, however many
//! nodes are connected, published through a `watch` channel that every node stream follows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::repos::{self, RepoRecord};
use crate::store::{ConfigStore, EventKind, Revision};

/// The repos at one store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub revision: Revision,
    pub repos: Vec<RepoRecord>,
}

/// Follows the store; `None` until the first list succeeded (a node must never receive an empty
/// configuration just because the store was unreachable at start-up).
pub struct ConfigHub {
    rx: watch::Receiver<Option<Arc<Published>>>,
}

impl ConfigHub {
    pub fn start(store: Arc<dyn ConfigStore>, cancel: CancellationToken) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(follow(store, tx, cancel));
        Arc::new(Self { rx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.rx.clone()
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.rx.borrow().clone()
    }
}

async fn follow(store: Arc<dyn ConfigStore>, tx: watch::Sender<Option<Arc<Published>>>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = follow_once(&*store, &tx) => {
                tracing::warn!(error = %result, ?backoff, "config watch ended; listing again");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Lists, publishes, then applies watch events until the watch fails; returns why.
async fn follow_once(store: &dyn ConfigStore, tx: &watch::Sender<Option<Arc<Published>>>) -> String {
    let (kvs, revision) = match store.list(repos::PREFIX).await {
        Ok(x) => x,
        Err(e) => return e.to_string(),
    };
    let mut current: BTreeMap<String, RepoRecord> =
        kvs.iter().filter_map(|kv| repos::decode(kv).map(|r| (kv.key.clone(), r))).collect();
    publish(tx, revision, &current);
    let mut events = match store.watch(repos::PREFIX, revision + 1).await {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => return e.to_string(),
        };
        match event.kind {
            EventKind::Put => match repos::decode(&event.kv) {
                Some(r) => current.insert(event.kv.key.clone(), r),
                None => current.remove(&event.kv.key),
            },
            EventKind::Delete => current.remove(&event.kv.key),
        };
        publish(tx, event.revision, &current);
    }
    "watch stream ended".into()
}

fn publish(tx: &watch::Sender<Option<Arc<Published>>>, revision: Revision, current: &BTreeMap<String, RepoRecord>) {
    let p = Published { revision, repos: current.values().cloned().collect() };
    tracing::debug!(revision, repos = p.repos.len(), "configuration published");
    tx.send_replace(Some(Arc::new(p)));
}
