//! Holds that cannot be raced, statistically (issue 21 §6, docs/design.md
//! §7 "Reload"): reloads under load through a real, private Postfix, and
//! not one message routed for a held domain.
//!
//! tests/reload_races.rs makes each race of the old code deterministic at
//! the protocol level; this test is the other half: the real binary
//! behind a real Postfix, 8 SMTP clients, and a thread that rewrites
//! milter.yaml and sends SIGHUP at least 40 times while they send. The
//! domains are chosen so that the answer is exact whatever the timing:
//!
//! - `h.test` is held for the whole run (`h.test.disabled` exists before
//!   the milter starts and is never removed); the cycles add it to and
//!   remove it from the configuration and switch its `enabled: false` on
//!   and off. Removing it while messages are in flight is the race that
//!   routed 6 messages in the issue; adding it back is the one where the
//!   state follower reinstalled holds without it.
//! - `v.test` has `verify:` and a destination that is a dead loopback
//!   port (nothing listens), so its probe never passes; the cycles add and
//!   remove it and move its destination between two dead ports (a changed
//!   destination must be verified again). Postfix's own transport for its
//!   routing domain points at the sink, so a message the milter wrongly
//!   routes for it does arrive there and is seen.
//! - `r.test` is always routing: its mail must arrive at the sink, so the
//!   test also fails when nothing is routed at all.
//!
//! While `h.test` or `v.test` is out of the configuration the milter
//! leaves their mail alone; a transport for the two domains in
//! `defer_transports` (what issue 21 §5's deferring catch-all does) keeps
//! that mail in the queue instead of a catch-all Maildir. It does not
//! hide a leak: routed mail is addressed to `h.test.dualroute.invalid`,
//! another transport key.
//!
//! Every message has one unique recipient in each domain, `r.test` first
//! (so the `h.test` and `v.test` RCPTs come a moment after MAIL, when a
//! reload may have happened). Afterwards: no `h.test`/`v.test` recipient
//! at the sink or in a catch-all, each of them refused with 4xx at RCPT or
//! waiting in Postfix's queue, every accepted `r.test` recipient at the
//! sink exactly once.
//!
//! On the code before the fix (2736ec9) two runs of this test found 48
//! and 77 held-domain recipients at the sink, every one sent across a
//! reload that removed its domain (the first race of the issue). The
//! other two races (stale holds after an add, an older configuration
//! reinstalled by a concurrent reload) are too rare for a short soak and
//! are made deterministic in tests/reload_races.rs.
//!
//! Size knobs: `DUALROUTE_SOAK_MESSAGES` (default 1200),
//! `DUALROUTE_SOAK_CLIENTS` (8), `DUALROUTE_SOAK_CYCLES` (minimum
//! number of reload cycles, 40), `DUALROUTE_SOAK_CYCLE_MS` (time between
//! cycles, 150). Needs root and Postfix (scripts/test-deps.sh).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    dualroute, postfix_config, read_maildir, MilterProcess, Postfix, PostfixOptions, SmtpClient,
    SmtpSink, SmtpTranscript, OUTSIDE_IP, SENDER,
};

fn knob(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        Err(_) => default,
    }
}

/// The domains held for the whole run, and the one always routing.
const HELD: [&str; 2] = ["h.test", "v.test"];
const ROUTING: &str = "r.test";

/// What configuration generation `g` says about the two held domains.
#[derive(Clone, Copy, Debug)]
struct Generation {
    /// `h.test` is in the configuration (held by its `.disabled` file).
    h: bool,
    /// … with `enabled: false` as well.
    h_enabled_false: bool,
    /// `v.test` is in the configuration (waiting for verification).
    v: bool,
    /// Which of the two dead ports is `v.test`'s destination.
    v_dest: usize,
}

impl Generation {
    /// The phases differ so that adds, removals and changes of the two
    /// domains fall on different reloads and on the same ones.
    fn of(g: usize) -> Generation {
        Generation {
            h: g % 2 == 0,
            h_enabled_false: g % 4 == 2,
            v: g % 3 != 2,
            v_dest: (g / 3) % 2,
        }
    }
}

struct Setup {
    listen: support::Port,
    state: std::path::PathBuf,
    sink: String,
    dead: [String; 2],
}

