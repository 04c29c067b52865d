//! The best set from candidates: which of the offered LoRAs (the library's, or more than the
//! prompt asks for) a prompt calls for.
//!
//! A LoRA is called for by its trigger words, its name or its tags appearing in the prompt, as
//! users write them ("a vlox emblem ..., dotted style"): the text score is the best fraction of a
//! phrase's words found in the prompt, 1 for the whole phrase in order. Where no phrase is found
//! literally, our own text encoder says how close the prompt is to each phrase (cosine of the
//! pooled embeddings of the second encoder), worth at most half a literal match. A phrase that
//! several offered LoRAs answer to (a training tag like "flat style" that every subject of one
//! trainer carries) says little about any of them: its score is divided by how many share it,
//! as in inverse document frequency. Per role the
//! best candidate is picked if it scores at least [`PICK_THRESHOLD`]; LoRAs of other roles are
//! picked by the threshold alone. Every decision is kept with its reason for the trace and the
//! PNG.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::lora::Role;

/// A text score at least this high picks a LoRA (a whole trigger phrase, or most of it).
pub const PICK_THRESHOLD: f64 = 0.75;

/// One LoRA considered, with what decided it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub role: Role,
    pub score: f64,
    /// The phrase that scored (trigger words, name or tag).
    pub matched: Option<String>,
    /// Cosine similarity of prompt and best phrase embeddings, when computed.
    pub similarity: Option<f64>,
    pub picked: bool,
    pub reason: String,
}

/// How close two texts are (cosine of their embeddings): [`text_similarity`].
pub type Similarity<'a> = &'a dyn Fn(&str, &str) -> Result<f64>;

