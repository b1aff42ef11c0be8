//! `dualroute doctor` against a real DNS server: dnsmasq on 127.0.0.1 with
//! the zone of tests/doctor/zone.conf plus each test's own records for
//! example.test. The binary is run as an administrator would, and its
//! checklist and exit code are checked line by line.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ZONE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/doctor/zone.conf");

fn dnsmasq_binary() -> PathBuf {
    for p in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("dnsmasq is not installed: these tests run it as a DNS server on 127.0.0.1. Install it with `sh scripts/test-deps.sh` (as root; it runs `apt-get install dnsmasq-base`, which starts no service)");
}

/// A dnsmasq answering on 127.0.0.1:`port` (UDP and TCP) until dropped.
struct Dnsmasq {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with the base zone and `records` (dnsmasq options).
    fn start(records: &[&str]) -> Dnsmasq {
        let binary = dnsmasq_binary();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dnsmasq.log");
        // dnsmasq binds its port itself, UDP then TCP, and exits when it
        // cannot: started again on another port (tests/support/ports.rs).
        let (child, port) = support::start_on_a_port("dnsmasq", |port| {
            let mut child = Command::new(&binary)
                .args([
                    "--no-daemon",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                ])
                .arg(format!("--port={port}"))
                // Also keeps dnsmasq from reading /etc/dnsmasq.conf.
                .arg(format!("--conf-file={ZONE}"))
                .arg(format!("--log-facility={}", log.display()))
                .args(records)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            let pid = child.id();
            // Up once its TCP socket listens (it binds UDP first).
            let bound = support::ports::wait_bound(
                port,
                Duration::from_secs(10),
                || vec![pid],
                || {
                    let exited = child.try_wait().ok().flatten()?;
                    let why = std::fs::read_to_string(&log).unwrap_or_default();
                    Some(format!("dnsmasq exited ({exited}): {why}"))
                },
            );
            match bound {
                Ok(()) => Ok((child, port)),
                Err(support::ports::NotBound::Taken(why)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(why)
                }
                Err(support::ports::NotBound::TimedOut) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "dnsmasq does not listen on 127.0.0.1:{port} after 10 s:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                }
            }
        });
        Dnsmasq {
            child,
            port,
            _dir: dir,
        }
    }

