//! The control plane's API errors: one enum behind gRPC and REST, turned into a `tonic::Status` or
//! an RFC 9457 problem JSON where requests leave.

use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("repo {key:?} does not exist")]
    NotFound { key: String },
    #[error("repo {key:?} already exists")]
    AlreadyExists { key: String },
    #[error(
        "repo {key:?} was changed by someone else (you sent revision {expected}, it is at {current}): read it again and retry"
    )]
    Stale { key: String, expected: i64, current: i64 },
    #[error("token {id:?} does not exist")]
    TokenNotFound { id: String },
    /// A node the call names is not in the node list (or no node is).
    #[error("{0}")]
    NodeNotFound(String),
    /// No token, or one that is unknown, revoked or expired.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose role does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the configuration store is unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid { field: field.into(), message: message.into() }
    }

    /// A store error on a repo operation.
    pub fn from_store(e: StoreError, key: &str, expected: Option<i64>) -> Self {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound { key: key.to_owned() },
            StoreError::AlreadyExists { .. } => ApiError::AlreadyExists { key: key.to_owned() },
            StoreError::RevisionMismatch { current, .. } => {
                ApiError::Stale { key: key.to_owned(), expected: expected.unwrap_or(0), current }
            }
            StoreError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Invalid { .. } => tonic::Status::invalid_argument(msg),
            ApiError::NotFound { .. } | ApiError::TokenNotFound { .. } | ApiError::NodeNotFound(_) => {
                tonic::Status::not_found(msg)
            }
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            ApiError::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            ApiError::Stale { .. } => tonic::Status::failed_precondition(msg),
            ApiError::Unavailable(_) => tonic::Status::unavailable(msg),
            ApiError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}
