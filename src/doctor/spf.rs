//! SPF evaluation, RFC 7208 `check_host()`, for `dualroute doctor`: does a
//! domain's SPF record authorize a given address?
//!
//! Everything that decides a result is implemented: `ip4`, `ip6`, `a`, `mx`
//! (with dual CIDR lengths), `include`, `exists`, `all`, the `redirect`
//! modifier, macros (§7), qualifiers, and the limits of §4.6.4 (10 DNS
//! lookups, 10 MX names, 2 void lookups). `ptr` (which §5.5 says not to use)
//! counts as a lookup but never matches: doctor may then report an address
//! as missing that a receiver doing the reverse lookup would accept.

use crate::dns::{Family, Lookup};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::{fmt, future::Future, net::IpAddr, pin::Pin};

/// A `check_host()` result (RFC 7208 §2.6).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    /// No SPF record.
    None,
    PermError(String),
    TempError(String),
}

impl fmt::Display for SpfResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpfResult::Pass => f.write_str("pass"),
            SpfResult::Fail => f.write_str("fail"),
            SpfResult::SoftFail => f.write_str("softfail"),
            SpfResult::Neutral => f.write_str("neutral"),
            SpfResult::None => f.write_str("none"),
            SpfResult::PermError(e) => write!(f, "permerror: {e}"),
            SpfResult::TempError(e) => write!(f, "temperror: {e}"),
        }
    }
}

/// A result and the term of the domain's own record that gave it
/// (`ip4:192.0.2.0/24`, `include:_spf.example.net`, `-all`); no term when
/// nothing matched or the record could not be read.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Verdict {
    pub result: SpfResult,
    pub term: Option<String>,
}

/// RFC 7208 §4.6.4.
const MAX_LOOKUPS: u32 = 10;
const MAX_VOID_LOOKUPS: u32 = 2;
const MAX_MX_NAMES: usize = 10;

/// Evaluates the SPF record of `domain` for mail from `ip`, with `sender`
/// as MAIL FROM and `helo` as the HELO name (both only matter to macros).
pub async fn check_host(
    dns: &impl Lookup,
    ip: IpAddr,
    domain: &str,
    sender: &str,
    helo: &str,
) -> Verdict {
    let mut eval = Eval {
        dns,
        ip,
        sender: sender.to_owned(),
        helo: helo.to_owned(),
        lookups: 0,
        voids: 0,
    };
    eval.check(domain.trim_end_matches('.').to_lowercase())
        .await
}

