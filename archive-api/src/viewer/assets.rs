//! The viewer's static files, built into the binary: one stylesheet and one small script,
//! written for Strata (no third-party code; nothing is fetched from anywhere else, so the
//! viewer works on a hospital network cut off from the internet).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The files by name, with their types.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "viewer.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/viewer.css"),
    ),
    (
        "viewer.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/viewer.js"),
    ),
];

/// `GET /ui/assets/{file}`.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let Some((_, kind, bytes)) = FILES.iter().find(|(name, _, _)| *name == file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut response = (*bytes).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Revalidated after an hour: a new Strata's files show without a stale page.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}
