//! A private Sendmail 8.17 per test: Debian's packages unpacked (not
//! installed) by scripts/test-deps-sendmail.sh, its own `.mc` built with
//! the unpacked cf tree, a daemon on a free loopback port, its queue, maps
//! and log in a temporary tree. Mail leaves only through mailertable
//! entries to `smtp-sink`s on loopback (see [`SendmailOptions::relay_to`]).
//!
//! Facts this file relies on (Sendmail 8.17.1.9, Debian 12):
//! - sendmail-bin conflicts with postfix, which the other tests need, so the
//!   debs are unpacked into a cache: `$DUALROUTE_SENDMAIL_ROOT`, default
//!   `target/sendmail`.
//! - Sendmail checks that its host name is a dotted name before it reads
//!   its configuration, and otherwise sleeps 60 s. It is started under
//!   `unshare --mount` with a private hosts file bind-mounted over
//!   /etc/hosts: the machine's /etc/hosts is never touched.
//! - Sendmail logs to syslog only. In the same private mount namespace a
//!   private /dev (null, zero, random, urandom bind-mounted from the real
//!   one) is mounted over /dev, with `log` a datagram socket this harness
//!   binds: the machine's /dev/log, if any, is never replaced. The lines
//!   are written to `maillog` as rsyslog would (`Mon DD HH:MM:SS host
//!   sendmail[PID]: …`), so the breaker reads them as in production.
//! - Sendmail refuses maps and programs below a world-writable directory
//!   ("unsafe map file …: World writable directory"), and Cargo's target
//!   directory is below /tmp when the checkout is (many CI runners).
//!   `DontBlameSendmail=TrustStickyBit` makes it trust a world-writable
//!   directory with the sticky bit (/tmp, /var/tmp: no one can replace
//!   another's file there), so the harness works wherever the checkout
//!   lives (issue 22 §2).
//! - A map declared optional (`-o`) that Sendmail cannot or will not open
//!   is skipped in silence: without the mailertable, mail went to DNS
//!   instead of the sink. So no map is optional, and [`Sendmail::start`]
//!   looks each one up (`sendmail -bt`, `/map`) and fails with Sendmail's
//!   words when one is not usable.
//! - The daemon and its children chdir to the queue directory: that is how
//!   leftovers of an instance are found (`processes_in`).

use super::{files_under, keep_tmp, poll, ports, processes_in, write, SmtpSink};
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Our own host name; nothing resolves it (`.invalid`, RFC 2606).
pub const MYHOSTNAME: &str = "mx.dualroute-test.invalid";

const NOT_UNPACKED: &str =
    "Sendmail is not unpacked: run scripts/test-deps-sendmail.sh (as root; it downloads Debian's sendmail-bin, sendmail-base and sendmail-cf and installs m4 and libwrap0)";

/// Where scripts/test-deps-sendmail.sh unpacked the debs.
pub fn sendmail_root() -> PathBuf {
    std::env::var_os("DUALROUTE_SENDMAIL_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sendmail"))
}

/// A program of the unpacked Sendmail (`sendmail`, `makemap`).
pub fn sendmail_program(name: &str) -> PathBuf {
    let path = sendmail_root().join("usr/libexec/sendmail").join(name);
    assert!(
        path.is_file(),
        "{NOT_UNPACKED} ({} missing)",
        path.display()
    );
    path
}

fn cf_dir() -> PathBuf {
    let dir = sendmail_root().join("usr/share/sendmail/cf");
    assert!(
        dir.join("m4/cf.m4").is_file(),
        "{NOT_UNPACKED} ({} missing)",
        dir.display()
    );
    dir
}

/// What a private Sendmail looks like.
#[derive(Clone, Debug, Default)]
pub struct SendmailOptions {
    /// `.mc` lines after the harness's own and before the `MAILER()` lines,
    /// e.g. `include(`…/sendmail.mc.dualroute')dnl`.
    pub mc: Vec<String>,
    /// mailertable source text (merged: harness entries, then these).
    pub mailertable: String,
    /// Mailer definitions the harness adds (one per sink port).
    mailers: Vec<String>,
    /// access entries (`To:example.com RELAY`).
    pub access: Vec<String>,
    /// Other maps: (file name, source).
    pub maps: Vec<(String, String)>,
    /// Whether the local mailer writes to files (see
    /// [`SendmailOptions::local_delivery`]).
    pub local_delivery: bool,
}

