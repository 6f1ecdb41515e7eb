//! Errors as clients see them: a status and a short message, nothing internal.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An API error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No valid bearer token.
    #[error("authentication required")]
    Unauthorized,
    /// Authenticated, but the role does not allow this.
    #[error("not allowed for this role")]
    Forbidden,
    /// A system client's scopes do not cover what it asked for; the message says what does.
    #[error("{0}")]
    Scope(String),
    /// A clinician asked for a patient outside their care without breaking the glass.
    #[error("this patient is not in your care: state a reason in X-Break-Glass-Reason to read the record anyway (the access is flagged for review)")]
    OutsideScope,
    /// The request is malformed; the message says what to change (it never echoes values).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing there (or nothing this caller may know exists).
    #[error("not found")]
    NotFound,
    /// The caller's rate limit is spent; retry after this many seconds.
    #[error("too many requests")]
    TooManyRequests(u64),
    /// The audit log cannot record the request, so it is not served.
    #[error("temporarily unavailable")]
    Unavailable,
    /// Archive integrity failure: the object is not served.
    #[error("archived data failed its integrity check")]
    Integrity,
    /// Anything else; the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl From<strata_archive::ArchiveError> for ApiError {
    fn from(e: strata_archive::ArchiveError) -> Self {
        match e {
            strata_archive::ArchiveError::Integrity { object, detail } => {
                tracing::error!(%object, %detail, "archive integrity error");
                ApiError::Integrity
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<strata_control::ControlError> for ApiError {
    fn from(e: strata_control::ControlError) -> Self {
        match e {
            strata_control::ControlError::AuditUnavailable(_) => ApiError::Unavailable,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::OutsideScope | ApiError::Scope(_) => {
                StatusCode::FORBIDDEN
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Integrity | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            ApiError::TooManyRequests(secs) => {
                headers.insert(header::RETRY_AFTER, (*secs).into());
            }
            _ => {}
        }
        response
    }
}
