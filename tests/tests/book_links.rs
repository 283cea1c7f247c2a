//! Every `{{#include}}` and `{{#rustdoc_include}}` in the book names a file that exists and, where
//! it names an anchor or a line range, an anchor the file defines or lines the file has; every
//! chapter listed in `SUMMARY.md` exists and is not empty; every image a chapter shows exists;
//! the Rust code a chapter shows is code a user can write in a crate that depends on `kron`.
//!
//! mdBook itself includes nothing (and says nothing) for an anchor it cannot find, so without
//! this check a renamed anchor silently empties a code block of the book.

use std::fs;
use std::path::{Path, PathBuf};

/// What an include takes from its file.
#[derive(Debug, PartialEq)]
enum Part {
    /// The whole file.
    All,
    /// Lines from `start` (1-based), if given, to `end` (inclusive), if given.
    Lines {
        start: Option<usize>,
        end: Option<usize>,
    },
    /// The lines between `ANCHOR: name` and `ANCHOR_END: name`.
    Anchor(String),
}

/// One include directive found in a chapter.
#[derive(Debug, PartialEq)]
struct Include {
    kind: String,
    path: String,
    part: Part,
    line: usize,
}

/// Parses `path`, `path:anchor`, `path:N`, `path:N:M`, `path:N:` or `path::M` as mdBook does.
fn parse_target(target: &str) -> (String, Part) {
    let (path, rest) = match target.split_once(':') {
        Some((p, r)) => (p, Some(r)),
        None => (target, None),
    };
    let part = match rest {
        None | Some("") => Part::All,
        Some(rest) => {
            let mut it = rest.splitn(2, ':');
            let first = it.next().unwrap_or("");
            let second = it.next();
            match first.parse::<usize>() {
                Ok(start) => Part::Lines {
                    start: Some(start),
                    // `N` alone is one line; `N:` runs to the end.
                    end: match second {
                        None => Some(start),
                        Some(s) => s.parse().ok(),
                    },
                },
                Err(_) if first.is_empty() => Part::Lines {
                    start: None,
                    end: second.and_then(|s| s.parse().ok()),
                },
                Err(_) => Part::Anchor(first.to_string()),
            }
        }
    };
    (path.to_string(), part)
}

/// The include directives of a chapter's text, skipping escaped ones (`\{{#include ..}}`).
fn find_includes(text: &str) -> Vec<Include> {
    let mut found = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(pos) = rest.find("{{") {
        let abs = offset + pos;
        let after = &rest[pos + 2..];
        let close = after.find("}}");
        let escaped = text[..abs].ends_with('\\');
        let advance = pos + 2 + close.map_or(0, |c| c + 2);
        if let (Some(close), false) = (close, escaped) {
            let inner = after[..close].trim_start();
            if let Some(directive) = inner.strip_prefix('#')
                && !after[..close].contains('}')
            {
                let mut words = directive.split_whitespace();
                let kind = words.next().unwrap_or("");
                if let ("include" | "rustdoc_include", Some(target)) = (kind, words.next()) {
                    let (path, part) = parse_target(target);
                    found.push(Include {
                        kind: kind.to_string(),
                        path,
                        part,
                        line: text[..abs].matches('\n').count() + 1,
                    });
                }
            }
        }
        offset += advance;
        rest = &rest[advance..];
    }
    found
}

/// The name a line defines after `marker` (`ANCHOR:` or `ANCHOR_END:`), as mdBook reads it.
fn anchor_name<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let at = line.find(marker)?;
    let name = line[at + marker.len()..].trim_start();
    let end = name
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(name.len());
    (end > 0).then(|| &name[..end])
}

/// What is wrong with one include of a file with contents `file` (`None` when all is well).
fn check_part(file: &str, part: &Part) -> Option<String> {
    let lines: Vec<&str> = file.lines().collect();
    match part {
        Part::All => None,
        Part::Lines { start, end } => {
            let n = lines.len();
            match (start, end) {
                (Some(0), _) => Some("line numbers start at 1".into()),
                (Some(s), _) if *s > n => Some(format!("starts at line {s}, the file has {n}")),
                (Some(s), Some(e)) if e < s => Some(format!("range {s}:{e} is empty")),
                (_, Some(e)) if *e > n => Some(format!("ends at line {e}, the file has {n}")),
                _ => None,
            }
        }
        Part::Anchor(name) => {
            let start = lines.iter().position(|l| {
                !l.contains("ANCHOR_END:") && anchor_name(l, "ANCHOR:") == Some(name)
            });
            let Some(start) = start else {
                return Some(format!("no `ANCHOR: {name}` in the file"));
            };
            let end = lines[start + 1..]
                .iter()
                .position(|l| anchor_name(l, "ANCHOR_END:") == Some(name));
            match end {
                None => Some(format!(
                    "`ANCHOR: {name}` has no `ANCHOR_END: {name}` after it"
                )),
                Some(0) => Some(format!("anchor `{name}` encloses nothing")),
                Some(_) => None,
            }
        }
    }
}

