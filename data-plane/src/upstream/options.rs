//! How upstreams are asked: timeouts and the retry policy.

use std::time::Duration;

/// Timeouts and retry policy towards upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub connect_timeout: Duration,
    /// From sending a request to receiving the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks.
    pub idle_timeout: Duration,
    /// Extra attempts after a connection error, a timeout, a 5xx or a 429.
    pub retries: u32,
    pub retry_backoff: Duration,
    /// A 429 whose `Retry-After` asks for longer than this is returned to the client, not waited on.
    pub max_retry_after: Duration,
    /// Passthrough repos: how long the upstream's acceptance of a client's credentials for a
    /// repository is trusted before cached content is served to that client again.
    pub passthrough_auth_ttl: Duration,
}

impl UpstreamOptions {
    pub const DEFAULT_PASSTHROUGH_AUTH_TTL: Duration = Duration::from_secs(60);
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            retries: 2,
            retry_backoff: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(10),
            passthrough_auth_ttl: Self::DEFAULT_PASSTHROUGH_AUTH_TTL,
        }
    }
}
