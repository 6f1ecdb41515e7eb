//! The deployment files are valid and run commands Strata has: the Kubernetes manifests
//! against the Kubernetes API's schemas, offline (`kubernetes-validate` from PyPI, installed
//! by scripts/test beside the test's Python), the systemd units by `systemd-analyze verify`
//! (Debian's systemd), and every scheduled command line through `strata ... --help`.

use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// `kubernetes-validate` of the test's Python environment (scripts/test installs it).
fn kubernetes_validate() -> PathBuf {
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON: run the tests through scripts/test");
    Path::new(&python).with_file_name("kubernetes-validate")
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let manifests: Vec<PathBuf> = std::fs::read_dir(deploy().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!manifests.is_empty());
    for manifest in &manifests {
        let out = std::process::Command::new(kubernetes_validate())
            .arg("--strict")
            .arg(manifest)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {text}", manifest.display());
        assert!(text.contains("passed"), "{text}");
    }
    // The check can fail: a field the API does not know is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(&manifests[0]).unwrap().replace(
        "concurrencyPolicy: Forbid",
        "concurrencyPolicy: Forbid\n  runEvery: 5m",
    );
    std::fs::write(&broken, text).unwrap();
    let out = std::process::Command::new(kubernetes_validate())
        .arg("--strict")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.ends_with(".service") || name.ends_with(".timer")) {
            continue;
        }
        // The units name the installed binary; here, the one under test.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/strata", env!("CARGO_BIN_EXE_strata"));
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(name);
    }
    assert!(
        units.iter().any(|u| u == "strata-maintenance.timer"),
        "{units:?}"
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains(".service:"),
        "{text}"
    );
}

/// Every command the timer's service and the CronJob run is one `strata` knows, with the
/// options given.
#[test]
fn scheduled_commands_are_strata_commands() {
    let service = std::fs::read_to_string(deploy().join("strata-maintenance.service")).unwrap();
    let cronjob =
        std::fs::read_to_string(deploy().join("kubernetes/strata-maintenance-cronjob.yaml"))
            .unwrap();
    let mut commands: Vec<String> = service
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/strata "))
        .map(str::to_string)
        .collect();
    let from_cronjob: Vec<String> = cronjob
        .lines()
        .map(|l| l.trim().trim_end_matches("&&").trim())
        .filter_map(|l| l.strip_prefix("strata "))
        .map(str::to_string)
        .collect();
    assert_eq!(
        commands, from_cronjob,
        "the timer and the CronJob run the same steps"
    );
    assert!(commands.iter().any(|c| c.starts_with("archive retain")));
    assert!(commands.iter().any(|c| c.starts_with("tier ")));
    for command in commands.drain(..) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let subcommand: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with("--"))
            .copied()
            .collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(&subcommand)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "strata {command}");
        for option in words.iter().filter(|w| w.starts_with("--")) {
            assert!(help.contains(option), "strata {command}: {option} unknown");
        }
    }
}
