//! The milter's cost beside baselines, measured in one run, interleaved,
//! medians of repetitions (BENCHMARKS.md has the figures).
//!
//! Protocol arm (default): a closed-loop client built on indymilter-test
//! drives, over unix sockets, `dualroute run` (one split domain with
//! `--accounts` accounts), an in-tree no-op indymilter that negotiates and
//! replies exactly as dualroute does and sends the same end-of-message
//! actions, and (with `--libmilter PATH`) the libmilter no-op of
//! benches/noop-libmilter.c. One conversation: negotiate, connect, HELO,
//! MAIL, three RCPT (two accounts, one unknown: redirected), DATA, one
//! header, end of headers, end of message with delete + add with ESMTP
//! parameters + add header; with the macros Postfix sends a milter that
//! asks for dualroute's lists (its defaults at connect, `{rcpt_addr}` at
//! each RCPT, the queue id at end of message), the same to every milter.
//! With `--tcp`, each milter over TCP as well
//! (libmilter does nothing about the delayed-ACK stall). Prints conversations/s, p50/p99 latency, the
//! milter process's CPU per conversation, and ratios to the no-op.
//!
//! Postfix arm (`--postfix`): `smtp-source` into a private Postfix
//! (tests/support/) with no milter, a no-op indymilter registering every
//! stage (a naive milter), and dualroute, each over a unix socket and over
//! TCP; messages/s and ratios to no milter.
//!
//! Cluster arm (`--cluster`, needs `redis-server`: scripts/test-deps.sh):
//! dualroute with `cluster.redis` beside the same without, interleaved
//! (Redis is never on the RCPT path: the two must be within noise); the
//! commands a node sends Redis per second meanwhile (INFO's
//! `total_commands_processed`); and, with two `dualroute run` nodes, how
//! long a `disable` typed on one takes to reach the other's state_dir
//! (median, p99).
//!
//! Reload arm (`--reload`): dualroute at the highest concurrency while it
//! gets a SIGHUP every second, beside the same load without; every
//! conversation must succeed.
//!
//! `--noop-preload LIB` adds the no-op once more with `LD_PRELOAD=LIB`
//! (scripts/bench.sh: Debian's mimalloc, the allocator dualroute links
//! for small blocks), so that the best no-op is not held back by glibc's
//! malloc.
//!
//! `--pin` puts the load client on the first CPU and every milter on the
//! second (taskset), so that the client never takes the milter's CPU
//! (BENCHMARKS.md, "Fourth round": at one connection the client's
//! preemptions otherwise cost the milter more than its own work).
//!
//! `--threads 1,2` runs dualroute and the no-op once per
//! `DUALROUTE_THREADS` value; `--before PATH` adds an earlier dualroute
//! build as an arm of its own (before/after in one run).
//!
//! ```text
//! scripts/bench.sh [--quick] [--tcp] [--postfix] [--reps N] [--secs S] [--concurrency 1,8,64] [--accounts N]
//! cargo bench --bench milter -- [same options] [--libmilter PATH] [--threads 1,2] [--before PATH] [--reload] [--pin] [--callgrind] [--noop-preload LIB]
//! ```

#[path = "../tests/support/callout_stub.rs"]
mod callout_stub;
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use dualroute::milter::negotiation;
use dualroute::runtime::THREADS_VAR;
use indymilter::{Callbacks, ContextActions, ProtoOpts, Status};
use indymilter_test::{MacroStage, TestConnection};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

struct Options {
    quick: bool,
    postfix: bool,
    reps: usize,
    secs: f64,
    concurrency: Vec<usize>,
    accounts: usize,
    libmilter: Option<PathBuf>,
    messages: usize,
    tcp: bool,
    /// `DUALROUTE_THREADS` values to run dualroute and the no-op with,
    /// each an arm of its own (empty: the default only).
    threads: Vec<String>,
    /// Reload arm: SIGHUP every second under load.
    reload: bool,
    /// Run each milter under callgrind and count the instructions it
    /// executes per conversation (repeatable on a busy machine).
    callgrind: bool,
    /// Client on the first CPU, milters on the second.
    pin: bool,
    /// A malloc to preload into a second no-op arm (`LD_PRELOAD`): the
    /// no-op with the allocator dualroute brings (src/allocator.rs).
    noop_preload: Option<PathBuf>,
    /// Another dualroute binary (an earlier build) as an arm of its own:
    /// before/after in one run.
    before: Option<PathBuf>,
    /// Cluster arm: dualroute with and without `cluster.redis`, how long a
    /// change takes to reach another node, and what a node costs Redis.
    cluster: bool,
}

fn options() -> Options {
    let mut o = Options {
        quick: false,
        postfix: false,
        reps: 5,
        secs: 3.0,
        concurrency: vec![1, 8, 64],
        accounts: 1_000_000,
        libmilter: None,
        messages: 2000,
        tcp: false,
        threads: Vec::new(),
        before: None,
        reload: false,
        callgrind: false,
        pin: false,
        noop_preload: None,
        cluster: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--postfix" => o.postfix = true,
            "--tcp" => o.tcp = true,
            "--reload" => o.reload = true,
            "--cluster" => o.cluster = true,
            "--callgrind" => o.callgrind = true,
            "--pin" => o.pin = true,
            "--reps" => o.reps = value().parse().unwrap_or_else(|_| usage("--reps")),
            "--secs" => o.secs = value().parse().unwrap_or_else(|_| usage("--secs")),
            "--accounts" => o.accounts = value().parse().unwrap_or_else(|_| usage("--accounts")),
            "--messages" => o.messages = value().parse().unwrap_or_else(|_| usage("--messages")),
            "--libmilter" => o.libmilter = Some(value().into()),
            "--before" => o.before = Some(value().into()),
            "--noop-preload" => o.noop_preload = Some(value().into()),
            "--threads" => o.threads = value().split(',').map(str::to_owned).collect(),
            "--concurrency" => {
                o.concurrency = value()
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| usage("--concurrency")))
                    .collect()
            }
            "--bench" => {}
            "serve-noop" => {
                let mode = value();
                serve(&value(), &mode)
            }
            other => usage(other),
        }
    }
    if o.quick {
        o.reps = 1;
        o.secs = 0.5;
        o.concurrency = vec![1, 4];
        o.accounts = 1000;
        o.messages = 50;
    }
    o
}

