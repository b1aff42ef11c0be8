//! What `dualroute doctor` reads from an SPF evaluation: viaspf does RFC
//! 7208 `check_host()`; this module turns its captured trace into what an
//! administrator needs on a checklist line — the term of the domain's own
//! record that decided, why an error happened, and how many DNS lookups
//! the record costs, per include.

use std::net::{IpAddr, Ipv4Addr};
use viaspf::lookup::{Lookup, LookupError};
use viaspf::record::SpfRecord;
use viaspf::trace::{Trace, Tracepoint};
use viaspf::{Config, DomainName, EvalError, Sender, SpfResult, SpfResultCause};

/// RFC 7208 §4.6.4: at most 10 terms that cause DNS lookups (`include`,
/// `a`, `mx`, `ptr`, `exists`, `redirect`); receivers answer permerror past it.
pub const MAX_LOOKUPS: usize = 10;

/// The SPF records among a domain's TXT records (RFC 7208 §4.5: those
/// starting with exactly `v=spf1`); there must be one.
pub fn spf_records(txt: &[String]) -> Vec<&str> {
    txt.iter()
        .map(String::as_str)
        .filter(|t| {
            t.get(..6).is_some_and(|v| v.eq_ignore_ascii_case("v=spf1"))
                && (t.len() == 6 || t[6..].starts_with(' '))
        })
        .collect()
}

/// What is wrong with a record receivers cannot parse, or `None`.
pub fn syntax_error(record: &str) -> Option<String> {
    record.parse::<SpfRecord>().err().map(|_| invalid(record))
}

/// A `check_host()` result and what led to it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Verdict {
    pub result: SpfResult,
    /// The term of the domain's own record that gave the result
    /// (`ip4:192.0.2.0/24`, `include:_spf.example.net`, `-all`, or
    /// `redirect=_spf.example.net → mx` through a redirect); none when
    /// nothing matched or the record could not be read.
    pub term: Option<String>,
    /// For temperror and permerror: what went wrong, in words.
    pub error: Option<String>,
}

/// The SPF record of `domain` as receivers see it, for mail from `ip`;
/// `helo` is only used by the `%{h}` macro.
pub async fn check_host(dns: &impl Lookup, ip: IpAddr, domain: &str, helo: &str) -> Verdict {
    let config = Config::builder().capture_trace(true).build();
    run(dns, &config, ip, domain, helo).await.0
}

/// The DNS-lookup cost of a domain's SPF record (RFC 7208 §4.6.4).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Cost {
    /// Lookups per term of the domain's own record, in record order; an
    /// include's count covers everything inside it.
    pub terms: Vec<(String, usize)>,
    /// The evaluation itself failed (a lookup, a broken include): the
    /// count covers only what was evaluated before.
    pub incomplete: Option<String>,
}

impl Cost {
    pub fn total(&self) -> usize {
        self.terms.iter().map(|(_, n)| n).sum()
    }
}

/// Lookups the whole record costs when nothing matches early — what mail
/// from an address near its end, or a forged one, costs a receiver. The
/// evaluation runs with the limits raised so that the count goes past 10
/// instead of stopping there; `0.0.0.0` is an address no record authorizes
/// short of `ip4:0.0.0.0/0` or `+all`, which end the evaluation anyway.
pub async fn cost(dns: &impl Lookup, domain: &str, helo: &str) -> Cost {
    let config = Config::builder()
        .capture_trace(true)
        .max_lookups(5 * MAX_LOOKUPS)
        .max_void_lookups(5 * MAX_LOOKUPS)
        .build();
    let ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let (verdict, trace) = run(dns, &config, ip, domain, helo).await;
    let mut terms: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut term: Option<String> = None;
    for event in trace.map(|t| t.events).unwrap_or_default() {
        match event.tracepoint {
            Tracepoint::ExecuteQuery(_) => depth += 1,
            Tracepoint::QueryResult(_) => depth = depth.saturating_sub(1),
            Tracepoint::EvaluateDirective(d) if depth == 1 => term = Some(d.to_string()),
            Tracepoint::EvaluateRedirect(r) if depth == 1 => term = Some(r.to_string()),
            Tracepoint::IncrementLookupCount => {
                let t = term.clone().unwrap_or_default();
                match terms.last_mut() {
                    Some((last, n)) if *last == t => *n += 1,
                    _ => terms.push((t, 1)),
                }
            }
            _ => {}
        }
    }
    let incomplete = match verdict.result {
        SpfResult::Temperror | SpfResult::Permerror => verdict.error,
        _ => None,
    };
    Cost { terms, incomplete }
}