/// The SPF record among a domain's TXT records (§4.5): `Ok(None)` when
/// there is none, an error when there are several.
pub fn select(txt: &[String]) -> Result<Option<&str>, String> {
    let spf: Vec<&str> = txt
        .iter()
        .map(String::as_str)
        .filter(|t| {
            let t = t.as_bytes();
            t.len() >= 6 && t[..6].eq_ignore_ascii_case(b"v=spf1") && (t.len() == 6 || t[6] == b' ')
        })
        .collect();
    match spf.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        more => Err(format!(
            "{} SPF records; there must be exactly one (RFC 7208 §4.5)",
            more.len()
        )),
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

impl Qualifier {
    fn result(self) -> SpfResult {
        match self {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Cidr {
    v4: u8,
    v6: u8,
}

#[derive(Clone, Debug, Eq, PartialEq)]
enum Mechanism {
    All,
    Include(String),
    A(Option<String>, Cidr),
    Mx(Option<String>, Cidr),
    Ptr(Option<String>),
    Ip(IpNet),
    Exists(String),
}

#[derive(Clone, Debug, Eq, PartialEq)]
struct Directive {
    qualifier: Qualifier,
    mechanism: Mechanism,
    text: String,
}

#[derive(Clone, Debug, Default, Eq, PartialEq)]
struct Record {
    directives: Vec<Directive>,
    redirect: Option<String>,
}

/// Parses a whole record first: a syntax error anywhere is a permerror
/// before anything is evaluated (§4.6).
fn parse(record: &str) -> Result<Record, String> {
    let mut out = Record::default();
    let mut exp_seen = false;
    for term in record.split_ascii_whitespace().skip(1) {
        if let Some((name, value)) = modifier(term) {
            match name.to_ascii_lowercase().as_str() {
                "redirect" => {
                    if out.redirect.is_some() {
                        return Err("`redirect` appears twice".into());
                    }
                    check_macros(value)?;
                    out.redirect = Some(value.to_owned());
                }
                "exp" => {
                    if exp_seen {
                        return Err("`exp` appears twice".into());
                    }
                    exp_seen = true;
                }
                // Unknown modifiers are ignored (§6).
                _ => {}
            }
            continue;
        }
        let (qualifier, rest) = match term.as_bytes()[0] {
            b'+' => (Qualifier::Pass, &term[1..]),
            b'-' => (Qualifier::Fail, &term[1..]),
            b'~' => (Qualifier::SoftFail, &term[1..]),
            b'?' => (Qualifier::Neutral, &term[1..]),
            _ => (Qualifier::Pass, term),
        };
        let split = rest.find([':', '/']).unwrap_or(rest.len());
        let (name, args) = rest.split_at(split);
        let spec = |args: &str| -> Result<String, String> {
            let s = args
                .strip_prefix(':')
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("`{term}` needs a domain"))?;
            check_macros(s)?;
            Ok(s.to_owned())
        };
        let mechanism = match name.to_ascii_lowercase().as_str() {
            "all" if args.is_empty() => Mechanism::All,
            "include" => Mechanism::Include(spec(args)?),
            "exists" => Mechanism::Exists(spec(args)?),
            "a" | "mx" => {
                let (domain, cidr) =
                    dual_cidr(args).ok_or_else(|| format!("`{term}`: bad CIDR length"))?;
                let domain = if domain.is_empty() {
                    None
                } else {
                    Some(spec(domain)?)
                };
                if name.eq_ignore_ascii_case("a") {
                    Mechanism::A(domain, cidr)
                } else {
                    Mechanism::Mx(domain, cidr)
                }
            }
            "ptr" if args.is_empty() => Mechanism::Ptr(None),
            "ptr" => Mechanism::Ptr(Some(spec(args)?)),
            "ip4" | "ip6" => {
                let v6 = name.eq_ignore_ascii_case("ip6");
                let net = args
                    .strip_prefix(':')
                    .and_then(|a| network(a, v6))
                    .ok_or_else(|| format!("`{term}` is not a valid {name} network"))?;
                Mechanism::Ip(net)
            }
            _ => return Err(format!("unknown mechanism `{term}`")),
        };
        out.directives.push(Directive {
            qualifier,
            mechanism,
            text: term.to_owned(),
        });
    }
    Ok(out)
}

/// `name=value`, where the name is `ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )` (§12).
fn modifier(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    (first_ok && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .then_some((name, value))
}

/// Splits `[:domain][/v4][//v6]` into the domain part and the CIDR lengths.
fn dual_cidr(args: &str) -> Option<(&str, Cidr)> {
    let mut rest = args;
    let mut cidr = Cidr { v4: 32, v6: 128 };
    let digits = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(i) = rest.rfind("//") {
        if digits(&rest[i + 2..]) {
            cidr.v6 = rest[i + 2..].parse().ok().filter(|&n| n <= 128)?;
            rest = &rest[..i];
        }
    }
    if let Some(i) = rest.rfind('/') {
        if digits(&rest[i + 1..]) {
            cidr.v4 = rest[i + 1..].parse().ok().filter(|&n| n <= 32)?;
            rest = &rest[..i];
        }
    }
    if rest.contains('/') && !rest.starts_with(':') {
        return None;
    }
    Some((rest, cidr))
}

fn network(s: &str, v6: bool) -> Option<IpNet> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
        None => (s, None),
    };
    if v6 {
        let a = addr.parse().ok()?;
        Ipv6Net::new(a, len.unwrap_or(128))
            .ok()
            .map(|n| IpNet::V6(n.trunc()))
    } else {
        let a = addr.parse().ok()?;
        Ipv4Net::new(a, len.unwrap_or(32))
            .ok()
            .map(|n| IpNet::V4(n.trunc()))
    }
}

/// Checks macro syntax without values, so that a bad macro is a syntax
/// error of the record.
fn check_macros(spec: &str) -> Result<(), String> {
    let ctx = MacroValues {
        sender: "a@b",
        domain: "d",
        ip: IpAddr::from([0, 0, 0, 0]),
        helo: "h",
    };
    expand(spec, &ctx).map(|_| ())
}

struct MacroValues<'a> {
    sender: &'a str,
    domain: &'a str,
    ip: IpAddr,
    helo: &'a str,
}

/// Expands the macros of a domain-spec (§7).
fn expand(spec: &str, v: &MacroValues) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('_') => out.push(' '),
            Some('-') => out.push_str("%20"),
            Some('{') => {
                let body: String = chars.by_ref().take_while(|&c| c != '}').collect();
                out.push_str(
                    &macro_value(&body, v)
                        .ok_or_else(|| format!("bad macro %{{{body}}} in {spec:?}"))?,
                );
            }
            _ => return Err(format!("bad '%' in {spec:?} (write %% for a percent sign)")),
        }
    }
    Ok(out)
}