    fn nameserver(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of example.test when everything is right: MX to this
/// server, SPF covering this server and (through the include) the
/// destination.
const GOOD: &[&str] = &[
    "--mx-host=example.test,mx.example.test,10",
    "--txt-record=example.test,v=spf1 ip4:127.0.0.10 include:_spf.legacy.test -all",
];

/// A configuration with one `route` domain, example.test, whose
/// destination is `destination` (YAML), plus `extra` top-level lines.
fn config(dir: &Path, nameserver: &str, destination: &str, extra: &str) -> PathBuf {
    let path = dir.join("milter.yaml");
    let yaml = format!(
        "instance: mx.example.test\nstate_dir: state\n{extra}dns:\n  nameservers: [\"{nameserver}\"]\ndomains:\n  example.test:\n    mode: route\n    destination: {destination}\n"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

struct Run {
    code: i32,
    out: String,
}

impl Run {
    /// The checklist: (✔?, text) per check line.
    fn checks(&self) -> Vec<(bool, &str)> {
        self.out
            .lines()
            .filter_map(|l| {
                l.strip_prefix("  ✔ ")
                    .map(|t| (true, t))
                    .or_else(|| l.strip_prefix("  ✘ ").map(|t| (false, t)))
            })
            .collect()
    }

    /// The check line containing `text`, which must be there.
    fn line(&self, text: &str) -> (bool, &str) {
        self.checks()
            .into_iter()
            .find(|(_, t)| t.contains(text))
            .unwrap_or_else(|| panic!("no check line contains {text:?}:\n{}", self.out))
    }

    /// The advice printed under the ✘ line containing `text`.
    fn advice(&self, text: &str) -> &str {
        let mut lines = self.out.lines();
        while let Some(l) = lines.next() {
            if l.starts_with("  ✘ ") && l.contains(text) {
                if let Some(a) = lines.next().and_then(|a| a.strip_prefix("      → ")) {
                    return a;
                }
            }
        }
        panic!(
            "no advice under a ✘ line containing {text:?}:\n{}",
            self.out
        )
    }

    fn assert_fails(&self, text: &str) {
        assert_eq!(self.code, 1, "exit code:\n{}", self.out);
        assert!(!self.line(text).0, "{text:?} should be ✘:\n{}", self.out);
    }
}

fn doctor(config: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A panic exits 101; doctor must report, not crash.
    assert!(!stderr.contains("panicked"), "doctor panicked:\n{stderr}");
    // It names the file it read first (docs/design.md §6).
    let named = format!("dualroute: configuration {}\n", config.display());
    assert!(stderr.starts_with(&named), "{stderr}");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: stdout + &stderr[named.len()..],
    }
}

/// Runs doctor for example.test with `records` and the given destination.
fn run(records: &[&str], destination: &str, extra: &str, args: &[&str]) -> Run {
    let dns = Dnsmasq::start(records);
    let dir = tempfile::tempdir().unwrap();
    doctor(
        &config(dir.path(), &dns.nameserver(), destination, extra),
        args,
    )
}

const LEGACY: &str = "{ hosts: [legacy.test] }";

#[test]
fn all_good_is_all_ticks_and_exit_0() {
    let r = run(GOOD, LEGACY, "", &[]);
    assert_eq!(r.code, 0, "{}", r.out);
    let checks = r.checks();
    assert!(checks.len() >= 6, "{}", r.out);
    assert!(checks.iter().all(|(ok, _)| *ok), "every line ✔:\n{}", r.out);
    assert!(!r.out.contains('✘'), "{}", r.out);
    assert_eq!(
        r.line("resolves: 127.0.0.10"),
        (true, "mx.example.test resolves: 127.0.0.10")
    );
    assert_eq!(
        r.line("MX of example.test"),
        (
            true,
            "MX of example.test: 10 mx.example.test → 127.0.0.10 (this server)"
        )
    );
    assert_eq!(
        r.line("destination legacy.test"),
        (
            true,
            "destination legacy.test resolves: MX 10 mx.legacy.test of legacy.test → 127.0.0.20"
        )
    );
    assert_eq!(
        r.line("authorizes this server"),
        (
            true,
            "SPF of example.test authorizes this server: 127.0.0.10 (ip4:127.0.0.10)"
        )
    );
    // The destination's address comes from the MX of legacy.test, and the
    // SPF passes it through include: → mx:.
    assert_eq!(
        r.line("authorizes the destination"),
        (
            true,
            "SPF of example.test authorizes the destination: 127.0.0.20 (include:_spf.legacy.test)"
        )
    );
    assert!(
        r.line("relay domain example.test.dualroute.invalid does not resolve")
            .0
    );
    assert!(r.out.ends_with("no problems found\n"), "{}", r.out);
}

#[test]
fn spf_without_the_destination_names_the_missing_address() {
    // legacy.test is covered by the include; the second host, a literal
    // with a port, is not.
    let r = run(
        GOOD,
        "{ hosts: [legacy.test, \"[127.0.0.30]:2525\"] }",
        "",
        &[],
    );
    r.assert_fails("does not authorize 127.0.0.30");
    assert_eq!(
        r.line("does not authorize"),
        (false, "SPF of example.test does not authorize 127.0.0.30 (destination [127.0.0.30]:2525: fail by -all)")
    );
    let advice = r.advice("does not authorize 127.0.0.30");
    assert!(
        advice.starts_with("add ip4:127.0.0.30 to the SPF record of example.test"),
        "{advice}"
    );
    assert!(
        !advice.contains("127.0.0.20"),
        "only the missing address: {advice}"
    );
    // This server and the other destination host are still fine.
    assert!(r.line("authorizes this server").0, "{}", r.out);
    assert!(
        r.line("destination [127.0.0.30]:2525 is an address literal")
            .0,
        "{}",
        r.out
    );
    assert!(r.out.ends_with("1 problem found\n"), "{}", r.out);
}

#[test]
fn spf_without_this_server_explains_why_it_matters() {
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 include:_spf.legacy.test ~all",
        ],
        LEGACY,
        "",
        &[],
    );
    assert_eq!(
        r.line("does not authorize"),
        (
            false,
            "SPF of example.test does not authorize 127.0.0.10 (this server: softfail by ~all)"
        )
    );
    let advice = r.advice("does not authorize 127.0.0.10");
    assert!(
        advice.starts_with("add ip4:127.0.0.10 to the SPF record of example.test"),
        "{advice}"
    );
    assert!(advice.contains("keeps its sender's address"), "{advice}");
    assert!(r.line("authorizes the destination").0, "{}", r.out);
    assert_eq!(r.code, 1);
}

#[test]
fn ip_option_replaces_the_instance_addresses() {
    let r = run(
        GOOD,
        LEGACY,
        "",
        &["--ip", "127.0.0.10", "--ip", "127.0.0.11"],
    );
    assert_eq!(
        r.line("--ip"),
        (true, "addresses given with --ip: 127.0.0.10, 127.0.0.11")
    );
    assert_eq!(
        r.line("does not authorize"),
        (
            false,
            "SPF of example.test does not authorize 127.0.0.11 (this server: fail by -all)"
        )
    );
    assert!(
        r.advice("127.0.0.11").starts_with("add ip4:127.0.0.11 "),
        "{}",
        r.out
    );
    assert_eq!(r.code, 1);
}

#[test]
fn spf_mechanisms_redirect_a_and_mx() {
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 redirect=_spf.example.test",
            "--txt-record=_spf.example.test,v=spf1 a:mx.example.test/32 mx:legacy.test -all",
        ],
        LEGACY,
        "",
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.out);
    assert_eq!(
        r.line("authorizes this server"),
        (true, "SPF of example.test authorizes this server: 127.0.0.10 (redirect=_spf.example.test → a:mx.example.test/32)")
    );
    assert_eq!(
        r.line("authorizes the destination"),
        (true, "SPF of example.test authorizes the destination: 127.0.0.20 (redirect=_spf.example.test → mx:legacy.test)")
    );
}

