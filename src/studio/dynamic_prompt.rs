//! Wildcards and dynamic prompts with the sd-dynamic-prompts syntax, plus A1111's styles.
//!
//! - `{a|b|c}` picks one option; `{2$$a|b|c}` picks two different ones joined by `, `;
//!   `{1-3$$a|b|c}`, `{-2$$…}`, `{2-$$…}` pick a count in a range; `{2$$ and $$a|b|c}` sets the
//!   joiner; `{0.5::a|2::b}` weights options. Options nest.
//! - `__name__` draws one line of `<library>/wildcards/name.txt` (`__a/b__` for nested folders,
//!   `__colo*__` for every matching file); blank lines and `#` comments are skipped and the line
//!   drawn is expanded in turn.
//! - `\{`, `\}` and `\|` are literal braces and bars; every other backslash is left for the
//!   attention parser. `|` outside braces, and inside `[...]`/`(...)` within an option, is
//!   A1111's own syntax (`[a|b]`, `AND`) and passes through.
//!
//! Draws are seeded by the image's seed, so a PNG that records the template and the seed restores
//! the same prompt. The generator is ours (SplitMix64): sd-dynamic-prompts' draws depend on
//! Python's `random` and its own call order, which no other tool reproduces either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where `__name__` wildcards come from.
pub trait WildcardSource {
    /// The usable lines of every wildcard `name` matches (`*` globs within one folder).
    fn lines(&self, name: &str) -> Result<Vec<String>>;
}

/// `<library>/wildcards`: `name.txt` files in nested folders.
pub struct WildcardDir {
    pub root: PathBuf,
}

impl WildcardDir {
    pub fn of_library(library: &Path) -> Self {
        Self { root: library.join("wildcards") }
    }
}

fn usable_lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

impl WildcardSource for WildcardDir {
    fn lines(&self, name: &str) -> Result<Vec<String>> {
        if name.split('/').any(|p| p.is_empty() || p == "." || p == "..") || name.contains('\\') {
            return Err(Error::Argument(format!("wildcard __{name}__: expected a name like colors or animals/cats")));
        }
        let (folder, file) = match name.rsplit_once('/') {
            Some((d, f)) => (self.root.join(d), f),
            None => (self.root.clone(), name),
        };
        if !file.contains('*') {
            let path = folder.join(format!("{file}.txt"));
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Argument(format!("wildcard __{name}__: cannot read {}: {e}", path.display())))?;
            let lines = usable_lines(&text);
            if lines.is_empty() {
                return Err(Error::Argument(format!("wildcard __{name}__: {} has no lines", path.display())));
            }
            return Ok(lines);
        }
        let (pre, post) = file.split_once('*').unwrap_or((file, ""));
        let mut matched: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(|e| Error::Argument(format!("wildcard __{name}__: cannot read {}: {e}", folder.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                p.extension().is_some_and(|e| e == "txt") && stem.len() >= pre.len() + post.len() && stem.starts_with(pre) && stem.ends_with(post.trim_end_matches('*'))
            })
            .collect();
        matched.sort();
        let mut lines = vec![];
        for p in &matched {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            lines.extend(usable_lines(&text));
        }
        if lines.is_empty() {
            return Err(Error::Argument(format!("wildcard __{name}__: no lines in files matching {}", folder.join(format!("{file}.txt")).display())));
        }
        Ok(lines)
    }
}

/// In-memory wildcards (tests, fuzzing, the API's previews).
impl WildcardSource for HashMap<String, Vec<String>> {
    fn lines(&self, name: &str) -> Result<Vec<String>> {
        self.get(name).filter(|l| !l.is_empty()).cloned().ok_or_else(|| Error::Argument(format!("wildcard __{name}__: not found")))
    }
}

/// Whether `prompt` has anything to draw (so one prompt serves a whole batch when it does not).
pub fn is_dynamic(prompt: &str) -> bool {
    let b = prompt.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => return true,
            b'_' if b.get(i + 1) == Some(&b'_') && wildcard_at(prompt, i).is_some() => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// `__name__` starting at byte `i`: the name and the byte after the closing `__`.
fn wildcard_at(s: &str, i: usize) -> Option<(&str, usize)> {
    let rest = s.get(i + 2..)?;
    let end = rest.find("__")?;
    let name = &rest[..end];
    let ok = !name.is_empty()
        && !name.starts_with('_')
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '/' | '.' | '*' | ' '))
        && !name.starts_with(' ')
        && !name.ends_with(' ');
    ok.then(|| (name, i + 2 + end + 2))
}

/// SplitMix64: small, fast, and the same on every platform.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