/// All `.md` files under `dir`, sorted.
fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every problem with the includes of the chapters under `src`, one line each.
fn check_includes(src: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for md in markdown_files(src) {
        let text = fs::read_to_string(&md).unwrap();
        let dir = md.parent().unwrap();
        for inc in find_includes(&text) {
            let at = format!(
                "{}:{}: {{{{#{} {}}}}}",
                md.display(),
                inc.line,
                inc.kind,
                inc.path
            );
            let target = dir.join(&inc.path);
            match fs::read_to_string(&target) {
                Err(e) => problems.push(format!("{at}: cannot read {}: {e}", target.display())),
                Ok(file) => {
                    if let Some(p) = check_part(&file, &inc.part) {
                        problems.push(format!("{at}: {p}"));
                    }
                }
            }
        }
    }
    problems
}

/// The chapter files `SUMMARY.md` links to (`[title](path.md)`), skipping draft entries `()`.
fn summary_links(summary: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in summary.lines() {
        let mut rest = line;
        while let Some(open) = rest.find("](") {
            let after = &rest[open + 2..];
            let Some(close) = after.find(')') else { break };
            let target = after[..close].trim();
            let target = target.split('#').next().unwrap_or("");
            if !target.is_empty() {
                out.push(target.to_string());
            }
            rest = &after[close..];
        }
    }
    out
}

/// Every problem with `SUMMARY.md`: draft (unlinked) entries, missing or empty chapters.
fn check_summary(src: &Path) -> Vec<String> {
    let summary_path = src.join("SUMMARY.md");
    let summary = match fs::read_to_string(&summary_path) {
        Ok(s) => s,
        Err(e) => return vec![format!("{}: {e}", summary_path.display())],
    };
    let mut problems = Vec::new();
    for (i, line) in summary.lines().enumerate() {
        if line.contains("]()") {
            problems.push(format!(
                "{}:{}: a draft chapter (no file): {}",
                summary_path.display(),
                i + 1,
                line.trim()
            ));
        }
    }
    for link in summary_links(&summary) {
        let path = src.join(&link);
        match fs::read_to_string(&path) {
            Err(e) => problems.push(format!("SUMMARY.md links {link}: {e}")),
            Ok(text) if text.lines().filter(|l| !l.trim().is_empty()).count() < 2 => {
                problems.push(format!("SUMMARY.md links {link}, which has no content"))
            }
            Ok(_) => {}
        }
    }
    problems
}

/// The targets of the images (`![alt](path)`) of a chapter's text, with their line numbers,
/// skipping web addresses.
fn image_links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(open) = rest.find("![") {
            let after = &rest[open + 2..];
            let Some(mid) = after.find("](") else { break };
            let target_start = &after[mid + 2..];
            let Some(close) = target_start.find(')') else {
                break;
            };
            let target = target_start[..close]
                .split_whitespace()
                .next()
                .unwrap_or("");
            if !target.is_empty() && !target.contains("://") {
                out.push((i + 1, target.to_string()));
            }
            rest = &target_start[close..];
        }
    }
    out
}

/// Every image a chapter under `src` shows that is not there, one line each.
fn check_images(src: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for md in markdown_files(src) {
        let text = fs::read_to_string(&md).unwrap();
        for (line, target) in image_links(&text) {
            let path = md.parent().unwrap().join(&target);
            if !path.is_file() {
                problems.push(format!("{}:{line}: no image {target}", md.display()));
            }
        }
    }
    problems
}

