//! A1111 prompt syntax: `(word)`, `(word:1.3)`, `[word]`, `\(` escapes and `BREAK`, and the
//! chunking of long prompts into 75-token windows.
//!
//! This follows `modules/prompt_parser.py::parse_prompt_attention` and
//! `sd_hijack_clip.py::tokenize_line` (comma backtrack of 20 tokens). A prompt with no
//! emphasis that fits one window gives exactly the token ids diffusers uses.

use crate::error::Result;
use crate::sdxl::tokenizer::ClipTokenizer;

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;
const COMMA_BACKTRACK: usize = 20;

/// A piece of prompt text with its attention weight; `Break` forces a new chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Fragment {
    Text(String, f64),
    Break,
}

/// Parses emphasis. Unbalanced brackets apply to the rest of the prompt, as in A1111.
pub fn parse_attention(text: &str) -> Vec<Fragment> {
    attention_pairs(text)
        .into_iter()
        .map(|(t, w)| if w == -1.0 && t == "BREAK" { Fragment::Break } else { Fragment::Text(t, w) })
        .collect()
}

/// `parse_prompt_attention`'s own list: text and weight, `BREAK` as the text "BREAK" with a
/// negative weight (scaled by brackets around it, as A1111 scales it), neighbours of equal
/// weight merged. A1111 reads it as it is to tell whether a prompt uses emphasis.
pub fn attention_pairs(text: &str) -> Vec<(String, f64)> {
    let mut res: Vec<(String, f64)> = Vec::new(); // weight -1 marks BREAK
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in res.iter_mut().skip(from) {
            r.1 *= m;
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            // `\(` `\)` `\[` `\]` `\\` are literals; a lone backslash disappears.
            match chars.get(i + 1) {
                Some(&n) if "()[]\\".contains(n) => {
                    res.push((n.to_string(), 1.0));
                    i += 2;
                }
                _ => i += 1,
            }
            continue;
        }
        if c == '(' {
            round.push(res.len());
            i += 1;
            continue;
        }
        if c == '[' {
            square.push(res.len());
            i += 1;
            continue;
        }
        if c == ':' {
            // `:\s*([+-]?[.\d]+)\s*\)`
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let start = j;
            if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                j += 1;
            }
            let digits_start = j;
            while j < chars.len() && (chars[j] == '.' || chars[j].is_ascii_digit()) {
                j += 1;
            }
            let num: String = chars[start..j].iter().collect();
            let mut k = j;
            while k < chars.len() && chars[k].is_whitespace() {
                k += 1;
            }
            if j > digits_start && k < chars.len() && chars[k] == ')' {
                if let (Ok(w), Some(pos)) = (num.parse::<f64>(), round.last().copied()) {
                    round.pop();
                    multiply(&mut res, pos, w);
                    i = k + 1;
                    continue;
                }
                if round.is_empty() {
                    // No open bracket: the whole match is literal text.
                    res.push((chars[i..=k].iter().collect(), 1.0));
                    i = k + 1;
                    continue;
                }
            }
            res.push((":".into(), 1.0));
            i += 1;
            continue;
        }
        if c == ')' && !round.is_empty() {
            let pos = round.pop().unwrap_or(0);
            multiply(&mut res, pos, ROUND);
            i += 1;
            continue;
        }
        if c == ']' && !square.is_empty() {
            let pos = square.pop().unwrap_or(0);
            multiply(&mut res, pos, SQUARE);
            i += 1;
            continue;
        }
        if c == ')' || c == ']' {
            res.push((c.to_string(), 1.0));
            i += 1;
            continue;
        }
        // A run of plain text, split on BREAK.
        let mut j = i;
        while j < chars.len() && !"\\()[]:".contains(chars[j]) {
            j += 1;
        }
        let run: String = chars[i..j].iter().collect();
        for (n, part) in split_break(&run).into_iter().enumerate() {
            if n > 0 {
                res.push(("BREAK".into(), -1.0));
            }
            res.push((part, 1.0));
        }
        i = j;
    }
    for pos in round.into_iter().rev() {
        multiply(&mut res, pos, ROUND);
    }
    for pos in square.into_iter().rev() {
        multiply(&mut res, pos, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::new();
    for r in res {
        match merged.last_mut() {
            Some(last) if last.1 == r.1 => last.0.push_str(&r.0),
            _ => merged.push(r),
        }
    }
    merged
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let found = rest.match_indices("BREAK").find(|(at, _)| {
            let before = rest[..*at].chars().last();
            let after = rest[at + 5..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        });
        match found {
            Some((at, _)) => {
                parts.push(rest[..at].trim_end().to_string());
                rest = rest[at + 5..].trim_start();
            }
            None => {
                parts.push(rest.to_string());
                return parts;
            }
        }
    }
}

/// One context window: ids with BOS/EOS/padding, and a weight per position.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl PromptChunk {
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A textual-inversion embedding as the chunker sees it: its name's token ids, and the ids its
/// vectors take (`first_id..first_id + vectors`).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingTokens {
    pub name_ids: Vec<u32>,
    pub first_id: u32,
    pub vectors: usize,
}

