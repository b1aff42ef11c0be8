//! STARTTLS for the verification probe: what the destination's
//! certificate says, and whether Postfix would accept it at the
//! destination's `tls` level (TLS_README "Client-side TLS security
//! levels").
//!
//! The handshake itself accepts any certificate: the probe reports, it
//! does not deliver, and a report that only says "handshake failed" would
//! hide the names the admin needs to see. The certificate is judged
//! afterwards, as Postfix judges it: trust against the system's CAs (what
//! Debian's Postfix uses, `smtp_tls_CApath = /etc/ssl/certs`;
//! `SSL_CERT_FILE`/`SSL_CERT_DIR` override it), names against the match
//! list.

use crate::config::{TlsLevel, TlsMatch};
use std::{fmt, sync::Arc};
use tokio_rustls::rustls::{
    self,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

/// What the probe must see: the level and the names Postfix will match.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct TlsCheck {
    pub level: Option<TlsLevel>,
    pub matches: Vec<TlsMatch>,
}

impl TlsCheck {
    /// Whether the probe says STARTTLS: when Postfix will insist on it.
    pub fn wanted(&self) -> bool {
        self.level.is_some_and(TlsLevel::requires_tls)
    }

    /// The names a certificate must carry one of, with Postfix's keywords
    /// resolved for this host: `hostname` is the MX host's name,
    /// `nexthop` the destination as the transport names it. Empty: the
    /// level checks no names.
    pub fn patterns(&self, hostname: &str, nexthop: &str) -> Vec<String> {
        let Some(level) = self.level.filter(|l| l.verifies()) else {
            return Vec::new();
        };
        let defaults: Vec<TlsMatch> = match level {
            // postconf(5) smtp_tls_verify_cert_match = hostname,
            // smtp_tls_secure_cert_match = nexthop, dot-nexthop.
            TlsLevel::Verify => vec![TlsMatch("hostname".into())],
            _ => vec![TlsMatch("nexthop".into()), TlsMatch("dot-nexthop".into())],
        };
        let list = if self.matches.is_empty() {
            &defaults
        } else {
            &self.matches
        };
        list.iter()
            .map(|m| match m.0.as_str() {
                "hostname" => hostname.to_ascii_lowercase(),
                "nexthop" => nexthop.to_ascii_lowercase(),
                "dot-nexthop" => format!(".{}", nexthop.to_ascii_lowercase()),
                name => name.to_owned(),
            })
            .collect()
    }
}

/// The TLS session the probe got, and the verdict on its certificate.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsReport {
    pub level: TlsLevel,
    /// `TLSv1_3 TLS13_AES_256_GCM_SHA384`
    pub session: String,
    /// The DNS names of the certificate (subjectAltName; the subject's CN
    /// only when there are none, as Postfix does).
    pub names: Vec<String>,
    /// Whether the chain leads to a trusted CA; the reason when not.
    pub trust: Result<(), String>,
    /// The names it had to carry one of (empty: none checked).
    pub patterns: Vec<String>,
    /// The pattern it matched.
    pub matched: Option<String>,
}

impl TlsReport {
    /// Whether Postfix delivers over this session at the level.
    pub fn acceptable(&self) -> bool {
        !self.level.verifies() || (self.trust.is_ok() && self.matched.is_some())
    }

    /// Why Postfix would not, for the probe's error.
    pub fn problem(&self) -> Option<String> {
        if self.acceptable() {
            return None;
        }
        let mut why = Vec::new();
        if let Err(e) = &self.trust {
            why.push(format!("the certificate is not trusted ({e})"));
        }
        if self.matched.is_none() {
            why.push(format!(
                "the certificate names {} but tls {} needs one of {}",
                list_or_none(&self.names),
                self.level,
                self.patterns.join(", ")
            ));
        }
        Some(format!(
            "{}: Postfix would not deliver routed mail to this host (it stays deferred)",
            why.join("; ")
        ))
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no DNS name".into()
    } else {
        names.join(", ")
    }
}

impl fmt::Display for TlsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  TLS {} (tls {})", self.session, self.level)?;
        writeln!(f, "  certificate names: {}", list_or_none(&self.names))?;
        match &self.trust {
            Ok(()) => writeln!(f, "  certificate issued by a trusted CA")?,
            Err(e) => writeln!(f, "  certificate NOT trusted: {e}")?,
        }
        match (&self.matched, self.patterns.is_empty()) {
            (_, true) => write!(f, "  names not checked at tls {}", self.level),
            (Some(m), false) => write!(f, "  ✔ certificate matches {m}"),
            (None, false) => write!(
                f,
                "  ✘ certificate matches none of {}",
                self.patterns.join(", ")
            ),
        }
    }
}