/// The lines a part of a file shows, as mdBook shows them: anchor marker lines dropped.
fn part_text(file: &str, part: &Part) -> String {
    let lines: Vec<&str> = file.lines().collect();
    let picked: Vec<&str> = match part {
        Part::All => lines,
        Part::Lines { start, end } => {
            let s = start.unwrap_or(1).saturating_sub(1).min(lines.len());
            let e = end.unwrap_or(lines.len()).min(lines.len()).max(s);
            lines[s..e].to_vec()
        }
        Part::Anchor(name) => {
            let start = lines.iter().position(|l| {
                !l.contains("ANCHOR_END:") && anchor_name(l, "ANCHOR:") == Some(name)
            });
            let Some(start) = start else {
                return String::new();
            };
            lines[start + 1..]
                .iter()
                .take_while(|l| anchor_name(l, "ANCHOR_END:") != Some(name))
                .copied()
                .collect()
        }
    };
    picked
        .into_iter()
        .filter(|l| !l.contains("ANCHOR:") && !l.contains("ANCHOR_END:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The Rust code a chapter at `md` shows: each ```` ```rust ```` block, its includes resolved
/// (an unreadable include resolves to nothing: [`check_includes`] reports it), with the line
/// of the chapter where the block starts.
fn shown_code(md: &Path, text: &str) -> Vec<(usize, String)> {
    let dir = md.parent().unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut open, fence) {
            (None, true) => {
                let lang = line.trim_start().trim_start_matches('`').trim();
                if lang.split(',').next() == Some("rust") {
                    open = Some((i + 1, String::new()));
                }
            }
            (Some(_), true) => blocks.push(open.take().unwrap()),
            (Some((_, code)), false) => {
                let includes = find_includes(line);
                if includes.is_empty() {
                    code.push_str(line);
                    code.push('\n');
                }
                for inc in includes {
                    if let Ok(file) = fs::read_to_string(dir.join(&inc.path)) {
                        code.push_str(&part_text(&file, &inc.part));
                    }
                }
            }
            (None, false) => {}
        }
    }
    blocks
}

/// Rust source with its comments and the contents of its string and character literals
/// blanked out, so that only code remains to be searched.
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                out.push(' ');
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        '\n' => out.push('\n'),
                        _ => {}
                    }
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Paths no user's crate can write: the examples' library, the workspace's test package, the
/// facade's inner crates under their own names (a user depends on `kron` and reaches them as
/// `kron::autodiff`, `kron::layers`, `kron::optim`, `kron::data`), and paths relative to a
/// crate or module of the workspace.
const UNWRITABLE: [&str; 8] = [
    "kron_examples",
    "kron_tests",
    "kron_autodiff",
    "kron_layers",
    "kron_optim",
    "kron_data",
    "crate::",
    "super::",
];

/// The items a crate's sources under `dir` define at the top level as `pub` (functions, types,
/// constants): names a user does not have unless a chapter shows their definition.
fn public_items(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    for f in files {
        for line in fs::read_to_string(&f).unwrap().lines() {
            for kw in ["fn", "struct", "enum", "const", "type", "static", "trait"] {
                if let Some(rest) = line.strip_prefix(&format!("pub {kw} ")) {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
    }
    names
}

/// An identifier of some code, with its surroundings.
struct Ident {
    /// The last character before it that is not whitespace (`.` for a method or field).
    before: char,
    /// The identifier.
    name: String,
    /// Whether a single `:` follows it (a parameter, a typed binding, a field).
    binds: bool,
}

/// The identifiers of `code`, in order.
fn identifiers(code: &str) -> Vec<Ident> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut prev = ' ';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let binds = chars.get(j) == Some(&':') && chars.get(j + 1) != Some(&':');
            if !name.starts_with(|c: char| c.is_ascii_digit()) {
                out.push(Ident {
                    before: prev,
                    name,
                    binds,
                });
            }
            prev = chars[i - 1];
            continue;
        }
        if !c.is_whitespace() {
            prev = c;
        }
        i += 1;
    }
    out
}

