//! The module map, checked: every `src/**/*.rs` is read, each top-level module's references to
//! other modules are collected, and the tests fail on an import cycle between top-level modules,
//! on a module importing one in a higher layer ([`LAYERS`]), on a module missing from the table,
//! and on a cycle between sibling submodules of one module.
//!
//! A reference is a `crate::a::...`, `super::...` (resolved from the file and its inline `mod`s)
//! or, in `main.rs`, `hark::a::...` path, in a `use` line or inline, grouped imports
//! (`crate::{a::X, b::{Y, Z}}`) included. `#[cfg(test)]` code is checked like the rest.
//! Deliberately not here: a Rust parser. The scan blanks out comments (doc links included),
//! strings and char literals, and reads paths from the tokens left; a path reached through an
//! alias (`use crate::a as b;` then `b::x`) counts where the alias is made, and an item a parent
//! re-exports from one child counts, in another child, as a reference to the parent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import modules of lower layers; within an ordered
/// layer (the stages) only those to its left; within an unordered one any, as long as no cycle
/// forms.
const LAYERS: &[Layer] = &[
    Layer {
        name: "ground",
        ordered: false,
        modules: &["config", "event", "url", "backoff", "sys", "tls", "bus"],
    },
    Layer {
        name: "stages",
        ordered: true,
        modules: &["vad", "codec", "spool", "capture", "upload", "sink"],
    },
    Layer {
        name: "service",
        ordered: false,
        modules: &["pipeline", "notify", "session", "health"],
    },
    Layer {
        name: "commands",
        ordered: false,
        modules: &["cli", "cmd"],
    },
    Layer {
        name: "binary",
        ordered: false,
        modules: &["main"],
    },
];

/// References allowed although they close a cycle, each until the rewrite that removes it. The
/// test fails once one is no longer there, so that its entry goes too.
const KNOWN_CYCLE_EDGES: &[(&str, &str)] = &[];

/// Cycles between sibling submodules allowed for now, as (module, submodule, submodule).
const KNOWN_SUBMODULE_CYCLES: &[(&str, &str, &str)] = &[
    // `response` hands an event-stream body nobody asked for to `sse`, which builds its
    // transcript with `response`'s helpers.
    ("upload", "response", "sse"),
];

struct Layer {
    name: &'static str,
    ordered: bool,
    modules: &'static [&'static str],
}

/// Where a reference was seen: `src/...rs:LINE`.
type Site = String;

/// Edges between modules, each with the first place it was seen.
type Edges = BTreeMap<(String, String), Site>;

/// The references of the whole source tree.
#[derive(Default)]
struct Map {
    /// Top-level module → top-level module.
    top: Edges,
    /// Within one top-level module: (module, submodule) → (module, submodule), siblings only.
    sub: BTreeMap<String, Edges>,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `src` with comments, strings and char literals replaced by spaces (newlines kept).
fn strip(src: &str) -> Vec<char> {
    let c: Vec<char> = src.chars().collect();
    let len = c.len();
    let mut out = Vec::with_capacity(len);
    let blank = |out: &mut Vec<char>, from: &[char]| {
        out.extend(from.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }));
    };
    let mut i = 0;
    while i < len {
        let after_ident = i > 0 && is_ident(c[i - 1]);
        let end = if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            c[i..]
                .iter()
                .position(|&ch| ch == '\n')
                .map_or(len, |p| i + p)
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let (mut k, mut depth) = (i + 2, 1);
            while k < len && depth > 0 {
                if c[k] == '/' && c.get(k + 1) == Some(&'*') {
                    depth += 1;
                    k += 2;
                } else if c[k] == '*' && c.get(k + 1) == Some(&'/') {
                    depth -= 1;
                    k += 2;
                } else {
                    k += 1;
                }
            }
            k
        } else if !after_ident && (c[i] == 'r' || c[i] == 'b' && c.get(i + 1) == Some(&'r')) {
            // A raw string, r"..." or r#"..."# (also with b), or an identifier starting with r.
            let mut j = i + if c[i] == 'b' { 2 } else { 1 };
            let hashes = c[j..].iter().take_while(|&&ch| ch == '#').count();
            j += hashes;
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let mut k = j + 1;
            while k < len && !(c[k] == '"' && (1..=hashes).all(|h| c.get(k + h) == Some(&'#'))) {
                k += 1;
            }
            (k + 1 + hashes).min(len)
        } else if c[i] == '"' {
            let mut k = i + 1;
            while k < len && c[k] != '"' {
                k += if c[k] == '\\' { 2 } else { 1 };
            }
            (k + 1).min(len)
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // '\n', '\'', '\u{..}': the escaped character, then up to the closing quote.
            let from = i + 3;
            c.get(from..)
                .and_then(|rest| rest.iter().position(|&ch| ch == '\''))
                .map_or(len, |p| from + p + 1)
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            i + 3
        } else {
            // Code, or a lifetime's quote.
            out.push(c[i]);
            i += 1;
            continue;
        };
        blank(&mut out, &c[i..end]);
        i = end;
    }
    out
}

