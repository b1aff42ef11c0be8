//! The shipped man page dualroute(8) and the bash/zsh completions are
//! generated from the same clap definition as `--help` (src/cli.rs); this
//! test regenerates them and fails when the files in packaging/ drift.
//! After changing the command line, refresh them with
//!
//!     DUALROUTE_BLESS=1 cargo test --release --test man_pages
//!
//! milter.yaml(5) and the two milter.yaml files (the repository's, and
//! the one the package installs in /etc/dualroute/) are written by hand:
//! the binary is asked for every key it accepts and all three must show
//! each one; the package's file, with its commented-out blocks switched
//! on, must pass `dualroute check`.

use clap::CommandFactory;
use std::fs;
use std::path::{Path, PathBuf};

fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(rel)
}

/// A rendered part without its `.SH HEADING` and the string definition
/// every rendering repeats (kept once, at the top of the page).
fn body(section: Vec<u8>) -> String {
    String::from_utf8(section)
        .expect("roff is UTF-8")
        .lines()
        .filter(|l| !l.starts_with(".SH ") && !is_preamble(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn is_preamble(line: &str) -> bool {
    line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq")
}

fn render(
    f: impl Fn(&clap_mangen::Man, &mut dyn std::io::Write) -> std::io::Result<()>,
    man: &clap_mangen::Man,
) -> Vec<u8> {
    let mut out = Vec::new();
    f(man, &mut out).expect("render roff");
    out
}

/// dualroute(8): the program, then every command with its synopsis,
/// description and options, then environment, files and see also.
fn dualroute_8() -> String {
    let mut cmd = dualroute::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .source(format!("dualroute {version}"))
        .manual("System Manager's Manual");
    let mut page = String::new();
    for part in [
        render(clap_mangen::Man::render_title, &man),
        render(clap_mangen::Man::render_name_section, &man),
        render(clap_mangen::Man::render_synopsis_section, &man),
        render(clap_mangen::Man::render_description_section, &man),
        render(clap_mangen::Man::render_options_section, &man),
    ] {
        let text = String::from_utf8(part).expect("UTF-8");
        let keep_preamble = page.is_empty();
        for line in text.lines() {
            if keep_preamble || !is_preamble(line) {
                page.push_str(line);
                page.push('\n');
            }
        }
    }
    page.push_str(".SH COMMANDS\n");
    for sub in cmd.get_subcommands() {
        let sub_man = clap_mangen::Man::new(sub.clone()).section("8");
        page.push_str(&format!(".SS \"dualroute {}\"\n", sub.get_name()));
        page.push_str(&body(render(
            clap_mangen::Man::render_synopsis_section,
            &sub_man,
        )));
        page.push_str(".PP\n");
        page.push_str(&body(render(
            clap_mangen::Man::render_description_section,
            &sub_man,
        )));
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.push_str(&body(render(
                clap_mangen::Man::render_options_section,
                &sub_man,
            )));
        }
    }
    page.push_str(".SH ENVIRONMENT\n");
    page.push_str(&environment(&cmd));
    page.push_str(
        r#".SH FILES
.TP
\fI/etc/dualroute/milter.yaml\fR
The configuration (see \fBmilter.yaml\fR(5)), and the only default of \fB\-\-config\fR: a \fImilter.yaml\fR in the current directory is never read unless named (\fB\-\-config milter.yaml\fR). Every command names the file it read on standard error (\fBrun\fR in its first log line).
.TP
\fI/var/spool/postfix/dualroute/dualroute.sock\fR
The milter socket of the Debian package, mode 0660, group \fBdualroute\fR (Postfix is a member). Postfix's chrooted smtpd names it \fIunix:/dualroute/dualroute.sock\fR.
.TP
\fI/var/lib/dualroute\fR
Routing state that survives restarts: administrative disables, breaker trips, verification results; and \fIrunning\fR, what the running milter runs, for \fBstatus\fR.
.TP
\fI/etc/postfix/dualroute.applied\fR
What \fBpostfix\-config \-\-apply\fR changed, for \fB\-\-revert\fR.
.SH EXIT STATUS
0 on success; 1 on an error (printed on standard error as \fIfile:line:col: what is wrong\fR for configuration errors), when \fBverify\fR finds no host that accepts the address, or when \fBdoctor\fR finds a problem.
.PP
\fBstatus\fR, for monitoring checks: 0 when a milter runs and every domain routes as configured; 1 when a domain does not route (waiting for verification, tripped, disabled, \fBenabled: false\fR, accounts held, an unreadable state file), a reload was refused, or \fImilter.yaml\fR differs from what the running milter loaded (an edit not reloaded); 2 when no milter runs (or it stopped publishing its state in \fIstate_dir\fR) or the bounce breaker cannot read its source. \fBstatus \-\-json\fR prints the same report as JSON, with the exit code in \fBexit\fR.
.SH SEE ALSO
\fBmilter.yaml\fR(5), \fBpostconf\fR(5), \fBpostconf\fR(1), \fBsystemctl\fR(1), \fI/usr/share/doc/dualroute/postfix.md\fR, \fI/usr/share/doc/dualroute/README.md\fR, \fI/usr/share/doc/dualroute/without\-systemd.md\fR
"#,
    );
    page
}

/// The `Environment:` part of --help (`  NAME  text` and indented
/// continuation lines) as roff `.TP` entries.
fn environment(cmd: &clap::Command) -> String {
    let help = cmd
        .get_after_help()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let mut out = String::new();
    for line in help
        .lines()
        .skip_while(|l| !l.starts_with("Environment:"))
        .skip(1)
    {
        let text = line.trim();
        let is_entry = line.starts_with("  ") && !line.starts_with("   ");
        match text.split_once("  ") {
            Some((name, rest)) if is_entry => {
                out.push_str(&format!(
                    ".TP\n\\fB{name}\\fR\n{}",
                    rest.trim().replace('-', "\\-")
                ));
            }
            _ => out.push_str(&format!(" {}", text.replace('-', "\\-"))),
        }
    }
    out.replace(".TP", "\n.TP").trim_start().to_owned() + "\n"
}

fn completions(shell: clap_complete::Shell) -> String {
    let mut cmd = dualroute::cli::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "dualroute", &mut out);
    String::from_utf8(out).expect("UTF-8")
}

/// Compares a generated file with the shipped one, or writes it when
/// DUALROUTE_BLESS=1.
fn same_as_shipped(rel: &str, generated: &str) {
    let path = packaging(rel);
    if std::env::var_os("DUALROUTE_BLESS").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, generated).expect("write");
        return;
    }
    let shipped = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == generated,
        "{} is out of date with src/cli.rs: run `DUALROUTE_BLESS=1 cargo test --release --test man_pages` and commit it",
        path.display()
    );
}

