//! The gRPC services (`wharf.v1`): conversions between proto and domain types happen here and
//! nowhere else.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use wharf_proto::v1 as pb;

use crate::commands::{self, VerifyRequest};
use crate::error::ApiError;
use crate::nodes::{NodeInfo, PeerStatus, VerifyStatus};
use crate::repos::{RepoRecord, RepoSpec};
use crate::state::ApiState;
use crate::tokens::{TokenRecord, TokenSpec};

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    timestamp(UNIX_EPOCH + Duration::from_millis(ms))
}

fn ms_of(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000)
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn from_duration(d: &prost_types::Duration) -> Result<Duration, ApiError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ApiError::invalid("tag_ttl", "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A repo as the API returns it; `with_secret` only for the node config stream.
pub fn repo_to_proto(r: &RepoRecord, with_secret: bool) -> pb::Repo {
    pb::Repo {
        key: r.repo.key.to_string(),
        kind: r.repo.kind.to_string(),
        upstream: r.repo.upstream.clone(),
        tag_ttl: Some(duration(r.repo.tag_ttl)),
        username: r.repo.credentials.as_ref().map(|c| c.username.clone()).unwrap_or_default(),
        password: if with_secret {
            r.repo.credentials.as_ref().map(|c| c.password.expose().to_owned()).unwrap_or_default()
        } else {
            String::new()
        },
        password_set: r.repo.credentials.is_some(),
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        revision: r.revision,
        cache_ttl: r.repo.cache_ttl.map(duration),
        auth: r.repo.auth.to_string(),
        access: r.repo.access.to_string(),
        ca_bundle: r.repo.tls.ca_bundle.clone().unwrap_or_default(),
        insecure_skip_tls_verify: r.repo.tls.insecure_skip_verify,
        mirror_of: r.repo.mirror_of.clone(),
        credential_provider: r.repo.credential_provider.map(|p| p.to_string()).unwrap_or_default(),
        credential_file: r.repo.credential_file.clone().unwrap_or_default(),
    }
}

fn spec_from_proto(r: pb::Repo) -> Result<RepoSpec, ApiError> {
    let none_if_empty = |s: String| if s.is_empty() { None } else { Some(s) };
    Ok(RepoSpec {
        key: r.key,
        kind: none_if_empty(r.kind),
        upstream: none_if_empty(r.upstream),
        tag_ttl: r.tag_ttl.as_ref().map(from_duration).transpose()?,
        username: none_if_empty(r.username),
        password: none_if_empty(r.password),
        cache_ttl: r
            .cache_ttl
            .as_ref()
            .map(|d| from_duration(d).map_err(|_| ApiError::invalid("cache_ttl", "must not be negative")))
            .transpose()?,
        auth: none_if_empty(r.auth),
        access: none_if_empty(r.access),
        ca_bundle: none_if_empty(r.ca_bundle),
        insecure_skip_tls_verify: r.insecure_skip_tls_verify,
        mirror_of: r.mirror_of,
        credential_provider: none_if_empty(r.credential_provider),
        credential_file: none_if_empty(r.credential_file),
    })
}

/// `expected_revision`: 0 means unconditionally; revisions start at 1.
fn expected(rev: i64) -> Result<Option<i64>, ApiError> {
    if rev < 0 {
        return Err(ApiError::invalid("expected_revision", "a revision is positive (0: unconditionally)"));
    }
    Ok((rev != 0).then_some(rev))
}

pub struct RepoApi(pub ApiState);

#[tonic::async_trait]
impl pb::repo_service_server::RepoService for RepoApi {
    async fn create_repo(&self, req: Request<pb::CreateRepoRequest>) -> Result<Response<pb::Repo>, Status> {
        let repo = req.into_inner().repo.ok_or_else(|| ApiError::invalid("repo", "repo is required"))?;
        let r = self.0.repos.create(spec_from_proto(repo)?).await?;
        Ok(Response::new(repo_to_proto(&r, false)))
    }

    async fn get_repo(&self, req: Request<pb::GetRepoRequest>) -> Result<Response<pb::Repo>, Status> {
        let r = self.0.repos.get(&req.into_inner().key).await?;
        Ok(Response::new(repo_to_proto(&r, false)))
    }

    async fn list_repos(&self, _: Request<pb::ListReposRequest>) -> Result<Response<pb::ListReposResponse>, Status> {
        let (repos, revision) = self.0.repos.list().await?;
        let repos = repos.iter().map(|r| repo_to_proto(r, false)).collect();
        Ok(Response::new(pb::ListReposResponse { repos, revision }))
    }

    async fn update_repo(&self, req: Request<pb::UpdateRepoRequest>) -> Result<Response<pb::Repo>, Status> {
        let req = req.into_inner();
        let repo = req.repo.ok_or_else(|| ApiError::invalid("repo", "repo is required"))?;
        let r =
            self.0.repos.update(spec_from_proto(repo)?, expected(req.expected_revision)?, req.clear_password).await?;
        Ok(Response::new(repo_to_proto(&r, false)))
    }

    async fn delete_repo(
        &self,
        req: Request<pb::DeleteRepoRequest>,
    ) -> Result<Response<pb::DeleteRepoResponse>, Status> {
        let req = req.into_inner();
        let revision = self.0.repos.delete(&req.key, expected(req.expected_revision)?).await?;
        Ok(Response::new(pb::DeleteRepoResponse { revision }))
    }
}

pub fn node_to_proto(n: &NodeInfo) -> pb::Node {
    pb::Node {
        id: n.id.clone(),
        address: n.address.clone(),
        version: n.version.clone(),
        applied_revision: n.applied_revision,
        control_plane: n.control_plane.clone(),
        last_seen: Some(timestamp(UNIX_EPOCH + Duration::from_millis(n.last_seen_ms))),
        cache_bytes: n.cache_bytes,
        cache_entries: n.cache_entries,
        cache_hits: n.cache_hits,
        cache_misses: n.cache_misses,
        last_error: n.last_error.clone().unwrap_or_default(),
        cache_degraded: n.cache_degraded,
        verify: n.verify.as_ref().map(verify_status_to_proto),
        peer_url: n.peer_url.clone(),
        peers: n
            .peers
            .iter()
            .map(|p| pb::PeerStatus {
                id: p.id.clone(),
                state: p.state.clone(),
                suspect_until: p.suspect_until_ms.map(timestamp_ms),
                errors: p.errors,
                bytes: p.bytes,
            })
            .collect(),
    }
}

/// A node's report of one peer.
pub fn peer_status_from_proto(p: pb::PeerStatus) -> PeerStatus {
    PeerStatus {
        // Node ids are at most 128 ASCII characters; a longer one is cut (on a character).
        id: p.id.chars().take(128).collect(),
        state: if p.state == "suspect" { "suspect".into() } else { "ok".into() },
        suspect_until_ms: p.suspect_until.as_ref().map(|t| ms_of(Some(t))),
        errors: p.errors,
        bytes: p.bytes,
    }
}

fn verify_status_to_proto(v: &VerifyStatus) -> pb::VerifyStatus {
    pb::VerifyStatus {
        id: v.id.clone(),
        done: v.done,
        checked: v.checked,
        bytes: v.bytes,
        removed: v.removed,
        removed_entries: v.removed_entries.clone(),
        started_at: Some(timestamp_ms(v.started_at_ms)),
        finished_at: v.finished_at_ms.map(timestamp_ms),
    }
}

/// A node's report of its pass; entries beyond 100 are dropped (the count stays).
pub fn verify_status_from_proto(v: pb::VerifyStatus) -> VerifyStatus {
    let mut removed_entries = v.removed_entries;
    removed_entries.truncate(100);
    VerifyStatus {
        id: v.id,
        done: v.done,
        checked: v.checked,
        bytes: v.bytes,
        removed: v.removed,
        removed_entries,
        started_at_ms: ms_of(v.started_at.as_ref()),
        finished_at_ms: v.finished_at.as_ref().map(|t| ms_of(Some(t))),
    }
}

pub fn verify_request_to_proto(r: &VerifyRequest) -> pb::VerifyRequest {
    pb::VerifyRequest {
        id: r.id.clone(),
        node_ids: r.node_ids.clone(),
        rate_bytes_per_sec: r.rate_bytes_per_sec,
        created_at: Some(timestamp_ms(r.created_at_ms)),
    }
}

pub struct NodeApi(pub ApiState);

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.0.nodes.list().await?;
        Ok(Response::new(pb::ListNodesResponse { nodes: nodes.iter().map(node_to_proto).collect() }))
    }

    async fn verify_cache(
        &self,
        req: Request<pb::VerifyCacheRequest>,
    ) -> Result<Response<pb::VerifyCacheResponse>, Status> {
        let req = req.into_inner();
        let r = commands::request_verify(&*self.0.store, &self.0.nodes, req.node_ids, req.rate_bytes_per_sec).await?;
        Ok(Response::new(pb::VerifyCacheResponse { id: r.id, node_ids: r.node_ids }))
    }
}

