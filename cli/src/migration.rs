//! The migration's commands: `check`, `profile`, `plan`, `explain`, `policy check` and
//! `migrate` (with `--abandon`), each through one [`Context`].

use crate::context::Context;
use crate::watch;
use anyhow::{Context as _, Result};
use clap::Subcommand;
use std::path::PathBuf;
use strata_ingest::Migration;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file against the config and the source schema; lists every problem.
    Check {
        /// The policy file (by default, the one strata.toml names).
        file: Option<PathBuf>,
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

/// The migration of `ctx`'s config, its control database the context's.
pub(crate) async fn prepare(ctx: &Context) -> Result<Migration> {
    let migration = Migration::prepare_with(
        ctx.config.migration.clone(),
        ctx.control().await?.clone(),
        crate::today(),
    )
    .await?;
    for w in migration.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(migration)
}

/// Proves the last finished run (see `strata verify`), signs the report when a key is
/// configured and keeps it in the control database.
pub(crate) async fn prove(
    ctx: &Context,
    reread_blobs: bool,
    resume: bool,
) -> Result<strata_ingest::VerifyReport> {
    let control = ctx.control().await?.clone();
    let Some((run_id, run)) = control
        .last_finished_run_report::<strata_ingest::RunReport>()
        .await?
    else {
        anyhow::bail!("no finished run to verify: run `strata migrate` first");
    };
    let as_of: chrono::NaiveDate = run
        .as_of
        .parse()
        .with_context(|| format!("run {run_id}: as_of {:?}", run.as_of))?;
    let migration = Migration::prepare_with(ctx.config.migration.clone(), control, as_of).await?;
    // A run is proven under its own rules: the same policy text, the same holds.
    let now = migration.report_header_for_verify();
    anyhow::ensure!(
        now.policy_hash == run.policy_hash && now.as_of == run.as_of,
        "run {run_id} ran under policy {} (sha256 {}), as of {}; the policy file is now {} (sha256 {}): restore it to verify that run",
        run.policy_version,
        &run.policy_hash[..12.min(run.policy_hash.len())],
        run.as_of,
        now.policy_version,
        &now.policy_hash[..12.min(now.policy_hash.len())]
    );
    anyhow::ensure!(
        now.holds == run.holds,
        "the legal holds in force changed since run {run_id} ({:?} then, {:?} now): its decisions cannot be replayed",
        run.holds,
        now.holds
    );
    let watcher = watch::show(migration.progress());
    let report = migration.verify(&run, reread_blobs, resume).await;
    watcher.abort();
    let mut report = report?;
    strata_ingest::sign_report(&ctx.config.migration, &mut report)?;
    // Kept as evidence: records managers and auditors list it through the API.
    ctx.control()
        .await?
        .record_verification(&run_id, report.proven(), &serde_json::to_string(&report)?)
        .await?;
    Ok(report)
}

/// `strata verify`: exits 1 on a mismatch (2, through the caller, when it cannot verify).
pub async fn verify(
    ctx: &Context,
    json: bool,
    report_file: Option<PathBuf>,
    reread_blobs: bool,
    resume: bool,
) -> Result<()> {
    let report = prove(ctx, reread_blobs, resume).await?;
    if let Some(path) = report_file {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    if !report.proven() {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

/// `strata rollback`.
pub async fn rollback(
    ctx: &Context,
    by: &str,
    reason: &str,
    tables: &[String],
    after_cutover: bool,
) -> Result<()> {
    match Migration::rollback(&ctx.config.migration, by, reason, tables, after_cutover).await? {
        Some(r) => {
            println!(
            "{} rolled back: {} table(s) dropped, {} emptied, {} archive manifest(s) withdrawn (their files go with `strata archive gc`); destruction records kept, void. {}",
            match &r.tables {
                None => format!("run {}", r.run_id),
                Some(t) => format!("table(s) {} of run {}", t.join(", "), r.run_id),
            },
            r.dropped.len(),
            r.emptied.len(),
            r.manifests_withdrawn,
            match &r.tables {
                None => "`strata migrate` runs it again from the start.",
                Some(_) => "The run is unfinished again: `strata migrate` copies these tables again, `strata migrate --abandon` undoes the rest.",
            }
        );
            match &r.slot {
                Some(Ok(slot)) => println!("Its replication slot {slot} was dropped."),
                Some(Err(why)) => println!(
                    "Its replication slot is left on the source ({why}): `strata sync stop --drop-slot` drops it once the source is reachable."
                ),
                None => {}
            }
        }
        None => println!("no finished run to roll back"),
    }
    Ok(())
}

/// `strata verify --check-report FILE`: exits 1 when the signature does not hold.
pub fn check_report(ctx: &Context, path: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match strata_ingest::check_report(&ctx.config.migration, &text) {
        Ok(report) => {
            println!(
                "{}: signature valid under the configured public key ({} tables, {})",
                path.display(),
                report.tables.len(),
                if report.proven() {
                    "proven"
                } else {
                    "with mismatches"
                }
            );
            Ok(())
        }
        Err(strata_ingest::IngestError::Run(why)) => {
            eprintln!("{}: NOT VALID: {why}", path.display());
            std::process::exit(1);
        }
        Err(e) => Err(e.into()),
    }
}

/// `strata verify --new-signing-key FILE`: FILE holds the seed (mode 0600), FILE.pub the
/// public key.
pub fn new_signing_key(path: &std::path::Path, wrapped_by: Option<&Context>) -> Result<()> {
    anyhow::ensure!(!path.exists(), "{} exists: not overwritten", path.display());
    let (seed, public) = strata_ingest::new_signing_key();
    let public_path = path.with_extension("pub");
    let (content, setting) = match wrapped_by {
        Some(ctx) => (
            strata_ingest::wrap_signing_key(&ctx.config.migration, &seed)?,
            "signing_key_wrapped_file",
        ),
        None => (seed, "signing_key_file"),
    };
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{content}")?;
    }
    std::fs::write(&public_path, format!("{public}\n"))
        .with_context(|| format!("cannot write {}", public_path.display()))?;
    println!(
        "[verify]\n{setting} = {:?}\npublic_key_file = {:?}",
        path.display().to_string(),
        public_path.display().to_string()
    );
    Ok(())
}

/// `strata check`.
pub async fn check(ctx: &Context, json: bool) -> Result<()> {
    let migration = prepare(ctx).await?;
    let findings = migration.check().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else if findings.is_empty() {
        println!("every table fits its operational table");
    } else {
        for f in &findings {
            println!("{}", f.to_line());
        }
    }
    if findings
        .iter()
        .any(|f| f.severity == strata_ingest::Severity::Error)
    {
        anyhow::bail!("the operational schema cannot take the source as configured");
    }
    Ok(())
}

/// `strata profile`.
pub async fn profile(ctx: &Context, json: bool) -> Result<()> {
    let migration = prepare(ctx).await?;
    let profiles = migration.profile().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&profiles)?);
    } else {
        for p in &profiles {
            println!("{}", p.to_text());
        }
    }
    Ok(())
}