#[test]
fn no_spf_record_suggests_one() {
    let r = run(
        &["--mx-host=example.test,mx.example.test,10"],
        LEGACY,
        "",
        &[],
    );
    r.assert_fails("example.test has no SPF record");
    assert!(
        r.advice("no SPF record").starts_with(
            "publish the TXT record \"v=spf1 ip4:127.0.0.10 ip4:127.0.0.20 ~all\" at example.test"
        ),
        "{}",
        r.out
    );
}

#[test]
fn no_mx_is_a_cross() {
    let r = run(
        &["--txt-record=example.test,v=spf1 ip4:127.0.0.10 include:_spf.legacy.test -all"],
        LEGACY,
        "",
        &[],
    );
    r.assert_fails("example.test has no MX record");
    assert!(
        r.advice("no MX record")
            .contains("this server (mx.example.test)"),
        "{}",
        r.out
    );
    assert_eq!(
        r.checks().iter().filter(|(ok, _)| !ok).count(),
        1,
        "only the MX is wrong:\n{}",
        r.out
    );
}

#[test]
fn mx_at_the_destination_and_an_mx_host_without_address() {
    let r = run(
        &[
            "--mx-host=example.test,mx.legacy.test,10",
            "--mx-host=example.test,backup.example.test,20",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 include:_spf.legacy.test -all",
        ],
        LEGACY,
        "",
        &[],
    );
    r.assert_fails("MX of example.test");
    assert_eq!(
        r.line("MX of example.test"),
        (false, "MX of example.test: 10 mx.legacy.test → 127.0.0.20 (the destination); 20 backup.example.test (no A or AAAA record)")
    );
    assert!(
        r.advice("MX of example.test")
            .starts_with("senders cannot reach backup.example.test"),
        "{}",
        r.out
    );
}

