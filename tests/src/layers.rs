//! The shape of the workspace, read from its sources: which crate depends on which (from each
//! `Cargo.toml`), and which module of a crate refers to which (from `use` trees and `crate::` /
//! `super::` paths in its `.rs` files), so that a test can forbid an import cycle or an arrow in
//! the wrong direction.
//!
//! The module graph is read from tokens, not by compiling: comments, strings and character literals
//! are skipped; `#[cfg(test)]` items (and the `tests` modules they declare) are left out, since a
//! test may drive its module through any other. An edge goes from a file's module to the deepest
//! module a path names (`crate::cache::flight::Flights` is an edge to `cache::flight`; a path that
//! names an item of a parent module is an edge to that parent). A parent uses a child module it
//! declares through `child::...` paths like any other; a parent's `pub use` of its own children is
//! its facade and no edge (it presents their items, it does not depend on them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module, as its path inside the crate (`[]` is the crate root).
pub type ModPath = Vec<String>;

/// One reference from a module to another, and where it was seen (for the report).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub from: ModPath,
    pub to: ModPath,
    pub file: PathBuf,
    pub line: usize,
}

/// The modules of one crate and the references between them.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    pub modules: BTreeSet<ModPath>,
    pub edges: Vec<Edge>,
}

pub fn display(m: &ModPath) -> String {
    if m.is_empty() { "crate".into() } else { m.join("::") }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Rust source as identifiers, `::` and single punctuation characters, with line numbers;
/// comments, strings (raw ones too), byte strings and character literals skipped.
fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let b = src.as_bytes();
    let (mut i, mut line, mut out) = (0usize, 1usize, Vec::new());
    let skip_to = |i: &mut usize, line: &mut usize, end: usize| {
        *line += b[*i..end].iter().filter(|&&c| c == b'\n').count();
        *i = end;
    };
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            skip_to(&mut i, &mut line, j);
        } else if let Some(end) = raw_string_end(b, i) {
            skip_to(&mut i, &mut line, end);
        } else if c == b'"' || (c == b'b' && b.get(i + 1) == Some(&b'"')) {
            let mut j = if c == b'b' { i + 2 } else { i + 1 };
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            skip_to(&mut i, &mut line, (j + 1).min(b.len()));
        } else if c == b'\'' || (c == b'b' && b.get(i + 1) == Some(&b'\'') && !ident_before(b, i)) {
            if c == b'b' {
                i += 1;
            }
            // A character literal ('a', '\n', '\u{..}') or a lifetime ('a): a literal closes
            // within a few bytes.
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&x| x == b'\'').map(|p| i + 2 + p)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 1 + ch)
            };
            i = close.map_or(i + 1, |e| e + 1);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(src[start..i].to_owned()), line));
        } else if b[i..].starts_with(b"::") {
            out.push((Tok::PathSep, line));
            i += 2;
        } else {
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push((Tok::Punct(ch), line));
            i += ch.len_utf8();
        }
    }
    out
}

