//! Passthrough repos: the upstream's recent acceptances of a client's credentials for a repository,
//! kept (bounded, for `--passthrough-auth-ttl`) so that a cache hit need not ask again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wharf_core::{Digest, RepoKey};

/// Who a passthrough decision is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    /// [`crate::credentials::ClientCredentials::fingerprint`]; `None`: anonymous.
    pub client: Option<Digest>,
    pub repo: RepoKey,
    /// The repo's upstream when the decision was made: pointing the repo elsewhere voids it.
    pub upstream: String,
    /// The upstream's name of the repository.
    pub name: String,
}

/// The upstream's recent "yes" to a client for a repository: cached content of a passthrough repo
/// is served to a client only with one. Bounded; entries live `ttl`.
pub struct Decisions {
    ttl: Duration,
    max_entries: usize,
    map: Mutex<HashMap<DecisionKey, Instant>>,
}

impl Decisions {
    pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self { ttl, max_entries: max_entries.max(1), map: Mutex::default() }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<DecisionKey, Instant>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the upstream accepted this client for this repository less than `ttl` ago.
    pub fn allowed(&self, key: &DecisionKey) -> bool {
        self.map().get(key).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Records that the upstream just accepted this client for this repository.
    pub fn allow(&self, key: DecisionKey) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map();
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, at| at.elapsed() < ttl);
            if map.len() >= self.max_entries {
                // Still full of live entries: drop the oldest. Forgetting only costs a HEAD.
                if let Some(oldest) = map.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(key, Instant::now());
    }

    /// Entries held (expired ones included until pruned).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_expire_and_stay_bounded() {
        let k = |n: usize| DecisionKey {
            client: Some(Digest::of(&n.to_be_bytes())),
            repo: "lab".parse().unwrap(),
            upstream: "https://registry.example".into(),
            name: "a".into(),
        };
        let d = Decisions::new(Duration::from_millis(100), 3);
        assert!(!d.allowed(&k(0)));
        d.allow(k(0));
        assert!(d.allowed(&k(0)));
        assert!(!d.allowed(&DecisionKey { client: None, ..k(0) }), "anonymous is another client");
        assert!(!d.allowed(&DecisionKey { name: "b".into(), ..k(0) }), "another repository");
        assert!(!d.allowed(&DecisionKey { upstream: "https://elsewhere.example".into(), ..k(0) }), "another upstream");
        for n in 1..10 {
            d.allow(k(n));
            assert!(d.len() <= 3);
        }
        assert!(d.allowed(&k(9)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!d.allowed(&k(9)), "expired");

        let never = Decisions::new(Duration::ZERO, 10);
        never.allow(k(1));
        assert!(!never.allowed(&k(1)) && never.is_empty(), "a TTL of 0 asks every time");
    }
}
