//! A1111's prompt editing and alternation: `[from:to:when]`, `[to:when]`, `[from::when]` and
//! `[a|b|…]`, turned into the prompt text of each sampling step.
//!
//! Follows `modules/prompt_parser.py::get_learned_conditioning_prompt_schedules` (its lark
//! grammar and the `CollectSteps` / `AtStep` passes): `when` (a signed number, exponent allowed)
//! with a decimal point is a fraction of the steps, without one a step number; both are cut to
//! an integer and capped at the step count (in the hires pass both count on from the first
//! pass, [`WhenOffset`]); a step `s` (1-based) uses `from` while `s ≤ when`; alternation takes part
//! `(s − 1) mod n`. Emphasis, `BREAK` and escapes pass through untouched to the attention
//! parser. A1111 parses with lark's Earley parser and falls back to the literal text when it
//! cannot; this is a small recursive-descent parser that gives the same schedules on A1111's
//! own examples (our tests). Where A1111 silently keeps an unclosed `[` that was evidently
//! meant as an edit (a `:` or `|` follows it), [`prompt_schedule`] reports it instead.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    /// `(…)` or `[…]` emphasis, kept as written around its (possibly scheduled) content.
    Group(char, Vec<Node>, char),
    Scheduled { before: Vec<Node>, after: Vec<Node>, when: String },
    Alternate(Vec<Vec<Node>>),
}

/// Deeper nesting is read as literal brackets: it keeps the recursion bounded on any input.
const MAX_DEPTH: usize = 32;

struct Parser {
    chars: Vec<char>,
    /// `closers_after[i]`: how many `]` and `)` follow position `i` (a bracket with none after
    /// it cannot close, so it is text without a search).
    square_after: Vec<usize>,
    round_after: Vec<usize>,
    depth: usize,
    /// Positions of `[` that never closed although an edit separator followed them.
    unclosed_edits: Vec<usize>,
}

impl Parser {
    fn seq(&mut self, i: &mut usize, stops: &[char]) -> Vec<Node> {
        let mut out: Vec<Node> = Vec::new();
        let push_text = |out: &mut Vec<Node>, s: &str| match out.last_mut() {
            Some(Node::Text(t)) => t.push_str(s),
            _ => out.push(Node::Text(s.to_string())),
        };
        while *i < self.chars.len() {
            let c = self.chars[*i];
            if stops.contains(&c) {
                break;
            }
            match c {
                '\\' => {
                    let end = (*i + 2).min(self.chars.len());
                    let s: String = self.chars[*i..end].iter().collect();
                    push_text(&mut out, &s);
                    *i = end;
                }
                '(' if self.depth >= MAX_DEPTH || self.round_after[*i] == 0 => {
                    push_text(&mut out, "(");
                    *i += 1;
                }
                '[' if self.depth >= MAX_DEPTH || self.square_after[*i] == 0 => {
                    let rest: String = self.chars[*i + 1..].iter().collect();
                    if self.depth < MAX_DEPTH && (rest.contains(':') || rest.contains('|')) {
                        self.unclosed_edits.push(*i);
                    }
                    push_text(&mut out, "[");
                    *i += 1;
                }
                '(' => {
                    let save = *i;
                    *i += 1;
                    self.depth += 1;
                    let inner = self.seq(i, &[')']);
                    self.depth -= 1;
                    if *i < self.chars.len() && self.chars[*i] == ')' {
                        *i += 1;
                        out.push(Node::Group('(', inner, ')'));
                    } else {
                        *i = save + 1;
                        push_text(&mut out, "(");
                    }
                }
                '[' => {
                    let save = *i;
                    match self.square(i) {
                        Some(n) => out.push(n),
                        None => {
                            let rest: String = self.chars[save + 1..].iter().collect();
                            if rest.contains(':') || rest.contains('|') {
                                self.unclosed_edits.push(save);
                            }
                            *i = save + 1;
                            push_text(&mut out, "[");
                        }
                    }
                }
                _ => {
                    // Plain text up to the next special character; stray closers and
                    // separators are text here, as at the top level of A1111's grammar.
                    let start = *i;
                    *i += 1;
                    while *i < self.chars.len() && !matches!(self.chars[*i], '\\' | '(' | '[' | ')' | ']' | ':' | '|') {
                        *i += 1;
                    }
                    let s: String = self.chars[start..*i].iter().collect();
                    push_text(&mut out, &s);
                }
            }
        }
        out
    }

