//! A private Postfix instance per test: its own config, queue, data and
//! Maildir directories in a temporary tree, smtpd on a free loopback port,
//! logging to a file. See `mod.rs` for how tests use it.
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

use super::{
    files_under, header_values, keep_tmp, poll, ports, set_mode, tool, user_ids, write, POLL, WAIT,
};
use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Our own host name; nothing resolves it (`.invalid`, RFC 2606).
pub const MYHOSTNAME: &str = "mx.dualroute-test.invalid";

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
    /// client connecting from [`super::OUTSIDE_IP`] is an outside client.
    pub mynetworks: String,
    /// `smtpd_milters`, e.g. `inet:127.0.0.1:8899`. None: no milter.
    pub milter: Option<String>,
    /// `milter_default_action` when a milter is set. Default `tempfail`
    /// (docs/design.md §8).
    pub milter_default_action: String,
    /// Lines appended to main.cf after the harness's own (a later line
    /// overrides an earlier one for the same parameter).
    pub main_cf: Vec<String>,
    /// Lines appended to master.cf.
    pub master_cf: Vec<String>,
    /// master.cf lines of services on a port of their own, `127.0.0.1:PORT`
    /// standing for a port the harness chooses (see
    /// [`PostfixOptions::master_cf_on_a_port`]).
    pub port_services: Vec<String>,
    /// Map source files written into the config directory: (file name,
    /// contents). In main.cf and master.cf lines, a table reference to one
    /// of them by bare file name (`hash:dualroute_transport`) or under
    /// `/etc/postfix/` (what `dualroute postfix-config` prints) is
    /// rewritten to the config directory; `$config_directory/NAME` works as
    /// it is. Maps referenced as `hash:` or `btree:` are `postmap`ed.
    pub extra_maps: Vec<(String, String)>,
    /// Run smtpd chrooted in the queue directory, as Debian ships it: a
    /// unix milter socket is then named relative to the queue directory.
    pub chroot_smtpd: bool,
    /// Directories bind-mounted into the queue directory (source, path
    /// relative to the queue directory), so that a chrooted smtpd reaches
    /// a socket outside this instance's tree (the Debian package's
    /// /var/spool/postfix/dualroute) under the name it has on a real
    /// system. Unmounted when the instance stops.
    pub bind_into_queue: Vec<(PathBuf, String)>,
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
            port_services: Vec::new(),
            extra_maps: Vec::new(),
            chroot_smtpd: false,
            bind_into_queue: Vec::new(),
        }
    }
}

impl PostfixOptions {
    /// A virtual mailbox domain with a Maildir for each account and a
    /// catch-all `@domain` Maildir. The catch-all makes Postfix accept
    /// every address of the domain, as a `split` or `route` domain needs
    /// (docs/design.md §8); read it with `maildir_messages("@domain")`.
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

    /// Appends a master.cf line for a service on its own port, written
    /// `127.0.0.1:PORT`: the harness puts in a port, chosen with smtpd's
    /// (and chosen again when master cannot bind it); read it with
    /// [`Postfix::service_ports`], in the order of these calls.
    pub fn master_cf_on_a_port(mut self, line: &str) -> Self {
        assert!(
            line.contains("127.0.0.1:PORT"),
            "{line:?} has no 127.0.0.1:PORT"
        );
        self.port_services.push(line.to_owned());
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

    /// smtpd runs chrooted in the queue directory, with `source`
    /// bind-mounted at QUEUE_DIRECTORY/`rel` (e.g. the Debian package's
    /// socket directory at `dualroute`, which smtpd then reaches as
    /// `unix:/dualroute/dualroute.sock`). Needs root (mount).
    pub fn chroot_with(mut self, source: &Path, rel: &str) -> Self {
        self.chroot_smtpd = true;
        self.bind_into_queue
            .push((source.to_owned(), rel.to_owned()));
        self
    }

    /// Sets `smtpd_milters`.
    pub fn milter(mut self, socket: &str) -> Self {
        self.milter = Some(socket.to_owned());
        self
    }

    /// Sets `non_smtpd_milters`: mail submitted with the `sendmail`
    /// command ([`Postfix::sendmail`]) passes through pickup and cleanup,
    /// which run these milters (MILTER_README, "non-SMTP mail").
    pub fn non_smtpd_milters(self, socket: &str) -> Self {
        self.main_cf(&format!("non_smtpd_milters = {socket}"))
    }
}

/// A running private Postfix instance. Dropping it stops the instance and
/// kills whatever is left of it.
pub struct Postfix {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    /// The ports of [`PostfixOptions::master_cf_on_a_port`]'s services.
    service_ports: Vec<u16>,
    mailboxes: BTreeMap<String, String>,
    running: bool,
    /// Bind mounts inside the queue directory, unmounted on stop.
    mounts: Vec<PathBuf>,
}

impl Postfix {
    /// Writes the configuration, starts the instance and waits until its
    /// smtpd listens. Panics with Postfix's own words (and the maillog) when
    /// it does not start.
    pub fn start(opts: PostfixOptions) -> Postfix {
        for tool_name in ["postfix", "postmap", "postqueue", "postconf", "smtp-sink"] {
            tool(tool_name);
        }
        // master binds smtpd's port (and the services' ports) itself: when
        // another process has one of them, start again on others.
        ports::start_on_ports("Postfix", 1 + opts.port_services.len(), |chosen| {
            Self::try_start(&opts, chosen)
        })
    }

