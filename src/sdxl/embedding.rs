//! Textual-inversion embeddings for SDXL: new "words" made of vectors for both text encoders,
//! used by name in the prompt and the negative prompt.
//!
//! Two layouts are read. A1111 / Civitai SDXL files hold `clip_l` (`[n, 768]`, the first
//! encoder) and `clip_g` (`[n, 1280]`, the second); their name is the file stem, as in A1111.
//! diffusers' SDXL training script writes a pair `learned_embeds.safetensors` and
//! `learned_embeds_2.safetensors`, each `{placeholder_token: [n, dim]}`; a folder holding them
//! is one embedding named by its token. SD 1.x files (`emb_params`, `string_to_param`, or one
//! 768-wide tensor) have no vectors for the second encoder and are refused by name.
//!
//! How a prompt uses them (see `text.rs`): A1111 finds the name's token ids in the tokenized
//! prompt (`EmbeddingDatabase.find_embedding_at_position`), and the vectors take those
//! positions. The vectors get ids past the encoder's vocabulary, in the order the embeddings
//! are given, exactly as diffusers' `load_textual_inversion` adds tokens; so the pooled output
//! (taken where the largest id is, by transformers' rule for SDXL's legacy `eos_token_id: 2`
//! configs) is the one diffusers computes. A1111 pools at the end-of-text token instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use crate::weights::file_sha256;

use crate::error::{Error, Result};
use crate::weights::{pickle_refusal, SafetensorsFile, PICKLE_EXTENSIONS};

/// One embedding: the same number of vectors for each encoder.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The word that calls it in a prompt.
    pub name: String,
    /// `[n, width]` per encoder: CLIP-L (`clip_l`), then OpenCLIP-G (`clip_g`).
    pub vectors: [Tensor; 2],
    /// sha256 of the file (of `learned_embeds.safetensors` for a diffusers folder); A1111's
    /// `TI hashes` write its first 12 characters.
    pub sha256: String,
    pub path: PathBuf,
}

/// What a file or folder holds, without its tensors: for the library and listings.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingInfo {
    /// `a1111` (`clip_l` + `clip_g`) or `diffusers` (a `learned_embeds` pair).
    pub format: &'static str,
    pub vectors: usize,
    /// Widths for the first and the second encoder.
    pub widths: [usize; 2],
    /// The name a diffusers file gives (its placeholder token); A1111 files go by their stem.
    pub token: Option<String>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile { path: path.to_path_buf(), message: message.into() }
}

/// Why a single-encoder file cannot be used on SDXL, naming what it holds.
fn sd1_refusal(path: &Path, what: &str) -> Error {
    bad(
        path,
        format!(
            "an SD 1.x textual-inversion embedding ({what}): it has vectors for one 768-wide text encoder only, and SDXL \
             needs `clip_l` (first encoder) and `clip_g` (second encoder) vectors; use the SDXL version of this embedding"
        ),
    )
}

/// The shape `[n, width]` of an embedding tensor (a 1-D vector counts as one row).
fn rows(file: &SafetensorsFile, key: &str) -> Result<(usize, usize)> {
    let shape = file.shape_of(key).unwrap_or_default();
    match shape.as_slice() {
        [w] => Ok((1, *w)),
        [n, w] if *n > 0 => Ok((*n, *w)),
        _ => Err(Error::Tensor {
            file: file.path().display().to_string(),
            tensor: key.to_string(),
            message: format!("shape {shape:?}: expected [vectors, width]"),
        }),
    }
}

/// The one token key of a diffusers `learned_embeds*.safetensors`.
fn single_key(file: &SafetensorsFile) -> Result<String> {
    let names = file.names();
    match names.as_slice() {
        [k] => Ok(k.clone()),
        _ => Err(bad(file.path(), format!("expected one placeholder-token tensor (diffusers' learned_embeds layout), found {} tensors", names.len()))),
    }
}

fn is_pickle(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    PICKLE_EXTENSIONS.contains(&ext.as_str())
}