fn macro_value(body: &str, v: &MacroValues) -> Option<String> {
    let mut chars = body.chars();
    let letter = chars.next()?.to_ascii_lowercase();
    let rest: String = chars.collect();
    let (local, sender_domain) = v
        .sender
        .rsplit_once('@')
        .unwrap_or(("postmaster", v.sender));
    let value = match letter {
        's' => v.sender.to_owned(),
        'l' => local.to_owned(),
        'o' => sender_domain.to_owned(),
        'd' => v.domain.to_owned(),
        'i' => match v.ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => a
                .octets()
                .iter()
                .flat_map(|b| [b >> 4, b & 15])
                .map(|n| format!("{n:x}"))
                .collect::<Vec<_>>()
                .join("."),
        },
        'p' => "unknown".to_owned(),
        'v' => if v.ip.is_ipv4() { "in-addr" } else { "ip6" }.to_owned(),
        'h' => v.helo.to_owned(),
        // c, r and t are for `exp` only (§7.2).
        _ => return None,
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let rest = &rest[digits.len()..];
    let reverse = rest.starts_with(['r', 'R']);
    let delimiters = if reverse { &rest[1..] } else { rest };
    if !delimiters.chars().all(|c| ".-+,/_=".contains(c)) {
        return None;
    }
    let delimiters = if delimiters.is_empty() {
        "."
    } else {
        delimiters
    };
    let mut parts: Vec<&str> = value.split(|c| delimiters.contains(c)).collect();
    if reverse {
        parts.reverse();
    }
    if !digits.is_empty() {
        let n: usize = digits.parse().ok().filter(|&n| n > 0)?;
        if parts.len() > n {
            parts.drain(..parts.len() - n);
        }
    }
    Some(parts.join("."))
}

struct Eval<'a, L> {
    dns: &'a L,
    ip: IpAddr,
    sender: String,
    helo: String,
    lookups: u32,
    voids: u32,
}

