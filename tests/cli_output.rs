//! What the command-line tools print, as a user or a monitoring script
//! sees it (issue 25, "smaller things").

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

/// A configuration with `n` route domains, so that `status` prints more
/// than a pipe holds (64 KiB on Linux).
fn many_domains(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut yaml = format!("state_dir: {}\ndomains:\n", dir.join("state").display());
    for i in 0..n {
        yaml.push_str(&format!(
            "  d{i}.example:\n    mode: route\n    destination: {{ hosts: [\"[192.0.2.1]\"] }}\n"
        ));
    }
    let path = dir.join("milter.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn a_closed_stdout_ends_quietly() {
    // `dualroute status | head -1`: the reader goes away after one line.
    // It panicked with "failed printing to stdout: Broken pipe" (issue 25).
    let dir = tempfile::tempdir().unwrap();
    let path = many_domains(dir.path(), 2000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["--config", path.to_str().unwrap(), "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("d0.example: mode route"), "{first}");
    // The reader is dropped here: what status prints next meets a closed pipe.
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    // Ended as `yes | head -1` ends `yes`: by SIGPIPE, which a shell
    // pipeline does not report.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?} {stderr}");
}
