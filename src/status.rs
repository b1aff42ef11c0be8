//! `dualroute status [--json]`: what runs, and where the files differ from
//! it (issue 25; docs/design.md §7 "What runs"; README "status").
//!
//! The running milter publishes what it runs in `state_dir`
//! (src/running.rs); the routing state (holds, disputes, the breaker's
//! counts) is in the same directory. `status` reads both, compares the
//! milter's record with `milter.yaml` on disk and with the process table,
//! and ends with an exit code a monitoring check can use:
//!
//! - 0: a milter runs and every domain routes as configured;
//! - 1: something is held (disabled, tripped, waiting for verification,
//!   `enabled: false`, accounts held), a reload was refused, or the files
//!   differ from what runs (an edit not loaded yet);
//! - 2: no milter runs (or it stopped publishing), or the bounce breaker
//!   cannot read its source: a safety net that is not there.
//!
//! The human form and `--json` are built from one [`Report`]: every line
//! printed is also in the JSON, beside the fields a script reads.

use crate::config::Config;
use crate::holds::Hold;
use crate::running::{self, Liveness, Running};
use crate::state::{self, when, StateDir};
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;

/// The whole answer of `status`.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The exit code: 0, 1 or 2 (module documentation).
    pub exit: u8,
    /// `milter.yaml` as given.
    pub config: String,
    /// Why `milter.yaml` does not load, when it does not.
    pub config_error: Option<String>,
    pub milter: Milter,
    pub reload_refused: Option<state::ReloadRefused>,
    pub domains: Vec<Domain>,
    /// The bounce breaker's source, when a breaker ran here.
    pub breaker: Option<state::BreakerSource>,
    pub cluster: Option<Section>,
    pub postfix_queue: Option<String>,
    /// Each reason for a non-zero exit, in a few words.
    pub problems: Vec<String>,
    /// What `status` prints without `--json`, line by line.
    pub lines: Vec<String>,
}

/// The running milter as its record and the process table say.
#[derive(Debug, Default, Serialize)]
pub struct Milter {
    /// `running`, `not running`, or `silent` (the process exists but has
    /// not published for a minute).
    pub state: String,
    pub pid: Option<u32>,
    pub version: Option<String>,
    pub started: Option<u64>,
    pub heartbeat: Option<u64>,
    /// When the configuration in force was loaded.
    pub loaded: Option<u64>,
    /// The file on disk differs from what the milter loaded.
    pub config_changed: bool,
}

/// One domain.
#[derive(Debug, Default, Serialize)]
pub struct Domain {
    pub name: String,
    pub mode: String,
    pub shadow: bool,
    pub enabled: bool,
    /// `active`, `disabled`, `tripped`, `waiting`, `off` (enabled: false),
    /// `error` (its state cannot be read), `not loaded` (in milter.yaml,
    /// not in the running milter).
    pub state: String,
    /// Whether mail of the domain is routed as configured now.
    pub routing: bool,
    pub bounces: Option<u32>,
    pub deferrals: Option<u32>,
    /// Where the file and the running milter disagree about it.
    pub differs: Vec<String>,
    pub lines: Vec<String>,
}

/// A part reported as lines, and whether all is well in it.
#[derive(Debug, Default, Serialize)]
pub struct Section {
    pub ok: bool,
    pub lines: Vec<String>,
}

/// `dualroute status`: prints the report (JSON with `json`) and returns its
/// exit code.
pub fn status(path: &Path, json: bool) -> Result<ExitCode, String> {
    let report = report(path)?;
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| format!("cannot write the report as JSON: {e}"))?;
        println!("{text}");
    } else {
        for l in &report.lines {
            println!("{l}");
        }
    }
    Ok(ExitCode::from(report.exit))
}

