//! The account-file reader (src/accounts/read.rs): a `file:` source and
//! the text of a `postfix_map:` source, from the fuzzer's bytes.
#![no_main]

use dualroute::accounts::{load, MatchRules};
use dualroute::config::{AccountSource, LocalPartCase, PostfixTable};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn file() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("accounts");
        (dir, path)
    })
    .1
}

/// A line that every reader must take as an account of example.com: a
/// plain dot-atom local part, nothing else on the line.
fn plainly_an_account(line: &str) -> Option<&str> {
    let local = line.strip_suffix("@example.com")?;
    (!local.is_empty()
        && !local.starts_with('.')
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_'))
    .then_some(local)
}

fuzz_target!(|data: &[u8]| {
    let path = file();
    std::fs::write(path, data).expect("write the account file");
    let rules = MatchRules {
        case: LocalPartCase::Insensitive,
        delimiters: "+".into(),
    };
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let sources = [
        AccountSource::File(path.clone()),
        AccountSource::PostfixMap(PostfixTable {
            kind: None,
            path: path.clone(),
        }),
    ];
    for source in sources {
        match load("example.com", std::slice::from_ref(&source), &rules) {
            Err(e) => {
                if let Some(n) = e.line {
                    assert!(n >= 1 && n <= lines, "{e}");
                }
                assert!(e.to_string().starts_with(&e.file), "{e}");
            }
            Ok((accounts, report)) => {
                assert!(!accounts.is_empty());
                assert!(report.accounts <= lines, "{report:?}");
                // No mailbox is lost: every plain address of the domain
                // on a line of its own is an account.
                if matches!(source, AccountSource::File(_)) {
                    for line in text.split('\n') {
                        if let Some(local) = plainly_an_account(line.trim_end_matches('\r')) {
                            let key = rules.key(local);
                            assert!(accounts.contains(&key), "{line:?} lost");
                        }
                    }
                }
            }
        }
    }
});
