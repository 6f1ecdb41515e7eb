//! Bearer JWT verification as a tower layer, and the caller it yields.
//!
//! Tokens are verified against the identity provider's public keys (RS256 with RSA keys,
//! ES256 with P-256 keys; from PEM files or a JWKS file) or, for development only, an HS256
//! secret. The algorithm comes from the key, never from the token alone: a token whose header
//! names another algorithm than its key's is refused (no `alg` confusion). `iss`, `aud`, `exp`
//! and `sub` are required, `nbf` is checked when present, with a configured clock skew.

use crate::config::AuthConfig;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header};
use jsonwebtoken::{errors::ErrorKind, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// A role the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the archived history and documents of patients in their care, with a purpose of
    /// use; others only by breaking the glass.
    Clinician,
    /// Exports of de-identified data; no patient lookups.
    Researcher,
    /// Policies, the plan, legal holds, run and destruction reports.
    RecordsManager,
    /// The audit log, its verification, accountings of disclosures.
    Auditor,
    /// What records managers and auditors may do; not patient data (separation of duties: a
    /// patient is read by a clinician, with a purpose).
    Admin,
    /// A system client (SMART Backend Services) with a token from Strata's own token endpoint:
    /// de-identified FHIR Bulk Data exports within its scopes, nothing else. Never taken from
    /// an identity provider's token.
    System,
}

impl Role {
    /// The role's name in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Researcher => "researcher",
            Role::RecordsManager => "records_manager",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::System => "system",
        }
    }
}

/// The claims Strata reads from a token (beyond `iss`, `aud`, `exp`, `nbf`, which the
/// validation checks).
#[derive(Debug, Clone, Deserialize)]
struct ReadClaims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    /// Patients in the caller's care (the clinician's normal scope).
    #[serde(default)]
    patients: Vec<String>,
    /// A single patient in context (as a SMART on FHIR launch gives it).
    #[serde(default)]
    patient: Option<String>,
}

/// The audit log's user for a request that named no one (no token, or one that failed).
pub(crate) const NO_USER: &str = "-";

/// Whether `sub` may name a user: not blank, not [`NO_USER`], not one of Strata's own system
/// clients (`system:`), and without control or invisible formatting characters (it goes into
/// the audit log as is, and must read there as what it is).
fn is_user_subject(sub: &str) -> bool {
    let trimmed = sub.trim();
    !trimmed.is_empty()
        && trimmed != NO_USER
        && !trimmed.starts_with("system:")
        && !sub.chars().any(crate::access::is_hidden)
}

/// Claims of a development token (see [`Auth::issue_dev_token`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Patients in the user's care.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
}

