//! `destination: { rate_delay: 2s }` / `{ concurrency: N }` on a real,
//! private Postfix: `postfix-config --apply` sets the per-transport
//! parameters of the dualroute transport in main.cf, Postfix knows them
//! (no "unused parameter" warning: they belong to a transport master.cf
//! defines), routed mail is paced by them, and a configuration without the
//! key takes them out again.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{dualroute, MilterProcess, Port, Postfix, PostfixOptions, SmtpClient, SmtpSink};

fn yaml(milter_port: u16, state: &Path, nexthop: &str, extra: &str) -> String {
    format!(
        "listen: inet:127.0.0.1:{milter_port}\ninstance: throttle.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n    destination: {{ hosts: [\"{nexthop}\"]{extra} }}\n",
        state.display()
    )
}

fn apply(config: &Path, etc: &Path) -> String {
    let etc = etc.to_str().expect("UTF-8 path");
    let (status, out) = dualroute(
        config,
        &["postfix-config", "--postfix-config-dir", etc, "--apply"],
    );
    assert!(status.success(), "--apply failed:\n{out}");
    out
}

/// `postconf -c DIR -n`: what Postfix says about its main.cf, warnings
/// (stderr) included.
fn postconf_n(etc: &Path) -> (String, String) {
    let out = Command::new("postconf")
        .arg("-c")
        .arg(etc)
        .arg("-n")
        .output()
        .expect("run postconf (apt-get install postfix)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn rate_delay_paces_routed_mail_and_goes_away_with_the_key() {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-throttle-")
        .tempdir()
        .expect("tmp");
    let dir = tmp.path();
    let sink = SmtpSink::start();
    let milter_port = Port::reserve();
    let pf = Postfix::start(PostfixOptions::default().domain("example.com", &[]));
    let etc = pf.config_dir();
    let config = dir.join("milter.yaml");
    let state = dir.join("state");
    fs::write(
        &config,
        yaml(
            milter_port.number(),
            &state,
            &sink.nexthop(),
            ", rate_delay: 2s",
        ),
    )
    .expect("write");
    let out = apply(&config, &etc);
    assert!(
        out.contains("dualroute_destination_rate_delay = 2s"),
        "{out}"
    );
    assert_eq!(pf.postconf("dualroute_destination_rate_delay"), "2s");
    let (_, warnings) = postconf_n(&etc);
    assert!(
        !warnings.contains("unused parameter"),
        "Postfix does not know the parameter:\n{warnings}"
    );

    // Two routed messages: the second leaves two seconds after the first
    // (without the delay both arrive within a fraction of a second).
    let milter = MilterProcess::start(&config, &milter_port, &dir.join("milter.log"));
    for rcpt in ["one@example.com", "two@example.com"] {
        let sent = SmtpClient::new(pf.smtp_addr()).send(
            "sender@outside.test",
            &[rcpt],
            &support::message(rcpt),
        );
        assert!(sent.accepted(), "{rcpt}: {sent:?}");
    }
    let first = sink.wait_messages(1);
    let t1 = Instant::now();
    assert_eq!(first.len(), 1, "both arrived at once: {first:?}");
    let both = sink.wait_messages(2);
    let gap = t1.elapsed();
    assert_eq!(both.len(), 2);
    assert!(
        gap >= Duration::from_millis(1500),
        "the second message came {gap:?} after the first; rate_delay is 2s\n{}",
        pf.maillog()
    );
    drop(milter);

    // concurrency instead of rate_delay: one parameter replaces the other.
    fs::write(
        &config,
        yaml(
            milter_port.number(),
            &state,
            &sink.nexthop(),
            ", concurrency: 3",
        ),
    )
    .expect("write");
    apply(&config, &etc);
    let (set, _) = postconf_n(&etc);
    assert!(
        set.contains("dualroute_destination_concurrency_limit = 3"),
        "{set}"
    );
    assert!(!set.contains("dualroute_destination_rate_delay"), "{set}");

    // Neither key: neither parameter.
    fs::write(
        &config,
        yaml(milter_port.number(), &state, &sink.nexthop(), ""),
    )
    .expect("write");
    apply(&config, &etc);
    let (set, _) = postconf_n(&etc);
    assert!(!set.contains("dualroute_destination_"), "{set}");
}