impl SendmailOptions {
    /// Appends a `.mc` line (before `MAILER()`); `$DIR` in it becomes the
    /// instance's directory, where [`SendmailOptions::map`] writes maps.
    pub fn mc(mut self, line: &str) -> Self {
        self.mc.push(line.to_owned());
        self
    }

    /// Appends mailertable source lines (what `dualroute sendmail-config
    /// --write` put into mailertable.dualroute: "merge into
    /// /etc/mail/mailertable").
    pub fn mailertable(mut self, text: &str) -> Self {
        self.mailertable.push_str(text);
        if !text.ends_with('\n') {
            self.mailertable.push('\n');
        }
        self
    }

    /// Accepts mail for `domain` from any client and sends it to `sink`
    /// (a mailertable entry with a mailer for the sink's port, and
    /// `To:domain RELAY` in access): the mail store of a domain, or a
    /// domain that has no DNS here.
    pub fn relay_to(mut self, domain: &str, sink: &SmtpSink) -> Self {
        let mailer = format!("sink{}", sink.port());
        let definition = dualroute::sendmail::mailer_definition(&mailer, sink.port());
        if !self.mailers.contains(&definition) {
            self.mailers.push(definition);
        }
        self.mailertable
            .push_str(&format!("{domain}\t{mailer}:[127.0.0.1]\n"));
        self.access.push(format!("To:{domain}\tRELAY"));
        self
    }

    /// Writes a map source `name` into the instance's directory and
    /// `makemap hash`es it; refer to it in an `.mc` line as `$DIR/name`.
    pub fn map(mut self, name: &str, contents: &str) -> Self {
        self.maps.push((name.to_owned(), contents.to_owned()));
        self
    }

    /// Delivers `domain` locally, as a Debian Sendmail with mailboxes does:
    /// the domain in class w, a virtusertable (`virtusertable` is its
    /// source, e.g. `alice@local.test alice` and a catch-all
    /// `@local.test catchall`), and a local mailer that writes each message
    /// to `local/USER.PID` in the instance's directory ([`Sendmail::local_mail`]).
    /// The mailer runs as root (F=S), does not check passwd (no F=w):
    /// virtusertable users need no system account, and is not aliased (no
    /// F=A): there is no aliases database.
    pub fn local_delivery(mut self, domain: &str, virtusertable: &str) -> Self {
        self.local_delivery = true;
        self.local_domain(domain)
            .map("virtusertable", virtusertable)
            .mc("FEATURE(`virtusertable', `hash $DIR/virtusertable')dnl")
            .mc("define(`LOCAL_MAILER_PATH', `$DIR/deliver')dnl")
            .mc("define(`LOCAL_MAILER_ARGS', `deliver $u')dnl")
            .mc("define(`LOCAL_MAILER_FLAGS', `SPfhn9')dnl")
            .mc("MODIFY_MAILER_FLAGS(`LOCAL', `-wA')dnl")
    }

    /// A domain in class w (`LOCAL_DOMAIN`): Sendmail's local mailer
    /// delivers it (see [`SendmailOptions::local_delivery`]).
    pub fn local_domain(self, domain: &str) -> Self {
        self.mc(&format!("LOCAL_DOMAIN(`{domain}')dnl"))
    }
}

/// A running private Sendmail. Dropping it stops the daemon and kills
/// whatever is left of it.
pub struct Sendmail {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    syslog: Option<SyslogCatcher>,
    running: bool,
}

impl Sendmail {
    /// Builds the configuration, starts the daemon and waits until it
    /// listens. Panics with what m4, makemap or sendmail said.
    pub fn start(opts: SendmailOptions) -> Sendmail {
        // The daemon binds its port itself: started again on another port
        // when another process has it (tests/support/ports.rs).
        ports::start_on_a_port("Sendmail", |port| Self::try_start(&opts, port))
    }

