//! Account sources (docs/design.md §5 `accounts:`, README "Account sources"):
//! every line is an address, a comment or blank, or the load fails with
//! `FILE:LINE`; a domain whose sources give none of its accounts is an
//! error; Postfix `type:name` tables are read with Postfix's own reader
//! (`postmap -s`); `check` says what each source gave. A `command:`
//! source (README "Accounts from a directory") runs a program without a
//! shell, with a timeout, and is refreshed through the same guarded reload.

mod support;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory with a milter.yaml whose example.com takes its accounts
/// from `sources` (YAML list items, one per line).
fn config(dir: &Path, sources: &[&str]) -> PathBuf {
    let path = dir.join("milter.yaml");
    let mut yaml = format!(
        "state_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.30]\"] }}\n    accounts:\n",
        dir.join("state").display()
    );
    for s in sources {
        yaml.push_str(&format!("      - {s}\n"));
    }
    std::fs::write(&path, yaml).unwrap();
    path
}

fn load_error(path: &Path) -> String {
    match dualroute::load_policy(path) {
        Ok(p) => panic!(
            "accepted: {:?}",
            p.domains.get("example.com").map(|d| &d.report)
        ),
        Err(e) => e.to_string(),
    }
}

/// A Postfix configuration directory for `postmap` (the test machine may
/// have no /etc/postfix/main.cf: Debian's "No configuration").
fn mail_config(dir: &Path) -> PathBuf {
    let cf = dir.join("postfix-etc");
    std::fs::create_dir_all(&cf).unwrap();
    std::fs::write(cf.join("main.cf"), "compatibility_level = 3.6\n").unwrap();
    cf
}

fn postmap(mail_config: &Path, table: &str) {
    let out = Command::new("postmap")
        .env("MAIL_CONFIG", mail_config)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg(table)
        .output()
        .expect("postmap is not installed: run scripts/test-deps.sh or `apt-get install postfix`");
    assert!(out.status.success(), "postmap {table}: {out:?}");
}

fn check(path: &Path, mail_config: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualroute"));
    cmd.args(["check", "--config"]).arg(path);
    if let Some(mc) = mail_config {
        cmd.env("MAIL_CONFIG", mc);
    }
    let out = cmd.output().expect("run dualroute");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn bom_is_stripped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("accounts"),
        "\u{feff}alice@example.com\nbob@example.com\n",
    )
    .unwrap();
    let path = config(dir.path(), &["file: accounts"]);
    let policy = dualroute::load_policy(&path).unwrap();
    let accounts = policy.domains["example.com"].accounts.as_ref().unwrap();
    assert!(
        accounts.contains("alice"),
        "the first entry after a BOM is lost"
    );
    assert!(accounts.contains("bob"));
    assert_eq!(accounts.len(), 2);
}

#[test]
fn a_line_that_is_not_an_address_is_an_error_with_its_line() {
    let cases: [(&str, &[u8]); 5] = [
        ("a tag after the address", b"alice@example.com#pilot\n"),
        ("a tab and more", b"alice@example.com\tx\n"),
        ("a NUL", b"alice@example.com\0\n"),
        ("Latin-1", b"caf\xe9@example.com\n"),
        ("a bare word", b"alice\n"),
    ];
    for (what, line) in cases {
        for source in ["file", "postfix_map"] {
            let dir = tempfile::tempdir().unwrap();
            let mut text = b"bob@example.com\n".to_vec();
            text.extend_from_slice(line);
            let file = dir.path().join("accounts");
            std::fs::write(&file, text).unwrap();
            let path = config(dir.path(), &[&format!("{source}: accounts")]);
            if source == "postfix_map" && (what == "a tab and more" || what == "a bare word") {
                // In a Postfix table the first column is the key: these
                // are `alice@example.com` with a value, and a key that
                // is no address (Postfix's own business).
                dualroute::load_policy(&path).unwrap();
                continue;
            }
            let e = load_error(&path);
            assert!(
                e.starts_with(&format!("{}:2: ", file.display())),
                "{source}, {what}: {e}"
            );
        }
    }
}

