//! Browser sessions: the cookie, the session it names in the control database, the CSRF token
//! every form carries, and the same-origin check on state changes.
//!
//! A session id is 256 random bits, sent only in the cookie and stored only as its SHA-256.
//! A sign-in always makes a new id (and ends the session the browser held before): an id
//! planted in a browser before sign-in never becomes a signed-in session (session fixation).

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The kind of record a signed-in session is, in the control database.
const KIND: &str = "session";

/// What a session holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionData {
    /// The user (the ID token's `sub`, or the name typed at a development sign-in).
    pub user: String,
    /// Their roles.
    pub roles: Vec<Role>,
    /// Patients in their care (legacy keys): the launch context's patient, or those named.
    #[serde(default)]
    pub patients: Vec<String>,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The purpose of use chosen for the session.
    #[serde(default)]
    pub purpose: Option<String>,
    /// Patients outside the user's care read by breaking the glass, with the reason given.
    #[serde(default)]
    pub break_glass: BTreeMap<String, String>,
    /// How the user signed in: `development` or `openid`.
    pub how: String,
    /// The user's FHIR resource (`Practitioner/123`), from the ID token's `fhirUser`.
    #[serde(default)]
    pub fhir_user: Option<String>,
}

/// A signed-in session, put in a request's extensions by [`signed_in`].
#[derive(Debug, Clone)]
pub(crate) struct Session {
    id_hash: String,
    /// What it holds.
    pub data: SessionData,
}

impl Session {
    /// The session's user as the API's handlers know callers.
    pub fn principal(&self) -> Principal {
        Self::principal_of(&self.data)
    }

    /// The user of a session holding `data`.
    pub fn principal_of(data: &SessionData) -> Principal {
        Principal {
            user: data.user.clone(),
            roles: data.roles.clone(),
            patients: data.patients.clone(),
            scopes: Vec::new(),
        }
    }

    /// A session holding `data` that no store knows (for rendering in tests).
    #[cfg(test)]
    pub fn for_tests(data: SessionData) -> Self {
        Session {
            id_hash: String::new(),
            data,
        }
    }

    /// Stores what the session holds now.
    pub async fn save(&self, state: &AppState) -> Result<(), ApiError> {
        let data =
            serde_json::to_value(&self.data).map_err(|e| ApiError::Internal(e.to_string()))?;
        state.control.update_session(&self.id_hash, &data).await?;
        Ok(())
    }

    /// Fails with 403 unless `token` is this session's CSRF token (compared in constant time).
    pub fn check_csrf(&self, token: &str) -> Result<(), ApiError> {
        if same_secret(token, &self.data.csrf) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// Ends the session.
    pub async fn end(&self, state: &AppState) -> Result<(), ApiError> {
        state.control.end_session(&self.id_hash).await?;
        Ok(())
    }
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 256 random bits, base64url: a session id, a CSRF token, a state.
pub(crate) fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// How an id is stored: its SHA-256, hex.
pub(crate) fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The session cookie's name (before its prefix).
const SESSION_COOKIE: &str = "strata_session";

/// A cookie's name: `__Host-` prefixed over TLS (the browser then keeps it to this host, path
/// `/`, secure connections only: no sibling host can plant or read it).
fn full_name(state: &AppState, name: &str) -> String {
    if state.plain_http {
        name.to_string()
    } else {
        format!("__Host-{name}")
    }
}

/// A `Set-Cookie` value for cookie `name` (prefixed over TLS) = `value`, expiring with the
/// browser session (`remove`: removes it).
pub(crate) fn cookie(state: &AppState, name: &str, value: &str, remove: bool) -> HeaderValue {
    let secure = if state.plain_http { "" } else { "; Secure" };
    let age = if remove { "; Max-Age=0" } else { "" };
    let name = full_name(state, name);
    let text = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}{age}");
    HeaderValue::from_str(&text).expect("cookie values are base64url")
}

/// The value of cookie `name` (prefixed over TLS) in a request's headers.
pub(crate) fn cookie_value<'a>(
    state: &AppState,
    headers: &'a HeaderMap,
    name: &str,
) -> Option<&'a str> {
    named_value(headers, &full_name(state, name))
}

