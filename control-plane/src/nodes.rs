//! The data-plane nodes: each connected node has an entry under `nodes/<id>`, held by a lease, so
//! a node that vanishes drops out of the list once its lease expires.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::store::{ConfigStore, LeaseId, StoreError};

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