/// A token of stripped source: an identifier, `::`, or one punctuation character; with its line.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

fn tokens(code: &[char]) -> Vec<Token> {
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < code.len() {
        let ch = code[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if is_ident(ch) {
            let start = i;
            while i < code.len() && is_ident(code[i]) {
                i += 1;
            }
            let text = code[start..i].iter().collect();
            out.push(Token { text, line });
        } else if ch == ':' && code.get(i + 1) == Some(&':') {
            out.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: ch.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Segments kept of each path: enough for the module nesting of this crate.
const MAX_SEGMENTS: usize = 4;

/// The paths of a use tree or inline path starting at `tokens[at]` (just after `crate::` and the
/// like), each appended to `prefix` and cut at [`MAX_SEGMENTS`].
fn paths(tokens: &[Token], at: usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    let mut i = at;
    loop {
        match tokens.get(i).map(|t| t.text.as_str()) {
            Some("{") => {
                // Each element of the group, at depth 1.
                let mut depth = 0;
                let mut element_start = true;
                while let Some(t) = tokens.get(i) {
                    match t.text.as_str() {
                        "{" => {
                            depth += 1;
                            if depth == 1 {
                                element_start = true;
                                i += 1;
                                continue;
                            }
                        }
                        "}" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        "," if depth == 1 => {
                            element_start = true;
                            i += 1;
                            continue;
                        }
                        _ => {}
                    }
                    if element_start && depth == 1 {
                        paths(tokens, i, &path, out);
                        element_start = false;
                    }
                    i += 1;
                }
                return;
            }
            // `a::{self, ...}` names `a` itself.
            Some("self") => break,
            Some(seg) if seg.chars().all(is_ident) => {
                path.push(seg.to_owned());
                if path.len() >= MAX_SEGMENTS
                    || tokens.get(i + 1).map(|t| t.text.as_str()) != Some("::")
                {
                    break;
                }
                i += 2;
            }
            _ => break,
        }
    }
    if !path.is_empty() && (path.len() > prefix.len() || at_self(tokens, at)) {
        out.push(path);
    }
}

/// Whether the use-tree element at `at` is `self`.
fn at_self(tokens: &[Token], at: usize) -> bool {
    tokens.get(at).is_some_and(|t| t.text == "self")
}

/// The module path of a file: `src/capture/file.rs` → `capture::file`, `src/capture/mod.rs` →
/// `capture`, `src/main.rs` → `main`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            parts.push(stem.to_owned());
        }
    }
    parts
}

/// Every absolute module path referred to in one file, with its line.
fn references(src: &str, file_path: &[String], root_names: &[&str]) -> Vec<(Vec<String>, usize)> {
    let toks = tokens(&strip(src));
    let mut out = Vec::new();
    // Inline `mod name {` blocks: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let text = |i: usize| toks.get(i).map_or("", |t| t.text.as_str());
    let mut i = 0;
    while i < toks.len() {
        match text(i) {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
            }
            "mod" if text(i + 2) == "{" => {
                inline.push((text(i + 1).to_owned(), depth + 1));
            }
            _ => {}
        }
        let starts_path = i == 0 || !matches!(text(i - 1), "::" | "$");
        if starts_path && text(i + 1) == "::" {
            let mut found = Vec::new();
            if root_names.contains(&text(i)) {
                paths(&toks, i + 2, &[], &mut found);
            } else if text(i) == "super" {
                let mut base: Vec<String> = file_path.to_vec();
                base.extend(inline.iter().map(|(name, _)| name.clone()));
                let mut j = i;
                while text(j) == "super" && text(j + 1) == "::" {
                    base.pop();
                    j += 2;
                }
                paths(&toks, j, &base, &mut found);
            }
            let line = toks[i].line;
            out.extend(found.into_iter().map(|p| (p, line)));
        }
        i += 1;
    }
    out
}