/// A token as the API shows it; `secret` only in the answer to its creation.
pub fn token_to_proto(t: &TokenRecord, secret: Option<String>) -> pb::Token {
    pb::Token {
        id: t.grant.id.clone(),
        role: t.grant.role.to_string(),
        repos: t.grant.repos.iter().map(|p| p.to_string()).collect(),
        expires_at: t.grant.expires_at.map(timestamp),
        created_at: Some(timestamp(t.created_at)),
        description: t.description.clone(),
        secret: secret.unwrap_or_default(),
    }
}

pub struct TokenApi(pub ApiState);

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn create_token(&self, req: Request<pb::CreateTokenRequest>) -> Result<Response<pb::Token>, Status> {
        let req = req.into_inner();
        let expires_in = req
            .expires_in
            .as_ref()
            .map(|d| from_duration(d).map_err(|_| ApiError::invalid("expires_in", "must not be negative")))
            .transpose()?;
        let spec = TokenSpec { role: req.role, repos: req.repos, expires_in, description: req.description };
        let (record, secret) = self.0.tokens.create(spec).await?;
        Ok(Response::new(token_to_proto(&record, Some(secret))))
    }

    async fn list_tokens(&self, _: Request<pb::ListTokensRequest>) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self.0.tokens.list().await?.iter().map(|t| token_to_proto(t, None)).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.0.tokens.revoke(&req.into_inner().id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }
}
