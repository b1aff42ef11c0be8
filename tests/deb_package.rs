//! The Debian package, on this machine, as an administrator uses it:
//! lintian, `systemd-analyze verify`/`security` on the unit, `dpkg -i`
//! (PID 1 is not systemd here: the maintainer scripts must cope), owners
//! and modes, the packaged binary run as user `dualroute` exactly as the
//! unit's ExecStart says, one split and one dual message through a private
//! Postfix whose smtpd runs chrooted (as Debian ships it) to the packaged
//! socket, wired by `postfix-config --apply`; `--apply` again (no change),
//! `--revert` (main.cf/master.cf byte for byte), an invalid config at start
//! and at reload, `--apply` again, an upgrade to a higher version that
//! keeps the edited conffile and the wiring, `apt-get remove` that takes
//! dualroute out of Postfix (prerm, issue 21 §9) which then still delivers,
//! purge, and what is left.
//!
//! The packages are built by scripts/test.sh before `cargo test` (cargo
//! holds the build directory's lock while tests run):
//!   packaging/build-deb.sh                                → target/debian/dualroute_VERSION_ARCH.deb
//!   packaging/build-deb.sh --deb-version VERSION+upgrade1 → the upgrade, moved to target/debian-upgrade/
//! The test refuses to run on a machine where dualroute is installed or
//! the user exists, and purges what it installed even when it fails
//! midway, so the machine ends as it began. It never touches the system
//! Postfix's /etc/postfix (a private instance; see tests/support/).
//!
//! Every step is printed (see it with `--nocapture`) and written to
//! target/deb_package-transcript.txt.

mod support;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Postfix, PostfixOptions, SmtpClient, SmtpSink};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const CONFFILE: &str = "/etc/dualroute/milter.yaml";
const SOCKET_DIR: &str = "/var/spool/postfix/dualroute";
const SOCKET: &str = "/var/spool/postfix/dualroute/dualroute.sock";
const UNIT: &str = "/lib/systemd/system/dualroute.service";

fn upgrade_version() -> String {
    format!("{VERSION}+upgrade1")
}

