//! `strata init`: introspect a source and draft a `strata.toml` with guesses marked for review.

mod classes;
mod conventions;
mod fhir;
mod policy;

use crate::config::RecordDateConfig;
use classes::propose_classes;
use conventions::{guess_date, guess_key, guess_parent_dates, guess_period};
pub use fhir::FhirGuess;

use crate::db::{Db, TableSchema};
use crate::error::Result;
use crate::value::ColumnType;
use std::collections::BTreeMap;
use std::fmt::Write;
use strata_deidentify::Class;

/// Names the field gives a patient column (OMOP's `person_id`, MIMIC's `subject_id`, ...).
const PATIENT_NAMES: &[&str] = &[
    "patient_id",
    "patientid",
    "patient",
    "pat_id",
    "pt_id",
    "person_id",
    "subject_id",
    "patient_key",
    "patient_uuid",
    "patient_nbr",
    "mrn",
    "medical_record_number",
];
fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn is_patient_table(name: &str) -> bool {
    matches!(
        lower(name).as_str(),
        "patient" | "patients" | "person" | "persons" | "people"
    )
}

/// The guesses for one table.
#[derive(Debug, Clone, Default)]
pub struct TableGuess {
    /// Primary key and how it was found (`declared`, or the evidence for the guess).
    pub primary_key: (Vec<String>, String),
    /// Patient key column.
    pub patient_key: Option<String>,
    /// Parent table and foreign key to reach the patient.
    pub patient_via: Option<(String, String)>,
    /// What dates a record, and the evidence when it is not a column of the table.
    pub record_date: Option<(RecordDateConfig, String)>,
    /// BLOB columns with a content-type column if one was found.
    pub blobs: Vec<(String, Option<String>)>,
    /// Proposed classes of the other columns (for researchers' exports): column, class, the
    /// table a foreign record key references, and what it was proposed from.
    pub classes: Vec<(String, Class, Option<String>, &'static str)>,
    /// Columns without a proposed class.
    pub unclassified: Vec<String>,
    /// The FHIR mapping proposed for the table, when its shape is recognised.
    pub fhir: Option<FhirGuess>,
}

/// Introspects every table of the source and guesses its settings.
pub async fn guess_tables(db: &Db) -> Result<BTreeMap<String, (TableSchema, TableGuess)>> {
    let mut out = BTreeMap::new();
    for name in db.table_names().await? {
        let schema = db.table_schema(&name).await?;
        let mut g = TableGuess::default();
        if !is_patient_table(&name) {
            // By the field's names, else by a declared foreign key to the patients table.
            g.patient_key = schema
                .columns
                .iter()
                .find(|c| PATIENT_NAMES.contains(&lower(&c.name).as_str()))
                .map(|c| c.name.clone())
                .or_else(|| {
                    schema
                        .foreign_keys
                        .iter()
                        .find(|(_, to, _)| is_patient_table(to))
                        .map(|(fk, _, _)| fk.clone())
                });
        }
        g.primary_key = guess_key(db, &name, &schema, g.patient_key.as_deref()).await?;
        g.record_date = match guess_period(&name, &schema) {
            Some(period) => Some((
                period,
                "a period table: dated by its end, current while open".into(),
            )),
            None => {
                guess_date(&name, &schema).map(|c| (RecordDateConfig::Column(c), String::new()))
            }
        };
        for c in schema
            .columns
            .iter()
            .filter(|c| c.col_type == ColumnType::Bytes)
        {
            let ct = schema
                .columns
                .iter()
                .find(|m| {
                    ["mime_type", "content_type", "mimetype", "contenttype"]
                        .contains(&lower(&m.name).as_str())
                })
                .map(|m| m.name.clone());
            g.blobs.push((c.name.clone(), ct));
        }
        out.insert(name, (schema, g));
    }
    // The patients table's key is the column the clinical tables share (`subject_id`) when it
    // has one, not a surrogate key (`row_id`) nothing else references; else its primary key.
    let mut shared: BTreeMap<String, usize> = BTreeMap::new();
    for (_, g) in out.values() {
        if let Some(p) = &g.patient_key {
            *shared.entry(lower(p)).or_default() += 1;
        }
    }
    let most_shared = shared
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(name, _)| name);
    for (name, (schema, g)) in out.iter_mut() {
        if !is_patient_table(name) {
            continue;
        }
        g.patient_key = schema
            .columns
            .iter()
            .find(|c| Some(lower(&c.name)) == most_shared)
            .map(|c| c.name.clone())
            .or_else(|| g.primary_key.0.first().cloned());
    }
    // Tables without a patient column reach the patient through a foreign key to one that has it.
    let has_patient: Vec<String> = out
        .iter()
        .filter(|(_, (_, g))| g.patient_key.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    for (_, (schema, g)) in out.iter_mut() {
        if g.patient_key.is_some() {
            continue;
        }
        g.patient_via = schema
            .foreign_keys
            .iter()
            .find(|(_, t, _)| has_patient.contains(t))
            .map(|(c, t, _)| (t.clone(), c.clone()));
    }
    guess_parent_dates(db, &mut out).await?;
    for (name, (schema, g)) in out.iter_mut() {
        propose_classes(db, name, schema, g).await?;
        g.fhir = fhir::guess_fhir(name, schema, g);
    }
    Ok(out)
}

/// A record date as the config writes it.
fn record_date_toml(d: &RecordDateConfig) -> String {
    match d {
        RecordDateConfig::Column(c) => toml_str(c),
        RecordDateConfig::Period { start, end } => {
            format!("{{ start = {}, end = {} }}", toml_str(start), toml_str(end))
        }
        RecordDateConfig::Via {
            via,
            foreign_key,
            parent_key,
            column,
        } => {
            let mut s = format!(
                "{{ via = {}, foreign_key = {}",
                toml_str(via),
                toml_str(foreign_key)
            );
            if let Some(k) = parent_key {
                s.push_str(&format!(", parent_key = {}", toml_str(k)));
            }
            if let Some(c) = column {
                s.push_str(&format!(", column = {}", toml_str(c)));
            }
            s + " }"
        }
    }
}

/// A TOML key: bare when it can be.
fn toml_key(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        s.to_string()
    } else {
        toml_str(s)
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The archive API's settings a drafted config starts with: enough for `strata serve` and
/// `strata token` on this machine, every development-only setting marked for review.
const API_SECTION: &str = r#"[api]
listen = "127.0.0.1:8443"
plain_http = true  # REVIEW: development only (loopback); set tls_cert_file and tls_key_file
[api.auth]
issuer = "strata-dev"  # REVIEW: your identity provider's issuer
audience = "strata"  # REVIEW: the audience its tokens name
hs256_secret_env = "STRATA_JWT_SECRET"  # REVIEW: development only (`strata token`); set jwks_file or public_key_files
[api.audit]
key_env = "STRATA_AUDIT_KEY"  # 64 hex characters; keep it apart from the archive's KEK

"#;

/// The environment variable a drafted config reads the source's password from.
const SOURCE_PASSWORD_VAR: &str = "STRATA_SOURCE_PASSWORD";

/// The source URL as a config keeps it: a password never in the file, but read from
/// [`SOURCE_PASSWORD_VAR`] when the config is loaded (`${VAR}`), with a note saying so.
fn config_url(url: &str) -> (String, String) {
    const PLACEHOLDER: &str = "STRATAPASSWORDPLACEHOLDER";
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some(PLACEHOLDER));
            (
                u.to_string()
                    .replace(PLACEHOLDER, &format!("${{{SOURCE_PASSWORD_VAR}}}")),
                format!("  # REVIEW: export {SOURCE_PASSWORD_VAR}, percent-encoded (the password is never written here)"),
            )
        }
        _ => (url.to_string(), String::new()),
    }
}