fn usage(bad: &str) -> ! {
    eprintln!("bad argument {bad:?}; see the top of benches/milter.rs");
    std::process::exit(2)
}

fn main() {
    let o = options();
    if o.pin {
        pin_client();
    }
    if o.postfix {
        postfix_arm(&o);
    } else if o.cluster {
        cluster_arm(&o);
    } else if o.reload {
        reload_arm(&o);
    } else {
        protocol_arm(&o);
    }
}

// ---------------------------------------------------------------------
// The no-op indymilter baselines (this binary, re-executed).
// ---------------------------------------------------------------------

#[derive(Default)]
struct Noop {
    no_reply: ProtoOpts,
}

fn quietly(data: &Option<Noop>, stage: ProtoOpts) -> Status {
    match data {
        Some(n) if n.no_reply.contains(stage) => Status::Noreply,
        _ => Status::Continue,
    }
}

/// The no-op baselines, by `mode`:
/// - `naive`: every stage registered, nothing skipped, no actions;
/// - `skip`: dualroute's stages only (the MTA skips the others), no actions;
/// - `quiet`: as `skip`, plus dualroute's no-reply options;
/// - `alike`: as `quiet`, plus dualroute's end-of-message actions for one
///   redirected recipient (the protocol arm's baseline).
fn serve(socket: &str, mode: &str) -> ! {
    let (skip, quiet, act) = match mode {
        "naive" => (false, false, false),
        "skip" => (true, false, false),
        "quiet" => (true, true, false),
        "alike" => (true, true, true),
        other => usage(other),
    };
    // The same runtime as dualroute's, as DUALROUTE_THREADS asks.
    let runtime = dualroute::runtime::from_env().expect("tokio runtime");
    let result = runtime.block_on(async {
        let callbacks = if !skip {
            Callbacks::<Noop>::new()
                .on_connect(|_, _, _| Box::pin(async { Status::Continue }))
                .on_helo(|_, _| Box::pin(async { Status::Continue }))
                .on_mail(|_, _| Box::pin(async { Status::Continue }))
                .on_rcpt(|_, _| Box::pin(async { Status::Continue }))
                .on_data(|_| Box::pin(async { Status::Continue }))
                .on_header(|_, _, _| Box::pin(async { Status::Continue }))
                .on_eoh(|_| Box::pin(async { Status::Continue }))
                .on_body(|_, _| Box::pin(async { Status::Continue }))
                .on_eom(|_| Box::pin(async { Status::Continue }))
                .on_abort(|_| Box::pin(async { Status::Continue }))
        } else {
            Callbacks::<Noop>::new()
                .on_negotiate(move |cx, actions, opts| {
                    Box::pin(async move {
                        let n = negotiation(actions, opts);
                        let no_reply = ProtoOpts::NOREPLY_CONNECT
                            | ProtoOpts::NOREPLY_MAIL
                            | ProtoOpts::NOREPLY_HEADER;
                        cx.requested_actions = n.actions;
                        cx.requested_opts = if quiet { n.opts } else { n.opts - no_reply };
                        cx.data = Some(Noop {
                            no_reply: cx.requested_opts & no_reply,
                        });
                        Status::Continue
                    })
                })
                .on_connect(|cx, _, _| {
                    Box::pin(async move { quietly(&cx.data, ProtoOpts::NOREPLY_CONNECT) })
                })
                .on_mail(|cx, _| {
                    Box::pin(async move { quietly(&cx.data, ProtoOpts::NOREPLY_MAIL) })
                })
                .on_rcpt(|_, _| Box::pin(async { Status::Continue }))
                .on_header(|cx, _, _| {
                    Box::pin(async move { quietly(&cx.data, ProtoOpts::NOREPLY_HEADER) })
                })
                .on_eom(move |cx| {
                    Box::pin(async move {
                        if !act {
                            return Status::Continue;
                        }
                        let a = &cx.actions;
                        let done = async {
                            a.delete_recipient("<zed@bench.test>").await?;
                            a.add_recipient_ext(
                                "<zed@bench.test.dualroute.invalid>",
                                Some("ORCPT=rfc822;zed@bench.test"),
                            )
                            .await?;
                            a.add_header("X-Dualroute", "bench.test").await
                        };
                        match done.await {
                            Ok(()) => Status::Continue,
                            Err(_) => Status::Tempfail,
                        }
                    })
                })
                .on_abort(|_| Box::pin(async { Status::Continue }))
        };
        let config = indymilter::Config {
            max_connections: 1000,
            ..Default::default()
        };
        let shutdown = std::future::pending::<()>();
        match socket.strip_prefix("unix:") {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path)?;
                // Postfix's smtpd runs as user postfix.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
                indymilter::run(l, callbacks, config, shutdown).await
            }
            None => {
                let addr = socket.strip_prefix("inet:").unwrap_or(socket);
                let l = tokio::net::TcpListener::bind(addr).await?;
                indymilter::run(l, callbacks, config, shutdown).await
            }
        }
    });
    eprintln!("no-op milter on {socket}: {result:?}");
    std::process::exit(1)
}

// ---------------------------------------------------------------------
// Milter processes.
// ---------------------------------------------------------------------

/// A milter child process; killed on drop.
struct Server {
    name: String,
    child: Child,
}

