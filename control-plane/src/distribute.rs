//! `wharf.v1.ConfigService`: each node's Watch stream (full snapshot when the node is behind, then
//! one on every change) and its periodic report. While a stream is open the node's entry under
//! `nodes/` exists; it goes when the stream ends. Every entry of a replica hangs on one lease of
//! that replica, kept alive by one task: a thousand nodes cost one keep-alive, not a thousand, and
//! when a replica dies its nodes' entries go with its lease (they re-register on another replica).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wharf_core::token::Role;
use wharf_proto::v1 as pb;

use crate::error::ApiError;
use crate::grpc::{
    peer_status_from_proto, repo_to_proto, timestamp, verify_request_to_proto, verify_status_from_proto,
};
use crate::hub::Published;
use crate::nodes::{NodeInfo, now_ms, validate_id};
use crate::state::ApiState;
use crate::store::StoreError;
use crate::tokens::TokenRecord;

/// A puller token as nodes get it: the hash of its secret, never the secret.
fn puller(t: &TokenRecord) -> pb::PullerToken {
    pb::PullerToken {
        id: t.grant.id.clone(),
        secret_sha256: t.grant.secret_sha256.to_vec(),
        repos: t.grant.repos.iter().map(|p| p.to_string()).collect(),
        expires_at: t.grant.expires_at.map(timestamp),
    }
}

/// The snapshot of `p`; `peer_fetch` off (`--no-peer-fetch`): no members, so no node asks another.
pub fn update(p: &Published, peer_fetch: bool) -> pb::ConfigUpdate {
    pb::ConfigUpdate {
        revision: p.revision,
        snapshot: Some(pb::Snapshot {
            repos: p.repos.iter().map(|r| repo_to_proto(r, true)).collect(),
            pullers: p.tokens.values().filter(|t| t.grant.role == Role::Puller).map(puller).collect(),
            token_keys: p
                .keys
                .iter()
                .map(|k| pb::TokenKey {
                    id: k.id.clone(),
                    secret: k.secret.to_vec(),
                    created_at: Some(timestamp(k.created_at)),
                })
                .collect(),
            verify: p.verify.as_ref().map(verify_request_to_proto),
            members: if peer_fetch {
                p.members
                    .iter()
                    .map(|m| pb::Member {
                        node_id: m.id.clone(),
                        peer_url: m.peer_url.clone(),
                        generation: m.generation,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }),
    }
}

pub struct ConfigApi(pub ApiState);

#[tonic::async_trait]
impl pb::config_service_server::ConfigService for ConfigApi {
    type WatchStream = ReceiverStream<Result<pb::ConfigUpdate, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        validate_id(&req.node_id)?;
        let state = self.0.clone();
        let info = NodeInfo {
            id: req.node_id.clone(),
            address: req.address,
            version: req.version,
            applied_revision: req.revision,
            control_plane: state.replica.clone(),
            last_seen_ms: now_ms(),
            peer_url: req.peer_url,
            generation: req.generation,
            ..Default::default()
        };
        register(&state, &info).await.map_err(|e| ApiError::from_store(e, &info.id, None))?;
        let connection = state.connected.connect(&info);
        tracing::info!(node_id = %info.id, address = %info.address, revision = req.revision, "node connected");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_to_node(state, info.id, req.revision, connection, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, req: Request<pb::NodeReport>) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        validate_id(&r.node_id)?;
        let entry = {
            let mut nodes = self.0.connected.lock();
            let Some((_, info)) = nodes.get_mut(&r.node_id) else {
                return Err(Status::failed_precondition(format!(
                    "node {:?} has no Watch stream on this control plane: open one first",
                    r.node_id
                )));
            };
            info.applied_revision = r.applied_revision;
            info.cache_bytes = r.cache_bytes;
            info.cache_entries = r.cache_entries;
            info.cache_hits = r.cache_hits;
            info.cache_misses = r.cache_misses;
            info.last_error = Some(r.last_error).filter(|e| !e.is_empty());
            info.cache_degraded = r.cache_degraded;
            if let Some(v) = r.verify {
                info.verify = Some(verify_status_from_proto(v));
            }
            info.peers = r.peers.into_iter().take(MAX_PEERS_REPORTED).map(peer_status_from_proto).collect();
            info.last_seen_ms = now_ms();
            info.clone()
        };
        register(&self.0, &entry).await.map_err(|e| ApiError::from_store(e, &r.node_id, None))?;
        Ok(Response::new(pb::ReportResponse {}))
    }
}

/// More peers than a cluster has nodes: a report's list is cut there.
const MAX_PEERS_REPORTED: usize = 1000;

async fn register(state: &ApiState, info: &NodeInfo) -> Result<(), StoreError> {
    let lease = state.connected.lease(&*state.store).await?;
    state.nodes.put(info, lease.id).await
}

/// Sends the node every configuration it does not have yet, until the node goes away or the
/// replica shuts down; then removes its entry (unless it reconnected meanwhile).
async fn stream_to_node(
    state: ApiState,
    node_id: String,
    held: i64,
    connection: u64,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
) {
    let mut config = state.hub.subscribe();
    // What the node holds: at first only its revision; then the very snapshot last sent (compared
    // by identity, so two publications at one revision are both delivered).
    let mut last: Option<Arc<Published>> = None;
    loop {
        let latest = config.borrow_and_update().clone();
        if let Some(p) = latest {
            let fresh = match &last {
                None => p.revision != held,
                Some(l) => !Arc::ptr_eq(l, &p),
            };
            if fresh {
                if tx.send(Ok(update(&p, state.peer_fetch))).await.is_err() {
                    break;
                }
                tracing::debug!(%node_id, revision = p.revision, "configuration sent");
            }
            last = Some(p);
        }
        tokio::select! {
            _ = tx.closed() => break,
            _ = state.cancel.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down: reconnect to another replica"))).await;
                break;
            }
            changed = config.changed() => if changed.is_err() { break },
        }
    }
    // A node that reconnected meanwhile has a newer entry from another connection: keep that one.
    let ours = state.connected.disconnect(&node_id, connection);
    if ours && let Err(e) = state.store.delete(&format!("{}{node_id}", crate::nodes::PREFIX), None).await {
        tracing::debug!(%node_id, error = %e, "could not remove the node's entry; it goes with the replica's lease");
    }
    tracing::info!(%node_id, "node disconnected");
}
