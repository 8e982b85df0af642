//! What can go wrong, each as one line that says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("control plane unreachable at {url}: {why} (check --server or WHARF_SERVER)")]
    Unreachable { url: String, why: String },
    #[error("the server at {url} does not answer as a Wharf control plane: {why} (check --server or WHARF_SERVER)")]
    NotControlPlane { url: String, why: String },
    #[error("{0}")]
    BadServerUrl(String),
    #[error("repo {key:?} not found (regctl repo list shows the repos)")]
    RepoNotFound { key: String },
    #[error("repo {key:?} already exists (change it with regctl repo update)")]
    RepoExists { key: String },
    #[error("repo {key:?} was changed by someone else, re-run")]
    Stale { key: String },
    #[error("refused: {0}")]
    Invalid(String),
    #[error("not allowed: {0} (check --token-file or WHARF_TOKEN)")]
    Denied(String),
    #[error("the control plane's store is unavailable: {0} (retry later)")]
    Unavailable(String),
    #[error("the control plane failed: {0}")]
    Server(String),
    #[error("the control plane timed out after {0:?} (raise --timeout or check the server)")]
    Timeout(std::time::Duration),
    #[error("reading {what} from {path}: {source}")]
    ReadFile { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Usage(String),
    #[error("writing the output: {0}")]
    Output(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit code for this error: 2 for usage errors, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}
