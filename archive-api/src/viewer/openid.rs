//! Sign-in through the hospital's OpenID provider, as a SMART App Launch 2.0 client: the EHR
//! launch (`launch` + `iss`) and the standalone launch, authorization code with PKCE (S256),
//! the ID token verified against the provider's published keys, the launch's `patient` taken
//! from the token response and found among legacy patients ([`super::cross_reference`]).
//!
//! The request under way (state, nonce, PKCE verifier, where to go after) is kept in the
//! control database under the SHA-256 of its `state`, bound to the browser that started it by
//! a cookie: a callback from another browser, a replayed or forged `state`, finds nothing.

use super::pages::PageError;
use super::session::{self, local_path, SessionData};
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::config::OpenIdConfig;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::RwLock;

/// The kind of record a sign-in under way is, in the control database.
const KIND: &str = "sign-in";
/// The cookie binding a sign-in under way to its browser.
const BINDING_COOKIE: &str = "strata_launch";
/// Seconds a sign-in may take at the provider.
pub(crate) const SIGN_IN_SECS: i64 = 600;

/// What the provider's discovery document says (the parts Strata uses).
#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// The provider: its config, and its discovery document and keys once fetched.
#[derive(Clone)]
pub struct OpenId {
    config: OpenIdConfig,
    http: reqwest::Client,
    discovered: Arc<RwLock<Option<(Discovery, JwkSet)>>>,
}

impl std::fmt::Debug for OpenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenId")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

fn internal(what: &str) -> impl Fn(reqwest::Error) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("openid provider: {what}: {e}"))
}