    /// A new tree and daemon on `port`; `Err` when the port is taken.
    fn try_start(opts: &SendmailOptions, port: u16) -> Result<Sendmail, String> {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(&base).expect("create CARGO_TARGET_TMPDIR");
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-sendmail-")
            .tempdir_in(&base)
            .expect("create a temporary directory");
        let root = tmp.path().to_path_buf();
        let mut sendmail = Sendmail {
            tmp: Some(tmp),
            root,
            port,
            syslog: None,
            running: false,
        };
        sendmail.configure(opts);
        sendmail.check_maps(opts);
        sendmail.syslog = Some(SyslogCatcher::start(
            &sendmail.root.join("dev/log"),
            &sendmail.maillog_path(),
        ));
        sendmail.run_daemon()?;
        Ok(sendmail)
    }

    fn configure(&self, opts: &SendmailOptions) {
        let root = &self.root;
        let p = |name: &str| root.join(name).display().to_string();
        // The host name Sendmail insists on: the machine's, dotted by the
        // private hosts file.
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        write(
            &root.join("hosts"),
            &format!("127.0.0.1\tlocalhost\n127.0.0.1\t{MYHOSTNAME} {host}\n"),
        );
        fs::create_dir(root.join("dev")).expect("create dev");
        for dev in ["null", "zero", "random", "urandom"] {
            write(&root.join("dev").join(dev), "");
        }
        let queue = root.join("mqueue");
        fs::create_dir(&queue).expect("create the queue directory");
        super::set_mode(&queue, 0o700);
        write(&root.join("statistics"), "");
        let mut mc = format!(
            "divert(-1)\ndivert(0)dnl\ninclude(`{cf}/m4/cf.m4')dnl\nVERSIONID(`dualroute test')dnl\nOSTYPE(`linux')dnl\n\
             define(`confDOMAIN_NAME', `{MYHOSTNAME}')dnl\n\
             define(`confDONT_PROBE_INTERFACES', `True')dnl\n\
             define(`confHOST_STATUS_DIRECTORY', `')dnl\n\
             define(`STATUS_FILE', `{stats}')dnl\n\
             define(`QUEUE_DIR', `{queue}')dnl\n\
             define(`confPID_FILE', `{pid}')dnl\n\
             define(`ALIAS_FILE', `')dnl\n\
             define(`confLOG_LEVEL', `14')dnl\n\
             define(`confTO_QUEUERETURN', `5d')dnl\n\
             define(`confDELIVERY_MODE', `background')dnl\n\
             define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl\n\
             DAEMON_OPTIONS(`Port={port}, Addr=127.0.0.1, Name=MTA')dnl\n\
             FEATURE(`no_default_msa')dnl\n\
             FEATURE(`accept_unresolvable_domains')dnl\n\
             FEATURE(`access_db', `hash -T<TMPF> {access}')dnl\n\
             FEATURE(`mailertable', `hash {mailertable}')dnl\n",
            cf = cf_dir().display(),
            stats = p("statistics"),
            queue = queue.display(),
            pid = p("sendmail.pid"),
            port = self.port,
            access = p("access"),
            mailertable = p("mailertable"),
        );
        for line in &opts.mc {
            mc.push_str(&line.replace("$DIR", &root.display().to_string()));
            mc.push('\n');
        }
        mc.push_str("MAILER(`local')dnl\nMAILER(`smtp')dnl\n");
        if !opts.mailers.is_empty() {
            mc.push_str("MAILER_DEFINITIONS\n");
            for m in &opts.mailers {
                mc.push_str(m);
                mc.push('\n');
            }
        }
        write(&root.join("sendmail.mc"), &mc);
        let out = Command::new("m4")
            .arg(root.join("sendmail.mc"))
            .output()
            .unwrap_or_else(|e| panic!("run m4: {e}: {NOT_UNPACKED}"));
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("ERROR"),
            "m4 sendmail.mc failed:\n{}\n--- sendmail.mc ---\n{mc}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(root.join("sendmail.cf"), &out.stdout).expect("write sendmail.cf");
        write(&root.join("mailertable"), &opts.mailertable);
        write(&root.join("access"), &(opts.access.join("\n") + "\n"));
        if opts.local_delivery {
            fs::create_dir(root.join("local")).expect("create local");
            let deliver = root.join("deliver");
            write(
                &deliver,
                &format!(
                    "#!/bin/sh\n# The local mailer (A=deliver $u, after -f SENDER with F=f): one file\n# per message and user.\nfor user; do :; done\ncat > {}/local/\"$user.$$\"\n",
                    root.display()
                ),
            );
            super::set_mode(&deliver, 0o755);
        }
        for (name, contents) in &opts.maps {
            write(&root.join(name), contents);
        }
        let maps = opts.maps.iter().map(|(name, _)| name.as_str());
        for map in ["mailertable", "access"].into_iter().chain(maps) {
            self.makemap(map);
        }
    }

