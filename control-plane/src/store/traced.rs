//! [`TracedStore`]: any [`ConfigStore`] with a `store.<operation>` span around every call, so a
//! traced API call shows the store round trips it made and how long each took.
//!
//! Spans carry the operation, the key or prefix, revisions and the outcome; never values (a repo's
//! value may hold credentials).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument as _;

use super::{ConfigStore, KeyValue, Lease, LeaseId, Revision, StoreError, WatchStream};

/// Wraps a store; every call runs in its own span.
pub struct TracedStore {
    inner: Arc<dyn ConfigStore>,
}

impl TracedStore {
    pub fn new(inner: Arc<dyn ConfigStore>) -> Self {
        Self { inner }
    }
}

/// `store.<op>` with the usual fields; `outcome` and `error` are filled in by [`traced`].
macro_rules! store_span {
    ($op:literal $(, $($field:tt)*)?) => {
        tracing::info_span!(
            concat!("store.", $op),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.operation = $op,
            $($($field)*,)?
            revision = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        )
    };
}

/// Runs `call` in `span` and records how it ended, and its duration in
/// `wharf_control_store_operation_duration_seconds{op, outcome}`.
async fn traced<T>(
    op: &'static str,
    span: tracing::Span,
    call: impl Future<Output = Result<T, StoreError>>,
    revision: impl FnOnce(&T) -> Option<Revision>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = call.instrument(span.clone()).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => outcome(e),
    };
    metrics::histogram!("wharf_control_store_operation_duration_seconds", "op" => op, "outcome" => label)
        .record(started.elapsed().as_secs_f64());
    match &result {
        Ok(v) => {
            span.record("outcome", "ok");
            if let Some(r) = revision(v) {
                span.record("revision", r);
            }
        }
        Err(e) => {
            span.record("outcome", outcome(e));
            span.record("error", tracing::field::display(e));
            if e.is_unavailable() {
                span.record("otel.status_code", "ERROR");
            }
        }
    }
    result
}

fn outcome(e: &StoreError) -> &'static str {
    match e {
        StoreError::NotFound { .. } => "not_found",
        StoreError::AlreadyExists { .. } => "already_exists",
        StoreError::RevisionMismatch { .. } => "revision_mismatch",
        StoreError::Compacted { .. } => "compacted",
        StoreError::LeaseNotFound { .. } => "lease_not_found",
        StoreError::InvalidArgument(_) => "invalid_argument",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Corrupt(_) => "corrupt",
        StoreError::Internal(_) => "internal",
    }
}

fn none<T>(_: &T) -> Option<Revision> {
    None
}

#[async_trait]
impl ConfigStore for TracedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let span = store_span!("get", key);
        traced("get", span, self.inner.get(key), |kv| kv.as_ref().map(|kv| kv.mod_revision)).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let span = store_span!("list", prefix, count = tracing::field::Empty);
        let result = traced("list", span.clone(), self.inner.list(prefix), |(_, rev)| Some(*rev)).await;
        if let Ok((kvs, _)) = &result {
            span.record("count", kvs.len());
        }
        result
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        let span = store_span!("create", key);
        traced("create", span, self.inner.create(key, value), |r| Some(*r)).await
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let span = store_span!("update", key, expected_revision = expected_mod_revision);
        traced("update", span, self.inner.update(key, value, expected_mod_revision), |r| Some(*r)).await
    }

    async fn delete(&self, key: &str, expected_mod_revision: Option<Revision>) -> Result<Revision, StoreError> {
        let span = store_span!("delete", key, expected_revision = expected_mod_revision);
        traced("delete", span, self.inner.delete(key, expected_mod_revision), |r| Some(*r)).await
    }

    /// The span covers starting the watch, not the stream (which lives as long as the caller).
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError> {
        let span = store_span!("watch", prefix, from_revision);
        traced("watch", span, self.inner.watch(prefix, from_revision), none).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let span = store_span!("grant_lease", ttl_ms = ttl.as_millis() as u64, lease = tracing::field::Empty);
        let result = traced("grant_lease", span.clone(), self.inner.grant_lease(ttl), none).await;
        if let Ok(l) = &result {
            span.record("lease", tracing::field::display(l.id));
        }
        result
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let span = store_span!("keep_alive", lease = %lease);
        traced("keep_alive", span, self.inner.keep_alive(lease), none).await
    }

    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, StoreError> {
        let span = store_span!("put_with_lease", key, lease = %lease);
        traced("put_with_lease", span, self.inner.put_with_lease(key, value, lease), |r| Some(*r)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let span = store_span!("revoke_lease", lease = %lease);
        traced("revoke_lease", span, self.inner.revoke_lease(lease), none).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let span = store_span!("current_revision");
        traced("current_revision", span, self.inner.current_revision(), |r| Some(*r)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let span = store_span!("compact", compact_revision = revision);
        traced("compact", span, self.inner.compact(revision), none).await
    }
}
