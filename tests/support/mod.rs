//! End-to-end test harness: a private Postfix instance on loopback
//! ([`postfix`]), an `smtp-sink` that stands in for the destination server
//! ([`sink`]), a small SMTP client that records every reply ([`smtp`]), and
//! the real `dualroute` binary: `dualroute run` as a child process, its
//! one-shot commands, and `postfix-config` fed into Postfix ([`milter`]);
//! a private Sendmail from Debian's unpacked packages ([`sendmail`]).
//!
//! Use it from an integration test with
//!
//! ```ignore
//! mod support;
//! use support::{Postfix, PostfixOptions, SmtpClient, SmtpSink, OUTSIDE_IP};
//! ```
//!
//! [`protocol`] is the other milter: the whole service in-process,
//! driven by indymilter-test as an MTA would.
//!
//! Requirements of [`postfix`]: Linux, root (Postfix's `postfix start` and the `virtual`
//! delivery agent need it), and the Debian `postfix` package
//! (`scripts/test-deps.sh` installs it). Nothing here skips silently: a
//! missing binary is a panic that says how to install it.
//!
//! Every instance and every sink lives in its own temporary directory with
//! its own ports ([`ports`]: bound before use or retried on conflict, so
//! no test can use a port another process takes), so tests may run in
//! parallel. Everything
//! talks to 127.0.0.0/8 only: DNS is off in the Postfix SMTP client, mail
//! for a domain that is neither a virtual mailbox domain nor routed by the
//! test's `transport_maps` is bounced by the `error` transport, and on
//! Linux the whole of 127/8 is on `lo`, so a client can connect from
//! 127.0.0.2 (an "outside" client or a gateway; only 127.0.0.1 is in
//! `mynetworks`).
//!
//! Set `DUALROUTE_KEEP_TMP=1` to keep the temporary trees (configuration,
//! queue, Maildirs, `maillog`, sink dumps); their paths are printed.
#![allow(dead_code)]

pub mod metrics;
pub mod milter;
pub mod ports;
pub mod postfix;
pub mod protocol;
pub mod redis;
pub mod scenarios;
pub mod sendmail;
pub mod sink;
pub mod smtp;
pub mod soak;
pub mod wire;

// Each test binary uses a different part of the harness.
#[allow(unused_imports)]
pub use milter::{
    dualroute, dualroute_output, postfix_config, unix_config, MilterProcess, PostfixConfig,
    UnixTree,
};
#[allow(unused_imports)]
pub use ports::{is_listening, loopback_listener, start_on_a_port, Port};
#[allow(unused_imports)]
pub use postfix::{processes_in, read_maildir, Delivery, MaildirMessage, Postfix, PostfixOptions};
#[allow(unused_imports)]
pub use sendmail::{Sendmail, SendmailOptions};
#[allow(unused_imports)]
pub use sink::{xtext_decode, xtext_encode, SinkMessage, SinkRcpt, SmtpSink};
#[allow(unused_imports)]
pub use smtp::{send, Reply, SmtpClient, SmtpTranscript};

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The envelope sender of the end-to-end scenarios (Postfix and Sendmail).
pub const SENDER: &str = "sender@outside.test";
/// The `instance:` of the end-to-end scenarios' milter.yaml.
pub const INSTANCE: &str = "e2e.test";
/// The gateway of the end-to-end scenarios that have one (= [`OUTSIDE_IP`]).
pub const GATEWAY_IP: IpAddr = OUTSIDE_IP;
/// An outside client that is not a gateway (and not in `mynetworks`).
pub const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A minimal message from [`SENDER`] with this subject.
pub fn message(subject: &str) -> String {
    format!(
        "From: {SENDER}\nTo: undisclosed-recipients:;\nSubject: {subject}\n\nbody of {subject}\n"
    )
}

/// How long the `wait_*` helpers poll before they panic.
pub const WAIT: Duration = Duration::from_secs(20);

const POLL: Duration = Duration::from_millis(50);

const NOT_INSTALLED: &str =
    "postfix is not installed: run scripts/test-deps.sh (as root) or `apt-get install postfix`";

/// The address a test client uses to be an outside (non-`mynetworks`)
/// client, or a gateway.
pub const OUTSIDE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Waits, without blocking the runtime, until `probe` yields a value:
/// polls every 50 ms for up to [`WAIT`], then fails the test saying what
/// did not happen. The one wait loop of the async tests ([`poll`] is the
/// one of the blocking ones).
pub async fn wait_until<T, F>(what: &str, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {}s waiting for {what}",
            WAIT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `probe` every 50 ms for up to [`WAIT`].
pub fn poll<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The values of header field `name` (case-insensitive) in a message's
/// header, unfolded.
pub(crate) fn header_values(text: &str, name: &str) -> Vec<String> {
    let mut values: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        values.extend(current.take());
        if let Some((field, value)) = line.split_once(':') {
            if field.eq_ignore_ascii_case(name) {
                current = Some(value.trim().to_owned());
            }
        }
    }
    values.extend(current);
    values
}

/// Finds a Postfix program in $PATH or /usr/sbin (where Debian puts them,
/// and which a non-login root shell may not have in $PATH).
pub(crate) fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_INSTALLED} ({name} not found)"))
}

/// uid and gid of a user, via NSS.
pub fn user_ids(user: &str) -> (u32, u32) {
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("run getent");
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|u| u.parse().ok()),
        fields.get(3).and_then(|g| g.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => (uid, gid),
        _ => panic!("user {user:?} does not exist: {NOT_INSTALLED}"),
    }
}

pub(crate) fn keep_tmp() -> bool {
    std::env::var_os("DUALROUTE_KEEP_TMP").is_some_and(|v| v == "1")
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

pub(crate) fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// All regular files below `dir`, recursively (the deferred queue is
/// hashed into subdirectories). Files that vanish while we look are
/// skipped: the queue manager renames them all the time.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(files_under(&entry.path())),
            Ok(kind) if kind.is_file() => found.push(entry.path()),
            _ => {}
        }
    }
    found
}

/// Publishes in the state_dir of `milter.yaml` at `path` the record a
/// milter running it would (src/running.rs), under this test process's
/// pid: for tests of `status` that look at the routing state, not at a
/// running milter. Returns the record.
pub fn pretend_running(path: &std::path::Path) -> dualroute::running::Running {
    let (config, digest) =
        dualroute::config::read::read_file_digest(path).expect("milter.yaml loads");
    let (holds, _) = dualroute::holds::Holds::read(&config);
    let mut policy = dualroute::policy::Policy::load(config).expect("the policy loads");
    policy.loaded.config_sha256 = digest;
    let running = dualroute::running::Running::of(path, 1, &policy, &holds);
    let dir = dualroute::state::StateDir::new(&policy.config.state_dir);
    dualroute::running::write(&dir, &running).expect("write the running record");
    running
}
