//! Bearer JWT verification as a tower layer, and the roles it yields.

use crate::config::AuthConfig;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// A role the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads patients' archived history and documents.
    Clinician,
    /// Exports only.
    Researcher,
    /// Policies, holds, reports.
    RecordsManager,
    /// The audit log.
    Auditor,
    /// Everything.
    Admin,
}

/// The claims Strata reads from a token.
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
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<Role>,
}

/// The authenticated caller, put in request extensions by the auth layer.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user id (`sub`).
    pub user: String,
    /// The caller's roles.
    pub roles: Vec<Role>,
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
}

/// Verifies tokens.
#[derive(Clone)]
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    config: AuthConfig,
    secret: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Builds the verifier from config (`base` resolves a relative secret file).
    pub fn from_config(config: &AuthConfig, base: &Path) -> Result<Self, String> {
        let secret = match (&config.hs256_secret_env, &config.hs256_secret_file) {
            (Some(var), None) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
            }
            (None, Some(file)) => std::fs::read_to_string(base.join(file))
                .map_err(|e| format!("cannot read {file}: {e}"))?,
            _ => {
                return Err(
                    "[api.auth]: set exactly one of hs256_secret_env or hs256_secret_file".into(),
                )
            }
        };
        let secret = secret.trim().as_bytes().to_vec();
        if secret.len() < 32 {
            return Err("[api.auth]: the HS256 secret must be at least 32 bytes".into());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Auth {
            key: DecodingKey::from_secret(&secret),
            validation,
            config: config.clone(),
            secret: Arc::new(secret),
        })
    }

    /// Verifies a token.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| ApiError::Unauthorized)?;
        Ok(Principal {
            user: data.claims.sub,
            roles: data.claims.roles,
        })
    }

    /// Issues a development token (HS256) for `user` with `roles`, valid for `ttl_secs`.
    pub fn issue_dev_token(&self, user: &str, roles: &[Role], ttl_secs: u64) -> String {
        let now = chrono::Utc::now().timestamp() as u64;
        let claims = Claims {
            sub: user.into(),
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            exp: now + ttl_secs,
            nbf: Some(now.saturating_sub(1)),
            roles: roles.to_vec(),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .expect("HS256 signs")
    }
}

/// The auth layer: every `/v1` request needs a valid bearer token.
pub async fn require_token(
    State(auth): State<Auth>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    let principal = auth.verify(token.trim())?;
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}