#[test]
fn no_account_of_the_domain_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accounts"), "# nobody here yet\n").unwrap();
    std::fs::write(dir.path().join("others"), "zed@other.example\n").unwrap();
    for source in [
        "file: accounts",
        "postfix_map: others",
        "list: [a@other.example]",
    ] {
        let path = config(dir.path(), &[source]);
        let e = load_error(&path);
        assert!(e.contains("no account of example.com"), "{source}: {e}");
    }
}

#[test]
fn check_reports_each_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("accounts"),
        "alice@example.com\nbob@example.com\nzed@other.example\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("vmailbox"),
        "carol@example.com example.com/carol/\n@example.com catchall\n",
    )
    .unwrap();
    let path = config(
        dir.path(),
        &[
            "file: accounts",
            "postfix_map: vmailbox",
            "list: [dave@example.com]",
        ],
    );
    let (ok, out) = check(&path, None);
    assert!(ok, "{out}");
    let file = dir.path().join("accounts");
    let map = dir.path().join("vmailbox");
    for expected in [
        format!(
            "file {}: 2 accounts of example.com, 1 entries of other domains",
            file.display()
        ),
        format!(
            "postfix_map {}: 1 accounts of example.com, 1 map keys not accounts",
            map.display()
        ),
        "list: 1 accounts of example.com".to_owned(),
    ] {
        assert!(out.contains(&expected), "{expected:?} expected:\n{out}");
    }
}

#[test]
fn postfix_type_name_is_read_with_postmap() {
    let dir = tempfile::tempdir().unwrap();
    let mc = mail_config(dir.path());
    let map = dir.path().join("vmailbox");
    std::fs::write(&map, "alice@example.com example.com/alice/\n").unwrap();
    postmap(&mc, &format!("hash:{}", map.display()));
    // The text changed after postmap: Postfix still uses the .db, and so
    // must we.
    std::fs::write(&map, "alice@example.com a/\nbob@example.com b/\n").unwrap();
    for table in [
        format!("hash:{}", map.display()),
        "hash:vmailbox".to_owned(),
    ] {
        let path = config(dir.path(), &[&format!("postfix_map: \"{table}\"")]);
        let (ok, out) = check(&path, Some(&mc));
        assert!(ok, "{table}: {out}");
        assert!(out.contains("1 accounts of example.com"), "{table}: {out}");
    }
    let path = config(dir.path(), &["postfix_map: \"texthash:vmailbox\""]);
    let (ok, out) = check(&path, Some(&mc));
    assert!(ok && out.contains("2 accounts of example.com"), "{out}");
    let path = config(dir.path(), &["postfix_map: \"mysql:/etc/postfix/x.cf\""]);
    let (ok, out) = check(&path, Some(&mc));
    assert!(!ok && out.contains("mysql"), "{out}");
}

#[test]
fn bare_path_warns_when_its_db_is_older() {
    let dir = tempfile::tempdir().unwrap();
    let mc = mail_config(dir.path());
    let map = dir.path().join("vmailbox");
    std::fs::write(&map, "alice@example.com a/\n").unwrap();
    postmap(&mc, &format!("hash:{}", map.display()));
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("vmailbox.db"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let path = config(dir.path(), &["postfix_map: vmailbox"]);
    let (ok, out) = check(&path, Some(&mc));
    assert!(ok, "{out}");
    assert!(
        out.contains("WARNING")
            && out.contains("vmailbox.db is older than")
            && out.contains("postmap"),
        "{out}"
    );
}

#[test]
fn postfix_map_type_without_its_compiled_file_names_the_config_line() {
    let dir = tempfile::tempdir().unwrap();
    let mc = mail_config(dir.path());
    std::fs::write(dir.path().join("vmailbox"), "alice@example.com a/\n").unwrap();
    let path = config(dir.path(), &["postfix_map: \"hash:vmailbox\""]);
    let (ok, out) = check(&path, Some(&mc));
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("{}:7:", path.display())), "{out}");
    assert!(out.contains("vmailbox.db"), "{out}");
}