/// Builds the report of `milter.yaml` at `path` and what runs.
pub fn report(path: &Path) -> Result<Report, String> {
    let mut r = Report {
        config: path.display().to_string(),
        ..Report::default()
    };
    // The configuration only: the account files may be exactly what the
    // running milter refused, and that refusal is what to show.
    let (config, digest) = match crate::config::read::read_file_digest(path) {
        Ok(x) => x,
        Err(e) => {
            // An edit that does not load: the running milter keeps what it
            // had; show that, from the state_dir the file still names.
            let dir = StateDir::new(&fallback_state_dir(path));
            return match running::read(&dir).ok().flatten() {
                Some(run) if Path::new(&run.config_path) == path => {
                    milter_lines(&mut r, Some(&run), None);
                    r.config_error = Some(e.to_string());
                    r.problem(
                        1,
                        format!("{e}: this milter.yaml does not load; a reload would be refused, the running milter keeps what it loaded"),
                    );
                    reload_refused(&mut r, &dir);
                    r.finish();
                    Ok(r)
                }
                _ => Err(e.to_string()),
            };
        }
    };
    let dir = StateDir::new(&config.state_dir);
    let run = match running::read(&dir) {
        Ok(x) => x,
        Err(e) => {
            r.problem(2, format!("ERROR: cannot read what the milter runs: {e}"));
            None
        }
    };
    milter_lines(&mut r, run.as_ref(), Some(&digest));
    let run = run.filter(|_| r.milter.state == "running");
    reload_refused(&mut r, &dir);
    if config.domains.is_empty() {
        r.lines
            .push("no domains configured: dualroute changes nothing".into());
    }
    let counts = dir.breaker_counts().ok().flatten().unwrap_or_default();
    domains(&mut r, &config, &dir, run.as_ref(), &counts);
    if config.breaker.is_some() {
        breaker_source(&mut r, &counts, run.is_some());
    }
    if let Some(cluster) = &config.cluster {
        let report = match crate::cluster::read_status(&config.state_dir) {
            Ok(x) => x,
            Err(e) => {
                r.lines.push(format!(
                    "cluster: cannot read the running node's report: {e}"
                ));
                None
            }
        };
        let (lines, ok) = crate::cluster::status::lines(cluster, report.as_ref(), state::now());
        if !ok {
            r.problems.push("cluster: see its lines".into());
            r.raise(1);
        }
        r.lines.extend(lines.iter().cloned());
        r.cluster = Some(Section { ok, lines });
    }
    // issue 21 §5: what waits in Postfix's queue because the milter did
    // not route it (src/postfix/queue.rs).
    let queue = match crate::postfix::queue::waiting(None) {
        Ok(Some(w)) => Some(crate::postfix::queue::status_line(w)),
        Ok(None) => None,
        Err(e) => Some(format!(
            "postfix queue: cannot count what waits for dualroute (is Postfix running?): {e}"
        )),
    };
    if let Some(q) = queue {
        r.lines.push(q.clone());
        r.postfix_queue = Some(q);
    }
    r.finish();
    Ok(r)
}

/// The reload the running milter refused, if it did.
fn reload_refused(r: &mut Report, dir: &StateDir) {
    match dir.reload_refused() {
        Ok(None) => {}
        Ok(Some(x)) => {
            r.problem(1, format!(
                "RELOAD REFUSED since {}: {}; the milter keeps running the configuration and accounts it had",
                when(x.since),
                x.reason
            ));
            r.reload_refused = Some(x);
        }
        Err(e) => r.problem(1, format!("ERROR: {e}")),
    }
}

impl Report {
    fn raise(&mut self, code: u8) {
        self.exit = self.exit.max(code);
    }

    /// A line that is also a reason for exit `code`.
    fn problem(&mut self, code: u8, line: String) {
        self.raise(code);
        self.problems.push(line.clone());
        self.lines.push(line);
    }

    /// The closing line: the exit code in words, for whoever reads the
    /// output rather than `$?`.
    fn finish(&mut self) {
        let words = match self.exit {
            0 => "status: OK (exit 0): a milter runs and every domain routes as configured",
            1 => "status: ATTENTION (exit 1): something is held, refused or not loaded (above)",
            _ => "status: CRITICAL (exit 2): no milter runs, or a safety net is blind (above)",
        };
        self.lines.push(words.into());
    }
}

