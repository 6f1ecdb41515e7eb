//! SMART Backend Services (SMART App Launch 2.0, "client-confidential-asymmetric"): Strata's own
//! token endpoint for system clients that run FHIR Bulk Data exports.
//!
//! A client is registered in `[api.smart.clients.<id>]` with its public keys (a JWKS) and the
//! export profile (and study) its exports follow. It signs a short-lived JWT assertion (RS384 or
//! ES384; `iss` = `sub` = its id, `aud` = this token endpoint, `exp` at most five minutes away,
//! a `jti` never used before) and exchanges it for an access token of `system/...` scopes.
//! Replayed, expired, wrongly addressed or wrongly signed assertions are refused; every `jti` is
//! remembered in the control database (so a replay is caught after a restart, and by every
//! replica). Access tokens are HS256 under a key of Strata's own, valid for five minutes.

use crate::auth::{Principal, Role};
use crate::config::{hex_key, SmartClient, SmartConfig};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// The `iss` of the access tokens Strata issues.
const ISSUER: &str = "strata:smart-backend-services";
/// Their `aud`.
const AUDIENCE: &str = "strata:fhir-bulk-data";
/// The longest an assertion may live, in seconds (SMART: "no more than five minutes").
const MAX_ASSERTION_SECS: i64 = 300;
/// Clock skew allowed for assertions, in seconds.
const LEEWAY_SECS: u64 = 5;
/// The assertion type SMART Backend Services uses.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A registered client: its keys and what its exports follow.
struct Client {
    config: SmartClient,
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
}

/// The token endpoint's clients and key.
#[derive(Clone)]
pub struct Smart {
    clients: Arc<BTreeMap<String, Client>>,
    key: Arc<Vec<u8>>,
    ttl: u64,
}

impl std::fmt::Debug for Smart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smart")
            .field("clients", &self.clients.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Claims of an access token Strata issues.
#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    aud: String,
    sub: String,
    exp: i64,
    iat: i64,
    scope: String,
}

/// Claims of a client's assertion (`iss`, `sub`, `aud` and `exp` are checked by the validation).
#[derive(Debug, Deserialize)]
struct AssertionClaims {
    exp: i64,
    jti: String,
}

/// The JWKS keys a client may sign with: RSA keys verify RS384, P-384 keys ES384.
fn client_keys(text: &str) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS384,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
                Algorithm::ES384
            }
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a key of the JWKS: {e}"))?;
        keys.push((jwk.common.key_id.clone(), algorithm, key));
    }
    if keys.is_empty() {
        return Err("no RSA or P-384 key in the JWKS".into());
    }
    Ok(keys)
}

/// Whether `granted` (a client's allowed scope) covers `asked`: `system/*.read` covers
/// `system/Observation.read`; `.read` and SMART v2's `.rs` are the same here.
fn covers(granted: &str, asked: &str) -> bool {
    let split = |s: &str| -> Option<(String, String)> {
        let rest = s.strip_prefix("system/")?;
        let (resource, access) = rest.rsplit_once('.')?;
        let access = match access {
            "read" | "rs" | "r" | "s" => "read",
            "*" | "cruds" => "all",
            _ => return None,
        };
        Some((resource.to_string(), access.to_string()))
    };
    match (split(granted), split(asked)) {
        (Some((gr, ga)), Some((ar, aa))) => {
            (gr == "*" || gr == ar) && (ga == aa || ga == "all") && aa == "read"
        }
        _ => false,
    }
}

/// Whether `scopes` let a system client read resources of `resource_type`.
pub(crate) fn may_read(scopes: &[String], resource_type: &str) -> bool {
    scopes
        .iter()
        .any(|s| covers(s, &format!("system/{resource_type}.read")))
}