impl OpenId {
    /// The client of `config`'s provider (nothing is fetched until the first sign-in).
    pub fn new(config: OpenIdConfig) -> Result<Self, String> {
        if config
            .client_secret_env
            .as_ref()
            .is_some_and(|v| std::env::var(v).is_err())
        {
            return Err(format!(
                "[api.viewer.openid] client_secret_env: {} is not set",
                config.client_secret_env.as_deref().unwrap_or("")
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("[api.viewer.openid]: {e}"))?;
        Ok(OpenId {
            config,
            http,
            discovered: Arc::new(RwLock::new(None)),
        })
    }

    /// The discovery document and keys: fetched once, and again when `refresh` (a token signed
    /// by a key not known yet: the provider rotated its keys).
    async fn discovery(&self, refresh: bool) -> Result<(Discovery, JwkSet), ApiError> {
        if !refresh {
            if let Some(d) = self.discovered.read().await.as_ref() {
                return Ok(d.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let d: Discovery = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(internal("discovery"))?
            .json()
            .await
            .map_err(internal("discovery"))?;
        if d.issuer.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(ApiError::Internal(
                "openid provider: its discovery document names another issuer".into(),
            ));
        }
        let keys: JwkSet = self
            .http
            .get(&d.jwks_uri)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(internal("keys"))?
            .json()
            .await
            .map_err(internal("keys"))?;
        *self.discovered.write().await = Some((d.clone(), keys.clone()));
        Ok((d, keys))
    }

    /// Strata's roles named by the ID token's roles claim.
    fn roles(&self, claims: &Value) -> Vec<Role> {
        let names: Vec<String> = match claims.get(&self.config.roles_claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => s
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut roles: Vec<Role> = names
            .iter()
            .filter_map(|n| {
                let name = self.config.role_names.get(n).unwrap_or(n);
                serde_json::from_value::<Role>(json!(name)).ok()
            })
            .filter(|r| *r != Role::System)
            .collect();
        roles.sort_by_key(|r| r.as_str());
        roles.dedup();
        roles
    }
}

/// What a sign-in under way keeps until its callback.
#[derive(Debug, serde::Serialize, Deserialize)]
struct Pending {
    nonce: String,
    verifier: String,
    /// The value of the binding cookie.
    browser: String,
    /// The EHR launch's `launch`, if it was one.
    launch: Option<String>,
    next: String,
}

/// Query of `GET /ui/launch`.
#[derive(Debug, Deserialize)]
pub(crate) struct LaunchQuery {
    /// The EHR's FHIR base (an EHR launch).
    #[serde(default)]
    iss: Option<String>,
    /// The EHR's launch context id (an EHR launch).
    #[serde(default)]
    launch: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

/// This server's FHIR base, as clients reach it.
fn fhir_base(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    format!("{}/fhir", crate::smart::base_url(state, headers, uri))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /ui/launch`: starts a sign-in at the provider — an EHR launch with `iss` and
/// `launch`, or a standalone launch without them.
pub(crate) async fn launch(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<LaunchQuery>,
) -> Result<Response, PageError> {
    let Some(openid) = state.viewer.openid.clone() else {
        return Err(ApiError::NotFound.into());
    };
    let base = fhir_base(&state, &headers, &uri);
    let aud = match (&q.iss, &q.launch) {
        (Some(iss), Some(_)) => {
            let iss = iss.trim_end_matches('/');
            let known = iss == base
                || openid
                    .config
                    .launch_issuers
                    .iter()
                    .any(|i| i.trim_end_matches('/') == iss);
            if !known {
                return Err(ApiError::BadRequest(
                    "this EHR (iss) is not one Strata is configured for: [api.viewer.openid] launch_issuers".into(),
                )
                .into());
            }
            iss.to_string()
        }
        (None, None) => base.clone(),
        _ => {
            return Err(
                ApiError::BadRequest("an EHR launch gives both iss and launch".into()).into(),
            )
        }
    };
    let (discovery, _) = openid.discovery(false).await?;
    let state_token = session::random_token();
    let pending = Pending {
        nonce: session::random_token(),
        verifier: session::random_token(),
        browser: session::random_token(),
        launch: q.launch.clone(),
        next: local_path(q.next.as_deref().unwrap_or("/ui/")),
    };
    let challenge = b64(&Sha256::digest(pending.verifier.as_bytes()));
    let mut scopes = openid.config.scopes.clone();
    if q.launch.is_some() && !scopes.split(' ').any(|s| s == "launch") {
        scopes.push_str(" launch");
    }
    let redirect_uri = format!("{}/ui/callback", base.trim_end_matches("/fhir"));
    let mut url = reqwest::Url::parse(&discovery.authorization_endpoint)
        .map_err(|e| ApiError::Internal(format!("openid provider: authorization endpoint: {e}")))?;
    {
        let mut p = url.query_pairs_mut();
        p.append_pair("response_type", "code")
            .append_pair("client_id", &openid.config.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &scopes)
            .append_pair("state", &state_token)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("aud", &aud);
        if let Some(l) = &q.launch {
            p.append_pair("launch", l);
        }
    }
    let value = serde_json::to_value(&pending).map_err(|e| ApiError::Internal(e.to_string()))?;
    session::sweep(&state).await?;
    state
        .control
        .put_session(
            &session::id_hash(&state_token),
            KIND,
            &value,
            chrono::Utc::now().timestamp(),
        )
        .await?;
    let mut response = Redirect::to(url.as_str()).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::cookie(&state, BINDING_COOKIE, &pending.browser, false),
    );
    Ok(noted(
        response,
        AuditNote {
            access: None,
            detail: json!({ "sign_in": "openid", "launch": if q.launch.is_some() { "ehr" } else { "standalone" } }),
        },
    ))
}

/// Query of `GET /ui/callback`.
#[derive(Debug, Deserialize)]
pub(crate) struct Callback {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// The token response's parts Strata reads.
#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: String,
    /// SMART: the patient in context (the EHR's id).
    #[serde(default)]
    patient: Option<String>,
}

/// `GET /ui/callback`: the provider's answer. Exchanges the code (with the PKCE verifier),
/// verifies the ID token (signature by a published key, issuer, audience, expiry, nonce),
/// finds the launch's patient among legacy patients, and begins the session.
pub(crate) async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(q): Query<Callback>,
) -> Result<Response, PageError> {
    let Some(openid) = state.viewer.openid.clone() else {
        return Err(ApiError::NotFound.into());
    };
    let refused = || PageError(ApiError::Forbidden);
    let state_token = q.state.ok_or_else(refused)?;
    let hash = session::id_hash(&state_token);
    let now = chrono::Utc::now().timestamp();
    let stored = state
        .control
        .use_session(&hash, KIND, now - SIGN_IN_SECS, now)
        .await?
        .ok_or_else(refused)?;
    // One use: a replayed callback finds nothing.
    state.control.end_session(&hash).await?;
    let pending: Pending = serde_json::from_value(stored.data).map_err(|_| refused())?;
    let browser = session::cookie_value(&state, &headers, BINDING_COOKIE).unwrap_or_default();
    if !session::same_secret(browser, &pending.browser) {
        return Err(refused());
    }
    if let Some(e) = q.error {
        // The provider's error code only (its description may echo anything).
        let code: String = e
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(40)
            .collect();
        return Err(ApiError::BadRequest(format!(
            "the identity provider refused the sign-in ({code})"
        ))
        .into());
    }
    let code = q.code.ok_or_else(refused)?;
    let base = fhir_base(&state, &headers, &uri);
    let redirect_uri = format!("{}/ui/callback", base.trim_end_matches("/fhir"));
    let (discovery, _) = openid.discovery(false).await?;
    let mut request = openid.http.post(&discovery.token_endpoint).form(&[
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", redirect_uri.as_str()),
        ("code_verifier", pending.verifier.as_str()),
        ("client_id", openid.config.client_id.as_str()),
    ]);
    if let Some(var) = &openid.config.client_secret_env {
        let secret = std::env::var(var).unwrap_or_default();
        request = request.basic_auth(&openid.config.client_id, Some(secret));
    }
    let answer = request.send().await.map_err(internal("token request"))?;
    if !answer.status().is_success() {
        tracing::warn!(
            status = answer.status().as_u16(),
            "openid provider refused the code"
        );
        return Err(refused());
    }
    let tokens: TokenResponse = answer.json().await.map_err(internal("token response"))?;
    let claims = verify_id_token(&openid, &tokens.id_token, &pending.nonce).await?;
    let user = claims["sub"].as_str().unwrap_or("").to_string();
    if user.trim().is_empty()
        || user.starts_with("system:")
        || user.chars().any(crate::access::is_hidden)
    {
        return Err(refused());
    }
    let roles = openid.roles(&claims);
    if roles.is_empty() {
        return Err(PageError(ApiError::Forbidden));
    }
    // The patient in context counts as in the user's care only in an EHR launch: the EHR
    // chose them. A standalone launch's patient (a picker at the provider) is not taken.
    let patient = match (&pending.launch, &tokens.patient) {
        (Some(_), Some(ehr_id)) => Some(
            super::cross_reference::legacy_key(&state, ehr_id)
                .await?
                .ok_or(ApiError::NotFound)?,
        ),
        _ => None,
    };
    let data = SessionData {
        user: user.clone(),
        roles,
        patients: patient.iter().cloned().collect(),
        csrf: session::random_token(),
        purpose: None,
        break_glass: Default::default(),
        how: "openid".into(),
        fhir_user: claims["fhirUser"].as_str().map(str::to_string),
    };
    let set = session::begin(&state, &headers, &data).await?;
    let to = match (&pending.launch, &patient) {
        (Some(_), Some(p)) => format!(
            "/ui/patients/{}",
            percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC)
        ),
        _ => pending.next.clone(),
    };
    let mut response = Redirect::to(&to).into_response();
    response.headers_mut().append(header::SET_COOKIE, set);
    response.headers_mut().append(
        header::SET_COOKIE,
        session::cookie(&state, BINDING_COOKIE, "", true),
    );
    response
        .extensions_mut()
        .insert(session::Session::principal_of(&data));
    if let Some(p) = &patient {
        response
            .extensions_mut()
            .insert(crate::audit::AuditedPatient(p.clone()));
    }
    Ok(noted(
        response,
        AuditNote {
            access: None,
            detail: json!({
                "sign_in": "openid",
                "launch": if pending.launch.is_some() { "ehr" } else { "standalone" },
                "fhir_user": data.fhir_user,
                "patient_in_context": patient.is_some(),
            }),
        },
    ))
}

/// The claims of an ID token the provider signed for this client and this sign-in.
async fn verify_id_token(openid: &OpenId, token: &str, nonce: &str) -> Result<Value, PageError> {
    let refused = || PageError(ApiError::Forbidden);
    let header = decode_header(token).map_err(|_| refused())?;
    // Signed with the provider's published (public) keys only: no shared-secret algorithm,
    // whatever the token's header says.
    use jsonwebtoken::Algorithm::*;
    if !matches!(
        header.alg,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384
    ) {
        return Err(refused());
    }
    for refresh in [false, true] {
        let (discovery, keys) = openid.discovery(refresh).await?;
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None => keys.keys.first(),
        };
        let Some(jwk) = jwk else {
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|_| refused())?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[discovery.issuer.as_str()]);
        v.set_audience(&[openid.config.client_id.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 60;
        let data = decode::<Value>(token, &key, &v).map_err(|e| {
            tracing::warn!(error = %e, "an ID token was refused");
            refused()
        })?;
        if data.claims["nonce"].as_str() != Some(nonce) {
            return Err(refused());
        }
        return Ok(data.claims);
    }
    Err(refused())
}