#[test]
fn dualroute_8_matches_the_command_line() {
    let page = dualroute_8();
    // Every command and option of --help is in the page.
    let cmd = dualroute::cli::Cli::command();
    for sub in cmd.get_subcommands() {
        assert!(
            page.contains(&format!("dualroute {}", sub.get_name())),
            "{}",
            sub.get_name()
        );
        for arg in sub.get_arguments().filter_map(|a| a.get_long()) {
            assert!(
                page.contains(&arg.replace('-', "\\-")),
                "--{arg} of {}",
                sub.get_name()
            );
        }
    }
    assert!(page.contains("DUALROUTE_LOG"));
    same_as_shipped("man/dualroute.8", &page);
}

#[test]
fn completions_match_the_command_line() {
    same_as_shipped(
        "completions/dualroute.bash",
        &completions(clap_complete::Shell::Bash),
    );
    same_as_shipped(
        "completions/_dualroute",
        &completions(clap_complete::Shell::Zsh),
    );
}

/// Where an unknown key is put to make `dualroute check` name the keys of
/// each mapping of milter.yaml: the binary's own list, so a key added to
/// the configuration and not documented fails here.
const MAPPINGS: [(&str, &str); 11] = [
    ("top level", "ZZ: 1\n"),
    ("a domain", "domains:\n  example.com:\n    ZZ: 1\n"),
    (
        "destination",
        "domains:\n  example.com:\n    mode: route\n    destination: {hosts: [a.example], ZZ: 1}\n",
    ),
    (
        "an account source",
        "domains:\n  example.com:\n    mode: route\n    destination: {hosts: [a.example]}\n    accounts:\n      - ZZ: 1\n",
    ),
    (
        "a user rule",
        "domains:\n  example.com:\n    mode: route\n    destination: {hosts: [a.example]}\n    users:\n      a@example.com: {ZZ: 1}\n",
    ),
    ("breaker", "breaker: {maillog: /x, ZZ: 1}\n"),
    ("notify", "notify: {to: [a@example.com], ZZ: 1}\n"),
    ("connections", "connections: {ZZ: 1}\n"),
    ("metrics", "metrics: {ZZ: 1}\n"),
    ("dns", "dns: {ZZ: 1}\n"),
    ("cluster", "cluster: {redis: redis://127.0.0.1, ZZ: 1}\n"),
];

/// `dualroute check --config PATH`.
fn check(path: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run dualroute check")
}

/// The keys `dualroute check` expects where `yaml` has the unknown key
/// `ZZ`, from its error: "unknown field `ZZ`, expected one of `a`, `b`"
/// (or "expected `a`" for a mapping of one key).
fn keys_expected(what: &str, yaml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("milter.yaml");
    fs::write(&path, yaml).expect("write milter.yaml");
    let out = check(&path);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let list = err
        .split_once("unknown field `ZZ`, expected ")
        .map(|(_, rest)| rest.lines().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("{what}: no list of keys in the error:\n{err}"));
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "{what}: no keys in {list:?}");
    keys
}

