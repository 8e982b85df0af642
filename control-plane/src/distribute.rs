//! `wharf.v1.ConfigService`: each node's Watch stream (full snapshot when the node is behind, then
//! one on every change) and its periodic report. While a stream is open the node's entry under
//! `nodes/` is held by a lease; when it ends (or the replica shuts down) the lease is revoked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wharf_proto::v1 as pb;

use crate::error::ApiError;
use crate::grpc::repo_to_proto;
use crate::hub::Published;
use crate::nodes::{NodeInfo, now_ms, validate_id};
use crate::server::ApiState;
use crate::store::{Lease, StoreError};

/// How long a node's entry outlives its last keep-alive.
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(10);

/// The nodes whose Watch stream is on this replica, with their lease.
#[derive(Default)]
pub struct Connected {
    nodes: Mutex<HashMap<String, (Lease, NodeInfo)>>,
}

impl Connected {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Lease, NodeInfo)>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

pub fn update(p: &Published) -> pb::ConfigUpdate {
    pb::ConfigUpdate {
        revision: p.revision,
        snapshot: Some(pb::Snapshot { repos: p.repos.iter().map(|r| repo_to_proto(r, true)).collect() }),
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
            ..Default::default()
        };
        let lease = register(&state, &info).await.map_err(|e| ApiError::from_store(e, &info.id, None))?;
        state.connected.lock().insert(info.id.clone(), (lease, info.clone()));
        tracing::info!(node_id = %info.id, address = %info.address, revision = req.revision, "node connected");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_to_node(state, info.id, req.revision, lease, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, req: Request<pb::NodeReport>) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        validate_id(&r.node_id)?;
        let entry = {
            let mut nodes = self.0.connected.lock();
            let Some((lease, info)) = nodes.get_mut(&r.node_id) else {
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
            info.last_seen_ms = now_ms();
            (*lease, info.clone())
        };
        self.0.nodes.put(&entry.1, entry.0.id).await.map_err(|e| ApiError::from_store(e, &r.node_id, None))?;
        Ok(Response::new(pb::ReportResponse {}))
    }
}

async fn register(state: &ApiState, info: &NodeInfo) -> Result<Lease, StoreError> {
    let lease = state.store.grant_lease(NODE_LEASE_TTL).await?;
    state.nodes.put(info, lease.id).await?;
    Ok(lease)
}

/// Sends the node every configuration it does not have yet and keeps its lease alive, until the
/// node goes away or the replica shuts down.
async fn stream_to_node(
    state: ApiState,
    node_id: String,
    held: i64,
    mut lease: Lease,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
) {
    let mut config = state.hub.subscribe();
    let mut keepalive = tokio::time::interval(lease.ttl / 3);
    keepalive.tick().await;
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
                if tx.send(Ok(update(&p))).await.is_err() {
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
            _ = keepalive.tick() => {
                if let Err(e) = state.store.keep_alive(lease.id).await {
                    tracing::warn!(%node_id, error = %e, "node lease lost; registering again");
                    let info = state.connected.lock().get(&node_id).map(|(_, i)| i.clone());
                    if let Some(info) = info
                        && let Ok(l) = register(&state, &info).await
                    {
                        lease = l;
                        if let Some(entry) = state.connected.lock().get_mut(&node_id) {
                            entry.0 = l;
                        }
                    }
                }
            }
        }
    }
    {
        // A node that reconnected meanwhile has a newer entry with another lease: keep that one.
        let mut connected = state.connected.lock();
        if connected.get(&node_id).is_some_and(|(l, _)| l.id == lease.id) {
            connected.remove(&node_id);
        }
    }
    if let Err(e) = state.store.revoke_lease(lease.id).await {
        tracing::debug!(%node_id, error = %e, "could not revoke the node's lease; it expires by itself");
    }
    tracing::info!(%node_id, "node disconnected");
}