    /// Looks up a key in each map the configuration declares (Sendmail's
    /// map names: `mailertable`, `access`, `virtuser`) with `sendmail -bt`
    /// and fails the test with what Sendmail said when a map is not open:
    /// a distrusted path ("unsafe map file"), a missing file.
    fn check_maps(&self, opts: &SendmailOptions) {
        let mut maps = vec!["mailertable", "access"];
        if opts.local_delivery {
            maps.push("virtuser");
        }
        let input: String = maps
            .iter()
            .map(|map| format!("/map {map} dualroute-harness-check\n"))
            .collect();
        let out = self.address_test(&input);
        for map in maps {
            // A usable map answers "no match (0)"; a map that is not open
            // answers with an error status, or "Map named … not open".
            let answered = format!("map_lookup: {map} (dualroute-harness-check) no match (0)");
            assert!(
                out.contains(&answered),
                "Sendmail cannot use its map {map:?} in {}; `sendmail -bt` says:\n{out}",
                self.root.display()
            );
        }
    }

    /// `makemap hash MAP < MAP`, as `make -C /etc/mail` does.
    fn makemap(&self, map: &str) {
        let source = fs::File::open(self.root.join(map)).expect("open a map source");
        let out = Command::new(sendmail_program("makemap"))
            .arg("-C")
            .arg(self.root.join("sendmail.cf"))
            .arg("hash")
            .arg(self.root.join(map))
            .stdin(source)
            .output()
            .expect("run makemap");
        assert!(
            out.status.success(),
            "makemap hash {map} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `sh -c SCRIPT` in a private mount namespace with the private hosts
    /// file and /dev (see the module comment).
    fn in_namespace(&self, script: &str) -> Command {
        let root = self.root.display();
        let mut prelude = String::new();
        for dev in ["null", "zero", "random", "urandom"] {
            prelude.push_str(&format!("mount --bind /dev/{dev} {root}/dev/{dev} && "));
        }
        prelude.push_str(&format!(
            "mount --rbind {root}/dev /dev && mount --bind {root}/hosts /etc/hosts && "
        ));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "sh", "-c"])
            .arg(format!("{prelude}{script}"));
        cmd
    }

    /// Starts the daemon and waits until it listens: `Err` when it could
    /// not bind its port.
    fn run_daemon(&mut self) -> Result<(), String> {
        let out = self
            .in_namespace(&format!(
                "exec {} -bd -q5s -C {}",
                sendmail_program("sendmail").display(),
                self.root.join("sendmail.cf").display()
            ))
            .output()
            .expect("run unshare");
        assert!(
            out.status.success(),
            "sendmail -bd failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.maillog()
        );
        self.running = true;
        // The daemon and its children work in the queue directory.
        let queue = self.queue_dir();
        let bound = ports::wait_bound(
            self.port,
            Duration::from_secs(20),
            || processes_in(&queue),
            || {
                let log = self.maillog();
                // opendaemonsocket: daemon MTA: cannot bind: Address already in use
                log.contains("cannot bind").then(|| format!("\n{log}"))
            },
        );
        match bound {
            Ok(()) => Ok(()),
            Err(ports::NotBound::Taken(why)) => Err(why),
            Err(ports::NotBound::TimedOut) => panic!(
                "sendmail does not listen on 127.0.0.1:{} after 20 s:\n{}",
                self.port,
                self.maillog()
            ),
        }
    }

