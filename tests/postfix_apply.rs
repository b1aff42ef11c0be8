//! `dualroute postfix-config --apply [--dry-run]` and `--revert` on a real,
//! private Postfix (tests/support/): merged lists, the master.cf service
//! with its own syslog_name, tables postmap'ed, a second --apply that
//! changes nothing, entries removed when the configuration no longer needs
//! them, a revert that gives main.cf and master.cf back byte for byte, and
//! a routed message delivered through what --apply wired.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use support::{dualroute, free_port, MilterProcess, Postfix, PostfixOptions, SmtpClient, SmtpSink};

fn yaml(milter_port: u16, state: &Path, destination: &str) -> String {
    format!(
        "listen: inet:127.0.0.1:{milter_port}\ninstance: apply.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {destination}\n    accounts:\n      - list: [alice@example.com]\n",
        state.display()
    )
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut b: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read the config dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".cf.dualroute-"))
        .collect();
    b.sort();
    b
}

fn apply(config: &Path, etc: &Path, extra: &[&str]) -> String {
    let etc = etc.to_str().expect("UTF-8 path");
    let args = [&["postfix-config", "--postfix-config-dir", etc], extra].concat();
    let (status, out) = dualroute(config, &args);
    assert!(status.success(), "dualroute {args:?} failed:\n{out}");
    out
}

#[test]
fn apply_is_idempotent_merges_prunes_and_reverts() {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-apply-")
        .tempdir()
        .expect("tmp");
    let dir = tmp.path();
    let sink = SmtpSink::start();
    let milter_port = free_port();
    // The admin's own transport table, which --apply must keep.
    let pf = Postfix::start(
        PostfixOptions::default()
            .domain_without_catchall("example.com", &["alice@example.com"])
            .map("own_transport", "other.test smtp:[127.0.0.1]:9\n")
            .main_cf("transport_maps = hash:$config_directory/own_transport"),
    );
    let etc = pf.config_dir();
    let (main_cf, master_cf) = (etc.join("main.cf"), etc.join("master.cf"));
    let (main_before, master_before) = (read(&main_cf), read(&master_cf));
    let config = dir.join("milter.yaml");
    let hosts = format!("{{ hosts: [\"{}\"] }}", sink.nexthop());
    fs::write(&config, yaml(milter_port, &dir.join("state"), &hosts)).expect("write");

    // --dry-run says what it would do and changes nothing.
    let out = apply(&config, &etc, &["--apply", "--dry-run"]);
    assert!(out.contains("would run"), "{out}");
    assert!(
        out.contains("postconf -e 'smtpd_milters = inet:127.0.0.1:"),
        "{out}"
    );
    assert_eq!(read(&main_cf), main_before, "--dry-run changed main.cf");
    assert!(backups(&etc).is_empty(), "--dry-run made backups");

    // --apply
    let out = apply(&config, &etc, &["--apply"]);
    assert!(out.contains("postfix check: OK"), "{out}");
    assert!(out.contains("postfix reload: done"), "{out}");
    assert_eq!(
        backups(&etc).len(),
        2,
        "one backup of main.cf and master.cf:\n{out}"
    );
    assert_eq!(
        pf.postconf("smtpd_milters"),
        format!("inet:127.0.0.1:{milter_port}")
    );
    assert_eq!(pf.postconf("milter_default_action"), "tempfail");
    assert_eq!(
        pf.postconf("transport_maps"),
        format!(
            "hash:$config_directory/own_transport, hash:{}/dualroute_transport",
            etc.display()
        )
    );
    assert_eq!(
        pf.postconf("virtual_mailbox_maps"),
        format!(
            "hash:{0}/vmailbox, hash:{0}/dualroute_catchall",
            etc.display()
        )
    );
    let master = String::from_utf8_lossy(&read(&master_cf)).into_owned();
    assert!(
        master.contains("-o syslog_name=postfix/dualroute"),
        "{master}"
    );
    for t in [
        "dualroute_transport",
        "dualroute_generic",
        "dualroute_catchall",
    ] {
        assert!(
            etc.join(format!("{t}.db")).exists(),
            "{t} was not postmap'ed"
        );
    }

    // What it wired routes mail: zed@ has no mailbox here.
    let milter = MilterProcess::start(&config, milter_port, &dir.join("milter.log"));
    let sent = SmtpClient::new(pf.smtp_addr()).send(
        "sender@outside.test",
        &["zed@example.com"],
        "Subject: routed\n\nbody\n",
    );
    assert!(sent.accepted(), "{sent:?}");
    let got = sink.wait_messages(1);
    assert_eq!(got[0].rcpt_addresses(), vec!["zed@example.com".to_owned()]);
    let routed = pf.wait_deliveries(1);
    // syslog_name=postfix/dualroute: Postfix logs `postfix/dualroute/smtp[PID]`.
    assert!(
        routed[0].line.contains(" postfix/dualroute/smtp["),
        "routed delivery not marked in the log: {}",
        routed[0].line
    );
    drop(milter);

    // Again: nothing to change, no new backup, files untouched.
    let (main_applied, master_applied) = (read(&main_cf), read(&master_cf));
    let out = apply(&config, &etc, &["--apply"]);
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(read(&main_cf), main_applied);
    assert_eq!(read(&master_cf), master_applied);
    assert_eq!(backups(&etc).len(), 2);

    // change_envelope needs no transport: what --apply added for it goes.
    fs::write(
        &config,
        yaml(
            milter_port,
            &dir.join("state"),
            "{ domain: example.net, change_envelope: true }",
        ),
    )
    .expect("write");
    let out = apply(&config, &etc, &["--apply"]);
    assert_eq!(
        pf.postconf("transport_maps"),
        "hash:$config_directory/own_transport",
        "{out}"
    );
    assert!(
        !String::from_utf8_lossy(&read(&master_cf)).contains("syslog_name=postfix/dualroute"),
        "the service stayed:\n{out}"
    );
    assert!(!etc.join("dualroute_transport").exists());
    assert!(etc.join("dualroute_catchall.db").exists(), "still needed");

    // --revert: back to what it was, byte for byte.
    let out = apply(&config, &etc, &["--revert"]);
    assert!(out.contains("postfix check: OK"), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&read(&main_cf)),
        String::from_utf8_lossy(&main_before)
    );
    assert_eq!(
        String::from_utf8_lossy(&read(&master_cf)),
        String::from_utf8_lossy(&master_before)
    );
    for t in [
        "dualroute_catchall",
        "dualroute_catchall.db",
        "dualroute.applied",
    ] {
        assert!(!etc.join(t).exists(), "{t} left behind");
    }
    let out = apply(&config, &etc, &["--revert"]);
    assert!(out.contains("nothing to revert"), "{out}");
}

#[test]
fn warns_when_the_unix_socket_is_outside_the_chroot() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("milter.yaml");
    fs::write(
        &config,
        "listen: unix:/run/dualroute/dualroute.sock\ndomains:\n  example.com:\n    mode: dual\n    destination: { hosts: [\"[127.0.0.1]:9\"] }\n",
    )
    .expect("write");
    let (status, out) = dualroute(&config, &["postfix-config"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("WARNING: /run/dualroute/dualroute.sock is outside /var/spool/postfix"),
        "{out}"
    );
}