/// Whether a YAML file shows `key:`, set or commented out: at the start of
/// a line after indentation, `#` and `- `, or inline after `{` or `,`.
fn yaml_shows(text: &str, key: &str) -> bool {
    let wanted = format!("{key}:");
    text.match_indices(&wanted).any(|(at, _)| {
        let before = text[..at].chars().next_back().unwrap_or('\n');
        let after = text[at + wanted.len()..].chars().next().unwrap_or('\n');
        matches!(before, '\n' | ' ' | '#' | '{' | ',' | '-') && matches!(after, ' ' | '\n')
    })
}

#[test]
fn every_configuration_key_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = fs::read_to_string(packaging("man/milter.yaml.5")).expect("milter.yaml.5");
    let files = [
        ("milter.yaml (the repository's)", root.join("milter.yaml")),
        (
            "packaging/milter.yaml (/etc/dualroute/)",
            packaging("milter.yaml"),
        ),
    ];
    let files: Vec<(&str, String)> = files
        .iter()
        .map(|(name, path)| (*name, fs::read_to_string(path).expect("milter.yaml")))
        .collect();
    let mut missing = Vec::new();
    let mut count = 0;
    for (what, yaml) in MAPPINGS {
        for key in keys_expected(what, yaml) {
            count += 1;
            for (name, text) in &files {
                if !yaml_shows(text, &key) {
                    missing.push(format!("{name} does not show `{key}:` ({what})"));
                }
            }
            if !(page.contains(&format!("\n.B {key}\n"))
                || page.contains(&format!("\\fB{key}\\fR")))
            {
                missing.push(format!("milter.yaml(5) does not document `{key}` ({what})"));
            }
        }
    }
    // Every mapping of the configuration was asked: 17 top-level keys and
    // 9 + 8 + 7 + 3 + 4 + 4 + 3 + 1 + 1 below them today.
    assert!(count >= 57, "only {count} keys found");
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The package's /etc/dualroute/milter.yaml with each commented-out block
/// switched on as its header says ("the first `#` of each line removed"):
/// a block starts at `# key:` for a top-level key and goes on over the lines that start with
/// `#` and more indentation. Comments inside a block stay comments (they
/// hold alternatives, e.g. `domain:` beside `hosts:`). `domains: {}` gives
/// way to the example domain.
fn switched_on(text: &str, keys: &[String], maillog: &Path) -> String {
    let mut out = String::new();
    let mut in_block = false;
    for line in text.lines() {
        let rest = line.strip_prefix("# ");
        let starts_block = rest.is_some_and(|r| {
            keys.iter().any(|k| {
                r.strip_prefix(k.as_str())
                    .is_some_and(|a| a == ":" || a.starts_with(": "))
            })
        });
        if starts_block {
            in_block = true;
            out.push_str(rest.unwrap_or_default());
        } else if in_block && (line == "#" || line.starts_with("#  ")) {
            out.push_str(line.get(2..).unwrap_or_default());
        } else {
            in_block = false;
            if line != "domains: {}" {
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    // The breaker's log must be readable for `check` (the package's
    // example reads the journal, which a test machine may not keep).
    out.replace("/var/log/mail.log", &maillog.display().to_string())
        .replace(
            "maillog: journal",
            &format!("maillog: {}", maillog.display()),
        )
}

#[test]
fn the_packages_commented_keys_check_when_switched_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = fs::read_to_string(root.join("packaging/milter.yaml")).expect("read");
    let dir = tempfile::tempdir().unwrap();
    let maillog = dir.path().join("mail.log");
    fs::write(&maillog, "").unwrap();
    let keys = keys_expected("top level", "ZZ: 1\n");
    let text = switched_on(&shipped, &keys, &maillog);
    for key in [
        "domains:",
        "breaker:",
        "notify:",
        "connections:",
        "metrics:",
        "dns:",
        "shadow:",
        "cluster:",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "{key} not switched on:\n{text}"
        );
    }
    // The socket and state_dir are the test's own (check looks at the
    // socket's directory).
    let path = dir.path().join("milter.yaml");
    let listen = "listen: unix:/var/spool/postfix/dualroute/dualroute.sock";
    assert!(
        text.contains(listen),
        "{listen} expected in the package's file"
    );
    let text = text
        .replace(
            listen,
            &format!(
                "listen: unix:{}",
                dir.path().join("dualroute.sock").display()
            ),
        )
        .replace(
            "state_dir: /var/lib/dualroute",
            &format!("state_dir: {}", dir.path().display()),
        );
    fs::write(&path, &text).unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("example.com: mode "),
        "packaging/milter.yaml with its blocks switched on:\n{text}\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
