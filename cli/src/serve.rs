//! The archive API's commands: `serve`, `token` (development tokens) and `audit verify`.

use crate::context::Context;
use anyhow::{Context as _, Result};
use clap::Subcommand;
use std::path::PathBuf;
use strata_archive_api::{AppState, Auth, Role};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the audit log's hash chain; name every edited, inserted or deleted entry.
    Verify {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Clinician,
    Researcher,
    RecordsManager,
    Auditor,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Clinician => Role::Clinician,
            RoleArg::Researcher => Role::Researcher,
            RoleArg::RecordsManager => Role::RecordsManager,
            RoleArg::Auditor => Role::Auditor,
            RoleArg::Admin => Role::Admin,
        }
    }
}

/// `strata serve`: until SIGINT or SIGTERM, then requests in flight finish.
pub async fn serve(ctx: &Context, benchmark_ceiling: Option<usize>) -> Result<()> {
    let loaded = &ctx.config;
    let api = ctx.api()?;
    let classes = loaded.classification()?;
    let archive = ctx.archive().await?;
    let control = ctx.control().await?.clone();
    // A history missing a run's records must not be served as if it were whole.
    let check = control.check_catalog(archive.catalog()).await?;
    for w in &check.warnings {
        tracing::warn!(warning = %w, "archive catalog");
    }
    if !check.errors.is_empty() {
        for e in &check.errors {
            eprintln!("missing: {e}");
        }
        anyhow::bail!(
            "the archive lacks what the control database recorded ({} problem(s)): not serving it; see `strata archive verify`",
            check.errors.len()
        );
    }
    let operational = loaded
        .migration
        .resolve_url(&loaded.migration.operational.url)?;
    let state = AppState::new(archive, control, api, &loaded.base_dir, classes)
        .map_err(anyhow::Error::msg)?
        .with_operational_database(operational);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async {
        let _ = rx.await;
    };
    let serving = match benchmark_ceiling {
        None => strata_archive_api::serve(api, &loaded.base_dir, state, stopped).await?,
        Some(bytes) => {
            let listen: std::net::SocketAddr = api.listen.parse()?;
            anyhow::ensure!(
                listen.ip().is_loopback(),
                "--benchmark-ceiling answers every history with an empty one: it serves on a loopback address only"
            );
            let body = ceiling_body(bytes);
            let app = strata_archive_api::ceiling_router(state.clone(), body);
            eprintln!("benchmark ceiling: every history is a precomputed {bytes}-byte body");
            strata_archive_api::serve_router(api, &loaded.base_dir, state, app, stopped).await?
        }
    };
    let scheme = if api.plain_http { "http" } else { "https" };
    eprintln!("archive API listening on {scheme}://{}", serving.addr);
    stop_signal().await?;
    // Requests in flight finish (and are audited) before the process ends.
    let _ = tx.send(());
    serving.stopped().await;
    Ok(())
}

/// What a development token says.
pub struct TokenOptions {
    /// The subject.
    pub user: String,
    /// The roles.
    pub roles: Vec<RoleArg>,
    /// Patients in the user's care.
    pub patients: Vec<String>,
    /// Lifetime.
    pub ttl_secs: u64,
}

/// `strata token`.
pub fn token(ctx: &Context, options: TokenOptions) -> Result<()> {
    let TokenOptions {
        user,
        roles,
        patients,
        ttl_secs,
    } = options;
    let api = ctx.api()?;
    let auth = Auth::from_config(&api.auth, ctx.base_dir()).map_err(anyhow::Error::msg)?;
    let roles: Vec<Role> = roles.into_iter().map(Role::from).collect();
    let token = auth
        .issue_dev_token(&user, &roles, &patients, ttl_secs)
        .context("development tokens need an HS256 secret in [api.auth]; in production the identity provider issues tokens")?;
    println!("{token}");
    Ok(())
}

/// `strata audit verify`.
pub async fn audit_verify(ctx: &Context) -> Result<()> {
    let api = ctx.api()?;
    let key = strata_archive_api::audit_key(api, ctx.base_dir()).map_err(anyhow::Error::msg)?;
    let report = strata_control::AuditLog::open(ctx.control().await?, key)
        .verify()
        .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.ok() {
        anyhow::bail!(
            "the audit log is not intact: {} problem(s), first at entry {}",
            report.problems.len(),
            report.problems[0].seq
        );
    }
    Ok(())
}

/// Threads `strata serve` keeps for blocking work (reads of a local archive, which the
/// object store does on blocking threads). Each thread costs its allocator's heap (~4 MiB
/// here): without a cap, a burst of readers grew the pool, and the memory with it, with the
/// number of users. Other commands keep tokio's default, since a migration's long-lived
/// source readers live on blocking threads and must not starve its archive writes; the
/// demo's migration (SQLite into SQLite, one worker: one reader) fits within the cap. Four
/// serve 100 users as fast as eight did (docs/benchmarks.md), in ~20 MiB less.
pub const SERVE_BLOCKING_THREADS: usize = 4;

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `kill`, systemd and Kubernetes send).
pub(crate) async fn stop_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        stopped = tokio::signal::ctrl_c() => stopped,
        _ = terminate.recv() => Ok(()),
    }
}

/// A JSON body of `bytes` bytes (at least the braces around an empty record list).
fn ceiling_body(bytes: usize) -> bytes::Bytes {
    let head = r#"{"patient":"ceiling","total":0,"records":[],"padding":""#;
    let pad = bytes.saturating_sub(head.len() + 2);
    bytes::Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}