    /// `[` at `*i`: an edit, an alternation or emphasis; `None` if it never closes.
    fn square(&mut self, i: &mut usize) -> Option<Node> {
        *i += 1;
        let mut parts = vec![];
        let mut seps = vec![];
        loop {
            self.depth += 1;
            let part = self.seq(i, &[']', ':', '|']);
            self.depth -= 1;
            parts.push(part);
            let c = *self.chars.get(*i)?;
            *i += 1;
            if c == ']' {
                break;
            }
            seps.push(c);
        }
        // Colon groups, with any `|` inside them kept as text.
        let mut groups: Vec<Vec<Node>> = vec![parts[0].clone()];
        for (sep, part) in seps.iter().zip(&parts[1..]) {
            if *sep == ':' {
                groups.push(part.clone());
            } else {
                let g = groups.last_mut().expect("one group");
                g.push(Node::Text("|".into()));
                g.extend(part.iter().cloned());
            }
        }
        if groups.len() == 2 || groups.len() == 3 {
            if let Some(when) = number(groups.last().expect("groups")) {
                let (before, after) = if groups.len() == 3 { (groups[0].clone(), groups[1].clone()) } else { (vec![], groups[0].clone()) };
                return Some(Node::Scheduled { before, after, when });
            }
        }
        if !seps.is_empty() && seps.iter().all(|&s| s == '|') {
            return Some(Node::Alternate(parts));
        }
        // Emphasis (or a bracket the grammar cannot schedule): as written.
        let mut inner = parts[0].clone();
        for (sep, part) in seps.iter().zip(&parts[1..]) {
            inner.push(Node::Text(sep.to_string()));
            inner.extend(part.iter().cloned());
        }
        Some(Node::Group('[', inner, ']'))
    }
}

/// lark's SIGNED_NUMBER (A1111's grammar imports it as NUMBER): an optional sign, then an
/// integer, a decimal (`5.`, `.5`, `2.5`) or either with an exponent (`1e-1`), surrounded by
/// optional whitespace.
fn number(nodes: &[Node]) -> Option<String> {
    let text = match nodes {
        [Node::Text(t)] => t.trim(),
        _ => return None,
    };
    let b = text.as_bytes();
    let digits_from = |mut i: usize| {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, i > start)
    };
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let (after_int, has_int) = digits_from(i);
    i = after_int;
    if b.get(i) == Some(&b'.') {
        let (after_frac, has_frac) = digits_from(i + 1);
        if !has_int && !has_frac {
            return None;
        }
        i = after_frac;
    } else if !has_int {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let j = i + 1 + usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        let (after_exp, has_exp) = digits_from(j);
        if !has_exp {
            return None;
        }
        i = after_exp;
    }
    (i == b.len()).then(|| text.to_string())
}

/// Where `when` counts from. A1111's first pass counts this pass's steps; its hires pass
/// (`get_learned_conditioning_prompt_schedules` with `hires_steps`) counts on from the first
/// pass: a step number has the first pass's steps taken off, a decimal has 1.0 taken off
/// before it is a fraction of the hires steps. So after a 10-step first pass `[a:b:10]` is `b`
/// for the whole hires pass and `[a:b:1.5]` switches halfway through it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WhenOffset {
    steps: usize,
    fraction: f64,
}

impl WhenOffset {
    /// The hires pass after a first pass of `first_pass_steps` schedule entries.
    pub fn hires(first_pass_steps: usize) -> Self {
        Self { steps: first_pass_steps, fraction: 1.0 }
    }
}

/// The step a `when` ends at: `min(steps, int(v))`, which may be 0 or negative (then `to` holds
/// from the start).
fn when_step(when: &str, steps: usize, offset: WhenOffset) -> i64 {
    let v: f64 = when.parse().unwrap_or(0.0);
    let v = if when.contains('.') { (v - offset.fraction) * steps as f64 } else { v - offset.steps as f64 };
    (v.trunc() as i64).min(steps as i64)
}

fn collect(nodes: &[Node], steps: usize, offset: WhenOffset, out: &mut Vec<usize>) {
    for n in nodes {
        match n {
            Node::Text(_) => {}
            Node::Group(_, inner, _) => collect(inner, steps, offset, out),
            Node::Scheduled { before, after, when } => {
                let w = when_step(when, steps, offset);
                if w >= 1 {
                    out.push(w as usize);
                }
                collect(before, steps, offset, out);
                collect(after, steps, offset, out);
            }
            Node::Alternate(parts) => {
                out.extend(1..=steps);
                for p in parts {
                    collect(p, steps, offset, out);
                }
            }
        }
    }
}

