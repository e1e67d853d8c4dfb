//! Import cycles between a crate's top-level modules: which module names which (`crate::x`,
//! `use crate::{x, y}`, `super::` paths that climb to the root), outside comments, and the
//! groups of modules that reach each other.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// One module naming another, with the first place it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub from: String,
    pub to: String,
    pub at: String,
}

/// The modules declared in `src/lib.rs` (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn top_modules(src: &Path) -> Result<Vec<String>> {
    let lib = fs::read_to_string(src.join("lib.rs")).context("read src/lib.rs")?;
    Ok(lib
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.strip_suffix(';')?.trim().to_owned())
        })
        .collect())
}

/// The files of a top-level module, each with its module path inside the crate.
fn files_of(src: &Path, module: &str) -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        out.push((file, vec![module.to_owned()]));
    }
    let dir = src.join(module);
    if dir.is_dir() {
        walk(&dir, &mut vec![module.to_owned()], &mut out);
    }
    out
}

fn walk(dir: &Path, path: &mut Vec<String>, out: &mut Vec<(PathBuf, Vec<String>)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        if p.is_dir() {
            path.push(name);
            walk(&p, path, out);
            path.pop();
        } else if p.extension().is_some_and(|e| e == "rs") {
            let mut module = path.clone();
            if name != "mod" {
                module.push(name);
            }
            out.push((p, module));
        }
    }
}

/// Code without comments (line comments, doc comments, block comments); string contents are
/// kept, which at worst adds an edge.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut depth = 1;
                let mut last = ' ';
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                    }
                    match (last, n) {
                        ('*', '/') => {
                            depth -= 1;
                            last = ' ';
                            if depth == 0 {
                                break;
                            }
                            continue;
                        }
                        ('/', '*') => {
                            depth += 1;
                            last = ' ';
                            continue;
                        }
                        _ => {}
                    }
                    last = n;
                }
            }
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// For each character, how many inline `mod x { … }` blocks enclose it (each one more level
/// for `super::` to climb).
fn inline_depths(code: &[char]) -> Vec<usize> {
    let mut depths = Vec::with_capacity(code.len());
    // The brace depth at which each enclosing inline module opened.
    let mut opened: Vec<usize> = Vec::new();
    let mut braces = 0;
    let mut i = 0;
    while i < code.len() {
        let word_start = i == 0 || !is_ident(code[i - 1]);
        if word_start && code[i..].starts_with(&['m', 'o', 'd', ' ']) {
            let mut j = i + 4;
            while j < code.len() && is_ident(code[j]) {
                j += 1;
            }
            while j < code.len() && code[j] == ' ' {
                j += 1;
            }
            if code.get(j) == Some(&'{') {
                opened.push(braces);
            }
        }
        match code[i] {
            '{' => braces += 1,
            '}' => {
                braces -= 1;
                if opened.last() == Some(&braces) {
                    opened.pop();
                }
            }
            _ => {}
        }
        depths.push(opened.len());
        i += 1;
    }
    depths
}