/// Whether the byte before `i` continues an identifier (so `b` or `r` at `i` is no prefix).
fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Where a raw string (`r"..."`, `r#"..."#`, `br#"..."#`) starting at `i` ends, if one does.
fn raw_string_end(b: &[u8], i: usize) -> Option<usize> {
    if ident_before(b, i) {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'b') {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    let mut close = vec![b'"'];
    close.extend(std::iter::repeat_n(b'#', hashes));
    let body = j + 1;
    b[body..].windows(close.len()).position(|w| w == close.as_slice()).map(|p| body + p + close.len())
}

/// Drops every `#[cfg(test)]` item; returns the names of the test modules declared as files.
fn strip_cfg_test(toks: Vec<(Tok, usize)>) -> (Vec<(Tok, usize)>, Vec<String>) {
    let pattern = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    let (mut out, mut test_mods, mut i) = (Vec::new(), Vec::new(), 0);
    while i < toks.len() {
        let is_attr = toks[i..].len() >= pattern.len() && toks[i..i + pattern.len()].iter().map(|t| &t.0).eq(&pattern);
        if !is_attr {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        i += pattern.len();
        // `mod name;`: a test module in a file of its own.
        if let (Some((Tok::Ident(m), _)), Some((Tok::Ident(name), _)), Some((Tok::Punct(';'), _))) =
            (toks.get(i), toks.get(i + 1), toks.get(i + 2))
            && m == "mod"
        {
            test_mods.push(name.clone());
        }
        // The item ends at a `;` outside any brackets, or when its first `{ ... }` block closes.
        let mut depth = 0i32;
        while i < toks.len() {
            match toks[i].0 {
                Tok::Punct('{') | Tok::Punct('(') | Tok::Punct('[') => depth += 1,
                Tok::Punct('}') | Tok::Punct(')') | Tok::Punct(']') => {
                    depth -= 1;
                    if depth == 0 && toks[i].0 == Tok::Punct('}') {
                        i += 1;
                        break;
                    }
                }
                Tok::Punct(';') if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    (out, test_mods)
}

/// The paths of a `use` tree starting at `toks[i]` (after `use`), up to its `;`; returns them and
/// the index after the `;`.
fn use_paths(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Vec<String>>, usize) {
    fn tree(toks: &[(Tok, usize)], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        while *i < toks.len() {
            match &toks[*i].0 {
                Tok::Ident(s) if s == "as" => {
                    *i += 2;
                }
                Tok::Ident(s) => {
                    path.push(s.clone());
                    *i += 1;
                }
                Tok::PathSep => *i += 1,
                Tok::Punct('{') => {
                    *i += 1;
                    loop {
                        tree(toks, i, &path, out);
                        match toks.get(*i).map(|t| &t.0) {
                            Some(Tok::Punct(',')) => *i += 1,
                            Some(Tok::Punct('}')) => {
                                *i += 1;
                                break;
                            }
                            _ => break,
                        }
                    }
                    // The braces gave the paths; none ends here.
                    return;
                }
                Tok::Punct('*') => *i += 1,
                _ => break,
            }
        }
        if path.last().is_some_and(|s| s == "self") {
            path.pop();
        }
        if path.len() > prefix.len() || !path.is_empty() {
            out.push(path);
        }
    }
    let mut out = Vec::new();
    while i < toks.len() && toks[i].0 != Tok::Punct(';') {
        let before = i;
        tree(toks, &mut i, &[], &mut out);
        if i == before {
            i += 1;
        }
    }
    (out, i + 1)
}

/// Every module path (relative to `module`) that `toks` refer to, with its line.
fn references(toks: &[(Tok, usize)], module: &ModPath, children: &BTreeSet<String>) -> Vec<(ModPath, usize)> {
    let absolute = |path: &[String]| -> Option<ModPath> {
        let first = path.first()?;
        let (mut base, rest) = match first.as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (module.clone(), &path[1..]),
            "super" => (module.clone(), path),
            c if children.contains(c) => (module.clone(), path),
            _ => return None,
        };
        let mut rest = rest;
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i].0 == Tok::Ident("use".into()) {
            let line = toks[i].1;
            let (paths, next) = use_paths(toks, i + 1);
            // A module's `pub use` of its own children is its facade, not a dependency.
            let facade = is_pub(toks, i);
            let paths = paths.iter().filter_map(|p| absolute(p));
            out.extend(
                paths.filter(|p| !(facade && p.len() > module.len() && p.starts_with(module))).map(|p| (p, line)),
            );
            i = next;
            continue;
        }
        // A path in code: `crate::a::b`, `super::x`, `child::f` (not `$crate`, not `pub(super)`).
        if let Tok::Ident(first) = &toks[i].0
            && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep)
            && !(i > 0 && toks[i - 1].0 == Tok::Punct('$'))
            && !(i > 0 && toks[i - 1].0 == Tok::PathSep)
        {
            let line = toks[i].1;
            let mut path = vec![first.clone()];
            let mut j = i + 1;
            while toks.get(j).map(|t| &t.0) == Some(&Tok::PathSep) {
                match toks.get(j + 1).map(|t| &t.0) {
                    Some(Tok::Ident(s)) => {
                        path.push(s.clone());
                        j += 2;
                    }
                    _ => break,
                }
            }
            if let Some(p) = absolute(&path) {
                out.push((p, line));
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// Whether the `use` at `toks[i]` is `pub` (or `pub(crate)`, `pub(super)`, ...).
fn is_pub(toks: &[(Tok, usize)], i: usize) -> bool {
    let pub_ = |j: usize| toks.get(j).is_some_and(|t| t.0 == Tok::Ident("pub".into()));
    match i.checked_sub(1).map(|j| &toks[j].0) {
        Some(Tok::Ident(s)) if s == "pub" => true,
        Some(Tok::Punct(')')) => (0..i.saturating_sub(1))
            .rev()
            .take(6)
            .find(|&j| toks[j].0 == Tok::Punct('('))
            .is_some_and(|j| j > 0 && pub_(j - 1)),
        _ => false,
    }
}

/// The module graph of the crate whose root file is `src/lib.rs` (or `src/main.rs` when it has no
/// library); a `main.rs` beside a `lib.rs` is a crate of its own and is left out.
pub fn module_graph(src: &Path) -> std::io::Result<ModuleGraph> {
    let has_lib = src.join("lib.rs").exists();
    let mut files: BTreeMap<ModPath, PathBuf> = BTreeMap::new();
    for file in crate::files_under(src) {
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = file.strip_prefix(src).unwrap_or(&file).with_extension("");
        let parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let module = match parts.as_slice() {
            [only] if only == "lib" => Vec::new(),
            [only] if only == "main" => {
                if has_lib {
                    continue;
                }
                Vec::new()
            }
            _ => parts,
        };
        files.insert(module, file);
    }
    let mut parsed = BTreeMap::new();
    let mut excluded: BTreeSet<ModPath> = BTreeSet::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file)?;
        let (toks, test_mods) = strip_cfg_test(tokenize(&text));
        for t in test_mods {
            let mut m = module.clone();
            m.push(t);
            excluded.insert(m);
        }
        parsed.insert(module.clone(), toks);
    }
    // A module below an excluded one (a test module's own children) is excluded too.
    let is_excluded = |m: &ModPath| excluded.iter().any(|e| m.starts_with(e));
    let modules: BTreeSet<ModPath> = files.keys().filter(|m| !is_excluded(m)).cloned().collect();
    let mut graph = ModuleGraph { modules: modules.clone(), edges: Vec::new() };
    for module in &modules {
        let toks = &parsed[module];
        let children: BTreeSet<String> = modules
            .iter()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .filter_map(|m| m.last().cloned())
            .collect();
        for (path, line) in references(toks, module, &children) {
            // The deepest module the path names.
            let to = (0..=path.len()).rev().map(|k| path[..k].to_vec()).find(|p| modules.contains(p));
            if let Some(to) = to
                && &to != module
            {
                graph.edges.push(Edge { from: module.clone(), to, file: files[module].clone(), line });
            }
        }
    }
    graph.edges.sort();
    graph.edges.dedup_by(|a, b| a.from == b.from && a.to == b.to);
    Ok(graph)
}

impl ModuleGraph {
    /// The strongly connected components with more than one module: each is an import cycle.
    pub fn cycles(&self) -> Vec<Vec<ModPath>> {
        let index: BTreeMap<&ModPath, usize> = self.modules.iter().enumerate().map(|(i, m)| (m, i)).collect();
        let names: Vec<&ModPath> = self.modules.iter().collect();
        let mut adj = vec![Vec::new(); names.len()];
        for e in &self.edges {
            if let (Some(&a), Some(&b)) = (index.get(&e.from), index.get(&e.to)) {
                adj[a].push(b);
            }
        }
        // Tarjan, iteratively.
        let n = names.len();
        let (mut idx, mut low, mut on) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
        let (mut stack, mut out, mut counter) = (Vec::new(), Vec::new(), 0);
        for root in 0..n {
            if idx[root] != usize::MAX {
                continue;
            }
            let mut work = vec![(root, 0usize)];
            while let Some(&mut (v, ref mut next)) = work.last_mut() {
                if *next == 0 && idx[v] == usize::MAX {
                    idx[v] = counter;
                    low[v] = counter;
                    counter += 1;
                    stack.push(v);
                    on[v] = true;
                }
                if let Some(&w) = adj[v].get(*next) {
                    *next += 1;
                    if idx[w] == usize::MAX {
                        work.push((w, 0));
                    } else if on[w] {
                        low[v] = low[v].min(idx[w]);
                    }
                    continue;
                }
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == idx[v] {
                    let mut comp = Vec::new();
                    while let Some(w) = stack.pop() {
                        on[w] = false;
                        comp.push(names[w].clone());
                        if w == v {
                            break;
                        }
                    }
                    if comp.len() > 1 {
                        comp.sort();
                        out.push(comp);
                    }
                }
            }
        }
        out
    }

    /// The edges inside `cycle`, for a report a reader can act on.
    pub fn explain(&self, cycle: &[ModPath]) -> String {
        self.edges
            .iter()
            .filter(|e| cycle.contains(&e.from) && cycle.contains(&e.to))
            .map(|e| format!("  {} -> {} ({}:{})\n", display(&e.from), display(&e.to), e.file.display(), e.line))
            .collect()
    }

    /// Whether `from` refers to `to` (or to a module below it).
    pub fn refers(&self, from: &str, to: &str) -> Option<&Edge> {
        self.edges.iter().find(|e| {
            display(&e.from) == from && (display(&e.to) == to || display(&e.to).starts_with(&format!("{to}::")))
        })
    }
}

/// A workspace member's `[dependencies]` (not dev- or build-dependencies) on other members, by
/// package name, from its `Cargo.toml`.
pub fn workspace_deps(manifest: &Path) -> std::io::Result<(String, BTreeSet<String>)> {
    let text = std::fs::read_to_string(manifest)?;
    let (mut section, mut name, mut deps) = (String::new(), String::new(), BTreeSet::new());
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
            continue;
        }
        let key = line.split(['=', '.', ' ']).next().unwrap_or("");
        if section == "package" && key == "name" {
            name = line.split('"').nth(1).unwrap_or("").to_owned();
        }
        if section == "dependencies" && key.starts_with("wharf-") {
            deps.insert(key.to_owned());
        }
    }
    Ok((name, deps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_of(files: &[(&str, &str)]) -> ModuleGraph {
        let dir = tempfile::tempdir().expect("temp dir");
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
            std::fs::write(p, text).expect("write");
        }
        module_graph(dir.path()).expect("graph")
    }

    fn edges(g: &ModuleGraph) -> Vec<String> {
        g.edges.iter().map(|e| format!("{} -> {}", display(&e.from), display(&e.to))).collect()
    }

    #[test]
    fn use_trees_paths_and_children_become_edges() {
        let g = graph_of(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
            ("a.rs", "mod inner;\nuse crate::{b::{self, X}, c::Y as Z};\nfn f() { inner::go(); }\n"),
            ("a/inner.rs", "use super::super::b::X;\nfn g() { let s = \"crate::c::Fake\"; }\n"),
            (
                "b.rs",
                "// use crate::a;\n/* crate::a::x */ pub struct X;\nmacro_rules! m { () => { $crate::a::f() } }\n",
            ),
            ("c.rs", "pub(super) fn y() -> char { let _ = '\"'; crate::b::X; 'x' }\n"),
        ]);
        assert_eq!(edges(&g), ["a -> a::inner", "a -> b", "a -> c", "a::inner -> b", "c -> b"]);
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn cycles_are_found_and_test_code_is_left_out() {
        let g = graph_of(&[
            ("lib.rs", "mod a;\nmod b;\nmod p;\n"),
            (
                "a.rs",
                "use crate::b::B;\npub struct A;\n#[cfg(test)]\nmod tests;\n#[cfg(test)]\nmod more { use crate::p::P; }\n",
            ),
            ("a/tests.rs", "use crate::p::P;\n"),
            ("b.rs", "pub struct B(crate::a::A);\n"),
            ("p.rs", "mod kid;\npub struct P;\nfn f() { kid::k(); }\n"),
            ("p/kid.rs", "use super::P;\npub fn k() {}\n"),
        ]);
        let cycles: Vec<Vec<String>> = g.cycles().iter().map(|c| c.iter().map(display).collect()).collect();
        assert_eq!(cycles, [vec!["a", "b"], vec!["p", "p::kid"]], "{:?}", edges(&g));
        assert!(g.explain(&g.cycles()[0]).contains("a -> b"));
        assert!(g.refers("a", "p").is_none(), "test code counted: {:?}", edges(&g));
    }

    #[test]
    fn a_parent_presenting_its_children_is_no_cycle() {
        let g = graph_of(&[
            ("lib.rs", "pub mod store;\n"),
            ("store.rs", "mod etcd;\npub use etcd::Etcd;\npub(crate) use self::etcd::Other;\npub trait Store {}\n"),
            ("store/etcd.rs", "use super::Store;\npub struct Etcd;\npub struct Other;\n"),
        ]);
        assert_eq!(edges(&g), ["store::etcd -> store"]);
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn raw_strings_and_lifetimes_do_not_confuse_the_tokens() {
        let toks = tokenize("fn f<'a>(x: &'a str) { r#\"crate::x \"# ; br\"y\"; b'z'; crate::q }");
        let idents: Vec<&str> =
            toks.iter().filter_map(|(t, _)| if let Tok::Ident(s) = t { Some(s.as_str()) } else { None }).collect();
        assert_eq!(idents, ["fn", "f", "a", "x", "a", "str", "crate", "q"]);
    }
}
