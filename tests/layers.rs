//! The library's modules form layers: no module depends, directly or through others, on a
//! module that depends on it. This reads the sources (`crate::…` and `super::…` paths outside
//! comments and test modules), builds the graph between sibling modules at every level, and
//! fails naming the cycle when there is one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines: `src/server/coordinator/mod.rs` → [server, coordinator].
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut m: Module = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if matches!(m.last().map(String::as_str), Some("mod" | "lib")) {
        m.pop();
    }
    m
}

/// The source without comments and without `#[cfg(test)]` modules (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// `crate::a::b::Item` and `super::a::Item` paths in `code`, as path segments.
fn paths(code: &str) -> Vec<(bool, Vec<String>)> {
    let mut out = Vec::new();
    for (anchor, is_crate) in [("crate::", true), ("super::", false)] {
        let mut rest = code;
        while let Some(i) = rest.find(anchor) {
            let before = rest[..i].chars().last();
            rest = &rest[i + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let end =
                rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            let segs: Vec<String> =
                rest[..end].split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            // `crate::{a, b}`: each name in the braces.
            if segs.is_empty() && rest[end..].starts_with('{') {
                let close = rest[end..].find('}').map_or(rest.len(), |j| end + j);
                for name in rest[end + 1..close].split(',') {
                    let name = name.trim().split("::").next().unwrap_or("").trim();
                    if !name.is_empty() {
                        out.push((is_crate, vec![name.to_string()]));
                    }
                }
                continue;
            }
            out.push((is_crate, segs));
        }
    }
    out
}

fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        n: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = stack.iter().position(|m| m == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.clone());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.clone());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.clone());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Edges between sibling modules, from what each library file names.
fn module_graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // The binary's own modules (src/main.rs, src/cli/) sit on top of the library.
    files.retain(|f| {
        let m = module_of(&src, f);
        !matches!(m.first().map(String::as_str), Some("main" | "cli"))
    });
    let modules: BTreeSet<Module> = files
        .iter()
        .flat_map(|f| {
            let m = module_of(&src, f);
            (1..=m.len()).map(move |i| m[..i].to_vec())
        })
        .collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        if from.last().is_some_and(|l| l == "tests") {
            continue;
        }
        for (is_crate, segs) in paths(&code(&std::fs::read_to_string(file).unwrap())) {
            let mut to: Module =
                if is_crate { Vec::new() } else { from[..from.len().saturating_sub(1)].to_vec() };
            for s in segs {
                let mut next = to.clone();
                next.push(s);
                if !modules.contains(&next) {
                    break;
                }
                to = next;
            }
            let d = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if d < from.len() && d < to.len() {
                edges.entry(from[..=d].to_vec()).or_default().insert(to[..=d].to_vec());
            }
        }
    }
    edges
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let edges = module_graph();
    for top in ["protocol", "engine", "policy", "config", "server"] {
        assert!(edges.keys().any(|m| m[0] == top), "the graph misses {top}: the reader is broken");
    }
    if let Some(cycle) = find_cycle(&edges) {
        let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
        panic!("module dependency cycle: {}", names.join(" → "));
    }
}

#[test]
fn the_protocol_depends_on_no_other_module() {
    // Clients (native, browser, Python) build on the protocol alone.
    let edges = module_graph();
    let protocol = vec!["protocol".to_string()];
    assert_eq!(edges.get(&protocol), None, "protocol reaches {:?}", edges.get(&protocol));
}

#[test]
fn the_reader_finds_a_cycle_when_there_is_one() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Module>();
    let mut edges = BTreeMap::new();
    edges.insert(m("a"), BTreeSet::from([m("b")]));
    edges.insert(m("b"), BTreeSet::from([m("c")]));
    edges.insert(m("c"), BTreeSet::from([m("a")]));
    assert_eq!(find_cycle(&edges).map(|c| c.len()), Some(4));
    edges.remove(&m("c"));
    assert_eq!(find_cycle(&edges), None);
    let p = paths("use crate::{engine, policy::x};\nlet a = super::status::Status;\nlet b = mycrate::z;");
    assert!(p.contains(&(true, vec!["engine".to_string()])));
    assert!(p.contains(&(true, vec!["policy".to_string()])));
    assert!(p.contains(&(false, vec!["status".to_string(), "Status".to_string()])));
    assert_eq!(p.len(), 3, "{p:?}");
}

#[test]
fn the_core_reaches_no_server_and_does_no_io() {
    // The core (src/core/) takes inputs and returns effects: the server is its shell, not
    // something it calls, and time, randomness and I/O come in as inputs.
    let edges = module_graph();
    let core = vec!["core".to_string()];
    let reaches = edges.get(&core).cloned().unwrap_or_default();
    assert!(!reaches.contains(&vec!["server".to_string()]), "core reaches server: {reaches:?}");
    assert!(
        edges.get(&vec!["server".to_string()]).is_some_and(|s| s.contains(&core)),
        "the reader misses server → core"
    );
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"), &mut files);
    assert!(files.len() >= 8, "src/core has {} files", files.len());
    for f in files {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for io in [
            "tokio",
            "std::fs",
            "std::net",
            "std::io",
            "Instant::now",
            "SystemTime",
            "rand::",
            "getrandom",
            "thread_rng",
        ] {
            assert!(
                !text.contains(io),
                "{} uses {io}: the core does no I/O and owns no clock or RNG",
                f.display()
            );
        }
    }
}