/// milter.yaml of generation `g`.
fn config(s: &Setup, g: usize) -> String {
    let gen = Generation::of(g);
    let mut yaml = format!(
        "# generation {g}\nlisten: inet:127.0.0.1:{}\ninstance: soak.test\nstate_dir: {}\ndomains:\n  r.test:\n    mode: route\n    destination: {{ hosts: [\"{}\"] }}\n",
        s.listen,
        s.state.display(),
        s.sink
    );
    if gen.h {
        yaml += &format!(
            "  h.test:\n    mode: route\n    enabled: {}\n    destination: {{ hosts: [\"{}\"] }}\n",
            !gen.h_enabled_false, s.sink
        );
    }
    if gen.v {
        yaml += &format!(
            "  v.test:\n    mode: route\n    verify: probe@v.test\n    destination: {{ hosts: [\"{}\"] }}\n",
            s.dead[gen.v_dest]
        );
    }
    yaml
}

/// Replaces milter.yaml whole (write and rename), so a reload never reads
/// half a file.
fn install(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, text).expect("write the new milter.yaml");
    fs::rename(&tmp, path).expect("rename the new milter.yaml");
}

/// The recipients of message `i`: unknown addresses, unique per message
/// so each one can be traced to its message.
fn rcpts(i: usize) -> [String; 3] {
    [
        format!("m{i}@{ROUTING}"),
        format!("m{i}@{}", HELD[0]),
        format!("m{i}@{}", HELD[1]),
    ]
}

