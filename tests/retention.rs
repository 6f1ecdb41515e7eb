//! Retention inside the archive (issue #20), the destroying step: a `retain` destruction list
//! is carried out only once a records manager other than its requester approved it; a record
//! a legal hold covers is kept; the destruction is certified (signed) and recorded; readers
//! stop serving the records at the catalog switch; `archive verify` accounts for every row;
//! `gc` deletes the replaced files and their data keys.

use super::*;
use std::collections::BTreeMap;
use strata_control::{Control, RequestStatus};
use strata_cutoff_policies::HoldScope;
use strata_ingest::{carry_out_retention, DestructionCertificate, ListedTable, RetentionList};

/// (patient, key) of every archived lab result.
async fn lab_results(dir: &Path) -> Vec<(String, String)> {
    let config = load_config(&dir.join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let mut out = Vec::new();
    for (_, _, entry) in archive.ranked_files("lab_results") {
        for b in archive.read_file(entry).await.unwrap() {
            let b = strata_archive::ArchivedBatch::new(&b, &[]);
            for row in 0..b.num_rows() {
                out.push((
                    b.patient(row).unwrap().to_string(),
                    b.key(row).unwrap().to_string(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn run_ok(args: &[&str], dir: &Path) -> String {
    let out = strata(args, dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

/// `strata archive retain` as a rehearsal in 2060, requested by rm-alice.
const RETAIN_IN_2060: [&str; 7] = [
    "archive",
    "retain",
    "--by",
    "rm-alice",
    "--as-of",
    "2060-01-01",
    "--allow-future-as-of",
];

/// The whole pass from the command line: `strata archive retain` files the archived records
/// past retention at a later day (a held patient's left off), the requester cannot approve
/// the list, another records manager does, and the next `retain` destroys it, certified;
/// `archive verify` accounts for every row; the held patient's records stay.
#[tokio::test]
async fn retain_files_a_list_another_records_manager_approves_and_the_next_pass_destroys() {
    let (dir, _source, _archive) = migrated_sqlite(0.05).await;
    let config_path = with_signing_key(dir.path());
    let config = load_config(&config_path);
    let before = lab_results(dir.path()).await;
    let held = before[0].0.clone();
    run_ok(
        &[
            "hold",
            "place",
            "--patient",
            &held,
            "--by",
            "counsel",
            "--reason",
            "matter 20",
        ],
        dir.path(),
    );
    // A day in the future is refused unless asked for (a rehearsal).
    let refused = strata(&RETAIN_IN_2060[..6], dir.path());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("later than today"));
    // Ten years of retention after the last activity: in 2060 every archived record is past
    // it, but for the held patient's.
    let out = run_ok(&RETAIN_IN_2060, dir.path());
    assert!(out.contains("filed for approval"), "{out}");
    let request = filed_request(&out);
    assert!(request.starts_with("destroy-"), "{out}");
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    let filed = control
        .destruction_request(&request)
        .await
        .unwrap()
        .unwrap();
    let list: RetentionList = serde_json::from_value(filed.summary).unwrap();
    let listed: Vec<&String> = list.tables["lab_results"].keys.iter().collect();
    let held_keys: Vec<&String> = before
        .iter()
        .filter(|(p, _)| *p == held)
        .map(|(_, k)| k)
        .collect();
    assert!(!held_keys.is_empty());
    assert!(
        held_keys.iter().all(|k| !listed.contains(k)),
        "a held record is not listed"
    );
    assert_eq!(listed.len(), before.len() - held_keys.len());
    // Filed, not destroyed; the requester cannot approve it.
    assert_eq!(lab_results(dir.path()).await, before);
    let refused = strata(
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-alice",
            "--note",
            "mine",
        ],
        dir.path(),
    );
    assert!(!refused.status.success());
    run_ok(
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-bob",
            "--note",
            "checked",
        ],
        dir.path(),
    );
    let out = run_ok(&RETAIN_IN_2060, dir.path());
    assert!(
        out.contains(&format!("{request}: ")) && out.contains("destroyed"),
        "{out}"
    );
    let after = lab_results(dir.path()).await;
    let expected: Vec<(String, String)> =
        before.iter().filter(|(p, _)| *p == held).cloned().collect();
    assert_eq!(
        after, expected,
        "only the held patient's lab results are left"
    );
    let done = control
        .destruction_request(&request)
        .await
        .unwrap()
        .unwrap();
    let certificate: DestructionCertificate =
        serde_json::from_value(done.certificate.unwrap()).unwrap();
    strata_ingest::check_evidence::<DestructionCertificate>(
        &config,
        &serde_json::to_string(&certificate).unwrap(),
    )
    .unwrap();
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
    // The migration's proof still holds: every source row is in exactly one place, those the
    // list destroyed counted as destroyed by retention (by count and key checksum), the held
    // patient's as archived. (Verify replays the run under the holds it ran under: the hold
    // placed since is released first.)
    let hold = control.holds().await.unwrap()[0].hold_id.clone();
    run_ok(
        &[
            "hold",
            "release",
            &hold,
            "--by",
            "counsel",
            "--reason",
            "matter closed",
        ],
        dir.path(),
    );
    let (status, out) = strata_verify(&config_path);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("destroyed by retention"), "{out}");
    // A destruction record that does not account for what left the archive is a mismatch.
    let db = Db::connect(
        &format!("sqlite://{}", dir.path().join("control.db").display()),
        false,
    )
    .await
    .unwrap();
    db.execute(&format!(
        "UPDATE strata_destructions SET rows_destroyed = rows_destroyed - 1 WHERE run_id = '{request}' AND table_name = 'lab_results'"
    ))
    .await
    .unwrap();
    db.close().await;
    let (status, out) = strata_verify(&config_path);
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("destroyed by retention"), "{out}");
}

#[tokio::test]
async fn an_approved_retention_list_is_destroyed_certified_and_a_held_record_kept() {
    let (dir, _source, _archive) = migrated_sqlite(0.05).await;
    let config_path = with_signing_key(dir.path());
    let config = load_config(&config_path);
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();

    // Three records of one patient, one of another whom a legal hold covers.
    let before = lab_results(dir.path()).await;
    let mut by_patient: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (p, k) in &before {
        by_patient.entry(p).or_default().push(k);
    }
    let (gone_patient, gone_keys) = by_patient
        .iter()
        .find(|(_, keys)| keys.len() >= 3)
        .map(|(p, keys)| {
            (
                p.to_string(),
                keys[..3].iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            )
        })
        .expect("a patient with three archived lab results");
    let (held_patient, held_key) = by_patient
        .iter()
        .find(|(p, _)| **p != gone_patient)
        .map(|(p, keys)| (p.to_string(), keys[0].to_string()))
        .unwrap();
    control
        .place_hold(
            &HoldScope::Patient(held_patient.clone()),
            "matter 2026-20",
            "counsel",
        )
        .await
        .unwrap();
    let mut keys = gone_keys.clone();
    keys.push(held_key.clone());
    let list = RetentionList {
        as_of: "2026-11-29".into(),
        rules: vec!["lab_results: retention 10y".into()],
        tables: [(
            "lab_results".to_string(),
            ListedTable {
                rows: keys.len() as u64,
                keys,
            },
        )]
        .into(),
    };
    let request = control
        .request_destruction(
            "retain",
            "rm-alice",
            ("1", "hash"),
            &serde_json::to_value(&list).unwrap(),
        )
        .await
        .unwrap();

    // Pending: nothing is destroyed.
    assert!(carry_out_retention(&config, &control)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(lab_results(dir.path()).await, before);
    control
        .decide_destruction(&request, "rm-bob", true, "checked")
        .await
        .unwrap();
    let certificates = carry_out_retention(&config, &control).await.unwrap();
    assert_eq!(certificates.len(), 1);
    let c = &certificates[0];
    assert_eq!(
        (c.request_id.as_str(), c.approved_by.as_str()),
        (request.as_str(), "rm-bob")
    );
    assert_eq!(c.tables.len(), 1);
    assert_eq!(c.tables[0].rows, 3);
    assert_eq!(c.kept_by_holds, 1, "the held patient's record is kept");
    assert!(c.tables[0].key_checksum.starts_with("sum256:"));
    assert!(!c.files_replaced.is_empty());
    // The certificate checks against the configured key, and is kept with the request.
    let text = serde_json::to_string_pretty(c).unwrap();
    let checked: DestructionCertificate = strata_ingest::check_evidence(&config, &text).unwrap();
    assert_eq!(&checked, c);
    let done = control
        .destruction_request(&request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, RequestStatus::Done);
    assert_eq!(done.certificate, Some(serde_json::to_value(c).unwrap()));

    // Readers no longer serve the destroyed records; every other record stays.
    let after = lab_results(dir.path()).await;
    let mut expected = before.clone();
    expected.retain(|(_, k)| !gone_keys.contains(k));
    assert_eq!(after, expected);
    assert!(after.contains(&(held_patient, held_key)));
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
    assert!(out.contains("3 destroyed past retention"), "{out}");
    // Done once.
    assert!(carry_out_retention(&config, &control)
        .await
        .unwrap()
        .is_empty());

    // gc deletes the files the rewrite replaced, with their data keys.
    let out = strata(&["archive", "gc", "--grace-hours", "0"], dir.path());
    assert!(out.status.success());
    for f in &c.files_replaced {
        assert!(!dir.path().join("archive").join(f).exists(), "{f}");
        let (folder, name) = f.rsplit_once('/').unwrap();
        let key_material = format!("{folder}/_KEY_MATERIAL_FOR_{name}.json");
        assert!(
            !dir.path().join("archive").join(&key_material).exists(),
            "{key_material}"
        );
    }
    assert_eq!(lab_results(dir.path()).await, expected);
    // ... and the certificate says when, signed again.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("its certificate says so"),
        "{out:?}"
    );
    let done = control
        .destruction_request(&request)
        .await
        .unwrap()
        .unwrap();
    let text = serde_json::to_string(&done.certificate.unwrap()).unwrap();
    let completed: DestructionCertificate = strata_ingest::check_evidence(&config, &text).unwrap();
    assert!(completed.keys_destroyed_at.is_some());
    assert_eq!(completed.tables, c.tables);
}

/// Activity after go-live counts: a patient whose archived lab results are past retention
/// keeps them once the new EHR records an encounter for them (in the operational database).
#[tokio::test]
async fn activity_in_the_operational_database_keeps_archived_records() {
    let (dir, _source, _archive) = migrated_sqlite(0.05).await;
    let config = load_config(&dir.path().join("strata.toml"));
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    let as_of = chrono::NaiveDate::from_ymd_opt(2031, 6, 1).unwrap();
    let patient_of: BTreeMap<String, String> = lab_results(dir.path())
        .await
        .into_iter()
        .map(|(p, k)| (k, p))
        .collect();
    let listed = |filed: &strata_ingest::FiledList| {
        let control = control.clone();
        let id = filed.request_id.clone();
        async move {
            let r = control.destruction_request(&id).await.unwrap().unwrap();
            let list: RetentionList = serde_json::from_value(r.summary).unwrap();
            list.tables
                .get("lab_results")
                .map(|t| t.keys.clone())
                .unwrap_or_default()
        }
    };
    let first = strata_ingest::file_retention_list(&config, &control, as_of, "rm-alice")
        .await
        .unwrap()
        .expect("archived records past retention in 2031");
    let first_keys = listed(&first).await;
    let patient = patient_of[&first_keys[0]].clone();
    control
        .decide_destruction(&first.request_id, "rm-bob", false, "a new encounter is due")
        .await
        .unwrap();
    // The new EHR records an encounter for that patient after go-live.
    let operational = Db::connect(&config.resolve_url(&config.operational.url).unwrap(), false)
        .await
        .unwrap();
    operational
        .execute(&format!(
            "INSERT INTO encounters (id, patient_id, started_at, encounter_class) VALUES (987654321, {patient}, '2026-11-01 10:00:00', 'AMB')"
        ))
        .await
        .unwrap();
    operational.close().await;
    let second = strata_ingest::file_retention_list(&config, &control, as_of, "rm-alice")
        .await
        .unwrap()
        .expect("other patients' records are still past retention");
    let second_keys = listed(&second).await;
    assert!(
        second_keys.iter().all(|k| patient_of[k] != patient),
        "patient {patient}'s archived lab results are kept: their last activity is 2026"
    );
    assert!(first_keys.len() > second_keys.len());
    assert!(second_keys.iter().all(|k| first_keys.contains(k)));
}

/// kill -9 at any moment of `strata archive retain` carrying out an approved list: after each
/// kill `archive verify` accounts for every row; the next pass finishes, each listed record
/// destroyed once, and the certificate counts every one of them — also those a killed pass
/// destroyed before it could certify (read back from the rewrite's manifest).
#[tokio::test]
async fn kill_9_in_retain_destroys_once_and_certifies_all_it_destroyed() {
    let (dir, _source, _archive) = migrated_sqlite(0.3).await;
    let config_path = with_signing_key(dir.path());
    let config = load_config(&config_path);
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    let as_of = chrono::NaiveDate::from_ymd_opt(2060, 1, 1).unwrap();
    let filed = strata_ingest::file_retention_list(&config, &control, as_of, "rm-alice")
        .await
        .unwrap()
        .unwrap();
    let listed: u64 = filed.tables.values().sum();
    control
        .decide_destruction(&filed.request_id, "rm-bob", true, "checked")
        .await
        .unwrap();
    let mut kills = 0;
    // Kills 10 ms apart, later each time, until a pass finishes before its kill.
    for ms in (1..=600).map(|n| n * 10) {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "archive",
                "retain",
                "--by",
                "rm-alice",
                "--as-of",
                "2000-01-01",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let (passed, out) = verify_archive(dir.path());
        assert!(passed, "after a kill at {ms} ms: {out}");
    }
    assert!(kills >= 5, "{kills} kills before a pass finished");
    let done = control
        .destruction_request(&filed.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, RequestStatus::Done);
    let certificate: DestructionCertificate =
        serde_json::from_value(done.certificate.unwrap()).unwrap();
    let destroyed: u64 = certificate.tables.iter().map(|t| t.rows).sum();
    assert_eq!(
        destroyed, listed,
        "every listed record destroyed and certified, once"
    );
    assert!(lab_results(dir.path()).await.is_empty());
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
}
