//! Faults under load through a real, private Postfix (tests/support/):
//!
//! - **kill soak**: messages to local, routed and copied recipients while
//!   `dualroute run` is SIGKILLed and restarted every 80 messages; then
//!   the queue is flushed and every message the client saw accepted must
//!   have arrived exactly once at each of its places (Maildir here, the
//!   other server), every refused one must have been refused with 4xx
//!   and have arrived nowhere, nothing bounced, nothing left in the queue,
//!   the catch-all empty;
//! - **reload storm**: the same load with a SIGHUP every 10 messages and the
//!   account file rewritten all along (in place and by rename): every
//!   message accepted, zero misrouted.
//!
//! Size knobs (FUZZ.md records bigger runs):
//! `DUALROUTE_SOAK_MESSAGES` (default 400), `DUALROUTE_SOAK_KILL_EVERY`
//! (default 80: messages between kills), `DUALROUTE_SOAK_CLIENTS` (default
//! 4 concurrent SMTP clients). Needs root and Postfix
//! (scripts/test-deps.sh).
//!
//! The faults are paced by messages, not by time: a load that runs
//! faster on a faster machine meets the same number of kills and reloads
//! (a time-paced kill soak once finished 400 messages in 1.4 s with one
//! kill).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::soak::{knob, Progress};

use support::{
    postfix_config, read_maildir, MilterProcess, Postfix, PostfixOptions, SmtpClient, SmtpSink,
    SmtpTranscript, OUTSIDE_IP, SENDER,
};

/// Accounts of split.test in its account file: alice and bob get mail,
/// the filler makes the file big enough that a torn read would show.
fn split_accounts(generation: usize) -> String {
    let mut text = format!("# generation {generation}\n");
    for n in 0..50 {
        text += &format!("filler{n}@split.test\n");
    }
    text += "bob@split.test\nalice@split.test\n";
    text
}

/// Where one recipient's mail must end up, as places
/// (`maildir:ADDRESS`, `sink:ADDRESS`).
fn places(rcpt: &str) -> Vec<String> {
    match rcpt {
        // split, account here: kept.
        "alice@split.test" | "bob@split.test" => vec![format!("maildir:{rcpt}")],
        // split, no account: redirected to the other server, where
        // smtp_generic_maps restores @split.test.
        "zed@split.test" | "yan@split.test" => vec![format!("sink:{rcpt}")],
        // dual: here and a copy there.
        "d1@dual.test" | "d2@dual.test" => vec![format!("maildir:{rcpt}"), format!("sink:{rcpt}")],
        // dual, no account: refused at RCPT (550 5.1.1), nowhere.
        "nobody@dual.test" => vec![],
        other => panic!("no expectation for {other}"),
    }
}

/// The recipients of message `i`: local only, routed only, copied only,
/// all mixed, and one with a recipient the milter refuses.
fn recipients(i: usize) -> &'static [&'static str] {
    const MIXES: [&[&str]; 5] = [
        &["alice@split.test"],
        &["zed@split.test"],
        &["d1@dual.test"],
        &[
            "alice@split.test",
            "zed@split.test",
            "d2@dual.test",
            "bob@split.test",
            "yan@split.test",
        ],
        &["nobody@dual.test", "bob@split.test", "d1@dual.test"],
    ];
    MIXES[i % MIXES.len()]
}

