//! Which addresses have a mailbox here (docs/design.md §5 `accounts:`).
//!
//! - `set.rs`: the set of one domain's local parts (an arena of keys and a
//!   hash table of their offsets) and how local parts are compared;
//! - `load.rs`: loading a domain's set from its sources, each entry checked;
//! - `read.rs`: reading files and Postfix maps (stable reads, `postmap -s`);
//! - `command.rs`: `command:` sources, a program's output (lines or LDIF);
//! - `postfix.rs`: Postfix's own recipient tables (`postfix:` sources,
//!   and what `check` compares the accounts with).

mod command;
mod load;
pub mod postfix;
mod read;
mod set;

pub use load::{load, LoadError, LoadReport, SourceReport};
pub use set::{Accounts, MatchRules};
