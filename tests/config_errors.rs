//! Every class of configuration error (docs/design.md §5) is reported as
//! `FILE:LINE:COL: what is wrong`.

use dualroute::config::parse;

/// A valid domain block, to which each case adds or changes one thing.
const BASE: &str = "\
domains:
  example.com:
    mode: split
    destination:
      hosts: [\"[192.0.2.30]:2525\"]
    accounts:
      - list: [alice@example.com]
";

fn error(text: &str) -> String {
    match parse(text, "milter.yaml") {
        Ok(c) => panic!("accepted:\n{text}\n{c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_error(text: &str, position: &str, what: &str) {
    let e = error(text);
    assert!(
        e.starts_with(&format!("milter.yaml:{position}: ")),
        "position {position} expected: {e}"
    );
    assert!(e.contains(what), "{what:?} expected: {e}");
}

#[test]
fn base_is_valid() {
    parse(BASE, "milter.yaml").unwrap();
}

#[test]
fn unknown_key() {
    assert_error(
        &format!("listne: inet:127.0.0.1:1\n{BASE}"),
        "1:1",
        "unknown field `listne`",
    );
    assert_error(
        &BASE.replace("    mode: split\n", "    mode: split\n    bounces: true\n"),
        "4:5",
        "unknown field `bounces`",
    );
}

#[test]
fn bad_address() {
    assert_error(
        &BASE.replace("[alice@example.com]", "[alice@example.com, bob]"),
        "7:35",
        "\"bob\" is not a mail address",
    );
    assert_error(
        &format!("{BASE}    users:\n      carol@example.com: {{ redirect_to: \"carol@@x\" }}\n"),
        "9:41",
        "not a mail address",
    );
}

#[test]
fn bad_cidr() {
    assert_error(
        &format!("gateways: [192.0.2.0/33]\n{BASE}"),
        "1:12",
        "not an IP address or CIDR",
    );
    assert_error(
        &format!("gateways: [\"192.0.2.1/24\"]\n{BASE}"),
        "1:12",
        "host bits are set; did you mean 192.0.2.0/24?",
    );
}

#[test]
fn split_without_accounts() {
    let text = BASE.replace("    accounts:\n      - list: [alice@example.com]\n", "");
    assert_error(&text, "3:5", "mode `split` needs `accounts`");
}

#[test]
fn destination_both_hosts_and_domain() {
    let text = BASE.replace(
        "      hosts: [\"[192.0.2.30]:2525\"]\n",
        "      hosts: [\"[192.0.2.30]:2525\"]\n      domain: legacy.example\n",
    );
    assert_error(&text, "5:7", "`hosts` and `domain` are mutually exclusive");
}

#[test]
fn destination_in_a_managed_domain_loops() {
    let text = format!(
        "{BASE}  example.org:\n    mode: route\n    destination:\n      domain: Example.COM\n      change_envelope: true\n"
    );
    assert_error(&text, "11:15", "example.com is itself a managed domain");
}

#[test]
fn user_rule_target_loops() {
    let itself = format!(
        "{BASE}    users:\n      carol@example.com: {{ redirect_to: Carol@example.com }}\n"
    );
    assert_error(&itself, "9:41", "is the user itself");
    // A target in a route domain is routed (issue 21 §3), no longer an
    // error; a target with a rule of its own is, since a recipient the
    // milter adds is not decided again: A → B → A loops, A → B → C
    // would skip B's rule.
    let route = format!(
        "{BASE}    users:\n      carol@example.com: {{ copy_to: [x@other.example, c@example.org] }}\n  example.org:\n    mode: route\n    destination:\n      hosts: [\"[192.0.2.9]\"]\n"
    );
    parse(&route, "milter.yaml").unwrap();
    let back = format!(
        "{BASE}    users:\n      carol@example.com: {{ redirect_to: dave@example.com }}\n      dave@example.com: {{ copy_to: [x@other.example, Carol+x@example.com] }}\n"
    );
    assert_load_error(
        &back,
        "9",
        "domains.example.com.users.carol@example.com.redirect_to: dave@example.com's own rule sends its mail back to carol@example.com: that would loop",
    );
    // `copy_to: ADDR` without a list is located too.
    let one = format!(
        "{BASE}    users:\n      carol@example.com: {{ copy_to: dave@example.com }}\n      dave@example.com: {{ copy_to: carol@example.com }}\n"
    );
    assert_load_error(
        &one,
        "9",
        "users.carol@example.com.copy_to[0]: dave@example.com's own rule sends its mail back",
    );
    let chain = format!(
        "{BASE}    users:\n      carol@example.com: {{ copy_to: [x@other.example, dave@example.com] }}\n      dave@example.com: {{ redirect_to: dave@other.example }}\n"
    );
    assert_load_error(
        &chain,
        "9",
        "users.carol@example.com.copy_to[1]: dave@example.com has its own rule (to dave@other.example)",
    );
    // A target in a dual domain without a mailbox here: a message to it
    // is refused.
    let dual = format!(
        "{BASE}    users:\n      carol@example.com: {{ redirect_to: zed@example.org }}\n  example.org:\n    mode: dual\n    destination:\n      hosts: [\"[192.0.2.9]\"]\n    accounts: [{{ list: [alice@example.org] }}]\n"
    );
    assert_load_error(
        &dual,
        "9",
        "zed@example.org has no mailbox here and example.org is mode dual",
    );
}

#[test]
fn user_outside_its_domain() {
    let text = format!("{BASE}    users:\n      carol@example.org: {{ keep: true }}\n");
    assert_error(
        &text,
        "9:7",
        "carol@example.org is not in domain example.com",
    );
}

#[test]
fn bad_values() {
    assert_error(
        &BASE.replace("mode: split", "mode: spilt"),
        "3:11",
        "unknown variant `spilt`",
    );
    assert_error(
        &format!("listen: tcp:1\n{BASE}"),
        "1:9",
        "unknown socket type",
    );
    assert_error(
        &BASE.replace("[\"[192.0.2.30]:2525\"]", "[\"192.0.2.30\"]"),
        "5:15",
        "write an IP address in brackets",
    );
    assert_error(
        &format!("{BASE}breaker:\n  maillog: /var/log/mail.log\n  window: 1w\n"),
        "10:11",
        "unit must be s, m, h or d",
    );
    assert_error(
        &BASE.replace("example.com:\n", "exa mple.com:\n"),
        "2:3",
        "not a valid domain name",
    );
    assert_error(&format!("{BASE}    users:\n      carol@example.com: {{ keep: true, redirect_to: a@b.example }}\n"), "9:26", "mutually exclusive");
}

#[test]
fn duration_too_large_is_located_not_wrapped() {
    // 300000000000000d is more seconds than a u64 holds: unchecked, a
    // release build wrapped it into some other window without a word.
    assert_error(
        &format!("{BASE}breaker:\n  maillog: /var/log/mail.log\n  window: 300000000000000d\n"),
        "10:11",
        "is too large",
    );
    // Fits in a u64, but no clock can add it (Instant + Duration panics).
    assert_error(
        &format!("{BASE}connections:\n  idle_timeout: 18446744073709551615s\n"),
        "9:17",
        "is too large",
    );
}

#[test]
fn require_gateway_without_gateways() {
    let text = BASE.replace(
        "    mode: split\n",
        "    mode: split\n    require_gateway: true\n",
    );
    assert_error(&text, "4:22", "needs `gateways`");
}

#[test]
fn yaml_syntax_error() {
    let e = error("domains:\n  example.com: \"unterminated\n");
    assert!(
        e.starts_with("milter.yaml:3:1: found unexpected end of stream"),
        "{e}"
    );
}

#[test]
fn no_domains_is_valid() {
    // docs/design.md §5: what the Debian package installs; the milter is
    // transparent and says so.
    for text in [
        "listen: inet:127.0.0.1:1\ndomains: {}\n",
        "listen: inet:127.0.0.1:1\ndomains:\n",
        "listen: inet:127.0.0.1:1\n",
    ] {
        let c = parse(text, "milter.yaml").unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(c.domains.is_empty());
    }
}

#[test]
fn duplicate_domain_names_both_lines() {
    let twice = format!("{BASE}{}", BASE.replace("domains:\n", ""));
    assert_error(&twice, "8:3", "example.com is given twice (lines 2 and 8)");
    let cased = format!(
        "{BASE}{}",
        BASE.replace("domains:\n  example.com", "  Example.COM")
    );
    assert_error(&cased, "8:3", "example.com is given twice (lines 2 and 8)");
}

#[test]
fn duplicate_user_names_both_lines() {
    let text = format!(
        "{BASE}    users:\n      carol@example.com: {{ keep: true }}\n      dave@example.com: {{ keep: true }}\n      Carol@Example.com: {{ redirect_to: c@other.example }}\n"
    );
    assert_error(
        &text,
        "11:7",
        "carol@example.com is given twice (lines 9 and 11)",
    );
    // With `local_part_case: sensitive`, Carol and carol are two users.
    parse(
        &format!("local_part_case: sensitive\n{text}"),
        "milter.yaml",
    )
    .unwrap();
}

#[test]
fn duplicate_keys_name_both_lines() {
    // Two `domains:` were reported at 1:1 (serde's "duplicate field" is
    // placed at the start of the mapping that holds it), issue 25.
    let twice = format!("{BASE}shadow: false\n{BASE}");
    assert_error(
        &twice,
        "9:1",
        "domains is given twice (lines 1 and 9): keep one",
    );
    // The same for a key inside a domain or its destination.
    let mode = BASE.replace("    mode: split\n", "    mode: split\n    mode: route\n");
    assert_error(
        &mode,
        "4:5",
        "domains.example.com: mode is given twice (lines 3 and 4): keep one",
    );
    let hosts = BASE.replace(
        "      hosts: [\"[192.0.2.30]:2525\"]\n",
        "      hosts: [\"[192.0.2.30]:2525\"]\n      hosts: [\"[192.0.2.31]\"]\n",
    );
    assert_error(
        &hosts,
        "6:7",
        "domains.example.com.destination: hosts is given twice (lines 5 and 6): keep one",
    );
}

#[test]
fn a_second_yaml_document_names_its_line() {
    // `---` starts a second document, which dualroute would not read: it
    // was an error without a line ("more than one document"), issue 25.
    let text = format!("{BASE}---\nshadow: true\n");
    assert_error(&text, "9:1", "a second YAML document begins here");
}

#[test]
fn deep_nesting_is_refused_fast() {
    // 100,000 nested flow mappings took ~40 s of CPU in serde_yaml before
    // it gave up (issue 25), stalling a reload; the text is scanned first.
    let depth = 100_000;
    let text = format!("domains: {}1{}\n", "{a: ".repeat(depth), "}".repeat(depth));
    let started = std::time::Instant::now();
    let e = error(&text);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // At the 65th `{`: column 10 + 64 * 4.
    assert!(e.starts_with("milter.yaml:1:266: "), "{e}");
    assert!(e.contains("nested more than 64 levels deep"), "{e}");
    // Brackets inside quotes and comments are not nesting.
    let quoted = format!(
        "# {}\ninstance: 'it''s{}'\n{BASE}",
        "[".repeat(100),
        "{".repeat(100)
    );
    parse(&quoted, "milter.yaml").unwrap();
    let e = error(&format!("listne: \"a\\\"{}\"\n{BASE}", "[".repeat(100)));
    assert!(e.contains("unknown field `listne`"), "{e}");
}

#[test]
fn copy_to_the_user_itself_is_located() {
    let text =
        format!("{BASE}    users:\n      carol@example.com: {{ copy_to: carol@example.com }}\n");
    assert_error(&text, "9:37", "is the user itself");
}

#[test]
fn non_utf8_config_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    let mut text = BASE.as_bytes().to_vec();
    text.extend_from_slice(b"    users:\n      caf\xe9@example.com: { keep: true }\n");
    std::fs::write(&path, text).unwrap();
    let e = dualroute::config::read_file(&path).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:9:10: ", path.display())), "{e}");
    assert!(e.contains("UTF-8"), "{e}");
}

#[test]
fn shrink_limit_is_a_fraction() {
    parse(
        &format!("accounts_shrink_limit: 0.9\n{BASE}"),
        "milter.yaml",
    )
    .unwrap();
    parse(&format!("accounts_shrink_limit: 1\n{BASE}"), "milter.yaml").unwrap();
    assert_error(
        &format!("accounts_shrink_limit: 1.5\n{BASE}"),
        "1:24",
        "between 0 and 1",
    );
}

/// The duplicate-user check must be linear: 200,000 users load quickly.
/// (No timed assertion; the figure is in the closing report.)
#[test]
fn two_hundred_thousand_users_load() {
    let mut text = BASE.to_owned();
    text.push_str("    users:\n");
    for i in 0..200_000 {
        text.push_str(&format!("      u{i}@example.com: {{ keep: true }}\n"));
    }
    let start = std::time::Instant::now();
    let c = parse(&text, "milter.yaml").unwrap();
    eprintln!("200000 users parsed in {:?}", start.elapsed());
    assert_eq!(c.domains.values().next().unwrap().users.len(), 200_000);
}

/// `notify:` and `breaker.deferrals` (README "Deferrals and notification
/// by mail").
#[test]
fn notify_and_deferrals_errors_are_located() {
    assert_error(
        &format!("{BASE}notify:\n  to: []\n"),
        "9:7",
        "notify.to: is empty",
    );
    assert_error(
        &format!("{BASE}notify:\n  to: [admin@example.org]\n  via: smtp:127.0.0.1\n"),
        "10:8",
        "expected smtp:HOST:PORT",
    );
    assert_error(
        &format!("{BASE}notify:\n  to: [admin@example.org]\n  via: sendmail:bin/sendmail\n"),
        "10:8",
        "must be an absolute path",
    );
    // Sendmail's sendmail command submits over SMTP: the milter could not
    // tell the notification from other local mail.
    assert_error(
        &format!("mta: sendmail\n{BASE}notify:\n  to: [admin@example.org]\n  via: sendmail\n"),
        "11:8",
        "with mta: sendmail",
    );
    assert_error(
        &format!("{BASE}breaker:\n  maillog: /var/log/mail.log\n  deferrals: 0\n"),
        "10:14",
        "breaker.deferrals: must be at least 1",
    );
    let ok = parse(
        &format!("{BASE}breaker:\n  maillog: /var/log/mail.log\n  deferrals: 11\nnotify:\n  to: [admin@example.org]\n"),
        "milter.yaml",
    )
    .expect("valid");
    assert_eq!(ok.breaker.and_then(|b| b.deferrals), Some(11));
    let n = ok.notify.expect("notify");
    assert_eq!(n.via.to_string(), "smtp:127.0.0.1:25");
    assert_eq!(n.interval.0.as_secs(), 600);
}

/// Loads `text` as `DIR/milter.yaml` with its accounts (the checks that
/// need the accounts run there) and returns the error, relative to DIR.
fn load_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    std::fs::write(&path, text).unwrap();
    match dualroute::load_policy(&path) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e
            .to_string()
            .replace(&format!("{}/", dir.path().display()), ""),
    }
}

