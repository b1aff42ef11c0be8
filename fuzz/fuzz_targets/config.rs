//! The configuration loader: YAML text → `Config` → `Policy`.
#![no_main]

use dualroute::policy::Policy;
use dualroute_fuzz::check_routing_address;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match dualroute::config::parse(text, "fuzz.yaml") {
        Err(e) => {
            // Errors an admin can act on: the file first, and a position
            // that is inside the file.
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.yaml"), "{shown}");
            // Lines as YAML counts them: a lone CR breaks a line too.
            let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count();
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= lines + 1, "{shown}");
            }
            return;
        }
        Ok(c) => c,
    };
    // Loading is deterministic.
    assert_eq!(
        dualroute::config::parse(text, "fuzz.yaml").ok().as_ref(),
        Some(&config)
    );
    // Domains are in the form used for matching.
    for d in config.domains.keys() {
        assert_eq!(
            dualroute::address::normalize_domain(&d.0).as_deref(),
            Ok(d.0.as_str())
        );
    }
    // Account files and Postfix tables would be read from the fuzzer's
    // paths (/dev/zero never ends): the policy is built only from lists.
    let only_lists = config.domains.values().all(|d| {
        d.accounts
            .iter()
            .flatten()
            .all(|s| matches!(s, dualroute::config::AccountSource::List(_)))
    });
    if !only_lists {
        return;
    }
    let Ok(policy) = Policy::load(config) else {
        return;
    };
    // Every domain's routing address goes where the configuration says.
    for d in policy.domains.values() {
        let a = d.routing_address("x", &policy.config.relay_suffix.0);
        check_routing_address(&policy.config, &a).unwrap();
    }
});
