//! The module graph as `lib.rs` states it, checked on the sources: each
//! room imports only the rooms below it, so data flows one way and there
//! is no circle. Test code (after `#[cfg(test)]`) is exempt.

use std::{collections::BTreeSet, fs, path::Path};

/// The rooms, top first: each may import only those after it.
const ORDER: &[&str] = &[
    "run",
    "node",
    "report",
    "symbolize",
    "ingest",
    "attach",
    "unwind",
    "runtime",
    "sys",
];

/// Top-level modules outside the pipeline, used by `run` (and `main`).
const ENTRY: &[&str] = &["cli", "demo", "oom", "version"];

/// The top-level modules a source names through `crate::`, both as
/// `crate::room::...` and inside `use crate::{room::..., other}`.
fn crate_refs(src: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut expect) = (1, true);
            let mut chars = group.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expect = true,
                    c if depth == 1 && expect && (c.is_alphanumeric() || c == '_') => {
                        let name = ident(&group[i..]);
                        for _ in 1..name.chars().count() {
                            chars.next();
                        }
                        out.insert(name);
                        expect = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("self");
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn rooms_import_only_the_rooms_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 40, "sources found: {}", files.len());
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap_or(f);
        let room = rel
            .iter()
            .next()
            .and_then(|c| c.to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_string();
        let Some(rank) = ORDER.iter().position(|r| *r == room) else {
            continue;
        };
        let text = fs::read_to_string(f).unwrap_or_default();
        let production = text.split("#[cfg(test)]").next().unwrap_or_default();
        for used in crate_refs(production) {
            if used == room {
                continue;
            }
            let allowed = match ORDER.iter().position(|r| *r == used) {
                Some(r) => r > rank,
                None => room == "run" && ENTRY.contains(&used.as_str()),
            };
            if !allowed {
                wrong.push(format!("{} imports crate::{used}", rel.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the room order {ORDER:?}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn grouped_and_plain_imports_are_both_seen() {
    let refs = crate_refs(
        "use crate::{\n    attach::probe::{A, B},\n    sys::procfs,\n};\nlet x = crate::report::write(); use crate::{self as c};",
    );
    let want: BTreeSet<String> = ["attach", "report", "sys"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
}