/// Every place where a chapter under `src` shows code a user cannot write in a crate of their
/// own: a path of [`UNWRITABLE`], or one of `private` (the examples' items) used but not
/// defined in the code the chapter shows. One line each.
fn check_user_code(src: &Path, private: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for md in markdown_files(src) {
        let text = fs::read_to_string(&md).unwrap();
        let blocks: Vec<(usize, String)> = shown_code(&md, &text)
            .into_iter()
            .map(|(line, code)| (line, code_only(&code)))
            .collect();
        let mut defined = Vec::new();
        for (_, code) in &blocks {
            let ids = identifiers(code);
            for w in ids.windows(2) {
                if [
                    "fn", "struct", "enum", "const", "type", "static", "let", "mut",
                ]
                .contains(&w[0].name.as_str())
                {
                    defined.push(w[1].name.clone());
                }
            }
            defined.extend(ids.into_iter().filter(|i| i.binds).map(|i| i.name));
        }
        for (line, code) in &blocks {
            let at = format!("{}:{line}", md.display());
            for bad in UNWRITABLE {
                if code.contains(bad) {
                    problems.push(format!("{at}: shows `{bad}`"));
                }
            }
            let mut named = Vec::new();
            for Ident {
                before, name: id, ..
            } in identifiers(code)
            {
                if before != '.'
                    && private.contains(&id)
                    && !defined.contains(&id)
                    && !named.contains(&id)
                {
                    problems.push(format!(
                        "{at}: uses `{id}`, which the examples define and the chapter does not show"
                    ));
                    named.push(id);
                }
            }
        }
    }
    problems
}