/// The diffusers pair inside `dir`, if it is one.
fn diffusers_pair(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (a, b) = (dir.join("learned_embeds.safetensors"), dir.join("learned_embeds_2.safetensors"));
    (a.is_file() && b.is_file()).then_some((a, b))
}

/// Whether `dir` is a diffusers SDXL embedding (the `learned_embeds` pair).
pub fn is_diffusers_embedding(dir: &Path) -> bool {
    diffusers_pair(dir).is_some()
}

impl EmbeddingInfo {
    /// `None` when `path` is not meant as an embedding (so it is read as something else, e.g. a
    /// LoRA); otherwise what it holds, or why it cannot be used on SDXL.
    pub fn recognise(path: &Path) -> Option<Result<Self>> {
        if path.is_dir() {
            return diffusers_pair(path).is_some().then(|| Self::inspect(path));
        }
        let file = SafetensorsFile::open(path).ok()?;
        let names = file.names();
        let embedding_keys = names.iter().any(|n| n == "clip_l" || n == "clip_g" || n == "emb_params" || n.starts_with("string_to_param"));
        // diffusers' learned_embeds: one 1-D or 2-D tensor named by its token (LoRAs hold many
        // tensors; model weights have dotted names).
        let single = names.len() == 1 && !names[0].contains('.') && file.shape_of(&names[0]).is_some_and(|s| (1..=2).contains(&s.len()));
        (embedding_keys || single).then(|| Self::inspect(path))
    }

    /// Reads what `path` (a file, or a diffusers folder) holds from its headers.
    pub fn inspect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let (a, b) = diffusers_pair(path).ok_or_else(|| {
                bad(path, "a folder embedding must hold diffusers' learned_embeds.safetensors and learned_embeds_2.safetensors")
            })?;
            let (fa, fb) = (SafetensorsFile::open(&a)?, SafetensorsFile::open(&b)?);
            let (ka, kb) = (single_key(&fa)?, single_key(&fb)?);
            let ((na, wa), (nb, wb)) = (rows(&fa, &ka)?, rows(&fb, &kb)?);
            if na != nb {
                return Err(bad(path, format!("learned_embeds has {na} vectors and learned_embeds_2 {nb}; both encoders need the same number")));
            }
            return Ok(Self { format: "diffusers", vectors: na, widths: [wa, wb], token: Some(ka) });
        }
        if is_pickle(path) {
            return Err(pickle_refusal(path));
        }
        let file = SafetensorsFile::open(path)?;
        let names = file.names();
        let has = |k: &str| names.iter().any(|n| n == k);
        if has("clip_l") && has("clip_g") {
            let ((nl, wl), (ng, wg)) = (rows(&file, "clip_l")?, rows(&file, "clip_g")?);
            if nl != ng {
                return Err(bad(path, format!("clip_l has {nl} vectors and clip_g {ng}; both encoders need the same number")));
            }
            return Ok(Self { format: "a1111", vectors: nl, widths: [wl, wg], token: None });
        }
        if has("clip_l") || has("clip_g") {
            let missing = if has("clip_l") { "clip_g" } else { "clip_l" };
            return Err(bad(path, format!("SDXL embedding without `{missing}`: both `clip_l` and `clip_g` are needed")));
        }
        if has("emb_params") {
            return Err(sd1_refusal(path, "tensor `emb_params`"));
        }
        if let Some(k) = names.iter().find(|n| n.starts_with("string_to_param")) {
            return Err(sd1_refusal(path, &format!("tensor `{k}`")));
        }
        if let [k] = names.as_slice() {
            let (_, w) = rows(&file, k)?;
            let sibling = path.with_file_name(format!(
                "{}_2.safetensors",
                path.file_stem().and_then(|s| s.to_str()).unwrap_or_default()
            ));
            return Err(if sibling.is_file() {
                bad(path, format!("one half of a diffusers SDXL embedding (token {k:?}); import the folder holding it and {}", sibling.display()))
            } else if w == 768 {
                sd1_refusal(path, &format!("one tensor `{k}` of width {w}"))
            } else {
                bad(path, format!("not a LoRA nor a textual-inversion embedding: one tensor `{k}` of width {w} (an embedding's vectors are 768 wide for SD 1.x, or `clip_l` 768 and `clip_g` 1280 wide for SDXL)"))
            });
        }
        Err(bad(path, format!("not a textual-inversion embedding: expected tensors `clip_l` and `clip_g` (found {})", names.join(", "))))
    }
}

