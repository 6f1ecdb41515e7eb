//! Extractors that refuse a bad body or query with the API's own error (a JSON `ErrorBody`,
//! 400), never axum's plain-text rejection, and never with the caller's values in the message
//! (a body names patients): the message says what shape was expected.

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::Json;
use serde::de::DeserializeOwned;

/// A request body's expected shape, as the 400 answer to a body that does not match says it.
pub(crate) trait BodyShape {
    /// The fields, e.g. `{"reason"}`.
    const SHAPE: &'static str;
}

/// A JSON body of type `T`; anything else is a 400 that shows `T`'s shape.
pub(crate) struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned + BodyShape,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(body)) => Ok(ApiJson(body)),
            Err(_) => Err(ApiError::BadRequest(format!(
                "the body must be JSON: {}",
                T::SHAPE
            ))),
        }
    }
}

/// A query string of type `T` (whose fields are documented as the route's parameters); an
/// unknown or malformed parameter is a 400 naming the parameters there are.
pub(crate) struct ApiQuery<T>(pub T);

/// The parameters a query type accepts, for the 400 answer to a query that does not parse.
pub(crate) trait QueryShape {
    /// The parameters, comma-separated.
    const PARAMETERS: &'static str;
}

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + QueryShape,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(ApiQuery(query)),
            Err(_) => Err(ApiError::BadRequest(format!(
                "unknown or malformed query parameter: {}",
                T::PARAMETERS
            ))),
        }
    }
}