    /// Starts the instance on `chosen` ports (smtpd's, then the
    /// services'); `Err` when one of them is taken.
    fn try_start(opts: &PostfixOptions, chosen: &[u16]) -> Result<Postfix, String> {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-postfix-")
            .tempdir()
            .expect("create a temporary directory");
        let root = tmp.path().to_path_buf();
        let mut postfix = Postfix {
            tmp: Some(tmp),
            root,
            port: chosen[0],
            service_ports: chosen[1..].to_vec(),
            mailboxes: opts.mailboxes.iter().cloned().collect(),
            running: false,
            mounts: Vec::new(),
        };
        postfix.write_tree(opts);
        // From here on, Drop unmounts what was mounted.
        postfix.running = true;
        for (source, rel) in &opts.bind_into_queue {
            let target = postfix.queue_dir().join(rel);
            fs::create_dir_all(&target)
                .unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
            let status = Command::new("mount")
                .arg("--bind")
                .arg(source)
                .arg(&target)
                .status()
                .expect("run mount");
            assert!(
                status.success(),
                "mount --bind {} {} failed (needs root)",
                source.display(),
                target.display()
            );
            postfix.mounts.push(target);
        }
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
        const IN_USE: &str = "Address already in use";
        if !output.status.success() {
            let error = format!(
                "Postfix did not start ({}): {command}\n{}\n--- maillog ---\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim_end(),
                postfix.maillog()
            );
            if error.contains(IN_USE) {
                return Err(error);
            }
            panic!("{error}");
        }
        // Bound by this instance's master (its cwd is the queue
        // directory), not merely "something listens there".
        let deadline = started + Duration::from_secs(10);
        let queue = postfix.queue_dir();
        for &port in chosen {
            let within = deadline.saturating_duration_since(Instant::now());
            let bound = ports::wait_bound(
                port,
                within,
                || processes_in(&queue),
                || {
                    let log = postfix.maillog();
                    log.contains(IN_USE).then(|| format!("{IN_USE}:\n{log}"))
                },
            );
            match bound {
                Ok(()) => {}
                Err(ports::NotBound::Taken(why)) => return Err(why),
                Err(ports::NotBound::TimedOut) => panic!(
                    "Postfix started but nothing listens on 127.0.0.1:{port}\n--- maillog ---\n{}",
                    postfix.maillog()
                ),
            }
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
        let services = opts
            .port_services
            .iter()
            .zip(&self.service_ports)
            .map(|(line, port)| line.replace("127.0.0.1:PORT", &format!("127.0.0.1:{port}")));
        let master_extra: Vec<String> = opts
            .master_cf
            .iter()
            .cloned()
            .chain(services)
            .map(|line| rewrite_map_refs(&line, &etc, &map_names, &mut referenced))
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
127.0.0.1:{port} inet n - {chroot} - - smtpd
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
            chroot = if opts.chroot_smtpd { "y" } else { "n" },
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

    /// The ports of the services of [`PostfixOptions::master_cf_on_a_port`],
    /// in order.
    pub fn service_ports(&self) -> &[u16] {
        &self.service_ports
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
        self.unmount();
    }

    /// Unmounts the bind mounts. One that stays mounted (busy) is
    /// detached lazily; if even that fails, the temporary tree is kept so
    /// that removing it cannot delete the mounted directory's contents.
    fn unmount(&mut self) {
        for target in std::mem::take(&mut self.mounts) {
            let ok = Command::new("umount")
                .arg(&target)
                .status()
                .is_ok_and(|s| s.success())
                || Command::new("umount")
                    .arg("-l")
                    .arg(&target)
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                if let Some(tmp) = self.tmp.take() {
                    eprintln!(
                        "cannot unmount {}: kept {} (remove it by hand after umount)",
                        target.display(),
                        tmp.keep().display()
                    );
                }
            }
        }
    }

    /// Submits `message` with Postfix's own `sendmail` command into this
    /// instance (`-C` names its configuration directory; postdrop writes
    /// to its maildrop, pickup hands it to cleanup): local submission, as
    /// cron or a web application does it. `args` are sendmail's
    /// arguments (`-f SENDER`, recipients). Returns the command's output.
    pub fn sendmail(&self, args: &[&str], message: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = Command::new(tool("sendmail"))
            .arg("-C")
            .arg(self.config_dir())
            .arg("-i")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run Postfix's sendmail");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(message.as_bytes())
                .expect("write the message to sendmail");
        }
        child.wait_with_output().expect("wait for sendmail")
    }

    /// Wakes pickup now (`postkick public pickup W`) instead of at its
    /// next 60 s timer: it then reads the maildrop again, including
    /// messages cleanup refused for now.
    pub fn wake_pickup(&self) {
        let output = Command::new(tool("postkick"))
            .arg("-c")
            .arg(self.config_dir())
            .args(["public", "pickup", "W"])
            .output()
            .expect("run postkick");
        assert!(
            output.status.success(),
            "postkick public pickup W failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
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