#[test]
fn missing_account_file_names_the_config_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        &["list: [alice@example.com]", "file: nope.accounts"],
    );
    let e = load_error(&path);
    assert!(e.starts_with(&format!("{}:8:15: ", path.display())), "{e}");
    assert!(e.contains("nope.accounts"), "{e}");
}

#[test]
fn check_names_an_unreadable_maillog() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &["list: [alice@example.com]"]);
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml.push_str("breaker:\n  maillog: no-such.log\n");
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = check(&path, None);
    assert!(!ok, "{out}");
    assert!(out.contains("no-such.log"), "{out}");
    assert!(out.contains("maillog"), "{out}");
    std::fs::write(dir.path().join("no-such.log"), "").unwrap();
    let (ok, out) = check(&path, None);
    assert!(ok, "{out}");
}

/// An executable shell script at `dir/name`, standing in for ldapsearch
/// or mysql; returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    // Written to a temporary name and renamed: a script rewritten in place
    // while a refresh runs it would be read half written ("text file busy").
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn accounts_of(policy: &dualroute::policy::Policy) -> usize {
    policy.domains["example.com"]
        .accounts
        .as_ref()
        .unwrap()
        .len()
}

#[test]
fn command_prints_one_address_per_line() {
    let dir = tempfile::tempdir().unwrap();
    // As `mysql -N -B -e "SELECT username FROM mailbox WHERE active=1"`
    // prints it; arguments reach the program as given, never through a
    // shell: `$HOME` and `;` stay literal.
    let sql = script(
        dir.path(),
        "mysql",
        "printf 'alice@example.com\\nBob@Example.com\\nzed@other.example\\n'; printf '%s\\n' \"$@\"",
    );
    let path = config(
        dir.path(),
        &[&format!(
            "command: [\"{}\", \"$HOME@example.com\", \"x@example.com; rm -rf /\"]",
            sql.display()
        )],
    );
    let e = load_error(&path);
    assert!(
        e.contains("output of ") && e.contains(":5: ") && e.contains("rm -rf"),
        "the argument arrived literally and is refused as a line: {e}"
    );
    let path = config(
        dir.path(),
        &[&format!(
            "command: [\"{}\", \"$HOME@example.com\"]",
            sql.display()
        )],
    );
    let policy = dualroute::load_policy(&path).unwrap();
    let acc = policy.domains["example.com"].accounts.as_ref().unwrap();
    for present in ["alice", "bob", "$home"] {
        assert!(acc.contains(present), "{present}");
    }
    assert_eq!(acc.len(), 3);
    let (ok, out) = check(&path, None);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("command {}", sql.display())),
        "check names the source: {out}"
    );
}

#[test]
fn command_ldif_as_ldapsearch_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let ldif = "dn: uid=alice,ou=people,dc=example,dc=com\nmail: alice@example.com\n\ndn: uid=bob,ou=peop\n le,dc=example,dc=com\nmail: bob@example.com\nmail: robert@exam\n ple.com\n";
    std::fs::write(dir.path().join("out.ldif"), ldif).unwrap();
    let ldapsearch = script(
        dir.path(),
        "ldapsearch",
        &format!("cat {}", dir.path().join("out.ldif").display()),
    );
    let path = config(
        dir.path(),
        &[&format!(
            "{{ command: [\"{}\", \"-LLL\", \"mail\"], format: ldif }}",
            ldapsearch.display()
        )],
    );
    let policy = dualroute::load_policy(&path).unwrap();
    let acc = policy.domains["example.com"].accounts.as_ref().unwrap();
    for present in ["alice", "bob", "robert"] {
        assert!(acc.contains(present), "{present}");
    }
    assert_eq!(acc.len(), 3);
    // The same output read as lines is refused, not half understood.
    let path = config(
        dir.path(),
        &[&format!("command: [\"{}\"]", ldapsearch.display())],
    );
    let e = load_error(&path);
    assert!(e.contains("is not an address"), "{e}");
}

