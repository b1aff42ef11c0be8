//! The `dualroute` command: parses options, loads the configuration, binds
//! the socket, turns signals into requests on a [`dualroute::Control`] and
//! hands over to [`dualroute::run`], which owns every task of the running
//! milter (src/service/).

use clap::Parser;
use dualroute::cli::{Cli, Command};
use dualroute::systemd::notify;
use dualroute::{commands, config, decision::Envelope};
use dualroute::{Control, Intervals, Start};
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

mod allocator;

/// mimalloc for small blocks, glibc for large ones (src/allocator.rs: 27k to
/// 36k fewer instructions per conversation than glibc alone, issue 22).
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config;
    let command = cli
        .command
        .unwrap_or_else(|| Command::Run(Default::default()));
    if !matches!(command, Command::Run(_)) {
        // Which file, before anything is read or changed (docs/design.md
        // §6): a checkout's example milter.yaml once wired a real Postfix
        // unseen. On stderr: postfix-config's stdout goes into main.cf.
        // `run` logs it (`serve`).
        eprintln!("dualroute: configuration {}", path.display());
        end_quietly_on_closed_stdout();
    }
    let result = match command {
        Command::Run(args) => return run(path, &args),
        Command::Check => commands::check(&path),
        Command::Verify { domain, send } => commands::verify(&path, &domain, send),
        Command::Doctor { ips } => commands::doctor(&path, &ips),
        Command::Status { json } => dualroute::status::status(&path, json),
        Command::Enable { domain } => commands::switch(&path, &domain, None),
        Command::Disable { domain, reason } => commands::switch(&path, &domain, Some(&reason)),
        Command::ConfirmAccounts { domain } => commands::confirm_accounts(&path, &domain),
        Command::PostfixConfig {
            write,
            map_dir,
            apply,
            revert,
            dry_run,
            postfix_config_dir,
        } => {
            let map_dir = map_dir.unwrap_or_else(|| postfix_config_dir.clone());
            match (apply, revert) {
                (false, false) => {
                    commands::postfix_config(&path, write.as_deref(), &map_dir, &postfix_config_dir)
                }
                _ => commands::postfix_apply(&path, &postfix_config_dir, &map_dir, revert, dry_run),
            }
        }
        Command::SendmailConfig { write } => commands::sendmail_config(&path, write.as_deref()),
        Command::Explain {
            addresses,
            client,
            auth,
            callout,
        } => commands::explain(&path, &addresses, &Envelope { client, auth }, callout),
    };
    result.unwrap_or_else(|e| fail(missing_default(&path, e)))
}

/// `dualroute status | head -1`: the reader is gone, and Rust's `println!`
/// panics on EPIPE because the runtime ignores SIGPIPE. A command-line
/// tool whose reader is gone ends as other Unix tools do, by SIGPIPE,
/// which shells do not report in a pipeline (issue 25). SIGPIPE itself
/// stays ignored: with its default action, a peer that closes a socket
/// or a child's pipe (`verify`'s SMTP, `--apply`'s postmap) would kill the
/// command without a word.
fn end_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let epipe = format!("(os error {})", libc::EPIPE);
        // payload_as_str() is Rust 1.88; rust-version is 1.85.
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        let closed = message
            .is_some_and(|m| m.starts_with("failed printing to stdout") && m.ends_with(&epipe));
        if closed {
            // SAFETY: signal(2) and raise(3) with constants; nothing else
            // runs: the process ends here.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(128 + libc::SIGPIPE);
        }
        default(info)
    }));
}

