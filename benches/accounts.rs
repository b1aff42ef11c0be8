//! Account loading at scale: one million addresses from a file, loaded the
//! way the milter loads them, beside a naive `HashSet<String>` baseline in
//! the same run. Prints load time (median of runs) and memory.
//!
//! Then the whole milter: `dualroute run` with one split domain of COUNT
//! accounts, timed from start to socket ready, with the peak resident
//! memory of its process (issue 10's targets: 1M ≤ 48 MB and ≤ 1 s, 10M ≤
//! 400 MB and ≤ 10 s). `--before PATH` runs an earlier build beside it.
//!
//! cargo bench --bench accounts [-- COUNT] [--before PATH] [--whole-only]

use dualroute::accounts::{self, MatchRules};
use dualroute::config::{AccountSource, LocalPartCase};
use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn rss_kib(field: &str) -> u64 {
    proc_kib(std::process::id(), field)
}

/// A `kB` field of /proc/PID/status.
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `dualroute run` on the accounts file: seconds from start to a socket
/// that accepts, the CPU seconds it took, and the process's peak resident
/// memory (VmHWM) in KiB,
/// read once the socket is ready (loading is over) and after a second.
fn whole_milter(binary: &Path, dir: &Path, accounts: &Path) -> (f64, f64, u64) {
    let socket = dir.join(format!("milter-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let config = dir.join("milter.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: unix:{}\ninstance: bench.test\nstate_dir: {}\ndomains:\n  example.com:\n    mode: split\n    destination: {{ hosts: [\"[192.0.2.30]:2525\"] }}\n    accounts:\n      - file: {}\n",
            socket.display(),
            dir.join("state").display(),
            accounts.display()
        ),
    )
    .expect("write milter.yaml");
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("DUALROUTE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("dualroute exited ({status}) before its socket was ready");
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not ready after 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let peak = proc_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    (ready, cpu, peak)
}

/// User + system CPU seconds of a process so far (fields 14 and 15 of
/// /proc/PID/stat, in 1/100 s): on a busy machine the wall-clock time to
/// ready says more about the other processes than about this one.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn main() {
    let mut count = 1_000_000;
    let mut earlier: Option<PathBuf> = None;
    let mut whole_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--before" => earlier = args.next().map(PathBuf::from),
            "--whole-only" => whole_only = true,
            "--bench" => {}
            n => count = n.parse().unwrap_or_else(|_| panic!("bad argument {n:?}")),
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("accounts");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
        // Not in order: sorted input would flatter a sorted index.
        let step = if count % 7919 == 0 { 1 } else { 7919 };
        for i in 0..count {
            let n = (i * step) % count;
            writeln!(f, "User.{n:07}.name@example.com").expect("write");
        }
    }
    if !whole_only {
        in_process(count, &path);
    }
    let mut binaries = vec![("dualroute", PathBuf::from(env!("CARGO_BIN_EXE_dualroute")))];
    binaries.extend(earlier.map(|b| ("dualroute before", b)));
    let mut figures: Vec<[Vec<f64>; 3]> = binaries.iter().map(|_| Default::default()).collect();
    for _ in 0..3 {
        for (i, (_, binary)) in binaries.iter().enumerate() {
            let (ready, cpu, peak) = whole_milter(binary, dir.path(), &path);
            figures[i][0].push(ready);
            figures[i][1].push(cpu);
            figures[i][2].push(peak as f64 / 1024.0);
        }
    }
    println!("  whole milter (`dualroute run`, {count} accounts), median of 3 starts:");
    for ((name, _), [ready, cpu, peak]) in binaries.iter().zip(figures) {
        println!(
            "    {name:<17} socket ready after {:.2} s ({:.2} s CPU)   process peak {:.1} MiB",
            median(ready),
            median(cpu),
            median(peak)
        );
    }
}

/// The accounts loaded in this process, beside a `HashSet<String>`.
fn in_process(count: usize, path: &Path) {
    let rules = MatchRules {
        case: LocalPartCase::Insensitive,
        delimiters: "+".into(),
    };
    let sources = [AccountSource::File(path.to_owned())];
    let runs = 5;

    let before = rss_kib("VmRSS:");
    let mut times = Vec::new();
    let mut kept = None;
    for _ in 0..runs {
        drop(kept.take());
        let t = Instant::now();
        let (acc, _) = accounts::load("example.com", &sources, &rules).expect("load");
        times.push(t.elapsed().as_secs_f64());
        kept = Some(acc);
    }
    let acc = kept.expect("loaded");
    let after = rss_kib("VmRSS:");
    assert_eq!(acc.len(), count);
    assert!(acc.contains("user.0000042.name"));
    let ours = median(times);
    let t = Instant::now();
    let lookups = 1_000_000;
    let mut hits = 0;
    for i in 0..lookups {
        hits += acc.contains(&format!("user.{:07}.name", (i * 7919) % count)) as usize;
    }
    let lookup_ns = t.elapsed().as_nanos() as f64 / lookups as f64;
    assert_eq!(hits, lookups);
    let ours_peak = rss_kib("VmHWM:");

    // Baseline: read the file into a HashSet<String>.
    let mut times = Vec::new();
    let mut baseline = None;
    let before_b = rss_kib("VmRSS:");
    for _ in 0..runs {
        drop(baseline.take());
        let t = Instant::now();
        let text = std::fs::read_to_string(path).expect("read");
        let set: HashSet<String> = text
            .lines()
            .filter_map(|l| l.rsplit_once('@').map(|(local, _)| local.to_lowercase()))
            .collect();
        times.push(t.elapsed().as_secs_f64());
        baseline = Some(set);
    }
    let base_rss = rss_kib("VmRSS:").saturating_sub(before_b);
    let base = median(times);

    println!("accounts: {count} addresses, median of {runs} loads");
    println!("  dualroute Accounts     load {ours:.3} s   resident +{:.1} MiB   lookup {lookup_ns:.0} ns   process peak {:.1} MiB",
        after.saturating_sub(before) as f64 / 1024.0, ours_peak as f64 / 1024.0);
    println!(
        "  baseline HashSet<String> load {base:.3} s   resident +{:.1} MiB",
        base_rss as f64 / 1024.0
    );
    println!(
        "  ratio (ours / baseline): time {:.2}, memory {:.2}",
        ours / base,
        after.saturating_sub(before) as f64 / base_rss.max(1) as f64
    );

    // The whole milter, interleaved with the earlier build when given.
    drop((acc, baseline));
}
