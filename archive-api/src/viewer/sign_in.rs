//! Signing in and out: the sign-in page, and the development sign-in (the demo's one click,
//! loopback only).

use super::pages::{render, Frame, PageError};
use super::session::{self, local_path, Session, SessionData};
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::server::ClientAddress;
use crate::state::AppState;
use askama::Template;
use axum::extract::{ConnectInfo, Extension, Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;

/// The cookie holding the development sign-in form's CSRF token (there is no session yet).
const SIGN_IN_COOKIE: &str = "strata_sign_in";

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    frame: Frame,
    next: String,
    openid: bool,
    development: bool,
    csrf: String,
    patients: String,
    notice: Option<String>,
}

/// Query of `GET /ui/sign-in`.
#[derive(Debug, Deserialize)]
pub(crate) struct SignInQuery {
    #[serde(default)]
    next: Option<String>,
    /// Patients to offer as in the development user's care (the demo's link names one).
    #[serde(default)]
    patients: Option<String>,
    #[serde(default)]
    ended: Option<String>,
}

/// Whether the request comes from this computer (the development sign-in's condition, as
/// plain HTTP's is the server's address): its client address, as the server loop or a
/// trusted proxy gave it, is loopback. A request with no known address is not.
pub(crate) struct FromLoopback(bool);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for FromLoopback {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let address = parts
            .extensions
            .get::<ClientAddress>()
            .map(|c| c.0)
            .or_else(|| {
                parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip())
            });
        // The name the browser used must be this computer's too: a page elsewhere that
        // rebinds its own name to 127.0.0.1 (DNS rebinding) is not let in.
        let host = parts
            .headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        Ok(FromLoopback(
            address.is_some_and(|a| a.is_loopback()) && loopback_name(host),
        ))
    }
}

/// Whether `host` (a Host header: name or address, with or without a port) names this
/// computer: `localhost` or a loopback address.
fn loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_this_computers_names_are_loopback() {
        for host in [
            "127.0.0.1:8443",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8443",
            "127.9.9.9",
        ] {
            assert!(super::loopback_name(host), "{host}");
        }
        for host in [
            "evil.example:8443",
            "10.0.0.1",
            "[2001:db8::1]:1",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!super::loopback_name(host), "{host}");
        }
    }
}

/// `GET /ui/sign-in`: the ways to sign in this server offers.
pub(crate) async fn page(
    State(state): State<AppState>,
    Query(q): Query<SignInQuery>,
    FromLoopback(local): FromLoopback,
) -> Response {
    let development = state.viewer.dev_sign_in && local;
    let csrf = session::random_token();
    let mut response = render(
        StatusCode::OK,
        &SignInPage {
            frame: Frame::anonymous("Sign in"),
            next: local_path(q.next.as_deref().unwrap_or("/ui/")),
            openid: state.viewer.openid.is_some(),
            development,
            csrf: csrf.clone(),
            patients: q.patients.unwrap_or_default(),
            notice: q.ended.map(|_| "You are signed out.".to_string()),
        },
    );
    if development {
        response.headers_mut().insert(
            header::SET_COOKIE,
            session::cookie(&state, SIGN_IN_COOKIE, &csrf, false),
        );
    }
    response
}

/// Form of `POST /ui/dev-sign-in`.
#[derive(Debug, Deserialize)]
pub(crate) struct DevSignIn {
    csrf: String,
    role: String,
    user: String,
    #[serde(default)]
    patients: String,
    #[serde(default)]
    next: String,
}

/// `POST /ui/dev-sign-in`: signs in as the user and role chosen — only when `[api.viewer]
/// dev_sign_in` is set, the server listens on loopback (checked at start) and the browser is
/// on this computer.
pub(crate) async fn development(
    State(state): State<AppState>,
    FromLoopback(local): FromLoopback,
    headers: HeaderMap,
    Form(form): Form<DevSignIn>,
) -> Result<Response, PageError> {
    if !state.viewer.dev_sign_in || !local {
        return Err(ApiError::Forbidden.into());
    }
    let expected = session::cookie_value(&state, &headers, SIGN_IN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !session::same_secret(&form.csrf, expected) {
        return Err(ApiError::Forbidden.into());
    }
    let role: Role = serde_json::from_value(json!(form.role))
        .map_err(|_| ApiError::BadRequest("choose a role".into()))?;
    if role == Role::System {
        return Err(ApiError::Forbidden.into());
    }
    let user: String = form.user.trim().chars().take(100).collect();
    if user.is_empty() || user.chars().any(crate::access::is_hidden) || user.starts_with("system:")
    {
        return Err(ApiError::BadRequest("give a user name".into()).into());
    }
    let patients: Vec<String> = form
        .patients
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let data = SessionData {
        user: format!("dev:{user}"),
        roles: vec![role],
        patients: if role == Role::Clinician {
            patients
        } else {
            Vec::new()
        },
        csrf: session::random_token(),
        purpose: None,
        break_glass: Default::default(),
        how: "development".into(),
        fhir_user: None,
    };
    let set = session::begin(&state, &headers, &data).await?;
    let mut response = Redirect::to(&local_path(&form.next)).into_response();
    response.headers_mut().append(header::SET_COOKIE, set);
    response.headers_mut().append(
        header::SET_COOKIE,
        session::cookie(&state, SIGN_IN_COOKIE, "", true),
    );
    // Who signed in is this request's user, for the audit log.
    response
        .extensions_mut()
        .insert(session::Session::principal_of(&data));
    Ok(noted(
        response,
        AuditNote {
            access: None,
            detail: json!({ "sign_in": "development" }),
        },
    ))
}

/// Form of `POST /ui/sign-out`.
#[derive(Debug, Deserialize)]
pub(crate) struct SignOut {
    csrf: String,
}

/// `POST /ui/sign-out`: ends the session.
pub(crate) async fn sign_out(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Form(form): Form<SignOut>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    session.end(&state).await?;
    let mut response = Redirect::to("/ui/sign-in?ended=1").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::removal(&state));
    Ok(response)
}
