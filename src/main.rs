//! The `dualroute` command: parses options, loads the configuration, binds
//! the socket, handles signals and hands over to the library.

use clap::{Parser, Subcommand};
use dualroute::{config, decision::Envelope, explain::explain};
use std::{net::IpAddr, path::PathBuf, process::ExitCode};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "dualroute", version, about = "Split delivery, dual delivery and routing milter for Postfix and Sendmail")]
struct Cli {
    /// Configuration file [default: ./milter.yaml, then /etc/dualroute/milter.yaml]
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the milter (the default)
    Run,
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
    /// Show the routing state of every domain: active, waiting for verification, tripped, disabled
    Status,
    /// Switch routing for DOMAIN back on (clears an admin disable and a breaker trip)
    Enable { domain: String },
    /// Switch routing for DOMAIN off until `enable` (persists across restarts)
    Disable {
        domain: String,
        /// Why, for `status` and the log
        #[arg(long, default_value = "disabled with dualroute disable")]
        reason: String,
    },
    /// Print the Postfix main.cf/master.cf/map lines this configuration needs
    PostfixConfig {
        /// Write main.cf.dualroute, master.cf.dualroute and the tables into DIR instead of printing
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        /// Directory the tables will live in, as main.cf refers to them
        #[arg(long, value_name = "DIR", default_value = "/etc/postfix")]
        map_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref());
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(path),
        Command::Check => check(path),
        Command::Verify { domain, send } => verify(path, &domain, send),
        Command::Doctor { ips } => doctor(path, &ips),
        Command::Status => status(path),
        Command::Enable { domain } => switch(path, &domain, None),
        Command::Disable { domain, reason } => switch(path, &domain, Some(&reason)),
        Command::PostfixConfig { write, map_dir } => {
            let policy = match dualroute::load_policy(&path) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let pf = dualroute::postfix::generate(&policy, &map_dir);
            match write {
                None => print!("{}", pf.render(&map_dir)),
                Some(dir) => match pf.write(&dir) {
                    Ok(files) => {
                        for f in files {
                            println!("{}", dir.join(f).display());
                        }
                        for n in &pf.notes {
                            eprintln!("NOTE: {n}");
                        }
                    }
                    Err(e) => return fail(format!("cannot write {}: {e}", dir.display())),
                },
            }
            ExitCode::SUCCESS
        }
        Command::Explain { addresses, client, auth } => {
            let policy = match dualroute::load_policy(&path) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let envelope = Envelope { client, auth };
            for a in addresses {
                println!("{}", explain(&policy, &envelope, &a));
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("dualroute: {e}");
    ExitCode::FAILURE
}

fn doctor(path: PathBuf, ips: &[IpAddr]) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let dns = match dualroute::dns::Dns::new(&policy.config.dns) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let report = runtime.block_on(dualroute::doctor::diagnose(&policy, ips, &dns));
    println!("{report}");
    if report.problems() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn status(path: PathBuf) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let dir = dualroute::state::StateDir::new(&policy.config.state_dir);
    let mut names: Vec<&String> = policy.domains.keys().collect();
    names.sort();
    let mut ok = true;
    for name in names {
        let d = &policy.domains[name];
        let st = match dir.load(name) {
            Ok(s) => s,
            Err(e) => {
                ok = false;
                println!("{name}: ERROR: {e} (routing is off until the file is fixed or removed)");
                continue;
            }
        };
        let mode = d.config.mode;
        let line = if !d.config.enabled {
            "transparent (enabled: false in the configuration)".to_owned()
        } else if let Some(x) = &st.disabled {
            format!("DISABLED by an administrator since {}: {}", dualroute::state::when(x.since), x.reason)
        } else if let Some(t) = &st.tripped {
            format!(
                "TRIPPED by the bounce breaker since {}: {} permanent failures within {}s; last: {}",
                dualroute::state::when(t.since),
                t.bounces,
                t.window_secs,
                t.last
            )
        } else if let Some(addr) = &d.config.verify {
            match &st.verification {
                Some(v) if v.passed => format!("active (verified {}: {})", dualroute::state::when(v.at), v.detail),
                Some(v) => format!("WAITING for verification of {addr}; last probe {}: {}", dualroute::state::when(v.at), v.detail),
                None => format!("WAITING for verification of {addr}; no probe yet"),
            }
        } else {
            "active".to_owned()
        };
        println!("{name}: mode {mode}: {line}");
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn switch(path: PathBuf, domain: &str, disable: Option<&str>) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let name = dualroute::address::normalize_domain(domain).unwrap_or_else(|_| domain.to_owned());
    if !policy.domains.contains_key(&name) {
        return fail(format!("{domain} is not a managed domain in {}", path.display()));
    }
    let dir = dualroute::state::StateDir::new(&policy.config.state_dir);
    match disable {
        Some(reason) => match dir.disable(&name, reason) {
            Ok(()) => println!("{name}: routing disabled; the running milter follows within seconds"),
            Err(e) => return fail(format!("cannot write {}: {e}", dir.dir.display())),
        },
        None => match dir.enable(&name) {
            Ok((was_disabled, was_tripped)) => {
                let what = match (was_disabled, was_tripped) {
                    (false, false) => "was not disabled or tripped",
                    (true, false) => "admin disable cleared",
                    (false, true) => "breaker trip cleared",
                    (true, true) => "admin disable and breaker trip cleared",
                };
                println!("{name}: routing enabled ({what}); the running milter follows within seconds");
            }
            Err(e) => return fail(format!("cannot write {}: {e}", dir.dir.display())),
        },
    }
    ExitCode::SUCCESS
}

fn verify(path: PathBuf, domain: &str, send: bool) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let name = dualroute::address::normalize_domain(domain).unwrap_or_else(|_| domain.to_owned());
    let Some(d) = policy.domains.get(&name) else {
        return fail(format!("{domain} is not a managed domain in {}", path.display()));
    };
    let Some(rcpt) = &d.config.verify else {
        return fail(format!("{name} has no `verify:` address to probe"));
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let rcpt = rcpt.to_string();
    let result = runtime.block_on(dualroute::probe::verify(
        &d.config.destination,
        &policy.config.dns,
        &policy.config.instance,
        &rcpt,
        dualroute::probe::STEP_TIMEOUT,
        send,
    ));
    match result {
        Err(e) => fail(format!("{name}: cannot find the destination's hosts: {e}")),
        Ok(reports) => {
            for r in &reports {
                println!("{r}");
            }
            if reports.iter().any(|r| r.accepted) {
                println!("{name}: verified: the destination accepts {rcpt}");
                ExitCode::SUCCESS
            } else {
                println!("{name}: NOT verified: no host accepted {rcpt}");
                ExitCode::FAILURE
            }
        }
    }
}

fn check(path: PathBuf) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let c = &policy.config;
    println!("{}: OK", path.display());
    println!("listen {}, instance {}, relay suffix {}", c.listen, c.instance, c.relay_suffix);
    if !c.gateways.is_empty() {
        let g: Vec<String> = c.gateways.iter().map(ToString::to_string).collect();
        println!("gateways: {}", g.join(", "));
    }
    for name in c.domains.keys() {
        let Some(d) = policy.domains.get(&name.0) else { continue };
        let dest = match &d.config.destination {
            config::Destination::Hosts(h) => {
                let h: Vec<String> = h.iter().map(ToString::to_string).collect();
                format!("hosts {}", h.join(", "))
            }
            config::Destination::Domain { domain, change_envelope } => {
                format!("domain {domain}{}", if *change_envelope { " (change_envelope)" } else { "" })
            }
        };
        let via = d.relay_domain(&c.relay_suffix.0).map(|r| format!(" via {r}")).unwrap_or_default();
        let accounts = match &d.accounts {
            Some(a) => format!(
                "{} accounts ({} entries of other domains ignored, {} map keys not accounts)",
                a.len(),
                d.report.other_domains,
                d.report.not_accounts
            ),
            None => "no accounts".into(),
        };
        println!(
            "{name}: mode {}{}, destination {dest}{via}; {accounts}; {} per-user rules{}",
            d.config.mode,
            if d.config.enabled { "" } else { " (enabled: false)" },
            d.users.len(),
            if d.config.require_gateway { "; require_gateway" } else { "" },
        );
    }
    ExitCode::SUCCESS
}

fn run(path: PathBuf) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DUALROUTE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(serve(path))
}

