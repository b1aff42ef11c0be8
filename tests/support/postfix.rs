//! End-to-end test harness: a private Postfix instance on loopback, an
//! `smtp-sink` that stands in for the destination server, and a small SMTP
//! client that records every reply.
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "support/postfix.rs"]
//! mod postfix;
//! use postfix::{Postfix, PostfixOptions, SmtpClient, SmtpSink};
//! ```
//!
//! Requirements: Linux, root (Postfix's `postfix start` and the `virtual`
//! delivery agent need it), and the Debian `postfix` package
//! (`scripts/test-deps.sh` installs it). Nothing here skips silently: a
//! missing binary is a panic that says how to install it.
//!
//! Every instance and every sink lives in its own temporary directory with
//! its own ports, so tests in one binary may run in parallel. Everything talks
//! to 127.0.0.0/8 only: DNS is off in the Postfix SMTP client, mail for a
//! domain that is neither a virtual mailbox domain nor routed by the test's
//! `transport_maps` is bounced by the `error` transport, and on Linux the
//! whole of 127/8 is on `lo`, so a client can connect from 127.0.0.2 (an
//! "outside" client or a gateway; only 127.0.0.1 is in `mynetworks`).
//!
//! Set `DUALROUTE_KEEP_TMP=1` to keep the temporary trees (configuration,
//! queue, Maildirs, `maillog`, sink dumps); their paths are printed.
//!
//! Facts this file relies on (Postfix 3.7, Debian 12):
//! - `postfix start` reports start-up errors to syslog only; with
//!   `maillog_file` they go to the file once postlogd runs, but errors
//!   before that only reach a terminal: hence `script -qec`.
//! - `data_directory` must be owned by `mail_owner` (master creates
//!   `master.lock` there after dropping privileges); the queue
//!   subdirectories are created by `postfix start` itself.
//! - Postfix daemons `chdir` to `queue_directory`: that is how leftovers
//!   of an instance are found (`/proc/PID/cwd`).
//! - `postmap` and `postqueue` need `-c DIR` too, or they read
//!   `/etc/postfix/main.cf` (absent with "No configuration").
//! - The `virtual` delivery agent refuses uids below `virtual_minimum_uid`
//!   (100), so mail is delivered as `nobody`; the temporary tree is made
//!   world-searchable for that.
//! - Every Postfix command re-reads a main.cf modified within the last
//!   second (util/load_file.c, 300 ms sleeps): a freshly written main.cf
//!   costs ~2 s per command, so it is written with an mtime in the past.
//!   That takes start-up from ~2.4 s to ~0.4 s.
//! - `smtp-sink -u USER -d TEMPLATE` writes its dumps as USER, so the dump
//!   directory belongs to `nobody`; a transaction whose RCPTs were all
//!   rejected leaves no dump file.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the `wait_*` helpers poll before they panic.
pub const WAIT: Duration = Duration::from_secs(20);

const POLL: Duration = Duration::from_millis(50);

const NOT_INSTALLED: &str =
    "postfix is not installed: run scripts/test-deps.sh (as root) or `apt-get install postfix`";

/// The address a test client uses to be an outside (non-`mynetworks`)
/// client, or a gateway.
pub const OUTSIDE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Our own host name; nothing resolves it (`.invalid`, RFC 2606).
pub const MYHOSTNAME: &str = "mx.dualroute-test.invalid";

// ---------------------------------------------------------------------------
// Postfix
// ---------------------------------------------------------------------------

/// What a private Postfix instance looks like. Build it with the methods
/// below, e.g.
///
/// ```ignore
/// PostfixOptions::default()
///     .domain("example.com", &["alice@example.com"])
///     .map("dualroute_transport", "example.com.dualroute.invalid smtp:[127.0.0.1]:2525\n")
///     .main_cf("transport_maps = hash:dualroute_transport")
/// ```
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// `virtual_mailbox_domains`.
    pub virtual_domains: Vec<String>,
    /// `virtual_mailbox_maps` entries: key (`alice@example.com`, or
    /// `@example.com` for a catch-all) → Maildir relative to the Maildir
    /// root, ending in `/`.
    pub mailboxes: Vec<(String, String)>,
    /// `mynetworks`: clients allowed to relay. Default `127.0.0.1/32`, so a
    /// client connecting from [`OUTSIDE_IP`] is an outside client.
    pub mynetworks: String,
    /// `smtpd_milters`, e.g. `inet:127.0.0.1:8899`. None: no milter.
    pub milter: Option<String>,
    /// `milter_default_action` when a milter is set. Default `tempfail`
    /// (DESIGN.md §8).
    pub milter_default_action: String,
    /// Lines appended to main.cf after the harness's own (a later line
    /// overrides an earlier one for the same parameter).
    pub main_cf: Vec<String>,
    /// Lines appended to master.cf.
    pub master_cf: Vec<String>,
    /// Map source files written into the config directory: (file name,
    /// contents). In main.cf and master.cf lines, a table reference to one
    /// of them by bare file name (`hash:dualroute_transport`) or under
    /// `/etc/postfix/` (what `dualroute postfix-config` prints) is
    /// rewritten to the config directory; `$config_directory/NAME` works as
    /// it is. Maps referenced as `hash:` or `btree:` are `postmap`ed.
    pub extra_maps: Vec<(String, String)>,
}