/// What the scorer needs to know of a LoRA.
#[derive(Debug, Clone)]
pub struct Offered {
    pub name: String,
    pub role: Role,
    /// Trigger phrases, the name and tags.
    pub phrases: Vec<String>,
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// 1 when the phrase's words occur in order in the prompt, else the fraction of them present.
pub fn text_score(prompt: &str, phrase: &str) -> f64 {
    let (p, f) = (words(prompt), words(phrase));
    if f.is_empty() {
        return 0.0;
    }
    if p.windows(f.len()).any(|w| w == f.as_slice()) {
        return 1.0;
    }
    f.iter().filter(|w| p.contains(w)).count() as f64 / f.len() as f64 * 0.5
}

/// Scores and picks. `similarity(prompt, phrase)` is called only where no phrase matched
/// literally; pass `None` to use the text alone.
pub fn select(prompt: &str, offered: &[Offered], similarity: Option<Similarity>) -> Result<Vec<Candidate>> {
    let mut out = Vec::with_capacity(offered.len());
    let norm = |p: &str| words(p).join(" ");
    let shared = |p: &str| offered.iter().filter(|o| o.phrases.iter().any(|q| norm(q) == norm(p))).count().max(1) as f64;
    for o in offered {
        let mut best: (f64, Option<String>) = (0.0, None);
        for ph in &o.phrases {
            let s = text_score(prompt, ph) / shared(ph);
            if s > best.0 {
                best = (s, Some(ph.clone()));
            }
        }
        let mut sim = None;
        if best.0 < 1.0 {
            if let Some(f) = similarity {
                for ph in &o.phrases {
                    let c = f(prompt, ph)? / shared(ph);
                    if sim.is_none_or(|s| c > s) {
                        sim = Some(c);
                    }
                    if 0.5 * c > best.0 {
                        best = (0.5 * c, Some(ph.clone()));
                    }
                }
            }
        }
        out.push(Candidate { name: o.name.clone(), role: o.role, score: best.0, matched: best.1, similarity: sim, picked: false, reason: String::new() });
    }
    for role in [Role::Subject, Role::Style, Role::Concept, Role::Unknown] {
        let idx: Vec<usize> = (0..out.len()).filter(|&i| out[i].role == role).collect();
        let top = idx.iter().copied().max_by(|&a, &b| out[a].score.total_cmp(&out[b].score).then(b.cmp(&a)));
        for &i in &idx {
            let c = &mut out[i];
            let above = c.score >= PICK_THRESHOLD;
            c.picked = above && (Some(i) == top || !matches!(role, Role::Subject | Role::Style));
            c.reason = match (&c.matched, c.picked, above) {
                (Some(m), true, _) if c.score >= 1.0 => format!("'{m}' is in the prompt"),
                (Some(m), true, _) => format!("prompt close to '{m}' (score {:.2})", c.score),
                (_, false, true) => format!("another {} scored higher", role.as_str()),
                _ => format!("not called for by the prompt (score {:.2} < {PICK_THRESHOLD})", c.score),
            };
        }
    }
    Ok(out)
}

/// Cosine similarity of the pooled embeddings (second encoder; the first's mean hidden state for
/// models without one) of two texts, with the embeddings cached.
/// A prompt's pooled text embedding (the context's mean where an encoder has no pooled output):
/// what candidate similarity and batch clustering compare.
pub fn pooled_embedding(text: &crate::sdxl::text::TextEncoders, prompt: &str) -> Result<Vec<f32>> {
    let c = text.encode(prompt)?;
    let v = match c.pooled {
        Some(p) => p,
        None => c.context.mean(1)?,
    };
    Ok(v.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

pub fn text_similarity(text: &crate::sdxl::text::TextEncoders) -> impl Fn(&str, &str) -> Result<f64> + '_ {
    let cache = std::cell::RefCell::new(std::collections::HashMap::<String, Vec<f32>>::new());
    move |a: &str, b: &str| {
        let embed = |t: &str| -> Result<Vec<f32>> {
            if let Some(v) = cache.borrow().get(t) {
                return Ok(v.clone());
            }
            let v = pooled_embedding(text, t)?;
            cache.borrow_mut().insert(t.to_string(), v.clone());
            Ok(v)
        };
        let (x, y) = (embed(a)?, embed(b)?);
        let dot: f64 = x.iter().zip(&y).map(|(p, q)| (*p as f64) * (*q as f64)).sum();
        let n = |v: &[f32]| v.iter().map(|p| (*p as f64) * (*p as f64)).sum::<f64>().sqrt();
        Ok(dot / (n(&x) * n(&y)).max(1e-12))
    }
}

/// The phrases a library entry answers to: trigger words, name, title and tags.
pub fn phrases_of(e: &crate::lora::library::LoraEntry) -> Vec<String> {
    let mut v = e.trigger_words.clone();
    v.push(e.display_name.clone());
    v.extend(e.title.iter().cloned());
    v.extend(e.user_tags.iter().cloned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_pair_the_prompt_names() {
        let o = |n: &str, r: Role, t: &str| Offered { name: n.into(), role: r, phrases: vec![t.into(), n.into(), "flat style".into()] };
        let offered = vec![
            o("vlox", Role::Subject, "vlox emblem"),
            o("krin", Role::Subject, "krin emblem"),
            o("dotted", Role::Style, "dotted style"),
            o("striped", Role::Style, "striped style"),
        ];
        let c = select("a krin emblem on a teal background, dotted style", &offered, None).unwrap();
        let picked: Vec<&str> = c.iter().filter(|c| c.picked).map(|c| c.name.as_str()).collect();
        assert_eq!(picked, ["krin", "dotted"]);
        assert!(c[0].reason.contains("not called for"));
        // A phrase every LoRA carries picks none of them.
        let c = select("a red ring, flat style", &offered, None).unwrap();
        assert!(c.iter().all(|c| !c.picked), "{c:?}");
        assert_eq!(text_score("A Vlox-Emblem here", "vlox emblem"), 1.0);
        assert_eq!(text_score("an emblem", "vlox emblem"), 0.25);
    }
}
