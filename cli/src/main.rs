//! `strata`: the command line that ties ingest, policy, archive and API together.

mod archive;
mod closed_pipe;
mod config;
mod context;
mod demo;
mod destructions;
mod exports;
mod follow;
mod holds;
mod malloc_tuning;
mod migration;
mod serve;
mod tier;
mod watch;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use context::Context;
use std::path::PathBuf;
use std::process::ExitCode;

/// A bulk migration allocates and frees small values (texts, keys) at millions per second;
/// mimalloc halves what that costs against the system allocator (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Archival and tiered storage for healthcare data migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a legacy EHR in SQLite, migrate and archive it, and serve the archive API.
    Demo {
        /// Working directory (cleared if an earlier demo made it).
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Size of the generated database (1 ≈ 2,000 patients).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// API port on 127.0.0.1.
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Migrate only; do not serve.
        #[arg(long)]
        no_serve: bool,
    },
    /// Introspect a source database and print a draft strata.toml.
    Init {
        /// The legacy database: postgres://user@host/db (a password from ${VAR}), sqlite://path,
        /// or csv://dir (a directory of CSV exports, one table per file, e.g. Synthea's)
        #[arg(long)]
        source: String,
        /// Write the draft here instead of standard output, and a draft policy.toml beside it
        /// (unless one exists).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Show where every row would go (rows, bytes and patients per tier), compared with the
    /// previous plan. Moves nothing.
    Plan {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Print JSON (the plan and the previous plan).
        #[arg(long)]
        json: bool,
        /// Preview a `strata tier` pass instead: the operational database after go-live.
        #[arg(long)]
        tier: bool,
        /// With --tier: the day the policy reckons from (default: today).
        #[arg(long, requires = "tier")]
        as_of: Option<chrono::NaiveDate>,
        /// With --tier: accept an --as-of later than today.
        #[arg(long, requires = "tier")]
        allow_future_as_of: bool,
    },
    /// After go-live: move the operational records the policy now sends to the archive (archive
    /// files first, then each row deleted where the application has not changed it since it
    /// was read), file those past retention for approval, and destroy those of approved lists.
    /// Legal holds, foreign keys and DELETE triggers are respected. Run it on a schedule
    /// (deploy/); `strata plan --tier` previews it.
    Tier {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Who requests the destruction of the records found past retention (a records
        /// manager other than this one approves it).
        #[arg(long)]
        by: String,
        /// The day the policy reckons from (default: today).
        #[arg(long)]
        as_of: Option<chrono::NaiveDate>,
        /// Accept an --as-of later than today (for rehearsals on a copy).
        #[arg(long)]
        allow_future_as_of: bool,
        /// Also write the report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare each source table with the operational table it will load: what would be
    /// truncated, rounded or refused, counted in the data. Moves nothing.
    Check {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prove the last run: per table, every source row is in exactly one place (operational,
    /// archive, quarantine, purged), values included. Exit status: 0 proven, 1 mismatch, 2
    /// could not verify.
    Verify {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `reread` (default): read every archived BLOB back, decrypt it and hash it;
        /// `trust-catalog`: count each by the hash its reference records.
        #[arg(long, default_value = "reread", value_parser = ["reread", "trust-catalog"])]
        blobs: String,
        /// Also write the report as JSON here (signed when [verify] names a signing key).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Go on with a verification that stopped (killed, or a source that went away): the
        /// tables it proved are taken as proven then (the report says when), the others read.
        #[arg(long)]
        resume: bool,
        /// Instead, check a report written before: its signature against the public key
        /// [verify] names (exit status 1 when it does not hold).
        #[arg(long, conflicts_with_all = ["report", "new_signing_key"])]
        check_report: Option<PathBuf>,
        /// Instead, write a new Ed25519 signing key to this file (and its public key to
        /// FILE.pub), for [verify] signing_key_file and public_key_file.
        #[arg(long)]
        new_signing_key: Option<PathBuf>,
        /// With --new-signing-key: keep the key wrapped by the archive's key service (the
        /// config's KEK, or the KMS behind it), for [verify] signing_key_wrapped_file.
        #[arg(long, requires = "new_signing_key")]
        wrapped: bool,
    },
    /// Change sync from a PostgreSQL source: apply every change committed since the bulk copy
    /// of a run made with `strata migrate --follow`, through the policy, exactly once.
    #[command(args_conflicts_with_subcommands = true)]
    Sync {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Stop once every change committed on the source before sync started is applied
        /// (else follow until stopped).
        #[arg(long)]
        catch_up: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics while sync runs (lag, retained WAL,
        /// transactions applied).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        #[command(subcommand)]
        command: Option<follow::SyncCommand>,
    },
    /// Switch to the new system, guided: catch up, check the source quiet, prove the run with
    /// verify, set the operational sequences past the source's values, and write a go / no-go
    /// report. On "go" the cutover is recorded and the replication slot dropped; on "no-go"
    /// (exit status 1) everything stays as it was.
    Cutover {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Who cuts over (recorded).
        #[arg(long)]
        by: String,
        /// How long the source must stay quiet after sync caught up.
        #[arg(long, default_value_t = 5)]
        quiet_seconds: u64,
        /// Also write the report as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo the last finished run on the target side (the source is never touched): the
    /// operational tables it created dropped, those it loaded into emptied, its quarantine and
    /// checkpoints deleted, its archive manifests withdrawn (files go with `archive gc`), its
    /// destruction records made void; with `--table`, only those tables. Run it again to finish
    /// one cut short.
    Rollback {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Who rolls back (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded; 10 characters or more).
        #[arg(long)]
        reason: String,
        /// Roll back only this table of the run (repeat for more); the run is then unfinished
        /// and `strata migrate` copies these tables again.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Roll back a run that was cut over (the new system's writes to its tables are lost).
        #[arg(long)]
        after_cutover: bool,
    },
    /// Profile each configured table: null rate, distinct values, range, duplicate keys,
    /// implausible dates, invalid LOINC, ICD-10-CM and NPI codes. Moves nothing.
    Profile {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain how the policy decides one record: its facts and each rule.
    Explain {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// The table.
        table: String,
        /// The record's primary key (col=value,... for a composite key).
        key: String,
    },
    /// Cutoff policy tools.
    Policy {
        #[command(subcommand)]
        command: migration::PolicyCommand,
    },
    /// Archive tools.
    Archive {
        #[command(subcommand)]
        command: archive::ArchiveCommand,
    },
    /// Legal holds: records under a hold are never purged.
    Hold {
        #[command(subcommand)]
        command: holds::HoldCommand,
    },
    /// Destruction lists past retention: a records manager other than the requester approves
    /// each before anything is destroyed (two steps, four eyes).
    Destruction {
        #[command(subcommand)]
        command: destructions::DestructionCommand,
    },
    /// Run (or resume) the migration.
    Migrate {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics while the run lasts.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Roll back the run in progress instead (a failed start, or a run whose policy has
        /// changed since): its operational rows are deleted, its archive manifests withdrawn
        /// (files left for `strata archive gc`); the next migrate starts a new run.
        #[arg(long, conflicts_with_all = ["json", "report", "metrics"])]
        abandon: bool,
        /// Create a replication slot before the run's snapshot, then, once the bulk copy is
        /// done, follow the source's changes (`strata sync`) until stopped. PostgreSQL
        /// sources; `strata sync prepare` says what the database owner must do first.
        #[arg(long, conflicts_with = "abandon")]
        follow: bool,
    },
    /// Serve the archive API.
    Serve {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Benchmarks only: answer every history request with a precomputed body of this many
        /// bytes, through the same TLS, HTTP, token, rate-limit and audit path, without
        /// reading the archive (the ceiling bench/api-users.sh compares Strata with).
        #[arg(long, value_name = "BYTES", hide = true)]
        benchmark_ceiling: Option<usize>,
    },
    /// Generate a synthetic legacy EHR database.
    Generate {
        /// postgres://... or sqlite://path (its tables must not exist yet)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The last day of the data (YYYY-MM-DD). By default, today.
        #[arg(long)]
        as_of: Option<chrono::NaiveDate>,
        /// Largest document in bytes.
        #[arg(long, default_value_t = 4 << 20)]
        max_document_bytes: usize,
    },
    /// Issue a development token (HS256 configs only).
    Token {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long = "role", value_enum, required = true)]
        roles: Vec<serve::RoleArg>,
        /// A patient in the user's care (repeat for several): a clinician reads others only by
        /// breaking the glass.
        #[arg(long = "patient")]
        patients: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Print the archive API's OpenAPI document (the one `strata serve` serves at /openapi.json).
    Openapi,
    /// The API's audit log.
    Audit {
        #[command(subcommand)]
        command: serve::AuditCommand,
    },
    /// Researchers' exports.
    Exports {
        #[command(subcommand)]
        command: ExportsCommand,
    },
}

#[derive(Subcommand)]
enum ExportsCommand {
    /// List what each export profile lets out, class by class and, for every archived table,
    /// column by column (with what is removed and why), and what a site's profile lets out
    /// beyond safe_harbor.
    Check {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Only this profile.
        #[arg(long)]
        profile: Option<String>,
    },
}

pub(crate) fn today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo {
            dir,
            scale,
            port,
            no_serve,
        } => {
            demo::run(demo::DemoOptions {
                dir,
                scale,
                port,
                serve: !no_serve,
            })
            .await
        }
        Command::Init { source, output } => {
            let draft = strata_ingest::draft(&source).await?;
            let Some(path) = output else {
                print!("{}", draft.config);
                eprintln!("note: with --output FILE, a draft policy.toml is written beside it");
                return Ok(());
            };
            std::fs::write(&path, &draft.config)
                .with_context(|| format!("cannot write {}", path.display()))?;
            // The policy the config names, beside it: never over a policy already there.
            let policy = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("policy.toml");
            if policy.exists() {
                eprintln!("{} exists: left as it is", policy.display());
            } else {
                std::fs::write(&policy, &draft.policy)
                    .with_context(|| format!("cannot write {}", policy.display()))?;
                eprintln!(
                    "wrote {} and {}: review every line marked REVIEW",
                    path.display(),
                    policy.display()
                );
            }
            Ok(())
        }
        Command::Check { config, json } => migration::check(&Context::load(&config)?, json).await,
        Command::Sync {
            config,
            catch_up,
            metrics,
            command,
        } => match command {
            None => follow::sync(&Context::load(&config)?, catch_up, metrics).await,
            Some(follow::SyncCommand::Prepare { config }) => {
                follow::sync_prepare(&Context::load(&config)?).await
            }
            Some(follow::SyncCommand::Stop { config, .. }) => {
                follow::sync_stop(&Context::load(&config)?).await
            }
        },
        Command::Cutover {
            config,
            by,
            quiet_seconds,
            report,
            json,
        } => follow::cutover(&Context::load(&config)?, &by, quiet_seconds, report, json).await,
        Command::Rollback {
            config,
            by,
            reason,
            tables,
            after_cutover,
        } => {
            let ctx = Context::load(&config)?;
            migration::rollback(&ctx, &by, &reason, &tables, after_cutover).await
        }
        Command::Verify {
            config,
            json,
            report,
            check_report,
            new_signing_key,
            blobs,
            resume,
            wrapped,
        } => match (check_report, new_signing_key) {
            (_, Some(path)) if wrapped => {
                migration::new_signing_key(&path, Some(&Context::load(&config)?))
            }
            (_, Some(path)) => migration::new_signing_key(&path, None),
            (Some(path), None) => migration::check_report(&Context::load(&config)?, &path),
            (None, None) => {
                let ctx = Context::load(&config)?;
                migration::verify(&ctx, json, report, blobs == "reread", resume).await
            }
        },
        Command::Profile { config, json } => {
            migration::profile(&Context::load(&config)?, json).await
        }
        Command::Plan {
            config,
            json,
            tier: true,
            as_of,
            allow_future_as_of,
        } => tier::preview(&Context::load(&config)?, as_of, allow_future_as_of, json).await,
        Command::Plan { config, json, .. } => migration::plan(&Context::load(&config)?, json).await,
        Command::Tier {
            config,
            by,
            as_of,
            allow_future_as_of,
            report,
            json,
        } => {
            let options = tier::TierOptions {
                by,
                as_of,
                allow_future_as_of,
                report,
                json,
            };
            tier::tier(&Context::load(&config)?, options).await
        }
        Command::Explain { config, table, key } => {
            migration::explain(&Context::load(&config)?, &table, &key).await
        }
        Command::Policy {
            command: migration::PolicyCommand::Check { file, config },
        } => migration::policy_check(&Context::load(&config)?, file).await,
        Command::Hold { command } => holds::run(command).await,
        Command::Destruction { command } => destructions::run(command).await,
        Command::Archive { command } => archive::run(command).await,
        Command::Migrate {
            config,
            json,
            report,
            metrics,
            abandon,
            follow,
        } => {
            let options = migration::MigrateOptions {
                json,
                report_file: report,
                metrics,
                abandon,
                follow,
            };
            migration::migrate(&Context::load(&config)?, options).await
        }
        Command::Serve {
            config,
            benchmark_ceiling,
        } => serve::serve(&Context::load(&config)?, benchmark_ceiling).await,
        Command::Generate {
            url,
            scale,
            seed,
            as_of,
            max_document_bytes,
        } => {
            let mut options =
                strata_synthetic_ehr::GeneratorOptions::new(as_of.unwrap_or_else(today));
            options.scale = scale;
            options.seed = seed;
            options.max_document_bytes = max_document_bytes;
            let counts = strata_synthetic_ehr::generate(&url, &options).await?;
            for (table, n) in counts {
                println!("{table:<16} {n:>10}");
            }
            Ok(())
        }
        Command::Token {
            config,
            user,
            roles,
            patients,
            ttl_secs,
        } => serve::token(
            &Context::load(&config)?,
            serve::TokenOptions {
                user,
                roles,
                patients,
                ttl_secs,
            },
        ),
        Command::Openapi => {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &<strata_archive_api::ApiDoc as utoipa::OpenApi>::openapi()
                )?
            );
            Ok(())
        }
        Command::Exports {
            command: ExportsCommand::Check { config, profile },
        } => {
            let ctx = Context::load(&config)?;
            print!("{}", exports::check(&ctx, profile.as_deref()).await?);
            Ok(())
        }
        Command::Audit {
            command: serve::AuditCommand::Verify { config },
        } => serve::audit_verify(&Context::load(&config)?).await,
    }
}

fn main() -> ExitCode {
    malloc_tuning::tune();
    closed_pipe::install();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
        runtime.max_blocking_threads(serve::SERVE_BLOCKING_THREADS);
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(start(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn start(cli: Cli) -> ExitCode {
    // Readable logs on a terminal, one JSON object per line otherwise (for log collectors).
    // rustls warns of what clients do (an IP address sent as a server name, a connection
    // closed without close_notify) on every such connection: noise to an operator, left out.
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| "warn,strata::watch=info,rustls=error".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        logs.init();
    } else {
        logs.json().init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