impl Default for PostfixOptions {
    fn default() -> Self {
        PostfixOptions {
            virtual_domains: Vec::new(),
            mailboxes: Vec::new(),
            mynetworks: "127.0.0.1/32".to_owned(),
            milter: None,
            milter_default_action: "tempfail".to_owned(),
            main_cf: Vec::new(),
            master_cf: Vec::new(),
            extra_maps: Vec::new(),
        }
    }
}

impl PostfixOptions {
    /// A virtual mailbox domain with a Maildir for each account and a
    /// catch-all `@domain` Maildir. The catch-all makes Postfix accept
    /// every address of the domain, as a `split` or `route` domain needs
    /// (DESIGN.md §8); read it with `maildir_messages("@domain")`.
    pub fn domain(self, domain: &str, accounts: &[&str]) -> Self {
        let catchall = (format!("@{domain}"), format!("catchall/{domain}/"));
        self.add_domain(domain, accounts, Some(catchall))
    }

    /// A virtual mailbox domain without a catch-all: Postfix itself rejects
    /// unknown addresses (`550 5.1.1 ... User unknown in virtual mailbox
    /// table`) before a milter sees them.
    pub fn domain_without_catchall(self, domain: &str, accounts: &[&str]) -> Self {
        self.add_domain(domain, accounts, None)
    }

    fn add_domain(
        mut self,
        domain: &str,
        accounts: &[&str],
        catchall: Option<(String, String)>,
    ) -> Self {
        self.virtual_domains.push(domain.to_owned());
        for account in accounts {
            let (local, account_domain) = account
                .rsplit_once('@')
                .unwrap_or_else(|| panic!("account {account:?} is not local@domain"));
            self.mailboxes
                .push((account.to_string(), format!("{account_domain}/{local}/")));
        }
        self.mailboxes.extend(catchall);
        self
    }

    /// Appends a main.cf line.
    pub fn main_cf(mut self, line: &str) -> Self {
        self.main_cf.push(line.to_owned());
        self
    }

    /// Appends a master.cf line.
    pub fn master_cf(mut self, line: &str) -> Self {
        self.master_cf.push(line.to_owned());
        self
    }

    /// Writes a map source file into the config directory (see
    /// [`PostfixOptions::extra_maps`]).
    pub fn map(mut self, file_name: &str, contents: &str) -> Self {
        assert!(
            !file_name.contains('/'),
            "map file name {file_name:?} must be a bare file name"
        );
        self.extra_maps
            .push((file_name.to_owned(), contents.to_owned()));
        self
    }

    /// Sets `smtpd_milters`.
    pub fn milter(mut self, socket: &str) -> Self {
        self.milter = Some(socket.to_owned());
        self
    }
}

/// A running private Postfix instance. Dropping it stops the instance and
/// kills whatever is left of it.
pub struct Postfix {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    mailboxes: BTreeMap<String, String>,
    running: bool,
}

impl Postfix {
    /// Writes the configuration, starts the instance and waits until its
    /// smtpd listens. Panics with Postfix's own words (and the maillog) when
    /// it does not start.
    pub fn start(opts: PostfixOptions) -> Postfix {
        for tool_name in ["postfix", "postmap", "postqueue", "postconf", "smtp-sink"] {
            tool(tool_name);
        }
        let mut last_error = String::new();
        // The port comes from free_port(), so another process may take it
        // before master binds it: retry with a new one.
        for _ in 0..3 {
            match Self::try_start(&opts) {
                Ok(postfix) => return postfix,
                Err(error) if error.contains("Address already in use") => last_error = error,
                Err(error) => panic!("{error}"),
            }
        }
        panic!("{last_error}")
    }

    fn try_start(opts: &PostfixOptions) -> Result<Postfix, String> {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-postfix-")
            .tempdir()
            .expect("create a temporary directory");
        let root = tmp.path().to_path_buf();
        let mut postfix = Postfix {
            tmp: Some(tmp),
            root,
            port: free_port(),
            mailboxes: opts.mailboxes.iter().cloned().collect(),
            running: false,
        };
        postfix.write_tree(opts);
        // From here on, Drop stops whatever was started.
        postfix.running = true;
        let command = format!(
            "{} -c {} start",
            shell_quote(&tool("postfix").to_string_lossy()),
            shell_quote(&postfix.config_dir().to_string_lossy())
        );
        let started = Instant::now();
        let output = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run `script` (package bsdutils): {e}"));
        if !output.status.success() {
            return Err(format!(
                "Postfix did not start ({}): {command}\n{}\n--- maillog ---\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim_end(),
                postfix.maillog()
            ));
        }
        let deadline = started + Duration::from_secs(10);
        while !is_listening(postfix.port) {
            if Instant::now() > deadline {
                return Err(format!(
                    "Postfix started but nothing listens on 127.0.0.1:{}\n--- maillog ---\n{}",
                    postfix.port,
                    postfix.maillog()
                ));
            }
            std::thread::sleep(POLL);
        }
        Ok(postfix)
    }