/// The longest embedding whose name's tokens start at `tokens[at]` (A1111's
/// `find_embedding_at_position`, which tries longer names first).
fn embedding_at(tokens: &[u32], at: usize, embeddings: &[EmbeddingTokens]) -> Option<usize> {
    embeddings
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.name_ids.is_empty() && tokens[at..].starts_with(&e.name_ids))
        .max_by_key(|(i, e)| (e.name_ids.len(), usize::MAX - i))
        .map(|(i, _)| i)
}

/// Tokenizes a prompt into A1111 chunks of `max_length - 2` tokens each.
pub fn chunk_prompt(tok: &ClipTokenizer, prompt: &str) -> Result<Vec<PromptChunk>> {
    Ok(chunk_prompt_with(tok, prompt, &[])?.0)
}

/// [`chunk_prompt`] with textual-inversion embeddings: where a name's tokens appear (inside
/// one emphasis fragment), its vectors' ids take their place, moved whole to the next chunk if
/// they would cross a chunk boundary (A1111's `tokenize_line`). Also returns which embeddings
/// (indices into `embeddings`) the prompt used.
pub fn chunk_prompt_with(tok: &ClipTokenizer, prompt: &str, embeddings: &[EmbeddingTokens]) -> Result<(Vec<PromptChunk>, Vec<usize>)> {
    let window = tok.max_length - 2;
    let mut used: Vec<usize> = Vec::new();
    let mut chunks = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f64>, chunks: &mut Vec<PromptChunk>| {
        let framed = tok.frame(ids);
        let mut w = vec![1.0];
        w.extend(weights.iter().copied());
        w.resize(tok.max_length, 1.0);
        chunks.push(PromptChunk { ids: framed, weights: w });
        ids.clear();
        weights.clear();
    };
    for frag in parse_attention(prompt) {
        let (text, weight) = match frag {
            Fragment::Break => {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
                continue;
            }
            Fragment::Text(t, w) => (t, w),
        };
        let tokens = tok.encode_raw(&text)?;
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == tok.comma {
                last_comma = Some(ids.len());
            } else if ids.len() == window && last_comma.is_some_and(|c| ids.len() - c <= COMMA_BACKTRACK) {
                // Move the words after the last comma into the next chunk.
                let at = last_comma.unwrap_or(0) + 1;
                let moved_ids = ids.split_off(at);
                let moved_w = weights.split_off(at);
                close(&mut ids, &mut weights, &mut chunks);
                ids = moved_ids;
                weights = moved_w;
                last_comma = None;
            }
            if ids.len() == window {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
            }
            match embedding_at(&tokens, position, embeddings) {
                None => {
                    ids.push(token);
                    weights.push(weight);
                    position += 1;
                }
                Some(k) => {
                    let e = &embeddings[k];
                    if e.vectors > window {
                        return Err(crate::error::Error::Argument(format!(
                            "a textual-inversion embedding of {} vectors does not fit a {window}-token chunk",
                            e.vectors
                        )));
                    }
                    if ids.len() + e.vectors > window {
                        close(&mut ids, &mut weights, &mut chunks);
                        last_comma = None;
                    }
                    ids.extend((0..e.vectors as u32).map(|j| e.first_id + j));
                    weights.extend(std::iter::repeat_n(weight, e.vectors));
                    position += e.name_ids.len();
                    if !used.contains(&k) {
                        used.push(k);
                    }
                }
            }
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        close(&mut ids, &mut weights, &mut chunks);
    }
    Ok((chunks, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Fragment {
        Fragment::Text(s.into(), w)
    }

    /// The examples from A1111's `parse_prompt_attention` docstring.
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(parse_attention("normal text"), vec![t("normal text", 1.0)]);
        assert_eq!(parse_attention("an (important) word"), vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]);
        assert_eq!(parse_attention("(unbalanced"), vec![t("unbalanced", 1.1)]);
        assert_eq!(parse_attention("\\(literal\\]"), vec![t("(literal]", 1.0)]);
        assert_eq!(parse_attention("(unnecessary)(parens)"), vec![t("unnecessaryparens", 1.1)]);
        let got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let want = vec![
            t("a ", 1.0),
            t("house", 1.3 * 1.1 * 1.1),
            t(" ", 1.1),
            t("on", 1.0),
            t(" a ", 1.1),
            t("hill", 0.5 * 1.1),
            t(", sun, ", 1.1),
            t("sky", 1.1f64.powi(4)),
            t(".", 1.1),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(&want) {
            match (g, w) {
                (Fragment::Text(a, x), Fragment::Text(b, y)) => assert!(a == b && (x - y).abs() < 1e-9, "{got:?}"),
                _ => panic!("{got:?}"),
            }
        }
        assert_eq!(parse_attention("a BREAK b"), vec![t("a", 1.0), Fragment::Break, t("b", 1.0)]);
        assert_eq!(parse_attention(""), vec![t("", 1.0)]);
    }
}