#[test]
fn every_chapter_shows_code_a_user_can_write() {
    let src = book_src();
    let private = public_items(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/src"));
    assert!(
        ["mlp", "gather_rows", "Task", "RunSpec"]
            .iter()
            .all(|n| private.iter().any(|p| p == n)),
        "the examples' items were not found: {private:?}"
    );
    let problems = check_user_code(&src, &private);
    assert!(
        problems.is_empty(),
        "code a user cannot copy into a crate that depends on kron:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_user_code_check_fails_on_code_from_the_workspace() {
    let dir = std::env::temp_dir().join(format!("kron-book-user-{}", std::process::id()));
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(
        dir.join("code.rs"),
        "// ANCHOR: imports\nuse kron_examples::digits_mlp::mlp;\n// ANCHOR_END: imports\n\
         // ANCHOR: recipe\n    kfac: crate::KFAC_DEFAULT.with_damping(0.1),\n// ANCHOR_END: recipe\n\
         // ANCHOR: step\nlet xb = gather_rows(&x, &idx); // gather_rows, \"crate::\"\n\
         let n = x.mlp();\n// ANCHOR_END: step\n\
         // ANCHOR: own\nfn shift(x: u32) -> u32 { x }\nlet y = shift(1);\n\
         fn rows(run: &Run) -> usize { run.len() }\n\
         let s = \"crate:: gather_rows \\\" super::\";\n// ANCHOR_END: own\n",
    )
    .unwrap();
    fs::write(
        src.join("chapter.md"),
        "# C\n\n```rust\n{{#include ../code.rs:imports}}\n```\n\n\
         ```rust\n{{#include ../code.rs:recipe}}\n```\n\n\
         ```rust\n{{#include ../code.rs:step}}\n```\n\n\
         ```rust\n{{#include ../code.rs:own}}\n```\n\n\
         ```text\ncrate::not_code\n```\n\n\
         ```rust\nlet inline = super::thing();\n```\n",
    )
    .unwrap();
    let private: Vec<String> = ["mlp", "gather_rows", "shift", "run"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let problems = check_user_code(&src, &private);
    let expect = [
        (3, "`kron_examples`"),
        (3, "uses `mlp`"),
        (7, "`crate::`"),
        (11, "uses `gather_rows`"),
        (23, "`super::`"),
    ];
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    for (p, (line, what)) in problems.iter().zip(expect) {
        assert!(
            p.contains(&format!("chapter.md:{line}:")) && p.contains(what),
            "expected line {line} to report {what:?}, got {p}"
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

fn book_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../book/src")
}

#[test]
fn every_include_names_an_existing_file_and_anchor() {
    let src = book_src();
    let found: usize = markdown_files(&src)
        .iter()
        .map(|md| find_includes(&fs::read_to_string(md).unwrap()).len())
        .sum();
    assert!(
        found > 0,
        "no includes found under {}: is the scanner broken?",
        src.display()
    );
    let problems = check_includes(&src);
    assert!(
        problems.is_empty(),
        "broken includes:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_chapter_in_the_summary_exists() {
    let src = book_src();
    assert!(summary_links(&fs::read_to_string(src.join("SUMMARY.md")).unwrap()).len() >= 2);
    let problems = check_summary(&src);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn parses_the_forms_mdbook_accepts() {
    let text = "a {{#include ../snippets/x.rs:train}} b\n\
                {{ #rustdoc_include ../../examples/y.rs:12:20 }}\n\
                {{#include z.rs}} {{#include z.rs:3}} {{#include z.rs:3:}} {{#include z.rs::9}}\n\
                \\{{#include escaped.rs:nope}}\n\
                {{#title Not an include}} {{#playground p.rs}}\n";
    let got = find_includes(text);
    let summary: Vec<(&str, &str, &Part, usize)> = got
        .iter()
        .map(|i| (i.kind.as_str(), i.path.as_str(), &i.part, i.line))
        .collect();
    let lines = |start, end| Part::Lines { start, end };
    assert_eq!(
        summary,
        vec![
            (
                "include",
                "../snippets/x.rs",
                &Part::Anchor("train".into()),
                1
            ),
            (
                "rustdoc_include",
                "../../examples/y.rs",
                &lines(Some(12), Some(20)),
                2
            ),
            ("include", "z.rs", &Part::All, 3),
            ("include", "z.rs", &lines(Some(3), Some(3)), 3),
            ("include", "z.rs", &lines(Some(3), None), 3),
            ("include", "z.rs", &lines(None, Some(9)), 3),
        ]
    );
}

#[test]
fn the_check_fails_on_a_broken_book() {
    let dir = std::env::temp_dir().join(format!("kron-book-links-{}", std::process::id()));
    let src = dir.join("src");
    fs::create_dir_all(src.join("part")).unwrap();
    fs::write(
        dir.join("code.rs"),
        "// ANCHOR: good\nfn good() {}\n// ANCHOR_END: good\n\
         // ANCHOR: open\nfn open() {}\n\
         // ANCHOR: empty\n// ANCHOR_END: empty\n\
         // ANCHOR: goodness\n// ANCHOR_END: goodness\n",
    )
    .unwrap();
    fs::write(
        src.join("part/chapter.md"),
        "{{#include ../../code.rs:good}}\n\
         {{#include ../../code.rs:missing}}\n\
         {{#include ../../code.rs:open}}\n\
         {{#include ../../code.rs:empty}}\n\
         {{#include ../../code.rs:good_}}\n\
         {{#rustdoc_include ../../nowhere.rs:good}}\n\
         {{#include ../../code.rs:2:4}}\n\
         {{#include ../../code.rs:40}}\n\
         {{#include ../../code.rs:0}}\n\
         {{#include ../../code.rs::99}}\n\
         \\{{#include ../../nowhere.rs}}\n",
    )
    .unwrap();
    fs::write(
        src.join("SUMMARY.md"),
        "# Summary\n\n- [Chapter](part/chapter.md)\n- [Gone](gone.md)\n- [Later]()\n",
    )
    .unwrap();

    let problems = check_includes(&src);
    let expect = [
        (2, "no `ANCHOR: missing`"),
        (3, "`ANCHOR: open` has no `ANCHOR_END: open`"),
        (4, "anchor `empty` encloses nothing"),
        (5, "no `ANCHOR: good_`"),
        (6, "cannot read"),
        (8, "starts at line 40, the file has 9"),
        (9, "line numbers start at 1"),
        (10, "ends at line 99, the file has 9"),
    ];
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    for (p, (line, what)) in problems.iter().zip(expect) {
        assert!(
            p.contains(&format!("chapter.md:{line}:")) && p.contains(what),
            "expected line {line} to report {what:?}, got {p}"
        );
    }

    let summary = check_summary(&src);
    assert_eq!(summary.len(), 2, "{summary:#?}");
    assert!(summary[0].contains("draft chapter"), "{}", summary[0]);
    assert!(summary[1].contains("gone.md"), "{}", summary[1]);

    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_image_exists() {
    let problems = check_images(&book_src());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_image_check_finds_missing_files() {
    let text = "![a](figures/x.svg) and ![b](y.png \"title\")\n\
                ![web](https://example.org/z.svg) [not an image](w.svg)\n";
    assert_eq!(
        image_links(text),
        vec![(1, "figures/x.svg".to_string()), (1, "y.png".to_string())]
    );
    let dir = std::env::temp_dir().join(format!("kron-book-images-{}", std::process::id()));
    fs::create_dir_all(dir.join("figures")).unwrap();
    fs::write(dir.join("figures/x.svg"), "<svg/>").unwrap();
    fs::write(dir.join("chapter.md"), text).unwrap();
    let problems = check_images(&dir);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("chapter.md:1: no image y.png"),
        "{}",
        problems[0]
    );
    fs::remove_dir_all(&dir).unwrap();
}