    /// `sendmail -bt -C sendmail.cf` with `input` (address test mode), in
    /// the same namespace as the daemon.
    pub fn address_test(&self, input: &str) -> String {
        let mut child = self
            .in_namespace(&format!(
                "exec {} -bt -C {}",
                sendmail_program("sendmail").display(),
                self.root.join("sendmail.cf").display()
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sendmail -bt");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to sendmail -bt");
        let Output { stdout, stderr, .. } = child.wait_with_output().expect("sendmail -bt");
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )
    }

    /// The messages the local mailer delivered to `user`.
    pub fn local_mail(&self, user: &str) -> Vec<String> {
        let prefix = format!("{user}.");
        let mut mail: Vec<String> = files_under(&self.root.join("local"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .filter_map(|p| fs::read_to_string(p).ok())
            .collect();
        mail.sort();
        mail
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("mqueue")
    }

    pub fn maillog_path(&self) -> PathBuf {
        self.root.join("maillog")
    }

    pub fn maillog(&self) -> String {
        fs::read_to_string(self.maillog_path()).unwrap_or_default()
    }

    /// Waits until the maillog has a line containing all of `parts`, and
    /// returns it.
    pub fn wait_log(&self, parts: &[&str]) -> String {
        poll(|| {
            self.maillog()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no maillog line with {parts:?}:\n{}", self.diagnostics()))
    }

    /// The `to=` lines of the maillog (one per delivery attempt).
    pub fn deliveries(&self) -> Vec<String> {
        self.maillog()
            .lines()
            .filter(|l| l.contains(": to=") && l.contains(", stat="))
            .map(str::to_owned)
            .collect()
    }

    /// Queue files (`qf…`) left.
    pub fn queue(&self) -> Vec<PathBuf> {
        files_under(&self.queue_dir())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("qf"))
            })
            .collect()
    }

    /// Waits until the queue is empty: every message delivered or bounced.
    pub fn wait_queue_empty(&self) {
        poll(|| self.queue().is_empty().then_some(()))
            .unwrap_or_else(|| panic!("the queue is not empty:\n{}", self.diagnostics()));
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "--- queue ({}) ---\n{:?}\n--- maillog ({}) ---\n{}",
            self.queue_dir().display(),
            self.queue(),
            self.maillog_path().display(),
            self.maillog()
        )
    }

    /// Stops the daemon (also done by Drop); afterwards no process of it is
    /// left.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let daemon = fs::read_to_string(self.root.join("sendmail.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        if let Some(pid) = daemon {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_in(&self.queue_dir()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in processes_in(&self.queue_dir()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }

