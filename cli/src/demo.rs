//! `strata demo`: a legacy EHR generated in SQLite, migrated, archived and served, in one command.

use crate::context::Context;
use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use strata_archive::{ArchiveReader, Kek};
use strata_archive_api::{AppState, Role};
use strata_ingest::Migration;

const MARKER: &str = ".strata-demo";

pub struct DemoOptions {
    pub dir: PathBuf,
    pub scale: f64,
    pub port: u16,
    pub serve: bool,
}

/// The demo's strata.toml: the example's tables with local, embedded parts.
fn demo_config_text() -> Result<String> {
    let mut table: toml::Table = toml::from_str(include_str!("../../deploy/strata.toml"))?;
    let demo: toml::Table = toml::from_str(
        r#"
        [source]
        url = "sqlite://legacy.db"
        [operational]
        url = "sqlite://operational.db"
        [control]
        url = "sqlite://strata-control.db"
        [archive]
        location = "archive"
        kek_id = "demo-kek-1"
        kek_file = "kek.hex"
        [policy]
        file = "policy.toml"
        [api]
        listen = "127.0.0.1:8443"
        tls_cert_file = "tls/cert.pem"
        tls_key_file = "tls/key.pem"
        [api.auth]
        issuer = "strata-demo"
        audience = "strata"
        hs256_secret_file = "jwt-secret"
        [api.audit]
        key_file = "audit.key"
        [api.exports]
        location = "exports"
        pseudonym_key_file = "pseudonym.key"
        [api.viewer]
        dev_sign_in = true
        "#,
    )?;
    // The example's FHIR mapping stays; the rest of its [api] is replaced by the demo's.
    let fhir = table.get("api").and_then(|a| a.get("fhir")).cloned();
    for (k, v) in demo {
        table.insert(k, v);
    }
    if let (Some(fhir), Some(toml::Value::Table(api))) = (fhir, table.get_mut("api")) {
        api.insert("fhir".into(), fhir);
    }
    Ok(format!(
        "# Written by `strata demo`: everything embedded and local. Development keys only.\n{}",
        toml::to_string_pretty(&table)?
    ))
}

fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by `strata demo`; choose another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(MARKER),
        "made by strata demo; removed on the next demo run\n",
    )?;
    let secret_file = |name: &str, content: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, content)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    secret_file("kek.hex", Kek::generate_hex())?;
    secret_file("jwt-secret", Kek::generate_hex())?;
    secret_file("audit.key", Kek::generate_hex())?;
    secret_file("pseudonym.key", Kek::generate_hex())?;
    // A self-signed certificate for the loopback address: the demo serves HTTPS as production
    // does (curl --cacert tls/cert.pem).
    let tls = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot make the demo's TLS certificate")?;
    std::fs::create_dir_all(dir.join("tls"))?;
    std::fs::write(dir.join("tls/cert.pem"), tls.cert.pem())?;
    secret_file("tls/key.pem", tls.signing_key.serialize_pem())?;
    std::fs::write(dir.join("strata.toml"), demo_config_text()?)?;
    std::fs::write(
        dir.join("policy.toml"),
        include_str!("../../deploy/policy.toml"),
    )?;
    Ok(())
}

/// A patient with an archived document, for the printed curl commands.
async fn sample_patient(archive: &ArchiveReader) -> Result<Option<(String, Option<String>)>> {
    let catalog = archive.catalog();
    for (table, manifests) in &catalog.tables {
        let blobs = catalog.blob_columns(table);
        if blobs.is_empty() {
            continue;
        }
        if let Some(file) = manifests.iter().flat_map(|m| m.files.first()).next() {
            for batch in archive.read_file(file).await? {
                let batch = strata_archive::ArchivedBatch::new(&batch, &blobs);
                if batch.num_rows() == 0 {
                    continue;
                }
                let patient = batch.patient(0).unwrap_or_default().to_string();
                let doc = batch.blobs(0).next().map(|(_, r)| r.object);
                return Ok(Some((patient, doc)));
            }
        }
    }
    Ok(catalog
        .tables
        .values()
        .flatten()
        .flat_map(|m| m.files.first())
        .next()
        .map(|f| (f.min_patient.clone(), None)))
}

