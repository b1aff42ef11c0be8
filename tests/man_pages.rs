//! The shipped man page dualroute(8) and the bash/zsh completions are
//! generated from the same clap definition as `--help` (src/cli.rs); this
//! test regenerates them and fails when the files in packaging/ drift.
//! After changing the command line, refresh them with
//!
//!     DUALROUTE_BLESS=1 cargo test --release --test man_pages
//!
//! milter.yaml(5) is written by hand: the test checks that it names every
//! key of the documented milter.yaml.

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
The configuration (see \fBmilter.yaml\fR(5)); \fB\-\-config\fR defaults to \fI./milter.yaml\fR, then this file.
.TP
\fI/var/spool/postfix/dualroute/dualroute.sock\fR
The milter socket of the Debian package, mode 0660, group \fBdualroute\fR (Postfix is a member). Postfix's chrooted smtpd names it \fIunix:/dualroute/dualroute.sock\fR.
.TP
\fI/var/lib/dualroute\fR
Routing state that survives restarts: administrative disables, breaker trips, verification results.
.TP
\fI/etc/postfix/dualroute.applied\fR
What \fBpostfix\-config \-\-apply\fR changed, for \fB\-\-revert\fR.
.SH EXIT STATUS
0 on success; 1 on an error (printed on standard error as \fIfile:line:col: what is wrong\fR for configuration errors), when \fBverify\fR finds no host that accepts the address, or when \fBdoctor\fR finds a problem.
.SH SEE ALSO
\fBmilter.yaml\fR(5), \fBpostconf\fR(5), \fBpostconf\fR(1), \fBsystemctl\fR(1), \fI/usr/share/doc/dualroute/postfix.md\fR, \fI/usr/share/doc/dualroute/README.md\fR
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

#[test]
fn milter_yaml_5_documents_every_key() {
    let page = fs::read_to_string(packaging("man/milter.yaml.5")).expect("milter.yaml.5");
    // The keys of docs/design.md §5 / the repository's milter.yaml.
    let example = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("milter.yaml"))
        .expect("milter.yaml");
    for k in [
        "listen",
        "instance",
        "relay_suffix",
        "recipient_delimiter",
        "local_part_case",
        "gateways",
        "state_dir",
        "domains",
        "mode",
        "enabled",
        "destination",
        "hosts",
        "domain",
        "change_envelope",
        "bounce",
        "verify",
        "require_gateway",
        "accounts",
        "list",
        "file",
        "postfix_map",
        "users",
        "copy_to",
        "redirect_to",
        "keep",
        "breaker",
        "maillog",
        "threshold",
        "window",
        "deferrals",
        "notify",
        "via",
        "interval",
        "dns",
        "nameservers",
        "shadow",
        "metrics",
        "max_recipients",
    ] {
        assert!(
            example.contains(&format!("{k}:")),
            "{k} is no longer in milter.yaml; update this list"
        );
        assert!(
            page.contains(&format!(".B {k}")) || page.contains(&format!("\\fB{k}\\fR")),
            "milter.yaml(5) does not document `{k}`"
        );
    }
}