/// Reads `src/` and collects the edges between modules.
fn scan(src_dir: &Path) -> Map {
    let mut files = Vec::new();
    let mut dirs = vec![src_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let rel = |p: &PathBuf| {
        p.strip_prefix(src_dir)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&rel(f))).collect();
    let mut map = Map::default();
    for file in &files {
        let rel = rel(file);
        let me = module_path(&rel);
        if me == ["lib"] || me == ["layers"] {
            continue;
        }
        let src =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let roots: &[&str] = if me == ["main"] {
            &["hark"]
        } else {
            &["crate"]
        };
        for (target, line) in references(&src, &me, roots) {
            let site = format!("src/{}:{line}", rel.display());
            let (from, to) = (&me[0], &target[0]);
            if from != to {
                if modules.iter().any(|m| m[0] == *to) {
                    let edge = (from.clone(), to.clone());
                    map.top.entry(edge).or_insert(site);
                }
                continue;
            }
            // Within one module: between siblings only (a submodule and its parent's own file
            // refer to each other as a matter of course).
            let common = me.iter().zip(&target).take_while(|(a, b)| a == b).count();
            let (Some(mine), Some(theirs)) = (me.get(common), target.get(common)) else {
                continue;
            };
            let parent = &me[..common];
            let is_module = |m: &Vec<String>| {
                m.len() > common && m[..common] == *parent && m[common] == *theirs
            };
            if modules.iter().any(is_module) {
                let edges = map.sub.entry(parent.join("::")).or_default();
                edges.entry((mine.clone(), theirs.clone())).or_insert(site);
            }
        }
    }
    map
}