fn assert_load_error(text: &str, position: &str, what: &str) {
    let e = load_error(text);
    assert!(
        e.starts_with(&format!("milter.yaml:{position}: ")),
        "position {position} expected: {e}"
    );
    assert!(e.contains(what), "{what:?} expected: {e}");
}

/// issue 21 §3: an address whose mail would be filed into the catch-all
/// (a split or route domain, no mailbox here) is refused at load, naming
/// the line: `notify.to` (the milter leaves its own notifications alone)
/// and `keep: true` (kept means delivered by Postfix as it stands).
#[test]
fn notify_to_and_keep_without_a_mailbox_here_are_errors() {
    assert_load_error(
        &format!("{BASE}notify:\n  to: [alice@example.com, ops@example.com]\n"),
        "9",
        "notify.to[1]: ops@example.com has no mailbox here",
    );
    assert_load_error(
        &format!("{BASE}    users:\n      erin@example.com: {{ keep: true }}\n"),
        "9",
        "domains.example.com.users.erin@example.com.keep: erin@example.com has no mailbox here",
    );
    // With a mailbox here, both are fine; so is an address of a domain
    // dualroute does not manage.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milter.yaml");
    let ok = format!(
        "{BASE}    users:\n      alice+x@example.com: {{ keep: true }}\nnotify:\n  to: [alice@example.com, ops@elsewhere.example]\n"
    );
    std::fs::write(&path, &ok).unwrap();
    dualroute::load_policy(&path).unwrap_or_else(|e| panic!("{e}\n{ok}"));
}