/// The lines about the milter process, and its record in `r.milter`.
/// `digest`: of the file on disk, when it loads.
fn milter_lines(r: &mut Report, run: Option<&Running>, digest: Option<&String>) {
    let Some(run) = run else {
        r.milter.state = "not running".into();
        r.problem(
            2,
            "milter: NOT RUNNING: no running milter has published its state in state_dir (start it: `systemctl start dualroute`, or docs/without-systemd.md); what follows is the configuration on disk".into(),
        );
        return;
    };
    let now = state::now();
    r.milter = Milter {
        state: "running".into(),
        pid: Some(run.pid),
        version: Some(run.version.clone()),
        started: Some(run.started),
        heartbeat: Some(run.heartbeat),
        loaded: Some(run.loaded),
        config_changed: false,
    };
    match running::liveness(run, now) {
        Liveness::Gone => {
            r.milter.state = "not running".into();
            r.problem(2, format!(
                "milter: NOT RUNNING: the last milter (pid {}) is gone, last seen {}; Postfix applies its milter_default_action meanwhile (docs/postfix.md); start it; what follows is the configuration on disk",
                run.pid,
                when(run.heartbeat)
            ));
            return;
        }
        Liveness::Silent(age) => {
            r.milter.state = "silent".into();
            r.problem(2, format!(
                "milter: SILENT: pid {} exists but has not published its state for {age}s (last {}): hung, or state_dir is not writable for it (see its log); what follows is the configuration on disk",
                run.pid,
                when(run.heartbeat)
            ));
            return;
        }
        Liveness::Alive => {}
    }
    r.lines.push(format!(
        "milter: running, pid {}, dualroute {}, since {}; configuration loaded {}",
        run.pid,
        run.version,
        when(run.started),
        when(run.loaded)
    ));
    if run.version != env!("CARGO_PKG_VERSION") {
        r.lines.push(format!(
            "  NOTE: the running milter is dualroute {}, this program {}: restart it after an upgrade",
            run.version,
            env!("CARGO_PKG_VERSION")
        ));
    }
    if let Some(d) = digest {
        if !run.config_sha256.is_empty() && *d != run.config_sha256 {
            r.milter.config_changed = true;
            r.problem(1, format!(
                "{} changed since the running milter loaded it ({}): reload (`systemctl reload dualroute` or `kill -HUP {}`); below, what runs, and what the file would change",
                r.config,
                when(run.loaded),
                run.pid
            ));
        }
    }
}

