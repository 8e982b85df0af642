//! `wharf.v1.ConfigService`: each node's Watch stream (full snapshot when the node is behind, then
//! one on every change) and its periodic report. While a stream is open the node's entry under
//! `nodes/` exists; it goes when the stream ends. Every entry of a replica hangs on one lease of
//! that replica, kept alive by one task: a thousand nodes cost one keep-alive, not a thousand, and
//! when a replica dies its nodes' entries go with its lease (they re-register on another replica).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use wharf_core::token::Role;
use wharf_proto::v1 as pb;

use crate::error::ApiError;
use crate::grpc::{repo_to_proto, timestamp};
use crate::hub::Published;
use crate::nodes::Nodes;
use crate::nodes::{NodeInfo, now_ms, validate_id};
use crate::server::ApiState;
use crate::store::{ConfigStore, Lease, StoreError};
use crate::tokens::TokenRecord;

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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, NodeInfo)>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// The replica's lease, granted on first use.
    async fn lease(&self, store: &dyn ConfigStore) -> Result<Lease, StoreError> {
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

/// A puller token as nodes get it: the hash of its secret, never the secret.
fn puller(t: &TokenRecord) -> pb::PullerToken {
    pb::PullerToken {
        id: t.grant.id.clone(),
        secret_sha256: t.grant.secret_sha256.to_vec(),
        repos: t.grant.repos.iter().map(|p| p.to_string()).collect(),
        expires_at: t.grant.expires_at.map(timestamp),
    }
}

pub fn update(p: &Published) -> pb::ConfigUpdate {
    pb::ConfigUpdate {
        revision: p.revision,
        snapshot: Some(pb::Snapshot {
            repos: p.repos.iter().map(|r| repo_to_proto(r, true)).collect(),
            pullers: p.tokens.values().filter(|t| t.grant.role == Role::Puller).map(puller).collect(),
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
            ..Default::default()
        };
        register(&state, &info).await.map_err(|e| ApiError::from_store(e, &info.id, None))?;
        let connection = state.connected.next_connection.fetch_add(1, Ordering::Relaxed);
        state.connected.lock().insert(info.id.clone(), (connection, info.clone()));
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
            info.last_seen_ms = now_ms();
            info.clone()
        };
        register(&self.0, &entry).await.map_err(|e| ApiError::from_store(e, &r.node_id, None))?;
        Ok(Response::new(pb::ReportResponse {}))
    }
}

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
        }
    }
    // A node that reconnected meanwhile has a newer entry from another connection: keep that one.
    let ours = {
        let mut connected = state.connected.lock();
        let ours = connected.get(&node_id).is_some_and(|(c, _)| *c == connection);
        if ours {
            connected.remove(&node_id);
        }
        ours
    };
    if ours && let Err(e) = state.store.delete(&format!("{}{node_id}", crate::nodes::PREFIX), None).await {
        tracing::debug!(%node_id, error = %e, "could not remove the node's entry; it goes with the replica's lease");
    }
    tracing::info!(%node_id, "node disconnected");
}
