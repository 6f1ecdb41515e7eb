//! The `[api]` section of `strata.toml`.
//!
//! ```toml
//! [api]
//! listen = "0.0.0.0:8443"
//! tls_cert_file = "tls/cert.pem"      # PEM chain; with tls_key_file, serves HTTPS
//! tls_key_file = "tls/key.pem"
//! # plain_http = true                 # development only, and only on a loopback address
//! # trusted_proxies = ["10.0.0.0/24"] # reverse proxies: X-Forwarded-For read from them only
//! # catalog_refresh_secs = 5          # new runs, compactions and gcs show within this time
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
//! # header_read_timeout_secs = 10     # a request's head; also closes idle keep-alives
//! # request_timeout_secs = 30         # a whole request, body included: 408
//! # connections_per_client = 256      # per client address (proxies above are not capped)
//! # archive_reads = 4                 # patient reads at once (default: twice the CPU count)
//! # history_cache_mib = 64            # histories read lately, kept in memory (0: none)
//! # anonymous_requests_per_minute = 120 # audited per address without a valid token; then 429
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
    /// What one user or client may hold.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Reverse proxies in front of the API (addresses or networks, `10.0.0.0/24`): they are
    /// not capped as one client, and their `X-Forwarded-For` names the client in the audit log.
    /// `X-Forwarded-For` from anyone else is ignored. By default, none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Researchers' exports: where they go, how identifiers are replaced, and the profiles.
    #[serde(default)]
    pub exports: Option<ExportsConfig>,
    /// FHIR R4 resource types of archived tables, by table (`[api.fhir.<table>]`): tables not
    /// named here are left out of FHIR answers.
    #[serde(default)]
    pub fhir: std::collections::BTreeMap<String, FhirTable>,
    /// How clients reach this server (`https://strata.hospital.example`): the base of FHIR Bulk
    /// Data file URLs and of the token endpoint that client assertions are addressed to. By
    /// default, taken from each request's `Host` header.
    #[serde(default)]
    pub public_url: Option<String>,
    /// SMART Backend Services: system clients that export de-identified data through FHIR Bulk
    /// Data, each with its public keys and the profile its exports follow.
    #[serde(default)]
    pub smart: Option<SmartConfig>,
    /// Seconds between two reads of the archive's manifests: a new run, a compaction or a gc
    /// shows within this time (0: never re-read; the catalog of the start is served). A read
    /// that finds a file gone re-reads the manifests at once. Keep `strata archive gc
    /// --grace-hours` far above it. By default, 5.
    #[serde(default = "default_catalog_refresh_secs")]
    pub catalog_refresh_secs: u64,
    /// The archive viewer for browsers (`/ui`): sessions and sign-in.
    #[serde(default)]
    pub viewer: ViewerConfig,
}

/// `[api.viewer]`: the archive viewer's browser sessions and how users sign in.
///
/// ```toml
/// [api.viewer]
/// idle_timeout_minutes = 15   # a session unused this long ends (HIPAA 164.312(a)(2)(iii))
/// # dev_sign_in = true        # one-click sign-in as any role: development only, loopback only
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerConfig {
    /// Minutes a browser session may stay unused before it ends (automatic logoff). By
    /// default, 15.
    #[serde(default = "default_idle_timeout_minutes")]
    pub idle_timeout_minutes: u64,
    /// Offers a one-click sign-in as any role, with no identity provider: for the demo and
    /// development only. Refused unless the server listens on a loopback address, and from any
    /// client off loopback. By default, false.
    #[serde(default)]
    pub dev_sign_in: bool,
    /// Sign-in through the hospital's OpenID provider: SMART App Launch (EHR and standalone).
    #[serde(default)]
    pub openid: Option<OpenIdConfig>,
    /// How the EHR's patient ids (a launch's `patient`) find legacy patient keys.
    #[serde(default)]
    pub cross_reference: Option<CrossReferenceConfig>,
}

impl Default for ViewerConfig {
    fn default() -> Self {
        ViewerConfig {
            idle_timeout_minutes: default_idle_timeout_minutes(),
            dev_sign_in: false,
            openid: None,
            cross_reference: None,
        }
    }
}