/// Postfix's name match (tls_verify.c, match_servername): `.domain`
/// matches any name below it; a name matches itself, case aside; a
/// certificate's `*.domain` matches one label in front of the domain.
pub fn name_matches(pattern: &str, cert_name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), cert_name.to_ascii_lowercase());
    if p.len() > 1 && p.starts_with('.') {
        return n.len() > p.len() && n.ends_with(&p);
    }
    if p == n {
        return true;
    }
    match (n.strip_prefix("*."), p.split_once('.')) {
        (Some(wild), Some((label, rest))) => !label.is_empty() && wild == rest,
        _ => false,
    }
}

/// The DNS names of a DER certificate (see [`TlsReport::names`]).
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Whether the chain leads to a CA of the system's store.
fn trusted(chain: &[CertificateDer<'_>], algs: &WebPkiSupportedAlgorithms) -> Result<(), String> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err("the server sent no certificate".into());
    };
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(
            "no trusted CAs found on this system (install ca-certificates, or set SSL_CERT_FILE)"
                .into(),
        );
    }
    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        algs.all,
    )
    .map_err(|e| e.to_string())
}

/// Judges the session of a finished handshake.
pub fn judge(
    check: &TlsCheck,
    conn: &rustls::ClientConnection,
    hostname: &str,
    nexthop: &str,
) -> TlsReport {
    let level = check.level.unwrap_or(TlsLevel::Encrypt);
    let session = format!(
        "{} {}",
        conn.protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        conn.negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default()
    );
    let chain = conn.peer_certificates().unwrap_or_default();
    let (names, parse_error) = match chain.first().map(|c| certificate_names(c)) {
        Some(Ok(n)) => (n, None),
        Some(Err(e)) => (Vec::new(), Some(e)),
        None => (
            Vec::new(),
            Some("the server sent no certificate".to_owned()),
        ),
    };
    let algs = provider().signature_verification_algorithms;
    let trust = match parse_error {
        Some(e) => Err(e),
        None => trusted(chain, &algs),
    };
    let patterns = check.patterns(hostname, nexthop);
    let matched = patterns
        .iter()
        .find(|p| names.iter().any(|n| name_matches(p, n)))
        .cloned();
    TlsReport {
        level,
        session,
        names,
        trust,
        patterns,
        matched,
    }
}

/// A client configuration that completes the handshake whatever the
/// certificate (see the module comment); the handshake signatures are
/// still checked, so the session is with the holder of the key.
pub fn client_config() -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let verifier = Arc::new(ReportOnly(provider.signature_verification_algorithms));
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The name rustls sends (SNI) and checks nothing against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))
}

#[derive(Debug)]
struct ReportOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for ReportOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_name_matching() {
        assert!(name_matches("mx.example.net", "MX.example.net"));
        assert!(!name_matches("mx.example.net", "mx2.example.net"));
        assert!(name_matches(".example.net", "mx.example.net"));
        assert!(name_matches(".example.net", "*.example.net"));
        assert!(!name_matches(".example.net", "example.net"));
        assert!(!name_matches(".example.net", "mx.example.net.evil.test"));
        assert!(name_matches("mx.example.net", "*.example.net"));
        assert!(!name_matches("a.mx.example.net", "*.example.net"));
        assert!(!name_matches("example.net", "*.example.net"));
    }

    #[test]
    fn patterns_per_level() {
        let check = |level, m: &[&str]| TlsCheck {
            level: Some(level),
            matches: m.iter().map(|s| TlsMatch((*s).into())).collect(),
        };
        assert_eq!(
            check(TlsLevel::Verify, &[]).patterns("mx1.legacy.test", "legacy.test"),
            ["mx1.legacy.test"]
        );
        assert_eq!(
            check(TlsLevel::Secure, &[]).patterns("mx1.legacy.test", "legacy.test"),
            ["legacy.test", ".legacy.test"]
        );
        assert_eq!(
            check(TlsLevel::Secure, &["mx.other.test", "hostname"])
                .patterns("MX1.legacy.test", "x"),
            ["mx.other.test", "mx1.legacy.test"]
        );
        assert!(check(TlsLevel::Encrypt, &[]).patterns("a", "b").is_empty());
    }
}