impl Smart {
    /// The token endpoint of `[api.smart]` (`base` resolves relative files); every problem.
    pub fn from_config(config: &SmartConfig, base: &Path) -> Result<Self, String> {
        let mut problems = Vec::new();
        let key = match (&config.token_key_file, &config.token_key_env) {
            (None, None) => rand::random::<[u8; 32]>().to_vec(),
            (file, env) => hex_key(
                file.as_ref(),
                env.as_ref(),
                base,
                "[api.smart]",
                "token_key",
            )
            .unwrap_or_else(|e| {
                problems.push(e);
                Vec::new()
            }),
        };
        let mut clients = BTreeMap::new();
        for (id, c) in &config.clients {
            let at = format!("[api.smart.clients.{id}]");
            let keys = std::fs::read_to_string(base.join(&c.jwks_file))
                .map_err(|e| format!("{at} jwks_file {}: {e}", c.jwks_file))
                .and_then(|t| client_keys(&t).map_err(|e| format!("{at} jwks_file: {e}")));
            for s in &c.scopes {
                if !s.starts_with("system/") {
                    problems.push(format!("{at} scopes: {s:?} is not a system/... scope"));
                }
            }
            match keys {
                Ok(keys) => {
                    clients.insert(
                        id.clone(),
                        Client {
                            config: c.clone(),
                            keys,
                        },
                    );
                }
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Smart {
            clients: Arc::new(clients),
            key: Arc::new(key),
            ttl: config.access_token_secs.clamp(30, 3600),
        })
    }

    /// A registered client's settings.
    pub(crate) fn client(&self, id: &str) -> Option<&SmartClient> {
        self.clients.get(id).map(|c| &c.config)
    }

    /// The principal of an access token this endpoint issued (None for any other token).
    pub fn verify_access(&self, token: &str) -> Option<Principal> {
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        let claims = decode::<AccessClaims>(token, &DecodingKey::from_secret(&self.key), &v)
            .ok()?
            .claims;
        self.clients.get(&claims.sub)?;
        Some(Principal {
            user: format!("system:{}", claims.sub),
            roles: vec![Role::System],
            patients: Vec::new(),
            scopes: claims
                .scope
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        })
    }

    fn issue(&self, client: &str, scope: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: client.into(),
            exp: now + self.ttl as i64,
            iat: now,
            scope: scope.into(),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.key),
        )
        .expect("HS256 tokens encode")
    }
}

/// The client id of a system principal (one whose token Strata's token endpoint issued).
pub(crate) fn client_id(principal: &Principal) -> Option<&str> {
    if !principal.roles.contains(&Role::System) {
        return None;
    }
    principal.user.strip_prefix("system:")
}

/// The base URL clients reach this server at: `[api] public_url`, or (development, without
/// system clients) the request's host (HTTP/1.1 `Host`, or HTTP/2's authority).
pub(crate) fn base_url(state: &AppState, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(url) = &state.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    let scheme = if state.plain_http { "http" } else { "https" };
    format!("{scheme}://{host}")
}

/// An OAuth 2.0 error answer (RFC 6749 section 5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// `GET /.well-known/smart-configuration`: where the token endpoint is and what it accepts.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "bulk data", security(()),
    responses((status = 200, description = "SMART configuration: token_endpoint, token_endpoint_auth_methods_supported (private_key_jwt), signing algorithms (RS384, ES384), scopes", body = Object)))]
pub(crate) async fn configuration(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let base = base_url(&state, &headers, &uri);
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}/auth/token"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/*.read", "system/*.rs"],
        "capabilities": ["client-confidential-asymmetric"],
    }))
    .into_response()
}

/// The form of a token request (SMART Backend Services).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct TokenRequest {
    /// client_credentials
    grant_type: String,
    /// Space-separated system/... scopes
    scope: String,
    /// urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    client_assertion_type: String,
    /// The signed JWT assertion (RS384 or ES384)
    client_assertion: String,
}

/// `POST /auth/token`: a client assertion for an access token.
#[utoipa::path(post, path = "/auth/token", tag = "bulk data", security(()),
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "access_token, token_type (bearer), expires_in, scope", body = Object),
        (status = 400, description = "invalid_request, unsupported_grant_type or invalid_scope", body = Object),
        (status = 401, description = "invalid_client: unknown client, bad signature, expired, too long-lived, misaddressed or replayed assertion", body = Object)))]