fn render(nodes: &[Node], step: usize, steps: usize, offset: WhenOffset, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Group(open, inner, close) => {
                out.push(*open);
                render(inner, step, steps, offset, out);
                out.push(*close);
            }
            Node::Scheduled { before, after, when } => {
                render(if step as i64 <= when_step(when, steps, offset) { before } else { after }, step, steps, offset, out)
            }
            Node::Alternate(parts) => render(&parts[(step - 1) % parts.len()], step, steps, offset, out),
        }
    }
}

fn parse(prompt: &str) -> (Vec<Node>, Vec<usize>) {
    let chars: Vec<char> = prompt.chars().collect();
    let count_after = |close: char| {
        let mut v = vec![0usize; chars.len() + 1];
        for k in (0..chars.len()).rev() {
            v[k] = v[k + 1] + (chars[k] == close) as usize;
        }
        v
    };
    let (square_after, round_after) = (count_after(']'), count_after(')'));
    let mut p = Parser { chars, square_after, round_after, depth: 0, unclosed_edits: vec![] };
    let mut i = 0;
    let nodes = p.seq(&mut i, &[]);
    (nodes, p.unclosed_edits)
}

/// A1111's schedule for one prompt: `(end_step, text)` pairs, ascending, the last ending at
/// `steps`. Step `s` (1-based) uses the first pair with `s ≤ end_step`. Never fails: what does
/// not parse stays literal, as in A1111.
pub fn a1111_schedule(prompt: &str, steps: usize) -> Vec<(usize, String)> {
    a1111_schedule_from(prompt, steps, WhenOffset::default())
}

fn a1111_schedule_from(prompt: &str, steps: usize, offset: WhenOffset) -> Vec<(usize, String)> {
    let steps = steps.max(1);
    let (nodes, _) = parse(prompt);
    let mut ends = vec![steps];
    collect(&nodes, steps, offset, &mut ends);
    ends.sort_unstable();
    ends.dedup();
    ends.into_iter()
        .map(|t| {
            let mut s = String::new();
            render(&nodes, t, steps, offset, &mut s);
            (t, s)
        })
        .collect()
}

/// [`a1111_schedule`] for a job: an unclosed `[` followed by `:` or `|` (a prompt edit or an
/// alternation that was never finished) is an error naming its position.
pub fn prompt_schedule(prompt: &str, steps: usize) -> Result<Vec<(usize, String)>> {
    prompt_schedule_from(prompt, steps, WhenOffset::default())
}

/// [`prompt_schedule`] counting `when` from `offset` (A1111's hires pass).
pub fn prompt_schedule_from(prompt: &str, steps: usize, offset: WhenOffset) -> Result<Vec<(usize, String)>> {
    let (_, unclosed) = parse(prompt);
    if let Some(&pos) = unclosed.first() {
        return Err(Error::Argument(format!(
            "prompt: the '[' at character {} is never closed (prompt editing is [from:to:when], alternation [a|b]; write \\[ for a literal bracket)",
            pos + 1
        )));
    }
    Ok(a1111_schedule_from(prompt, steps, offset))
}

