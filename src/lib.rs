//! dualroute: a milter that gives a self-hosted mail server split delivery,
//! dual delivery, routing and per-user copy/redirect rules during a mail
//! migration. See docs/design.md for the contract and README.md for use.
//!
//! The decision for a recipient is the pure function [`decision::decide`]
//! of the policy (src/policy.rs: configuration plus accounts) and the
//! runtime holds (src/holds/). Everything else is a shell around it:
//! [`milter`] for the protocol, [`service`] for the running milter and its
//! tasks, [`explain`] and [`commands`] for the command line.

pub mod accounts;
pub mod address;
pub mod breaker;
pub mod callout;
pub mod cli;
pub mod commands;
pub mod config;
pub mod decision;
pub mod dns;
pub mod doctor;
pub mod explain;
pub mod holds;
pub mod listener;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod milter;
pub mod notify;
pub mod policy;
pub mod postfix;
pub mod probe;
pub mod provider;
pub mod runtime;
pub mod sendmail;
pub mod service;
pub mod session;
pub mod socket;
pub mod state;
pub mod table;

pub use service::{load_policy, run, LoadError, Service};