fn as_rows(t: Tensor) -> Result<Tensor> {
    let t = if t.rank() == 1 { t.unsqueeze(0)? } else { t };
    Ok(t.to_dtype(DType::F32)?)
}

impl TextualInversion {
    /// Loads `path` (a `.safetensors` file or a diffusers folder). `name` overrides the name
    /// (a library entry's display name); by default an A1111 file is called by its stem and a
    /// diffusers folder by its token.
    pub fn load(path: &Path, name: Option<&str>) -> Result<Self> {
        let info = EmbeddingInfo::inspect(path)?;
        let (vectors, hashed) = if path.is_dir() {
            let (a, b) = diffusers_pair(path).ok_or_else(|| bad(path, "learned_embeds pair missing"))?;
            let (fa, fb) = (SafetensorsFile::open(&a)?, SafetensorsFile::open(&b)?);
            ([as_rows(fa.load(&single_key(&fa)?)?)?, as_rows(fb.load(&single_key(&fb)?)?)?], a)
        } else {
            let f = SafetensorsFile::open(path)?;
            ([as_rows(f.load("clip_l")?)?, as_rows(f.load("clip_g")?)?], path.to_path_buf())
        };
        let default_name = match &info.token {
            Some(t) => t.clone(),
            None => path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        };
        let name = name.map(str::to_string).unwrap_or(default_name);
        if name.trim().is_empty() {
            return Err(bad(path, "the embedding has no name to call it by"));
        }
        Ok(Self { name, vectors, sha256: file_sha256(&hashed)?, path: path.to_path_buf() })
    }

    pub fn vector_count(&self) -> usize {
        self.vectors[0].dim(0).unwrap_or(0)
    }

    /// A1111's `shorthash`: the first 12 characters of the file's sha256.
    pub fn shorthash(&self) -> &str {
        &self.sha256[..12.min(self.sha256.len())]
    }
}

/// The embeddings a job may use, in order (the order gives the ids their vectors take).
#[derive(Debug, Clone, Default)]
pub struct Embeddings {
    items: Vec<Arc<TextualInversion>>,
}

impl Embeddings {
    pub fn new(items: Vec<Arc<TextualInversion>>) -> Self {
        // A later embedding of the same name replaces an earlier one (A1111 keeps one per name).
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out: Vec<Arc<TextualInversion>> = Vec::new();
        for it in items {
            match seen.get(&it.name) {
                Some(&i) => out[i] = it,
                None => {
                    seen.insert(it.name.clone(), out.len());
                    out.push(it);
                }
            }
        }
        Self { items: out }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[Arc<TextualInversion>] {
        &self.items
    }

    /// Identifies the set for caches of encoded prompts.
    pub fn fingerprint(&self) -> String {
        self.items.iter().map(|e| format!("{}={}", e.name, e.sha256)).collect::<Vec<_>>().join(",")
    }

    /// Loads every embedding under `dir` (files and diffusers folders, not recursing into
    /// those), sorted by path; files that are not SDXL embeddings are reported in `skipped`.
    pub fn scan_dir(dir: &Path, skipped: &mut Vec<String>) -> Result<Vec<Arc<TextualInversion>>> {
        let mut out = Vec::new();
        if !dir.is_dir() {
            return Ok(out);
        }
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let candidate = if p.is_dir() { diffusers_pair(&p).is_some() } else { p.extension().is_some_and(|e| e == "safetensors") };
            if !candidate {
                continue;
            }
            match TextualInversion::load(&p, None) {
                Ok(e) => out.push(Arc::new(e)),
                Err(e) => skipped.push(e.to_string()),
            }
        }
        Ok(out)
    }
}