pub async fn run(options: DemoOptions) -> Result<()> {
    let dir = &options.dir;
    prepare_dir(dir)?;
    let today = chrono::Utc::now().date_naive();
    println!("Strata demo in {}", dir.display());
    println!(
        "1/4 generating a synthetic legacy EHR (SQLite, scale {}) ...",
        options.scale
    );
    let mut gen = strata_synthetic_ehr::GeneratorOptions::new(today);
    gen.scale = options.scale;
    let source = dir.join("legacy.db");
    let counts =
        strata_synthetic_ehr::generate(&format!("sqlite://{}", source.display()), &gen).await?;
    println!(
        "    {} rows in {} tables: {}",
        counts.values().sum::<u64>(),
        counts.len(),
        source.display()
    );

    let ctx = Context::load(&dir.join("strata.toml"))?;
    let loaded = &ctx.config;
    let mut api = ctx.api()?.clone();
    println!(
        "2/4 applying the cutoff policy {} and migrating ...",
        dir.join("policy.toml").display()
    );
    let control = ctx.control().await?.clone();
    let mut migration = Migration::prepare_with(loaded.migration.clone(), control, today).await?;
    let report = migration.run(&mut |_| {}).await?;
    println!("\n{}", report.to_text());
    println!(
        "    operational database: {}",
        dir.join("operational.db").display()
    );
    println!(
        "    encrypted archive:    {} (key: {})",
        dir.join("archive").display(),
        dir.join("kek.hex").display()
    );

    println!("3/4 opening the archive ...");
    let archive = ctx.archive().await?;
    let control = ctx.control().await?.clone();
    let sample = sample_patient(&archive).await?;
    if !options.serve {
        return Ok(());
    }
    api.listen = format!("127.0.0.1:{}", options.port);
    let state = AppState::new(
        archive,
        control,
        &api,
        &loaded.base_dir,
        loaded.classification()?,
    )
    .map_err(anyhow::Error::msg)?;
    let in_care: Vec<String> = sample.iter().map(|(p, _)| p.clone()).collect();
    let token = |user: &str, role: Role, patients: &[String]| {
        state
            .auth
            .issue_dev_token(user, &[role], patients, 24 * 3600)
            .context("the demo config has an HS256 secret")
    };
    let clinician = token("demo-clinician", Role::Clinician, &in_care)?;
    let auditor = token("demo-auditor", Role::Auditor, &[])?;
    let researcher = token("demo-researcher", Role::Researcher, &[])?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = match strata_archive_api::serve(&api, &loaded.base_dir, state, async {
        let _ = stop_rx.await;
    })
    .await
    {
        Ok(s) => s,
        Err(e) => bail!("cannot serve on {}: {e} (try --port)", api.listen),
    };
    let addr = serving.addr;
    println!(
        "4/4 archive API listening on https://{addr} (certificate: {})\n",
        dir.join("tls/cert.pem").display()
    );
    println!("Development tokens (24 h):");
    println!(
        "  clinician, in whose care is patient {}:\n    CLINICIAN={clinician}",
        in_care.first().map_or("-", String::as_str)
    );
    println!("  auditor:\n    AUDITOR={auditor}");
    println!("  researcher:\n    RESEARCHER={researcher}\n");
    let base = format!("https://{addr}");
    let curl = format!("curl -s --cacert {}", dir.join("tls/cert.pem").display());
    if let Some((patient, doc)) = &sample {
        println!("Try:");
        println!("  {curl} -H \"Authorization: Bearer $CLINICIAN\" -H 'X-Purpose-Of-Use: TREAT' {base}/v1/patients/{patient}/history");
        if let Some(doc) = doc {
            println!("  {curl} -o document.bin -D - -H \"Authorization: Bearer $CLINICIAN\" -H 'X-Purpose-Of-Use: TREAT' {base}/v1/patients/{patient}/documents/{doc}");
        }
        println!("  {curl} -i {base}/v1/patients/{patient}/history    # no token: 401");
        println!("  {curl} -H \"Authorization: Bearer $AUDITOR\" {base}/v1/patients/{patient}/disclosures");
        println!("  {curl} -H \"Authorization: Bearer $AUDITOR\" {base}/v1/audit/verify");
        println!("  {curl} -H \"Authorization: Bearer $RESEARCHER\" -H 'Content-Type: application/json' -d '{{\"profile\": \"safe_harbor\", \"tables\": [\"lab_results\", \"diagnoses\"]}}' {base}/v1/exports    # then GET the href it answers");
    }
    if let Some((patient, _)) = &sample {
        let encoded = |t: &str| {
            percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        println!(
            "\nThe archive viewer (development sign-in, on this computer only; your browser will ask\nyou to accept the demo's self-signed certificate):\n  {base}/ui/sign-in?patients={}&next={}\n  choose \"Clinician\" to read patient {patient}'s archived chart, or another role.",
            encoded(patient),
            encoded(&format!("/ui/patients/{patient}"))
        );
    }
    println!("\nCtrl-C stops the demo.");
    crate::serve::stop_signal().await?;
    let _ = stop_tx.send(());
    serving.stopped().await;
    println!("stopped.");
    Ok(())
}