/// One line and the state of each domain: what the running milter has,
/// where it differs from the file, and the holds and counts.
fn domains(
    r: &mut Report,
    config: &Config,
    dir: &StateDir,
    run: Option<&Running>,
    counts: &state::BreakerCounts,
) {
    // The same holds the running milter reads (src/holds/).
    let (holds, _) = crate::holds::Holds::read(config);
    for (name, d) in &config.domains {
        let name = &name.0;
        let file_shadow = config.shadow(d);
        let mut x = Domain {
            name: name.clone(),
            mode: d.mode.to_string(),
            shadow: file_shadow,
            enabled: d.enabled,
            ..Domain::default()
        };
        // What runs wins; the file's differences are listed below it.
        if let Some(run) = run {
            match run.domains.get(name) {
                Some(rd) => {
                    x.mode = rd.mode.clone();
                    x.shadow = rd.shadow;
                    x.enabled = rd.enabled;
                    let mut differ = |what: &str, file: String, runs: String| {
                        if file != runs {
                            x.differs.push(format!(
                                "{what}: milter.yaml says {file}, the running milter has {runs}"
                            ));
                        }
                    };
                    differ("mode", d.mode.to_string(), rd.mode.clone());
                    differ("shadow", file_shadow.to_string(), rd.shadow.to_string());
                    differ("enabled", d.enabled.to_string(), rd.enabled.to_string());
                }
                None => x
                    .differs
                    .push("in milter.yaml but not in the running milter".into()),
            }
        }
        let hold = holds.get(name);
        let (state, line) = hold_line(x.enabled, hold, dir, name, d.verify.is_some());
        x.state = state.into();
        if run.is_some_and(|run| !run.domains.contains_key(name)) {
            x.state = "not loaded".into();
        }
        x.routing = x.state == "active";
        // Shadow mode is shown first: whatever the routing state says, the
        // milter changes nothing for this domain.
        let shadow = if x.shadow {
            " SHADOW (decisions are logged and counted, nothing is changed)"
        } else {
            ""
        };
        x.lines
            .push(format!("{name}: mode {}:{shadow} {line}", x.mode));
        for diff in &x.differs {
            x.lines.push(format!("  NOT LOADED: {diff}: reload"));
        }
        if let Some(cause) = run
            .and_then(|run| run.domains.get(name))
            .and_then(|rd| rd.hold.as_ref())
            .filter(|_| hold.is_none())
        {
            x.lines.push(format!(
                "  the running milter still holds it ({cause}); it follows state_dir within seconds"
            ));
        }
        let mut held = !x.routing || !x.differs.is_empty();
        if let Ok(Some(p)) = dir.dispute(name) {
            held = true;
            x.lines.push(format!(
                "  ACCOUNTS HELD since {}: a reload that would take the accounts from {} to {} was refused (accounts_shrink_limit); the {} addresses the two lists disagree on get 451 4.4.4 (e.g. {}); `dualroute confirm-accounts {name}` accepts the new list, restoring the account source keeps the running one",
                when(p.since),
                p.running,
                p.refused,
                p.disputed,
                p.sample.join(", ")
            ));
        }
        if let Ok(Some(p)) = dir.dispute(&state::destination_list(name)) {
            held = true;
            x.lines.push(format!(
                "  DESTINATION LIST HELD since {}: a reload that would take the destination's address list (reject_unknown.accounts) from {} to {} addresses was refused (accounts_shrink_limit); the running list stays in force ({} addresses differ, e.g. {}); `dualroute confirm-accounts {name}` accepts the new list, restoring the source keeps the running one",
                when(p.since),
                p.running,
                p.refused,
                p.disputed,
                p.sample.join(", ")
            ));
        }
        if d.reject_unknown.as_ref().is_some_and(|r| r.callout) {
            x.lines.push(format!(
                "  {}",
                crate::commands::callout_line(&config.state_dir, name, d)
            ));
        }
        if let Some(b) = &config.breaker {
            let tripped = matches!(hold, Some(Hold::Tripped(_)));
            let c = counts.domains.get(name).copied().unwrap_or_default();
            x.bounces = Some(c.bounces);
            x.deferrals = Some(c.deferrals);
            x.lines
                .push(format!("  {}", breaker_counts(b, counts, name, tripped)));
        }
        if held {
            r.raise(1);
            r.problems.push(format!("{name}: {}", x.state));
        }
        r.lines.extend(x.lines.iter().cloned());
        r.domains.push(x);
    }
    // Domains the running milter manages that the file no longer has.
    for (name, rd) in run.iter().flat_map(|run| &run.domains) {
        let key = crate::config::DomainName(name.clone());
        if config.domains.contains_key(&key) {
            continue;
        }
        let line = format!(
            "{name}: mode {}: REMOVED from milter.yaml, still managed by the running milter: reload",
            rd.mode
        );
        r.problem(1, line.clone());
        r.domains.push(Domain {
            name: name.clone(),
            mode: rd.mode.clone(),
            shadow: rd.shadow,
            enabled: rd.enabled,
            state: "removed".into(),
            routing: rd.hold.is_none() && rd.enabled,
            differs: vec!["not in milter.yaml".into()],
            lines: vec![line],
            ..Domain::default()
        });
    }
}