/// `[api.viewer.openid]`: the hospital's OpenID Connect provider, as a SMART App Launch 2.0
/// client (authorization code with PKCE).
///
/// ```toml
/// [api.viewer.openid]
/// issuer = "https://login.hospital.example"   # discovery: {issuer}/.well-known/openid-configuration
/// client_id = "strata-viewer"
/// # client_secret_env = "STRATA_VIEWER_SECRET"  # a confidential client; else a public one
/// # scopes = "openid fhirUser launch/patient" # `launch` is added in an EHR launch
/// # roles_claim = "roles"                    # the ID token claim naming the user's roles
/// # role_names = { "HIM" = "records_manager" } # the provider's names for Strata's roles
/// # launch_issuers = ["https://ehr.hospital.example/fhir"]  # `iss` an EHR launch may give
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenIdConfig {
    /// The provider's issuer URL.
    pub issuer: String,
    /// Strata's client id at the provider.
    pub client_id: String,
    /// An environment variable holding the client secret (HTTP Basic at the token endpoint).
    /// By default, none: a public client, protected by PKCE.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Scopes asked for. By default, `openid fhirUser launch/patient` (and `launch` in an EHR
    /// launch).
    #[serde(default = "default_openid_scopes")]
    pub scopes: String,
    /// The ID token claim holding the user's roles (a list, or one name). By default, `roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The provider's role names that mean Strata's roles (`clinician`, `records_manager`,
    /// `auditor`, `admin`); a name not listed counts if it is Strata's own.
    #[serde(default)]
    pub role_names: std::collections::BTreeMap<String, String>,
    /// The `iss` values an EHR launch may give, besides Strata's own FHIR base.
    #[serde(default)]
    pub launch_issuers: Vec<String>,
}

fn default_openid_scopes() -> String {
    "openid fhirUser launch/patient".into()
}

fn default_roles_claim() -> String {
    "roles".into()
}

/// `[api.viewer.cross_reference]`: the archived (or operational) table whose column holds
/// the EHR's patient id (a new EHR id, an MRN) beside the legacy patient key.
///
/// ```toml
/// [api.viewer.cross_reference]
/// table = "patients"
/// column = "mrn"
/// key_column = "id"                            # the legacy key, in the operational database
/// name_columns = ["given_name", "family_name"] # the patient search (by MRN, name, birth date)
/// birth_date_column = "birth_date"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossReferenceConfig {
    /// The table (by its name in the archive and the operational database).
    pub table: String,
    /// Its column holding the EHR's patient id.
    pub column: String,
    /// The table's column holding the legacy patient key, in the operational database.
    /// Without it, only the archived table is looked in (a patients table kept operational,
    /// as the example policy keeps it, needs it).
    #[serde(default)]
    pub key_column: Option<String>,
    /// Columns of the table holding the patient's name (searched together, case ignored), for
    /// the patient search. By default, none.
    #[serde(default)]
    pub name_columns: Vec<String>,
    /// The table's column holding the birth date, for the patient search.
    #[serde(default)]
    pub birth_date_column: Option<String>,
}

fn default_idle_timeout_minutes() -> u64 {
    15
}

/// `[api.smart]`: Strata's token endpoint for system clients (SMART Backend Services).
///
/// ```toml
/// [api.smart]
/// token_key_env = "STRATA_SMART_TOKEN_KEY"   # hex; signs the access tokens Strata issues
/// [api.smart.clients.research-etl]
/// jwks_file = "clients/research-etl.jwks.json"  # RS384 (RSA) or ES384 (P-384) public keys
/// profile = "safe_harbor"
/// study = "cardio-2026"
/// scopes = ["system/*.read"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartConfig {
    /// A file holding the key (64+ hex digits) that signs the access tokens Strata issues.
    /// Replicas of the API share it. By default, a random key per start (tokens do not
    /// survive a restart; clients ask for new ones).
    #[serde(default)]
    pub token_key_file: Option<String>,
    /// An environment variable holding that key.
    #[serde(default)]
    pub token_key_env: Option<String>,
    /// Seconds an access token is valid. By default, 300.
    #[serde(default = "default_access_token_secs")]
    pub access_token_secs: u64,
    /// Registered clients by client id (`[api.smart.clients.<id>]`).
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, SmartClient>,
}

fn default_access_token_secs() -> u64 {
    300
}

