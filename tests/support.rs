//! Shared helpers: an isolated directory per test, throw-away PostgreSQL databases, configs,
//! and counting rows in every tier.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use strata_archive::{ArchiveConfig, ArchiveReader};
use strata_ingest::{quote, ColumnType, Db, MigrationConfig, Value};

/// The date every test's data and policy treat as "now".
pub fn as_of() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2026, 6, 30).unwrap()
}

/// The admin URL of the test PostgreSQL cluster that `scripts/test` starts.
pub fn pg_admin_url() -> String {
    std::env::var("STRATA_TEST_PG_URL").expect(
        "STRATA_TEST_PG_URL is not set: run the suite with ./scripts/test, which starts a throw-away PostgreSQL",
    )
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Creates a fresh database on the test cluster and returns its URL.
pub async fn create_pg_database(prefix: &str) -> String {
    let admin = Db::connect(&pg_admin_url(), false)
        .await
        .expect("test PostgreSQL reachable");
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    admin
        .execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    admin.close().await;
    let admin_url = pg_admin_url();
    let base = admin_url.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// Creates a login role that can only read `url`'s database (CONNECT, USAGE on the public
/// schema, SELECT on its tables, as a migration engineer would grant) and returns the URL that
/// connects as it. Call it after the tables exist.
pub async fn read_only_url(url: &str) -> String {
    let (base, db) = url.rsplit_once('/').unwrap();
    let role = format!("{db}_reader");
    let admin = Db::connect(url, false).await.unwrap();
    admin
        .execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {db} TO {role}; \
             GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    admin.close().await;
    let base = base.replacen("postgres@", &format!("{role}@"), 1);
    format!("{base}/{db}")
}

/// A temporary directory kept when the test fails (its path is printed).
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("strata-test-")
                .tempdir()
                .unwrap(),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Writes a strata.toml (the example's tables, given URLs) plus a policy and a KEK into `dir`.
pub fn write_config(
    dir: &Path,
    source: &str,
    operational: &str,
    control: &str,
    policy: &str,
) -> PathBuf {
    let mut table: toml::Table = toml::from_str(include_str!("../deploy/strata.toml")).unwrap();
    let parts: toml::Table = toml::from_str(&format!(
        r#"
        [source]
        url = "{source}"
        [operational]
        url = "{operational}"
        [control]
        url = "{control}"
        [archive]
        location = "archive"
        kek_id = "test-kek"
        kek_file = "kek.hex"
        [policy]
        file = "policy.toml"
        [api]
        listen = "127.0.0.1:0"
        plain_http = true
        [api.auth]
        issuer = "strata-test"
        audience = "strata"
        hs256_secret_file = "jwt-secret"
        [api.audit]
        key_file = "audit.key"
        "#
    ))
    .unwrap();
    let fhir = table.get("api").and_then(|a| a.get("fhir")).cloned();
    for (k, v) in parts {
        table.insert(k, v);
    }
    if let (Some(fhir), Some(toml::Value::Table(api))) = (fhir, table.get_mut("api")) {
        api.insert("fhir".into(), fhir);
    }
    std::fs::write(dir.join("strata.toml"), toml::to_string(&table).unwrap()).unwrap();
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    std::fs::write(dir.join("kek.hex"), strata_archive::Kek::generate_hex()).unwrap();
    std::fs::write(dir.join("jwt-secret"), strata_archive::Kek::generate_hex()).unwrap();
    std::fs::write(dir.join("audit.key"), strata_archive::Kek::generate_hex()).unwrap();
    dir.join("strata.toml")
}

/// The head of a hand-written strata.toml: source, operational database, an archive in
/// `archive/` under the KEK of `kek.hex`, and the policy in `policy.toml` (see
/// [`write_run_files`]). Tests append their `[run]` and `[tables.*]` sections.
pub fn run_config(source: &str, operational: &str) -> String {
    format!(
        "[source]\nurl = \"{source}\"\n[operational]\nurl = \"{operational}\"\n\
         [archive]\nlocation = \"archive\"\nkek_id = \"test-kek\"\nkek_file = \"kek.hex\"\n\
         [policy]\nfile = \"policy.toml\"\n"
    )
}

/// Writes a hand-written strata.toml and policy, plus a fresh KEK (`kek.hex`), into `dir`.
pub fn write_run_files(dir: &Path, config: &str, policy: &str) {
    std::fs::write(dir.join("strata.toml"), config).unwrap();
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    std::fs::write(dir.join("kek.hex"), strata_archive::Kek::generate_hex()).unwrap();
}

/// The example policy with a fixed `as_of`.
pub fn example_policy() -> String {
    include_str!("../deploy/policy.toml").replace(
        "# as_of = \"2026-11-25\"",
        &format!("as_of = \"{}\"", as_of()),
    )
}

pub fn load_config(path: &Path) -> MigrationConfig {
    let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    table.remove("api");
    MigrationConfig::parse(table, path.parent().unwrap()).unwrap()
}

pub async fn count(db: &Db, sql: String) -> u64 {
    match db.fetch_all(sql, vec![ColumnType::Int]).await.unwrap()[0][0] {
        Value::Int(n) => n as u64,
        ref other => panic!("count returned {other:?}"),
    }
}

/// Rows per table in each place: source, operational, archive, quarantine, purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub source: u64,
    pub operational: u64,
    pub archive: u64,
    pub quarantine: u64,
    pub purged: u64,
}

/// Counts every table in every place: the source, the operational database, the archive (by
/// reading every file), the quarantine table, and the destruction records.
pub async fn tier_counts(config: &MigrationConfig) -> BTreeMap<String, Counts> {
    let source = Db::connect(&config.resolve_url(&config.source.url).unwrap(), true)
        .await
        .unwrap();
    let target = Db::connect(&config.resolve_url(&config.operational.url).unwrap(), false)
        .await
        .unwrap();
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let control = strata_control::Control::open(&config.control_url().unwrap())
        .await
        .unwrap();
    let destroyed = control.destroyed_rows().await.unwrap();
    let mut out = BTreeMap::new();
    for table in config.tables.keys() {
        let s = count(&source, format!("SELECT COUNT(*) FROM {}", quote(table))).await;
        let o = count(&target, format!("SELECT COUNT(*) FROM {}", quote(table))).await;
        let q = count(
            &target,
            format!("SELECT COUNT(*) FROM _strata_quarantine WHERE table_name = '{table}'"),
        )
        .await;
        let mut a = 0;
        for m in archive.catalog().tables.get(table).into_iter().flatten() {
            for f in &m.files {
                a += archive
                    .read_file(f)
                    .await
                    .unwrap()
                    .iter()
                    .map(|b| b.num_rows() as u64)
                    .sum::<u64>();
            }
        }
        let purged = destroyed.get(table).copied().unwrap_or(0);
        out.insert(
            table.clone(),
            Counts {
                source: s,
                operational: o,
                archive: a,
                quarantine: q,
                purged,
            },
        );
    }
    source.close().await;
    target.close().await;
    out
}

pub async fn open_archive(config: &ArchiveConfig, base: &Path) -> ArchiveReader {
    let (store, keys) = config.open(base).unwrap();
    ArchiveReader::open(store, keys).await.unwrap()
}

/// Asserts that every source row is in exactly one place, and that the archive is used.
pub fn assert_tiers_add_up(counts: &BTreeMap<String, Counts>) {
    let mut archived = 0;
    for (table, c) in counts {
        assert!(c.source > 0, "{table}: empty source");
        assert_eq!(
            c.source,
            c.operational + c.archive + c.quarantine + c.purged,
            "{table}: {c:?}"
        );
        archived += c.archive;
    }
    assert!(archived > 0, "nothing was archived: {counts:?}");
}

/// Asserts that a run's report counts what is really stored in each place.
pub fn assert_report_matches(report: &strata_ingest::RunReport, counts: &BTreeMap<String, Counts>) {
    for t in &report.tables {
        let reported = Counts {
            source: t.source_rows,
            operational: t.operational_rows,
            archive: t.archive_rows,
            quarantine: t.quarantined_rows,
            purged: t.purged_rows,
        };
        assert_eq!(
            counts[&t.table], reported,
            "{}: stored vs reported",
            t.table
        );
    }
}

/// Generates the synthetic legacy EHR at `url` (documents capped at 300 kB to keep tests fast).
pub async fn generate(url: &str, scale: f64, flaws: bool) {
    let mut options = strata_synthetic_ehr::GeneratorOptions::new(as_of());
    options.scale = scale;
    options.max_document_bytes = 300_000;
    options.flaws = flaws;
    strata_synthetic_ehr::generate(url, &options).await.unwrap();
}

/// A config for a SQLite source with SQLite operational and control databases in `dir`.
pub fn write_sqlite_config(dir: &Path, source: &str, policy: &str) -> PathBuf {
    write_config(
        dir,
        source,
        "sqlite://operational.db",
        "sqlite://control.db",
        policy,
    )
}

/// `strata verify` on the config at `config`: exit status, and standard output then error.
pub fn strata_verify(config: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["verify", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)),
    )
}

