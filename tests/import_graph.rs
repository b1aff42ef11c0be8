//! The modules of src/ import each other without a circle (issue 22:
//! "no module imports the service back"; docs/design.md §7). `run`
//! (src/service/) is the one place that knows every part; the parts take
//! small handles from a lower floor (src/live.rs, src/holds/,
//! src/metrics.rs, src/notify.rs) and never the service.
//!
//! The graph is read from the source: every `crate::…` path (in `use`
//! items, brace groups included, and in expressions) in a file of a
//! top-level module is an edge from that module to the path's first
//! segment; a name the crate root re-exports (`crate::run`) counts as the
//! module it comes from. Comments are skipped (doc links are not
//! imports). A child file's `super::` stays inside its module.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The top-level module a file under src/ belongs to; `None` for the
/// crate root (lib.rs) and the binary (main.rs, outside the library).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The code of `text` without `//` comments (line and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path in `code`, brace groups
/// (`crate::{a, b::c}`) expanded one level.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `dualroute_crate::x` and the like are not ours.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // Split the group's top-level items at commas.
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(ident(item.trim()));
        } else {
            out.push(ident(rest_trim));
        }
    }
    out.retain(|s| !s.is_empty() && s != "self");
    out
}

fn rs_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module → the modules it imports, for src/.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&src).ok()?))
        .collect();
    // What the crate root re-exports: `pub use service::{run, Control};`.
    let lib = code(&fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs"));
    let mut reexports = BTreeMap::new();
    for item in lib.split(';') {
        let Some(path) = item.trim().strip_prefix("pub use ") else {
            continue;
        };
        let (module, names) = path.split_once("::").unwrap_or((path, ""));
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.trim().rsplit("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                reexports.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = module_of(f.strip_prefix(&src).expect("under src/")) else {
            continue;
        };
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let edges = graph.entry(from.clone()).or_default();
        for first in crate_paths(&code(&text)) {
            let to = match reexports.get(&first) {
                Some(m) => m.clone(),
                None => first,
            };
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    graph
}

/// Every circle of the graph, each once (as the strongly connected
/// components with more than one module, Tarjan's algorithm).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w]);
                    self.low.insert(v, l);
                } else if self.on_stack.contains(w) {
                    let l = self.low[v].min(self.index[w]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn the_modules_of_src_import_each_other_without_a_circle() {
    let graph = graph();
    // The reader itself must see the imports, or an empty graph passes.
    assert!(
        graph.get("milter").is_some_and(|e| e.contains("session")),
        "the import reader finds no edge milter -> session: {graph:?}"
    );
    let found = circles(&graph);
    let show = |c: &Vec<String>| {
        let edges: Vec<String> = c
            .iter()
            .flat_map(|m| {
                graph[m]
                    .iter()
                    .filter(|t| c.contains(t))
                    .map(move |t| format!("{m} -> {t}"))
            })
            .collect();
        format!("{{{}}}: {}", c.join(", "), edges.join(", "))
    };
    assert!(
        found.is_empty(),
        "import circles in src/ (a module that imports one that imports it back; pass it a handle instead, docs/design.md §7):\n{}",
        found.iter().map(show).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_reader_finds_a_circle_when_there_is_one() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    };
    edge(&mut g, "service", "breaker");
    edge(&mut g, "breaker", "service");
    edge(&mut g, "breaker", "state");
    assert_eq!(
        circles(&g),
        vec![vec!["breaker".to_owned(), "service".to_owned()]]
    );
    let paths = crate_paths("use crate::{breaker, holds::{Hold, Holds}};\nlet m = crate::metrics::Metrics::new(); dualroute_crate::x");
    assert_eq!(paths, ["breaker", "holds", "metrics"]);
}

/// No file under src/ is over 900 lines (issue 22: a file does one job;
/// one over ~700 lines says why in its first comment).
#[test]
fn no_file_in_src_is_over_900_lines() {
    fn walk(dir: &Path, out: &mut Vec<(String, usize)>) {
        for entry in fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = fs::read_to_string(&path).expect("read").lines().count();
                out.push((path.display().to_string(), lines));
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 20, "found only {files:?}");
    let over: Vec<_> = files.iter().filter(|(_, n)| *n > 900).collect();
    assert!(over.is_empty(), "split by job: {over:?}");
}
