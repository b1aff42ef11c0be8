//! `dualroute check`: can the service read the breaker's source?
//!
//! `check` is typed by root; the milter runs as the user `dualroute` with
//! the groups of that user and the unit's `SupplementaryGroups=`. Before
//! issue 25 the test opened the file as root, which reads everything, and
//! passed where the service was blind. Now, run as root on a host with the
//! user `dualroute`, the test runs as that user with those groups
//! (`setpriv --reuid --regid --groups`), and says whom it tested.

use super::journal::journal_files;
use crate::config::{BreakerConfig, Maillog};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The user the packaged unit runs the milter as (packaging/dualroute.service).
pub const SERVICE_USER: &str = "dualroute";
/// The unit's name.
const UNIT: &str = "dualroute.service";
/// Where systemd finds the unit and its drop-ins, lowest precedence first.
pub const UNIT_DIRS: [&str; 4] = [
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/run/systemd/system",
    "/etc/systemd/system",
];

/// Tests the breaker's source as the service would read it. Ok: what was
/// tested and found readable; Err: what is wrong and what to do (the
/// caller puts the configuration's file:line in front).
pub fn check(config: &BreakerConfig) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let dirs: Vec<PathBuf> = UNIT_DIRS.iter().map(PathBuf::from).collect();
    if root && user_exists(SERVICE_USER) {
        return check_as(config, SERVICE_USER, &dirs);
    }
    let who = if root {
        format!("root (there is no user {SERVICE_USER} here, so the service's own access was not tested)")
    } else {
        "this user".to_owned()
    };
    probe(config, None).map(|()| format!("{} is readable as {who}", what(config)))
}

/// [`check`] as `user`, with its groups and the `SupplementaryGroups=` of
/// the unit found under `unit_dirs`. Needs root (setpriv).
pub fn check_as(
    config: &BreakerConfig,
    user: &str,
    unit_dirs: &[PathBuf],
) -> Result<String, String> {
    let mut groups = user_groups(user)?;
    let from_unit = unit_groups(unit_dirs);
    for g in &from_unit {
        if !groups.contains(g) {
            groups.push(g.clone());
        }
    }
    let unit_note = if from_unit.is_empty() {
        format!("; the unit {UNIT} grants no SupplementaryGroups")
    } else {
        format!(
            "; {} from the unit's SupplementaryGroups",
            from_unit.join(", ")
        )
    };
    let who = format!("user {user} (groups {}{unit_note})", groups.join(", "));
    match probe(config, Some((user, &groups))) {
        Ok(()) => Ok(format!("{} is readable as {who}", what(config))),
        Err(e) => Err(format!("{} is NOT readable as {who}: {e}", what(config))),
    }
}

fn what(config: &BreakerConfig) -> String {
    match (&config.maillog, &config.journal_directory) {
        (Maillog::Journal, Some(d)) => format!("breaker.maillog: journal (in {})", d.display()),
        (Maillog::Journal, None) => "breaker.maillog: journal".to_owned(),
        (Maillog::File(p), _) => format!("breaker.maillog: {}", p.display()),
    }
}

/// The fix for an unreadable source.
fn fix(config: &BreakerConfig) -> String {
    let group = match config.maillog {
        Maillog::Journal => "systemd-journal (or adm)",
        Maillog::File(_) => "that owns the file (adm for Debian's /var/log/mail.log)",
    };
    format!(
        "give the service the group {group}: `systemctl edit dualroute` → [Service] SupplementaryGroups=GROUP, then `systemctl restart dualroute`"
    )
}