fn source_map() -> Map {
    scan(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The strongly connected components of more than one node (Tarjan's algorithm).
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.keys().flat_map(|(a, b)| [a, b]).collect();
    let nodes: Vec<&String> = nodes.into_iter().collect();
    let index_of = |n: &String| nodes.iter().position(|m| *m == n).unwrap_or(0);
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (a, b) in edges.keys() {
        next[index_of(a)].push(index_of(b));
    }
    struct State {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        counter: usize,
        found: Vec<Vec<usize>>,
    }
    fn visit(v: usize, next: &[Vec<usize>], s: &mut State) {
        s.index[v] = Some(s.counter);
        s.low[v] = s.counter;
        s.counter += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &next[v] {
            match s.index[w] {
                None => {
                    visit(w, next, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let n = nodes.len();
    let mut s = State {
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        counter: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(v, &next, &mut s);
        }
    }
    let mut out: Vec<Vec<String>> = s
        .found
        .into_iter()
        .map(|c| {
            let mut names: Vec<String> = c.into_iter().map(|i| nodes[i].clone()).collect();
            names.sort();
            names
        })
        .collect();
    out.sort();
    out
}

/// The edges inside each cycle, one per line, with where each was seen.
fn describe(found: &[Vec<String>], edges: &Edges) -> String {
    let mut text = String::new();
    for component in found {
        text.push_str(&format!("cycle between {}:\n", component.join(", ")));
        for ((a, b), site) in edges {
            if component.contains(a) && component.contains(b) {
                text.push_str(&format!("  {a} -> {b} ({site})\n"));
            }
        }
    }
    text
}

/// (layer index, position within an ordered layer) of a module.
fn rank(module: &str) -> Option<(usize, Option<usize>)> {
    LAYERS.iter().enumerate().find_map(|(i, layer)| {
        let pos = layer.modules.iter().position(|m| *m == module)?;
        Some((i, layer.ordered.then_some(pos)))
    })
}

/// Every edge that goes up the table (or right, within the stages), as text.
fn violations(edges: &Edges) -> Vec<String> {
    let mut out = Vec::new();
    for ((from, to), site) in edges {
        let (Some(a), Some(b)) = (rank(from), rank(to)) else {
            continue;
        };
        let up = match (a, b) {
            ((la, _), (lb, _)) if la != lb => lb > la,
            ((_, Some(pa)), (_, Some(pb))) => pb > pa,
            _ => false,
        };
        if up {
            let (la, lb) = (LAYERS[a.0].name, LAYERS[b.0].name);
            out.push(format!("{from} ({la}) imports {to} ({lb}) at {site}"));
        }
    }
    out
}

fn without_known(edges: &Edges) -> Edges {
    let mut edges = edges.clone();
    for (a, b) in KNOWN_CYCLE_EDGES {
        edges.remove(&(a.to_string(), b.to_string()));
    }
    edges
}

#[test]
fn no_cycle_between_top_level_modules() {
    let map = source_map();
    let edges = without_known(&map.top);
    let found = cycles(&edges);
    assert!(found.is_empty(), "\n{}", describe(&found, &edges));
}

#[test]
fn no_module_imports_a_higher_layer() {
    let map = source_map();
    let found = violations(&without_known(&map.top));
    assert!(found.is_empty(), "\n{}", found.join("\n"));
}

#[test]
fn every_module_has_a_layer() {
    let map = source_map();
    let modules: BTreeSet<&String> = map.top.keys().flat_map(|(a, b)| [a, b]).collect();
    let missing: Vec<&&String> = modules.iter().filter(|m| rank(m).is_none()).collect();
    assert!(missing.is_empty(), "add to LAYERS: {missing:?}");
    // Every file's module, even one that imports nothing and is imported by nothing but lib.rs.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("an entry").path();
        let name = module_path(Path::new(path.file_name().expect("a name")));
        let name = name.first().map_or("", String::as_str);
        if !["lib", "layers", ""].contains(&name) {
            assert!(rank(name).is_some(), "add to LAYERS: {name}");
        }
    }
}

#[test]
fn known_exceptions_are_still_needed() {
    let map = source_map();
    for (a, b) in KNOWN_CYCLE_EDGES {
        assert!(
            map.top.contains_key(&(a.to_string(), b.to_string())),
            "{a} no longer imports {b}: remove it from KNOWN_CYCLE_EDGES"
        );
    }
    for (module, x, y) in KNOWN_SUBMODULE_CYCLES {
        let found = map.sub.get(*module).map(cycles).unwrap_or_default();
        assert!(
            found
                .iter()
                .any(|c| c.contains(&x.to_string()) && c.contains(&y.to_string())),
            "{module}::{x} and {module}::{y} are no longer in a cycle: remove them from \
             KNOWN_SUBMODULE_CYCLES"
        );
    }
}

#[test]
fn no_cycle_between_sibling_submodules() {
    let map = source_map();
    let mut report = String::new();
    for (module, edges) in &map.sub {
        let known = |c: &Vec<String>| {
            KNOWN_SUBMODULE_CYCLES.iter().any(|(m, x, y)| {
                m == module
                    && c.len() == 2
                    && c.contains(&x.to_string())
                    && c.contains(&y.to_string())
            })
        };
        let found: Vec<Vec<String>> = cycles(edges).into_iter().filter(|c| !known(c)).collect();
        if !found.is_empty() {
            report.push_str(&format!("in {module}:\n{}", describe(&found, edges)));
        }
    }
    assert!(report.is_empty(), "\n{report}");
}

// The checker itself: each would pass vacuously if the scan saw nothing.

#[test]
fn the_scan_sees_paths_and_not_comments_or_strings() {
    let src = r##"
        //! Links to [`crate::daemon`] in docs do not count.
        use crate::{bus::Events, event::{EventKind, Stage}, self};
        use super::media::{Kind, open};
        use super::*;
        /* crate::cli in a block /* nested */ crate::cmd */
        fn f() -> &'static str {
            let _ = crate::capture::reopen_delay(1);
            let _c = '"'; let _d = '\''; let _e = b'x';
            let _ = "crate::notify"; let _ = r#"crate::pipeline "quoted""#;
            crate::spool::random_u32();
            "x"
        }
        mod tests {
            use super::super::file::Thing;
            use crate::{
                sink::SinkQueue,
                upload::client::{self, Endpoint},
            };
        }
    "##;
    let me = vec!["capture".to_owned(), "file".to_owned()];
    let mut found: Vec<(String, usize)> = references(src, &me, &["crate"])
        .into_iter()
        .map(|(p, line)| (p.join("::"), line))
        .collect();
    found.sort();
    let want = [
        ("bus::Events", 3),
        ("capture::file::Thing", 15),
        ("capture::media::Kind", 4),
        ("capture::media::open", 4),
        ("capture::reopen_delay", 8),
        ("event::EventKind", 3),
        ("event::Stage", 3),
        ("sink::SinkQueue", 16),
        ("spool::random_u32", 11),
        ("upload::client", 16),
        ("upload::client::Endpoint", 16),
    ];
    let mut want: Vec<(String, usize)> = want.iter().map(|(p, l)| (p.to_string(), *l)).collect();
    want.sort();
    assert_eq!(found, want);
}

#[test]
fn cycles_and_upward_imports_are_caught() {
    let edges = |list: &[(&str, &str)]| -> Edges {
        list.iter()
            .map(|(a, b)| ((a.to_string(), b.to_string()), format!("{a}.rs:1")))
            .collect()
    };
    let bad = edges(&[("event", "sink"), ("sink", "event"), ("url", "config")]);
    assert_eq!(
        cycles(&bad),
        vec![vec!["event".to_owned(), "sink".to_owned()]]
    );
    assert_eq!(
        violations(&bad),
        vec!["event (ground) imports sink (stages) at event.rs:1".to_owned()]
    );
    // Right within the stages is up; left is fine; so is anything within an unordered layer.
    let stages = edges(&[
        ("capture", "upload"),
        ("upload", "capture"),
        ("config", "url"),
    ]);
    assert_eq!(
        violations(&stages),
        vec!["capture (stages) imports upload (stages) at capture.rs:1".to_owned()]
    );
    let chain = edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]);
    assert_eq!(
        cycles(&chain),
        vec![vec!["a".to_owned(), "b".into(), "c".into()]]
    );
}

#[test]
fn file_paths_name_their_modules() {
    let m = |p: &str| module_path(Path::new(p)).join("::");
    assert_eq!(m("capture/file.rs"), "capture::file");
    assert_eq!(m("capture/mod.rs"), "capture");
    assert_eq!(m("cmd/transcribe/cache.rs"), "cmd::transcribe::cache");
    assert_eq!(m("sink/mqtt/outbox.rs"), "sink::mqtt::outbox");
    assert_eq!(m("url.rs"), "url");
}