const MAX_DEPTH: usize = 32;
const MAX_LEN: usize = 1 << 20;

/// Expands every `{…}` and `__name__` of `template`, drawing with `seed`.
pub fn expand(template: &str, wildcards: &dyn WildcardSource, seed: u64) -> Result<String> {
    let mut draw = Draw(seed ^ 0x6c6f_7261_6d69_7800);
    let mut cache = HashMap::new();
    let out = expand_into(template, wildcards, &mut draw, &mut cache, 0)?;
    Ok(out)
}

fn expand_into(s: &str, src: &dyn WildcardSource, draw: &mut Draw, cache: &mut HashMap<String, Vec<String>>, depth: usize) -> Result<String> {
    if depth > MAX_DEPTH {
        return Err(Error::Argument(format!("prompt: wildcards or variants nest deeper than {MAX_DEPTH} (a wildcard that draws itself?) at {:?}", clip(s))));
    }
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        if out.len() > MAX_LEN {
            return Err(Error::Argument("prompt: the expanded prompt is longer than 1 MiB".into()));
        }
        match b[i] {
            b'\\' if matches!(b.get(i + 1), Some(b'{' | b'}' | b'|')) => {
                out.push(b[i + 1] as char);
                i += 2;
            }
            b'\\' => {
                // Kept for the attention parser (`\(`), with the character it escapes.
                let ch = s[i + 1..].chars().next();
                out.push('\\');
                if let Some(c) = ch {
                    out.push(c);
                    i += 1 + c.len_utf8();
                } else {
                    i += 1;
                }
            }
            b'{' => {
                let close = matching_brace(s, i)?;
                out.push_str(&variants(&s[i + 1..close], src, draw, cache, depth)?);
                i = close + 1;
            }
            b'}' => return Err(Error::Argument(format!("prompt: '}}' without its '{{' at byte {i} of {:?} (write \\}} for a literal brace)", clip(s)))),
            b'_' if b.get(i + 1) == Some(&b'_') => match wildcard_at(s, i) {
                Some((name, next)) => {
                    let lines = match cache.get(name) {
                        Some(l) => l.clone(),
                        None => {
                            let l = src.lines(name)?;
                            cache.insert(name.to_string(), l.clone());
                            l
                        }
                    };
                    let line = lines[draw.below(lines.len())].clone();
                    out.push_str(&expand_into(&line, src, draw, cache, depth + 1)?);
                    i = next;
                }
                None => {
                    out.push('_');
                    i += 1;
                }
            },
            _ => {
                let c = s[i..].chars().next().unwrap_or(' ');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    Ok(out)
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

/// The byte of the `}` closing the `{` at `open`.
fn matching_brace(s: &str, open: usize) -> Result<usize> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(Error::Argument(format!("prompt: '{{' at byte {open} is never closed in {:?} (write \\{{ for a literal brace)", clip(s))))
}

/// Splits an option list at `|` outside nested `{}`, `[]` and `()`.
fn split_options(body: &str) -> Vec<&str> {
    let b = body.as_bytes();
    let (mut depth, mut start, mut parts) = (0i32, 0usize, vec![]);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth -= 1,
            b'|' if depth <= 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&body[start..]);
    parts
}

/// `N`, `N-M`, `-M`, `N-` before `$$`: (min, max) counts.
fn quantifier(q: &str) -> Option<(Option<usize>, Option<usize>)> {
    let q = q.trim();
    if q.is_empty() || !q.chars().all(|c| c.is_ascii_digit() || c == '-') || q.matches('-').count() > 1 {
        return None;
    }
    let num = |t: &str| if t.is_empty() { Ok(None) } else { t.parse::<usize>().map(Some) };
    match q.split_once('-') {
        None => num(q).ok().map(|n| (n, n)),
        Some((a, b)) => Some((num(a).ok()?, num(b).ok()?)),
    }
}

fn variants(body: &str, src: &dyn WildcardSource, draw: &mut Draw, cache: &mut HashMap<String, Vec<String>>, depth: usize) -> Result<String> {
    let (mut min, mut max, mut sep, mut rest) = (1usize, 1usize, ", ".to_string(), body);
    if let Some((q, after)) = body.split_once("$$") {
        if let Some((lo, hi)) = quantifier(q) {
            rest = after;
            // `{2$$ and $$a|b}`: a joiner before a second `$$`, when it holds no option syntax.
            if let Some((joiner, opts)) = after.split_once("$$") {
                if !joiner.contains(['|', '{', '}']) {
                    sep = joiner.to_string();
                    rest = opts;
                }
            }
            let n = split_options(rest).len();
            min = lo.unwrap_or(1).min(n);
            max = hi.unwrap_or(n).min(n).max(min);
            if lo == Some(0) {
                min = 0;
            }
        }
    }
    let mut options: Vec<(f64, &str)> = split_options(rest)
        .into_iter()
        .map(|o| match o.split_once("::") {
            Some((w, text)) => match w.trim().parse::<f64>() {
                Ok(w) if w.is_finite() && w >= 0.0 => (w, text),
                _ => (1.0, o),
            },
            None => (1.0, o),
        })
        .collect();
    let count = min + draw.below(max - min + 1);
    let mut picked = Vec::with_capacity(count);
    for _ in 0..count.min(options.len()) {
        let total: f64 = options.iter().map(|(w, _)| w).sum();
        let k = if total > 0.0 {
            let mut r = draw.unit() * total;
            let mut k = options.len() - 1;
            for (j, (w, _)) in options.iter().enumerate() {
                if r < *w {
                    k = j;
                    break;
                }
                r -= w;
            }
            k
        } else {
            draw.below(options.len())
        };
        picked.push(options.remove(k).1);
    }
    let mut parts = Vec::with_capacity(picked.len());
    for p in picked {
        parts.push(expand_into(p, src, draw, cache, depth + 1)?);
    }
    Ok(parts.join(&sep))
}

/// One A1111 style (`styles.csv`: name, prompt, negative_prompt).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptStyle {
    pub name: String,
    pub prompt: String,
    pub negative_prompt: String,
}