fn arch() -> String {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .expect("dpkg --print-architecture");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn deb(version: &str) -> PathBuf {
    let dir = if version == VERSION {
        "target/debian"
    } else {
        "target/debian-upgrade"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join(format!("dualroute_{version}_{}.deb", arch()));
    assert!(
        path.is_file(),
        "{} is missing: build it with packaging/build-deb.sh{} (scripts/test.sh does)",
        path.display(),
        if version == VERSION {
            String::new()
        } else {
            format!(" --deb-version {version}")
        }
    );
    path
}

/// Prints and records each step.
struct Transcript {
    file: fs::File,
}

impl Transcript {
    fn new() -> Transcript {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/deb_package-transcript.txt");
        Transcript {
            file: fs::File::create(&path).expect("create the transcript"),
        }
    }

    fn say(&mut self, text: &str) {
        println!("{text}");
        let _ = writeln!(self.file, "{text}");
    }

    /// Runs a command, records it with its output, returns (success, output).
    fn run(&mut self, program: &str, args: &[&str]) -> (bool, String) {
        self.run_env(&[], program, args)
    }

    fn run_env(&mut self, env: &[(&str, &str)], program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        self.say(&format!("# {}{program} {}", env.concat(), args.join(" ")));
        if !text.trim().is_empty() {
            self.say(text.trim_end());
        }
        self.say(&format!("  (exit {})", out.status.code().unwrap_or(-1)));
        (out.status.success(), text)
    }

    fn ok(&mut self, program: &str, args: &[&str]) -> String {
        let (ok, out) = self.run(program, args);
        assert!(ok, "{program} {args:?} failed:\n{out}");
        out
    }
}

fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", "dualroute"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("install ok installed ")
        .map(str::to_owned)
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn group_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["group", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Purges the package and whatever the maintainer scripts could leave, on
/// every way out of the test.
struct Cleanup {
    milter: Option<Child>,
}

impl Cleanup {
    fn stop_milter(&mut self) {
        if let Some(mut child) = self.milter.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop_milter();
        if installed_version().is_some() || Path::new("/var/lib/dpkg/info/dualroute.list").exists()
        {
            let _ = Command::new("dpkg")
                .args(["--purge", "dualroute"])
                .stdout(Stdio::null())
                .status();
        }
        // What a failed purge would leave.
        let _ = fs::remove_dir_all("/var/lib/dualroute");
        let _ = fs::remove_dir_all(SOCKET_DIR);
        let _ = fs::remove_dir_all("/etc/dualroute");
        if user_exists("dualroute") {
            let _ = Command::new("userdel").arg("dualroute").status();
        }
        if group_exists("dualroute") {
            let _ = Command::new("groupdel").arg("dualroute").status();
        }
    }
}

/// What `apt-get purge dualroute` printed says nothing misleading, and
/// the user and group are gone, postfix no longer in it.
fn assert_purged_quietly(out: &str) {
    for wrong in ["not removed", "other members", "warning", "Warning"] {
        assert!(!out.contains(wrong), "purge printed {wrong:?}:\n{out}");
    }
    assert!(
        !user_exists("dualroute"),
        "user dualroute left after purge:\n{out}"
    );
    assert!(
        !group_exists("dualroute"),
        "group dualroute left after purge:\n{out}"
    );
    let groups = Command::new("id")
        .args(["-nG", "postfix"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !groups.split_whitespace().any(|g| g == "dualroute"),
        "postfix still in group dualroute: {groups}"
    );
}

fn mode_owner(path: &str) -> (u32, String, String) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |db: &str, id: u32| {
        let out = Command::new("getent")
            .args([db, &id.to_string()])
            .output()
            .expect("getent");
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    (
        meta.permissions().mode() & 0o7777,
        name("passwd", meta.uid()),
        name("group", meta.gid()),
    )
}

/// The unit's ExecStart, split into words.
fn exec_start() -> Vec<String> {
    let unit = fs::read_to_string(UNIT).expect("the installed unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in the unit");
    line.split_whitespace().map(str::to_owned).collect()
}

/// ExecStart as User=dualroute, Group=dualroute (and its supplementary
/// groups): setpriv execs it, so the child is the milter itself.
fn as_unit() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=dualroute",
        "--regid=dualroute",
        "--init-groups",
        "--",
    ])
    .args(exec_start());
    cmd
}

/// The line docs/without-systemd.md gives for running the milter by hand
/// (without systemd): ExecStart as user dualroute with its groups,
/// logging to syslog. It must be the unit's ExecStart, and it is what
/// this test runs.
fn by_hand() -> Command {
    let doc = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/without-systemd.md"
    ))
    .expect("docs/without-systemd.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with("setpriv ") && l.contains(" run "))
        .expect("a `setpriv … dualroute run …` line in docs/without-systemd.md");
    let readme =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    assert!(
        readme.lines().any(|l| l == line),
        "README.md's \"Without systemd\" must give the line of docs/without-systemd.md:\n{line}"
    );
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let program = as_unit();
    let mut unit: Vec<String> = std::iter::once(program.get_program())
        .chain(program.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    unit.extend(["--log".to_owned(), "syslog".to_owned()]);
    assert_eq!(
        words, unit,
        "docs/without-systemd.md's command line is not the unit's ExecStart as user dualroute"
    );
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..]);
    cmd
}

