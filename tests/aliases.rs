//! Postfix's aliases and a split domain (issue 25 §3, docs/design.md
//! "Aliases"), on a real private Postfix (tests/support/postfix.rs) with
//! the real `dualroute` in front and an `smtp-sink` as the other server.
//!
//! What the milter sees of an alias: smtpd hands it the RCPT as the client
//! wrote it (`info@example.com`); `virtual_alias_maps` is applied later, by
//! cleanup(8), to what the queue file gets (ADDRESS_REWRITING_README,
//! "Virtual aliasing"). The first test records it: the milter's log names
//! info@, the sink receives info@, and alice's Maildir stays empty.
//!
//! They need root and Postfix (scripts/test-deps.sh).

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::ExitStatus;

use support::scenarios::received;
use support::{
    message, postfix_config, read_maildir, MaildirMessage, MilterProcess, Postfix, PostfixOptions,
    SmtpClient, SmtpSink, INSTANCE, OUTSIDE_IP, SENDER,
};

/// The aliases of the issue: info@ and postmaster@ to alice (a mailbox
/// here), sales@ to carol, whose mailbox is at the other server.
const VIRTUAL: &str = "info@example.com alice@example.com
postmaster@example.com alice@example.com
sales@example.com carol@example.com
";

/// One scenario: sink, milter.yaml, postfix-config, Postfix with a
/// `virtual` alias table, the milter.
struct Rig {
    milter: Option<MilterProcess>,
    pf: Postfix,
    sink: SmtpSink,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

/// `accounts` is the YAML of the domain's `accounts:` (`{CONFIG_DIR}`: the
/// instance's Postfix configuration directory, known once it is written,
/// hence the milter.yaml is written again after Postfix started).
fn rig(accounts: &str, users: &str, virtual_aliases: &str, start_milter: bool) -> Rig {
    rig_with(accounts, users, virtual_aliases, &[], start_milter)
}

/// [`rig`] with more Postfix tables: (file name in the configuration
/// directory, `virtual_alias_maps` entry naming it, contents), after the
/// `virtual` table.
fn rig_with(
    accounts: &str,
    users: &str,
    virtual_aliases: &str,
    more_aliases: &[(&str, &str, &str)],
    start_milter: bool,
) -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix("dualroute-aliases-")
        .tempdir()
        .expect("create a temporary directory");
    let dir = tmp.path().to_path_buf();
    let sink = SmtpSink::start();
    let milter_port = support::Port::reserve();
    let yaml = |accounts: &str| {
        format!(
            "listen: inet:127.0.0.1:{milter_port}\ninstance: {INSTANCE}\nstate_dir: {state}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"{sink}\"] }}\n    accounts: {accounts}\n{users}",
            state = dir.join("state").display(),
            sink = sink.nexthop(),
        )
    };
    let config = dir.join("milter.yaml");
    // postfix-config does not read the accounts' tables: a list will do.
    fs::write(&config, yaml("[{ list: [alice@example.com] }]")).expect("write milter.yaml");
    let generated = postfix_config(&config, &dir.join("postfix-config"));
    let mut opts = generated
        .apply_to(
            PostfixOptions::default()
                .domain_without_catchall("example.com", &["alice@example.com", "bob@example.com"]),
        )
        .map("virtual", virtual_aliases);
    let mut alias_maps = "virtual_alias_maps = hash:/etc/postfix/virtual".to_owned();
    for (file, entry, contents) in more_aliases {
        opts = opts.map(file, contents);
        alias_maps.push_str(&format!(", {entry}"));
    }
    let opts = opts.main_cf(&alias_maps);
    let pf = Postfix::start(opts);
    let accounts = accounts.replace("{CONFIG_DIR}", &pf.config_dir().to_string_lossy());
    fs::write(&config, yaml(&accounts)).expect("write milter.yaml");
    let milter =
        start_milter.then(|| MilterProcess::start(&config, &milter_port, &dir.join("milter.log")));
    Rig {
        milter,
        pf,
        sink,
        config,
        _tmp: tmp,
    }
}

