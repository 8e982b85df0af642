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
//! refresh token ([`azure`]). `oauth2`: a generic OAuth2 server, as the settings file the repo's
//! `credential_file` names says ([`oauth2`]).
//!
//! A provider that fails is asked again after 1 s, then 2, 4, ... up to 30 s, not once per
//! request; meanwhile requests get the held token while it is valid, else the same error.
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
mod oauth2;

/// A token a provider gave, and when to refresh it.
#[derive(Clone)]
struct Held {
    credentials: Credentials,
    refresh_at: Instant,
    expires_at: Instant,
}

/// A provider that failed: what it said, and when it is asked again.
struct Failing {
    message: String,
    retry_at: Instant,
    backoff: Duration,
}

/// One provider's state for one upstream and file; its lock is what one refresh holds.
#[derive(Default)]
struct State {
    held: Option<Held>,
    failing: Option<Failing>,
}

/// What one held token is for: a provider, the upstream (an ECR token is for one registry), and
/// the file the provider reads (two oauth2 repos may name different clients).
type SlotKey = (CredentialProvider, String, Option<String>);

/// The node's providers: one held token per provider, upstream and file, each refreshed by one
/// task at a time.
#[derive(Default)]
pub struct Providers {
    held: Mutex<HashMap<SlotKey, Arc<tokio::sync::Mutex<State>>>>,
}

/// How long before its expiry a token is refreshed, at most.
const MAX_MARGIN: Duration = Duration::from_secs(300);
/// After a failure the provider is asked again after 1 s, then 2, 4, ... up to this: a provider
/// that is down is not asked once per request.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Providers {
    /// The credentials `provider` (reading `file`) gives now for `upstream`: the held ones, or
    /// fresh ones.
    pub async fn credentials(
        &self,
        http: &reqwest::Client,
        opts: &UpstreamOptions,
        provider: CredentialProvider,
        file: Option<&str>,
        upstream: &str,
    ) -> Result<Credentials, ProviderError> {
        let slot = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let key = (provider, upstream.to_owned(), file.map(str::to_owned));
            held.entry(key).or_default().clone()
        };
        // Requests that find the token due wait here for the one refresh.
        let mut state = slot.lock().await;
        let now = Instant::now();
        let valid = state.held.as_ref().filter(|h| now < h.expires_at).map(|h| h.credentials.clone());
        if let Some(h) = &state.held
            && now < h.refresh_at
        {
            return Ok(h.credentials.clone());
        }
        if let Some(f) = &state.failing
            && now < f.retry_at
        {
            return match valid {
                Some(c) => Ok(c),
                None => Err(ProviderError {
                    provider,
                    message: format!(
                        "{} (asked again in {} s)",
                        f.message,
                        f.retry_at.saturating_duration_since(now).as_secs().max(1)
                    ),
                }),
            };
        }
        match fetch(http, opts, provider, file, upstream).await {
            Ok((credentials, lifetime)) => {
                metrics::counter!("wharf_credential_provider_refreshes_total", "provider" => provider.to_string())
                    .increment(1);
                let margin = (lifetime / 4).min(MAX_MARGIN) + lifetime.mul_f64(rand::random::<f64>() * 0.1);
                let fetched = Instant::now();
                state.held = Some(Held {
                    credentials: credentials.clone(),
                    refresh_at: fetched + lifetime.saturating_sub(margin),
                    expires_at: fetched + lifetime,
                });
                state.failing = None;
                tracing::debug!(%provider, lifetime_s = lifetime.as_secs(), "credential provider gave a token");
                Ok(credentials)
            }
            Err(message) => {
                metrics::counter!("wharf_credential_provider_errors_total", "provider" => provider.to_string())
                    .increment(1);
                let backoff =
                    state.failing.as_ref().map_or(Duration::from_secs(1), |f| (f.backoff * 2).min(MAX_BACKOFF));
                let retry_in_s = backoff.as_secs();
                state.failing = Some(Failing { message: message.clone(), retry_at: Instant::now() + backoff, backoff });
                match valid {
                    Some(c) => {
                        tracing::warn!(%provider, error = %message, retry_in_s, "credential provider refresh failed; the held token is still valid");
                        Ok(c)
                    }
                    None => {
                        tracing::warn!(%provider, error = %message, retry_in_s, "credential provider failed");
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
    file: Option<&str>,
    upstream: &str,
) -> Result<(Credentials, Duration), String> {
    match provider {
        CredentialProvider::Gcp => gcp::token(http, opts, file).await,
        CredentialProvider::Aws => aws::ecr(http, opts, upstream).await,
        CredentialProvider::Azure => azure::acr(http, opts, upstream).await,
        CredentialProvider::Oauth2 => match file {
            Some(f) => oauth2::token(http, opts, f).await,
            None => Err("the oauth2 provider needs credential_file".into()),
        },
    }
}