async fn run(
    dns: &impl Lookup,
    config: &Config,
    ip: IpAddr,
    domain: &str,
    helo: &str,
) -> (Verdict, Option<Trace>) {
    // RFC 7208 §2.4: with MAIL FROM:<postmaster@domain> the checked domain
    // is the domain itself; only macros see the local part.
    let Ok(sender) = Sender::new(&format!("postmaster@{domain}")) else {
        let verdict = Verdict {
            result: SpfResult::None,
            term: None,
            error: Some(format!("{domain} is not a domain SPF can check")),
        };
        return (verdict, None);
    };
    let helo = DomainName::new(helo).ok();
    let out = viaspf::evaluate_sender(dns, config, ip, &sender, helo.as_ref()).await;
    let trace = out.trace.unwrap_or_default();
    let (term, error) = read(&trace);
    let error = match out.spf_result {
        SpfResult::Temperror | SpfResult::Permerror => error.or_else(|| match out.cause {
            Some(SpfResultCause::Error(c)) => Some(c.to_string()),
            _ => None,
        }),
        _ => None,
    };
    let verdict = Verdict {
        result: out.spf_result,
        term,
        error,
    };
    (verdict, Some(trace))
}

/// One query (the domain's, or an include's or redirect's) in the trace.
#[derive(Default)]
struct Level {
    domain: String,
    term: Option<String>,
    redirect: bool,
    /// What the last query started from this one decided.
    child: Option<String>,
}

/// The deciding term, through redirects, and the first error in words.
/// The trace is flat: `ExecuteQuery` … `QueryResult` brackets each query,
/// nested for include and redirect.
fn read(trace: &Trace) -> (Option<String>, Option<String>) {
    let mut stack: Vec<Level> = Vec::new();
    let mut decided = None;
    let mut error: Option<String> = None;
    let domain = |stack: &[Level]| stack.last().map(|l| l.domain.clone()).unwrap_or_default();
    for event in &trace.events {
        let mut fail = |e: String| {
            error.get_or_insert(e);
        };
        match &event.tracepoint {
            Tracepoint::ExecuteQuery(name) => stack.push(Level {
                domain: name.to_string(),
                ..Level::default()
            }),
            Tracepoint::EvaluateDirective(d) => {
                if let Some(l) = stack.last_mut() {
                    l.term = Some(d.to_string());
                    l.redirect = false;
                }
            }
            Tracepoint::EvaluateRedirect(r) => {
                if let Some(l) = stack.last_mut() {
                    l.term = Some(r.to_string());
                    l.redirect = true;
                    l.child = None;
                }
            }
            Tracepoint::NeutralResult => {
                if let Some(l) = stack.last_mut() {
                    l.term = None;
                }
            }
            Tracepoint::QueryResult(_) => {
                let Some(l) = stack.pop() else { continue };
                let t = match (l.term, l.child) {
                    (Some(t), Some(c)) if l.redirect => Some(format!("{t} → {c}")),
                    (t, _) => t,
                };
                match stack.last_mut() {
                    Some(parent) => parent.child = t,
                    None => decided = t,
                }
            }
            Tracepoint::SpfRecordLookupError(e) => fail(lookup_error(e)),
            Tracepoint::MultipleSpfRecords(r) => fail(format!(
                "{}: {} SPF records; there must be exactly one (RFC 7208 §4.5)",
                domain(&stack),
                r.len()
            )),
            Tracepoint::InvalidSpfRecordSyntax(r) => {
                fail(format!("{}: {}", domain(&stack), invalid(r)))
            }
            Tracepoint::MultipleRedirectModifiers(_) => {
                fail(format!("{}: `redirect` appears twice", domain(&stack)))
            }
            Tracepoint::MultipleExpModifiers(_) => {
                fail(format!("{}: `exp` appears twice", domain(&stack)))
            }
            Tracepoint::RedirectNoSpfRecord => {
                let target = stack
                    .last()
                    .and_then(|l| l.term.clone())
                    .unwrap_or_default();
                fail(format!("{target}: the target has no SPF record"))
            }
            Tracepoint::MechanismErrorResult(e, _) => {
                let term = stack
                    .last()
                    .and_then(|l| l.term.clone())
                    .unwrap_or_default();
                fail(format!("{}: {term}: {}", domain(&stack), eval_error(e)))
            }
            Tracepoint::RedirectLookupLimitExceeded => {
                fail(eval_error(&EvalError::LookupLimitExceeded))
            }
            _ => {}
        }
    }
    (decided, error)
}