impl Rig {
    fn send(&self, rcpts: &[&str], subject: &str) {
        let t = SmtpClient::new(self.pf.smtp_addr()).bind(OUTSIDE_IP).send(
            SENDER,
            rcpts,
            &message(subject),
        );
        assert!(t.accepted(), "{t}\n{}", self.diag());
        self.pf.wait_queue_empty();
    }

    fn maildir(&self, rel: &str) -> Vec<MaildirMessage> {
        read_maildir(&self.pf.maildir_root().join(rel))
    }

    /// The generated catch-all of example.com (docs/postfix.md §3).
    fn catchall(&self) -> Vec<MaildirMessage> {
        self.maildir("example.com/dualroute-catchall/")
    }

    /// The RCPT addresses the other server received.
    fn sink_rcpts(&self) -> Vec<String> {
        let mut r: Vec<String> = received(&self.sink)
            .into_iter()
            .map(|r| r.rcpt.address)
            .collect();
        r.sort();
        r
    }

    fn milter_log(&self) -> String {
        self.milter.as_ref().map(|m| m.log()).unwrap_or_default()
    }

    fn diag(&self) -> String {
        format!(
            "{}\n--- milter log ---\n{}\n--- sink ---\n{:?}",
            self.pf.diagnostics(),
            self.milter_log(),
            self.sink_rcpts()
        )
    }

    /// `dualroute check` with MAIL_CONFIG naming the instance, as a Postfix
    /// command run for it would have it: (exit status, stdout, stderr).
    fn check(&self) -> (ExitStatus, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
            .args(["check", "--config"])
            .arg(&self.config)
            .env("MAIL_CONFIG", self.pf.config_dir())
            .output()
            .expect("run dualroute check");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Waits until the sink has `n` RCPTs.
fn wait_sink(r: &Rig, n: usize) -> Vec<String> {
    support::poll(|| {
        let got = r.sink_rcpts();
        (got.len() >= n).then_some(got)
    })
    .unwrap_or_else(|| panic!("the sink did not get {n} RCPTs\n{}", r.diag()))
}

/// What happened before issue 25 with accounts that are the mailboxes
/// only: the milter decides on the address the client wrote, before
/// Postfix expands the alias, so info@ and postmaster@ are routed to the
/// other server (which knows neither) and alice never sees them. An
/// alias kept as an account whose target lives at the other server
/// (sales@ → carol@) is expanded by cleanup after the milter, into an
/// address the milter never sees: it lands in the catch-all.
#[test]
fn aliases_with_mailbox_accounts_are_routed_away_and_a_kept_alias_lands_in_the_catchall() {
    let r = rig(
        "[{ list: [alice@example.com, bob@example.com, sales@example.com] }]",
        "",
        VIRTUAL,
        true,
    );
    // What `check` says of it now (issue 25): both traps, exit 1.
    let (status, out, err) = r.check();
    assert_eq!(status.code(), Some(1), "{out}{err}");
    for alias in ["info@example.com", "postmaster@example.com"] {
        assert!(
            out.contains(&format!("example.com: ERROR: {alias} is an alias in hash:{}/virtual (→ alice@example.com) but not an account: the milter sees {alias} before Postfix expands it, so mail for it is routed to the destination", r.pf.config_dir().display())),
            "{out}"
        );
    }
    assert!(
        out.contains("ERROR: virtual alias sales@example.com → carol@example.com: carol@example.com has no mailbox here (not in the accounts of example.com, mode split); the milter sees sales@example.com (and keeps it), Postfix expands the alias after the milter, so mail for it would be filed into the catch-all. Fix: point the alias at carol@example.com.dualroute.invalid"),
        "{out}"
    );
    assert!(
        out.contains("3 alias(es) of Postfix would be misrouted"),
        "{out}"
    );

    r.send(&["info@example.com", "postmaster@example.com"], "aliases");
    let at_sink = wait_sink(&r, 2);
    assert_eq!(
        at_sink,
        ["info@example.com", "postmaster@example.com"],
        "{}",
        r.diag()
    );
    assert!(r.maildir("example.com/alice/").is_empty(), "{}", r.diag());
    // The milter saw the address as written, not alice@ (recorded on
    // Postfix 3.7: "RCPT <info@example.com>: redirect to
    // info@example.com.dualroute.invalid (mode split, no account here);
    // MTA address info@example.com").
    let log = r.milter_log();
    assert!(
        log.contains("RCPT <info@example.com>: redirect")
            && log.contains("MTA address info@example.com"),
        "{log}"
    );
    assert!(!log.contains("alice@example.com"), "{log}");

    // Kept by the milter ("RCPT <sales@example.com>: keep"), expanded by
    // cleanup into carol@, which matches only `@example.com` of
    // dualroute_catchall: "to=<carol@example.com>,
    // orig_to=<sales@example.com>, relay=virtual ... delivered to maildir".
    r.send(&["sales@example.com"], "kept alias");
    assert!(
        r.milter_log().contains("RCPT <sales@example.com>: keep"),
        "{}",
        r.diag()
    );
    assert_eq!(r.catchall().len(), 1, "{}", r.diag());
    assert_eq!(r.sink_rcpts().len(), 2, "{}", r.diag());
    assert!(
        r.pf.maillog()
            .contains("to=<carol@example.com>, orig_to=<sales@example.com>"),
        "{}",
        r.diag()
    );
}

/// The `postfix:` source takes Postfix's tables as they are: the
/// mailboxes and the aliases are accounts, so mail to info@ and
/// postmaster@ is kept and Postfix delivers it to alice; nothing reaches
/// the other server or the catch-all; `check` finds nothing to fix.
#[test]
fn the_postfix_source_keeps_aliases_and_postfix_delivers_them() {
    let aliases = "info@example.com alice@example.com\npostmaster@example.com alice@example.com\n";
    let r = rig("[{ postfix: {CONFIG_DIR} }]", "", aliases, true);
    let (status, out, err) = r.check();
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("; 4 accounts (0 entries of other domains ignored, 0 map keys not accounts)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  postfix {}: 4 accounts of example.com",
            r.pf.config_dir().display()
        )),
        "{out}"
    );
    assert!(
        !out.contains("ERROR") && !out.contains("WARNING: virtual"),
        "{out}"
    );

