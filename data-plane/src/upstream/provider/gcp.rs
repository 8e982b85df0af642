//! `gcp`: Google Application Default Credentials. The service-account key file named by
//! `GOOGLE_APPLICATION_CREDENTIALS` (a JWT signed RS256 with its key, exchanged at its `token_uri`
//! by the JWT-bearer grant), else the metadata server of GCE/GKE (`GCE_METADATA_HOST` overrides
//! `metadata.google.internal`, as Google's own libraries honour). The access token is presented as
//! `oauth2accesstoken:<token>`, what GCR and Artifact Registry take.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use wharf_core::{Credentials, Secret};

use super::super::options::UpstreamOptions;
use super::http::send_json;

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

/// An access token of the node's Google identity, and how long it lives.
pub(super) async fn token(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<(Credentials, Duration), String> {
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

/// The DER inside a PEM block.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}
