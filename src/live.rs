//! The policy in force, as the milter and the service's tasks read it, and
//! the handle through which they ask for a change.
//!
//! A low floor: it knows the policy and the holds, and nothing that runs.
//! The policy is immutable and replaced whole (docs/design.md §7
//! "Reload"); a message keeps the `Arc` it took at MAIL FROM. One task,
//! the reload actor (src/service/actor.rs), installs policies and holds;
//! everything else reads, and asks the actor through an [`Installer`]
//! (docs/design.md "One writer").

use crate::policy::Policy;
use crate::{accounts, config};
use std::path::Path;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// The policy in force now, shared by handle.
#[derive(Debug)]
pub struct LivePolicy(RwLock<Arc<Policy>>);

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy(RwLock::new(Arc::new(policy)))
    }

    /// The policy in force now. A poisoned lock still holds a complete
    /// policy (it is only ever replaced whole), so it is used rather than
    /// failing.
    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `policy` in force. Only the reload actor calls it
    /// (src/service/actor.rs).
    pub(crate) fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

/// Anything that stops a configuration from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Accounts(#[from] accounts::LoadError),
    /// A reload that loaded fine but would shrink a domain's accounts past
    /// `accounts_shrink_limit`.
    #[error("{0}")]
    Shrink(String),
    /// The reload was asked of a service that has stopped (or stopped
    /// before it could answer); nothing was installed.
    #[error("the service is not running: nothing was reloaded")]
    Stopped,
}

/// Reads `milter.yaml` and every account source it names.
pub fn load_policy(path: &Path) -> Result<Policy, LoadError> {
    let (config, digest) = config::read::read_file_digest(path)?;
    let mut policy = Policy::load(config)?;
    policy.loaded.config_sha256 = digest;
    Ok(policy)
}

/// What the reload actor is asked to do. Each carries where the answer
/// goes; a requester that stopped waiting does not stop the work.
#[derive(Debug)]
pub(crate) enum Request {
    /// Read `milter.yaml` and the accounts again and install them (SIGHUP,
    /// an account file, the command refresh, a confirmed dispute).
    Reload(oneshot::Sender<Result<(), LoadError>>),
    /// Read the holds of the policy in force again from `state_dir` (the
    /// state follower, the verification probe, a breaker trip). With
    /// `confirmed`, also say which disputed domain the administrator has
    /// confirmed (`dualroute confirm-accounts`).
    RefreshHolds {
        confirmed: bool,
        reply: oneshot::Sender<Refreshed>,
    },
}

/// The answer to [`Request::RefreshHolds`].
#[derive(Debug, Default)]
pub(crate) struct Refreshed {
    /// The state files that could not be read (each holds its domain).
    pub errors: Vec<String>,
    /// A disputed domain whose new account list the administrator
    /// confirmed, and when.
    pub confirmed: Option<(String, u64)>,
}

/// Asks the reload actor for a change and waits for its answer. The only
/// way to change the policy or the holds in force: requests are done one
/// at a time, in the order they come, so none installs what it read
/// before another installed something newer.
#[derive(Clone, Debug)]
pub(crate) struct Installer(mpsc::Sender<Request>);

impl Installer {
    /// A handle on the actor that receives from the other end.
    pub(crate) fn new(requests: mpsc::Sender<Request>) -> Installer {
        Installer(requests)
    }

    /// Reloads the configuration and the accounts; the error says why the
    /// running policy stays.
    pub(crate) async fn reload(&self) -> Result<(), LoadError> {
        let (reply, answer) = oneshot::channel();
        if self.0.send(Request::Reload(reply)).await.is_err() {
            return Err(LoadError::Stopped);
        }
        answer.await.unwrap_or(Err(LoadError::Stopped))
    }

    /// Reads the holds again; returns the errors for the log.
    pub(crate) async fn refresh_holds(&self) -> Vec<String> {
        self.refresh(false).await.errors
    }

    /// [`Installer::refresh_holds`], and the confirmed dispute, if any.
    pub(crate) async fn refresh(&self, confirmed: bool) -> Refreshed {
        let (reply, answer) = oneshot::channel();
        let request = Request::RefreshHolds { confirmed, reply };
        if self.0.send(request).await.is_err() {
            return Refreshed::default();
        }
        answer.await.unwrap_or_default()
    }

    /// [`Installer::refresh_holds`] from a thread of the blocking pool
    /// (the breaker's poll): waits there, never on the runtime's threads.
    pub(crate) fn refresh_holds_blocking(&self) -> Vec<String> {
        let (reply, answer) = oneshot::channel();
        let request = Request::RefreshHolds {
            confirmed: false,
            reply,
        };
        if self.0.blocking_send(request).is_err() {
            return Vec::new();
        }
        answer.blocking_recv().map(|r| r.errors).unwrap_or_default()
    }
}
