//! `azure`: an Entra access token of the node's identity, exchanged at the registry's
//! `/oauth2/exchange` for an ACR refresh token, which the token endpoint takes by the
//! refresh-token grant (presented as user `00000000-0000-0000-0000-000000000000`, see
//! `upstream/auth.rs`).
//!
//! The identity, as Azure's own libraries find it: a service principal (`AZURE_TENANT_ID`,
//! `AZURE_CLIENT_ID` and `AZURE_CLIENT_SECRET`), AKS workload identity (the same with
//! `AZURE_FEDERATED_TOKEN_FILE`: a federated assertion), else the managed identity of the VM or
//! node pool through IMDS (`AZURE_CLIENT_ID` picks a user-assigned one). Endpoints follow their
//! settings: `AZURE_AUTHORITY_HOST` (Entra), `AZURE_POD_IDENTITY_AUTHORITY_HOST` (IMDS).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use wharf_core::{Credentials, Secret};

use super::super::auth::ACR_REFRESH_TOKEN_USER;
use super::super::options::UpstreamOptions;
use super::http::{env, send_json, with_form};

/// What ACR's exchange takes an Entra token for.
const ARM: &str = "https://management.azure.com/";

/// An ACR refresh token for the registry at `upstream`, and how long it lives.
pub(super) async fn acr(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    upstream: &str,
) -> Result<(Credentials, Duration), String> {
    let (access_token, entra_lifetime) = entra(http, opts).await?;
    let service = upstream.split_once("://").map_or(upstream, |(_, h)| h).trim_end_matches('/');
    let mut form = vec![("grant_type", "access_token"), ("service", service), ("access_token", access_token.as_str())];
    let tenant = env("AZURE_TENANT_ID");
    if let Some(t) = &tenant {
        form.push(("tenant", t));
    }
    let url = format!("{}/oauth2/exchange", upstream.trim_end_matches('/'));
    let req = with_form(http.post(&url), form);
    let answer: serde_json::Value = send_json(opts, req, &format!("ACR {url}")).await?;
    let refresh = answer["refresh_token"].as_str().ok_or_else(|| format!("ACR {url}: no refresh_token"))?;
    let lifetime = jwt_expiry(refresh).unwrap_or(entra_lifetime);
    Ok((Credentials { username: ACR_REFRESH_TOKEN_USER.into(), password: Secret::new(refresh) }, lifetime))
}

/// An Entra access token for ARM: a service principal's (secret or federated assertion), else the
/// managed identity's.
async fn entra(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<(String, Duration), String> {
    let client = env("AZURE_CLIENT_ID");
    let answer: serde_json::Value = match (env("AZURE_TENANT_ID"), &client) {
        (Some(tenant), Some(client_id))
            if env("AZURE_CLIENT_SECRET").is_some() || env("AZURE_FEDERATED_TOKEN_FILE").is_some() =>
        {
            let authority = env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| "https://login.microsoftonline.com".into());
            let url = format!("{}/{tenant}/oauth2/v2.0/token", authority.trim_end_matches('/'));
            let scope = format!("{ARM}.default");
            let mut form = vec![
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", client_id.clone()),
                ("scope", scope),
            ];
            match (env("AZURE_FEDERATED_TOKEN_FILE"), env("AZURE_CLIENT_SECRET")) {
                (Some(file), _) => {
                    let assertion = std::fs::read_to_string(&file).map_err(|e| format!("reading {file}: {e}"))?;
                    form.push((
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                    ));
                    form.push(("client_assertion", assertion.trim().to_owned()));
                }
                (None, Some(secret)) => form.push(("client_secret", secret)),
                (None, None) => unreachable!("checked above"),
            }
            let req = with_form(http.post(&url), form);
            send_json(opts, req, &format!("Entra {url}")).await?
        }
        _ => {
            let host = env("AZURE_POD_IDENTITY_AUTHORITY_HOST").unwrap_or_else(|| "http://169.254.169.254".into());
            let mut url = format!(
                "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
                host.trim_end_matches('/'),
                url::form_urlencoded::byte_serialize(ARM.as_bytes()).collect::<String>()
            );
            if let Some(c) = &client {
                url.push_str("&client_id=");
                url.extend(url::form_urlencoded::byte_serialize(c.as_bytes()));
            }
            let what =
                "managed identity (IMDS; no AZURE_TENANT_ID, AZURE_CLIENT_ID and a secret or federated token file)";
            send_json(opts, http.get(&url).header("Metadata", "true"), &format!("{what} {host}")).await?
        }
    };
    let token = answer["access_token"].as_str().ok_or("Entra: the answer has no access_token")?.to_owned();
    // IMDS says expires_in as a string, Entra as a number.
    let expires_in = answer["expires_in"].as_u64().or_else(|| answer["expires_in"].as_str()?.parse().ok());
    Ok((token, Duration::from_secs(expires_in.unwrap_or(3600))))
}

/// How long a JWT (an ACR refresh token) has left, from its `exp`.
fn jwt_expiry(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    let exp = claims["exp"].as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now).max(1)))
}
