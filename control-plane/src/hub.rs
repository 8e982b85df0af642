//! The configuration a replica streams to its nodes, and the tokens its API checks: one store
//! watch per prefix per replica, however many nodes are connected, published through a `watch`
//! channel that every node stream and every API call's token check reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use wharf_core::SigningKey;

use crate::commands::{self, VerifyRequest};
use crate::keys;
use crate::nodes::{self, Member, NodeInfo};
use crate::repos::{self, RepoRecord};
use crate::store::{ConfigStore, EventKind, Revision};
use crate::tokens::{self, TokenRecord};

/// The repos, tokens, keys and node requests at one store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub revision: Revision,
    pub repos: Vec<RepoRecord>,
    /// By token id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// The nodes' token keys.
    pub keys: Vec<SigningKey>,
    /// The live cache verification request.
    pub verify: Option<VerifyRequest>,
    /// The live nodes that take part in peer fetch, by id.
    pub members: Vec<Member>,
}

/// What the hub holds, by store key.
#[derive(Default)]
struct Current {
    repos: BTreeMap<String, RepoRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    keys: BTreeMap<String, SigningKey>,
    verify: Option<VerifyRequest>,
    /// By store key: only what peer fetch needs of a node entry, so that the reports that
    /// rewrite the entry every few seconds change nothing here.
    members: BTreeMap<String, Member>,
}

impl Current {
    /// Applies one store event; returns whether what is published changed.
    fn apply(&mut self, kind: EventKind, kv: &crate::store::KeyValue) -> bool {
        let key = kv.key.clone();
        if kv.key.starts_with(nodes::PREFIX) {
            let member = match kind {
                EventKind::Put => serde_json::from_slice::<NodeInfo>(&kv.value).ok().and_then(|n| n.member()),
                _ => None,
            };
            let before = match member {
                Some(m) => self.members.insert(key, m.clone()).filter(|old| *old == m),
                None => return self.members.remove(&key).is_some(),
            };
            return before.is_none();
        }
        if kv.key.starts_with(commands::PREFIX) {
            self.verify = match kind {
                EventKind::Put => commands::decode(kv),
                _ => None,
            };
        } else if kv.key.starts_with(keys::PREFIX) {
            match (kind, keys::decode(kv)) {
                (EventKind::Put, Some(k)) => self.keys.insert(key, k),
                _ => self.keys.remove(&key),
            };
        } else if kv.key.starts_with(tokens::PREFIX) {
            match (kind, tokens::decode(kv)) {
                (EventKind::Put, Some(t)) => self.tokens.insert(key, t),
                _ => self.tokens.remove(&key),
            };
        } else {
            match (kind, repos::decode(kv)) {
                (EventKind::Put, Some(r)) => self.repos.insert(key, r),
                _ => self.repos.remove(&key),
            };
        }
        true
    }
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

    /// Waits (at most `timeout`) until what is published satisfies `f`; returns whether it did.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&Published) -> bool) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|p| p.as_deref().is_some_and(&f))).await.is_ok_and(|r| r.is_ok())
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

/// Lists, publishes, then applies watch events until a watch fails; returns why.
async fn follow_once(store: &dyn ConfigStore, tx: &watch::Sender<Option<Arc<Published>>>) -> String {
    let mut current = Current::default();
    let mut watches = Vec::new();
    let mut revision = 0;
    for prefix in [repos::PREFIX, tokens::PREFIX, keys::PREFIX, commands::PREFIX, nodes::PREFIX] {
        let (kvs, rev) = match store.list(prefix).await {
            Ok(x) => x,
            Err(e) => return e.to_string(),
        };
        for kv in &kvs {
            current.apply(EventKind::Put, kv);
        }
        revision = revision.max(rev);
        watches.push((prefix, rev + 1));
    }
    publish(tx, revision, &current);
    let mut streams = Vec::new();
    for (prefix, from) in watches {
        match store.watch(prefix, from).await {
            Ok(s) => streams.push(s),
            Err(e) => return e.to_string(),
        }
    }
    let mut events = futures_util::stream::select_all(streams);
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => return e.to_string(),
        };
        if current.apply(event.kind, &event.kv) {
            revision = revision.max(event.revision);
            publish(tx, revision, &current);
        }
    }
    "watch stream ended".into()
}

fn publish(tx: &watch::Sender<Option<Arc<Published>>>, revision: Revision, current: &Current) {
    let p = Published {
        revision,
        repos: current.repos.values().cloned().collect(),
        tokens: current.tokens.values().map(|t| (t.grant.id.clone(), t.clone())).collect(),
        keys: current.keys.values().cloned().collect(),
        verify: current.verify.clone(),
        members: current.members.values().cloned().collect(),
    };
    tracing::debug!(revision, repos = p.repos.len(), tokens = p.tokens.len(), "configuration published");
    tx.send_replace(Some(Arc::new(p)));
}