    fn write_tree(&self, opts: &PostfixOptions) {
        let (postfix_uid, _) = user_ids("postfix");
        let (vmail_uid, vmail_gid) = user_ids("nobody");
        // Daemons running as `postfix` and deliveries running as `nobody`
        // must be able to reach their directories inside the tree.
        set_mode(&self.root, 0o755);
        for dir in [
            self.config_dir(),
            self.queue_dir(),
            self.data_dir(),
            self.maildir_root(),
        ] {
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        chown(self.data_dir(), Some(postfix_uid), None).expect("chown data_directory to postfix");
        chown(self.maildir_root(), Some(vmail_uid), Some(vmail_gid))
            .expect("chown the Maildir root to nobody");

        let etc = self.config_dir();
        let mut vmailbox = String::new();
        for (key, maildir) in &opts.mailboxes {
            vmailbox.push_str(&format!("{key} {maildir}\n"));
        }
        write(&etc.join("vmailbox"), &vmailbox);
        let mut to_postmap = vec![etc.join("vmailbox")];

        let map_names: Vec<&str> = opts.extra_maps.iter().map(|(n, _)| n.as_str()).collect();
        let mut referenced = Vec::new();
        let main_extra: Vec<String> = opts
            .main_cf
            .iter()
            .map(|line| rewrite_map_refs(line, &etc, &map_names, &mut referenced))
            .collect();
        let master_extra: Vec<String> = opts
            .master_cf
            .iter()
            .map(|line| rewrite_map_refs(line, &etc, &map_names, &mut referenced))
            .collect();
        for (name, contents) in &opts.extra_maps {
            write(&etc.join(name), contents);
            if referenced
                .iter()
                .any(|(kind, n)| n == name && is_indexed(kind))
            {
                to_postmap.push(etc.join(name));
            }
        }

        let milter = match &opts.milter {
            Some(socket) => format!(
                "smtpd_milters = {socket}\nmilter_default_action = {}\n",
                opts.milter_default_action
            ),
            None => String::new(),
        };
        let main_cf = format!(
            "# A private Postfix instance for one test, written by tests/support/postfix.rs.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = {MYHOSTNAME}
mydomain = dualroute-test.invalid
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = {mynetworks}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# No PTR lookups of clients: nothing may leave loopback.
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
in_flow_delay = 0
smtputf8_enable = no
# There is no syslog: postlogd (master.cf) writes this file.
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
# Next hops are [ip]:port only; no DNS. Everything not routed by the
# test's transport_maps is bounced, never sent anywhere.
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
default_transport = error:5.7.1 test instance: only transport_maps routes leave this host
relay_transport = $default_transport
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = hash:{etc}/vmailbox
virtual_uid_maps = static:{vmail_uid}
virtual_gid_maps = static:{vmail_gid}
# Fast queue for tests.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
bounce_queue_lifetime = 0
delay_warning_time = 0
{milter}# Lines from the test.
{extra}
",
            queue = self.queue_dir().display(),
            data = self.data_dir().display(),
            root = self.root.display(),
            mynetworks = opts.mynetworks,
            domains = opts.virtual_domains.join(", "),
            mail = self.maildir_root().display(),
            etc = etc.display(),
            extra = main_extra.join("\n"),
        );
        write_settled(&etc.join("main.cf"), &main_cf);

        let master_cf = format!(
            "# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
# Lines from the test.
{extra}
",
            port = self.port,
            extra = master_extra.join("\n"),
        );
        write_settled(&etc.join("master.cf"), &master_cf);

        let output = Command::new(tool("postmap"))
            .arg("-c")
            .arg(&etc)
            .args(&to_postmap)
            .output()
            .expect("run postmap");
        assert!(
            output.status.success(),
            "postmap {to_postmap:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The smtpd address, 127.0.0.1:port.
    pub fn smtp_addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The root of the temporary tree.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// `config_directory`: main.cf, master.cf, `vmailbox` and the extra maps.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("etc")
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// `virtual_mailbox_base`.
    pub fn maildir_root(&self) -> PathBuf {
        self.root.join("mail")
    }

    /// `maillog_file`.
    pub fn maillog_path(&self) -> PathBuf {
        self.root.join("maillog")
    }

    /// The Maildir of a `virtual_mailbox_maps` key (`alice@example.com`, or
    /// `@example.com` for the catch-all).
    pub fn maildir(&self, key: &str) -> PathBuf {
        match self.mailboxes.get(key) {
            Some(maildir) => self.maildir_root().join(maildir),
            None => panic!(
                "{key:?} is not a key of virtual_mailbox_maps; keys: {:?}",
                self.mailboxes.keys().collect::<Vec<_>>()
            ),
        }
    }

    /// The messages delivered to a `virtual_mailbox_maps` key so far.
    pub fn maildir_messages(&self, key: &str) -> Vec<MaildirMessage> {
        read_maildir(&self.maildir(key))
    }

    /// The whole maillog so far.
    pub fn maillog(&self) -> String {
        fs::read_to_string(self.maillog_path()).unwrap_or_default()
    }

    /// Every delivery attempt logged so far (`to=<…>, … status=…` lines).
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.maillog().lines().filter_map(Delivery::parse).collect()
    }

    /// The `status=bounced` deliveries logged so far.
    pub fn bounced(&self) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.status == "bounced")
            .collect()
    }

