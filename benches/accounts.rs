//! Account loading at scale: one million addresses from a file, loaded the
//! way the milter loads them, beside a naive `HashSet<String>` baseline in
//! the same run. Prints load time (median of runs) and memory.
//!
//! cargo bench --bench accounts [-- COUNT]

use dualroute::accounts::{self, MatchRules};
use dualroute::config::{AccountSource, LocalPartCase};
use std::{collections::HashSet, io::Write, time::Instant};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
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

fn main() {
    let count: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("accounts");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
        for i in 0..count {
            writeln!(f, "User.{i:07}.name@example.com").expect("write");
        }
    }
    let rules = MatchRules {
        case: LocalPartCase::Insensitive,
        delimiters: "+".into(),
    };
    let sources = [AccountSource::File(path.clone())];
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
        let text = std::fs::read_to_string(&path).expect("read");
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
}