    /// Local submission as on a Debian Sendmail host: the `sendmail`
    /// command with the MSP's configuration (submit.cf, ``FEATURE(`msp')``)
    /// queues the message in its own client queue and submits it over
    /// SMTP to the MTA on 127.0.0.1 (here the daemon's port, through
    /// `RELAY_MAILER_ARGS`), so the MTA runs the milter on an ordinary SMTP
    /// connection. `args` are sendmail's (`-f SENDER`, recipients); `-qf`
    /// alone runs the MSP's queue once, in the foreground (Debian's cron
    /// job runs it).
    pub fn submit(&self, args: &[&str], message: &str) -> Output {
        let submit_cf = self.root.join("submit.cf");
        if !submit_cf.is_file() {
            // The MSP refuses to run as root ("Mail submission program
            // must have RunAsUser set to non root user"); Debian's runs as
            // smmsp, here `nobody`, which must reach and own its queue.
            let (uid, gid) = super::user_ids("nobody");
            super::set_mode(&self.root, 0o711);
            let queue = self.root.join("clientmqueue");
            fs::create_dir_all(&queue).expect("create the MSP queue");
            super::set_mode(&queue, 0o770);
            std::os::unix::fs::chown(&queue, Some(uid), Some(gid)).expect("chown the MSP queue");
            let mc = format!(
                "divert(-1)\ndivert(0)dnl\ninclude(`{cf}/m4/cf.m4')dnl\nVERSIONID(`dualroute test MSP')dnl\n\
                 define(`confCF_VERSION', `Submit')dnl\n\
                 define(`__OSTYPE__',`')dnl\n\
                 define(`confTIME_ZONE', `USE_TZ')dnl\n\
                 define(`confDONT_INIT_GROUPS', `True')dnl\n\
                 define(`confDOMAIN_NAME', `{MYHOSTNAME}')dnl\n\
                 define(`confRUN_AS_USER', `nobody')dnl\n\
                 define(`MSP_QUEUE_DIR', `{queue}')dnl\n\
                 define(`STATUS_FILE', `{root}/sm-client.st')dnl\n\
                 define(`confPID_FILE', `{root}/sm-client.pid')dnl\n\
                 define(`RELAY_MAILER_ARGS', `TCP $h {port}')dnl\n\
                 FEATURE(`msp', `[127.0.0.1]')dnl\n",
                cf = cf_dir().display(),
                queue = queue.display(),
                root = self.root.display(),
                port = self.port,
            );
            write(&self.root.join("submit.mc"), &mc);
            write(&self.root.join("sm-client.st"), "");
            std::os::unix::fs::chown(self.root.join("sm-client.st"), Some(uid), Some(gid))
                .expect("chown sm-client.st");
            let out = Command::new("m4")
                .arg(self.root.join("submit.mc"))
                .output()
                .unwrap_or_else(|e| panic!("run m4: {e}"));
            assert!(
                out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("ERROR"),
                "m4 submit.mc failed:\n{}\n--- submit.mc ---\n{mc}",
                String::from_utf8_lossy(&out.stderr)
            );
            fs::write(&submit_cf, &out.stdout).expect("write submit.cf");
        }
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        let mut child = self
            .in_namespace(&format!(
                "exec {} -Ac -C {} -i {}",
                sendmail_program("sendmail").display(),
                submit_cf.display(),
                quoted.join(" ")
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the MSP's sendmail");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(message.as_bytes())
            .expect("write to sendmail");
        child.wait_with_output().expect("wait for sendmail")
    }

    /// The messages waiting in the MSP's client queue.
    pub fn client_queue(&self) -> Vec<PathBuf> {
        files_under(&self.root.join("clientmqueue"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("qf"))
            })
            .collect()
    }
}

impl Drop for Sendmail {
    fn drop(&mut self) {
        self.stop();
        self.syslog.take();
        if let Some(tmp) = self.tmp.take() {
            if keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the Sendmail tree {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

/// A syslog receiver on a datagram socket: writes each message as a line
/// of `file`, in rsyslog's file format (`Mon DD HH:MM:SS host tag: text`).
struct SyslogCatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SyslogCatcher {
    fn start(socket: &Path, file: &Path) -> SyslogCatcher {
        let _ = fs::remove_file(socket);
        let sock =
            UnixDatagram::bind(socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
        super::set_mode(socket, 0o666);
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .unwrap_or_else(|e| panic!("open {}: {e}", file.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stopped.load(Ordering::SeqCst) {
                let Ok(n) = sock.recv(&mut buf) else {
                    continue;
                };
                let _ = out.write_all(rsyslog_line(&String::from_utf8_lossy(&buf[..n])).as_bytes());
            }
        });
        SyslogCatcher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SyslogCatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `<PRI>Mon DD HH:MM:SS tag[pid]: text` (RFC 3164, as glibc's syslog(3)
/// sends it) → `Mon DD HH:MM:SS HOST tag[pid]: text\n`.
fn rsyslog_line(datagram: &str) -> String {
    let text = datagram.trim_end_matches(['\n', '\0']);
    let text = match text.strip_prefix('<').and_then(|t| t.split_once('>')) {
        Some((_, rest)) => rest,
        None => text,
    };
    // The timestamp is 15 characters: "Nov 29 11:31:17".
    match (text.get(..15), text.get(16..)) {
        (Some(stamp), Some(rest)) => format!(
            "{stamp} {} {rest}\n",
            MYHOSTNAME.split('.').next().unwrap_or("mx")
        ),
        _ => format!("{text}\n"),
    }
}
