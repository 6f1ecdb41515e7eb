//! The archive viewer: HTML pages for clinicians, records managers and auditors, served by
//! `strata serve` on the same origin, behind the same authorization and the same audit log as
//! the JSON API.
//!
//! Pages are rendered on the server from templates ([askama]: compiled, and escaping
//! everything a page shows unless a template says otherwise, which none does) — archived text is
//! always text. The browser gets one stylesheet and one small script, both served by Strata
//! ([`assets`]); a strict Content-Security-Policy forbids inline script and every other origin.
//! Charts are SVG drawn on the server ([`trend`]): they need no script and print as they show.
//!
//! Browser users hold a session ([`session`]) instead of a bearer token: a cookie (`HttpOnly`,
//! `SameSite=Lax`, `Secure` over TLS) naming a session kept in the control database, that ends
//! after `[api.viewer] idle_timeout_minutes` unused. Every state change (a form's POST) carries
//! the session's CSRF token and, from a browser, a same-origin `Origin`. The session's user is
//! the [`Principal`](crate::Principal) the API's handlers know, so roles, purpose of use,
//! break-the-glass and the audit layer apply unchanged.

mod assets;
mod audit;
mod bars;
mod chart;
mod cross_reference;
mod openid;
mod pages;
mod records;
mod search;
mod sections;
pub(crate) mod session;
mod sign_in;
mod trend;

pub use cross_reference::ArchiveIndex;
pub use openid::OpenId;

use crate::state::AppState;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

/// The Content-Security-Policy of every page: Strata's own script and stylesheet only, no
/// inline script or style, no other origin, no framing by another site.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'";

/// Headers every viewer response carries: the policy above (pages), no caching of what may be
/// patient data, no sniffing, no referrer leaving for another site.
async fn page_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_POLICY),
        );
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Same-origin only: no address of a page (which names a patient) leaves for another
    // site, and the browser still sends this origin in `Origin` with a form (with
    // `no-referrer`, Chromium sends `Origin: null`).
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        HeaderValue::from_static("SAMEORIGIN"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=()"),
    );
    response
}

/// The viewer's routes under `/ui`: those before sign-in, and those of a signed-in session
/// (which go through `signed_in`, then `inner`: the API's rate limit and timeout).
pub(crate) fn routes(
    state: &AppState,
    inner: impl Fn(Router<AppState>) -> Router<AppState>,
) -> Router<AppState> {
    let open = Router::new()
        .route("/ui/sign-in", get(sign_in::page))
        .route("/ui/dev-sign-in", post(sign_in::development))
        .route("/ui/launch", get(openid::launch))
        .route("/ui/callback", get(openid::callback))
        .route("/ui/assets/{file}", get(assets::serve));
    let signed_in = Router::new()
        .route("/ui", get(pages::home))
        .route("/ui/", get(pages::home))
        .route("/ui/sign-out", post(sign_in::sign_out))
        .route(
            "/ui/purpose",
            get(chart::purpose_page).post(chart::choose_purpose),
        )
        .route("/ui/open", get(chart::open))
        .route("/ui/search", get(search::form).post(search::find))
        .route("/ui/patients/{patient}", get(chart::chart))
        .route(
            "/ui/patients/{patient}/break-glass",
            post(chart::break_glass),
        )
        .route(
            "/ui/patients/{patient}/documents/{document}",
            get(chart::document),
        )
        .route(
            "/ui/patients/{patient}/print",
            get(chart::print_form).post(chart::print),
        )
        .route("/ui/records", get(records::page))
        .route("/ui/records/holds", post(records::place_hold))
        .route(
            "/ui/records/destructions/{request}/decision",
            post(records::decide_destruction),
        )
        .route(
            "/ui/records/destructions/{request}/certificate",
            get(records::certificate),
        )
        .route(
            "/ui/records/holds/{hold}/release",
            post(records::release_hold),
        )
        .route("/ui/audit", get(audit::log))
        .route("/ui/audit/break-glass", get(audit::reviews))
        .route("/ui/audit/break-glass/{seq}/review", post(audit::review))
        .route("/ui/audit/disclosures", get(audit::disclosures));
    // A state change from another site is refused inside the session layer, so that the
    // refusal is audited under the session's user.
    let same_origin = middleware::from_fn_with_state(state.clone(), session::same_origin);
    let signed_in = inner(signed_in)
        .route_layer(same_origin.clone())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            session::signed_in,
        ));
    // Before sign-in: the same time limit (a rate limit needs a user; the audit layer limits
    // requests that name no one, per address).
    inner(open)
        .route_layer(same_origin)
        .merge(signed_in)
        .route_layer(middleware::from_fn(page_headers))
}