/// A registered system client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartClient {
    /// The client's public keys, a JSON Web Key Set (relative to the config file): RSA keys
    /// verify RS384 assertions, P-384 keys ES384.
    pub jwks_file: String,
    /// The export profile its exports follow. By default, `safe_harbor`.
    #[serde(default = "default_client_profile")]
    pub profile: String,
    /// The study whose pseudonym key applies. By default, the site's key.
    #[serde(default)]
    pub study: Option<String>,
    /// The data use agreement its exports are made under (required by a profile that needs
    /// one, such as `limited_data_set`).
    #[serde(default)]
    pub data_use_agreement: Option<String>,
    /// Scopes it may be granted. By default, `system/*.read`.
    #[serde(default = "default_client_scopes")]
    pub scopes: Vec<String>,
}

fn default_client_profile() -> String {
    strata_deidentify::SAFE_HARBOR.into()
}

fn default_client_scopes() -> Vec<String> {
    vec!["system/*.read".into()]
}

/// `[api.exports]`: researchers' exports.
///
/// ```toml
/// [api.exports]
/// location = "exports"                 # or s3://bucket/prefix; never the archive
/// pseudonym_key_file = "pseudonym.key" # 64+ hex digits (or pseudonym_key_env)
/// expire_after_secs = 604800           # files deleted 7 days after the export finished
/// [api.exports.studies.cardio-2026]    # a study: its own key (or one derived from the site's)
/// pseudonym_key_env = "CARDIO_PSEUDONYM_KEY"
/// researchers = ["alice", "bob"]       # who may export under it (by default, any researcher)
/// [api.exports.profiles.registry]      # the site's own profiles (see docs/exports.md)
/// based_on = "safe_harbor"
/// classes = { category = "drop" }
/// ```
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
    /// Seconds after an export finished when its files are deleted. By default, 7 days.
    #[serde(default = "default_expire_after_secs")]
    pub expire_after_secs: u64,
    /// A site's list of three-digit ZIP codes released as `000` (one per line), instead of the
    /// one shipped (HHS guidance, 2000 Census).
    #[serde(default)]
    pub restricted_zip3_file: Option<String>,
    /// The studies exports may name (`[api.exports.studies.<name>]`), each with its own
    /// pseudonym key (given, or derived from the site's key and the study's name) and, if
    /// listed, the researchers who may use it. A request naming another study is refused.
    #[serde(default)]
    pub studies: std::collections::BTreeMap<String, StudyKey>,
    /// The site's own export profiles by name (`[api.exports.profiles.<name>]`); the built-in
    /// `safe_harbor` and `limited_data_set` need none.
    #[serde(default)]
    pub profiles: std::collections::BTreeMap<String, strata_deidentify::ProfileConfig>,
}

/// A study (`[api.exports.studies.<name>]`): who may export under it, and its pseudonym key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyKey {
    /// A file holding the study's pseudonym key as hex (64+ digits). By default (no file and
    /// no variable), the key is derived from the site's key and the study's name.
    #[serde(default)]
    pub pseudonym_key_file: Option<String>,
    /// An environment variable holding the study's key as hex.
    #[serde(default)]
    pub pseudonym_key_env: Option<String>,
    /// The researchers (token subjects) who may export under the study. By default, any
    /// researcher.
    #[serde(default)]
    pub researchers: Vec<String>,
}

fn default_exports_location() -> String {
    "exports".into()
}

fn default_expire_after_secs() -> u64 {
    7 * 24 * 3600
}

/// A key given as hex in a file (`<what>_file`) or an environment variable (`<what>_env`),
/// exactly one, at least 32 bytes.
pub(crate) fn hex_key(
    file: Option<&String>,
    env: Option<&String>,
    base: &std::path::Path,
    at: &str,
    what: &str,
) -> Result<Vec<u8>, String> {
    let text = strata_archive::SecretSource::required(
        file.map(String::as_str),
        env.map(String::as_str),
        at,
        (&format!("{what}_file"), &format!("{what}_env")),
    )?
    .read(base, at)?;
    hex::decode(text.trim())
        .ok()
        .filter(|k| k.len() >= 32)
        .ok_or_else(|| format!("{at}: the key must be 64 or more hex digits"))
}

