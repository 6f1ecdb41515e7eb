//! What every handler shares: the archive, the control database, the audit log, token
//! verification, limits and caches, built once from the API's config.

use crate::auth::Auth;
use crate::config::ApiConfig;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use std::path::Path as FsPath;
use std::time::Duration;
use strata_archive::{ArchiveReader, SecretSource};
use strata_control::{AuditKey, AuditLog, Control};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The archive, read-only, its catalog kept up to date (`[api] catalog_refresh_secs`).
    pub archive: std::sync::Arc<strata_archive::LiveArchive>,
    /// Token verification.
    pub auth: Auth,
    /// Strata's control database: holds, policies, reports.
    pub control: Control,
    /// The audit log.
    pub audit: AuditLog,
    /// Per-user rate limits.
    pub limiter: RateLimiter,
    /// Per-address rate of requests that name no one (no valid token).
    pub anonymous: RateLimiter,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// FHIR resource types of tables.
    pub fhir: std::sync::Arc<std::collections::BTreeMap<String, crate::config::FhirTable>>,
    /// Researchers' exports, when `[api.exports]` is configured.
    pub exporter: Option<crate::exports::Exporter>,
    /// The token endpoint for system clients, when `[api.smart]` is configured.
    pub smart: Option<crate::smart::Smart>,
    /// `[api] public_url`.
    pub public_url: Option<String>,
    /// Whether the server speaks plain HTTP (for URLs made from a request's host).
    pub plain_http: bool,
    /// The operational database's URL (read for `Patient` resources when the patients table
    /// stays operational), if known.
    pub operational: Option<String>,
    /// Time a request has, body included, to its response's head (`[api.limits]`).
    pub request_timeout: Duration,
    /// Patient reads of the archive at once (`[api.limits] archive_reads`): a read holds the
    /// pages it decrypts and decodes, so this bounds the memory reads hold whatever the number
    /// of users; the others wait their turn (asynchronously, holding nothing).
    pub archive_reads: std::sync::Arc<tokio::sync::Semaphore>,
    /// Patients' histories read lately (`[api.limits] history_cache_mib`).
    pub histories: crate::history::HistoryCache,
    /// The viewer's settings (`[api.viewer]`).
    pub viewer: ViewerSettings,
}

/// How the viewer's sessions behave.
#[derive(Debug, Clone)]
pub struct ViewerSettings {
    /// Seconds a session may stay unused.
    pub idle_secs: u64,
    /// Whether the development sign-in is offered (to clients on loopback).
    pub dev_sign_in: bool,
    /// The hospital's OpenID provider, when `[api.viewer.openid]` is configured.
    pub(crate) openid: Option<crate::viewer::OpenId>,
    /// `[api.viewer.cross_reference]`.
    pub(crate) cross_reference: Option<crate::config::CrossReferenceConfig>,
    /// The archive's side of the cross-reference.
    pub(crate) archive_index: crate::viewer::ArchiveIndex,
}

impl AppState {
    /// The state for `config`: opens the audit log (its key from the config) on `control`;
    /// exports follow `classification` (the archived columns' classes).
    pub fn new(
        archive: ArchiveReader,
        control: Control,
        config: &ApiConfig,
        base: &FsPath,
        classification: strata_deidentify::Classification,
    ) -> Result<Self, String> {
        let smart = config
            .smart
            .as_ref()
            .map(|s| crate::smart::Smart::from_config(s, base))
            .transpose()?;
        if smart.is_some() && config.public_url.is_none() {
            // Assertions are addressed to the token endpoint: its address is the server's, not
            // what a request's Host header says.
            return Err("[api] public_url is needed with [api.smart]: the address clients reach the token endpoint at".into());
        }
        let mut auth = Auth::from_config(&config.auth, base)?;
        if let Some(smart) = &smart {
            auth = auth.with_system_tokens(smart.clone());
        }
        let key = audit_key(config, base)?;
        if config.viewer.dev_sign_in && !listens_on_loopback(&config.listen) {
            return Err("[api.viewer] dev_sign_in is allowed only when [api] listen is a loopback address (development only)".into());
        }
        crate::fhir::check(&config.fhir)?;
        let exporter = config
            .exports
            .as_ref()
            .map(|e| crate::exports::Exporter::from_config(e, base, classification))
            .transpose()?;
        if let (Some(smart), Some(exporter)) = (&config.smart, &exporter) {
            for (id, c) in &smart.clients {
                if c.study.as_ref().is_some_and(|s| !exporter.has_study(s)) {
                    return Err(format!(
                        "[api.smart.clients.{id}] study: configure it in [api.exports.studies]"
                    ));
                }
            }
        }
        Ok(AppState {
            exporter,
            smart,
            public_url: config.public_url.clone(),
            plain_http: config.plain_http,
            operational: None,
            fhir: std::sync::Arc::new(config.fhir.clone()),
            archive: std::sync::Arc::new(strata_archive::LiveArchive::new(archive)),
            auth,
            audit: AuditLog::open(&control, key),
            control,
            limiter: RateLimiter::new(&config.limits),
            anonymous: RateLimiter::per_minute(
                config.limits.anonymous_requests_per_minute,
                config.limits.anonymous_burst,
            ),
            metrics: Metrics::default(),
            request_timeout: Duration::from_secs(config.limits.request_timeout_secs.max(1)),
            archive_reads: std::sync::Arc::new(tokio::sync::Semaphore::new(
                config.limits.archive_reads(),
            )),
            histories: crate::history::HistoryCache::new(config.limits.history_cache_mib << 20),
            viewer: ViewerSettings {
                idle_secs: config.viewer.idle_timeout_minutes.max(1) * 60,
                dev_sign_in: config.viewer.dev_sign_in,
                openid: config
                    .viewer
                    .openid
                    .clone()
                    .map(crate::viewer::OpenId::new)
                    .transpose()?,
                cross_reference: config.viewer.cross_reference.clone(),
                archive_index: Default::default(),
            },
        })
    }
}

impl AppState {
    /// Reads the patients table of the operational database at `url` too (for FHIR `Patient`
    /// resources when the patients table stays operational).
    pub fn with_operational_database(mut self, url: String) -> Self {
        self.operational = Some(url);
        self
    }
}

/// Whether `listen` (address:port) is a loopback address.
fn listens_on_loopback(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// The audit log's key, from `[api.audit]` (`base` resolves a relative key file).
pub fn audit_key(config: &ApiConfig, base: &FsPath) -> Result<AuditKey, String> {
    let at = "[api.audit]";
    let hex = SecretSource::required(
        config.audit.key_file.as_deref(),
        config.audit.key_env.as_deref(),
        at,
        ("key_file", "key_env"),
    )?
    .read(base, at)?;
    AuditKey::from_hex(&hex).map_err(|e| format!("[api.audit]: {e}"))
}