    /// Waits until at least `n` deliveries have a final status (anything
    /// but `deferred`) and returns all deliveries logged by then.
    pub fn wait_deliveries(&self, n: usize) -> Vec<Delivery> {
        let found = poll(|| {
            let deliveries = self.deliveries();
            let done = deliveries.iter().filter(|d| d.status != "deferred").count();
            (done >= n).then_some(deliveries)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {WAIT:?} waiting for {n} final deliveries\n{}",
                self.diagnostics()
            )
        })
    }

    /// The messages in the queue: (queue name, queue id) for `maildrop`,
    /// `incoming`, `active`, `deferred`, `hold` and `corrupt`.
    pub fn queue(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for queue in [
            "maildrop", "incoming", "active", "deferred", "hold", "corrupt",
        ] {
            for file in files_under(&self.queue_dir().join(queue)) {
                if let Some(id) = file.file_name() {
                    found.push((queue.to_owned(), id.to_string_lossy().into_owned()));
                }
            }
        }
        found
    }

    /// Waits until the queue is empty: every message delivered or bounced.
    /// Once a client has seen 250 after DATA the message is in `incoming`,
    /// so right after a send this cannot return early.
    pub fn wait_queue_empty(&self) {
        if poll(|| self.queue().is_empty().then_some(())).is_none() {
            panic!(
                "timed out after {WAIT:?} waiting for an empty queue\n{}",
                self.diagnostics()
            );
        }
    }

    /// Panics when a message is deferred or on hold.
    pub fn assert_no_deferred_or_held(&self) {
        let stuck: Vec<_> = self
            .queue()
            .into_iter()
            .filter(|(queue, _)| queue == "deferred" || queue == "hold")
            .collect();
        assert!(
            stuck.is_empty(),
            "messages are deferred or held: {stuck:?}\n{}",
            self.diagnostics()
        );
    }

    /// `postqueue -f`: attempt to deliver every queued message now.
    pub fn flush(&self) {
        let output = Command::new(tool("postqueue"))
            .arg("-c")
            .arg(self.config_dir())
            .arg("-f")
            .output()
            .expect("run postqueue");
        assert!(
            output.status.success(),
            "postqueue -f failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The value of a main.cf parameter as this instance sees it.
    pub fn postconf(&self, parameter: &str) -> String {
        let output = Command::new(tool("postconf"))
            .arg("-c")
            .arg(self.config_dir())
            .args(["-h", parameter])
            .output()
            .expect("run postconf");
        assert!(
            output.status.success(),
            "postconf -h {parameter} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned()
    }

    /// The queue and the maillog, for panic messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- queue ({}) ---\n{:?}\n--- maillog ({}) ---\n{}",
            self.queue_dir().display(),
            self.queue(),
            self.maillog_path().display(),
            self.maillog()
        )
    }

    /// Stops the instance (also done by Drop). Afterwards no process of it
    /// is left.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let master = fs::read_to_string(self.queue_dir().join("pid/master.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        let _ = Command::new(tool("postfix"))
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = master {
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_running(pid) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        // Whatever did not exit (a daemon stuck in a delivery, a master
        // that ignored `stop`) is killed.
        for pid in processes_in(&self.queue_dir()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
        if let Some(tmp) = self.tmp.take() {
            if keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the Postfix tree {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

/// One `to=<…>` line of the maillog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The Postfix program that logged it: `virtual`, `smtp`, `error`, …
    pub agent: String,
    pub queue_id: String,
    pub to: String,
    pub orig_to: Option<String>,
    pub relay: String,
    pub dsn: String,
    /// `sent`, `deferred`, `bounced`, `expired`, …
    pub status: String,
    /// The text in parentheses after the status.
    pub text: String,
    pub line: String,
}

impl Delivery {
    /// Parses `… postfix/AGENT[PID]: QUEUEID: to=<…>, [orig_to=<…>, ]relay=…, …, dsn=…, status=WORD (text)`.
    pub fn parse(line: &str) -> Option<Delivery> {
        let to_at = line.find(": to=<")?;
        let head = &line[..to_at];
        let (program, queue_id) = head.rsplit_once(": ")?;
        // `postfix/virtual[123]`, or `postfix/dualroute[123]` with
        // `-o syslog_name=postfix/dualroute`.
        let program = program.rsplit(' ').next()?.split('[').next()?;
        let agent = program.rsplit('/').next()?.to_owned();
        let rest = &line[to_at + ": to=<".len()..];
        let (to, rest) = rest.split_once(">, ")?;
        let (fields, status_part) = rest.split_once("status=")?;
        let (status, text) = match status_part.split_once(' ') {
            Some((status, text)) => (status, text.trim()),
            None => (status_part, ""),
        };
        let text = text
            .strip_prefix('(')
            .and_then(|t| t.strip_suffix(')'))
            .unwrap_or(text);
        let field = |name: &str| {
            fields
                .split(", ")
                .find_map(|f| f.strip_prefix(name))
                .map(|v| v.trim_end_matches(", ").to_owned())
        };
        Some(Delivery {
            agent,
            queue_id: queue_id.trim().to_owned(),
            to: to.to_owned(),
            orig_to: field("orig_to=<").map(|v| v.trim_end_matches('>').to_owned()),
            relay: field("relay=").unwrap_or_default(),
            dsn: field("dsn=").unwrap_or_default(),
            status: status.trim_end_matches(',').to_owned(),
            text: text.to_owned(),
            line: line.to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------
// Maildir
// ---------------------------------------------------------------------------

/// A message file in a Maildir.
#[derive(Clone, Debug)]
pub struct MaildirMessage {
    pub path: PathBuf,
    pub text: String,
}

impl MaildirMessage {
    /// The values of a header field, unfolded, in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        header_values(&self.text, name)
    }
}

/// The messages in a Maildir's `new/` and `cur/`, sorted by file name
/// (delivery time first). A Maildir that does not exist yet is empty: the
/// `virtual` agent creates it on first delivery.
pub fn read_maildir(dir: &Path) -> Vec<MaildirMessage> {
    let mut messages = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(text) = fs::read_to_string(&path) {
                messages.push(MaildirMessage { path, text });
            }
        }
    }
    messages.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
    messages
}

// ---------------------------------------------------------------------------
// smtp-sink
// ---------------------------------------------------------------------------

/// `smtp-sink` on a free loopback port, dumping each message to a file:
/// the "other server" of a test. Route mail to it with a transport entry
/// like `example.com.dualroute.invalid smtp:` + [`SmtpSink::nexthop`].
/// Dropping it kills it.
pub struct SmtpSink {
    child: Child,
    port: u16,
    tmp: Option<tempfile::TempDir>,
    dump_dir: PathBuf,
}

impl SmtpSink {
    /// A sink that accepts everything.
    pub fn start() -> SmtpSink {
        Self::start_with(&[])
    }

    /// A sink that answers every RCPT `550 5.1.1` (so Postfix bounces).
    pub fn start_rejecting() -> SmtpSink {
        // -f implies -p (no PIPELINING); -B sets the hard reject reply.
        Self::start_with(&[
            "-f",
            "RCPT",
            "-B",
            "550 5.1.1 Error: recipient rejected by smtp-sink",
        ])
    }

    fn start_with(args: &[&str]) -> SmtpSink {
        let sink = tool("smtp-sink");
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-sink-")
            .tempdir()
            .expect("create a temporary directory");
        // smtp-sink refuses to run as root without -u, and writes its dumps
        // as that user: nobody must be able to reach and write the dump
        // directory.
        set_mode(tmp.path(), 0o755);
        let dump_dir = tmp.path().join("dumps");
        fs::create_dir(&dump_dir).expect("create the sink dump directory");
        let (uid, gid) = user_ids("nobody");
        chown(&dump_dir, Some(uid), Some(gid)).expect("chown the sink dump directory to nobody");
        let template = format!("{}/%Y%m%d%H%M%S.", dump_dir.display());
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut stderr = tempfile::tempfile().expect("create a temporary file");
            let mut child = Command::new(&sink)
                .args(["-u", "nobody", "-d", &template])
                .args(args)
                .arg(format!("127.0.0.1:{port}"))
                .arg("32")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr.try_clone().expect("clone a file handle"))
                .spawn()
                .unwrap_or_else(|e| panic!("run {}: {e}", sink.display()));
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if is_listening(port) {
                    return SmtpSink {
                        child,
                        port,
                        tmp: Some(tmp),
                        dump_dir,
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let mut message = String::new();
                    let _ = stderr.rewind();
                    let _ = stderr.read_to_string(&mut message);
                    last_error = format!("smtp-sink exited ({status}): {message}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("smtp-sink did not listen on 127.0.0.1:{port} within 5 s");
                }
                std::thread::sleep(POLL);
            }
            if !last_error.contains("in use") {
                break;
            }
        }
        panic!("{last_error}")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port)
    }

    /// `[127.0.0.1]:PORT`, the next hop of a transport entry (bracketed, so
    /// Postfix looks up no MX).
    pub fn nexthop(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }

    /// Where the dump files are.
    pub fn dump_dir(&self) -> &Path {
        &self.dump_dir
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = files_under(&self.dump_dir)
            .into_iter()
            .filter_map(|path| {
                let modified = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
                Some((modified, path))
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, path)| {
                let text = fs::read_to_string(&path).ok()?;
                SinkMessage::parse(path, &text)
            })
            .collect()
    }

    /// Waits until at least `n` messages have arrived and returns them all.
    pub fn wait_messages(&self, n: usize) -> Vec<SinkMessage> {
        poll(|| {
            let messages = self.messages();
            (messages.len() >= n).then_some(messages)
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out after {WAIT:?} waiting for {n} messages at the sink; got {:#?}",
                self.messages()
            )
        })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(tmp) = self.tmp.take() {
            if keep_tmp() {
                eprintln!(
                    "DUALROUTE_KEEP_TMP: kept the smtp-sink dumps {}",
                    tmp.keep().display()
                );
            }
        }
    }
}

/// One message as `smtp-sink` dumped it.
#[derive(Clone, Debug)]
pub struct SinkMessage {
    pub path: PathBuf,
    /// `X-Client-Addr`: who delivered it.
    pub client_addr: String,
    /// `X-Helo-Args`.
    pub helo: Option<String>,
    /// `X-Mail-Args`: `<sender>` and its ESMTP parameters.
    pub mail_args: String,
    /// One per `X-Rcpt-Args`, in the order sent.
    pub rcpts: Vec<SinkRcpt>,
    /// The message as received (header and body), without smtp-sink's own
    /// header block.
    pub text: String,
}

impl SinkMessage {
    fn parse(path: PathBuf, dump: &str) -> Option<SinkMessage> {
        let mut client_addr = None;
        let mut helo = None;
        let mut mail_args = None;
        let mut rcpts = Vec::new();
        let mut lines = dump.split_inclusive('\n');
        // smtp-sink's block ends with its three-line Received: header.
        let mut in_received = false;
        let mut consumed = 0;
        for line in lines.by_ref() {
            let content = line.trim_end_matches(['\r', '\n']);
            if in_received {
                if content.starts_with([' ', '\t']) {
                    consumed += line.len();
                    continue;
                }
                break;
            }
            consumed += line.len();
            if let Some(v) = content.strip_prefix("X-Client-Addr: ") {
                client_addr = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Helo-Args: ") {
                helo = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Mail-Args: ") {
                mail_args = Some(v.to_owned());
            } else if let Some(v) = content.strip_prefix("X-Rcpt-Args: ") {
                rcpts.push(SinkRcpt::parse(v));
            } else if content.starts_with("Received: ") {
                in_received = true;
            }
        }
        if !in_received {
            // Still being written.
            return None;
        }
        let mut text = dump[consumed..].to_owned();
        // smtp-sink appends an empty line after the message.
        if text.ends_with("\n\n") {
            text.pop();
        }
        Some(SinkMessage {
            path,
            client_addr: client_addr?,
            helo,
            mail_args: mail_args?,
            rcpts,
            text,
        })
    }

    /// The envelope sender without angle brackets (empty for `<>`).
    pub fn mail_from(&self) -> String {
        let first = self.mail_args.split_whitespace().next().unwrap_or("");
        first
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned()
    }

    /// The RCPT addresses, in order.
    pub fn rcpt_addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|r| r.address.clone()).collect()
    }

    /// The RCPT for an address (exact match).
    pub fn rcpt(&self, address: &str) -> Option<&SinkRcpt> {
        self.rcpts.iter().find(|r| r.address == address)
    }

    /// The values of a header field of the message, unfolded, in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        header_values(&self.text, name)
    }
}

