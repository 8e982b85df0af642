//! On-demand requests to nodes (`regctl cache verify`). A request is a key in the store, not a
//! message to one replica: whichever replica takes the call writes it, every replica's hub follows
//! it and streams it in the snapshot, so it reaches each node on whatever replica its Watch stream
//! is. Nodes answer in their reports (the node list's `verify`). The key hangs on a lease of
//! [`VERIFY_TTL`]: a node that reconnects within it still takes the request up; a new request
//! replaces the one before.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::nodes::Nodes;
use crate::repos::millis;
use crate::store::{ConfigStore, KeyValue};

pub const PREFIX: &str = "commands/";
const VERIFY_KEY: &str = "commands/verify";

/// How long a verification request stays for nodes that have not taken it up yet.
pub const VERIFY_TTL: Duration = Duration::from_secs(3600);

/// Nodes to re-hash their whole cache once, at a rate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub id: String,
    pub node_ids: Vec<String>,
    /// 0: as fast as the node's disk reads.
    pub rate_bytes_per_sec: u64,
    pub created_at_ms: u64,
}

/// The request in a stored key; `None` (logged) for one that does not parse.
pub fn decode(kv: &KeyValue) -> Option<VerifyRequest> {
    if kv.key != VERIFY_KEY {
        return None;
    }
    serde_json::from_slice(&kv.value)
        .map_err(|error| tracing::error!(key = %kv.key, %error, "stored verification request does not decode; skipped"))
        .ok()
}

/// Asks `node_ids` (every listed node when empty) to verify their cache; each must be in the node
/// list.
pub async fn request_verify(
    store: &dyn ConfigStore,
    nodes: &Nodes,
    node_ids: Vec<String>,
    rate_bytes_per_sec: u64,
) -> Result<VerifyRequest, ApiError> {
    let listed: Vec<String> = nodes.list().await?.into_iter().map(|n| n.id).collect();
    let node_ids = if node_ids.is_empty() {
        if listed.is_empty() {
            return Err(ApiError::NodeNotFound("no node is in the node list: there is nothing to verify".into()));
        }
        listed
    } else {
        if let Some(missing) = node_ids.iter().find(|id| !listed.contains(id)) {
            return Err(ApiError::NodeNotFound(format!(
                "node {missing:?} is not in the node list (regctl node list shows the connected nodes)"
            )));
        }
        node_ids
    };
    let mut id = [0u8; 8];
    rand::fill(&mut id);
    let request =
        VerifyRequest { id: hex::encode(id), node_ids, rate_bytes_per_sec, created_at_ms: millis(SystemTime::now()) };
    let value = serde_json::to_vec(&request).map_err(|e| ApiError::Internal(e.to_string()))?;
    let store_error = |e| ApiError::from_store(e, VERIFY_KEY, None);
    let lease = store.grant_lease(VERIFY_TTL).await.map_err(store_error)?;
    store.put_with_lease(VERIFY_KEY, value, lease.id).await.map_err(store_error)?;
    tracing::info!(id = %request.id, nodes = ?request.node_ids, rate_bytes_per_sec, "cache verification requested");
    Ok(request)
}