/// Reads A1111's `styles.csv` (a header naming the columns; the `csv` crate does the quoting).
pub fn read_styles(path: &Path) -> Result<Vec<PromptStyle>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_styles(&text).map_err(|e| Error::Argument(format!("{}: {e}", path.display())))
}

pub fn parse_styles(text: &str) -> std::result::Result<Vec<PromptStyle>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let header = reader.headers().map_err(|e| format!("line 1: {e}"))?.clone();
    let col = |n: &str| header.iter().position(|h| h.trim() == n);
    let name = col("name").ok_or("line 1: expected a header with a name column (name,prompt,negative_prompt)")?;
    let (prompt, negative) = (col("prompt"), col("negative_prompt"));
    let mut out = vec![];
    for row in reader.records() {
        let row = row.map_err(|e| match e.position() {
            Some(p) => format!("line {}: {e}", p.line()),
            None => e.to_string(),
        })?;
        let line = row.position().map_or(0, |p| p.line());
        let get = |c: Option<usize>| c.and_then(|c| row.get(c)).unwrap_or_default().to_string();
        let n = get(Some(name));
        // A1111 skips a style whose name starts with `#`: a comment row.
        if n.starts_with('#') {
            continue;
        }
        if n.trim().is_empty() {
            if row.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            return Err(format!("line {line}: a style with no name"));
        }
        out.push(PromptStyle { name: n, prompt: get(prompt), negative_prompt: get(negative) });
    }
    Ok(out)
}