/// What `strata init` drafts: the config and, to write beside it, a policy.
#[derive(Debug, Clone)]
pub struct Draft {
    /// `strata.toml`.
    pub config: String,
    /// `policy.toml`, every rule to review.
    pub policy: String,
}

/// Drafts `strata.toml` for a source URL.
pub async fn draft_config(source_url: &str) -> Result<String> {
    Ok(draft(source_url).await?.config)
}

/// Drafts `strata.toml` and a policy for a source URL.
pub async fn draft(source_url: &str) -> Result<Draft> {
    let db = Db::connect(source_url, true).await?;
    let tables = guess_tables(&db).await?;
    db.close().await;
    Ok(Draft {
        config: config_text(source_url, &tables),
        policy: policy::draft_policy(&tables),
    })
}

fn config_text(source_url: &str, tables: &BTreeMap<String, (TableSchema, TableGuess)>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Drafted by `strata init`. Lines marked REVIEW are guesses: check each one."
    );
    let (url, note) = config_url(source_url);
    let _ = writeln!(s, "[source]\nurl = {}{note}\n", toml_str(&url));
    let _ = writeln!(s, "[operational]\nurl = \"sqlite://operational.db\"  # REVIEW: the new operational database\n");
    let _ = writeln!(s, "[archive]\nlocation = \"archive\"\nkek_id = \"kek-1\"\nkek_env = \"STRATA_KEK\"  # 64 hex characters\n");
    let _ = writeln!(s, "[policy]\nfile = \"policy.toml\"\n");
    let reference: Vec<&str> = tables
        .iter()
        .filter(|(_, (_, g))| g.patient_key.is_none() && g.patient_via.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !reference.is_empty() {
        let _ = writeln!(
            s,
            "# REVIEW: tables without patients (reference data?): {}.\n# Pin them in the policy so that none is archived out of every patient's reach:\n#   [tables.{}]\n#   tier = \"operational\"\n",
            reference.join(", "),
            reference[0]
        );
    }
    s.push_str(API_SECTION);
    for (name, (_, g)) in tables {
        let bare = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let key = if bare { name.clone() } else { toml_str(name) };
        let _ = writeln!(s, "[tables.{key}]");
        let pk: Vec<String> = g.primary_key.0.iter().map(|c| toml_str(c)).collect();
        let note = if g.primary_key.1 == "declared" {
            String::new()
        } else {
            format!("  # REVIEW: {}", g.primary_key.1)
        };
        let _ = writeln!(s, "primary_key = [{}]{note}", pk.join(", "));
        match (&g.patient_key, &g.patient_via) {
            (Some(p), _) => {
                let sharing = tables
                    .values()
                    .filter(|(_, other)| other.patient_key.as_deref() == Some(p))
                    .count();
                let _ = writeln!(
                    s,
                    "patient_key = {}  # REVIEW: guessed from the column name ({sharing} tables have it)",
                    toml_str(p)
                );
            }
            (None, Some((via, fk))) => {
                let _ = writeln!(s, "patient = {{ via = {}, foreign_key = {} }}  # REVIEW: guessed from a foreign key", toml_str(via), toml_str(fk));
            }
            (None, None) => {
                let _ = writeln!(s, "# REVIEW: no patient key found (reference data?)");
            }
        }
        match &g.record_date {
            Some((d, why)) => {
                let why = if why.is_empty() { "guessed" } else { why };
                let _ = writeln!(s, "record_date = {}  # REVIEW: {why}", record_date_toml(d));
            }
            None if is_patient_table(name) => {
                let _ = writeln!(
                    s,
                    "# the patients table: birth and death dates are no record date; pin it in the policy (tier = \"operational\")"
                );
            }
            None => {
                let _ = writeln!(s, "# REVIEW: no record date found");
            }
        }
        for (col, ct) in &g.blobs {
            let ct = ct
                .as_ref()
                .map(|c| format!(", content_type_column = {}", toml_str(c)))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "blobs = [{{ column = {}{ct} }}]  # REVIEW: binary column",
                toml_str(col)
            );
        }
        for (col, class, references, why) in &g.classes {
            let line = match references {
                Some(t) => format!(
                    "columns.{} = {{ class = \"{class}\", references = {} }}",
                    toml_key(col),
                    toml_str(t)
                ),
                None => format!("columns.{}.class = \"{class}\"", toml_key(col)),
            };
            let _ = writeln!(s, "{line}  # REVIEW: {why}");
        }
        if !g.unclassified.is_empty() {
            let _ = writeln!(
                s,
                "# REVIEW: no class, so never in an export: {}",
                g.unclassified.join(", ")
            );
        }
        s.push('\n');
    }
    for (name, (_, g)) in tables {
        let Some(f) = &g.fhir else { continue };
        let _ = writeln!(
            s,
            "[api.fhir.{}]  # REVIEW: recognised from the table's name and columns\nresource = \"{}\"",
            toml_key(name),
            f.resource
        );
        for (setting, value) in &f.settings {
            let _ = writeln!(s, "{setting} = {}", toml_str(value));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_drafted_config_reads_the_source_password_from_the_environment() {
        let (url, note) = super::config_url("postgres://etl:s3cr%3Et@db.example:5432/ehr");
        assert_eq!(
            url,
            "postgres://etl:${STRATA_SOURCE_PASSWORD}@db.example:5432/ehr"
        );
        assert!(note.contains("STRATA_SOURCE_PASSWORD"));
        assert!(!url.contains("s3cr") && !url.contains("***"));
        let (url, note) = super::config_url("sqlite://legacy.db");
        assert_eq!((url.as_str(), note.as_str()), ("sqlite://legacy.db", ""));
    }
}
