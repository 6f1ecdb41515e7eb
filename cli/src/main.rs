//! `strata`: the command line that ties ingest, policy, archive and API together.

mod archive;
mod config;
mod demo;
mod exports;
mod malloc_tuning;
mod watch;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use strata_archive::ArchiveReader;
use strata_archive_api::{AppState, Auth, Role};
use strata_ingest::Migration;

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
        /// postgres://... or sqlite://path
        #[arg(long)]
        source: String,
        /// Write the draft here instead of standard output.
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
        command: PolicyCommand,
    },
    /// Archive tools.
    Archive {
        #[command(subcommand)]
        command: archive::ArchiveCommand,
    },
    /// Legal holds: records under a hold are never purged.
    Hold {
        #[command(subcommand)]
        command: HoldCommand,
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
        roles: Vec<RoleArg>,
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
        command: AuditCommand,
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

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the audit log's hash chain; name every edited, inserted or deleted entry.
    Verify {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file against the config and the source schema; lists every problem.
    Check {
        /// The policy file (by default, the one strata.toml names).
        file: Option<PathBuf>,
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Place a hold on a patient, a table, or the rows of a table whose column equals a value.
    Place {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        #[arg(long, conflicts_with_all = ["table", "column", "value"])]
        patient: Option<String>,
        #[arg(long, required_unless_present = "patient")]
        table: Option<String>,
        #[arg(long, requires = "value")]
        column: Option<String>,
        #[arg(long, requires = "column")]
        value: Option<String>,
        /// Who places it.
        #[arg(long)]
        by: String,
        /// Why (a case or matter reference).
        #[arg(long)]
        reason: String,
    },
    /// Release a hold.
    Release {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        hold_id: String,
        #[arg(long)]
        by: String,
        #[arg(long)]
        reason: String,
    },
    /// List holds, placed and released.
    List {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
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

async fn hold(command: HoldCommand) -> Result<()> {
    use strata_control::Control;
    use strata_cutoff_policies::HoldScope;
    let open =
        |config: &PathBuf| -> Result<String> { Ok(config::load(config)?.migration.control_url()?) };
    match command {
        HoldCommand::Place {
            config,
            patient,
            table,
            column,
            value,
            by,
            reason,
        } => {
            let control = Control::open(&open(&config)?).await?;
            let scope = match (patient, table, column, value) {
                (Some(p), _, _, _) => HoldScope::Patient(p),
                (None, Some(t), Some(c), Some(v)) => HoldScope::Filter {
                    table: t,
                    column: c,
                    value: v,
                },
                (None, Some(t), _, _) => HoldScope::Table(t),
                _ => anyhow::bail!(
                    "name a --patient, a --table, or a --table with --column and --value"
                ),
            };
            let id = control.place_hold(&scope, &reason, &by).await?;
            println!("{id}");
        }
        HoldCommand::Release {
            config,
            hold_id,
            by,
            reason,
        } => {
            Control::open(&open(&config)?)
                .await?
                .release_hold(&hold_id, &reason, &by)
                .await?;
            println!("released {hold_id}");
        }
        HoldCommand::List { config } => {
            let holds = Control::open(&open(&config)?).await?.holds().await?;
            println!("{}", serde_json::to_string_pretty(&holds)?);
        }
    }
    Ok(())
}

fn today() -> chrono::NaiveDate {
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
            let draft = strata_ingest::draft_config(&source).await?;
            match output {
                Some(path) => std::fs::write(&path, draft)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{draft}"),
            }
            Ok(())
        }
        Command::Check { config, json } => {
            let loaded = config::load(&config)?;
            let migration = Migration::prepare(loaded.migration, today()).await?;
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
        Command::Profile { config, json } => {
            let loaded = config::load(&config)?;
            let migration = Migration::prepare(loaded.migration, today()).await?;
            let profiles = migration.profile(today()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&profiles)?);
            } else {
                for p in &profiles {
                    println!("{}", p.to_text());
                }
            }
            Ok(())
        }
        Command::Plan { config, json } => {
            let loaded = config::load(&config)?;
            let migration = Migration::prepare(loaded.migration, today()).await?;
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
        Command::Explain { config, table, key } => {
            let loaded = config::load(&config)?;
            let migration = Migration::prepare(loaded.migration, today()).await?;
            let e = migration.explain(&table, &key).await?;
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
        Command::Policy {
            command: PolicyCommand::Check { file, config },
        } => {
            let loaded = config::load(&config)?;
            let mut migration = loaded.migration;
            if let Some(file) = file {
                let full = std::fs::canonicalize(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                migration.policy.file = full.display().to_string();
            }
            let policy = strata_ingest::read_policy(&migration)?;
            let problems = strata_ingest::check_policy(&migration, &policy).await?;
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
        Command::Hold { command } => hold(command).await,
        Command::Archive { command } => archive::run(command).await,
        Command::Migrate {
            config,
            json,
            report: report_file,
            metrics,
            abandon,
        } => {
            let loaded = config::load(&config)?;
            if abandon {
                match Migration::abandon(&loaded.migration).await? {
                    Some(run) => println!(
                        "run {run} abandoned: its operational rows deleted, its archive manifests withdrawn (their files go with `strata archive gc`); the next `strata migrate` starts a new run"
                    ),
                    None => println!("no run in progress: nothing to abandon"),
                }
                return Ok(());
            }
            let mut migration = Migration::prepare(loaded.migration, today()).await?;
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
                            t.table,
                            t.source_rows,
                            t.operational_rows,
                            t.archive_rows,
                            t.quarantined_rows
                        )
                    }
                })
                .await;
            watcher.abort();
            let report = report?;
            if let Some(path) = report_file {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "run {} under policy {} (as of {})\n",
                    report.run_id, report.policy_version, report.as_of
                );
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Serve {
            config,
            benchmark_ceiling,
        } => {
            let loaded = config::load(&config)?;
            let api = loaded
                .api
                .clone()
                .context("the config has no [api] section")?;
            let classes = loaded.classification()?;
            let (store, keys) = loaded.migration.archive.open(&loaded.base_dir)?;
            let archive = ArchiveReader::open(store, keys).await?;
            let control = strata_control::Control::open(&loaded.migration.control_url()?).await?;
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
            let state = AppState::new(archive, control, &api, &loaded.base_dir, classes)
                .map_err(anyhow::Error::msg)?
                .with_operational_database(operational);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let stopped = async {
                let _ = rx.await;
            };
            let serving = match benchmark_ceiling {
                None => strata_archive_api::serve(&api, &loaded.base_dir, state, stopped).await?,
                Some(bytes) => {
                    let listen: std::net::SocketAddr = api.listen.parse()?;
                    anyhow::ensure!(
                        listen.ip().is_loopback(),
                        "--benchmark-ceiling answers every history with an empty one: it serves on a loopback address only"
                    );
                    let body = ceiling_body(bytes);
                    let app = strata_archive_api::ceiling_router(state.clone(), body);
                    eprintln!(
                        "benchmark ceiling: every history is a precomputed {bytes}-byte body"
                    );
                    strata_archive_api::serve_router(&api, &loaded.base_dir, state, app, stopped)
                        .await?
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
        } => {
            let loaded = config::load(&config)?;
            let api = loaded.api.context("the config has no [api] section")?;
            let auth =
                Auth::from_config(&api.auth, &loaded.base_dir).map_err(anyhow::Error::msg)?;
            let roles: Vec<Role> = roles.into_iter().map(Role::from).collect();
            let token = auth
                .issue_dev_token(&user, &roles, &patients, ttl_secs)
                .context("development tokens need an HS256 secret in [api.auth]; in production the identity provider issues tokens")?;
            println!("{token}");
            Ok(())
        }
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
            let loaded = config::load(&config)?;
            print!("{}", exports::check(&loaded, profile.as_deref()).await?);
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => {
            let loaded = config::load(&config)?;
            let api = loaded.api.context("the config has no [api] section")?;
            let control = strata_control::Control::open(&loaded.migration.control_url()?).await?;
            let key = strata_archive_api::audit_key(&api, &loaded.base_dir)
                .map_err(anyhow::Error::msg)?;
            let report = strata_control::AuditLog::open(&control, key)
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
    }
}

/// Threads `strata serve` keeps for blocking work (reads of a local archive, which the
/// object store does on blocking threads). Each thread costs its allocator's heap (~4 MiB
/// here): without a cap, a burst of readers grew the pool, and the memory with it, with the
/// number of users. Other commands keep tokio's default, since a migration's long-lived
/// source readers live on blocking threads and must not starve its archive writes; the
/// demo's migration (SQLite into SQLite, one worker: one reader) fits within the cap. Four
/// serve 100 users as fast as eight did (docs/benchmarks.md), in ~20 MiB less.
const SERVE_BLOCKING_THREADS: usize = 4;

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

fn main() -> ExitCode {
    malloc_tuning::tune();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }) {
        runtime.max_blocking_threads(SERVE_BLOCKING_THREADS);
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