/// One RCPT command as the sink received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkRcpt {
    /// The address without angle brackets.
    pub address: String,
    /// The ESMTP parameters as sent, e.g. `ORCPT=rfc822;bob@example.com`,
    /// `NOTIFY=SUCCESS,FAILURE`.
    pub params: Vec<String>,
}

impl SinkRcpt {
    fn parse(args: &str) -> SinkRcpt {
        let mut words = args.split_whitespace();
        let address = words
            .next()
            .unwrap_or("")
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned();
        SinkRcpt {
            address,
            params: words.map(str::to_owned).collect(),
        }
    }

    /// The value of an ESMTP parameter (name case-insensitive), as sent.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find_map(|p| {
            let (key, value) = p.split_once('=')?;
            key.eq_ignore_ascii_case(name).then_some(value)
        })
    }

    /// `NOTIFY`, e.g. `SUCCESS,FAILURE` or `NEVER`.
    pub fn notify(&self) -> Option<&str> {
        self.param("NOTIFY")
    }

    /// `ORCPT` with its xtext decoded (RFC 3461 §4), e.g.
    /// `rfc822;bob+news@example.com`.
    pub fn orcpt(&self) -> Option<String> {
        self.param("ORCPT").map(xtext_decode)
    }
}

/// RFC 3461 §4 xtext, for ORCPT values a test sends: `+`, `=`, and bytes
/// outside `!`..`~` become `+XX`. Postfix's smtpd answers an unencoded `+`
/// in ORCPT with `501 5.5.4 Error: Bad ORCPT parameter syntax`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

