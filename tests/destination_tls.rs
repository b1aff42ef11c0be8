//! `destination: { tls: secure, tls_match: [...] }` end to end: a CA made
//! by the test signs the certificate of the other server (a private
//! Postfix with STARTTLS, tests/support/), `dualroute postfix-config` wires
//! the sending Postfix, and Postfix delivers routed mail to the host whose
//! certificate matches and keeps the mail for the one whose certificate
//! does not match deferred. `dualroute verify` reports the same, with the
//! certificate's names.

mod support;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{postfix_config, MilterProcess, Port, Postfix, PostfixOptions, SmtpClient, SENDER};

/// The other server's name, in its certificate.
const DEST_NAME: &str = "mx.dest.test";

/// tlsmgr: Postfix's TLS session cache and PRNG manager; the harness's
/// master.cf has no TLS services of its own.
const TLSMGR: &str = "tlsmgr unix - - n 1000? 1 tlsmgr";

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA, and a server certificate for [`DEST_NAME`] signed by it, as PEM
/// files in `dir` (readable by Postfix's unprivileged smtp client).
fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "dualroute test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec![DEST_NAME.to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, DEST_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    for (path, pem) in [
        (&pki.ca, ca.pem()),
        (&pki.cert, cert.pem()),
        (&pki.key, key.serialize_pem()),
    ] {
        fs::write(path, pem).expect("write PEM");
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    pki
}

/// milter.yaml: example.com's destination presents a matching certificate,
/// example.net's the same certificate under a `tls_match` it does not
/// carry. Two ports of the other server: the TLS policy is per next hop.
fn yaml(milter_port: u16, state: &Path, ports: (u16, u16), verify: bool) -> String {
    let verify = |a: &str| {
        if verify {
            format!("    verify: {a}\n")
        } else {
            String::new()
        }
    };
    format!(
        "listen: inet:127.0.0.1:{milter_port}\ninstance: tls.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: route\n{}    destination: {{ hosts: [\"[127.0.0.1]:{}\"], tls: secure, tls_match: [{DEST_NAME}] }}\n  example.net:\n    mode: route\n{}    destination: {{ hosts: [\"[127.0.0.1]:{}\"], tls: secure, tls_match: [wrong.dest.test] }}\n",
        state.display(),
        verify("bob@example.com"),
        ports.0,
        verify("carol@example.net"),
        ports.1,
    )
}

