//! What can go wrong asking an upstream, and how URLs and error chains are written in messages.

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("upstream {url} timed out ({phase})")]
    Timeout { url: String, phase: &'static str },
    #[error("upstream token endpoint {url} answered {status}: {message}")]
    Token { url: String, status: u16, message: String },
    #[error("upstream {url}: {message}")]
    Protocol { url: String, message: String },
    /// The repo's credential provider gave no credentials.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// Why a credential provider gave no credentials: which provider, and what it was told (never a
/// secret).
#[derive(Debug, Clone, thiserror::Error)]
#[error("credential provider {provider}: {message}")]
pub struct ProviderError {
    pub provider: wharf_core::CredentialProvider,
    pub message: String,
}

impl UpstreamError {
    pub(super) fn retryable(&self) -> bool {
        matches!(self, UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. })
    }
}

/// A URL fit for logs and error messages: no query (signed URLs), no user info.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("<redacted>"));
            }
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// An error and its sources on one line (reqwest's and tonic's own messages say only "error
/// sending request" or "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