/// RFC 3461 §4: `+XX` is the byte with hex value XX.
pub fn xtext_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            if let Some(byte) = s
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// SMTP client
// ---------------------------------------------------------------------------

/// One SMTP reply: the code and the text after it (multi-line replies
/// joined with `\n`), e.g. 550 / `5.1.1 <x@example.com>: Recipient address
/// rejected: …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0 when the connection failed or closed instead of a reply; `text`
    /// then says why.
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let valid = parts.len() == 3 && parts.iter().all(|p| p.parse::<u16>().is_ok());
        valid.then_some(first)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Every command a client sent and the reply it got, in order. The first
/// entry is the greeting (command `CONNECT`).
#[derive(Clone, Debug)]
pub struct SmtpTranscript {
    pub server: SocketAddr,
    pub steps: Vec<(String, Reply)>,
}

impl SmtpTranscript {
    /// The reply to the first command that starts with `prefix` (`EHLO`,
    /// `MAIL`, `DATA`, …).
    pub fn reply(&self, prefix: &str) -> Option<&Reply> {
        self.steps
            .iter()
            .find(|(command, _)| command.starts_with(prefix))
            .map(|(_, reply)| reply)
    }

    pub fn greeting(&self) -> &Reply {
        &self.steps[0].1
    }

    /// The reply to MAIL FROM. Panics (with the transcript) when MAIL was
    /// not sent.
    pub fn mail(&self) -> &Reply {
        self.reply("MAIL FROM:")
            .unwrap_or_else(|| panic!("MAIL was not sent:\n{self}"))
    }

    /// The reply to the RCPT for `address` (without angle brackets).
    /// Panics (with the transcript) when there was no such RCPT.
    pub fn rcpt(&self, address: &str) -> &Reply {
        self.rcpts()
            .into_iter()
            .find(|(a, _)| *a == address)
            .map(|(_, reply)| reply)
            .unwrap_or_else(|| panic!("no RCPT for {address}:\n{self}"))
    }

    /// (address, reply) for each RCPT sent.
    pub fn rcpts(&self) -> Vec<(&str, &Reply)> {
        self.steps
            .iter()
            .filter_map(|(command, reply)| {
                let arg = command.strip_prefix("RCPT TO:")?;
                let address = arg.split_whitespace().next().unwrap_or("");
                Some((address.trim_start_matches('<').trim_end_matches('>'), reply))
            })
            .collect()
    }

    /// The reply to the end of the message data (the final `.`): whether
    /// the server took the message. None when DATA was never completed.
    pub fn end_of_data(&self) -> Option<&Reply> {
        self.reply(".")
    }

    /// True when the server took the message (2xx after the final `.`).
    pub fn accepted(&self) -> bool {
        self.end_of_data()
            .is_some_and(|r| (200..300).contains(&r.code))
    }

    /// The queue id from Postfix's `250 2.0.0 Ok: queued as ID`.
    pub fn queue_id(&self) -> Option<String> {
        let text = &self.end_of_data()?.text;
        let id = text.split("queued as ").nth(1)?.split_whitespace().next()?;
        Some(id.to_owned())
    }
}

