//! CLIP tokenizers from a model folder's `tokenizer/` and `tokenizer_2/`.
//!
//! Real SDXL repos ship `vocab.json` + `merges.txt`; newer saves ship only `tokenizer.json`.
//! For the former we assemble the same pipeline transformers' converter builds (NFC, whitespace
//! collapse, lowercase; CLIP's split regex; byte-level BPE with `</w>` word ends), so both
//! layouts tokenize identically.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// Context length including BOS and EOS (77).
    pub max_length: usize,
    /// Id of `,</w>` (A1111 moves text after a nearby comma to the next chunk).
    pub comma: Option<u32>,
    path: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map(Some).map_err(|e| Error::Tokenizer { path: path.into(), message: format!("invalid JSON: {e}") })
}

/// A special token given as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let terr = |message: String| Error::Tokenizer { path: dir.to_path_buf(), message };
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let special_text = |field: &str, default: &str| -> String {
            token_text(config.get(field)).or_else(|| token_text(special_map.get(field))).unwrap_or_else(|| default.into())
        };
        let json_path = dir.join("tokenizer.json");
        let inner = if json_path.exists() {
            Tokenizer::from_file(&json_path).map_err(|e| terr(format!("tokenizer.json: {e}")))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            if !vocab_path.exists() || !merges_path.exists() {
                return Err(terr("expected tokenizer.json, or vocab.json and merges.txt".into()));
            }
            let vocab = read_json(&vocab_path)?.ok_or_else(|| terr("vocab.json missing".into()))?;
            let merges_txt = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
            let merges: Vec<Value> = merges_txt
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    let mut it = l.split(' ');
                    json!([it.next().unwrap_or(""), it.next().unwrap_or("")])
                })
                .collect();
            let special = |t: &str| vocab.get(t).and_then(Value::as_u64);
            // transformers matches every special token (including SDXL tokenizer_2's pad "!")
            // as a whole before BPE, so "!!" becomes two pad ids; do the same.
            let mut specials = vec!["<|startoftext|>".to_string(), "<|endoftext|>".to_string()];
            for f in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                let t = special_text(f, "<|endoftext|>");
                if !specials.contains(&t) {
                    specials.push(t);
                }
            }
            let added: Vec<Value> = specials
                .iter()
                .filter_map(|t| special(t).map(|id| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})))
                .collect();
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                          "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            });
            spec.to_string().parse::<Tokenizer>().map_err(|e| terr(format!("vocab.json/merges.txt: {e}")))?
        };
        let lookup = |field: &str, default: &str| -> Result<u32> {
            let text = special_text(field, default);
            inner.token_to_id(&text).ok_or_else(|| terr(format!("{field} {text:?} is not in the vocabulary")))
        };
        let max_length = config.get("model_max_length").and_then(Value::as_u64).filter(|&m| m <= 1024).unwrap_or(77) as usize;
        Ok(Self {
            bos: lookup("bos_token", "<|startoftext|>")?,
            eos: lookup("eos_token", "<|endoftext|>")?,
            pad: lookup("pad_token", "<|endoftext|>")?,
            comma: inner.token_to_id(",</w>"),
            max_length,
            inner,
            path: dir.to_path_buf(),
        })
    }

    /// Token ids of `text` without BOS/EOS and without truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// What transformers returns for `padding="max_length", truncation=True`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let raw = self.encode_raw(text)?;
        Ok(self.frame(&raw[..raw.len().min(self.max_length - 2)]))
    }

    /// `[BOS] ids [EOS] [PAD]...` to the context length; `ids` must fit.
    pub fn frame(&self, ids: &[u32]) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.max_length);
        v.push(self.bos);
        v.extend_from_slice(ids);
        v.push(self.eos);
        v.resize(self.max_length, self.pad);
        v
    }
}