    r.send(&["info@example.com"], "info");
    r.send(&["postmaster@example.com"], "postmaster");
    r.send(&["carol@example.com"], "carol is elsewhere");
    assert_eq!(wait_sink(&r, 1), ["carol@example.com"], "{}", r.diag());
    assert_eq!(r.maildir("example.com/alice/").len(), 2, "{}", r.diag());
    assert!(r.catchall().is_empty(), "{}", r.diag());
    assert!(
        r.milter_log()
            .contains("RCPT <info@example.com>: keep (mode split, account present here)"),
        "{}",
        r.diag()
    );
}

/// An alias of a split domain whose target lives at the other server is
/// refused by the `postfix:` source: kept, it would be expanded after the
/// milter and filed into the catch-all (the first test shows it);
/// `check` and the milter's start say which alias, its target and the
/// fix, and the milter does not start on it.
#[test]
fn an_alias_to_an_address_of_the_other_server_is_refused() {
    let r = rig("[{ postfix: {CONFIG_DIR} }]", "", VIRTUAL, false);
    let (status, out, err) = r.check();
    assert_eq!(status.code(), Some(1), "{out}{err}");
    let expected = "domains.example.com.accounts: postfix: virtual alias sales@example.com → carol@example.com: carol@example.com has no mailbox here (not in the accounts of example.com, mode split); the milter sees sales@example.com (and keeps it), Postfix expands the alias after the milter, so mail for it would be filed into the catch-all. Fix: point the alias at carol@example.com.dualroute.invalid (the routing address, which Postfix sends to the destination), or give sales@example.com a `users:` rule `redirect_to: carol@example.com`";
    assert!(err.contains(expected), "{out}{err}");
    assert!(
        err.contains("milter.yaml:"),
        "the line of `accounts`: {err}"
    );
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["run", "--config"])
        .arg(&r.config)
        .output()
        .expect("run dualroute");
    assert!(!run.status.success(), "{run:?}");
    assert!(
        String::from_utf8_lossy(&run.stderr).contains(expected),
        "{run:?}"
    );
}

