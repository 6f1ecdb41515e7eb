//! The `[api]` section of `strata.toml`.
//!
//! ```toml
//! [api]
//! listen = "0.0.0.0:8443"
//! tls_cert_file = "tls/cert.pem"      # PEM chain; with tls_key_file, serves HTTPS
//! tls_key_file = "tls/key.pem"
//! # plain_http = true                 # development only, and only on a loopback address
//! [api.auth]
//! issuer = "https://idp.example.org"
//! audience = "strata-archive"
//! public_key_files = ["idp-rs256.pem"] # RS256 (RSA) or ES256 (P-256) public keys, PEM
//! # jwks_file = "jwks.json"           # or a JSON Web Key Set
//! # hs256_secret_file = "jwt-secret"  # development only
//! [api.audit]
//! key_file = "audit.key"              # 64+ hex digits, keys the audit log's hash chain
//! [api.limits]
//! requests_per_minute = 600           # per user
//! [api.fhir.lab_results]              # FHIR R4 resource type of an archived table
//! resource = "Observation"
//! code = "loinc_code"
//! system = "http://loinc.org"
//! value = "value_num"
//! unit = "unit"
//! ```

use serde::Deserialize;

/// How the API listens, authenticates, audits and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on. By default, 127.0.0.1:8443.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// TLS certificate chain, PEM (relative to the config file).
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    /// TLS private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// Serve plain HTTP instead of TLS. Allowed only on a loopback address (development).
    /// By default, false.
    #[serde(default)]
    pub plain_http: bool,
    /// Token verification.
    pub auth: AuthConfig,
    /// The audit log's key.
    pub audit: AuditConfig,
    /// Per-user rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Researchers' exports: where they go, how identifiers are replaced, and the profiles.
    #[serde(default)]
    pub exports: Option<ExportsConfig>,
    /// FHIR R4 resource types of archived tables, by table (`[api.fhir.<table>]`): tables not
    /// named here are left out of FHIR answers.
    #[serde(default)]
    pub fhir: std::collections::BTreeMap<String, FhirTable>,
}

/// `[api.exports]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportsConfig {
    /// Directory (relative to the config file) or `s3://bucket/prefix` for export files; never
    /// the archive. By default, `exports`.
    #[serde(default = "default_exports_location")]
    pub location: String,
    /// A file holding the pseudonym key as hex (64+ digits).
    #[serde(default)]
    pub pseudonym_key_file: Option<String>,
    /// An environment variable holding the pseudonym key as hex.
    #[serde(default)]
    pub pseudonym_key_env: Option<String>,
    /// Export profiles by name (`[api.exports.profiles.<name>]`).
    #[serde(default)]
    pub profiles: std::collections::BTreeMap<String, ExportProfile>,
}

fn default_exports_location() -> String {
    "exports".into()
}

/// What an export profile lets out, and how.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportProfile {
    /// Tables it may export (empty: every archived table).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Columns never exported (names, addresses, free text, contact details, ...).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Columns whose values are replaced by keyed pseudonyms (MRNs, encounter ids, ...).
    #[serde(default)]
    pub identifiers: Vec<String>,
    /// Record dates: `keep` (default) or `year` (only the year leaves).
    #[serde(default = "default_dates")]
    pub dates: String,
}

fn default_dates() -> String {
    "keep".into()
}

/// How one table's records become FHIR resources.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FhirTable {
    /// Encounter, Condition, MedicationStatement, AllergyIntolerance, Observation, Procedure or
    /// DocumentReference.
    pub resource: String,
    /// The column holding the record's code (the resource's `code`, `medication` or `class`).
    #[serde(default)]
    pub code: Option<String>,
    /// The code system's URI (e.g. `http://loinc.org`).
    #[serde(default)]
    pub system: Option<String>,
    /// The column holding the code's display text.
    #[serde(default)]
    pub display: Option<String>,
    /// The column holding the record's status, mapped onto the resource's status codes when its
    /// value is one of them.
    #[serde(default)]
    pub status: Option<String>,
    /// Observation: the column holding the numeric value.
    #[serde(default)]
    pub value: Option<String>,
    /// Observation: the column holding the value's unit.
    #[serde(default)]
    pub unit: Option<String>,
    /// DocumentReference: a text column carried inline as the attachment (a note's body).
    #[serde(default)]
    pub text: Option<String>,
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
    /// Required `aud` claim (a token's `aud` may be a list that contains it).
    pub audience: String,
    /// PEM public keys of the identity provider: RSA keys verify RS256, P-256 keys ES256,
    /// whatever `kid` a token names (a JWKS names its keys).
    #[serde(default)]
    pub public_key_files: Vec<String>,
    /// A JSON Web Key Set file (RSA and P-256 keys; `kid` from each key).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// Environment variable holding an HS256 secret (development only).
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// File holding an HS256 secret (development only; relative to the config file).
    #[serde(default)]
    pub hs256_secret_file: Option<String>,
    /// Clock skew allowed for `exp` and `nbf`, in seconds. By default, 30.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_leeway() -> u64 {
    30
}

/// Where the audit log's key comes from: exactly one of the two.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file holding the key as hex (relative to the config file).
    #[serde(default)]
    pub key_file: Option<String>,
    /// An environment variable holding the key as hex.
    #[serde(default)]
    pub key_env: Option<String>,
}

/// Per-user request limits (a token bucket per token subject).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained requests per minute per user. By default, 1,200.
    #[serde(default = "default_per_minute")]
    pub requests_per_minute: u32,
    /// Requests a user may make at once above the sustained rate. By default, 100.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_per_minute() -> u32 {
    1200
}

fn default_burst() -> u32 {
    100
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_minute: default_per_minute(),
            burst: default_burst(),
        }
    }
}