impl Server {
    fn start(name: &str, mut command: Command, ready: impl Fn() -> bool) -> Server {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut server = Server {
            name: name.into(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited ({status}) before it was ready");
            }
            assert!(Instant::now() < deadline, "{name} not ready after 120s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// User and system CPU time of the process so far.
    fn cpu_split(&self) -> (Duration, Duration) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces).
        let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
        let f: Vec<u64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime and stime are fields 14 and 15 of stat(5), in USER_HZ
        // (100 per second on Linux).
        let ticks = |i: usize| Duration::from_millis(f.get(i).copied().unwrap_or(0) * 10);
        (ticks(11), ticks(12))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_ready(path: &Path) -> impl Fn() -> bool + '_ {
    move || std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn tcp_ready(port: u16) -> impl Fn() -> bool {
    move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn noop(socket: &str, mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("this benchmark's path"));
    c.args(["serve-noop", mode, socket]).env_remove(THREADS_VAR);
    c
}

fn dualroute(config: &Path) -> Command {
    dualroute_at(Path::new(env!("CARGO_BIN_EXE_dualroute")), config)
}

/// `binary run`: logging at the packaged level (one line per message, as
/// in production), to /dev/null.
fn dualroute_at(binary: &Path, config: &Path) -> Command {
    let mut c = Command::new(binary);
    c.args(["run", "--config"])
        .arg(config)
        .env("DUALROUTE_LOG", "info")
        .env_remove(THREADS_VAR)
        .stderr(Stdio::null());
    c
}

/// milter.yaml for one split domain `bench.test` with `accounts` accounts
/// (user0@ … and alice@, bob@), listening on `listen`; with
/// `reject_unknown`, routed recipients are asked of the destination
/// (`reject_unknown: { callout: true }`, DESIGN.md §10).
fn write_config(
    dir: &Path,
    listen: &str,
    accounts: usize,
    name: &str,
    destination: &str,
    reject_unknown: bool,
) -> PathBuf {
    let file = dir.join("accounts");
    if !file.exists() {
        let mut text = String::with_capacity(accounts * 24);
        text.push_str("alice@bench.test\nbob@bench.test\n");
        for i in 0..accounts {
            text.push_str(&format!("user{i}@bench.test\n"));
        }
        std::fs::write(&file, text).expect("write the accounts");
    }
    let config = dir.join(name);
    let ask = if reject_unknown {
        ", reject_unknown: { callout: true }"
    } else {
        ""
    };
    // Each configuration its own state_dir: the callout cache of one arm
    // is not another's.
    let yaml = format!(
        "listen: {listen}\ninstance: bench.test\nstate_dir: {}\ndomains:\n  bench.test:\n    mode: split\n    destination: {{ hosts: [\"{destination}\"]{ask} }}\n    accounts:\n      - file: {}\n",
        dir.join(format!("state-{name}")).display(),
        file.display()
    );
    std::fs::write(&config, yaml).expect("write milter.yaml");
    config
}

// ---------------------------------------------------------------------
// Protocol arm.
// ---------------------------------------------------------------------

/// Where a milter of the protocol arm listens.
#[derive(Clone, Debug)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl Endpoint {
    fn socket(&self) -> String {
        match self {
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
            Endpoint::Tcp(port) => format!("inet:127.0.0.1:{port}"),
        }
    }

    /// The same in libmilter's syntax.
    fn libmilter_socket(&self) -> String {
        match self {
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
            Endpoint::Tcp(port) => format!("inet:{port}@127.0.0.1"),
        }
    }

    fn ready(&self) -> bool {
        match self {
            Endpoint::Unix(path) => unix_ready(path)(),
            Endpoint::Tcp(port) => tcp_ready(*port)(),
        }
    }
}

/// One conversation as an MTA has it.
async fn conversation(at: &Endpoint) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_owned();
        move |err: indymilter_test::TestError| format!("{what}: {err}")
    };
    let mta = TestConnection::configure();
    let mut c = match at {
        Endpoint::Unix(path) => mta.open_unix(path).await,
        Endpoint::Tcp(port) => mta.open_tcp(("127.0.0.1", *port)).await,
    }
    .map_err(e("negotiate"))?;
    let skipped = c.negotiated_opts();
    // The macros Postfix sends a milter that asks for dualroute's lists
    // (src/milter.rs): its defaults at connect, `{rcpt_addr}` (its own
    // parse of the argument) at RCPT and the queue id at end of message.
    // Every arm gets the same bytes.
    c.macros(
        MacroStage::Connect,
        [
            ("j", "mx.bench.test"),
            ("{daemon_name}", "mx.bench.test"),
            ("{daemon_addr}", "127.0.0.1"),
            ("v", "Postfix 3.7.11"),
            ("_", "client.example.org [203.0.113.9]"),
        ],
    )
    .await
    .map_err(e("connect macros"))?;
    c.connect(
        "client.example.org",
        std::net::IpAddr::from([203, 0, 113, 9]),
    )
    .await
    .map_err(e("connect"))?;
    if !skipped.contains(ProtoOpts::NO_HELO) {
        c.helo("client.example.org").await.map_err(e("helo"))?;
    }
    c.mail(["<sender@example.org>"]).await.map_err(e("mail"))?;
    for rcpt in ["<alice@bench.test>", "<bob@bench.test>", "<zed@bench.test>"] {
        let parsed = &rcpt[1..rcpt.len() - 1];
        c.macros(MacroStage::Rcpt, [("{rcpt_addr}", parsed)])
            .await
            .map_err(e("rcpt macros"))?;
        c.rcpt([rcpt]).await.map_err(e("rcpt"))?;
    }
    if !skipped.contains(ProtoOpts::NO_DATA) {
        c.data().await.map_err(e("data"))?;
    }
    if !skipped.contains(ProtoOpts::NO_HEADER) {
        c.header("Subject", "bench").await.map_err(e("header"))?;
    }
    if !skipped.contains(ProtoOpts::NO_EOH) {
        c.eoh().await.map_err(e("eoh"))?;
    }
    c.macros(MacroStage::Eom, [("i", "4XyZ1k2LmNzq")])
        .await
        .map_err(e("eom macros"))?;
    let (actions, status) = c.eom().await.map_err(e("eom"))?;
    if status != indymilter_test::Status::Continue || actions.actions.len() != 3 {
        return Err(format!("end of message: {status:?} {:?}", actions.actions));
    }
    c.close().await.map_err(e("close"))
}

