//! The data-plane nodes: each connected node has an entry under `nodes/<id>`, held by a lease, so
//! a node that vanishes drops out of the list once its lease expires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::store::{ConfigStore, Lease, LeaseId, StoreError};

pub const PREFIX: &str = "nodes/";

/// What the node list says about one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub version: String,
    pub applied_revision: i64,
    /// The control-plane replica the node's Watch stream is on.
    pub control_plane: String,
    pub last_seen_ms: u64,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node's cache cannot be written (a full disk).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_degraded: bool,
    /// The node's last on-demand verification pass, running or done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStatus>,
    /// Where the other nodes fetch blobs from this one; empty: it takes no part in peer fetch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_url: String,
    /// Changes at each start of the node's process.
    #[serde(default)]
    pub generation: u64,
    /// The node's view of its peers, from its last report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
}

/// What one node's last report says of another (peer fetch).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: String,
    /// `ok`, or `suspect` (it failed lately; skipped until `suspect_until_ms`).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_until_ms: Option<u64>,
    /// Peer fetches from it that failed, since the reporting node started.
    pub errors: u64,
    /// Bytes received from it, since the reporting node started.
    pub bytes: u64,
}

/// A node taking part in peer fetch, as the snapshot streams it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub id: String,
    pub peer_url: String,
    pub generation: u64,
}

impl NodeInfo {
    /// The node as a member of the peer-fetch set, if it takes part.
    pub fn member(&self) -> Option<Member> {
        (!self.peer_url.is_empty()).then(|| Member {
            id: self.id.clone(),
            peer_url: self.peer_url.clone(),
            generation: self.generation,
        })
    }
}

/// What a node's verification pass found so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyStatus {
    /// The request's id.
    pub id: String,
    pub done: bool,
    pub checked: u64,
    pub bytes: u64,
    pub removed: u64,
    /// "blob sha256:..." or "manifest sha256:...", at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_entries: Vec<String>,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A node id: what a node calls itself; `[A-Za-z0-9._-]{1,128}`.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) {
        return Err(ApiError::invalid("node_id", "a node id is 1 to 128 characters of [A-Za-z0-9._-]"));
    }
    Ok(())
}

#[derive(Clone)]
pub struct Nodes {
    store: Arc<dyn ConfigStore>,
}

impl Nodes {
    pub fn new(store: Arc<dyn ConfigStore>) -> Self {
        Self { store }
    }

    pub async fn list(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let (kvs, _) = self.store.list(PREFIX).await.map_err(|e| ApiError::from_store(e, "", None))?;
        let mut nodes: Vec<NodeInfo> = kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    pub async fn put(&self, info: &NodeInfo, lease: LeaseId) -> Result<(), StoreError> {
        let value = serde_json::to_vec(info).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.store.put_with_lease(&format!("{PREFIX}{}", info.id), value, lease).await.map(|_| ())
    }
}

/// How long a node's entry outlives its last keep-alive.
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(10);

/// The nodes whose Watch stream is on this replica, and the replica's lease their entries hang on.
#[derive(Default)]
pub struct Connected {
    /// Node id -> (the connection that registered it, what the node list says).
    nodes: Mutex<HashMap<String, (u64, NodeInfo)>>,
    lease: tokio::sync::Mutex<Option<Lease>>,
    next_connection: AtomicU64,
}

impl Connected {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, NodeInfo)>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Records a node's new Watch stream; returns the connection's number.
    pub fn connect(&self, info: &NodeInfo) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(info.id.clone(), (connection, info.clone()));
        connection
    }

    /// Forgets the node's stream `connection`, unless the node reconnected since (its newer entry
    /// stays); whether it was that stream's.
    pub fn disconnect(&self, node_id: &str, connection: u64) -> bool {
        let mut connected = self.lock();
        let ours = connected.get(node_id).is_some_and(|(c, _)| *c == connection);
        if ours {
            connected.remove(node_id);
        }
        ours
    }

    /// The replica's lease, granted on first use.
    pub async fn lease(&self, store: &dyn ConfigStore) -> Result<Lease, StoreError> {
        let mut held = self.lease.lock().await;
        if let Some(l) = *held {
            return Ok(l);
        }
        let l = store.grant_lease(NODE_LEASE_TTL).await?;
        *held = Some(l);
        Ok(l)
    }
}

/// Keeps the replica's lease alive; when it was lost (the store was unreachable past its TTL), takes
/// a new one and puts every connected node's entry again. At shutdown, revokes it: every node of
/// this replica leaves the list at once.
pub async fn keep_alive(
    store: Arc<dyn ConfigStore>,
    connected: Arc<Connected>,
    nodes: Nodes,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(NODE_LEASE_TTL / 3);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(lease) = *connected.lease.lock().await else { continue };
        if let Err(e) = store.keep_alive(lease.id).await {
            tracing::warn!(error = %e, "the replica's node lease was lost; registering its nodes again");
            *connected.lease.lock().await = None;
            let infos: Vec<NodeInfo> = connected.lock().values().map(|(_, i)| i.clone()).collect();
            if let Ok(lease) = connected.lease(&*store).await {
                for info in infos {
                    if let Err(e) = nodes.put(&info, lease.id).await {
                        tracing::warn!(node_id = %info.id, error = %e, "could not register the node again");
                    }
                }
            }
        }
    }
    if let Some(lease) = connected.lease.lock().await.take()
        && let Err(e) = store.revoke_lease(lease.id).await
    {
        tracing::debug!(error = %e, "could not revoke the replica's node lease; it expires by itself");
    }
}