#[test]
fn destination_that_does_not_resolve() {
    let r = run(GOOD, "{ hosts: [gone.test] }", "", &[]);
    r.assert_fails("destination gone.test does not resolve");
    assert_eq!(
        r.line("destination gone.test"),
        (
            false,
            "destination gone.test does not resolve: gone.test has no address records"
        )
    );
    assert!(
        r.advice("destination gone.test")
            .contains("keeps it deferred"),
        "{}",
        r.out
    );
    // Without destination addresses there is nothing to check SPF for.
    assert!(
        !r.out.contains("authorizes the destination") && !r.out.contains("not authorize"),
        "{}",
        r.out
    );
}

#[test]
fn destination_that_is_this_server_would_loop() {
    let r = run(GOOD, "{ hosts: [\"[mx.example.test]\"] }", "", &[]);
    r.assert_fails("resolves to this server");
    assert_eq!(
        r.line("destination [mx.example.test]"),
        (
            false,
            "destination [mx.example.test] resolves to this server (127.0.0.10)"
        )
    );
}

#[test]
fn relay_suffix_that_resolves() {
    let mut records = GOOD.to_vec();
    // Any name under relay.test resolves, as a wildcard record would.
    records.push("--address=/relay.test/127.0.0.99");
    let r = run(&records, LEGACY, "relay_suffix: relay.test\n", &[]);
    r.assert_fails("relay domain example.test.relay.test");
    assert_eq!(
        r.line("relay domain"),
        (
            false,
            "relay domain example.test.relay.test resolves: 127.0.0.99"
        )
    );
    assert!(r.advice("relay domain").contains(".invalid"), "{}", r.out);
}

#[test]
fn relay_suffix_that_does_not_resolve_and_change_envelope_has_none() {
    let dns = Dnsmasq::start(GOOD);
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        &dns.nameserver(),
        LEGACY,
        "relay_suffix: relay.test\n",
    );
    let r = doctor(&path, &[]);
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(
        r.line("relay domain example.test.relay.test does not resolve")
            .0
    );
    // change_envelope: routed mail is addressed to the destination domain
    // itself, so there is no relay domain to check.
    let path = config(
        dir.path(),
        &dns.nameserver(),
        "{ domain: legacy.test, change_envelope: true }",
        "relay_suffix: relay.test\n",
    );
    let r = doctor(&path, &[]);
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(!r.out.contains("relay domain"), "{}", r.out);
    assert!(r.line("destination legacy.test resolves").0, "{}", r.out);
}

/// A name server that answers every query with SERVFAIL.
fn servfail_server() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP 127.0.0.1:0");
    let port = socket.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            // The query itself, turned into a response: QR, RD kept, RA,
            // RCODE 2 (SERVFAIL); the question stays, no answers.
            let mut reply = buf[..n].to_vec();
            reply[2] = 0x80 | (reply[2] & 0x01);
            reply[3] = 0x82;
            let _ = socket.send_to(&reply, from);
        }
    });
    port
}

#[test]
fn servfail_is_a_cross_with_the_error_not_a_crash() {
    let port = servfail_server();
    let dir = tempfile::tempdir().unwrap();
    let r = doctor(
        &config(dir.path(), &format!("127.0.0.1:{port}"), LEGACY, ""),
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.out);
    assert_eq!(
        r.line("addresses of mx.example.test"),
        (false, "addresses of mx.example.test (`instance`): A lookup of mx.example.test: the name server answered SERVFAIL (Server Failure)")
    );
    assert!(!r.line("MX of example.test").0);
    assert!(
        r.line("MX of example.test").1.contains("SERVFAIL"),
        "{}",
        r.out
    );
    assert!(
        r.line("destination legacy.test does not resolve")
            .1
            .contains("SERVFAIL"),
        "{}",
        r.out
    );
    assert!(
        r.line("SPF record of example.test").1.contains("SERVFAIL"),
        "{}",
        r.out
    );
    assert!(
        r.checks()
            .iter()
            .all(|(ok, t)| !ok || t.contains(".invalid")),
        "{}",
        r.out
    );
}