/// Starts the milter by hand as docs/without-systemd.md says (the unit's
/// ExecStart with `--log syslog`; without a syslog daemon on /dev/log, as
/// here, the lines go to stderr), stderr to `log`.
fn start_as_unit(log: &Path) -> Child {
    let log_file = fs::File::create(log).expect("milter log");
    by_hand()
        .env("DUALROUTE_LOG", "info,dualroute=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("setpriv")
}

fn wait_serving(child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(SOCKET).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the packaged milter exited ({status}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the packaged milter does not listen on {SOCKET}:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn edited_conffile(sink: &str) -> String {
    format!(
        "# edited by the administrator (tests/deb_package.rs)
listen: unix:{SOCKET}
instance: deb.test
state_dir: /var/lib/dualroute
domains:
  split.test:
    mode: split
    destination: {{ hosts: [\"{sink}\"] }}
    accounts:
      - list: [alice@split.test]
  dual.test:
    mode: dual
    destination: {{ hosts: [\"{sink}\"] }}
    accounts:
      - list: [bob@dual.test]
"
    )
}

#[test]
fn install_deliver_upgrade_remove_purge() {
    let first = deb(VERSION);
    let upgrade = deb(&upgrade_version());
    assert!(
        installed_version().is_none() && !user_exists("dualroute") && !group_exists("dualroute"),
        "dualroute is installed on this machine (or its user/group exists): this test installs and purges the package; run `dpkg --purge dualroute` first"
    );
    let system_main_cf = fs::read("/etc/postfix/main.cf").ok();
    let mut t = Transcript::new();
    let mut cleanup = Cleanup { milter: None };
    let first_s = first.to_str().expect("UTF-8 path");

    // Lint and the unit, from the package itself.
    t.say("## lintian");
    let out = t.ok("lintian", &["--fail-on", "error,warning", first_s]);
    for line in out.lines() {
        assert!(
            !line.starts_with("E:") && !line.starts_with("W:"),
            "lintian: {line}"
        );
    }

    t.say("## install on a machine without Postfix (no user postfix), then add it as documented");
    let fake = tempfile::tempdir().expect("tmp");
    fs::write(
        fake.path().join("getent"),
        "#!/bin/sh\n# no Postfix on this machine\n[ \"$1 $2\" = \"passwd postfix\" ] && exit 2\nexec /usr/bin/getent \"$@\"\n",
    )
    .expect("fake getent");
    fs::set_permissions(
        fake.path().join("getent"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let (ok, out) = t.run_env(&[("PATH", &path)], "dpkg", &["-i", first_s]);
    assert!(ok, "postinst without Postfix failed:\n{out}");
    let out = t.ok("getent", &["group", "dualroute"]);
    assert!(
        out.trim().ends_with(':'),
        "postfix was added without Postfix: {out}"
    );
    t.ok("adduser", &["postfix", "dualroute"]);
    let out = t.ok("getent", &["group", "dualroute"]);
    assert!(out.trim().ends_with(":postfix"), "{out}");
    // Purge with postfix in group dualroute (issue 25: deluser said
    // "group dualroute not removed because it has other members", then
    // delgroup removed it silently).
    let out = t.ok("apt-get", &["purge", "-y", "dualroute"]);
    assert_purged_quietly(&out);

    t.say("## install");
    t.ok("dpkg", &["-i", first_s]);
    assert_eq!(installed_version().as_deref(), Some(VERSION));
    // No systemd here: deb-systemd-invoke must not have started anything.
    assert!(
        !Path::new(SOCKET).exists(),
        "something started the service without systemd"
    );
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/dualroute.service").exists(),
        "the unit is not enabled (for the next boot with systemd)"
    );

    t.say("## owners and modes");
    let out = t.ok("getent", &["passwd", "dualroute"]);
    let fields: Vec<&str> = out.trim().split(':').collect();
    assert_eq!(fields.get(5), Some(&"/var/lib/dualroute"), "home: {out}");
    assert_eq!(fields.get(6), Some(&"/usr/sbin/nologin"), "shell: {out}");
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid < 1000, "not a system user: {out}");
    let out = t.ok("getent", &["group", "dualroute"]);
    assert!(
        out.trim().ends_with(":postfix"),
        "postfix must be in group dualroute: {out}"
    );
    for (path, mode, user, group) in [
        ("/usr/sbin/dualroute", 0o755, "root", "root"),
        (CONFFILE, 0o644, "root", "root"),
        (UNIT, 0o644, "root", "root"),
        ("/var/lib/dualroute", 0o750, "dualroute", "dualroute"),
        (SOCKET_DIR, 0o750, "dualroute", "dualroute"),
        ("/usr/share/man/man8/dualroute.8.gz", 0o644, "root", "root"),
        (
            "/usr/share/man/man5/milter.yaml.5.gz",
            0o644,
            "root",
            "root",
        ),
        (
            "/usr/share/bash-completion/completions/dualroute",
            0o644,
            "root",
            "root",
        ),
        (
            "/usr/share/zsh/vendor-completions/_dualroute",
            0o644,
            "root",
            "root",
        ),
        ("/usr/share/doc/dualroute/copyright", 0o644, "root", "root"),
        (
            "/usr/share/doc/dualroute/changelog.gz",
            0o644,
            "root",
            "root",
        ),
        ("/usr/share/doc/dualroute/design.md", 0o644, "root", "root"),
        ("/usr/share/doc/dualroute/postfix.md", 0o644, "root", "root"),
        (
            "/usr/share/doc/dualroute/without-systemd.md",
            0o644,
            "root",
            "root",
        ),
        (
            "/usr/share/dualroute/grafana/dualroute.json",
            0o644,
            "root",
            "root",
        ),
    ] {
        let got = mode_owner(path);
        t.say(&format!("{:o} {}:{} {path}", got.0, got.1, got.2));
        assert_eq!(got, (mode, user.to_owned(), group.to_owned()), "{path}");
    }
    // The dashboard is the one tests/dashboard.rs checks.
    assert_eq!(
        fs::read("/usr/share/dualroute/grafana/dualroute.json").ok(),
        fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/grafana/dualroute.json"
        ))
        .ok(),
        "the packaged dashboard differs from packaging/grafana/dualroute.json"
    );
    let out = t.ok("dpkg-query", &["-W", "-f=${Conffiles}", "dualroute"]);
    assert!(out.contains(CONFFILE), "not a conffile: {out}");

    t.say("## systemd-analyze");
    let (ok, out) = t.run("systemd-analyze", &["verify", UNIT]);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    let (_, out) = t.run("systemd-analyze", &["security", "--offline=true", UNIT]);
    let exposure: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for dualroute.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    t.say(&format!("exposure: {exposure}"));
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0");

    t.say("## the administrator edits the conffile");
    let sink = SmtpSink::start();
    fs::write(CONFFILE, edited_conffile(&sink.nexthop())).expect("edit the conffile");
    t.ok("/usr/sbin/dualroute", &["check", "--config", CONFFILE]);

    t.say("## a private Postfix, smtpd chrooted, the package's socket directory inside its queue");
    let pf = Postfix::start(
        PostfixOptions::default()
            .domain_without_catchall("split.test", &["alice@split.test"])
            .domain_without_catchall("dual.test", &["bob@dual.test"])
            .chroot_with(Path::new(SOCKET_DIR), "dualroute"),
    );
    let etc = pf.config_dir();
    let etc_s = etc.to_str().expect("UTF-8 path").to_owned();
    let (main_cf, master_cf) = (etc.join("main.cf"), etc.join("master.cf"));
    let (main_before, master_before) = (
        fs::read(&main_cf).expect("main.cf"),
        fs::read(&master_cf).expect("master.cf"),
    );
    let apply = [
        "postfix-config",
        "--config",
        CONFFILE,
        "--postfix-config-dir",
        &etc_s,
    ];

    t.say("## postfix-config --apply");
    let out = t.ok("/usr/sbin/dualroute", &[&apply[..], &["--apply"]].concat());
    assert!(out.contains("postfix check: OK"), "{out}");
    assert_eq!(
        pf.postconf("smtpd_milters"),
        "unix:/dualroute/dualroute.sock"
    );

    t.say("## the service, as ExecStart says, as user dualroute");
    t.say(&format!("ExecStart: {}", exec_start().join(" ")));
    let log = pf.dir().join("dualroute.log");
    let mut child = start_as_unit(&log);
    wait_serving(&mut child, &log);
    cleanup.milter = Some(child);
    let socket = mode_owner(SOCKET);
    t.say(&format!(
        "{:o} {}:{} {SOCKET}",
        socket.0, socket.1, socket.2
    ));
    assert_eq!(socket, (0o660, "dualroute".into(), "dualroute".into()));

    t.say("## a split message: alice@ has a mailbox here, zed@ goes to the other server");
    let client = SmtpClient::new(pf.smtp_addr());
    let sent = client.send(
        "sender@outside.test",
        &["alice@split.test", "zed@split.test"],
        "Subject: split\n\nsplit body\n",
    );
    t.say(&format!("{sent:?}"));
    assert!(sent.accepted(), "{sent:?}");
    let got = sink.wait_messages(1);
    assert_eq!(got[0].rcpt_addresses(), vec!["zed@split.test".to_owned()]);
    let alice = support::poll(|| {
        let m = pf.maildir_messages("alice@split.test");
        (!m.is_empty()).then_some(m)
    })
    .expect("alice's copy");
    assert!(alice[0].text.contains("split body"));

    t.say("## a reload with an invalid config keeps the running one");
    fs::write(CONFFILE, "domains: [this is not a mapping\n").expect("break the conffile");
    let pid = cleanup.milter.as_ref().map(|c| c.id()).expect("milter");
    t.ok("kill", &["-HUP", &pid.to_string()]);
    let reloaded = support::poll(|| {
        let l = fs::read_to_string(&log).unwrap_or_default();
        l.contains("reload failed").then_some(l)
    })
    .expect("a failed reload in the log");
    t.say(reloaded.lines().last().unwrap_or(""));
    assert!(reloaded.contains(&format!("{CONFFILE}:1:")), "{reloaded}");

    t.say("## a dual message, still with the policy from before the failed reload");
    let sent = client.send(
        "sender@outside.test",
        &["bob@dual.test"],
        "Subject: dual\n\ndual body\n",
    );
    t.say(&format!("{sent:?}"));
    assert!(sent.accepted(), "{sent:?}");
    let got = sink.wait_messages(2);
    assert!(
        got.iter()
            .any(|m| m.rcpt_addresses() == vec!["bob@dual.test".to_owned()]),
        "no copy for bob@dual.test at the other server"
    );
    let bob = support::poll(|| {
        let m = pf.maildir_messages("bob@dual.test");
        (!m.is_empty()).then_some(m)
    })
    .expect("bob's local copy");
    assert!(bob[0].text.contains("dual body"));
    pf.wait_queue_empty();
    cleanup.stop_milter();

    t.say("## the service with an invalid config fails with file:line");
    let out = as_unit().output().expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    t.say(stderr.trim());
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{CONFFILE}:1:")), "{stderr}");
    fs::write(CONFFILE, edited_conffile(&sink.nexthop())).expect("restore the conffile");

    t.say("## --apply again: nothing to change");
    let (main_applied, master_applied) = (
        fs::read(&main_cf).expect("main.cf"),
        fs::read(&master_cf).expect("master.cf"),
    );
    let out = t.ok("/usr/sbin/dualroute", &[&apply[..], &["--apply"]].concat());
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(fs::read(&main_cf).expect("main.cf"), main_applied);
    assert_eq!(fs::read(&master_cf).expect("master.cf"), master_applied);

    t.say("## --revert: main.cf and master.cf as before");
    t.ok("/usr/sbin/dualroute", &[&apply[..], &["--revert"]].concat());
    assert_eq!(fs::read(&main_cf).expect("main.cf"), main_before, "main.cf");
    assert_eq!(
        fs::read(&master_cf).expect("master.cf"),
        master_before,
        "master.cf"
    );

    t.say("## --apply again, then the package goes: Postfix must keep delivering (issue 21 §9)");
    let out = t.ok("/usr/sbin/dualroute", &[&apply[..], &["--apply"]].concat());
    assert!(out.contains("postfix check: OK"), "{out}");
    let registry = fs::read_to_string("/var/lib/dualroute/postfix-applied").unwrap_or_default();
    t.say(&format!("/var/lib/dualroute/postfix-applied: {registry}"));

    t.say("## upgrade to a higher version: the edited conffile is kept, Postfix stays wired");
    let edited = fs::read_to_string(CONFFILE).expect("conffile");
    t.ok("dpkg", &["-i", upgrade.to_str().expect("UTF-8 path")]);
    assert_eq!(installed_version(), Some(upgrade_version()));
    assert_eq!(fs::read_to_string(CONFFILE).expect("conffile"), edited);
    assert!(!Path::new("/etc/dualroute/milter.yaml.dpkg-dist").exists());
    assert_eq!(
        pf.postconf("smtpd_milters"),
        "unix:/dualroute/dualroute.sock",
        "an upgrade must not unwire Postfix"
    );

    t.say("## remove: dualroute leaves Postfix; the conffile, state and user stay");
    let (ok, out) = t.run_env(&[], "apt-get", &["remove", "-y", "dualroute"]);
    assert!(ok, "apt-get remove failed:\n{out}");
    t.say("## Postfix delivers without the milter");
    let sent = client.send(
        "sender@outside.test",
        &["alice@split.test"],
        "Subject: after remove\n\nafter remove body\n",
    );
    t.say(&format!("{sent:?}"));
    assert!(
        sent.accepted(),
        "Postfix refuses mail after the package went: {sent:?}"
    );
    support::poll(|| {
        pf.maildir_messages("alice@split.test")
            .iter()
            .any(|m| m.text.contains("after remove body"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not delivered after remove\n{}", pf.diagnostics()));
    assert!(
        out.contains(&format!(
            "removing dualroute from the Postfix configuration in {}",
            fs::canonicalize(&etc).expect("config dir").display()
        )),
        "the removal did not say it reverts Postfix:\n{out}"
    );
    assert_eq!(
        pf.postconf("smtpd_milters"),
        "",
        "smtpd_milters after remove"
    );
    assert_eq!(
        pf.postconf("non_smtpd_milters"),
        "",
        "non_smtpd_milters after remove"
    );
    assert_eq!(fs::read(&main_cf).expect("main.cf"), main_before, "main.cf");
    assert_eq!(
        fs::read(&master_cf).expect("master.cf"),
        master_before,
        "master.cf"
    );
    drop(pf);
    assert!(!Path::new("/usr/sbin/dualroute").exists());
    assert!(Path::new(CONFFILE).exists());
    assert!(user_exists("dualroute"));

    t.say("## purge: nothing is left");
    let out = t.ok("apt-get", &["purge", "-y", "dualroute"]);
    assert_purged_quietly(&out);
    for gone in [
        "/etc/dualroute",
        "/var/lib/dualroute",
        SOCKET_DIR,
        UNIT,
        "/usr/share/doc/dualroute",
        "/usr/share/dualroute",
        // deb-systemd-helper enables the unit even without systemd; purge
        // takes that back.
        "/etc/systemd/system/multi-user.target.wants/dualroute.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/dualroute.service.dsh-also",
        "/var/lib/dpkg/info/dualroute.list",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(!user_exists("dualroute"), "user dualroute left after purge");
    assert!(
        !group_exists("dualroute"),
        "group dualroute left after purge"
    );
    let (_, out) = t.run("id", &["postfix"]);
    assert!(!out.contains("dualroute"), "{out}");
    assert!(installed_version().is_none());
    assert_eq!(
        fs::read("/etc/postfix/main.cf").ok(),
        system_main_cf,
        "the system Postfix's main.cf changed"
    );
    t.say("## done");
    drop(cleanup);
}