/// The domain's routing state in a word, and its line.
fn hold_line(
    enabled: bool,
    hold: Option<&Hold>,
    dir: &StateDir,
    name: &str,
    verify: bool,
) -> (&'static str, String) {
    if !enabled {
        return ("off", "routing OFF (enabled: false in the configuration): mailboxes here get their mail, addresses that would be routed are refused with 451 4.4.4".to_owned());
    }
    match hold {
        Some(Hold::Disabled(x)) => (
            "disabled",
            format!(
                "DISABLED by an administrator since {}: {}",
                when(x.since),
                x.reason
            ),
        ),
        Some(Hold::Tripped(t)) if t.cause == state::TripCause::Deferrals => (
            "tripped",
            format!(
                "TRIPPED by the breaker on deferrals since {}: {} temporary failures within {}s ({} permanent); last: {}",
                when(t.since),
                t.deferrals,
                t.window_secs,
                t.bounces,
                t.last
            ),
        ),
        Some(Hold::Tripped(t)) => (
            "tripped",
            format!(
                "TRIPPED by the bounce breaker since {}: {} permanent failures within {}s; last: {}",
                when(t.since),
                t.bounces,
                t.window_secs,
                t.last
            ),
        ),
        Some(Hold::Verification { address, last }) => (
            "waiting",
            match last {
                Some(v) => format!(
                    "WAITING for verification of {address}; last probe {}: {}",
                    when(v.at),
                    v.detail
                ),
                None => format!("WAITING for verification of {address}; no probe yet"),
            },
        ),
        Some(h @ (Hold::Unreadable(_) | Hold::NotRead)) => ("error", format!("ERROR: {h}")),
        None => (
            "active",
            match dir.load(name).ok().and_then(|s| s.verification) {
                Some(v) if verify => format!("active (verified {}: {})", when(v.at), v.detail),
                _ => "active".to_owned(),
            },
        ),
    }
}

/// The breaker's source: ✘ and exit 2 when the running milter's breaker
/// cannot read it (it would never trip).
fn breaker_source(r: &mut Report, counts: &state::BreakerCounts, running: bool) {
    let Some(src) = &counts.source else {
        if running {
            r.lines.push(
                "breaker: the running milter has not said yet whether it can read its source"
                    .into(),
            );
        }
        return;
    };
    if src.readable {
        r.lines.push(format!(
            "breaker: ✔ reads {} (since {})",
            src.name,
            when(src.since)
        ));
    } else {
        r.problem(2, format!(
            "breaker: ✘ BLIND: cannot read {} since {}: {}; it counts nothing and never trips: let the service user read it (group systemd-journal for the journal, adm for /var/log/mail.log; `systemctl edit dualroute`, SupplementaryGroups=), then `dualroute check` tests it as that user",
            src.name,
            when(src.since),
            src.error
        ));
    }
    r.breaker = Some(src.clone());
}

/// `breaker: 2 permanent failures (trips at 20), 5 deferrals (trips at
/// 11) within 1h, as of …`: what the running milter's breaker counted
/// (src/breaker/ writes `breaker-counts` when a count changes).
fn breaker_counts(
    b: &crate::config::BreakerConfig,
    counts: &state::BreakerCounts,
    domain: &str,
    tripped: bool,
) -> String {
    let c = counts.domains.get(domain).copied().unwrap_or_default();
    // A trip empties the domain's counts (src/breaker/): after "TRIPPED
    // … 3 permanent failures", a bare "0 permanent failures" read as a
    // contradiction (issue 25).
    let since = if tripped {
        "counting again since the trip: "
    } else {
        ""
    };
    let deferral_limit = match b.deferrals {
        Some(n) => format!("trips at {n}"),
        None => "counted only".to_owned(),
    };
    let as_of = if counts.at == 0 {
        "no count recorded by a running milter yet".to_owned()
    } else {
        format!("as of {}", when(counts.at))
    };
    format!(
        "breaker: {since}{} permanent failures (trips at {}), {} deferrals ({deferral_limit}) of routed mail within {}; {as_of}",
        c.bounces,
        b.threshold,
        c.deferrals,
        crate::config::human(b.window.0)
    )
}

/// The `state_dir` a `milter.yaml` that does not load still names, as far
/// as its YAML can be read (relative to the file, as [`crate::config`]
/// reads it); else the default.
fn fallback_state_dir(path: &Path) -> std::path::PathBuf {
    let named = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|v| v.get("state_dir")?.as_str().map(std::path::PathBuf::from));
    match named {
        Some(p) if p.is_relative() => path.parent().unwrap_or(Path::new(".")).join(p),
        Some(p) => p,
        None => crate::config::default_state_dir(),
    }
}
