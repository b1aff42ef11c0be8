//! `dualroute check` passes on the shipped `milter.yaml` and on every file
//! in `examples/`, and fails (exit 1, FILE:LINE:COL) on a broken one.

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run dualroute")
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("milter.yaml")];
    for entry in std::fs::read_dir(root.join("examples")).expect("examples/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files
}

#[test]
fn every_shipped_config_checks() {
    let files = shipped_configs();
    assert!(
        files.len() >= 6,
        "milter.yaml and five examples expected, found {files:?}"
    );
    for f in files {
        let out = check(&f);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}{}",
            f.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": OK"), "{}: {stdout}", f.display());
        assert!(
            stdout.contains("example.com: mode "),
            "{}: {stdout}",
            f.display()
        );
    }
}

#[test]
fn broken_config_fails_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(
        &path,
        "domains:\n  example.com:\n    mode: route\n    destination:\n      hosts: [\"[192.0.2.1]\"]\n      domain: legacy.example\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:5:7: domains.example.com.destination: `hosts` and `domain` are mutually exclusive",
        path.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn missing_config_is_an_error() {
    let out = check(Path::new("/nonexistent/milter.yaml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/milter.yaml: cannot read"));
}

/// `check` warns of backscatter when a split domain accepts every address
/// it routes, and not when it asks the destination (issue 23).
#[test]
fn check_warns_of_backscatter_without_reject_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    let yaml = |extra: &str| {
        format!(
            "state_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination:\n      hosts: [\"[192.0.2.1]\"]\n{extra}    accounts:\n      - list: [alice@example.com]\n",
            dir.path().display()
        )
    };
    std::fs::write(&path, yaml("")).unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("WARNING: mode split without destination.reject_unknown:")
            && stdout.contains("backscatter"),
        "{stdout}"
    );
    std::fs::write(&path, yaml("      reject_unknown: { callout: true }\n")).unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("backscatter"), "{stdout}");
    assert!(
        stdout.contains("reject_unknown callouts: nothing cached yet"),
        "{stdout}"
    );
}