/// Both fixes `check` names work on the real Postfix: the alias pointed
/// at the routing address reaches carol@ at the other server (Postfix
/// sends it through the dualroute transport, smtp_generic_maps restores
/// @example.com), and a `redirect_to` rule routes the alias before
/// Postfix expands it.
#[test]
fn the_fixes_for_an_alias_to_the_other_server_deliver_there() {
    let aliases = "sales@example.com carol@example.com.dualroute.invalid\nteam@example.com dave@example.com\n";
    let r = rig(
        "[{ postfix: {CONFIG_DIR} }]",
        "    users:\n      team@example.com: { redirect_to: dave@example.com }\n",
        aliases,
        true,
    );
    let (status, out, err) = r.check();
    assert!(status.success(), "{out}{err}");
    r.send(&["sales@example.com"], "sales");
    r.send(&["team@example.com"], "team");
    assert_eq!(
        wait_sink(&r, 2),
        ["carol@example.com", "dave@example.com"],
        "{}",
        r.diag()
    );
    assert!(r.catchall().is_empty(), "{}", r.diag());
}

/// The `postfix:` source is watched as `postfix_map:` is: a changed alias
/// table reloads the accounts. A change that adds an alias to the other
/// server is refused and the running accounts stay (the log says which
/// alias); a change that adds an alias to a mailbox here is taken, and
/// mail to the new alias is kept and delivered here.
#[test]
fn a_changed_alias_table_reloads_and_a_misrouting_alias_is_refused() {
    let r = rig(
        "[{ postfix: {CONFIG_DIR} }]",
        "",
        "info@example.com alice@example.com\n",
        true,
    );
    let milter = r.milter.as_ref().expect("milter");
    let rewrite = |aliases: &str| {
        let etc = r.pf.config_dir();
        fs::write(etc.join("virtual"), aliases).expect("write virtual");
        let out = std::process::Command::new(support::tool("postmap"))
            .arg("-c")
            .arg(&etc)
            .arg(etc.join("virtual"))
            .output()
            .expect("run postmap");
        assert!(out.status.success(), "{out:?}");
    };
    rewrite("info@example.com alice@example.com\nsales@example.com carol@example.com\n");
    let log = milter.wait_log(
        &[
            "reload was refused",
            "virtual alias sales@example.com → carol@example.com",
        ],
        1,
    );
    assert!(log.contains("virtual.db"), "{log}");
    r.send(&["info@example.com"], "still kept");

    rewrite("info@example.com alice@example.com\nnew@example.com alice@example.com\n");
    milter.wait_log(&["account file changed", "reloaded"], 1);
    r.send(&["new@example.com"], "new alias");
    assert_eq!(r.maildir("example.com/alice/").len(), 2, "{}", r.diag());
    assert!(
        r.sink_rcpts().is_empty() && r.catchall().is_empty(),
        "{}",
        r.diag()
    );
}

/// What `check` only warns about, exit 0: a mailbox of Postfix that is
/// not an account (moved to the destination before it is deleted here),
/// a catch-all alias (the milter routes what it would catch), and a table
/// it cannot list (`regexp:`), named with what to do.
#[test]
fn check_warns_of_mailboxes_catchall_aliases_and_tables_it_cannot_list() {
    let r = rig_with(
        "[{ list: [alice@example.com] }]",
        "",
        "@example.com alice@example.com\n",
        &[(
            "virtual_regexp",
            "regexp:/etc/postfix/virtual_regexp",
            "/^sales-.*@example\\.com$/ alice@example.com\n",
        )],
        false,
    );
    let (status, out, err) = r.check();
    assert!(status.success(), "{out}{err}");
    let etc = r.pf.config_dir();
    for expected in [
        "example.com: WARNING: 1 address(es) of virtual_mailbox_maps are not accounts, so mail for them is routed to the destination: bob@example.com".to_owned(),
        format!("example.com: WARNING: @example.com in hash:{}/virtual is a catch-all alias (→ alice@example.com): the milter routes every address of example.com that is not an account before Postfix applies it", etc.display()),
        format!("WARNING: virtual_alias_maps: regexp:{}/virtual_regexp cannot be listed (postmap -s), so its addresses were not compared with the accounts: check each address of a managed domain in it with `dualroute explain ADDRESS`", etc.display()),
    ] {
        assert!(out.contains(&expected), "{expected}\n---\n{out}");
    }
    assert!(!out.contains("ERROR"), "{out}");
}