impl fmt::Display for SmtpTranscript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SMTP transcript with {}:", self.server)?;
        for (command, reply) in &self.steps {
            writeln!(f, "  C: {command}")?;
            for (i, line) in reply.text.split('\n').enumerate() {
                let sep = if i == 0 { ' ' } else { '+' };
                writeln!(f, "  S:{sep}{} {line}", reply.code)?;
            }
        }
        Ok(())
    }
}

/// A one-message-per-connection SMTP client, without pipelining, that
/// records every reply.
#[derive(Clone, Debug)]
pub struct SmtpClient {
    server: SocketAddr,
    local: Option<IpAddr>,
    helo: String,
}

impl SmtpClient {
    pub fn new(server: SocketAddr) -> SmtpClient {
        SmtpClient {
            server,
            local: None,
            helo: "client.dualroute-test.invalid".to_owned(),
        }
    }

    /// Connects from this local address, e.g. [`OUTSIDE_IP`].
    pub fn bind(mut self, ip: IpAddr) -> SmtpClient {
        self.local = Some(ip);
        self
    }

    /// The EHLO argument.
    pub fn helo(mut self, name: &str) -> SmtpClient {
        self.helo = name.to_owned();
        self
    }

    /// Sends one message and returns the transcript. `from` and each of
    /// `rcpts` are an address optionally followed by ESMTP parameters
    /// (`bob@example.com NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com`);
    /// the address gets angle brackets unless it already starts with `<`
    /// (so `<>` and `<@a,@b:x@y>` go out as written); an empty `from` is
    /// `<>`. `message` is the header and body; line ends become CRLF and
    /// lines starting with `.` are dot-stuffed.
    ///
    /// The conversation stops, like a real client's, at a negative reply
    /// to the greeting, EHLO or MAIL; DATA is sent only when a RCPT was
    /// accepted. A closed connection ends it with a reply of code 0.
    /// Panics only when it cannot connect.
    pub fn send(&self, from: &str, rcpts: &[&str], message: &str) -> SmtpTranscript {
        let stream = self.connect();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set a read timeout");
        let mut session = Session {
            reader: BufReader::new(stream.try_clone().expect("clone a TcpStream")),
            writer: stream,
            transcript: SmtpTranscript {
                server: self.server,
                steps: Vec::new(),
            },
        };
        session.run(&self.helo, from, rcpts, message);
        session.transcript
    }

    fn connect(&self) -> TcpStream {
        let result = match self.local {
            None => TcpStream::connect_timeout(&self.server, Duration::from_secs(10)),
            Some(local) => connect_from(local, self.server),
        };
        result.unwrap_or_else(|e| {
            let from = self.local.map(|l| format!(" from {l}")).unwrap_or_default();
            panic!("cannot connect to {}{from}: {e}", self.server)
        })
    }
}

/// Shorthand for `SmtpClient::new(server).send(from, rcpts, message)`.
pub fn send(server: SocketAddr, from: &str, rcpts: &[&str], message: &str) -> SmtpTranscript {
    SmtpClient::new(server).send(from, rcpts, message)
}

/// std cannot bind a socket before connecting; tokio (a dependency of the
/// crate anyway) can. The stream goes back to blocking std afterwards.
fn connect_from(local: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = match local {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local, 0))?;
        let connect = socket.connect(server);
        let stream = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    transcript: SmtpTranscript,
}

impl Session {
    fn run(&mut self, helo: &str, from: &str, rcpts: &[&str], message: &str) {
        if !self.step("CONNECT", None) {
            return self.quit();
        }
        if !self.command(&format!("EHLO {helo}")) {
            return self.quit();
        }
        if !self.command(&format!("MAIL FROM:{}", envelope_arg(from))) {
            return self.quit();
        }
        let mut any_accepted = false;
        for rcpt in rcpts {
            any_accepted |= self.command(&format!("RCPT TO:{}", envelope_arg(rcpt)));
            if self.closed() {
                return;
            }
        }
        if !any_accepted || !self.command("DATA") {
            return self.quit();
        }
        let data = dot_stuff(message);
        self.step(".", Some(data.as_bytes()));
        self.quit();
    }

    /// Sends `command` and records the reply; true when it is positive.
    fn command(&mut self, command: &str) -> bool {
        let line = format!("{command}\r\n");
        self.step(command, Some(line.as_bytes()))
    }

    fn step(&mut self, name: &str, send: Option<&[u8]>) -> bool {
        let reply = match send.map(|bytes| self.writer.write_all(bytes)) {
            Some(Err(e)) => Reply {
                code: 0,
                text: format!("write failed: {e}"),
            },
            _ => read_reply(&mut self.reader),
        };
        let positive = reply.is_positive();
        self.transcript.steps.push((name.to_owned(), reply));
        positive
    }

    fn closed(&self) -> bool {
        self.transcript
            .steps
            .last()
            .is_some_and(|(_, reply)| reply.code == 0 || reply.code == 421)
    }

    fn quit(&mut self) {
        if !self.closed() {
            self.command("QUIT");
        }
    }
}

fn read_reply(reader: &mut impl BufRead) -> Reply {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => {
                lines.push("connection closed by the server".to_owned());
                return Reply {
                    code: 0,
                    text: lines.join("\n"),
                };
            }
            Err(e) => {
                lines.push(format!("read failed: {e}"));
                return Reply {
                    code: 0,
                    text: lines.join("\n"),
                };
            }
            Ok(_) => {}
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Reply {
                code,
                text: lines.join("\n"),
            };
        }
    }
}