#[test]
fn silent_name_server_is_one_cross() {
    // Bound and never read: every query times out. Doctor says so once
    // instead of timing out on every check.
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP 127.0.0.1:0");
    let port = silent.local_addr().expect("local address").port();
    let dir = tempfile::tempdir().unwrap();
    let r = doctor(
        &config(dir.path(), &format!("127.0.0.1:{port}"), LEGACY, ""),
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.out);
    assert_eq!(r.checks().len(), 1, "{}", r.out);
    assert!(
        r.line(&format!(
            "the name servers do not answer (127.0.0.1:{port})"
        ))
        .1
        .contains("timed out"),
        "{}",
        r.out
    );
}

/// An SMTP server that accepts everything, for `dualroute verify`.
fn smtp_server() -> u16 {
    let listener = support::loopback_listener();
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut read = BufReader::new(stream.try_clone().unwrap());
            let _ = stream.write_all(b"220 mx.legacy.test ESMTP\r\n");
            let mut line = String::new();
            while read.read_line(&mut line).is_ok_and(|n| n > 0) {
                let quit = line.to_ascii_uppercase().starts_with("QUIT");
                let _ = stream.write_all(if quit { b"221 bye\r\n" } else { b"250 ok\r\n" });
                if quit {
                    break;
                }
                line.clear();
            }
        }
    });
    port
}

#[test]
fn verify_finds_the_destination_through_the_configured_name_servers() {
    // legacy.test's MX points to mx.legacy.test; here it is 127.0.0.1, where
    // the test's SMTP server listens. Only dnsmasq knows these names.
    let dns = Dnsmasq::start(&[
        "--host-record=mx.verify.test,127.0.0.1",
        "--mx-host=verify.test,mx.verify.test,10",
    ]);
    let port = smtp_server();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "instance: mx.example.test\nstate_dir: state\ndns: {{ nameservers: [\"{}\"] }}\ndomains:\n  example.test:\n    mode: route\n    verify: postmaster@verify.test\n    destination: {{ hosts: [\"verify.test:{port}\"] }}\n",
            dns.nameserver()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["verify", "example.test", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "127.0.0.1:{port} (MX 10 mx.verify.test of verify.test)"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("example.test: verified"), "{stdout}");
}

#[test]
fn spf_lookup_count_is_shown_per_include() {
    let r = run(GOOD, LEGACY, "", &[]);
    // include:_spf.legacy.test costs itself and its mx:legacy.test.
    assert_eq!(
        r.line("DNS lookups"),
        (
            true,
            "SPF of example.test needs 2 of the 10 DNS lookups receivers allow (RFC 7208 §4.6.4): include:_spf.legacy.test 2"
        )
    );
}

#[test]
fn spf_over_ten_lookups_is_a_cross_naming_the_costly_include() {
    // A second provider's include pushes the record past the limit of
    // RFC 7208 §4.6.4: 2 + 9 lookups.
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 include:_spf.legacy.test include:_spf.big.test -all",
            "--txt-record=_spf.big.test,v=spf1 a:mx.example.test a:mx.legacy.test mx:legacy.test mx:example.test a:mx.example.test a:mx.legacy.test a:mx.example.test a:mx.legacy.test ~all",
        ],
        LEGACY,
        "",
        &[],
    );
    r.assert_fails("DNS lookups");
    assert_eq!(
        r.line("DNS lookups"),
        (
            false,
            "SPF of example.test needs 11 DNS lookups, more than the 10 receivers allow (RFC 7208 §4.6.4): include:_spf.legacy.test 2, include:_spf.big.test 9"
        )
    );
    assert!(
        r.advice("DNS lookups")
            .contains("replace one with the ip4:/ip6: ranges"),
        "{}",
        r.out
    );
    // Both addresses are matched before the limit: only the count is ✘.
    assert!(r.line("authorizes this server").0, "{}", r.out);
    assert!(r.line("authorizes the destination").0, "{}", r.out);
    assert!(r.out.ends_with("1 problem found\n"), "{}", r.out);
}

