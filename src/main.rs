//! The `dualroute` command: parses options, loads the configuration, binds
//! the socket, handles signals and hands over to the library.

use clap::Parser;
use dualroute::cli::{Cli, Command};
use dualroute::{commands, config, decision::Envelope};
use std::{path::PathBuf, process::ExitCode};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref());
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => return run(path),
        Command::Check => commands::check(&path),
        Command::Verify { domain, send } => commands::verify(&path, &domain, send),
        Command::Doctor { ips } => commands::doctor(&path, &ips),
        Command::Status => commands::status(&path),
        Command::Enable { domain } => commands::switch(&path, &domain, None),
        Command::Disable { domain, reason } => commands::switch(&path, &domain, Some(&reason)),
        Command::PostfixConfig { write, map_dir } => {
            commands::postfix_config(&path, write.as_deref(), &map_dir)
        }
        Command::Explain {
            addresses,
            client,
            auth,
        } => commands::explain(&path, &addresses, &Envelope { client, auth }),
    };
    result.unwrap_or_else(fail)
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("dualroute: {e}");
    ExitCode::FAILURE
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
    tokio::spawn(dualroute::state_loop(
        shared.clone(),
        std::time::Duration::from_secs(2),
    ));
    tokio::spawn(dualroute::watch_accounts(
        shared.clone(),
        path.clone(),
        std::time::Duration::from_secs(2),
    ));
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
        config::Socket::Inet { host, port } => {
            match TcpListener::bind((host.as_str(), *port)).await {
                Ok(l) => {
                    info!(
                        "dualroute {} listening on {listen}",
                        env!("CARGO_PKG_VERSION")
                    );
                    dualroute::run(l, shared, shutdown).await
                }
                Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
            }
        }
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
                    if let Err(e) =
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))
                    {
                        error!("cannot chmod {}: {e}", p.display());
                    }
                    info!(
                        "dualroute {} listening on {listen}",
                        env!("CARGO_PKG_VERSION")
                    );
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