/// `addr PARAMS` → `<addr> PARAMS`; `<…>…` as it is; empty → `<>`.
fn envelope_arg(arg: &str) -> String {
    let arg = arg.trim();
    if arg.starts_with('<') {
        return arg.to_owned();
    }
    match arg.split_once(char::is_whitespace) {
        Some((address, params)) => format!("<{address}> {}", params.trim()),
        None => format!("<{arg}>"),
    }
}

/// CRLF line ends, dot-stuffing (RFC 5321 §4.5.2) and the final `.`.
fn dot_stuff(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 16);
    for line in message.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether something listens on TCP `port` on 127.0.0.1 or 0.0.0.0. Reads
/// /proc/net/tcp instead of connecting, so smtpd logs no extra session.
pub fn is_listening(port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok();
    };
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // fields[1] is local_address, fields[3] is st; 0A is LISTEN.
        fields.len() > 3 && wanted.iter().any(|w| w == fields[1]) && fields[3] == "0A"
    })
}

/// The processes whose working directory is `dir` or below it. Postfix
/// daemons chdir to `queue_directory`, so this finds an instance's
/// processes.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cwd = fs::read_link(entry.path().join("cwd")).ok()?;
            cwd.starts_with(dir).then_some(pid)
        })
        .collect()
}

/// Whether a process exists and is not a zombie. A daemonized master is
/// reparented to PID 1, which may take a while to reap it.
fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `PID (comm) STATE …`; comm may contain spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}

/// Polls `probe` every 50 ms for up to [`WAIT`].
pub fn poll<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The values of header field `name` (case-insensitive) in a message's
/// header, unfolded.
fn header_values(text: &str, name: &str) -> Vec<String> {
    let mut values: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        values.extend(current.take());
        if let Some((field, value)) = line.split_once(':') {
            if field.eq_ignore_ascii_case(name) {
                current = Some(value.trim().to_owned());
            }
        }
    }
    values.extend(current);
    values
}

/// Finds a Postfix program in $PATH or /usr/sbin (where Debian puts them,
/// and which a non-login root shell may not have in $PATH).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NOT_INSTALLED} ({name} not found)"))
}

/// uid and gid of a user, via NSS.
fn user_ids(user: &str) -> (u32, u32) {
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("run getent");
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|u| u.parse().ok()),
        fields.get(3).and_then(|g| g.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => (uid, gid),
        _ => panic!("user {user:?} does not exist: {NOT_INSTALLED}"),
    }
}

fn keep_tmp() -> bool {
    std::env::var_os("DUALROUTE_KEEP_TMP").is_some_and(|v| v == "1")
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes a file Postfix reads with load_file(3) (main.cf), with its mtime
/// a minute in the past: Postfix re-reads a file modified within the last
/// second, sleeping 300 ms between reads, until it is older than that (so
/// as not to read a file being edited). A fresh main.cf would cost ~2 s in
/// every Postfix command.
fn write_settled(path: &Path, contents: &str) {
    write(path, contents);
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_modified(past))
        .unwrap_or_else(|e| panic!("set the mtime of {}: {e}", path.display()));
}

/// All regular files below `dir`, recursively (the deferred queue is
/// hashed into subdirectories). Files that vanish while we look are
/// skipped: the queue manager renames them all the time.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(files_under(&entry.path())),
            Ok(kind) if kind.is_file() => found.push(entry.path()),
            _ => {}
        }
    }
    found
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Table types whose source must be compiled with postmap.
fn is_indexed(kind: &str) -> bool {
    matches!(kind, "hash" | "btree" | "cdb" | "lmdb" | "dbm" | "sdbm")
}

/// Rewrites table references `TYPE:NAME` and `TYPE:/etc/postfix/NAME`,
/// NAME one of `map_names`, to `TYPE:CONFIG_DIR/NAME`, and records every
/// (type, file name) referenced. A reference starts after whitespace, `,`,
/// `=` or `{` and ends before whitespace, `,`, `=` or `}`.
fn rewrite_map_refs(
    line: &str,
    config_dir: &Path,
    map_names: &[&str],
    referenced: &mut Vec<(String, String)>,
) -> String {
    let is_start = |c: char| c.is_whitespace() || matches!(c, ',' | '=' | '{');
    let is_end = |c: char| c.is_whitespace() || matches!(c, ',' | '=' | '}');
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    let mut at_start = true;
    while let Some(c) = rest.chars().next() {
        if at_start && !is_start(c) {
            let end = rest.find(is_end).unwrap_or(rest.len());
            let token = &rest[..end];
            out.push_str(&rewrite_token(token, config_dir, map_names, referenced));
            rest = &rest[end..];
            at_start = false;
            continue;
        }
        at_start = is_start(c);
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn rewrite_token(
    token: &str,
    config_dir: &Path,
    map_names: &[&str],
    referenced: &mut Vec<(String, String)>,
) -> String {
    let Some((kind, path)) = token.split_once(':') else {
        return token.to_owned();
    };
    if kind.is_empty()
        || !kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return token.to_owned();
    }
    let file_name = path.rsplit('/').next().unwrap_or(path);
    referenced.push((kind.to_owned(), file_name.to_owned()));
    let bare = path.strip_prefix("/etc/postfix/").unwrap_or(path);
    if map_names.contains(&bare) {
        format!("{kind}:{}", config_dir.join(bare).display())
    } else {
        token.to_owned()
    }
}