async fn serve(path: PathBuf) -> ExitCode {
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let listen = policy.config.listen.clone();
    let shared = dualroute::share(policy);
    tokio::spawn(dualroute::verify_loop(shared.clone()));
    tokio::spawn(dualroute::state_loop(shared.clone(), std::time::Duration::from_secs(2)));
    tokio::spawn(dualroute::watch_accounts(shared.clone(), path.clone(), std::time::Duration::from_secs(2)));
    // The bounce breaker (DESIGN.md §7) idles while there is no `breaker:`,
    // and follows reloads that add, change or remove it.
    tokio::spawn(dualroute::breaker::run(shared.clone()));
    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => return fail("cannot install signal handlers"),
    };
    let (reload_shared, reload_path) = (shared.clone(), path.clone());
    tokio::spawn(async move {
        // SIGHUP: reload configuration and accounts atomically.
        while hup.recv().await.is_some() {
            match dualroute::reload(&reload_shared, &reload_path).await {
                Ok(()) => info!("SIGHUP: reloaded {}", reload_path.display()),
                Err(e) => error!("SIGHUP: reload failed, keeping the running configuration: {e}"),
            }
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    };
    let result = match &listen {
        config::Socket::Inet { host, port } => match TcpListener::bind((host.as_str(), *port)).await {
            Ok(l) => {
                info!("dualroute {} listening on {listen}", env!("CARGO_PKG_VERSION"));
                dualroute::run(l, shared, shutdown).await
            }
            Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
        },
        config::Socket::Unix(p) => {
            // A socket file left by a killed instance would make bind fail.
            if std::fs::symlink_metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(p);
            }
            match UnixListener::bind(p) {
                Ok(l) => {
                    // The MTA runs as another user (postfix): let it connect;
                    // access is controlled by the directory's permissions.
                    use std::os::unix::fs::PermissionsExt;
                    if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)) {
                        error!("cannot chmod {}: {e}", p.display());
                    }
                    info!("dualroute {} listening on {listen}", env!("CARGO_PKG_VERSION"));
                    let r = dualroute::run(l, shared, shutdown).await;
                    let _ = std::fs::remove_file(p);
                    r
                }
                Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
