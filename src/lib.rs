//! dualroute: a milter that gives a self-hosted mail server split delivery,
//! dual delivery, routing and per-user copy/redirect rules during a mail
//! migration. See DESIGN.md for the contract and README.md for use.
//!
//! The decision for a recipient is the pure function [`decision::decide`];
//! everything else is a shell around it: [`milter`] for the protocol,
//! [`explain`] for the command line.

pub mod accounts;
pub mod address;
pub mod config;
pub mod decision;
pub mod explain;
pub mod milter;
pub mod policy;
pub mod postfix;
pub mod session;

use policy::{Policy, SharedPolicy};
use std::{future::Future, io, path::Path, sync::Arc};

/// Anything that stops a configuration from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Accounts(#[from] accounts::LoadError),
}

/// Reads `milter.yaml` and every account source it names.
pub fn load_policy(path: &Path) -> Result<Policy, LoadError> {
    let config = config::read_file(path)?;
    Ok(Policy::load(config)?)
}

/// Wraps a policy for sharing between the milter and the reload task.
pub fn share(policy: Policy) -> SharedPolicy {
    Arc::new(std::sync::RwLock::new(Arc::new(policy)))
}

/// Re-reads the configuration; on error the running policy stays in force
/// (DESIGN.md §5: a reload with an invalid file keeps the running policy).
pub async fn reload(shared: &SharedPolicy, path: &Path) -> Result<(), LoadError> {
    let path = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || load_policy(&path))
        .await
        .unwrap_or_else(|e| Err(LoadError::Config(config::ConfigError {
            file: String::new(),
            line: None,
            column: None,
            message: format!("reload task failed: {e}"),
        })))?;
    let new = Arc::new(loaded);
    match shared.write() {
        Ok(mut guard) => *guard = new,
        Err(poisoned) => *poisoned.into_inner() = new,
    }
    Ok(())
}

/// Serves the milter on `listener` until `shutdown` completes.
pub async fn run(
    listener: impl indymilter::Listener,
    policy: SharedPolicy,
    shutdown: impl Future,
) -> io::Result<()> {
    // libmilter's idle timeout (7210 s) is kept: Postfix and Sendmail hold
    // the milter connection for the whole SMTP session, idle or not.
    let config = indymilter::Config { max_connections: 1000, ..Default::default() };
    indymilter::run(listener, milter::callbacks(policy), config, shutdown).await
}
