//! The `[api]` section of `strata.toml`.

use serde::Deserialize;

/// How the API listens and authenticates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on. By default, 127.0.0.1:8443.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Serve plain HTTP. Allowed only on a loopback address (development). By default, false.
    #[serde(default)]
    pub plain_http: bool,
    /// Token verification.
    pub auth: AuthConfig,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}

/// Bearer-token verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Environment variable holding an HS256 secret (development only).
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// File holding an HS256 secret (development only; relative to the config file).
    #[serde(default)]
    pub hs256_secret_file: Option<String>,
}