pub(crate) async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let refused = |error: &str, description: &str| {
        let status = if error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        crate::audit::noted(
            oauth_error(status, error, description),
            crate::audit::AuditNote {
                access: None,
                detail: json!({ "refused": error }),
            },
        )
    };
    let Some(smart) = state.smart.clone() else {
        return refused(
            "invalid_client",
            "no system clients are registered on this server",
        );
    };
    let Ok(Form(form)) = form else {
        return refused(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    };
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return refused(
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    if field("client_assertion_type") != JWT_BEARER {
        return refused(
            "invalid_request",
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        );
    }
    let assertion = field("client_assertion");
    let Ok(header) = decode_header(assertion) else {
        return refused("invalid_client", "client_assertion is not a JWT");
    };
    // The client is named by the assertion's (unverified) issuer; its keys then verify it.
    let unverified_iss = assertion
        .split('.')
        .nth(1)
        .and_then(|p| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c["iss"].as_str().map(str::to_string))
        .unwrap_or_default();
    let Some(client) = smart.clients.get(&unverified_iss) else {
        return refused(
            "invalid_client",
            "the assertion's issuer is not a registered client",
        );
    };
    let token_url = format!("{}/auth/token", base_url(&state, &headers, &uri));
    let mut verified = None;
    for (kid, algorithm, key) in &client.keys {
        if *algorithm != header.alg || (header.kid.is_some() && kid.is_some() && header.kid != *kid)
        {
            continue;
        }
        let mut v = jsonwebtoken::Validation::new(*algorithm);
        v.set_issuer(&[unverified_iss.as_str()]);
        v.sub = Some(unverified_iss.clone());
        v.set_audience(&[token_url.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        v.leeway = LEEWAY_SECS;
        match decode::<AssertionClaims>(assertion, key, &v) {
            Ok(data) => {
                verified = Some(data.claims);
                break;
            }
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                continue
            }
            Err(e) => {
                return refused(
                    "invalid_client",
                    &format!("the assertion is not valid: {e}"),
                );
            }
        }
    }
    let Some(claims) = verified else {
        return refused("invalid_client", "the assertion's signature does not verify with the client's registered keys (RS384 or ES384)");
    };
    let now = chrono::Utc::now().timestamp();
    if claims.exp > now + MAX_ASSERTION_SECS + LEEWAY_SECS as i64 {
        return refused(
            "invalid_client",
            "the assertion lives longer than five minutes",
        );
    }
    if claims.jti.is_empty() {
        return refused("invalid_client", "the assertion has no jti");
    }
    match state
        .control
        .remember_assertion(&unverified_iss, &claims.jti, claims.exp)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return refused(
                "invalid_client",
                "the assertion was used before (replayed jti)",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "client assertion not recorded");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    }
    let asked: Vec<&str> = field("scope").split_whitespace().collect();
    if asked.is_empty() {
        return refused("invalid_scope", "ask for a scope, such as system/*.read");
    }
    if let Some(s) = asked
        .iter()
        .find(|s| !client.config.scopes.iter().any(|g| covers(g, s)))
    {
        return refused(
            "invalid_scope",
            &format!(
                "{s:?} is not among the scopes this client may be granted (system/... read scopes)"
            ),
        );
    }
    let scope = asked.join(" ");
    let access_token = smart.issue(&unverified_iss, &scope);
    let mut response = (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": smart.ttl,
            "scope": scope,
        })),
    )
        .into_response();
    response.extensions_mut().insert(Principal {
        user: format!("system:{unverified_iss}"),
        roles: vec![Role::System],
        patients: Vec::new(),
        scopes: asked.iter().map(|s| s.to_string()).collect(),
    });
    crate::audit::noted(
        response,
        crate::audit::AuditNote {
            access: None,
            detail: json!({ "client": unverified_iss, "scope": scope }),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_read_scopes_cover_their_resources() {
        assert!(covers("system/*.read", "system/Observation.read"));
        assert!(covers("system/*.rs", "system/Observation.read"));
        assert!(covers("system/Observation.read", "system/Observation.rs"));
        assert!(!covers("system/Observation.read", "system/Condition.read"));
        assert!(!covers("system/*.read", "user/*.read"));
        assert!(!covers("system/*.read", "system/*.write"));
        assert!(may_read(&["system/Patient.read".into()], "Patient"));
        assert!(!may_read(&["system/Patient.read".into()], "Observation"));
    }
}