/// The top-level modules one file names, with the line of each first mention. `module` is
/// the file's module path (`["filters", "thrift"]`).
fn named_in(code: &str, module: &[String]) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let inline = inline_depths(&bytes);
    let line_at = |i: usize| bytes[..i].iter().filter(|c| **c == '\n').count() + 1;
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != ':';
        if !starts_word {
            i += 1;
            continue;
        }
        let rest: String = bytes[i..bytes.len().min(i + 6)].iter().collect();
        // Where the path starts: at the crate root, or `supers` levels above this module.
        let after = if rest.starts_with("crate:") {
            i + "crate::".len()
        } else if rest.starts_with("super:") {
            let mut j = i;
            let mut supers = 0;
            while bytes[j..].iter().take(7).collect::<String>() == "super::" {
                supers += 1;
                j += 7;
            }
            // A file's own module is its path (plus the inline modules around the path);
            // `super` from `a/b.rs` is `a`.
            if supers < module.len() + inline[i] {
                i = j;
                continue;
            }
            j
        } else {
            i += 1;
            continue;
        };
        if bytes.get(after - 1) != Some(&':') {
            i += 1;
            continue;
        }
        let line = line_at(i);
        if bytes.get(after) == Some(&'{') {
            // `crate::{a, b::c, d::{e, f}}`: the names at depth one.
            let mut depth = 0;
            let mut j = after;
            let mut expecting = true;
            while j < bytes.len() {
                match bytes[j] {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            expecting = true;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expecting = true,
                    c if depth == 1 && expecting && is_ident(c) => {
                        let name: String =
                            bytes[j..].iter().take_while(|c| is_ident(**c)).collect();
                        j += name.len();
                        found.push((name, line));
                        expecting = false;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
            i = j;
        } else {
            let name: String = bytes[after..]
                .iter()
                .take_while(|c| is_ident(**c))
                .collect();
            i = after + name.len();
            if !name.is_empty() {
                found.push((name, line));
            }
        }
    }
    found
}

/// Every edge between different top-level modules of the crate whose sources are in `src`.
pub fn uses(src: &Path) -> Result<Vec<Use>> {
    let modules = top_modules(src)?;
    let known: BTreeSet<&str> = modules.iter().map(String::as_str).collect();
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for m in &modules {
        for (file, path) in files_of(src, m) {
            let text =
                fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
            let code = strip_comments(&text);
            for (to, line) in named_in(&code, &path) {
                if to != *m && known.contains(to.as_str()) {
                    let at = format!("{}:{line}", file.display());
                    edges.entry((m.clone(), to)).or_insert(at);
                }
            }
        }
    }
    Ok(edges
        .into_iter()
        .map(|((from, to), at)| Use { from, to, at })
        .collect())
}

/// The groups of two or more modules that reach each other (strongly connected components),
/// each sorted, in order.
pub fn cycles(edges: &[Use]) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in edges {
        next.entry(&e.from).or_default().push(&e.to);
        next.entry(&e.to).or_default();
    }
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(n) = todo.pop() {
            for m in next.get(n).into_iter().flatten() {
                if seen.insert(*m) {
                    todo.push(m);
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&str, BTreeSet<&str>> = next.keys().map(|n| (*n, reach(n))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (n, r) in &reaches {
        let group: Vec<String> = r
            .iter()
            .filter(|m| reaches[**m].contains(n))
            .map(|m| (*m).to_owned())
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

/// A readable account of the cycles: each group and the edges inside it, with where.
pub fn report(edges: &[Use], groups: &[Vec<String>]) -> String {
    let mut out = String::new();
    for g in groups {
        out.push_str(&format!("cycle: {}\n", g.join(" ↔ ")));
        for e in edges {
            if g.contains(&e.from) && g.contains(&e.to) {
                out.push_str(&format!("  {} → {}  ({})\n", e.from, e.to, e.at));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(code: &str, module: &[&str]) -> Vec<String> {
        let module: Vec<String> = module.iter().map(|s| (*s).to_owned()).collect();
        named_in(&strip_comments(code), &module)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn finds_paths_groups_and_supers_but_not_comments() {
        let code = "use crate::{\n    admin::{self, Admin},\n    capture::{a, b::{c}},\n    \
                    run,\n};\nlet x = crate::state::load();\n// crate::comment::x\n\
                    /// [`crate::doc`]\n/* crate::block */ use super::sibling;\n\
                    use super::super::top::x;\nlet s = \"crate::in_string\";";
        assert_eq!(
            names(code, &["filters", "thrift"]),
            ["admin", "capture", "run", "state", "top", "in_string"]
        );
        // From a top-level module's own file, `super::` is the crate root; from its inline
        // test module, `super::super::`.
        assert_eq!(names("use super::config::X;", &["balance"]), ["config"]);
        assert_eq!(
            names(
                "mod tests { use super::x; use super::super::config::Y; }",
                &["balance"]
            ),
            ["config"]
        );
        // Words that only end in `crate`/`super` are not paths.
        assert!(names("my_crate::x; nosuper::y", &["a"]).is_empty());
    }

    #[test]
    fn cycles_are_the_groups_that_reach_each_other() {
        let e = |from: &str, to: &str| Use {
            from: from.into(),
            to: to.into(),
            at: String::new(),
        };
        let edges = [
            e("a", "b"),
            e("b", "c"),
            e("c", "a"),
            e("c", "d"),
            e("x", "y"),
            e("y", "x"),
            e("d", "e"),
        ];
        assert_eq!(
            cycles(&edges),
            [vec!["a", "b", "c"], vec!["x", "y"]]
                .map(|g| g.into_iter().map(String::from).collect::<Vec<_>>())
        );
        assert!(cycles(&[e("a", "b"), e("b", "c")]).is_empty());
    }
}