/// Runs the test, as `who` (user and groups, with setpriv) or as this
/// process.
fn probe(config: &BreakerConfig, who: Option<(&str, &[String])>) -> Result<(), String> {
    let files: Vec<PathBuf> = match &config.maillog {
        Maillog::File(p) => {
            if !p.exists() {
                return Err(format!(
                    "{} does not exist: point breaker.maillog at the file the MTA logs to (Postfix: `maillog_file` in main.cf, or rsyslog's mail.log), or write `maillog: journal` where mail is logged to the journal only (Debian 12 without rsyslog)",
                    p.display()
                ));
            }
            vec![p.clone()]
        }
        Maillog::Journal => {
            let dir = config.journal_directory.as_deref();
            let (dirs, files) = journal_files(dir);
            if files.is_empty() {
                let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(format!(
                    "no journal files in {}: is systemd-journald running (or breaker.journal_directory wrong)?",
                    dirs.join(" or ")
                ));
            }
            files
        }
    };
    // Each file opened for reading, by the user itself: test(1)'s -r is
    // access(2), which asks with the real user and groups setpriv set.
    let mut cmd = as_user(who, "sh");
    cmd.args([
        "-c",
        r#"for f; do test -r "$f" || { echo "$f"; exit 1; }; done"#,
        "sh",
    ])
    .args(&files);
    let out = run(&mut cmd)?;
    if !out.status.success() {
        let file = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        return Err(format!("cannot read {file}; {}", fix(config)));
    }
    if config.maillog == Maillog::Journal {
        // journalctl itself, as the service runs it: it must start and read.
        let mut cmd = as_user(who, "journalctl");
        if let Some(d) = &config.journal_directory {
            cmd.arg("--directory").arg(d);
        }
        cmd.args([
            "--lines=1",
            "--output=json",
            "--no-pager",
            "SYSLOG_FACILITY=2",
        ]);
        let out = run(&mut cmd)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(format!(
                "journalctl fails ({}): {err}; {}",
                out.status,
                fix(config)
            ));
        }
    }
    Ok(())
}

fn as_user(who: Option<(&str, &[String])>, program: &str) -> Command {
    match who {
        None => Command::new(program),
        Some((user, groups)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={user}"))
                .arg(format!(
                    "--regid={}",
                    groups.first().map_or(user, |g| g.as_str())
                ))
                .arg(format!("--groups={}", groups.join(",")))
                .args(["--", program]);
            c
        }
    }
}

fn run(cmd: &mut Command) -> Result<std::process::Output, String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| {
        format!("cannot run {name}: {e} (setpriv: package util-linux; journalctl: package systemd)")
    })
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(user)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The groups of `user` as initgroups(3) gives them, the primary first
/// (`id -gn`, `id -Gn`).
fn user_groups(user: &str) -> Result<Vec<String>, String> {
    let out = Command::new("id")
        .arg("-Gn")
        .arg(user)
        .output()
        .map_err(|e| format!("cannot run id: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "no user {user}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// The unit's `SupplementaryGroups=` as systemd would read them from the
/// unit file and its drop-ins under `dirs` (later directories override
/// earlier ones; drop-ins in name order; an empty assignment resets).
pub fn unit_groups(dirs: &[PathBuf]) -> Vec<String> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(main) = dirs
        .iter()
        .rev()
        .map(|d| d.join(UNIT))
        .find(|p| p.is_file())
    {
        files.push(main);
    }
    let mut dropins: Vec<(std::ffi::OsString, PathBuf)> = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d.join(format!("{UNIT}.d"))) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "conf") {
                // A drop-in of the same name in a later directory wins.
                dropins.retain(|(n, _)| *n != e.file_name());
                dropins.push((e.file_name(), p));
            }
        }
    }
    dropins.sort();
    files.extend(dropins.into_iter().map(|(_, p)| p));
    let mut groups: Vec<String> = Vec::new();
    for f in files {
        groups_in(&f, &mut groups);
    }
    groups
}

fn groups_in(file: &Path, groups: &mut Vec<String>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let Some(value) = line
            .strip_prefix("SupplementaryGroups=")
            .filter(|_| in_service)
        else {
            continue;
        };
        if value.trim().is_empty() {
            groups.clear();
        }
        for g in value.split_whitespace() {
            if !groups.iter().any(|x| x == g) {
                groups.push(g.to_owned());
            }
        }
    }
}