#[test]
fn spf_ptr_matches_through_the_reverse_lookup() {
    // A host-record gives 192.0.2.10 its PTR record (an address only as
    // data: hickory answers PTR queries for 127.0.0.0/8 itself, with
    // "localhost", RFC 6761 §6.3). The evaluator written before viaspf
    // never matched ptr and reported ✘.
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--host-record=out.example.test,192.0.2.10",
            "--txt-record=example.test,v=spf1 ptr:example.test include:_spf.legacy.test -all",
        ],
        LEGACY,
        "",
        &["--ip", "192.0.2.10"],
    );
    assert_eq!(
        r.line("authorizes this server"),
        (
            true,
            "SPF of example.test authorizes this server: 192.0.2.10 (ptr:example.test)"
        )
    );
    assert_eq!(r.code, 0, "{}", r.out);
}

#[test]
fn spf_mx_with_more_than_ten_names_is_evaluated_as_the_rfc_says() {
    // RFC 7208 §4.6.4 limits the address lookups of one mx term to 10:
    // this server, the first MX, matches; the destination would need the
    // 11th and is a permerror. (The evaluator before viaspf failed both
    // before any lookup.)
    let mut records = vec![
        "--mx-host=example.test,mx.example.test,5".to_owned(),
        "--txt-record=example.test,v=spf1 mx include:_spf.legacy.test -all".to_owned(),
    ];
    for i in 1..=10 {
        records.push(format!("--mx-host=example.test,mx{i}.example.test,10"));
        records.push(format!("--host-record=mx{i}.example.test,127.0.1.{i}"));
    }
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let r = run(&records, LEGACY, "", &[]);
    assert_eq!(
        r.line("authorizes this server"),
        (
            true,
            "SPF of example.test authorizes this server: 127.0.0.10 (mx)"
        )
    );
    let (ok, text) = r.line("does not authorize 127.0.0.20");
    assert!(!ok, "{}", r.out);
    assert!(
        text.contains("permerror") && text.contains("more than 10 address lookups for one mx"),
        "{}",
        r.out
    );
    assert!(
        r.advice("does not authorize 127.0.0.20")
            .contains("the SPF record of example.test is broken"),
        "{}",
        r.out
    );
}

#[test]
fn spf_unterminated_macro_is_a_syntax_error() {
    // `%{d` without its brace: receivers answer permerror (RFC 7208 §7.1);
    // the evaluator before viaspf read it as `%{d}` and gave ✔.
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 exists:%{d include:_spf.legacy.test -all",
        ],
        LEGACY,
        "",
        &[],
    );
    r.assert_fails("SPF record of example.test is broken");
    assert_eq!(
        r.line("SPF record of example.test"),
        (
            false,
            "SPF record of example.test is broken: invalid SPF record: `exists:%{d` is not valid SPF syntax (RFC 7208 §12)"
        )
    );
    assert!(
        r.advice("SPF record of example.test").contains("permerror"),
        "{}",
        r.out
    );
    assert!(r.out.ends_with("1 problem found\n"), "{}", r.out);
}

#[test]
fn spf_error_after_the_matching_terms_is_one_cross_on_the_count() {
    // Both addresses match before the broken include, so only the full
    // evaluation (what forged mail, or an address listed later, costs a
    // receiver) meets it.
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 include:_spf.legacy.test include:nospf.test -all",
        ],
        LEGACY,
        "",
        &[],
    );
    assert!(r.line("authorizes this server").0, "{}", r.out);
    assert!(r.line("authorizes the destination").0, "{}", r.out);
    r.assert_fails("ends in an error");
    assert_eq!(
        r.line("ends in an error"),
        (
            false,
            "SPF of example.test ends in an error for addresses it does not list earlier (example.test: include:nospf.test: the included domain has no SPF record), after 3 DNS lookups: include:_spf.legacy.test 2, include:nospf.test 1"
        )
    );
    assert!(r.out.ends_with("1 problem found\n"), "{}", r.out);
}

/// The `•` lines: what to set on the provider's side.
fn todo(r: &Run) -> Vec<&str> {
    r.out
        .lines()
        .filter_map(|l| l.strip_prefix("  • "))
        .collect()
}

