//! What the providers share: reading their settings and asking their endpoints, with the
//! node's upstream timeouts; errors say who answered what (never a secret: the bodies quoted are
//! the services' error messages).

use super::super::error::error_chain;
use super::super::options::UpstreamOptions;

/// An environment variable that is set and not empty.
pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `req` with `pairs` as its `application/x-www-form-urlencoded` body.
pub(super) fn with_form<K: AsRef<str>, V: AsRef<str>>(
    req: reqwest::RequestBuilder,
    pairs: impl IntoIterator<Item = (K, V)>,
) -> reqwest::RequestBuilder {
    let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    req.header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body)
}

/// Sends `req`; its JSON answer.
pub(super) async fn send_json<T: serde::de::DeserializeOwned>(
    opts: &UpstreamOptions,
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<T, String> {
    let text = send_text(opts, req, what).await?;
    serde_json::from_str(&text).map_err(|e| format!("{what}: the answer is not the JSON expected: {e}"))
}

/// Sends `req`; its body, or what `what` answered (its status and the first 300 characters of its
/// error body).
pub(super) async fn send_text(
    opts: &UpstreamOptions,
    req: reqwest::RequestBuilder,
    what: &str,
) -> Result<String, String> {
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
