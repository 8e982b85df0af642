//! The cluster's token keys, under `keys/<id>`: the nodes seal their registry tokens (`/v2/token`)
//! with them, and every node accepts every other node's. Streamed in the snapshot like puller
//! token hashes, never shown by any API view or log line.
//!
//! Every replica keeps the set fresh: a new key each rotation period, the one before kept for
//! another period (two keys live while one rotates, and nodes seal only with a key that has had a
//! minute to reach every node). Replicas racing to rotate create the same key name (the period's
//! number), so one wins and the others find it there.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wharf_core::SigningKey;

use crate::repos::millis;
use crate::store::{ConfigStore, KeyValue, StoreError};

/// Where token keys live in the store.
pub const PREFIX: &str = "keys/";

pub const DEFAULT_ROTATION: Duration = Duration::from_secs(24 * 3600);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    secret: String,
    created_at_ms: u64,
}

/// Decodes a stored key; `None` (logged, without the secret) for keys that do not parse.
pub fn decode(kv: &KeyValue) -> Option<SigningKey> {
    let id = kv.key.strip_prefix(PREFIX)?;
    let parsed = (|| -> Result<SigningKey, String> {
        let s: Stored = serde_json::from_slice(&kv.value).map_err(|_| "not a stored key (JSON)".to_owned())?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(&s.secret, &mut secret)
            .map_err(|_| "the secret is not 64 hexadecimal digits".to_owned())?;
        Ok(SigningKey { id: id.to_owned(), secret, created_at: UNIX_EPOCH + Duration::from_millis(s.created_at_ms) })
    })();
    parsed.map_err(|error| tracing::error!(key = %kv.key, %error, "stored token key does not decode; skipped")).ok()
}

/// Makes the period's key if the newest is older than `period`, and deletes keys older than two
/// periods (the newest two always stay). Returns the live keys' ids.
pub async fn rotate(store: &dyn ConfigStore, period: Duration, now: SystemTime) -> Result<Vec<String>, StoreError> {
    let (kvs, _) = store.list(PREFIX).await?;
    let mut keys: Vec<SigningKey> = kvs.iter().filter_map(decode).collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let age = |k: &SigningKey| now.duration_since(k.created_at).unwrap_or_default();
    if keys.first().is_none_or(|k| age(k) >= period) {
        let index = millis(now) / (period.as_millis().max(1000) as u64);
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        let id = format!("{index:016x}");
        let value = serde_json::to_vec(&Stored { secret: hex::encode(secret), created_at_ms: millis(now) })
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        match store.create(&format!("{PREFIX}{id}"), value).await {
            Ok(_) => {
                tracing::info!(key_id = %id, "token key created");
                keys.insert(0, SigningKey { id, secret, created_at: now });
            }
            // Another replica made this period's key first: it is listed next time.
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let old: Vec<SigningKey> = keys.iter().skip(2).filter(|k| age(k) >= period * 2).cloned().collect();
    for k in &old {
        match store.delete(&format!("{PREFIX}{}", k.id), None).await {
            Ok(_) => tracing::info!(key_id = %k.id, "token key retired"),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    keys.retain(|k| !old.contains(k));
    Ok(keys.iter().map(|k| k.id.clone()).collect())
}

/// Keeps the key set fresh until `cancel`: at start (so a node's first snapshot has a key), then
/// every tenth of a period (at most hourly). Store failures are logged and retried.
pub async fn run(store: std::sync::Arc<dyn ConfigStore>, period: Duration, cancel: CancellationToken) {
    let every = (period / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        let wait = match rotate(&*store, period, SystemTime::now()).await {
            Ok(_) => every,
            Err(e) => {
                tracing::warn!(error = %e, "token keys not rotated; trying again");
                every.min(Duration::from_secs(5))
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    #[tokio::test]
    async fn keys_rotate_once_per_period_and_two_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        let day = Duration::from_secs(86_400);
        let t0 = UNIX_EPOCH + day * 20_000;
        let first = rotate(&store, day, t0).await.unwrap();
        assert_eq!(first.len(), 1);
        // Within the period (and a racing replica): nothing new.
        assert_eq!(rotate(&store, day, t0 + day / 2).await.unwrap(), first);
        let second = rotate(&store, day, t0 + day).await.unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(second[1], first[0]);
        // The first is two periods old, and two newer stay: it goes.
        let third = rotate(&store, day, t0 + day * 2).await.unwrap();
        assert_eq!(third, [third[0].clone(), second[0].clone()]);
        let (kvs, _) = store.list(PREFIX).await.unwrap();
        assert_eq!(kvs.len(), 2);
        assert!(!kvs.iter().any(|kv| kv.key.ends_with(&first[0])));
        let k = decode(&kvs[0]).unwrap();
        assert!(!format!("{k:?}").contains(&hex::encode(k.secret)));
    }
}
