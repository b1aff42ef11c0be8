//! The mail-log line parser of the bounce breaker
//! (`dualroute::breaker::parse_line`) and the attribution of a failed
//! recipient to a managed domain.
#![no_main]

use dualroute::breaker::{parse_line, Attribution, FailureKind};
use dualroute_fuzz::policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(f) = parse_line(line) else {
        return;
    };
    // Only a delivery line with a failure status counts: a deferral is a
    // 4.x.x status; a bounce is 5.x.x, or 4.x.x where `soft_bounce = yes`
    // logged the destination's 5xx refusal as deferred.
    assert!(line.contains(": to="), "{line:?}");
    match f.kind {
        FailureKind::Deferral => assert!(f.dsn.starts_with("4."), "{f:?}"),
        FailureKind::Bounce => {
            assert!(f.dsn.starts_with("5.") || f.dsn.starts_with("4."), "{f:?}")
        }
    }
    assert!(!f.recipients.is_empty());
    for r in &f.recipients {
        // A recipient is text of the line, never invented.
        assert!(
            !r.is_empty() && line.contains(r.as_str()),
            "{r:?} not in {line:?}"
        );
    }
    // Parsing what was kept gives the same failure.
    assert_eq!(parse_line(&f.line).as_ref(), Some(&f));
    // Only managed domains are ever charged with a bounce.
    let policy = policy();
    let attribution = Attribution::new(&policy);
    for r in &f.recipients {
        for d in attribution.domains(r) {
            assert!(policy.domains.contains_key(d), "{r} charged to {d}");
        }
    }
});