/// The authenticated caller, put in request (and response) extensions by the auth layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The user id (`sub`).
    pub user: String,
    /// The caller's roles (names Strata does not know are dropped).
    pub roles: Vec<Role>,
    /// Patients in the caller's care.
    pub patients: Vec<String>,
    /// A system client's granted scopes (SMART `system/...`); empty for users.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Fails with 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| roles.contains(r)) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// The roles, comma-separated (for the audit log).
    pub fn role_names(&self) -> String {
        self.roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A key tokens are verified with.
#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens: the identity provider's, and the access tokens Strata's own token endpoint
/// issues to system clients.
#[derive(Clone)]
pub struct Auth {
    keys: Arc<Vec<VerifyKey>>,
    config: AuthConfig,
    dev_secret: Option<Arc<Vec<u8>>>,
    system: Option<crate::smart::Smart>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.config.issuer)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// A PEM public key: RSA (RS256) or P-256 (ES256).
fn pem_key(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((Algorithm::RS256, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((Algorithm::ES256, k));
    }
    Err("not an RSA or P-256 public key in PEM".into())
}

fn jwks_keys(text: &str) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            // Other key types are not accepted here; skip them rather than fail the whole set.
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a key of the JWKS: {e}"))?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    Ok(keys)
}

impl Auth {
    /// Builds the verifier from config (`base` resolves relative files). Fails when no key is
    /// configured, or a key cannot be read.
    pub fn from_config(config: &AuthConfig, base: &Path) -> Result<Self, String> {
        let read = |file: &str| {
            std::fs::read(base.join(file))
                .map_err(|e| format!("[api.auth]: cannot read {file}: {e}"))
        };
        let mut keys = Vec::new();
        for file in &config.public_key_files {
            let (algorithm, key) =
                pem_key(&read(file)?).map_err(|e| format!("[api.auth] {file}: {e}"))?;
            // A PEM file names no key id: it verifies tokens whatever their `kid`.
            keys.push(VerifyKey {
                kid: None,
                algorithm,
                key,
            });
        }
        if let Some(file) = &config.jwks_file {
            let text = String::from_utf8(read(file)?)
                .map_err(|_| format!("[api.auth] {file}: not UTF-8"))?;
            keys.extend(jwks_keys(&text).map_err(|e| format!("[api.auth] {file}: {e}"))?);
        }
        let at = "[api.auth]";
        let secret = strata_archive::SecretSource::optional(
            config.hs256_secret_file.as_deref(),
            config.hs256_secret_env.as_deref(),
            at,
            ("hs256_secret_file", "hs256_secret_env"),
        )?
        .map(|source| source.read(base, at))
        .transpose()?;
        let dev_secret = match secret {
            Some(s) => {
                let s = s.trim().as_bytes().to_vec();
                if s.len() < 32 {
                    return Err("[api.auth]: the HS256 secret must be at least 32 bytes".into());
                }
                tracing::warn!("[api.auth]: HS256 tokens accepted (development only)");
                keys.push(VerifyKey {
                    kid: None,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(&s),
                });
                Some(Arc::new(s))
            }
            None => None,
        };
        if keys.is_empty() {
            return Err("[api.auth]: no key to verify tokens with: set public_key_files, jwks_file or (development) an HS256 secret".into());
        }
        Ok(Auth {
            keys: Arc::new(keys),
            config: config.clone(),
            dev_secret,
            system: None,
        })
    }

    /// Also accepts the access tokens `smart` issues to system clients.
    pub fn with_system_tokens(mut self, smart: crate::smart::Smart) -> Self {
        self.system = Some(smart);
        self
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = self.config.leeway_secs;
        v
    }

    /// Verifies a token: its header's algorithm must be that of a configured key (with the
    /// same `kid`, when both name one), and its signature and claims must check out. A token
    /// Strata issued to a system client is checked against its own key.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        if let Some(principal) = self.system.as_ref().and_then(|s| s.verify_access(token)) {
            return Ok(principal);
        }
        let header = decode_header(token).map_err(|_| ApiError::Unauthorized)?;
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        });
        for k in candidates {
            match decode::<ReadClaims>(token, &k.key, &self.validation(k.algorithm)) {
                // `system:` names Strata's own system clients; no user may take it. A subject
                // must name someone: not empty, not the audit log's mark of no user.
                Ok(data) if !is_user_subject(&data.claims.sub) => {
                    return Err(ApiError::Unauthorized)
                }
                Ok(data) => {
                    let c = data.claims;
                    let roles = c
                        .roles
                        .iter()
                        .filter_map(|r| {
                            serde_json::from_value(serde_json::Value::String(r.clone())).ok()
                        })
                        .filter(|r| *r != Role::System)
                        .collect();
                    let mut patients = c.patients;
                    patients.extend(c.patient);
                    return Ok(Principal {
                        user: c.sub,
                        roles,
                        patients,
                        scopes: Vec::new(),
                    });
                }
                // Another key may have signed it; any other failure is final.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(_) => return Err(ApiError::Unauthorized),
            }
        }
        Err(ApiError::Unauthorized)
    }

    /// Issues a development token (HS256) for `user` with `roles` and `patients` in their
    /// care, valid for `ttl_secs`. None unless an HS256 secret is configured.
    pub fn issue_dev_token(
        &self,
        user: &str,
        roles: &[Role],
        patients: &[String],
        ttl_secs: u64,
    ) -> Option<String> {
        let secret = self.dev_secret.as_ref()?;
        let now = chrono::Utc::now().timestamp() as u64;
        let claims = Claims {
            sub: user.into(),
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            exp: now + ttl_secs,
            nbf: Some(now.saturating_sub(1)),
            roles: roles.to_vec(),
            patients: patients.to_vec(),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .ok()
    }
}

/// The bearer token of a request's `Authorization` header, if it has one.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// The auth layer: every `/v1` request needs a valid bearer token. The caller goes into the
/// request's extensions for handlers, and into the response's for the audit layer.
pub async fn require_token(
    State(auth): State<Auth>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = bearer_token(request.headers()).ok_or(ApiError::Unauthorized)?;
    let principal = auth.verify(token)?;
    request.extensions_mut().insert(principal.clone());
    let mut response = next.run(request).await;
    response.extensions_mut().insert(principal);
    Ok(response)
}