fn body(i: usize) -> String {
    format!("From: {SENDER}\nTo: undisclosed-recipients:;\nSubject: soak {i}\n\nmessage {i}\n")
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// One message: its transcript and the configuration generations in
/// force (as far as the cycler had installed them) when it began and
/// when it ended.
struct Sent {
    transcript: SmtpTranscript,
    generations: (usize, usize),
}

#[test]
fn reloads_under_load_route_nothing_for_held_domains() {
    let n = knob("DUALROUTE_SOAK_MESSAGES", 1200);
    let clients = knob("DUALROUTE_SOAK_CLIENTS", 8);
    let min_cycles = knob("DUALROUTE_SOAK_CYCLES", 40);
    let every = Duration::from_millis(knob("DUALROUTE_SOAK_CYCLE_MS", 150) as u64);

    let tmp = tempfile::Builder::new()
        .prefix("dualroute-reload-soak-")
        .tempdir()
        .expect("create a temporary directory");
    let dir = tmp.path();
    let sink = SmtpSink::start();
    // Reserved, never listening: refused, and no other process takes them.
    let dead = [support::Port::reserve(), support::Port::reserve()];
    let setup = Setup {
        listen: support::Port::reserve(),
        state: dir.join("state"),
        sink: sink.nexthop(),
        // Nothing listens there: the probe of v.test is refused, always.
        dead: [
            format!("[127.0.0.1]:{}", dead[0]),
            format!("[127.0.0.1]:{}", dead[1]),
        ],
    };

    // Postfix is wired for all three domains routed to the sink (what
    // postfix-config makes of a configuration where v.test's destination
    // is the sink), whatever the milter's configuration of the moment.
    let all = dir.join("all.yaml");
    fs::write(&all, config(&setup, 0).replace(&setup.dead[0], &setup.sink))
        .expect("write all.yaml");
    let generated = postfix_config(&all, &dir.join("postfix-config"));
    let opts = generated
        .apply_to(
            PostfixOptions::default()
                .domain_without_catchall(ROUTING, &[])
                .domain_without_catchall(HELD[0], &[])
                .domain_without_catchall(HELD[1], &[])
                .main_cf("smtpd_error_sleep_time = 0")
                .main_cf("smtpd_soft_error_limit = 1000"),
        )
        // Mail the milter leaves alone for the held domains (while they
        // are out of its configuration) waits in the queue: see the top
        // of the file. Not the `retry` transport: smtpd refuses a
        // recipient that resolves to `error` or `retry` at RCPT itself
        // (450 "Recipient address rejected"), before the milter sees it.
        // `defer_transports` keeps the mail deferred; should it ever be
        // flushed, its next hop is a dead port.
        .map(
            "soak_hold",
            &format!(
                "h.test soakhold:{dead}\nv.test soakhold:{dead}\n",
                dead = setup.dead[0]
            ),
        )
        .master_cf("soakhold unix - - n - - smtp")
        .main_cf("defer_transports = soakhold")
        .main_cf(
            "transport_maps = hash:/etc/postfix/dualroute_transport, hash:/etc/postfix/soak_hold",
        );
    let pf = Postfix::start(opts);

    let path = dir.join("milter.yaml");
    install(&path, &config(&setup, 0));
    fs::create_dir_all(&setup.state).expect("create state_dir");
    let (status, out) = dualroute(&path, &["disable", "h.test"]);
    assert!(status.success(), "dualroute disable h.test: {out}");
    assert!(
        setup.state.join("h.test.disabled").exists(),
        "`dualroute disable` wrote no h.test.disabled: {out}"
    );
    let milter = MilterProcess::start(&path, &setup.listen, &dir.join("milter.log"));

    let generation = Arc::new(AtomicUsize::new(0));
    let sent_count = Arc::new(AtomicUsize::new(0));
    let cycles = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    // The cycler: a new generation, then SIGHUP, until the clients stop.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycler = {
        let (generation, cycles, done, path) = (
            generation.clone(),
            cycles.clone(),
            done.clone(),
            path.clone(),
        );
        let yamls: Vec<String> = (0..10_000).map(|g| config(&setup, g)).collect();
        std::thread::spawn(move || {
            let mut g = 0;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(every);
                g += 1;
                install(&path, &yamls[g % yamls.len()]);
                milter.signal("HUP");
                generation.store(g, Ordering::SeqCst);
                cycles.store(g, Ordering::SeqCst);
            }
            milter
        })
    };

    let results = Arc::new(Mutex::new(BTreeMap::new()));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (next, results, generation, cycles) = (
                sent_count.clone(),
                results.clone(),
                generation.clone(),
                cycles.clone(),
            );
            let client = SmtpClient::new(pf.smtp_addr()).bind(OUTSIDE_IP);
            std::thread::spawn(move || loop {
                // At least n messages and at least min_cycles reloads
                // during the load.
                if next.load(Ordering::SeqCst) >= n && cycles.load(Ordering::SeqCst) >= min_cycles {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let before = generation.load(Ordering::SeqCst);
                let to = rcpts(i);
                let to: Vec<&str> = to.iter().map(String::as_str).collect();
                let transcript = client.send(SENDER, &to, &body(i));
                let after = generation.load(Ordering::SeqCst);
                results.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    i,
                    Sent {
                        transcript,
                        generations: (before, after),
                    },
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    done.store(true, Ordering::SeqCst);
    let milter = cycler.join().expect("the cycler panicked");
    let load_time = started.elapsed();
    let cycles = cycles.load(Ordering::SeqCst);
    let sent: BTreeMap<usize, Sent> =
        std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));

    // What the clients saw, per domain: RCPT accepted (in a message that
    // was accepted after DATA), refused 4xx, or something else.
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    let mut tempfailed: BTreeMap<String, usize> = BTreeMap::new();
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut expected_routed = BTreeSet::new();
    let mut expected_waiting = BTreeSet::new();
    let mut messages_accepted = 0;
    for (i, s) in &sent {
        let t = &s.transcript;
        if t.accepted() {
            messages_accepted += 1;
        }
        for (rcpt, reply) in t.rcpts() {
            let domain = domain_of(rcpt).to_owned();
            if reply.is_positive() && t.accepted() {
                *accepted.entry(domain.clone()).or_insert(0) += 1;
                if domain == ROUTING {
                    expected_routed.insert(rcpt.to_owned());
                } else {
                    expected_waiting.insert(rcpt.to_owned());
                }
            } else if reply.code / 100 == 4 {
                *tempfailed.entry(domain.clone()).or_insert(0) += 1;
                // Why, as the milter's 451 says it ("paused (CAUSE)").
                let cause = reply
                    .text
                    .split_once("paused (")
                    .and_then(|(_, rest)| rest.split_once(')'))
                    .map_or_else(|| reply.text.clone(), |(cause, _)| cause.to_owned());
                *causes.entry(cause).or_insert(0) += 1;
                if domain == ROUTING {
                    wrong.push(format!(
                        "message {i}: {rcpt} (always routing) refused: {reply:?}"
                    ));
                }
            } else if !reply.is_positive() {
                wrong.push(format!("message {i}: RCPT {rcpt}: {reply:?}\n{t}"));
            }
        }
        if !t.accepted()
            && t.rcpts()
                .iter()
                .any(|(r, reply)| domain_of(r) == ROUTING && reply.is_positive())
        {
            wrong.push(format!("message {i} not accepted after DATA:\n{t}"));
        }
    }

    // Wait until every accepted r.test recipient has arrived and nothing
    // but the deferred held mail is left in the queue.
    let sink_rcpts = || -> BTreeMap<String, Vec<String>> {
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in sink.messages() {
            let subject = m.header("Subject").into_iter().next().unwrap_or_default();
            for r in m.rcpt_addresses() {
                found.entry(r).or_default().push(subject.clone());
            }
        }
        found
    };
    let settled = support::poll(|| {
        let arrived = sink_rcpts();
        let routed = arrived.keys().filter(|r| domain_of(r) == ROUTING).count();
        let busy = pf.queue().iter().any(|(queue, _)| queue != "deferred");
        (routed >= expected_routed.len() && !busy).then_some(arrived)
    });
    let arrived = settled.unwrap_or_else(|| {
        panic!(
            "the routed mail did not all arrive at the sink ({} expected)\n{}",
            expected_routed.len(),
            pf.diagnostics()
        )
    });

    // Where the held domains' accepted recipients are: the queue.
    let queued = postqueue_recipients(&pf);

    let mut leaks = Vec::new();
    for (rcpt, subjects) in &arrived {
        let domain = domain_of(rcpt);
        if HELD.contains(&domain) {
            for subject in subjects {
                let i: Option<usize> = subject.strip_prefix("soak ").and_then(|n| n.parse().ok());
                let gens = i
                    .and_then(|i| sent.get(&i))
                    .map(|s| s.generations)
                    .map(|(a, b)| {
                        format!(
                            "sent during generations {a}..={b}: {:?} → {:?}",
                            Generation::of(a),
                            Generation::of(b)
                        )
                    })
                    .unwrap_or_default();
                leaks.push(format!("{rcpt} ({subject}) at the sink; {gens}"));
            }
        } else if domain == ROUTING && subjects.len() != 1 {
            wrong.push(format!("{rcpt} arrived {} times", subjects.len()));
        }
    }
    for rcpt in &expected_routed {
        if !arrived.contains_key(rcpt) {
            wrong.push(format!("{rcpt} accepted but not at the sink"));
        }
    }
    for rcpt in &expected_waiting {
        if !arrived.contains_key(rcpt) && !queued.contains(rcpt) {
            wrong.push(format!(
                "{rcpt} accepted but neither at the sink nor in the queue"
            ));
        }
    }
    let mut in_catchall = Vec::new();
    for domain in [ROUTING, HELD[0], HELD[1]] {
        let catchall = pf
            .maildir_root()
            .join(format!("{domain}/dualroute-catchall/"));
        for m in read_maildir(&catchall) {
            in_catchall.push(format!("{domain} catch-all: {:?}", m.header("Subject")));
        }
    }
    let routed = arrived.keys().filter(|r| domain_of(r) == ROUTING).count();
    eprintln!(
        "reload soak: {} messages from {clients} clients in {load_time:?}, {cycles} reload cycles; \
         {messages_accepted} messages accepted; RCPT accepted per domain {accepted:?}, \
         tempfailed per domain {tempfailed:?} \
         (causes {causes:?}); {routed} r.test recipients routed to the sink; \
         {} held-domain recipients waiting in the queue; {} held-domain recipients routed (leaked)",
        sent.len(),
        queued.iter().filter(|r| HELD.contains(&domain_of(r))).count(),
        leaks.len(),
    );
    let log = milter.log();
    assert!(
        leaks.is_empty() && in_catchall.is_empty(),
        "{} recipients of held domains were routed, {} landed in a catch-all:\n{}\n{}\n--- milter log (tail) ---\n{}",
        leaks.len(),
        in_catchall.len(),
        leaks.join("\n"),
        in_catchall.join("\n"),
        tail(&log, 80)
    );
    assert!(
        wrong.is_empty(),
        "{} problems:\n{}\n--- milter log (tail) ---\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&log, 80)
    );
    assert!(cycles >= min_cycles, "only {cycles} reload cycles");
    assert!(
        routed > sent.len() / 2,
        "only {routed} of {} r.test recipients routed: the test routed too little to mean anything",
        sent.len()
    );
    // Both kinds of held answers happened: the milter refused held
    // recipients at RCPT, and Postfix kept some that it left alone.
    assert!(
        HELD.iter()
            .all(|d| tempfailed.get(*d).copied().unwrap_or(0) > 0),
        "no 4xx for a held domain: the holds were never exercised ({tempfailed:?})"
    );
    assert!(
        HELD.iter()
            .all(|d| expected_waiting.iter().any(|r| domain_of(r) == *d)),
        "no held-domain recipient was accepted while out of the configuration: \
         the cycles never removed a domain under load ({accepted:?})"
    );
}

/// The recipients of every message in the queue (`postqueue -j`, one JSON
/// object per message; only the `"address"` fields are read).
fn postqueue_recipients(pf: &Postfix) -> BTreeSet<String> {
    let out = std::process::Command::new(support::tool("postqueue"))
        .arg("-c")
        .arg(pf.config_dir())
        .arg("-j")
        .output()
        .expect("run postqueue -j");
    assert!(
        out.status.success(),
        "postqueue -j: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"address\": \"")
        .skip(1)
        .chain(text.split("\"address\":\"").skip(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
