//! Credential providers: a repo's upstream credentials from the node's own cloud identity instead
//! of a static password, exchanged for short-lived tokens.
//!
//! A token is obtained when a request first needs it, kept, and refreshed ahead of its expiry (at a
//! margin of a quarter of its life, at most five minutes, less a random jitter of up to a tenth), one
//! refresh at a time however many requests wait: they wait on the one refresh. A refresh that fails
//! while the held token is still valid leaves the held one in use (said in the log), so a pull that
//! crosses an expiry never fails because of it.
//!
//! `gcp`: Google Application Default Credentials ([`gcp`]), the access token presented as
//! `oauth2accesstoken`.
//!
//! `aws`: ECR's `GetAuthorizationToken` signed with the node's AWS identity ([`aws`]), its
//! `AWS:<password>` presented as Basic. `azure`: the node's Entra token exchanged for an ACR
//! refresh token ([`azure`]).
//!
//! No token, key or assertion is ever logged or put in an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wharf_core::{CredentialProvider, Credentials};

use super::error::ProviderError;
use super::options::UpstreamOptions;

mod aws;
mod azure;
mod gcp;
mod http;

/// A token a provider gave, and when to refresh it.
#[derive(Clone)]
struct Held {
    credentials: Credentials,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The node's providers: one held token per provider and upstream (an ECR token is for one
/// registry), each refreshed by one task at a time.
#[derive(Default)]
pub struct Providers {
    held: Mutex<HashMap<(CredentialProvider, String), Slot>>,
}

/// One provider's held token for one upstream; its lock is what one refresh holds.
type Slot = Arc<tokio::sync::Mutex<Option<Held>>>;

/// How long before its expiry a token is refreshed, at most.
const MAX_MARGIN: Duration = Duration::from_secs(300);

impl Providers {
    /// The credentials `provider` gives now for `upstream`: the held ones, or fresh ones.
    pub async fn credentials(
        &self,
        http: &reqwest::Client,
        opts: &UpstreamOptions,
        provider: CredentialProvider,
        upstream: &str,
    ) -> Result<Credentials, ProviderError> {
        let slot = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.entry((provider, upstream.to_owned())).or_default().clone()
        };
        // Requests that find the token due wait here for the one refresh.
        let mut held = slot.lock().await;
        let now = Instant::now();
        if let Some(h) = held.as_ref()
            && now < h.refresh_at
        {
            return Ok(h.credentials.clone());
        }
        match fetch(http, opts, provider, upstream).await {
            Ok((credentials, lifetime)) => {
                metrics::counter!("wharf_credential_provider_refreshes_total", "provider" => provider.to_string())
                    .increment(1);
                let margin = (lifetime / 4).min(MAX_MARGIN) + lifetime.mul_f64(rand::random::<f64>() * 0.1);
                let fetched = Instant::now();
                *held = Some(Held {
                    credentials: credentials.clone(),
                    refresh_at: fetched + lifetime.saturating_sub(margin),
                    expires_at: fetched + lifetime,
                });
                tracing::debug!(%provider, lifetime_s = lifetime.as_secs(), "credential provider gave a token");
                Ok(credentials)
            }
            Err(message) => {
                metrics::counter!("wharf_credential_provider_errors_total", "provider" => provider.to_string())
                    .increment(1);
                match held.as_ref() {
                    Some(h) if now < h.expires_at => {
                        tracing::warn!(%provider, error = %message, "credential provider refresh failed; the held token is still valid");
                        Ok(h.credentials.clone())
                    }
                    _ => {
                        tracing::warn!(%provider, error = %message, "credential provider failed");
                        Err(ProviderError { provider, message })
                    }
                }
            }
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    provider: CredentialProvider,
    upstream: &str,
) -> Result<(Credentials, Duration), String> {
    match provider {
        CredentialProvider::Gcp => gcp::token(http, opts).await,
        CredentialProvider::Aws => aws::ecr(http, opts, upstream).await,
        CredentialProvider::Azure => azure::acr(http, opts, upstream).await,
    }
}