/// A records manager's policy for the Synthea sample: reference data stays operational;
/// adults' old records of inactive patients are archived; ongoing conditions, medications and
/// allergies stay.
pub const SYNTHEA_POLICY: &str = r#"
version = "synthea-test-1"
as_of = "2024-06-30"
[defaults]
archive_after = "5y"
patient_inactive_after = "2y"
[tables.patients]
tier = "operational"
[tables.organizations]
tier = "operational"
[tables.providers]
tier = "operational"
[tables.payers]
tier = "operational"
[tables.conditions]
current_when = { column = "STOP", values = ["<null>"] }
[tables.medications]
current_when = { column = "STOP", values = ["<null>"] }
[tables.allergies]
current_when = { column = "STOP", values = ["<null>"] }
"#;

/// Creates the SQLite database `file` in `dir` with `sql`; returns its URL.
pub async fn sqlite_source(dir: &Path, file: &str, sql: &str) -> String {
    let url = format!("sqlite://{}", dir.join(file).display());
    let db = Db::connect(&format!("{url}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(sql).await.unwrap();
    db.close().await;
    url
}

/// A signing key for certificates and reports in `dir` (`signing.key`, `public.key`), named
/// by its strata.toml under `[verify]`; returns the config's path.
pub fn with_signing_key(dir: &Path) -> PathBuf {
    let (seed, public) = strata_ingest::new_signing_key();
    std::fs::write(dir.join("signing.key"), seed).unwrap();
    std::fs::write(dir.join("public.key"), public).unwrap();
    let config_path = dir.join("strata.toml");
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    assert!(!text.contains("[verify]"));
    text.push_str(
        "\n[verify]\nsigning_key_file = \"signing.key\"\npublic_key_file = \"public.key\"\n",
    );
    std::fs::write(&config_path, text).unwrap();
    config_path
}

/// The id of the destruction list a `retain` or `tier` pass filed: first on the line that says
/// it was filed for approval.
pub fn filed_request(out: &str) -> String {
    out.lines()
        .find(|l| l.contains("filed for approval"))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("nothing filed: {out}"))
        .trim()
        .to_string()
}
