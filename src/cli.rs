//! The command line of `dualroute`, in the library so that the man page and
//! the shell completions are generated from the same definition as `--help`
//! (tests/man_pages.rs fails when the shipped pages drift from it).

use clap::{Parser, Subcommand};
use std::{net::IpAddr, path::PathBuf};

#[derive(Parser)]
#[command(
    name = "dualroute",
    version,
    about = "Split delivery, dual delivery and routing milter for Postfix and Sendmail",
    after_help = "Environment:
  DUALROUTE_LOG  what `run` logs (to stderr, or syslog with --log syslog), as a tracing filter: error, warn, info (default),
                 debug (each recipient's decision), or per module, e.g. info,dualroute=debug.
                 Lines carry no colour unless stderr is a terminal (NO_COLOR turns it off there
                 too) and no timestamp under systemd, whose journal stamps them itself.
  NOTIFY_SOCKET  set by systemd (Type=notify): `run` reports READY after binding the socket
                 and RELOADING/READY around a SIGHUP reload.
  LISTEN_FDS, LISTEN_PID  set by systemd socket activation (a dualroute.socket unit): `run`
                 serves the passed socket instead of binding `listen:`. It must be the socket
                 `listen:` names (same address and port, or the same path); otherwise `run`
                 stops with an error saying both. One socket only.
  DUALROUTE_THREADS  how many threads `run` serves the MTA with: 1 for a single thread,
                 N for a pool of N; unset: one thread (the least CPU per message and
                 the shortest replies in BENCHMARKS.md; a pool only pays off past
                 thousands of messages a second on CPUs busy with other work)."
)]
pub struct Cli {
    /// Configuration file; never one in the current directory: give --config milter.yaml to read that
    #[arg(long, short, global = true, value_name = "FILE", default_value = crate::config::SYSTEM_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the milter (the default)
    Run(RunArgs),
    /// Load and validate the configuration and account sources, print a summary
    Check,
    /// Print the decision for each address and the rule that made it
    Explain {
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
        /// Decide as if the mail came from this client address
        #[arg(long, value_name = "IP")]
        client: Option<IpAddr>,
        /// Decide as if the client authenticated as this user
        #[arg(long, value_name = "USER")]
        auth: Option<String>,
        /// For a recipient a `reject_unknown` domain routes away, ask its destination now (a live callout; the answer is shown, not cached)
        #[arg(long)]
        callout: bool,
    },
    /// Probe the destination of DOMAIN with its `verify` address (EHLO, MAIL FROM:<>, RCPT TO, QUIT)
    Verify {
        domain: String,
        /// Also send a short test message to the verify address
        #[arg(long)]
        send: bool,
    },
    /// DNS checks per domain: MX, SPF covers this server and the destination, the destination resolves, the relay domain does not; exit 1 on any ✘
    Doctor {
        /// A public address of this server [default: the A/AAAA records of `instance`]; repeat for several
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
    },
    /// Show what the running milter runs and the routing state of every domain; exit 0 all routing, 1 something held, refused or not loaded, 2 no milter running or the breaker blind
    Status {
        /// The same report as JSON, for scripts and monitoring
        #[arg(long)]
        json: bool,
    },
    /// Switch routing for DOMAIN back on (clears an admin disable and a breaker trip)
    Enable { domain: String },
    /// Switch routing for DOMAIN off until `enable` (persists across restarts)
    Disable {
        domain: String,
        /// Why, for `status` and the log
        #[arg(long, default_value = "disabled with dualroute disable")]
        reason: String,
    },
    /// Accept the smaller account list of DOMAIN that accounts_shrink_limit refused; the running milter reloads with it within seconds
    ConfirmAccounts { domain: String },
    /// Print the Postfix main.cf/master.cf/map lines this configuration needs, or apply them
    #[command(group(clap::ArgGroup::new("change").args(["apply", "revert"])))]
    PostfixConfig {
        /// Write main.cf.dualroute, master.cf.dualroute and the tables into DIR instead of printing
        #[arg(long, value_name = "DIR", conflicts_with_all = ["apply", "revert"])]
        write: Option<PathBuf>,
        /// Directory the tables live in, as main.cf refers to them [default: the Postfix configuration directory]
        #[arg(long, value_name = "DIR")]
        map_dir: Option<PathBuf>,
        /// Wire Postfix: postconf -e/-M/-P, postmap; merges with existing lists, idempotent, backs up main.cf and master.cf, runs postfix check and reloads a running Postfix
        #[arg(long, conflicts_with = "revert")]
        apply: bool,
        /// Remove exactly what --apply added (recorded in dualroute.applied in the Postfix configuration directory)
        #[arg(long)]
        revert: bool,
        /// With --apply or --revert: print the changes, change nothing
        #[arg(long, requires = "change")]
        dry_run: bool,
        /// The Postfix configuration directory to change, as `postconf -c`
        #[arg(long, value_name = "DIR", default_value = "/etc/postfix")]
        postfix_config_dir: PathBuf,
    },
    /// Print the Sendmail sendmail.mc lines and mailertable entries this configuration needs
    SendmailConfig {
        /// Write sendmail.mc.dualroute and mailertable.dualroute into DIR instead of printing
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

/// Where `run` writes its log.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Where the log goes: stderr (the default; under systemd that is the journal) or syslog, as opendkim and spf-milter do, so that the lines sit beside Postfix's in mail.log
    #[arg(long = "log", value_enum, default_value_t = LogTo::Stderr)]
    pub log: LogTo,
    /// With --log syslog: the facility
    #[arg(long, value_enum, default_value_t = crate::logging::Facility::Mail, value_name = "FACILITY")]
    pub syslog_facility: crate::logging::Facility,
    /// With --log syslog: the syslog daemon's socket
    #[arg(long, default_value = "/dev/log", value_name = "PATH")]
    pub syslog_socket: PathBuf,
}

/// `--log`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum LogTo {
    #[default]
    Stderr,
    Syslog,
}

/// What `dualroute` without a subcommand runs: the defaults above.
impl Default for RunArgs {
    fn default() -> RunArgs {
        RunArgs {
            log: LogTo::Stderr,
            syslog_facility: crate::logging::Facility::Mail,
            syslog_socket: PathBuf::from("/dev/log"),
        }
    }
}
