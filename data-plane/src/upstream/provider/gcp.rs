//! `gcp`: Google Application Default Credentials. A credentials file: the repo's
//! `credential_file`, else the one `GOOGLE_APPLICATION_CREDENTIALS` names. It is one of:
//! - a service-account key (a JWT signed RS256 with its key, exchanged at its `token_uri` by the
//!   JWT-bearer grant);
//! - an external account, for workload identity federation outside Google Cloud (a subject
//!   token from its `credential_source` file or URL, exchanged at Google's STS, then, when the
//!   file says so, for a service account's token by impersonation);
//! - an authorized user (gcloud's refresh token).
//!
//! Without a file: the metadata server of GCE/GKE (`GCE_METADATA_HOST` overrides
//! `metadata.google.internal`, as Google's own libraries honour). The access token is presented
//! as `oauth2accesstoken:<token>`, what GCR and Artifact Registry take.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use wharf_core::{Credentials, Secret};

use super::super::options::UpstreamOptions;
use super::http::{send_json, send_text, with_form};

/// Google's scope for registries (GCR, Artifact Registry).
const GCP_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const GCP_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// An assertion's life: Google takes at most an hour.
const ASSERTION_LIFETIME: u64 = 3600;
/// What an answer without `expires_in` is taken to mean.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// The fields of a Google credentials file that matter here.
#[derive(serde::Deserialize)]
struct GoogleFile {
    #[serde(rename = "type")]
    kind: String,
    // service_account
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
    // external_account
    audience: Option<String>,
    subject_token_type: Option<String>,
    token_url: Option<String>,
    service_account_impersonation_url: Option<String>,
    credential_source: Option<CredentialSource>,
    // authorized_user
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

/// Where an external account's subject token comes from.
#[derive(serde::Deserialize)]
struct CredentialSource {
    file: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: std::collections::HashMap<String, String>,
    format: Option<SourceFormat>,
    environment_id: Option<String>,
    executable: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct SourceFormat {
    #[serde(rename = "type")]
    kind: String,
    subject_token_field_name: Option<String>,
}

#[derive(serde::Deserialize)]
struct AccessToken {
    access_token: String,
    expires_in: Option<u64>,
}

const STS_URL: &str = "https://sts.googleapis.com/v1/token";

/// An access token of the node's Google identity, and how long it lives.
pub(super) async fn token(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    file: Option<&str>,
) -> Result<(Credentials, Duration), String> {
    let path = file.map(std::ffi::OsString::from).or_else(|| std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS"));
    let token: AccessToken = match path {
        Some(path) => {
            let shown = std::path::Path::new(&path).display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {shown}: {e}"))?;
            let file: GoogleFile = serde_json::from_str(&text).map_err(|e| {
                format!("{shown}: not a Google credentials file (line {}, column {})", e.line(), e.column())
            })?;
            match file.kind.as_str() {
                "service_account" => service_account(http, opts, &file, &shown).await?,
                "external_account" => external_account(http, opts, &file, &shown).await?,
                "authorized_user" => authorized_user(http, opts, &file, &shown).await?,
                other => {
                    return Err(format!(
                        "{shown} is a {other:?} credentials file; this node takes service_account, external_account and authorized_user files (or the metadata server)"
                    ));
                }
            }
        }
        None => metadata_server(http, opts).await?,
    };
    let lifetime = token.expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs);
    let credentials = Credentials { username: "oauth2accesstoken".into(), password: Secret::new(token.access_token) };
    Ok((credentials, lifetime))
}

/// A form POST to a Google token endpoint.
async fn post_form(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    url: &str,
    form: &[(&str, &str)],
) -> Result<AccessToken, String> {
    send_json(opts, with_form(http.post(url), form.iter().copied()), &format!("token endpoint {url}")).await
}

/// Workload identity federation: the subject token exchanged at STS, then for the service
/// account's own token when the file names one to impersonate.
async fn external_account(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    file: &GoogleFile,
    shown: &str,
) -> Result<AccessToken, String> {
    let (Some(audience), Some(token_type), Some(source)) =
        (&file.audience, &file.subject_token_type, &file.credential_source)
    else {
        return Err(format!(
            "{shown}: an external_account file needs audience, subject_token_type and credential_source"
        ));
    };
    let subject = subject_token(http, opts, source, shown).await?;
    let sts_url = file.token_url.as_deref().unwrap_or(STS_URL);
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("audience", audience.as_str()),
        ("scope", GCP_SCOPE),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ("subject_token", subject.as_str()),
        ("subject_token_type", token_type.as_str()),
    ];
    let federated = post_form(http, opts, sts_url, &form).await?;
    let Some(url) = &file.service_account_impersonation_url else { return Ok(federated) };
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Impersonated {
        access_token: String,
        expire_time: String,
    }
    let body = serde_json::json!({ "scope": [GCP_SCOPE], "lifetime": "3600s" });
    let req = http
        .post(url)
        .bearer_auth(&federated.access_token)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    let answer: Impersonated = send_json(opts, req, &format!("IAM credentials {url}")).await?;
    let expires_in = humantime::parse_rfc3339_weak(&answer.expire_time)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .map(|d| d.as_secs());
    Ok(AccessToken { access_token: answer.access_token, expires_in })
}

/// An external account's subject token: from its file or URL, as text or a JSON field.
async fn subject_token(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    source: &CredentialSource,
    shown: &str,
) -> Result<String, String> {
    let raw = match (&source.file, &source.url) {
        (Some(f), _) => {
            std::fs::read_to_string(f).map_err(|e| format!("{shown}: reading the subject token {f}: {e}"))?
        }
        (None, Some(url)) => {
            let mut req = http.get(url);
            for (k, v) in &source.headers {
                req = req.header(k, v);
            }
            send_text(opts, req, &format!("{shown}: the subject token's URL {url}")).await?
        }
        (None, None) if source.environment_id.is_some() || source.executable.is_some() => {
            return Err(format!(
                "{shown}: this node reads subject tokens from a file or a URL; AWS- and executable-sourced external accounts are not supported"
            ));
        }
        (None, None) => return Err(format!("{shown}: credential_source has no file or url")),
    };
    match &source.format {
        Some(f) if f.kind == "json" => {
            let field = f.subject_token_field_name.as_deref().unwrap_or("access_token");
            let j: serde_json::Value =
                serde_json::from_str(&raw).map_err(|_| format!("{shown}: the subject token is not JSON"))?;
            j[field].as_str().map(str::to_owned).ok_or_else(|| format!("{shown}: the subject token has no {field:?}"))
        }
        _ => Ok(raw.trim().to_owned()),
    }
}

/// gcloud's user credentials: the refresh-token grant.
async fn authorized_user(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    file: &GoogleFile,
    shown: &str,
) -> Result<AccessToken, String> {
    let (Some(id), Some(secret), Some(refresh)) = (&file.client_id, &file.client_secret, &file.refresh_token) else {
        return Err(format!("{shown}: an authorized_user file needs client_id, client_secret and refresh_token"));
    };
    let form =
        [("grant_type", "refresh_token"), ("client_id", id), ("client_secret", secret), ("refresh_token", refresh)];
    post_form(http, opts, file.token_uri.as_deref().unwrap_or(GCP_TOKEN_URI), &form).await
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
    post_form(http, opts, token_uri, &form).await
}

/// The metadata server's token for the instance's (GKE: the workload's) service account.
async fn metadata_server(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<AccessToken, String> {
    let host = std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| "metadata.google.internal".into());
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    let req = http.get(&url).header("Metadata-Flavor", "Google");
    send_json(opts, req, &format!("metadata server {url} (no GOOGLE_APPLICATION_CREDENTIALS)")).await
}

/// The DER inside a PEM block.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}