/// The schedule entry A1111's sampler uses at 0-based sampling step `step`
/// (`reconstruct_cond_batch`: the first entry with `step ≤ end_step`; so an edit at step k
/// takes effect from the (k + 2)-th step, A1111's known off-by-one, kept for equal images).
pub fn entry_at(schedule: &[(usize, String)], step: usize) -> usize {
    schedule.iter().position(|(end, _)| step <= *end).unwrap_or(schedule.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Vec<(usize, String)> {
        a1111_schedule(p, 10)
    }
    fn v(items: &[(usize, &str)]) -> Vec<(usize, String)> {
        items.iter().map(|(a, b)| (*a, b.to_string())).collect()
    }

    /// The doctests of A1111's `get_learned_conditioning_prompt_schedules`.
    #[test]
    fn a1111_examples() {
        assert_eq!(g("test"), v(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [[[b]]:2]"), v(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), v(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(g("a [b : c : 1] d"), v(&[(1, "a b  d"), (10, "a  c  d")]));
        assert_eq!(g("a[b:[c:d:2]:1]e"), v(&[(1, "abe"), (2, "ace"), (10, "ade")]));
        assert_eq!(g("a [unbalanced"), v(&[(10, "a [unbalanced")]));
        assert_eq!(g("a [b:.5] c"), v(&[(5, "a  c"), (10, "a b c")]));
        assert_eq!(g("a [{b|d{:.5] c"), v(&[(5, "a  c"), (10, "a {b|d{ c")]));
        assert_eq!(g("((a][:b:c [d:3]"), v(&[(3, "((a][:b:c "), (10, "((a][:b:c d")]));
        let alt: Vec<(usize, String)> = (1..=10).map(|i| (i, if i % 2 == 1 { "a".to_string() } else { "(b:1.1)".to_string() })).collect();
        assert_eq!(g("[a|(b:1.1)]"), alt);
        let fem: Vec<(usize, String)> = (1..=10).map(|i| (i, if i % 2 == 1 { "female".to_string() } else { "male".to_string() })).collect();
        assert_eq!(g("[fe|]male"), fem);
        let fem4: Vec<(usize, String)> = (1..=10).map(|i| (i, if i % 4 == 1 { "female".to_string() } else { "male".to_string() })).collect();
        assert_eq!(g("[fe|||]male"), fem4);
    }

    #[test]
    fn from_empty_to_and_emphasis_inside() {
        assert_eq!(g("a [cat::4] b"), v(&[(4, "a cat b"), (10, "a  b")]));
        assert_eq!(g("[(red:1.3) BREAK:blue:0.3]"), v(&[(3, "(red:1.3) BREAK"), (10, "blue")]));
        assert_eq!(g("\\[x:3\\]"), v(&[(10, "\\[x:3\\]")]));
        // A when past the end is capped; 0 switches before the first step.
        assert_eq!(g("[a:b:25]"), v(&[(10, "a")]));
        assert_eq!(g("[a:b:0]"), v(&[(10, "b")]));
        assert_eq!(g("[a:b]"), v(&[(10, "[a:b]")]));
    }

    /// `when` is lark's SIGNED_NUMBER: signs and exponents; only a `.` makes it a fraction.
    #[test]
    fn signed_and_exponent_numbers() {
        assert_eq!(g("[red:blue:-1]"), v(&[(10, "blue")]));
        assert_eq!(g("[red:blue:+3]"), v(&[(3, "red"), (10, "blue")]));
        assert_eq!(g("[red:blue:1e-1]"), v(&[(10, "blue")]));
        assert_eq!(g("[red:blue:2.5e-1]"), v(&[(2, "red"), (10, "blue")]));
        assert_eq!(g("[red:blue:5.]"), v(&[(10, "red")]));
        assert_eq!(g("[red:blue:1e]"), v(&[(10, "[red:blue:1e]")]));
        assert_eq!(g("[red:blue:-]"), v(&[(10, "[red:blue:-]")]));
    }

    /// A1111's hires pass (`hires_steps` given, new scheduling): a step number counts on from
    /// the first pass, a decimal has 1.0 taken off before it is a fraction of the hires steps.
    #[test]
    fn hires_pass_counts_on_from_the_first() {
        let h = |p: &str| a1111_schedule_from(p, 10, WhenOffset::hires(20));
        assert_eq!(h("a [red:blue:20] c"), v(&[(10, "a blue c")]));
        assert_eq!(h("[a:b:25]"), v(&[(5, "a"), (10, "b")]));
        assert_eq!(h("[a:b:1.5]"), v(&[(5, "a"), (10, "b")]));
        assert_eq!(h("[a:b:0.5]"), v(&[(10, "b")]));
        assert_eq!(h("[a:b:40]"), v(&[(10, "a")]));
        let alt: Vec<(usize, String)> = (1..=10).map(|i| (i, if i % 2 == 1 { "x".to_string() } else { "y".to_string() })).collect();
        assert_eq!(h("[x|y]"), alt);
    }

    #[test]
    fn hostile_nesting_stays_bounded() {
        let deep = "[".repeat(20000) + "a:b:3" + &"]".repeat(20000);
        let s = a1111_schedule(&deep, 10);
        assert!(!s.is_empty());
        let open = "[(".repeat(5000) + "x|y:";
        assert!(prompt_schedule(&open, 10).is_err());
    }

    #[test]
    fn unclosed_edits_are_errors_and_steps_pick_entries() {
        let e = prompt_schedule("a [b:c:0.5 d", 10).unwrap_err().to_string();
        assert!(e.contains("character 3") && e.contains("never closed"), "{e}");
        assert!(prompt_schedule("a (b [c", 10).is_ok());
        let s = prompt_schedule("a [b:3]", 10).unwrap();
        assert_eq!((0..10).map(|i| entry_at(&s, i)).collect::<Vec<_>>(), vec![0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
    }
}