impl<'a, L: Lookup> Eval<'a, L> {
    /// `check_host()` for one domain; boxed because `include` and
    /// `redirect` recurse.
    fn check<'b>(&'b mut self, domain: String) -> Pin<Box<dyn Future<Output = Verdict> + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async move {
            let verdict = |result, term: Option<&str>| Verdict {
                result,
                term: term.map(str::to_owned),
            };
            // §4.3: a name that cannot be a domain has no SPF record.
            if domain.is_empty()
                || domain.len() > 253
                || domain.split('.').any(|l| l.is_empty() || l.len() > 63)
            {
                return verdict(SpfResult::None, None);
            }
            let txt = match self.dns.txt(&domain).await {
                Ok(t) => t,
                Err(e) => return verdict(SpfResult::TempError(e.to_string()), None),
            };
            let text = match select(&txt) {
                Ok(Some(t)) => t.to_owned(),
                Ok(None) => return verdict(SpfResult::None, None),
                Err(e) => return verdict(SpfResult::PermError(format!("{domain}: {e}")), None),
            };
            let record = match parse(&text) {
                Ok(r) => r,
                Err(e) => return verdict(SpfResult::PermError(format!("{domain}: {e}")), None),
            };
            for d in &record.directives {
                match self.matches(&d.mechanism, &domain).await {
                    Ok(true) => return verdict(d.qualifier.result(), Some(&d.text)),
                    Ok(false) => {}
                    Err(e) => return verdict(e, Some(&d.text)),
                }
            }
            // §6.1: redirect applies only when no mechanism matched (an
            // `all` always matches, so it makes redirect moot).
            if let Some(r) = &record.redirect {
                let term = format!("redirect={r}");
                let target = match self.count().and_then(|()| self.target(Some(r), &domain)) {
                    Ok(t) => t,
                    Err(e) => return verdict(e, Some(&term)),
                };
                let sub = self.check(target.clone()).await;
                let result = match sub.result {
                    SpfResult::None => {
                        SpfResult::PermError(format!("{term}: {target} has no SPF record"))
                    }
                    other => other,
                };
                let term = match sub.term {
                    Some(t) => format!("{term} → {t}"),
                    None => term,
                };
                return Verdict {
                    result,
                    term: Some(term),
                };
            }
            verdict(SpfResult::Neutral, None)
        })
    }

    async fn matches(&mut self, m: &Mechanism, domain: &str) -> Result<bool, SpfResult> {
        match m {
            Mechanism::All => Ok(true),
            Mechanism::Ip(net) => Ok(net.contains(&self.ip)),
            Mechanism::A(spec, cidr) => {
                self.count()?;
                let target = self.target(spec.as_deref(), domain)?;
                let addrs = self.addrs(&target).await?;
                Ok(addrs.iter().any(|&a| self.within(a, *cidr)))
            }
            Mechanism::Mx(spec, cidr) => {
                self.count()?;
                let target = self.target(spec.as_deref(), domain)?;
                let mx = self
                    .dns
                    .mx(&target)
                    .await
                    .map_err(|e| SpfResult::TempError(e.to_string()))?;
                if mx.is_empty() {
                    self.void()?;
                }
                if mx.len() > MAX_MX_NAMES {
                    return Err(SpfResult::PermError(format!(
                        "{target} has {} MX records; SPF looks at 10 at most (RFC 7208 §4.6.4)",
                        mx.len()
                    )));
                }
                for (_, host) in mx {
                    let addrs = self
                        .dns
                        .addrs(&host, Family::of(self.ip))
                        .await
                        .map_err(|e| SpfResult::TempError(e.to_string()))?;
                    if addrs.iter().any(|&a| self.within(a, *cidr)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(_) => {
                self.count()?;
                Ok(false)
            }
            Mechanism::Exists(spec) => {
                self.count()?;
                let target = self.target(Some(spec), domain)?;
                let found = self
                    .dns
                    .addrs(&target, Family::V4)
                    .await
                    .map_err(|e| SpfResult::TempError(e.to_string()))?;
                if found.is_empty() {
                    self.void()?;
                }
                Ok(!found.is_empty())
            }
            Mechanism::Include(spec) => {
                self.count()?;
                let target = self.target(Some(spec), domain)?;
                // §5.2: only a pass of the included record is a match.
                match self.check(target.clone()).await.result {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    SpfResult::TempError(e) => Err(SpfResult::TempError(e)),
                    SpfResult::PermError(e) => Err(SpfResult::PermError(e)),
                    SpfResult::None => Err(SpfResult::PermError(format!(
                        "include:{target}: {target} has no SPF record"
                    ))),
                }
            }
        }
    }

    async fn addrs(&mut self, name: &str) -> Result<Vec<IpAddr>, SpfResult> {
        let addrs = self
            .dns
            .addrs(name, Family::of(self.ip))
            .await
            .map_err(|e| SpfResult::TempError(e.to_string()))?;
        if addrs.is_empty() {
            self.void()?;
        }
        Ok(addrs)
    }

    fn within(&self, a: IpAddr, cidr: Cidr) -> bool {
        let len = if a.is_ipv4() { cidr.v4 } else { cidr.v6 };
        IpNet::new(a, len).is_ok_and(|n| n.trunc().contains(&self.ip))
    }

    fn target(&self, spec: Option<&str>, domain: &str) -> Result<String, SpfResult> {
        let Some(spec) = spec else {
            return Ok(domain.to_owned());
        };
        let values = MacroValues {
            sender: &self.sender,
            domain,
            ip: self.ip,
            helo: &self.helo,
        };
        let mut t = expand(spec, &values)
            .map_err(SpfResult::PermError)?
            .trim_end_matches('.')
            .to_lowercase();
        // §7.3: a name that grew too long loses labels on the left.
        while t.len() > 253 {
            match t.split_once('.') {
                Some((_, rest)) => t = rest.to_owned(),
                None => break,
            }
        }
        Ok(t)
    }

    fn count(&mut self) -> Result<(), SpfResult> {
        self.lookups += 1;
        if self.lookups > MAX_LOOKUPS {
            return Err(SpfResult::PermError(
                "more than 10 DNS lookups (include, a, mx, ptr, exists, redirect; RFC 7208 §4.6.4)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn void(&mut self) -> Result<(), SpfResult> {
        self.voids += 1;
        if self.voids > MAX_VOID_LOOKUPS {
            return Err(SpfResult::PermError(
                "more than 2 lookups found nothing (RFC 7208 §4.6.4)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::DnsError;
    use std::collections::HashMap;

    /// A zone as a table: name → TXT, MX, A/AAAA; names in `broken` fail.
    #[derive(Default)]
    struct Zone {
        txt: HashMap<&'static str, Vec<&'static str>>,
        mx: HashMap<&'static str, Vec<&'static str>>,
        addrs: HashMap<&'static str, Vec<&'static str>>,
        broken: Vec<&'static str>,
    }

    impl Lookup for Zone {
        async fn mx(&self, name: &str) -> Result<Vec<(u16, String)>, DnsError> {
            self.fail(name)?;
            Ok(self
                .mx
                .get(name)
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, h)| (i as u16 * 10, h.to_string()))
                .collect())
        }
        async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
            self.fail(name)?;
            Ok(self
                .txt
                .get(name)
                .into_iter()
                .flatten()
                .map(|t| t.to_string())
                .collect())
        }
        async fn addrs(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, DnsError> {
            self.fail(name)?;
            Ok(self
                .addrs
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .filter(|&a| Family::of(a) == family)
                .collect())
        }
    }

    impl Zone {
        fn fail(&self, name: &str) -> Result<(), DnsError> {
            if self.broken.contains(&name) {
                return Err(DnsError::NoAnswer(format!(
                    "lookup of {name}: request timed out"
                )));
            }
            Ok(())
        }
        fn txt(mut self, name: &'static str, t: &'static str) -> Self {
            self.txt.entry(name).or_default().push(t);
            self
        }
        fn mx(mut self, name: &'static str, hosts: &[&'static str]) -> Self {
            self.mx.insert(name, hosts.to_vec());
            self
        }
        fn host(mut self, name: &'static str, addrs: &[&'static str]) -> Self {
            self.addrs.insert(name, addrs.to_vec());
            self
        }
    }

    fn check(zone: &Zone, ip: &str, domain: &str) -> Verdict {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(check_host(
            zone,
            ip.parse().unwrap(),
            domain,
            &format!("postmaster@{domain}"),
            "mx.example.test",
        ))
    }

    fn result(zone: &Zone, ip: &str, domain: &str) -> SpfResult {
        check(zone, ip, domain).result
    }

    #[test]
    fn ip_networks_and_qualifiers() {
        let z = Zone::default()
            .txt(
                "example.test",
                "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 ?ip4:198.51.100.1 ~all",
            )
            .txt("hard.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("open.test", "v=spf1 ip4:192.0.2.1");
        assert_eq!(
            check(&z, "192.0.2.77", "example.test"),
            Verdict {
                result: SpfResult::Pass,
                term: Some("ip4:192.0.2.0/24".into())
            }
        );
        assert_eq!(result(&z, "2001:db8::1", "example.test"), SpfResult::Pass);
        assert_eq!(
            result(&z, "198.51.100.1", "example.test"),
            SpfResult::Neutral
        );
        assert_eq!(
            check(&z, "203.0.113.1", "example.test"),
            Verdict {
                result: SpfResult::SoftFail,
                term: Some("~all".into())
            }
        );
        assert_eq!(result(&z, "192.0.2.2", "hard.test"), SpfResult::Fail);
        // No match and no `all`: neutral (§4.7).
        assert_eq!(
            check(&z, "192.0.2.2", "open.test"),
            Verdict {
                result: SpfResult::Neutral,
                term: None
            }
        );
    }

    #[test]
    fn a_and_mx_mechanisms() {
        let z = Zone::default()
            .txt("example.test", "v=spf1 mx a:relay.example.test/28 -all")
            .mx("example.test", &["mx1.example.test", "mx2.example.test"])
            .host("mx1.example.test", &["192.0.2.10"])
            .host("mx2.example.test", &["192.0.2.11", "2001:db8::11"])
            .host("relay.example.test", &["198.51.100.1"])
            .txt("other.test", "v=spf1 mx:example.test//64 a -all")
            .host("other.test", &["203.0.113.5"]);
        assert_eq!(
            check(&z, "192.0.2.11", "example.test"),
            Verdict {
                result: SpfResult::Pass,
                term: Some("mx".into())
            }
        );
        assert_eq!(result(&z, "2001:db8::11", "example.test"), SpfResult::Pass);
        assert_eq!(
            check(&z, "198.51.100.14", "example.test").term.as_deref(),
            Some("a:relay.example.test/28")
        );
        assert_eq!(result(&z, "198.51.100.16", "example.test"), SpfResult::Fail);
        assert_eq!(result(&z, "2001:db8::ffff", "other.test"), SpfResult::Pass);
        assert_eq!(result(&z, "192.0.2.12", "other.test"), SpfResult::Fail);
        assert_eq!(result(&z, "203.0.113.5", "other.test"), SpfResult::Pass);
    }

    #[test]
    fn include_and_redirect() {
        let z = Zone::default()
            .txt(
                "example.test",
                "v=spf1 include:_spf.provider.test include:_spf.legacy.test -all",
            )
            .txt("_spf.provider.test", "v=spf1 ip4:192.0.2.0/28 -all")
            .txt("_spf.legacy.test", "v=spf1 mx:legacy.test ?all")
            .mx("legacy.test", &["mx.legacy.test"])
            .host("mx.legacy.test", &["198.51.100.20"])
            .txt("redir.test", "v=spf1 ip4:203.0.113.1 redirect=example.test")
            .txt("noinc.test", "v=spf1 include:nospf.test -all")
            .txt("nospf.test", "some other text")
            .txt("noredir.test", "v=spf1 redirect=nospf.test");
        assert_eq!(
            check(&z, "192.0.2.3", "example.test").term.as_deref(),
            Some("include:_spf.provider.test")
        );
        assert_eq!(
            check(&z, "198.51.100.20", "example.test").term.as_deref(),
            Some("include:_spf.legacy.test")
        );
        // A neutral include does not match; the outer -all decides.
        assert_eq!(result(&z, "203.0.113.9", "example.test"), SpfResult::Fail);
        assert_eq!(result(&z, "203.0.113.1", "redir.test"), SpfResult::Pass);
        assert_eq!(
            check(&z, "192.0.2.3", "redir.test"),
            Verdict {
                result: SpfResult::Pass,
                term: Some("redirect=example.test → include:_spf.provider.test".into())
            }
        );
        assert!(
            matches!(result(&z, "192.0.2.3", "noinc.test"), SpfResult::PermError(e) if e.contains("nospf.test has no SPF record"))
        );
        assert!(matches!(
            result(&z, "192.0.2.3", "noredir.test"),
            SpfResult::PermError(_)
        ));
        assert_eq!(result(&z, "192.0.2.3", "nospf.test"), SpfResult::None);
        assert_eq!(result(&z, "192.0.2.3", "absent.test"), SpfResult::None);
    }

    #[test]
    fn lookup_limits() {
        let mut z = Zone::default().txt("deep.test", "v=spf1 include:l1.test -all");
        let names: Vec<&'static str> = (1..=11)
            .map(|i| &*Box::leak(format!("l{i}.test").into_boxed_str()))
            .collect();
        for w in names.windows(2) {
            z = z.txt(
                w[0],
                Box::leak(format!("v=spf1 include:{} -all", w[1]).into_boxed_str()),
            );
        }
        z = z.txt("l11.test", "v=spf1 +all");
        assert!(
            matches!(result(&z, "192.0.2.1", "deep.test"), SpfResult::PermError(e) if e.contains("10 DNS lookups"))
        );
        // Ten are fine: l2 … l11 is a chain of ten includes.
        assert_eq!(result(&z, "192.0.2.1", "l1.test"), SpfResult::Pass);
        let z = Zone::default().txt("void.test", "v=spf1 a:n1.test a:n2.test a:n3.test +all");
        assert!(
            matches!(result(&z, "192.0.2.1", "void.test"), SpfResult::PermError(e) if e.contains("found nothing"))
        );
        let many: Vec<&'static str> = (0..11)
            .map(|i| &*Box::leak(format!("mx{i}.test").into_boxed_str()))
            .collect();
        let z = Zone::default()
            .txt("mx.test", "v=spf1 mx -all")
            .mx("mx.test", &many);
        assert!(
            matches!(result(&z, "192.0.2.1", "mx.test"), SpfResult::PermError(e) if e.contains("MX records"))
        );
    }

    #[test]
    fn errors() {
        let z = Zone {
            broken: vec!["broken.test", "mx.broken.test"],
            ..Zone::default()
        }
        .txt("two.test", "v=spf1 -all")
        .txt("two.test", "v=spf1 +all")
        .txt("syntax.test", "v=spf1 ip4:192.0.2.1 foo:bar -all")
        .txt("badip.test", "v=spf1 ip4:2001:db8::1 -all")
        .txt("late.test", "v=spf1 +all ip4:999.0.0.1")
        .txt("inc.test", "v=spf1 include:broken.test -all")
        .txt("mx.test", "v=spf1 mx -all")
        .mx("mx.test", &["mx.broken.test"])
        .txt("spf2.test", "v=spf10 +all");
        assert!(
            matches!(result(&z, "192.0.2.1", "two.test"), SpfResult::PermError(e) if e.contains("2 SPF records"))
        );
        assert!(
            matches!(result(&z, "192.0.2.1", "syntax.test"), SpfResult::PermError(e) if e.contains("foo:bar"))
        );
        assert!(matches!(
            result(&z, "192.0.2.1", "badip.test"),
            SpfResult::PermError(_)
        ));
        // A syntax error anywhere makes the whole record a permerror (§4.6).
        assert!(matches!(
            result(&z, "192.0.2.1", "late.test"),
            SpfResult::PermError(_)
        ));
        assert!(
            matches!(result(&z, "192.0.2.1", "broken.test"), SpfResult::TempError(e) if e.contains("timed out"))
        );
        assert!(matches!(
            result(&z, "192.0.2.1", "inc.test"),
            SpfResult::TempError(_)
        ));
        assert!(matches!(
            result(&z, "192.0.2.1", "mx.test"),
            SpfResult::TempError(_)
        ));
        assert_eq!(result(&z, "192.0.2.1", "spf2.test"), SpfResult::None);
    }

    #[test]
    fn macros() {
        let z = Zone::default()
            .txt("example.test", "v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all")
            .host("1.2.0.192.in-addr._spf.example.test", &["127.0.0.2"])
            .txt("user.test", "v=spf1 exists:%{l}.%{o}.users.test -all")
            .host("postmaster.user.test.users.test", &["127.0.0.2"])
            .txt("six.test", "v=spf1 exists:%{i}.six.test -all")
            .host(
                "2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.six.test",
                &["127.0.0.2"],
            )
            .txt("bad.test", "v=spf1 exists:%{x}.bad.test -all");
        assert_eq!(result(&z, "192.0.2.1", "example.test"), SpfResult::Pass);
        assert_eq!(result(&z, "192.0.2.2", "example.test"), SpfResult::Fail);
        assert_eq!(result(&z, "192.0.2.2", "user.test"), SpfResult::Pass);
        assert_eq!(result(&z, "2001:db8::1", "six.test"), SpfResult::Pass);
        assert!(matches!(
            result(&z, "192.0.2.1", "bad.test"),
            SpfResult::PermError(_)
        ));
        let v = MacroValues {
            sender: "strong-bad@email.example.com",
            domain: "email.example.com",
            ip: "192.0.2.3".parse().unwrap(),
            helo: "h",
        };
        // Examples of RFC 7208 §7.4.
        assert_eq!(expand("%{s}", &v).unwrap(), "strong-bad@email.example.com");
        assert_eq!(expand("%{d4}", &v).unwrap(), "email.example.com");
        assert_eq!(expand("%{d2}", &v).unwrap(), "example.com");
        assert_eq!(expand("%{dr}", &v).unwrap(), "com.example.email");
        assert_eq!(expand("%{d2r}", &v).unwrap(), "example.email");
        assert_eq!(expand("%{l-}", &v).unwrap(), "strong.bad");
        assert_eq!(expand("%{lr-}", &v).unwrap(), "bad.strong");
        assert_eq!(expand("%{l1r-}", &v).unwrap(), "strong");
        assert_eq!(
            expand("%{ir}.%{v}._spf.%{d2}", &v).unwrap(),
            "3.2.0.192.in-addr._spf.example.com"
        );
        assert!(expand("%{d0}", &v).is_err());
        assert!(expand("50%", &v).is_err());
    }
}