/// How one table's records become FHIR resources.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FhirTable {
    /// The resource type: Patient, Encounter, Condition, Observation, Procedure,
    /// MedicationStatement, MedicationRequest, AllergyIntolerance, Immunization, CarePlan,
    /// Device, ImagingStudy, SupplyDelivery, Coverage, DiagnosticReport, ServiceRequest or
    /// DocumentReference.
    pub resource: String,
    /// The column holding the record's code: the resource's `code` (Encounter: `type`;
    /// medications: `medication`; Immunization: `vaccineCode`; CarePlan: `category`; Device,
    /// Coverage: `type`; ImagingStudy: `procedureCode`; SupplyDelivery: the supplied item).
    #[serde(default)]
    pub code: Option<String>,
    /// Encounter: the column holding its class (`inpatient`, `emergency`, `AMB`, ...; the
    /// words Strata knows become v3 ActCode codes).
    #[serde(default)]
    pub class: Option<String>,
    /// The column holding when the record starts, as an instant (Encounter, CarePlan and
    /// Coverage: `period.start`; others: their date). By default, the record date (a day).
    #[serde(default)]
    pub start: Option<String>,
    /// The column holding when it ends (Encounter, CarePlan, Coverage: `period.end`).
    #[serde(default)]
    pub end: Option<String>,
    /// The offset (`UTC`, `-05:00`) of the local times in `start` and `end` when they carry
    /// none: FHIR times need one, so without it a local time is given as its day.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Patient: the column holding the sex or gender (`M`/`F`/`male`/`female`/...).
    #[serde(default)]
    pub gender: Option<String>,
    /// Patient: the column holding the birth date.
    #[serde(default)]
    pub birth_date: Option<String>,
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
    /// Observation: the column holding the low end of the reference range (in the value's
    /// unit), when the data has one.
    #[serde(default)]
    pub reference_low: Option<String>,
    /// Observation: the column holding the high end of the reference range.
    #[serde(default)]
    pub reference_high: Option<String>,
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

/// What one user or client may hold: requests per user (a token bucket per token subject),
/// time to send a request, connections per client address, concurrent archive reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained requests per minute per user. By default, 1,200.
    #[serde(default = "default_per_minute")]
    pub requests_per_minute: u32,
    /// Requests a user may make at once above the sustained rate. By default, 100.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Seconds a client has to send a request's head (request line and headers); a
    /// keep-alive connection idle as long is closed. By default, 10.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// Seconds a request has, body included, until its response starts: past it, 408 (audited
    /// under the token's user). By default, 30.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Connections open at once per client address; more are closed as they come (counted in
    /// `/metrics`). `[api] trusted_proxies` are not capped. By default, 256.
    #[serde(default = "default_connections_per_client")]
    pub connections_per_client: usize,
    /// Patient reads of the archive (histories, document lookups) at once; more wait their
    /// turn. Bounds the memory reads hold, whatever the number of users. By default, twice
    /// the CPU count.
    #[serde(default)]
    pub archive_reads: Option<usize>,
    /// MiB of patients' histories kept in memory, the least recently read leaving first: the
    /// requests of one chart (its pages, its FHIR form) read the archive once. 0 keeps none.
    /// By default, 64.
    #[serde(default = "default_history_cache_mib")]
    pub history_cache_mib: usize,
    /// Requests without a valid token audited per minute per client address; past the rate
    /// (and `anonymous_burst`) they get 429 and are counted in `/metrics`, not audited. By
    /// default, 120.
    #[serde(default = "default_anonymous_per_minute")]
    pub anonymous_requests_per_minute: u32,
    /// Requests without a valid token a client address may make at once. By default, 60.
    #[serde(default = "default_anonymous_burst")]
    pub anonymous_burst: u32,
}

fn default_anonymous_per_minute() -> u32 {
    120
}

fn default_anonymous_burst() -> u32 {
    60
}

fn default_catalog_refresh_secs() -> u64 {
    5
}

fn default_history_cache_mib() -> usize {
    64
}

impl LimitsConfig {
    /// `archive_reads`, or its default.
    pub fn archive_reads(&self) -> usize {
        self.archive_reads
            .unwrap_or_else(|| {
                2 * std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
            })
            .max(1)
    }
}

fn default_header_read_timeout() -> u64 {
    10
}

fn default_request_timeout() -> u64 {
    30
}

fn default_connections_per_client() -> usize {
    256
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
            header_read_timeout_secs: default_header_read_timeout(),
            request_timeout_secs: default_request_timeout(),
            connections_per_client: default_connections_per_client(),
            archive_reads: None,
            history_cache_mib: default_history_cache_mib(),
            anonymous_requests_per_minute: default_anonymous_per_minute(),
            anonymous_burst: default_anonymous_burst(),
        }
    }
}
