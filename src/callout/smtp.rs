//! One callout: the verification probe's SMTP conversation (src/probe.rs:
//! EHLO, STARTTLS per the destination's `tls` level, MAIL FROM:<>,
//! RCPT TO, QUIT) for a recipient instead of the `verify` address, and
//! what the destination's reply to RCPT means (DESIGN.md §10).

use super::Verdict;
use crate::config::DomainConfig;
use crate::dns::Lookup;
use crate::probe::{self, tls::TlsCheck, HostReport};
use std::time::Duration;

/// What one callout learned: the verdict and the reply (or failure) that
/// made it, for the log and `explain`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(super) struct Reply {
    pub verdict: Verdict,
    pub text: String,
}

/// Asks the destination's hosts, in the order the MTA tries them, whether
/// they take `address`. The first host that answers RCPT decides, as it
/// would for the MTA's delivery; a host that cannot be reached or refuses
/// the session before RCPT passes the question to the next one (Postfix
/// moves on to the next MX host then, smtp(8) "smtp_mx_address_limit").
pub(super) async fn ask(
    d: &DomainConfig,
    dns: &impl Lookup,
    helo: &str,
    address: &str,
    step_timeout: Duration,
) -> Reply {
    let targets = match probe::targets(&d.destination, dns).await {
        Ok(t) => t,
        Err(e) => {
            return Reply {
                verdict: Verdict::Unreachable,
                text: format!("no host to ask: {e}"),
            }
        }
    };
    let tls = TlsCheck {
        level: d.transport.tls,
        matches: d.transport.tls_match.clone(),
    };
    let mut failures = Vec::new();
    for target in targets {
        let report = probe::probe_host(target, helo, address, step_timeout, false, &tls).await;
        match judge(&report) {
            Some(reply) => return reply,
            None => failures.push(format!(
                "{}: {}",
                report.target.addr,
                report.error.as_deref().unwrap_or("no answer")
            )),
        }
    }
    Reply {
        verdict: Verdict::Unreachable,
        text: failures.join("; "),
    }
}

/// The verdict of one host's conversation, when it got as far as an
/// answer to RCPT: 2xx the destination knows the address, 5xx it does not
/// (RFC 5321 §4.2.1: a permanent refusal), 4xx it cannot say now. `None`
/// when the conversation ended before RCPT (connection, greeting, EHLO,
/// TLS, MAIL refused).
pub(super) fn judge(report: &HostReport) -> Option<Reply> {
    let rcpt = report
        .steps
        .iter()
        .find(|s| s.sent.as_deref().is_some_and(|c| c.starts_with("RCPT TO:")))?;
    let verdict = match rcpt.code / 100 {
        2 if report.accepted => Verdict::Known,
        5 => Verdict::Unknown,
        _ => Verdict::Unreachable,
    };
    Some(Reply {
        verdict,
        text: rcpt.reply.clone(),
    })
}

/// A local part no one has, for accept-all detection (as Exim's callout
/// `random` option): `dualroute-check-` and 16 hex digits that differ on
/// every call, so no cache on the other side answers for it.
pub(super) fn random_local_part() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process and varied per
    // instance: enough to make the name unguessable and new each time,
    // without a random-number crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("dualroute-check-{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Step, Target};

    fn report(steps: &[(&str, u16)], accepted: bool) -> HostReport {
        HostReport {
            target: Target {
                addr: "127.0.0.1:25".parse().unwrap(),
                via: String::new(),
                host: String::new(),
                nexthop: String::new(),
            },
            steps: steps
                .iter()
                .map(|(sent, code)| Step {
                    sent: (!sent.is_empty()).then(|| sent.to_string()),
                    code: *code,
                    reply: format!("{code} x"),
                })
                .collect(),
            accepted,
            error: None,
            tls: None,
        }
    }

    #[test]
    fn rcpt_reply_classes() {
        let base = [("", 220), ("EHLO h", 250), ("MAIL FROM:<>", 250)];
        let with = |code, accepted| {
            let mut s = base.to_vec();
            s.push(("RCPT TO:<a@b>", code));
            judge(&report(&s, accepted)).map(|r| r.verdict)
        };
        assert_eq!(with(250, true), Some(Verdict::Known));
        assert_eq!(with(550, false), Some(Verdict::Unknown));
        assert_eq!(with(553, false), Some(Verdict::Unknown));
        assert_eq!(with(450, false), Some(Verdict::Unreachable));
        assert_eq!(with(451, false), Some(Verdict::Unreachable));
        // MAIL FROM:<> refused: no answer about the address; next host.
        assert_eq!(
            judge(&report(
                &[("", 220), ("EHLO h", 250), ("MAIL FROM:<>", 550)],
                false
            )),
            None
        );
        assert_eq!(judge(&report(&[], false)), None);
    }

    #[test]
    fn random_local_parts_differ() {
        let (a, b) = (random_local_part(), random_local_part());
        assert_ne!(a, b);
        assert!(a.starts_with("dualroute-check-") && a.len() == 32, "{a}");
    }
}