/// `dualroute verify DOMAIN` trusting the test's CA (rustls-native-certs
/// reads SSL_CERT_FILE instead of the system's store).
fn verify(config: &Path, ca: &Path, domain: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["verify", domain, "--config"])
        .arg(config)
        .env("SSL_CERT_FILE", ca)
        .env_remove("SSL_CERT_DIR")
        .output()
        .expect("run dualroute");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn postfix_delivers_only_to_a_matching_certificate() {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-tls-")
        .tempdir()
        .expect("tmp");
    let dir = tmp.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = make_pki(dir);

    // The other server: STARTTLS with the test CA's certificate, on its
    // own port and a second one.
    let dest = Postfix::start(
        PostfixOptions::default()
            .domain_without_catchall("example.com", &["bob@example.com"])
            .domain_without_catchall("example.net", &["carol@example.net"])
            .main_cf(&format!("myhostname = {DEST_NAME}"))
            .main_cf(&format!("smtpd_tls_cert_file = {}", pki.cert.display()))
            .main_cf(&format!("smtpd_tls_key_file = {}", pki.key.display()))
            .main_cf("smtpd_tls_security_level = may")
            .master_cf_on_a_port("127.0.0.1:PORT inet n - n - - smtpd")
            .master_cf(TLSMGR),
    );
    let ports = (dest.port(), dest.service_ports()[0]);

    let milter_port = Port::reserve();
    let config = dir.join("milter.yaml");
    fs::write(
        &config,
        yaml(milter_port.number(), &dir.join("state"), ports, false),
    )
    .expect("write");
    let out = dir.join("postfix-config");
    let generated = postfix_config(&config, &out);
    let policy = generated
        .tables
        .iter()
        .find(|(name, _)| name == "dualroute_tls_policy")
        .map(|(_, text)| text.clone())
        .unwrap_or_else(|| panic!("no TLS policy table:\n{}", generated.printed));
    assert!(
        policy.contains(&format!(
            "[127.0.0.1]:{}\tsecure match={DEST_NAME}",
            ports.0
        )),
        "{policy}"
    );
    assert!(
        generated
            .master_cf
            .iter()
            .any(|l| l.contains("-o smtp_tls_policy_maps=hash:/etc/postfix/dualroute_tls_policy")),
        "{:?}",
        generated.master_cf
    );
    let sender = Postfix::start(
        generated.apply_to(
            PostfixOptions::default()
                .domain("example.com", &[])
                .domain("example.net", &[])
                .milter(&format!("inet:127.0.0.1:{milter_port}"))
                .main_cf(&format!("smtp_tls_CAfile = {}", pki.ca.display()))
                .main_cf("smtp_tls_loglevel = 1")
                .master_cf(TLSMGR),
        ),
    );
    let milter = MilterProcess::start(&config, &milter_port, &dir.join("milter.log"));

    for rcpt in ["bob@example.com", "carol@example.net"] {
        let sent = SmtpClient::new(sender.smtp_addr()).send(
            SENDER,
            &[rcpt],
            &support::message(&format!("tls to {rcpt}")),
        );
        assert!(sent.accepted(), "{rcpt}: {sent:?}\n{}", milter.log());
    }

    // The matching certificate: delivered, over a verified TLS session.
    let got = dest.wait_deliveries(1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].line.contains("bob@example.com"), "{}", got[0].line);
    let log = sender.maillog();
    assert!(
        log.contains(&format!(
            "Verified TLS connection established to 127.0.0.1[127.0.0.1]:{}",
            ports.0
        )),
        "{log}"
    );

    // The other: deferred, never sent in clear, nothing at the other end.
    let deadline = Instant::now() + support::WAIT;
    let deferred = loop {
        let log = sender.maillog();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("to=<carol@example.net.") && l.contains("status=deferred"))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no deferral of carol@example.net:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        deferred.contains("dsn=4.7.5") && deferred.contains("Server certificate not verified"),
        "{deferred}"
    );
    assert!(
        !sender.queue().is_empty(),
        "carol@example.net's mail left the queue:\n{}",
        sender.maillog()
    );
    assert_eq!(
        dest.deliveries().len(),
        1,
        "the other server got mail it must not: {:?}",
        dest.deliveries()
    );
    drop(milter);

    // verify says STARTTLS and shows the names, and why one host fails.
    let probe_config = dir.join("probe.yaml");
    fs::write(
        &probe_config,
        yaml(milter_port.number(), &dir.join("state"), ports, true),
    )
    .expect("write");
    let (code, out) = verify(&probe_config, &pki.ca, "example.com");
    assert_eq!(code, Some(0), "{out}");
    for part in [
        "> STARTTLS",
        &format!("certificate names: {DEST_NAME}"),
        "certificate issued by a trusted CA",
        &format!("✔ certificate matches {DEST_NAME}"),
        "✔ accepted",
    ] {
        assert!(out.contains(part), "{part:?} missing:\n{out}");
    }
    let (code, out) = verify(&probe_config, &pki.ca, "example.net");
    assert_eq!(code, Some(1), "{out}");
    for part in [
        &format!("certificate names: {DEST_NAME}"),
        "✘ certificate matches none of wrong.dest.test",
        "Postfix would not deliver routed mail to this host",
        "NOT verified",
    ] {
        assert!(out.contains(part), "{part:?} missing:\n{out}");
    }
    assert!(
        !out.contains("RCPT TO"),
        "no RCPT after a refused certificate:\n{out}"
    );
    // Without the test CA the chain is not trusted.
    let (code, out) = verify(&probe_config, &dir.join("no-such-ca.pem"), "example.com");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NOT trusted"), "{out}");
}