/// The value of the cookie named exactly `name`.
fn named_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// Seconds since the epoch.
fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Begins a session holding `data` for the browser whose request had `headers` (ending the
/// session it held before, if any); returns the `Set-Cookie` value that gives it the new id.
pub(crate) async fn begin(
    state: &AppState,
    headers: &HeaderMap,
    data: &SessionData,
) -> Result<HeaderValue, ApiError> {
    if let Some(old) = cookie_value(state, headers, SESSION_COOKIE) {
        state.control.end_session(&id_hash(old)).await?;
    }
    sweep(state).await?;
    let id = random_token();
    let value = serde_json::to_value(data).map_err(|e| ApiError::Internal(e.to_string()))?;
    state
        .control
        .put_session(&id_hash(&id), KIND, &value, now())
        .await?;
    Ok(cookie(state, SESSION_COOKIE, &id, false))
}

/// Ends every session (and sign-in under way) idle past its time: what they hold (patient
/// keys, reasons given) does not outlive them in the control database. Run at each sign-in.
pub(crate) async fn sweep(state: &AppState) -> Result<(), ApiError> {
    let longest = (state.viewer.idle_secs as i64).max(super::openid::SIGN_IN_SECS);
    state.control.end_idle_sessions(now() - longest).await?;
    Ok(())
}

/// The `Set-Cookie` value that removes the session cookie.
pub(crate) fn removal(state: &AppState) -> HeaderValue {
    cookie(state, SESSION_COOKIE, "", true)
}

/// The signed-in session a request's cookie names, if it has not idled out.
async fn current(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(id) = cookie_value(state, headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let hash = id_hash(id);
    let t = now();
    let idle_since = t - state.viewer.idle_secs as i64;
    let Some(stored) = state
        .control
        .use_session(&hash, KIND, idle_since, t)
        .await?
    else {
        return Ok(None);
    };
    let data: SessionData = serde_json::from_value(stored.data)
        .map_err(|e| ApiError::Internal(format!("a stored session: {e}")))?;
    Ok(Some(Session {
        id_hash: hash,
        data,
    }))
}

/// A path of the viewer to come back to after sign-in (anything else goes to its start).
pub(crate) fn local_path(next: &str) -> String {
    let ok = (next == "/ui" || next.starts_with("/ui/") || next.starts_with("/ui?"))
        && !next.contains('\\')
        && next.chars().all(|c| c.is_ascii_graphic());
    if ok {
        next.to_string()
    } else {
        "/ui/".to_string()
    }
}

/// The layer of the pages that need a signed-in session: without one, a page asks to sign in
/// (a GET comes back to where it was going); with one, its user is the request's caller (and
/// the response's, for the audit layer).
pub(crate) async fn signed_in(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    match current(&state, request.headers()).await {
        Ok(Some(session)) => {
            let principal = session.principal();
            request.extensions_mut().insert(principal.clone());
            request.extensions_mut().insert(session);
            let mut response = next.run(request).await;
            response.extensions_mut().insert(principal);
            response
        }
        Ok(None) => {
            let back = request
                .uri()
                .path_and_query()
                .map_or("/ui/", |p| p.as_str());
            let mut response = if request.method() == Method::GET {
                let to = format!(
                    "/ui/sign-in?next={}",
                    percent_encoding::utf8_percent_encode(
                        &local_path(back),
                        percent_encoding::NON_ALPHANUMERIC
                    )
                );
                Redirect::to(&to).into_response()
            } else {
                super::pages::message(
                    StatusCode::UNAUTHORIZED,
                    "Signed out",
                    "Your session has ended. Sign in again.",
                )
            };
            // A cookie naming no live session is removed.
            if cookie_value(&state, request.headers(), SESSION_COOKIE).is_some() {
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, removal(&state));
            }
            response
        }
        Err(e) => super::pages::PageError(e).into_response(),
    }
}

/// The layer refusing a state change (any method but GET and HEAD) that a browser says comes
/// from another site: its `Origin` (or, without one, `Sec-Fetch-Site`) must be this server's.
/// A client that sends neither is not a browser acting for someone else; the CSRF token
/// still guards every form.
pub(crate) async fn same_origin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe && !from_this_origin(&state, request.headers(), request.uri()) {
        return super::pages::message(
            StatusCode::FORBIDDEN,
            "Refused",
            "This request came from another site and was refused.",
        );
    }
    next.run(request).await
}

fn from_this_origin(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    // `Origin: null` (a privacy-sensitive context) says nothing: `Sec-Fetch-Site` decides.
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| *o != "null");
    if let Some(origin) = origin {
        // This server as clients reach it: `[api] public_url`, else the request's host (its
        // `Host` header, or over HTTP/2 its `:authority`).
        return origin.eq_ignore_ascii_case(&crate::smart::base_url(state, headers, uri));
    }
    match headers.get("sec-fetch-site").and_then(|o| o.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_the_viewer_are_gone_back_to() {
        assert_eq!(
            local_path("/ui/patients/P1?from=2020-01-01"),
            "/ui/patients/P1?from=2020-01-01"
        );
        for elsewhere in [
            "/ui/\n",
            "/ui/%0A\r",
            "https://evil.example/ui",
            "//evil.example/ui",
            "/v1/audit",
            "/ui\\@evil",
            "",
        ] {
            assert_eq!(local_path(elsewhere), "/ui/", "{elsewhere}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn a_cookie_is_read_by_its_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; strata_session=xyz; strata_session2=no"
                .parse()
                .unwrap(),
        );
        assert_eq!(named_value(&h, "strata_session"), Some("xyz"));
        assert_eq!(named_value(&h, "strata"), None);
    }
}