/// Postfix + dualroute + the other server (smtp-sink), wired by
/// `dualroute postfix-config` as in tests/postfix_e2e.rs.
struct Soak {
    milter: Option<MilterProcess>,
    pf: Postfix,
    sink: SmtpSink,
    accounts: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Soak {
    fn start() -> Soak {
        let tmp = tempfile::Builder::new()
            .prefix("dualroute-soak-")
            .tempdir()
            .expect("create a temporary directory");
        let dir = tmp.path();
        let sink = SmtpSink::start();
        let port = support::Port::reserve();
        let accounts = dir.join("split.accounts");
        fs::write(&accounts, split_accounts(0)).expect("write the account file");
        let yaml = format!(
            "listen: inet:127.0.0.1:{port}\ninstance: soak.test\nstate_dir: {state}\ndomains:\n  split.test:\n    mode: split\n    destination: {{ hosts: [\"{sink}\"] }}\n    accounts: [{{ file: {accounts} }}]\n  dual.test:\n    mode: dual\n    destination: {{ hosts: [\"{sink}\"] }}\n    accounts: [{{ list: [d1@dual.test, d2@dual.test] }}]\n",
            state = dir.join("state").display(),
            sink = sink.nexthop(),
            accounts = accounts.display(),
        );
        let config = dir.join("milter.yaml");
        fs::write(&config, yaml).expect("write milter.yaml");
        let generated = postfix_config(&config, &dir.join("postfix-config"));
        let opts = generated.apply_to(
            PostfixOptions::default()
                .domain_without_catchall("split.test", &["alice@split.test", "bob@split.test"])
                .domain_without_catchall("dual.test", &["d1@dual.test", "d2@dual.test"])
                // Enough smtpd processes for the clients, and no delay
                // after the client's errors (a refused RCPT is expected).
                .main_cf("smtpd_error_sleep_time = 0")
                .main_cf("smtpd_soft_error_limit = 100"),
        );
        let pf = Postfix::start(opts);
        let milter = MilterProcess::start(&config, &port, &dir.join("milter.log"));
        Soak {
            milter: Some(milter),
            pf,
            sink,
            accounts,
            _tmp: tmp,
        }
    }

    /// Sends `n` messages from `clients` threads while `fault` runs in a
    /// thread of its own (given the milter, and told when to stop).
    /// Returns the transcripts (message i at index i) and what the fault
    /// thread returns.
    fn load<T: Send + 'static>(
        &mut self,
        n: usize,
        clients: usize,
        fault: impl FnOnce(MilterProcess, &Progress) -> (MilterProcess, T) + Send + 'static,
    ) -> (Vec<SmtpTranscript>, T) {
        let milter = self.milter.take().expect("the milter");
        let progress = Arc::new(Progress::default());
        let faults = {
            let progress = progress.clone();
            std::thread::spawn(move || fault(milter, &progress))
        };
        let results = Arc::new(Mutex::new(BTreeMap::new()));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (progress, results) = (progress.clone(), results.clone());
                let client = SmtpClient::new(self.pf.smtp_addr()).bind(OUTSIDE_IP);
                std::thread::spawn(move || loop {
                    let i = progress.started.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let t = client.send(SENDER, recipients(i), &body(i));
                    // A refused sender comes back later, not at once: without
                    // this the clients would spend the whole load on the
                    // moments the milter is down.
                    if !t.accepted() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(i, t);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a client thread panicked");
        }
        progress.done.store(true, Ordering::SeqCst);
        let (milter, out) = faults.join().expect("the fault thread panicked");
        self.milter = Some(milter);
        let results = Arc::try_unwrap(results)
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_default();
        (results.into_values().collect(), out)
    }

    /// Every message that arrived anywhere, as (place, subject) → count.
    fn arrived(&self) -> BTreeMap<(String, String), usize> {
        let mut found = BTreeMap::new();
        for rcpt in [
            "alice@split.test",
            "bob@split.test",
            "d1@dual.test",
            "d2@dual.test",
        ] {
            for m in self.pf.maildir_messages(rcpt) {
                for s in m.header("Subject") {
                    *found.entry((format!("maildir:{rcpt}"), s)).or_insert(0) += 1;
                }
            }
        }
        for domain in ["split.test", "dual.test"] {
            let catchall = self
                .pf
                .maildir_root()
                .join(format!("{domain}/dualroute-catchall/"));
            for m in read_maildir(&catchall) {
                for s in m.header("Subject") {
                    *found.entry((format!("catchall:{domain}"), s)).or_insert(0) += 1;
                }
            }
        }
        for m in self.sink.messages() {
            let subject = m.header("Subject").into_iter().next().unwrap_or_default();
            for r in m.rcpt_addresses() {
                *found
                    .entry((format!("sink:{r}"), subject.clone()))
                    .or_insert(0) += 1;
            }
        }
        found
    }

    /// Flushes the queue, waits until it is empty, and checks every
    /// message against its transcript. Returns (accepted, refused).
    fn check(&self, transcripts: &[SmtpTranscript]) -> (usize, usize) {
        self.pf.flush();
        self.pf.wait_queue_empty();
        let mut expected = BTreeMap::new();
        let mut refused = 0;
        for (i, t) in transcripts.iter().enumerate() {
            if !t.accepted() {
                refused += 1;
                // Refused for now, never for good: the sender retries.
                let last = t
                    .steps
                    .iter()
                    .rev()
                    .find(|(command, _)| command != "QUIT")
                    .map(|(_, reply)| reply.code);
                assert!(
                    last.is_some_and(|code| (400..500).contains(&code)),
                    "message {i} refused without 4xx:\n{t}"
                );
                continue;
            }
            for (rcpt, reply) in t.rcpts() {
                if reply.is_positive() {
                    for place in places(rcpt) {
                        *expected.entry((place, subject(i))).or_insert(0) += 1;
                    }
                } else {
                    assert!(
                        reply.code / 100 == 4 || (rcpt == "nobody@dual.test" && reply.code == 550),
                        "message {i}: RCPT {rcpt}: {reply:?}\n{t}"
                    );
                }
            }
        }
        let arrived = self.arrived();
        let diff: Vec<String> = expected
            .keys()
            .chain(arrived.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| expected.get(*k) != arrived.get(*k))
            .map(|k| {
                format!(
                    "{} {}: expected {}, arrived {}",
                    k.0,
                    k.1,
                    expected.get(k).unwrap_or(&0),
                    arrived.get(k).unwrap_or(&0)
                )
            })
            .collect();
        assert!(
            diff.is_empty(),
            "{} of {} places wrong (lost, duplicated or misrouted):\n{}\n--- milter log ---\n{}",
            diff.len(),
            expected.len().max(arrived.len()),
            diff.join("\n"),
            self.milter
                .as_ref()
                .map(MilterProcess::log)
                .unwrap_or_default()
        );
        assert!(
            self.pf.bounced().is_empty(),
            "bounced: {:?}",
            self.pf.bounced()
        );
        assert!(self.pf.queue().is_empty(), "{}", self.pf.diagnostics());
        (transcripts.len() - refused, refused)
    }
}

fn subject(i: usize) -> String {
    format!("soak {i}")
}

fn body(i: usize) -> String {
    format!(
        "From: {SENDER}\nTo: undisclosed-recipients:;\nSubject: {}\n\nmessage {i}\n",
        subject(i)
    )
}

#[test]
fn kill_soak_every_accepted_message_arrives_exactly_once() {
    let n = knob("DUALROUTE_SOAK_MESSAGES", 400);
    let clients = knob("DUALROUTE_SOAK_CLIENTS", 4);
    let every = knob("DUALROUTE_SOAK_KILL_EVERY", 80).max(1);
    let mut soak = Soak::start();
    let started = Instant::now();
    let (transcripts, kills) = soak.load(n, clients, move |mut milter, progress| {
        let mut kills = 0;
        while progress.reached((kills + 1) * every) {
            // Down until the new process listens (tens of ms): Postfix
            // tempfails what comes meanwhile.
            milter.kill();
            kills += 1;
            milter.spawn();
        }
        (milter, kills)
    });
    let (accepted, refused) = soak.check(&transcripts);
    eprintln!(
        "kill soak: {n} messages in {:?}, {kills} SIGKILLs, {accepted} accepted and delivered exactly once, {refused} refused with 4xx",
        started.elapsed()
    );
    assert!(
        kills >= 2,
        "only {kills} kills, one every {every} messages of {n}: the load ended too soon"
    );
    assert!(
        refused > 0,
        "no message met a dead milter: the kills did nothing"
    );
    assert!(accepted > n / 2, "{accepted} of {n} accepted");
}

#[test]
fn reload_storm_and_rewritten_accounts_misroute_nothing() {
    let n = knob("DUALROUTE_SOAK_MESSAGES", 400);
    let clients = knob("DUALROUTE_SOAK_CLIENTS", 4);
    let mut soak = Soak::start();
    let accounts = soak.accounts.clone();
    let started = Instant::now();
    let (transcripts, (hups, rewrites)) = soak.load(n, clients, move |milter, progress| {
        let (mut hups, mut rewrites) = (0, 0);
        while progress.reached((hups + 1) * 10) {
            milter.signal("HUP");
            hups += 1;
            if hups % 3 == 0 {
                rewrites += 1;
                rewrite(&accounts, &split_accounts(rewrites), rewrites % 2 == 0);
            }
        }
        (milter, (hups, rewrites))
    });
    let (accepted, refused) = soak.check(&transcripts);
    eprintln!(
        "reload storm: {n} messages in {:?}, {hups} SIGHUPs, {rewrites} account file rewrites, {accepted} accepted, {refused} refused",
        started.elapsed()
    );
    assert_eq!(refused, 0, "a reload refused mail");
    assert!(hups >= 5, "only {hups} reloads during the load");
}

/// Rewrites the account file in place (truncate and write, as an editor
/// that saves in place does) or by rename (as `install`/`mv` does).
fn rewrite(path: &Path, text: &str, in_place: bool) {
    if in_place {
        fs::write(path, text).expect("rewrite the account file");
    } else {
        let tmp = path.with_extension("new");
        fs::write(&tmp, text).expect("write the new account file");
        fs::rename(&tmp, path).expect("rename the new account file");
    }
}