#[test]
fn command_failures_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fails = script(
        dir.path(),
        "fails",
        "echo alice@example.com; echo 'ldap_bind: Invalid credentials (49)' >&2; exit 49",
    );
    let e = load_error(&config(
        dir.path(),
        &[&format!("command: [\"{}\"]", fails.display())],
    ));
    assert!(
        e.contains("failed (exit status: 49)") && e.contains("Invalid credentials"),
        "{e}"
    );

    // Past its timeout the program is killed, with what it started.
    let pid_file = dir.path().join("sleeper.pid");
    let slow = script(
        dir.path(),
        "slow",
        &format!(
            "echo alice@example.com; sleep 30 & echo $! > {}; wait",
            pid_file.display()
        ),
    );
    let started = std::time::Instant::now();
    let e = load_error(&config(
        dir.path(),
        &[&format!(
            "{{ command: [\"{}\"], timeout: 1s }}",
            slow.display()
        )],
    ));
    assert!(e.contains("did not finish within its timeout (1s)"), "{e}");
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    let sleeper = std::fs::read_to_string(&pid_file).unwrap();
    let alive =
        support::poll(|| (!Path::new(&format!("/proc/{}", sleeper.trim())).exists()).then_some(()));
    assert!(
        alive.is_some(),
        "the command's child {sleeper} was not killed"
    );

    // Nothing printed: no account, as for an empty file.
    let empty = script(dir.path(), "empty", "exit 0");
    let e = load_error(&config(
        dir.path(),
        &[&format!("command: [\"{}\"]", empty.display())],
    ));
    assert!(e.contains("no account of example.com"), "{e}");

    // Mistakes in milter.yaml are located there.
    for (source, wanted) in [
        ("command: [mysql]", "must be an absolute path"),
        ("command: [\"/usr/bin/mysql -N\"]", "no shell splits it"),
        ("command: []", "`command` is empty"),
        ("command: [\"/nonexistent/ldapsearch\"]", "cannot read"),
        (
            "{ file: accounts, refresh: 5m }",
            "belong to a `command` source",
        ),
        (
            "{ command: [\"/bin/true\"], format: csv }",
            "unknown variant",
        ),
    ] {
        let e = load_error(&config(dir.path(), &[source]));
        assert!(
            e.starts_with(&format!("{}:7:", dir.path().join("milter.yaml").display()))
                && e.contains(wanted),
            "{source}: {e}"
        );
    }
}

/// A command that never stops printing is stopped at the bound on its
/// output (docs/design.md §5 "Accounts from a command"), not at its
/// timeout: the error names the source and the bound, and the load ends
/// long before the timeout (before the bound, it took the milter from
/// 13 MB to 1.06 GB).
#[test]
fn endless_output_stops_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let endless = script(dir.path(), "endless", "exec yes alice@example.com");
    let started = std::time::Instant::now();
    let e = load_error(&config(
        dir.path(),
        &[&format!(
            "{{ command: [\"{}\"], timeout: 300s }}",
            endless.display()
        )],
    ));
    assert!(
        e.starts_with(&format!("command {}: ", endless.display()))
            && e.contains("printed more than 33554432 lines"),
        "{e}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(300),
        "returned only at the timeout: {:?}",
        started.elapsed()
    );
}

/// The pid a process started with `setsid` (out of the command's process
/// group) writes to `pid_file`, once it has written it.
fn escapee(pid_file: &Path) -> String {
    format!(
        "setsid sh -c 'echo $$ > {0}; exec sleep 300' </dev/null >/dev/null 2>&1 &\nwhile [ ! -s {0} ]; do sleep 0.05; done",
        pid_file.display()
    )
}

/// Whether process `pid` is gone (killed and reaped) within a few seconds;
/// a survivor is killed here so that the test leaves nothing behind.
fn gone(pid: &str) -> bool {
    let pid = pid.trim();
    let gone = support::poll(|| (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()));
    if gone.is_none() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    gone.is_some()
}