/// Applies styles as A1111's `merge_prompts` does: a style's text with `{prompt}` has the prompt
/// put there, otherwise the stripped prompt and style text are joined by `, ` (an empty one
/// left out).
pub fn apply_styles(prompt: &str, negative: &str, names: &[String], styles: &[PromptStyle]) -> Result<(String, String)> {
    let (mut p, mut n) = (prompt.to_string(), negative.to_string());
    for name in names {
        let s = styles
            .iter()
            .find(|s| s.name == *name)
            .ok_or_else(|| Error::Argument(format!("style {name:?}: not in styles.csv (known: {})", styles.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "))))?;
        p = merge_style(&p, &s.prompt);
        n = merge_style(&n, &s.negative_prompt);
    }
    Ok((p, n))
}

fn merge_style(text: &str, style: &str) -> String {
    use super::generation_parameters::python_strip;
    if style.contains("{prompt}") {
        style.replace("{prompt}", text)
    } else {
        [python_strip(text), python_strip(style)].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> HashMap<String, Vec<String>> {
        let mut m = HashMap::new();
        m.insert("color".into(), vec!["red".into(), "green".into(), "blue".into()]);
        m.insert("animals/cat".into(), vec!["a {tabby|black} cat".into()]);
        m.insert("loop".into(), vec!["__loop__".into()]);
        m
    }

    #[test]
    fn variants_and_wildcards_expand_deterministically() {
        let s = src();
        for seed in 0..50 {
            let a = expand("a __color__ {ball|cube} and __animals/cat__", &s, seed).unwrap();
            assert_eq!(a, expand("a __color__ {ball|cube} and __animals/cat__", &s, seed).unwrap());
            assert!(!a.contains(['{', '}', '_']), "{a}");
            assert!(a.ends_with("tabby cat") || a.ends_with("black cat"), "{a}");
        }
        let all: std::collections::HashSet<String> = (0..200).map(|seed| expand("{a|b|c}", &s, seed).unwrap()).collect();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn several_picks_are_distinct_and_joined() {
        let s = src();
        for seed in 0..100 {
            let a = expand("{2$$a|b|c}", &s, seed).unwrap();
            let parts: Vec<&str> = a.split(", ").collect();
            assert_eq!(parts.len(), 2, "{a}");
            assert_ne!(parts[0], parts[1]);
            let b = expand("{2$$ and $$x|y|z}", &s, seed).unwrap();
            assert_eq!(b.split(" and ").count(), 2, "{b}");
            let r = expand("{1-3$$a|b|c}", &s, seed).unwrap();
            assert!((1..=3).contains(&r.split(", ").count()), "{r}");
            assert_eq!(expand("{5$$a|b}", &s, seed).unwrap().split(", ").count(), 2);
        }
    }

    #[test]
    fn weights_escapes_and_a1111_syntax_pass_through() {
        let s = src();
        for seed in 0..50 {
            assert_eq!(expand("{0::never|1::always}", &s, seed).unwrap(), "always");
        }
        assert_eq!(expand(r"\{literal\} [a|b] (x:1.2) \(y\) a|b", &s, 1).unwrap(), r"{literal} [a|b] (x:1.2) \(y\) a|b");
        // `|` inside brackets within an option belongs to prompt editing.
        for seed in 0..20 {
            let a = expand("{[cat|dog]|bird}", &s, seed).unwrap();
            assert!(a == "[cat|dog]" || a == "bird", "{a}");
        }
        assert!(!is_dynamic(r"plain [a|b] \{x\} snake_case"));
        assert!(is_dynamic("a {b|c}") && is_dynamic("__color__"));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let s = src();
        let e = expand("a {b|c", &s, 0).unwrap_err().to_string();
        assert!(e.contains("never closed"), "{e}");
        let e = expand("a }", &s, 0).unwrap_err().to_string();
        assert!(e.contains("without its"), "{e}");
        let e = expand("__nope__", &s, 0).unwrap_err().to_string();
        assert!(e.contains("__nope__"), "{e}");
        let e = expand("__loop__", &s, 0).unwrap_err().to_string();
        assert!(e.contains("deeper"), "{e}");
    }

    #[test]
    fn wildcard_files_in_nested_folders() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("wildcards/animals");
        std::fs::create_dir_all(&w).unwrap();
        std::fs::write(w.join("cats.txt"), "# comment\n\ntabby\n").unwrap();
        std::fs::write(w.join("cows.txt"), "holstein\n").unwrap();
        let src = WildcardDir::of_library(dir.path());
        assert_eq!(expand("__animals/cats__", &src, 3).unwrap(), "tabby");
        let all: std::collections::HashSet<String> = (0..60).map(|s| expand("__animals/c*__", &src, s).unwrap()).collect();
        assert_eq!(all.len(), 2);
        let e = expand("__animals/dogs__", &src, 0).unwrap_err().to_string();
        assert!(e.contains("dogs.txt"), "{e}");
        assert!(expand("__../x__", &src, 0).is_err());
    }

    #[test]
    fn a1111_styles() {
        let csv = "name,prompt,negative_prompt\n\"Cinematic\",\"cinematic still of {prompt}, film grain\",\"cartoon, \"\"bad\"\"\"\nPlain,sharp focus,\n";
        let styles = parse_styles(csv).unwrap();
        assert_eq!(styles.len(), 2);
        assert_eq!(styles[0].negative_prompt, "cartoon, \"bad\"");
        let (p, n) = apply_styles("a cat", "blurry", &["Cinematic".into(), "Plain".into()], &styles).unwrap();
        assert_eq!(p, "cinematic still of a cat, film grain, sharp focus");
        assert_eq!(n, "blurry, cartoon, \"bad\"");
        assert!(apply_styles("a", "", &["Nope".into()], &styles).unwrap_err().to_string().contains("Nope"));
        // `merge_prompts` strips both sides, and an empty style leaves the stripped prompt.
        let (p, n) = apply_styles(" a cat ", " ugly ", &["Plain".into()], &styles).unwrap();
        assert_eq!((p.as_str(), n.as_str()), ("a cat, sharp focus", "ugly"));
        assert_eq!(parse_styles("name,prompt\n# hidden,x\nShown,y\n").unwrap().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["Shown"]);
        assert!(parse_styles("prompt\nx\n").unwrap_err().contains("name column"));
    }
}
