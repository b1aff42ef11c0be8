//! dualroute: a milter that gives a self-hosted mail server split delivery,
//! dual delivery, routing and per-user copy/redirect rules during a mail
//! migration. See docs/design.md for the contract and README.md for use.
//!
//! The decision for a recipient is the pure function [`decision::decide`]
//! of the policy (src/policy.rs: configuration plus accounts) and the
//! runtime holds (src/holds/). Everything else is a shell around it:
//! [`milter`] for the protocol, [`run`] for the running milter and its
//! tasks (reached from outside through a [`Control`]), [`explain`] and
//! [`commands`] for the command line.

pub mod accounts;
pub mod address;
pub mod breaker;
pub mod callout;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod decision;
// Public for `callout::Callouts::with_clock`, whose resolver tests/callout.rs builds.
pub mod dns;
mod doctor;
pub mod explain;
pub mod holds;
mod listener;
mod live;
pub mod logging;
pub mod metrics;
pub mod milter;
mod notify;
pub mod policy;
mod postfix;
pub mod probe;
mod provider;
pub mod running;
pub mod runtime;
pub mod sendmail;
mod service;
pub mod session;
pub mod socket;
pub mod state;
pub mod status;
pub mod systemd;
mod table;

pub use listener::Peer;
pub use live::{load_policy, LoadError};
pub use service::{control, run, Control, Intervals, Requests, Start};