/// A descendant that left the command's process group with `setsid` is
/// ended too, whether the command exits or times out (docs/design.md §5:
/// the command runs under a subreaper that kills what it leaves behind).
#[test]
fn a_descendant_that_escapes_the_process_group_is_ended() {
    let dir = tempfile::tempdir().unwrap();
    // Exits 0 with its accounts, leaving the escapee behind.
    let pid_file = dir.path().join("exits.pid");
    let exits = script(
        dir.path(),
        "exits",
        &format!("{}\necho alice@example.com", escapee(&pid_file)),
    );
    let path = config(
        dir.path(),
        &[&format!("command: [\"{}\"]", exits.display())],
    );
    let policy = dualroute::load_policy(&path).unwrap();
    assert_eq!(accounts_of(&policy), 1);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        gone(&pid),
        "the escapee {pid} of a command that exited lives on"
    );

    // Runs past its timeout (long enough for the escapee to start on a
    // loaded machine).
    let pid_file = dir.path().join("slow.pid");
    let slow = script(
        dir.path(),
        "slow",
        &format!("{}\necho alice@example.com\nsleep 30", escapee(&pid_file)),
    );
    let e = load_error(&config(
        dir.path(),
        &[&format!(
            "{{ command: [\"{}\"], timeout: 3s }}",
            slow.display()
        )],
    ));
    assert!(e.contains("did not finish within its timeout (3s)"), "{e}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        gone(&pid),
        "the escapee {pid} of a command that timed out lives on"
    );
}

/// The periodic refresh goes through the guarded reload: a new account
/// arrives, and a failing run, one past the output bound, an empty one and
/// one that lost most accounts all keep the last good set.
#[tokio::test]
async fn command_refresh_keeps_the_last_good_set() {
    use dualroute::Intervals;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("directory.txt");
    let write_list = |names: &[&str]| {
        let text: String = names.iter().map(|n| format!("{n}@example.com\n")).collect();
        std::fs::write(&list, text).unwrap();
    };
    write_list(&["alice", "bob", "carol", "dave"]);
    let lookup = script(dir.path(), "lookup", &format!("cat {}", list.display()));
    let path = config(
        dir.path(),
        &[&format!(
            "{{ command: [\"{}\"], refresh: 1s, timeout: 60s }}",
            lookup.display()
        )],
    );
    let intervals = Intervals {
        accounts: std::time::Duration::from_millis(100),
        ..Intervals::default()
    };
    let milter =
        support::protocol::Milter::serve(support::protocol::start_at(&path, intervals)).await;
    let service = &milter;
    assert_eq!(accounts_of(&service.policy()), 4);

    write_list(&["alice", "bob", "carol", "dave", "erin"]);
    support::wait_until("the refresh to add erin", || {
        let n = accounts_of(&service.policy());
        async move { (n == 5).then_some(()) }
    })
    .await;

    // Broken directory, empty answer, most accounts gone: each is refused
    // and erin stays present. Each waits for the refusal to be recorded
    // for `dualroute status`, then for one more refresh period.
    let refused = dir.path().join("state").join("reload-refused");
    let cases: [(&str, &dyn Fn()); 4] = [
        ("failed (exit status: 1)", &|| {
            script(dir.path(), "lookup", "exit 1");
        }),
        // Endless lines of 4,000 bytes: the byte bound, met within
        // seconds (the 60 s timeout only keeps a loaded machine from
        // reporting a timeout instead).
        ("printed more than 1073741824 bytes", &|| {
            script(
                dir.path(),
                "lookup",
                "exec yes \"$(head -c 4000 /dev/zero | tr '\\0' a)\"",
            );
        }),
        ("no account of example.com", &|| {
            script(dir.path(), "lookup", "exit 0");
        }),
        ("would go from 5 to 1 accounts", &|| {
            script(dir.path(), "lookup", &format!("cat {}", list.display()));
            write_list(&["alice"]);
        }),
    ];
    for (why, break_it) in cases {
        let _ = std::fs::remove_file(&refused);
        break_it();
        let text = support::wait_until(why, || {
            let text = std::fs::read_to_string(&refused).ok();
            async move { text.filter(|t| t.contains(why)) }
        })
        .await;
        assert!(text.contains(why), "{text}");
        let policy = service.policy();
        let acc = policy.domains["example.com"].accounts.as_ref().unwrap();
        assert!(acc.contains("erin") && acc.len() == 5, "{why}: {acc:?}");
    }
    milter.shutdown().await;
}