/// An error on the default file when it does not exist also says how to
/// read another: from a source checkout, `--config milter.yaml`.
fn missing_default(path: &Path, e: impl std::fmt::Display) -> String {
    if path == Path::new(config::SYSTEM_CONFIG) && !path.exists() {
        format!("{e}; it is the default configuration file: give another with --config FILE")
    } else {
        e.to_string()
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("dualroute: {e}");
    ExitCode::FAILURE
}

fn run(path: PathBuf, args: &dualroute::cli::RunArgs) -> ExitCode {
    match args.log {
        dualroute::cli::LogTo::Stderr => dualroute::logging::init(),
        dualroute::cli::LogTo::Syslog => {
            dualroute::logging::init_syslog(args.syslog_facility, &args.syslog_socket)
        }
    }
    // One thread unless DUALROUTE_THREADS says otherwise (src/runtime.rs).
    let runtime = match dualroute::runtime::from_env() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    runtime.block_on(serve(path))
}

/// A bound listening socket of either kind; a unix socket we bound
/// ourselves comes with the file to remove on exit.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, Option<dualroute::socket::SocketFile>),
}

/// The socket a service manager passed (systemd socket activation; it must
/// be the one `listen:` names, src/socket.rs), else `listen:` bound here.
async fn listen(listen: &config::Socket) -> Result<Listener, String> {
    let inherited = dualroute::socket::inherited(listen).map_err(|e| e.to_string())?;
    if let Some(socket) = inherited {
        info!("{listen}: the socket passed by the service manager (LISTEN_FDS)");
        let listener = match socket {
            dualroute::socket::Inherited::Tcp(l) => l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map(Listener::Tcp),
            // The service manager created the file and removes it.
            dualroute::socket::Inherited::Unix(l) => l
                .set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(l))
                .map(|l| Listener::Unix(l, None)),
        };
        return listener.map_err(|e| format!("cannot serve the socket passed for {listen}: {e}"));
    }
    match listen {
        config::Socket::Inet { host, port } => TcpListener::bind((host.as_str(), *port))
            .await
            .map(Listener::Tcp)
            .map_err(|e| format!("cannot listen on {listen}: {e}")),
        config::Socket::Unix(p) => {
            let bound = dualroute::socket::bind(p).map_err(|e| e.to_string())?;
            bound
                .listener
                .set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(bound.listener))
                .map(|l| Listener::Unix(l, Some(bound.file)))
                .map_err(|e| format!("cannot listen on {listen}: {e}"))
        }
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    // Handlers first: whoever sees the socket accept (systemd, logrotate,
    // an admin) may signal us at once, even while the accounts load. A
    // SIGTERM or SIGHUP that comes early is kept and acted on when the
    // milter serves, instead of killing it (docs/design.md, "Signals").
    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => return fail("cannot install signal handlers"),
    };
    info!("configuration {}", path.display());
    let policy = match dualroute::load_policy(&path) {
        Ok(p) => p,
        Err(e) => return fail(missing_default(&path, e)),
    };
    // Bind before anything runs: a second instance must stop here.
    let listener = match listen(&policy.config.listen).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let (control, requests) = dualroute::control();
    // SIGHUP: reload configuration and accounts. Signals that come while
    // one reload runs are one notification (tokio's signal stream), so
    // they make one reload after it.
    let sighup = (control.clone(), path.clone());
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            on_sighup(&sighup.0, &sighup.1).await;
        }
    });
    let start = Start {
        config_path: path,
        policy,
        intervals: Intervals::default(),
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        notify(&[sd_notify::NotifyState::Stopping]);
    };
    let result = match listener {
        Listener::Tcp(l) => dualroute::run(l, start, requests, shutdown).await,
        Listener::Unix(l, file) => {
            let r = dualroute::run(l, start, requests, shutdown).await;
            if let Some(file) = file {
                file.remove_if_ours();
            }
            r
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// A reload asked for by SIGHUP. systemd (ExecReload) waits for READY=1
/// after RELOADING=1, stamped with the monotonic clock (sd_notify(3)).
async fn on_sighup(control: &Control, path: &Path) {
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    notify(&reloading);
    match control.reload().await {
        Ok(()) => info!("SIGHUP: reloaded {}", path.display()),
        Err(e) => error!("SIGHUP: reload failed, keeping the running configuration: {e}"),
    }
    notify(&[sd_notify::NotifyState::Ready]);
}
