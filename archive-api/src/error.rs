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
    /// Nothing there (or nothing this caller may know exists).
    #[error("not found")]
    NotFound,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Integrity | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