#[test]
fn google_recognised_by_mx_and_told_about_the_gateway() {
    // The destination names no provider; its MX is Google's. The domain's
    // MX points here, so "reject mail not from gateway IPs" is safe.
    let r = run(
        &[
            "--mx-host=example.test,mx.example.test,10",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 ip4:127.0.0.40 -all",
            "--mx-host=gdest.test,aspmx.l.google.com,10",
            "--host-record=aspmx.l.google.com,127.0.0.40",
        ],
        "{ hosts: [gdest.test] }",
        "",
        &[],
    );
    assert_eq!(
        r.line("Google"),
        (
            true,
            "the destination is Google Workspace (recognised by its MX host aspmx.l.google.com)"
        )
    );
    let todo = todo(&r);
    assert!(
        todo.iter()
            .any(|t| t.contains("Inbound gateway: add 127.0.0.10 as gateway IPs")),
        "{}",
        r.out
    );
    assert!(
        todo.iter().any(|t| t.contains("points here")
            && t.contains("you can tick \"Reject all mail not from gateway IPs\"")),
        "{}",
        r.out
    );
    assert!(
        todo.iter()
            .any(|t| t.contains("never use example.test.test-google-a.com as an envelope sender")),
        "{}",
        r.out
    );
    assert_eq!(r.code, 0, "{}", r.out);
}

#[test]
fn microsoft_recognised_by_name_with_the_mx_elsewhere() {
    let r = run(
        &[
            "--mx-host=example.test,example-test.mail.protection.outlook.com,0",
            "--mx-host=example.mail.onmicrosoft.com,example-test.mail.protection.outlook.com,0",
            "--host-record=example-test.mail.protection.outlook.com,127.0.0.50",
            "--txt-record=example.test,v=spf1 ip4:127.0.0.10 ip4:127.0.0.50 -all",
        ],
        "{ domain: example.mail.onmicrosoft.com, change_envelope: true }",
        "",
        &["--ip", "127.0.0.10"],
    );
    assert!(
        r.line("Microsoft 365")
            .1
            .contains("by the destination's name"),
        "{}",
        r.out
    );
    let todo = todo(&r);
    assert!(
        todo.iter().any(|t| t.contains("Connectors")
            && t.contains("identifies this server by its IP addresses (127.0.0.10)")),
        "{}",
        r.out
    );
    assert!(
        todo.iter()
            .any(|t| t.contains("does not point here") && t.contains("Enhanced Filtering")),
        "{}",
        r.out
    );
    assert!(
        todo.iter()
            .any(|t| t.contains("never use example.mail.onmicrosoft.com as an envelope sender")),
        "{}",
        r.out
    );
}

#[test]
fn other_destinations_get_no_provider_advice() {
    let r = run(GOOD, LEGACY, "", &[]);
    let advice: Vec<&str> = todo(&r)
        .into_iter()
        .filter(|t| !t.contains("backscatter"))
        .collect();
    assert!(advice.is_empty(), "{}", r.out);
    assert!(!r.out.contains("recognised"), "{}", r.out);
}

/// DESIGN.md §10: a route domain without `reject_unknown` accepts what
/// the destination refuses, and the bounce goes from here; doctor says so
/// (a `•` to do, not a ✘: it is a choice), and stops saying it once
/// `reject_unknown` is set.
#[test]
fn a_route_domain_without_reject_unknown_is_told_about_backscatter() {
    let r = run(GOOD, LEGACY, "", &[]);
    assert!(
        todo(&r).iter().any(|t| t.starts_with(
            "mode route without destination.reject_unknown: an address unknown here and at the destination is accepted"
        ) && t.contains("backscatter")),
        "{}",
        r.out
    );
    assert_eq!(r.code, 0, "{}", r.out);
    let r = run(
        GOOD,
        "{ hosts: [legacy.test], reject_unknown: { callout: true } }",
        "",
        &[],
    );
    assert!(!r.out.contains("backscatter"), "{}", r.out);
}
