//! Credential providers: a repo's upstream credentials from the node's own cloud identity instead
//! of a static password, exchanged for short-lived tokens.
//!
//! A token is obtained when a request first needs it, kept, and refreshed ahead of its expiry (at a
//! margin of a quarter of its life, at most five minutes, less a random jitter of up to a tenth), one
//! refresh at a time however many requests wait: they wait on the one refresh. A refresh that fails
//! while the held token is still valid leaves the held one in use (said in the log), so a pull that
//! crosses an expiry never fails because of it.
//!
//! `gcp`: Google Application Default Credentials. The service-account key file named by
//! `GOOGLE_APPLICATION_CREDENTIALS` (a JWT signed RS256 with its key, exchanged at its `token_uri`
//! by the JWT-bearer grant), else the metadata server of GCE/GKE (`GCE_METADATA_HOST` overrides
//! `metadata.google.internal`, as Google's own libraries honour). The access token is presented as
//! `oauth2accesstoken:<token>`, what GCR and Artifact Registry take.
//!
//! `aws`: ECR's `GetAuthorizationToken` signed with the node's AWS identity ([`aws`]), its
//! `AWS:<password>` presented as Basic. `azure`: the node's Entra token exchanged for an ACR
//! refresh token ([`azure`]).
//!
//! No token, key or assertion is ever logged or put in an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use wharf_core::{CredentialProvider, Credentials, Secret};

use super::error::{ProviderError, error_chain};
use super::options::UpstreamOptions;

mod aws;
mod azure;

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

/// Google's scope for registries (GCR, Artifact Registry).
const GCP_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const GCP_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// An assertion's life: Google takes at most an hour.
const ASSERTION_LIFETIME: u64 = 3600;
/// What an answer without `expires_in` is taken to mean.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
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
        CredentialProvider::Gcp => gcp(http, opts).await,
        CredentialProvider::Aws => aws::ecr(http, opts, upstream).await,
        CredentialProvider::Azure => azure::acr(http, opts, upstream).await,
    }
}

/// The fields of a Google credentials file that matter here.
#[derive(serde::Deserialize)]
struct GoogleFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

#[derive(serde::Deserialize)]
struct AccessToken {
    access_token: String,
    expires_in: Option<u64>,
}

async fn gcp(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<(Credentials, Duration), String> {
    let token: AccessToken = match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
        Some(path) => {
            let shown = std::path::Path::new(&path).display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {shown}: {e}"))?;
            let file: GoogleFile = serde_json::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
            if file.kind != "service_account" {
                return Err(format!(
                    "{shown} is a {:?} credentials file; this node takes service_account key files (or the metadata server)",
                    file.kind
                ));
            }
            service_account(http, opts, &file, &shown).await?
        }
        None => metadata_server(http, opts).await?,
    };
    let lifetime = token.expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs);
    let credentials = Credentials { username: "oauth2accesstoken".into(), password: Secret::new(token.access_token) };
    Ok((credentials, lifetime))
}

/// A JWT for `file`'s service account, signed with its key, exchanged at its `token_uri`.
async fn service_account(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    file: &GoogleFile,
    shown: &str,
) -> Result<AccessToken, String> {
    let (Some(email), Some(pem)) = (&file.client_email, &file.private_key) else {
        return Err(format!("{shown} has no client_email or private_key"));
    };
    let token_uri = file.token_uri.as_deref().unwrap_or(GCP_TOKEN_URI);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &file.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let claims = serde_json::json!({
        "iss": email, "scope": GCP_SCOPE, "aud": token_uri, "iat": now, "exp": now + ASSERTION_LIFETIME,
    });
    let signing_input = format!("{}.{}", b64.encode(header.to_string()), b64.encode(claims.to_string()));
    let key = RsaKeyPair::from_pkcs8(&pem_body(pem).ok_or_else(|| format!("{shown}: private_key is not PEM"))?)
        .map_err(|e| format!("{shown}: private_key is not an RSA PKCS#8 key: {e}"))?;
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), signing_input.as_bytes(), &mut signature)
        .map_err(|e| format!("signing the assertion: {e}"))?;
    let assertion = format!("{signing_input}.{}", b64.encode(signature));
    let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion.as_str())];
    let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let req = http.post(token_uri).header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body);
    send_json(opts, req, &format!("token endpoint {token_uri}")).await
}

/// The metadata server's token for the instance's (GKE: the workload's) service account.
async fn metadata_server(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<AccessToken, String> {
    let host = std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| "metadata.google.internal".into());
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    let req = http.get(&url).header("Metadata-Flavor", "Google");
    send_json(opts, req, &format!("metadata server {url} (no GOOGLE_APPLICATION_CREDENTIALS)")).await
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

async fn send_json<T: serde::de::DeserializeOwned>(
    opts: &UpstreamOptions,
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<T, String> {
    let text = send_text(opts, req, what).await?;
    serde_json::from_str(&text).map_err(|e| format!("{what}: the answer is not the JSON expected: {e}"))
}

/// Sends `req`; its body, or what `what` answered (its status and the first bytes of its error
/// body: AWS errors name the problem, never a secret).
async fn send_text(opts: &UpstreamOptions, req: reqwest::RequestBuilder, what: &str) -> Result<String, String> {
    let resp = tokio::time::timeout(opts.first_byte_timeout, req.send())
        .await
        .map_err(|_| format!("{what}: no answer within {}", humantime::format_duration(opts.first_byte_timeout)))?
        .map_err(|e| format!("{what}: {}", error_chain(&e)))?;
    let status = resp.status();
    let body = tokio::time::timeout(opts.idle_timeout, resp.text())
        .await
        .map_err(|_| format!("{what}: the answer's body stalled"))?
        .map_err(|e| format!("{what}: {}", error_chain(&e)))?;
    if !status.is_success() {
        let said: String = body.chars().take(300).collect();
        return Err(format!("{what} answered {status}: {said}"));
    }
    Ok(body)
}

/// The DER inside a PEM block.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}