/// RCPT latency of `reject_unknown` (DESIGN.md §10) through the milter at
/// `at`, one at a time: `n` cold callouts (a new address each, which the
/// loopback destination refuses: the milter asks it, waits, caches and
/// replies 550) beside the same RCPT answered from the cache, and the
/// RCPT of a mailbox here (no callout) as the floor. `n` stays under the
/// 60 new callouts a minute the engine allows a destination.
fn callout_latency(runtime: &tokio::runtime::Runtime, at: &Endpoint, n: usize) {
    let rcpt_time = |rcpt: String| {
        let at = at.clone();
        runtime.block_on(async move {
            let mta = TestConnection::configure();
            let mut c = match &at {
                Endpoint::Unix(path) => mta.open_unix(path).await,
                Endpoint::Tcp(port) => mta.open_tcp(("127.0.0.1", *port)).await,
            }
            .expect("negotiate");
            c.connect(
                "client.example.org",
                std::net::IpAddr::from([203, 0, 113, 9]),
            )
            .await
            .expect("connect");
            c.mail(["<sender@example.org>"]).await.expect("mail");
            let parsed = rcpt[1..rcpt.len() - 1].to_owned();
            c.macros(MacroStage::Rcpt, [("{rcpt_addr}", parsed.as_str())])
                .await
                .expect("rcpt macros");
            let t = Instant::now();
            let status = c.rcpt([rcpt.as_str()]).await.expect("rcpt");
            let took = t.elapsed();
            c.close().await.expect("close");
            (took, status)
        })
    };
    let stamp = std::process::id();
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    let mut here = Vec::new();
    for i in 0..n {
        let address = format!("<cold{stamp}x{i}@bench.test>");
        let (took, status) = rcpt_time(address.clone());
        assert!(
            matches!(status, indymilter_test::Status::Reject { .. }),
            "a cold callout for {address}: {status:?}"
        );
        cold.push(took);
        let (took, status) = rcpt_time(address.clone());
        assert!(
            matches!(status, indymilter_test::Status::Reject { .. }),
            "the cached answer for {address}: {status:?}"
        );
        cached.push(took);
        here.push(rcpt_time("<alice@bench.test>".into()).0);
    }
    let show = |mut v: Vec<Duration>| {
        v.sort();
        format!(
            "p50 {:>9.1?}  p90 {:>9.1?}  max {:>9.1?}",
            v[v.len() / 2],
            v[(v.len() * 9 / 10).min(v.len() - 1)],
            v[v.len() - 1]
        )
    };
    println!("reject_unknown RCPT latency, {n} addresses one at a time, loopback destination:");
    println!("  cold callout (550 from the destination)  {}", show(cold));
    println!(
        "  the same address, cached                  {}",
        show(cached)
    );
    println!("  a mailbox here (no callout)               {}", show(here));
}

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    cpu_us: f64,
    /// The user-space part of `cpu_us` (the rest is the kernel's).
    user_us: f64,
    /// Conversations that failed (the first error is printed).
    failed: usize,
    /// Conversations that succeeded.
    done: usize,
}

