//! `oauth2`: a registry behind a generic OAuth2 server. The repo's `credential_file` names a JSON
//! settings file on the node (read again at each refresh, so a rotated secret or assertion is
//! taken up):
//!
//! ```json
//! { "token_url": "https://auth.example.com/oauth2/token",
//!   "client_id": "wharf", "client_secret": "...",
//!   "scope": "registry:pull", "audience": "https://registry.example.com",
//!   "client_auth": "basic", "username": "oauth2accesstoken" }
//! ```
//!
//! With `client_secret` it is the client-credentials grant (RFC 6749 4.4), the client
//! authenticated by HTTP Basic (`client_auth: "basic"`, the default) or in the form (`"post"`).
//! With `assertion_file` instead it is the JWT-bearer grant (RFC 7523): the file's JWT (a
//! projected service-account token, say) is the assertion. The access token is presented to the
//! registry as the password of `username` (default `oauth2accesstoken`).

use std::time::Duration;

use wharf_core::{Credentials, Secret};

use super::super::options::UpstreamOptions;
use super::http::{send_json, with_form};

/// What an answer without `expires_in` is taken to mean.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    token_url: String,
    client_id: Option<String>,
    client_secret: Option<String>,
    assertion_file: Option<String>,
    scope: Option<String>,
    audience: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    username: Option<String>,
}

#[derive(serde::Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ClientAuth {
    #[default]
    Basic,
    Post,
}

#[derive(serde::Deserialize)]
struct AccessToken {
    access_token: String,
    expires_in: Option<u64>,
}

/// The access token the settings in `file` give, presented as a password, and how long it lives.
pub(super) async fn token(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    file: &str,
) -> Result<(Credentials, Duration), String> {
    let settings = read(file)?;
    let mut form: Vec<(&str, String)> = Vec::new();
    let mut req = http.post(&settings.token_url);
    match (&settings.client_secret, &settings.assertion_file) {
        (Some(secret), None) => {
            let id = settings.client_id.as_deref().ok_or_else(|| format!("{file}: client_secret needs client_id"))?;
            form.push(("grant_type", "client_credentials".into()));
            if settings.client_auth == ClientAuth::Post {
                form.push(("client_id", id.into()));
                form.push(("client_secret", secret.clone()));
            } else {
                // RFC 6749 2.3.1: both form-encoded before they are joined.
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                req = req.basic_auth(enc(id), Some(enc(secret)));
            }
        }
        (None, Some(assertion_file)) => {
            let assertion = std::fs::read_to_string(assertion_file)
                .map_err(|e| format!("{file}: reading assertion_file {assertion_file}: {e}"))?;
            form.push(("grant_type", JWT_BEARER.into()));
            form.push(("assertion", assertion.trim().to_owned()));
            if let Some(id) = &settings.client_id {
                form.push(("client_id", id.clone()));
            }
        }
        _ => return Err(format!("{file}: give one of client_secret (with client_id) or assertion_file")),
    }
    if let Some(scope) = &settings.scope {
        form.push(("scope", scope.clone()));
    }
    if let Some(audience) = &settings.audience {
        form.push(("audience", audience.clone()));
    }
    let req = with_form(req, form);
    let token: AccessToken = send_json(opts, req, &format!("token endpoint {}", settings.token_url)).await?;
    let lifetime = token.expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs);
    let username = settings.username.unwrap_or_else(|| "oauth2accesstoken".into());
    Ok((Credentials { username, password: Secret::new(token.access_token) }, lifetime))
}

/// The settings in `file`. A parse error names the field or the place, never a value: the file
/// holds a secret.
fn read(file: &str) -> Result<Settings, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("reading {file}: {e}"))?;
    let settings: Settings = serde_json::from_str(&text).map_err(|e| {
        let said = e.to_string();
        if said.starts_with("unknown field") || said.starts_with("missing field") || said.starts_with("unknown variant")
        {
            format!("{file}: {said}")
        } else {
            format!("{file}: not the JSON settings expected (line {}, column {})", e.line(), e.column())
        }
    })?;
    if !settings.token_url.starts_with("https://") && !settings.token_url.starts_with("http://") {
        return Err(format!("{file}: token_url is not an http(s) URL"));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_errors_name_fields_never_values() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            let p = dir.path().join("s.json");
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let f = write(r#"{"token_url": "https://a/t", "client_secret": 424242424242}"#);
        let e = read(&f).err().unwrap();
        assert!(!e.contains("424242424242") && e.contains("line 1"), "{e}");
        let e = read(&write(r#"{"token_url": "https://a/t", "client_secrett": "x"}"#)).err().unwrap();
        assert!(e.contains("unknown field `client_secrett`"), "{e}");
        let e = read(&write(r#"{"client_id": "x"}"#)).err().unwrap();
        assert!(e.contains("missing field `token_url`"), "{e}");
        let e = read(&write(r#"{"token_url": "ftp://a"}"#)).err().unwrap();
        assert!(e.contains("token_url"), "{e}");
        assert!(read(&write(r#"{"token_url": "https://a/t", "client_auth": "post"}"#)).is_ok());
    }
}