/// `strata plan`.
pub async fn plan(ctx: &Context, json: bool) -> Result<()> {
    let migration = prepare(ctx).await?;
    let (report, previous) = migration.plan().await?;
    if json {
        let out = serde_json::json!({ "plan": report, "previous": previous });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "plan under policy {} (as of {}): nothing is moved\n",
            report.policy_version, report.as_of
        );
        print!("{}", report.to_text());
        if !report.holds.is_empty() {
            println!("\nlegal holds in force: {}", report.holds.join(", "));
        }
        if let Some(previous) = previous {
            print!("\n{}", report.diff(&previous));
        }
    }
    Ok(())
}

/// `strata explain`.
pub async fn explain(ctx: &Context, table: &str, key: &str) -> Result<()> {
    let migration = prepare(ctx).await?;
    let e = migration.explain(table, key).await?;
    let held = if e.decision.held {
        ", under legal hold"
    } else {
        ""
    };
    println!(
        "{} {}: {} ({}{held})\n",
        e.table,
        e.key,
        e.decision.tier,
        e.decision.reason.as_str()
    );
    println!("facts:");
    for f in &e.facts {
        println!("  {f}");
    }
    println!("rules, in precedence order:");
    for s in &e.steps {
        println!("  {s}");
    }
    Ok(())
}

/// `strata policy check`.
pub async fn policy_check(ctx: &Context, file: Option<PathBuf>) -> Result<()> {
    let mut migration = ctx.config.migration.clone();
    if let Some(file) = file {
        let full = std::fs::canonicalize(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        migration.policy.file = full.display().to_string();
    }
    let policy = strata_ingest::read_policy(&migration)?;
    let strata_ingest::PolicyCheck { problems, warnings } =
        strata_ingest::check_policy(&migration, &policy).await?;
    for w in warnings {
        eprintln!("{}: warning: {w}", migration.policy_path().display());
    }
    if problems.is_empty() {
        println!(
            "{}: policy {} is valid for {} tables",
            migration.policy_path().display(),
            policy.version,
            migration.tables.len()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("{}: {p}", migration.policy_path().display());
        }
        anyhow::bail!("{} problem(s): nothing was run", problems.len())
    }
}

/// What `strata migrate` was asked for.
pub struct MigrateOptions {
    /// Print the report as JSON.
    pub json: bool,
    /// Also write the report as JSON here.
    pub report_file: Option<PathBuf>,
    /// Serve Prometheus metrics here while the run lasts.
    pub metrics: Option<String>,
    /// Roll back the run in progress instead.
    pub abandon: bool,
    /// Create a replication slot first, and follow the source's changes after the copy.
    pub follow: bool,
}

/// `strata migrate`.
pub async fn migrate(ctx: &Context, options: MigrateOptions) -> Result<()> {
    let MigrateOptions {
        json,
        report_file,
        metrics,
        abandon,
        follow,
    } = options;
    if abandon {
        match Migration::abandon(&ctx.config.migration).await? {
            Some(run) => println!(
                "run {run} abandoned: its operational rows deleted, its archive manifests withdrawn (their files go with `strata archive gc`); the next `strata migrate` starts a new run"
            ),
            None => println!("no run in progress: nothing to abandon"),
        }
        return Ok(());
    }
    let mut migration = prepare(ctx).await?;
    migration.follow(follow);
    let _metrics = match &metrics {
        Some(addr) => Some(watch::serve_metrics(addr, migration.progress()).await?),
        None => None,
    };
    let watcher = watch::show(migration.progress());
    let report = migration
        .run(&mut |t| {
            if !json {
                eprintln!(
                    "{}: {} rows ({} operational, {} archive, {} quarantined)",
                    t.table, t.source_rows, t.operational_rows, t.archive_rows, t.quarantined_rows
                )
            }
        })
        .await;
    watcher.abort();
    let report = report?;
    write_run_report(&report, report_file.as_deref(), json)?;
    if follow {
        eprintln!("bulk copy done; following the source's changes (Ctrl-C stops; `strata sync` goes on later)");
        return crate::follow::run_sync(&migration, false).await;
    }
    Ok(())
}

/// A run's report: to `file` as JSON if given, and printed (as JSON or text).
fn write_run_report(
    report: &strata_ingest::RunReport,
    file: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    if let Some(path) = file {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!(
            "run {} under policy {} (as of {})\n",
            report.run_id, report.policy_version, report.as_of
        );
        print!("{}", report.to_text());
    }
    Ok(())
}