/// `concurrency` clients in a closed loop for `secs`.
fn load(
    runtime: &tokio::runtime::Runtime,
    server: &Server,
    at: &Endpoint,
    concurrency: usize,
    secs: f64,
) -> Run {
    let (user_before, system_before) = server.cpu_split();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let at = Arc::new(at.clone());
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut latencies: Vec<Duration> = runtime.block_on(async {
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (at, failed) = (at.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while Instant::now() < until {
                        let t = Instant::now();
                        match conversation(&at).await {
                            Ok(()) => seen.push(t.elapsed()),
                            Err(e) => {
                                if failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                                    eprintln!("conversation failed: {e}");
                                }
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (user, system) = server.cpu_split();
    let user = user.saturating_sub(user_before);
    let cpu = user + system.saturating_sub(system_before);
    latencies.sort();
    let n = latencies.len();
    assert!(n > 0, "no conversation completed in {secs}s");
    Run {
        per_sec: n as f64 / elapsed,
        p50: latencies[n / 2],
        p99: latencies[(n * 99 / 100).min(n - 1)],
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        user_us: user.as_secs_f64() * 1e6 / n as f64,
        failed: failed.load(std::sync::atomic::Ordering::Relaxed),
        done: n,
    }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn protocol_arm(o: &Options) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    let mut servers: Vec<(Endpoint, Server)> = Vec::new();
    // Every DUALROUTE_THREADS setting asked for, or the default alone.
    let threads: Vec<Option<&str>> = if o.threads.is_empty() {
        vec![None]
    } else {
        o.threads.iter().map(|t| Some(t.as_str())).collect()
    };
    let label = |t: Option<&str>| t.map(|t| format!(" t={t}")).unwrap_or_default();
    // The destination of the reject_unknown arm: a loopback SMTP server
    // that knows zed@bench.test (tests/support/callout_stub.rs).
    let destination =
        callout_stub::CalloutStub::start(&["zed@bench.test"], callout_stub::Mode::Directory);
    let mut cold: Option<Endpoint> = None;
    // Each milter over a unix socket, and with --tcp over TCP too.
    let mut endpoints = vec![("", Endpoint::Unix(PathBuf::new()))];
    if o.tcp {
        endpoints.push((" inet", Endpoint::Tcp(0)));
    }
    for (suffix, kind) in endpoints {
        let at = |name: &str| match kind {
            Endpoint::Unix(_) => Endpoint::Unix(dir.join(format!("{name}.sock"))),
            Endpoint::Tcp(_) => Endpoint::Tcp(unused_port()),
        };
        let this = PathBuf::from(env!("CARGO_BIN_EXE_dualroute"));
        // The third arm asks the destination about the routed recipient
        // (zed@bench.test) with `reject_unknown`, every answer cached
        // after the first conversation (issue 23: the per-RCPT path with
        // a cache hit).
        let mut binaries = vec![("dualroute", this.clone(), false)];
        binaries.extend(o.before.clone().map(|b| ("dualroute before", b, false)));
        binaries.push(("dualroute reject_unknown", this, true));
        for (name, binary, reject_unknown) in binaries {
            for &t in &threads {
                let tag = format!("{name}{}{suffix}", label(t));
                let dr = at(&tag.replace(' ', "-"));
                let config = write_config(
                    dir,
                    &dr.socket(),
                    o.accounts,
                    &format!("{}.yaml", tag.replace(' ', "-")),
                    &if reject_unknown {
                        destination.host()
                    } else {
                        "[192.0.2.30]:2525".to_owned()
                    },
                    reject_unknown,
                );
                let mut command = dualroute_at(&binary, &config);
                if let Some(t) = t {
                    command.env(THREADS_VAR, t);
                }
                let started = Instant::now();
                let server = Server::start(&tag, under(o, dir, command), || dr.ready());
                println!(
                    "{tag} with {} accounts: socket ready after {:.2}s",
                    o.accounts + 2,
                    started.elapsed().as_secs_f64()
                );
                if reject_unknown {
                    cold.get_or_insert(dr.clone());
                }
                servers.push((dr, server));
            }
        }
        // The no-op as it is, and with --noop-preload also with that
        // malloc (e.g. mimalloc, which dualroute links for small blocks).
        let mallocs = std::iter::once(None).chain(o.noop_preload.iter().map(Some));
        for preload in mallocs {
            for &t in &threads {
                // `libmimalloc.so.2` → ` mimalloc`.
                let with = preload
                    .and_then(|p| p.file_name())
                    .map(|f| {
                        let f = f.to_string_lossy();
                        let f = f.strip_prefix("lib").unwrap_or(&f);
                        format!(" {}", f.split('.').next().unwrap_or(f))
                    })
                    .unwrap_or_default();
                let tag = format!("no-op indymilter{with}{}{suffix}", label(t));
                let nop = at(&tag.replace(' ', "-"));
                let mut command = noop(&nop.socket(), "alike");
                if let Some(t) = t {
                    command.env(THREADS_VAR, t);
                }
                if let Some(p) = preload {
                    command.env("LD_PRELOAD", p);
                }
                let server = Server::start(&tag, under(o, dir, command), || nop.ready());
                servers.push((nop, server));
            }
        }
        if let Some(lib) = &o.libmilter {
            let lm = at("libmilter");
            let mut c = Command::new(lib);
            c.arg(lm.libmilter_socket());
            let server = Server::start(
                &format!("libmilter no-op{suffix}"),
                under(o, dir, c),
                || lm.ready(),
            );
            servers.push((lm, server));
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // The callout latency first (the cache of the reject_unknown arm is
    // empty), which also warms that cache for the protocol arm.
    if let Some(at) = &cold {
        callout_latency(&runtime, at, if o.quick { 5 } else { 40 });
    }
    println!(
        "protocol arm: {} reps x {}s, interleaved; conversation = connect, HELO, MAIL, 3 RCPT, DATA, header, EOH, EOM with 3 actions",
        o.reps, o.secs
    );
    println!(
        "{:<34} {:>4} {:>10} {:>9} {:>9} {:>8} {:>8} {:>13}",
        "milter",
        "C",
        "conv/s",
        "p50",
        "p99",
        if o.callgrind { "instr." } else { "CPU µs" },
        if o.callgrind { "" } else { "user µs" },
        "vs best no-op"
    );
    for &c in &o.concurrency {
        let mut runs: Vec<Vec<Run>> = servers.iter().map(|_| Vec::new()).collect();
        for _ in 0..o.reps {
            for (i, (at, server)) in servers.iter().enumerate() {
                if o.callgrind {
                    callgrind_control(server, "-z");
                }
                let mut run = load(&runtime, server, at, c, o.secs);
                if o.callgrind {
                    run.cpu_us = instructions(server, dir) / run.done as f64;
                }
                assert_eq!(run.failed, 0, "{}: failed conversations", server.name);
                runs[i].push(run);
            }
        }
        let med: Vec<(f64, Duration, Duration, f64, f64)> = runs
            .iter()
            .map(|r| {
                let mut p50: Vec<_> = r.iter().map(|x| x.p50).collect();
                let mut p99: Vec<_> = r.iter().map(|x| x.p99).collect();
                p50.sort();
                p99.sort();
                (
                    median_f(r.iter().map(|x| x.per_sec).collect()),
                    p50[p50.len() / 2],
                    p99[p99.len() / 2],
                    median_f(r.iter().map(|x| x.cpu_us).collect()),
                    median_f(r.iter().map(|x| x.user_us).collect()),
                )
            })
            .collect();
        // The best no-op of this concurrency (issue 10's yardstick).
        let noop_rate = servers
            .iter()
            .zip(&med)
            .filter(|((_, s), _)| s.name.starts_with("no-op"))
            .map(|(_, m)| m.0)
            .fold(0.0, f64::max);
        for ((_, server), (rate, p50, p99, cpu, user)) in servers.iter().zip(&med) {
            let user = if o.callgrind {
                String::new()
            } else {
                format!("{user:.0}")
            };
            println!(
                "{:<34} {:>4} {:>10.0} {:>9.0?} {:>9.0?} {:>8.0} {:>8} {:>12.2}x",
                server.name,
                c,
                rate,
                p50,
                p99,
                cpu,
                user,
                rate / noop_rate
            );
        }
    }
}

/// `command` as it is, under callgrind (`--callgrind`), collecting
/// nothing until [`callgrind_control`] zeroes the counters, and with
/// `--pin` on the second CPU.
fn under(o: &Options, dir: &Path, command: Command) -> Command {
    let command = if o.callgrind {
        wrapped(
            "valgrind",
            &[
                "--tool=callgrind".into(),
                "--quiet".into(),
                format!("--callgrind-out-file={}/callgrind.%p", dir.display()),
            ],
            command,
        )
    } else {
        command
    };
    if o.pin {
        wrapped("taskset", &["--cpu-list".into(), "1".into()], command)
    } else {
        command
    }
}

/// `command` run by `program` with `args` before it, in the same
/// environment; its standard error discarded.
fn wrapped(program: &str, args: &[String], command: Command) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .arg(command.get_program())
        .args(command.get_args())
        .stderr(Stdio::null());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// `--pin`: this process (the load client, and every thread it starts
/// from now on) on the first CPU; the milters go on the second
/// ([`under`]), where the client cannot preempt them.
fn pin_client() {
    let ok = Command::new("taskset")
        .args(["--cpu-list", "--pid", "0"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "taskset failed (package util-linux; --pin needs two CPUs)"
    );
}

fn callgrind_control(server: &Server, what: &str) {
    let ok = Command::new("callgrind_control")
        .arg(what)
        .arg(server.child.id().to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "callgrind_control {what} {} failed (package valgrind)",
        server.name
    );
}

/// Instructions the milter executed since the counters were last zeroed
/// (a dump, then its `summary:` line).
fn instructions(server: &Server, dir: &Path) -> f64 {
    callgrind_control(server, "-d");
    let prefix = format!("callgrind.{}.", server.child.id());
    let newest = std::fs::read_dir(dir)
        .expect("read the callgrind directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .max()
        .map(|(_, p)| p)
        .expect("a callgrind dump");
    let text = std::fs::read_to_string(&newest).expect("read the callgrind dump");
    // Kept for callgrind_annotate: target/callgrind/NAME.out.
    let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/callgrind");
    let _ = std::fs::create_dir_all(&keep);
    let _ = std::fs::copy(
        &newest,
        keep.join(format!("{}.out", server.name.replace(' ', "-"))),
    );
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a summary line in the callgrind dump")
}

// ---------------------------------------------------------------------
// Cluster arm.
// ---------------------------------------------------------------------

/// Appends a `cluster:` block for `redis` to the configuration at `path`.
fn with_cluster(path: &Path, instance: &str, redis: &str) {
    let text = std::fs::read_to_string(path).expect("read milter.yaml");
    let text = text.replace("instance: bench.test\n", &format!("instance: {instance}\n"));
    std::fs::write(
        path,
        format!("{text}cluster: {{ redis: \"{redis}\", sync: 1s }}\n"),
    )
    .expect("write milter.yaml");
}

fn redis_commands(redis: &support::redis::Redis) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

fn cluster_arm(o: &Options) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    let redis = support::redis::Redis::start();
    let this = PathBuf::from(env!("CARGO_BIN_EXE_dualroute"));
    let mut servers: Vec<(Endpoint, Server)> = Vec::new();
    for (tag, cluster) in [("dualroute", false), ("dualroute cluster", true)] {
        let at = Endpoint::Unix(dir.join(format!("{}.sock", tag.replace(' ', "-"))));
        let config = write_config(
            dir,
            &at.socket(),
            o.accounts,
            &format!("{}.yaml", tag.replace(' ', "-")),
            "[192.0.2.30]:2525",
            false,
        );
        if cluster {
            with_cluster(&config, "bench-1.test", &redis.url());
        }
        let server = Server::start(tag, under(o, dir, dualroute_at(&this, &config)), || {
            at.ready()
        });
        servers.push((at, server));
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "cluster arm: {} reps x {}s, interleaved; the same protocol conversation with and without cluster.redis",
        o.reps, o.secs
    );
    println!(
        "{:<22} {:>4} {:>10} {:>9} {:>9} {:>8} {:>13}",
        "milter", "C", "conv/s", "p50", "p99", "CPU µs", "Redis cmd/s"
    );
    for &c in &o.concurrency {
        let mut runs: Vec<Vec<(Run, f64)>> = servers.iter().map(|_| Vec::new()).collect();
        for _ in 0..o.reps {
            for (i, (at, server)) in servers.iter().enumerate() {
                let (before, started) = (redis_commands(&redis), Instant::now());
                let run = load(&runtime, server, at, c, o.secs);
                // The bench's own INFO call is one command.
                let per_sec = (redis_commands(&redis).saturating_sub(before + 1)) as f64
                    / started.elapsed().as_secs_f64();
                assert_eq!(run.failed, 0, "{}: failed conversations", server.name);
                runs[i].push((run, per_sec));
            }
        }
        for ((_, server), r) in servers.iter().zip(&runs) {
            let mut p50: Vec<_> = r.iter().map(|x| x.0.p50).collect();
            let mut p99: Vec<_> = r.iter().map(|x| x.0.p99).collect();
            p50.sort();
            p99.sort();
            println!(
                "{:<22} {:>4} {:>10.0} {:>9.0?} {:>9.0?} {:>8.0} {:>13.1}",
                server.name,
                c,
                median_f(r.iter().map(|x| x.0.per_sec).collect()),
                p50[p50.len() / 2],
                p99[p99.len() / 2],
                median_f(r.iter().map(|x| x.0.cpu_us).collect()),
                median_f(r.iter().map(|x| x.1).collect()),
            );
        }
    }
    drop(servers);
    propagation(o, dir, &this, &redis);
}

/// Two `dualroute run` nodes on one Redis: `disable` typed on node 1
/// (the CLI writes its state_dir), the time until node 2's state_dir has
/// the record; then `enable` on node 2, until node 1's is gone.
fn propagation(o: &Options, dir: &Path, this: &Path, redis: &support::redis::Redis) {
    let mut nodes = Vec::new();
    for n in 1..=2 {
        let at = Endpoint::Unix(dir.join(format!("node{n}.sock")));
        let name = format!("node{n}.yaml");
        let config = write_config(dir, &at.socket(), 10, &name, "[192.0.2.30]:2525", false);
        with_cluster(&config, &format!("bench-node{n}.test"), &redis.url());
        let server = Server::start(&name, dualroute_at(this, &config), || at.ready());
        let state = dir.join(format!("state-{name}"));
        nodes.push((config, server, state));
    }
    let admin = |config: &Path, args: &[&str]| {
        let out = Command::new(this)
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .expect("run dualroute");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let record = |state: &Path| state.join("bench.test.disabled");
    let wait = |what: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !what() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no propagation in 30 s; Redis has: {}",
                redis.cli(&["KEYS", "*"])
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    };
    // Both nodes in the fleet first (the arm's own node is listed too).
    wait(&|| {
        ["bench-node1.test", "bench-node2.test"]
            .iter()
            .all(|n| redis.cli(&["HEXISTS", "dualroute:nodes", n]).trim() == "1")
    });
    let rounds = if o.quick { 3 } else { 20 };
    let mut times = Vec::new();
    for _ in 0..rounds {
        admin(&nodes[0].0, &["disable", "bench.test", "--reason", "bench"]);
        times.push(wait(&|| record(&nodes[1].2).exists()));
        admin(&nodes[1].0, &["enable", "bench.test"]);
        times.push(wait(&|| !record(&nodes[0].2).exists()));
    }
    times.sort();
    println!(
        "cluster propagation: a disable on one node reaches the other's state_dir, and an enable back, {} changes: median {:.0?}, p99 {:.0?}, max {:.0?} (sync: 1s; the node looks at its own records every second)",
        times.len(),
        times[times.len() / 2],
        times[(times.len() * 99 / 100).min(times.len() - 1)],
        times[times.len() - 1]
    );
}

// ---------------------------------------------------------------------
// Reload arm.
// ---------------------------------------------------------------------

/// dualroute under load at the highest `--concurrency` while it gets a
/// SIGHUP every second (each reload reads milter.yaml and every account
/// again, docs/design.md §7): no conversation may fail, and the rate is
/// set beside a run without reloads.
fn reload_arm(o: &Options) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    let at = Endpoint::Unix(dir.join("dualroute.sock"));
    let config = write_config(
        dir,
        &at.socket(),
        o.accounts,
        "milter.yaml",
        "[192.0.2.30]:2525",
        false,
    );
    let server = Server::start("dualroute", dualroute(&config), || at.ready());
    let c = o.concurrency.iter().copied().max().unwrap_or(64);
    let secs = if o.quick { 2.0 } else { o.secs.max(10.0) };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "reload arm: C={c}, {secs}s per run, {} accounts, SIGHUP every second; {} reps, interleaved",
        o.accounts + 2,
        o.reps
    );
    let pid = server.child.id().to_string();
    let mut quiet = Vec::new();
    let mut reloading = Vec::new();
    let mut signals = 0;
    let mut failed = 0;
    for _ in 0..o.reps {
        quiet.push(load(&runtime, &server, &at, c, secs));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hup = {
            let (stop, pid) = (stop.clone(), pid.clone());
            std::thread::spawn(move || {
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    let ok = Command::new("kill")
                        .args(["-HUP", &pid])
                        .status()
                        .is_ok_and(|s| s.success());
                    assert!(ok, "kill -HUP {pid} failed");
                    sent += 1;
                }
                sent
            })
        };
        let run = load(&runtime, &server, &at, c, secs);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        signals += hup.join().expect("SIGHUP thread");
        failed += run.failed + quiet.last().map_or(0, |r| r.failed);
        reloading.push(run);
    }
    assert!(at.ready(), "dualroute stopped serving during the reloads");
    let med = |runs: &[Run]| median_f(runs.iter().map(|r| r.per_sec).collect());
    let (q, r) = (med(&quiet), med(&reloading));
    println!("{:<28} {:>10} {:>9}", "run", "conv/s", "failed");
    println!(
        "{:<28} {q:>10.0} {:>9}",
        "no reload",
        quiet.iter().map(|r| r.failed).sum::<usize>()
    );
    println!(
        "{:<28} {r:>10.0} {:>9}   ({signals} SIGHUPs, {:.2}x)",
        "SIGHUP every second",
        reloading.iter().map(|r| r.failed).sum::<usize>(),
        r / q
    );
    assert_eq!(failed, 0, "failed conversations during reloads");
}

/// A loopback port nothing listens on now, for a milter the benchmark
/// starts and that binds it itself (the baseline builds and the no-op
/// take no socket from us, unlike the tests' `MilterProcess`:
/// tests/support/ports.rs). Unlike the tests, a benchmark may lose this
/// race: another process that takes the port in between makes that
/// milter fail to bind, with the error in its output. Acceptable for a
/// benchmark run by hand on a quiet machine, not for a test.
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

// ---------------------------------------------------------------------
// Postfix arm.
// ---------------------------------------------------------------------

fn postfix_arm(o: &Options) {
    use support::{Postfix, PostfixOptions};
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    // smtpd (user postfix) connects to the unix sockets in here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temporary directory");
    // dualroute makes its socket 0660 with the directory's group: that
    // group must be postfix's for smtpd to connect.
    let (_, postfix_gid) = support::user_ids("postfix");
    std::os::unix::fs::chown(dir, None, Some(postfix_gid))
        .expect("chgrp the temporary directory to postfix");
    for tool in ["smtp-source", "postfix"] {
        assert!(
            Command::new("sh")
                .args([
                    "-c",
                    &format!("command -v {tool} || test -x /usr/sbin/{tool}")
                ])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: run scripts/test-deps.sh (Debian package postfix)"
        );
    }

    // The milters: dualroute and the no-op over a unix socket and over
    // TCP; the no-op's protocol options one by one, over a unix socket.
    let dr_port = unused_port();
    let noop_port = unused_port();
    let dr_unix = dir.join("dualroute.sock");
    let mut servers = Vec::new();
    // Routed mail goes to a sink standing in for the other server.
    let sink = support::SmtpSink::start();
    let to = sink.nexthop();
    let inet = write_config(
        dir,
        &format!("inet:127.0.0.1:{dr_port}"),
        0,
        "inet.yaml",
        &to,
        false,
    );
    servers.push(Server::start(
        "dualroute inet",
        dualroute(&inet),
        tcp_ready(dr_port),
    ));
    let unix = write_config(
        dir,
        &format!("unix:{}", dr_unix.display()),
        0,
        "unix.yaml",
        &to,
        false,
    );
    servers.push(Server::start(
        "dualroute unix",
        dualroute(&unix),
        unix_ready(&dr_unix),
    ));
    servers.push(Server::start(
        "no-op inet",
        noop(&format!("inet:127.0.0.1:{noop_port}"), "naive"),
        tcp_ready(noop_port),
    ));
    const KEPT: &str = "alice@bench.test";
    const ROUTED: &str = "zed@bench.test";
    let mut arms: Vec<(String, String, &str)> = vec![
        ("no milter".into(), String::new(), KEPT),
        (
            "no-op indymilter naive, inet".into(),
            format!("inet:127.0.0.1:{noop_port}"),
            KEPT,
        ),
    ];
    for mode in ["naive", "skip", "quiet"] {
        let path = dir.join(format!("noop-{mode}.sock"));
        servers.push(Server::start(
            &format!("no-op {mode}"),
            noop(&format!("unix:{}", path.display()), mode),
            unix_ready(&path),
        ));
        arms.push((
            format!("no-op indymilter {mode}, unix"),
            format!("unix:{}", path.display()),
            KEPT,
        ));
    }
    let dr_unix = format!("unix:{}", dr_unix.display());
    let dr_inet = format!("inet:127.0.0.1:{dr_port}");
    arms.push(("dualroute unix".into(), dr_unix.clone(), KEPT));
    arms.push(("dualroute inet".into(), dr_inet.clone(), KEPT));
    arms.push(("dualroute unix, routed".into(), dr_unix, ROUTED));
    arms.push(("dualroute inet, routed".into(), dr_inet, ROUTED));

    // What `dualroute postfix-config` prints (transport to the sink,
    // generic map, catch-all), as an admin applies it; each smtpd below
    // sets its own smtpd_milters.
    let generated = support::postfix_config(&unix, &dir.join("postfix-config"));
    let mut opts = generated
        .apply_to(PostfixOptions::default().domain_without_catchall("bench.test", &[KEPT]));
    let mut ports = Vec::new();
    for (_, milter, _) in &arms {
        let port = unused_port();
        let setting = format!(" -o smtpd_milters={milter} -o milter_default_action=tempfail");
        opts = opts.master_cf(&format!("127.0.0.1:{port} inet n - n - - smtpd{setting}"));
        ports.push(port);
    }
    let pf = Postfix::start(opts);
    println!(
        "no-op modes: naive = every stage, nothing skipped; skip = dualroute's stages only; quiet = skip + no reply at connect, MAIL and header"
    );
    println!(
        "Postfix arm: smtp-source -c -s 8 -m {} -l 2048, {} reps, interleaved; one recipient: kept (Maildir) or routed (to an smtp-sink)",
        o.messages, o.reps
    );
    let source = |port: u16, rcpt: &str, messages: usize| {
        let started = Instant::now();
        let status = Command::new("smtp-source")
            .args(["-c", "-s", "8", "-l", "2048", "-m"])
            .arg(messages.to_string())
            .args(["-f", "sender@outside.test", "-t", rcpt])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run smtp-source");
        assert!(status.success(), "smtp-source to port {port} failed");
        let secs = started.elapsed().as_secs_f64();
        pf.wait_queue_empty();
        messages as f64 / secs
    };
    // Warm-up: every smtpd, milter and delivery agent started once.
    let warm_up = 20;
    for (port, (_, _, rcpt)) in ports.iter().zip(&arms) {
        source(*port, rcpt, warm_up);
    }
    let mut rates: Vec<Vec<f64>> = arms.iter().map(|_| Vec::new()).collect();
    for _ in 0..o.reps {
        for (i, (port, (_, _, rcpt))) in ports.iter().zip(&arms).enumerate() {
            rates[i].push(source(*port, rcpt, o.messages));
        }
    }
    let per_arm = o.messages * o.reps + warm_up;
    let routed_arms = arms.iter().filter(|a| a.2 == ROUTED).count();
    let routed = sink.wait_messages(per_arm * routed_arms).len();
    assert_eq!(routed, per_arm * routed_arms, "routed messages at the sink");
    let delivered = pf.maildir_messages(KEPT).len();
    let expected = per_arm * (arms.len() - routed_arms);
    assert_eq!(
        delivered, expected,
        "every message must arrive ({delivered} of {expected})"
    );
    let base = median_f(rates[0].clone());
    println!("{:<38} {:>10} {:>12}", "arm", "msg/s", "vs no milter");
    for ((name, _, _), r) in arms.iter().zip(&rates) {
        let m = median_f(r.clone());
        println!("{name:<38} {m:>10.0} {:>11.2}x", m / base);
    }
    drop(servers);
}
