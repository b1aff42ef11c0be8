//! The milter overrides of master.cf (`-o smtpd_milters=…`,
//! `-o non_smtpd_milters=…`), read from and written into the file's own
//! text: `postconf -P` rewrites a whole master.cf entry, so `--apply`
//! edits only the value and `--revert` gets the file back byte for byte
//! (docs/design.md §8, docs/postfix.md).

/// The milter lists a master.cf service can override with `-o`
/// (docs/design.md §9: a submission service next to OpenDKIM often has
/// `-o smtpd_milters=inet:localhost:8891`, which leaves dualroute out).
const OVERRIDDEN: [&str; 2] = ["smtpd_milters", "non_smtpd_milters"];

/// A `-o NAME=VALUE` milter override in master.cf, with where VALUE is.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Found {
    /// `name/type`.
    pub service: String,
    pub param: String,
    pub value: String,
    /// Byte range of VALUE in master.cf.
    pub range: std::ops::Range<usize>,
}

/// The `-o smtpd_milters=…` and `-o non_smtpd_milters=…` overrides of
/// master.cf (master(5): an entry starts in column one, a line starting
/// with white space continues it, `#` lines are comments), and notes on
/// those in the `-o { name = value }` form, which `--apply` leaves to the
/// administrator.
pub fn milter_overrides(master_cf: &str) -> (Vec<Found>, Vec<String>) {
    let mut found = Vec::new();
    let mut notes = Vec::new();
    let mut service: Option<String> = None;
    let mut after_o = false;
    let mut offset = 0;
    for line in master_cf.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let body = line.trim_end_matches(['\n', '\r']);
        let trimmed = body.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !body.starts_with(char::is_whitespace) {
            let mut words = body.split_whitespace();
            service = match (words.next(), words.next()) {
                (Some(n), Some(t)) => Some(format!("{n}/{t}")),
                _ => None,
            };
            after_o = false;
        }
        let Some(svc) = &service else { continue };
        let mut i = 0;
        while i < body.len() {
            let rest = &body[i..];
            let Some(skip) = rest.find(|c: char| !c.is_whitespace()) else {
                break;
            };
            let s = i + skip;
            let e = body[s..]
                .find(char::is_whitespace)
                .map_or(body.len(), |n| s + n);
            let token = &body[s..e];
            i = e;
            if after_o {
                after_o = false;
                if let Some((k, v)) = token.split_once('=') {
                    if OVERRIDDEN.contains(&k) && v.starts_with('{') {
                        notes.push(format!(
                            "master.cf {svc} overrides {k} in the {{ … }} form, which --apply does not edit: add the dualroute socket there by hand"
                        ));
                    } else if OVERRIDDEN.contains(&k) {
                        found.push(Found {
                            service: svc.clone(),
                            param: k.to_owned(),
                            value: v.to_owned(),
                            range: start + s + k.len() + 1..start + e,
                        });
                    }
                } else if token.starts_with('{') && OVERRIDDEN.iter().any(|p| body[s..].contains(p))
                {
                    notes.push(format!(
                        "master.cf {svc} overrides a milter list in the -o {{ … }} form, which --apply does not edit: add the dualroute socket there by hand"
                    ));
                }
            } else if token == "-o" {
                after_o = true;
            }
        }
    }
    (found, notes)
}

/// master.cf with one override's value replaced; None if it is not there.
pub fn set_override(master_cf: &str, service: &str, param: &str, value: &str) -> Option<String> {
    let (found, _) = milter_overrides(master_cf);
    let f = found
        .iter()
        .find(|f| f.service == service && f.param == param)?;
    let mut out = String::with_capacity(master_cf.len() + value.len());
    out.push_str(&master_cf[..f.range.start]);
    out.push_str(value);
    out.push_str(&master_cf[f.range.end..]);
    Some(out)
}