/// A failed lookup as our resolver worded it (see `dns.rs`).
fn lookup_error(e: &LookupError) -> String {
    match e {
        LookupError::Dns(Some(source)) => source.to_string(),
        other => other.to_string(),
    }
}

fn eval_error(e: &EvalError) -> String {
    match e {
        EvalError::Dns(Some(source)) => source.to_string(),
        EvalError::LookupLimitExceeded => format!(
            "more than {MAX_LOOKUPS} DNS lookups (include, a, mx, ptr, exists, redirect; RFC 7208 §4.6.4)"
        ),
        EvalError::PerMechanismLookupLimitExceeded => format!(
            "more than {MAX_LOOKUPS} address lookups for one mx or ptr term (RFC 7208 §4.6.4)"
        ),
        EvalError::VoidLookupLimitExceeded => {
            "more than 2 lookups found nothing (RFC 7208 §4.6.4)".into()
        }
        EvalError::IncludeNoSpfRecord => "the included domain has no SPF record".into(),
        EvalError::RecursivePermerror => "the included record is broken (see above)".into(),
        EvalError::RecursiveTemperror => "a lookup inside it failed".into(),
        other => other.to_string(),
    }
}

/// Names the first term a receiver cannot parse: viaspf rejects a record
/// as a whole (RFC 7208 §4.6: a syntax error anywhere is a permerror), so
/// each term is tried alone.
fn invalid(record: &str) -> String {
    let bad = record
        .split_ascii_whitespace()
        .skip(1)
        .find(|term| format!("v=spf1 {term}").parse::<SpfRecord>().is_err());
    match bad {
        Some(term) => {
            format!("invalid SPF record: `{term}` is not valid SPF syntax (RFC 7208 §12)")
        }
        None => format!("invalid SPF record \"{record}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spf_record_is_the_txt_starting_with_exactly_v_spf1() {
        let txt: Vec<String> = [
            "google-site-verification=abc",
            "v=spf10 +all",
            "V=SPF1 ip4:192.0.2.1 -all",
            "v=spf1",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(spf_records(&txt), ["V=SPF1 ip4:192.0.2.1 -all", "v=spf1"]);
        assert!(spf_records(&["v=spf1x".to_owned()]).is_empty());
    }

    #[test]
    fn a_syntax_error_names_the_first_bad_term() {
        assert_eq!(
            syntax_error("v=spf1 ip4:192.0.2.1 include:%{d2}.example -all"),
            None
        );
        assert_eq!(
            syntax_error("v=spf1 ip4:192.0.2.1 exists:%{d -all").as_deref(),
            Some("invalid SPF record: `exists:%{d` is not valid SPF syntax (RFC 7208 §12)")
        );
        assert_eq!(
            syntax_error("v=spf1 ip4:2001:db8::1 foo:bar -all").as_deref(),
            Some("invalid SPF record: `ip4:2001:db8::1` is not valid SPF syntax (RFC 7208 §12)")
        );
        // A term after `all` still counts (RFC 7208 §4.6).
        assert!(syntax_error("v=spf1 +all ip4:999.0.0.1").is_some());
    }
}
