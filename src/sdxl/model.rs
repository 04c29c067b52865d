//! Finding and opening a model: a diffusers folder, a single-file SGM checkpoint, or a
//! Hugging Face repo id resolved through the standard HF cache (downloading when online).
//! The cache and the hub client themselves are shared with the LLM ([`crate::hub`]).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::checkpoint;
use crate::hub::HubRepo;
use crate::error::{Error, Result};
use crate::weights::{pickle_refusal, WeightSource};

/// Where a model comes from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Folder(PathBuf),
    SingleFile(PathBuf),
    HubRepo(String),
}

impl ModelSource {
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(p) = crate::hub::shipped(spec) {
            return Self::parse(&p.to_string_lossy());
        }
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(Self::Folder(p.to_path_buf()));
        }
        if p.is_file() {
            return Ok(Self::SingleFile(p.to_path_buf()));
        }
        if crate::hub::is_repo_id(spec) {
            return Ok(Self::HubRepo(spec.to_string()));
        }
        Err(Error::Argument(format!(
            "model {spec:?}: no such file or folder, and not a Hugging Face repo id (owner/name)"
        )))
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

pub fn parse_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_value(read_json(path)?).map_err(|e| Error::model(path, format!("unexpected config: {e}")))
}

/// The safetensors files holding one component's weights.
pub fn component_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let name = |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    // A sharded checkpoint names its shards in an index file.
    for idx in entries.iter().filter(|p| name(p).ends_with(".safetensors.index.json")) {
        let is_variant = name(idx).matches('.').count() > 3;
        if is_variant {
            continue;
        }
        let v = read_json(idx)?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::model(idx, "no weight_map"))?;
        let mut shards: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let mut st: Vec<PathBuf> = entries.iter().filter(|p| name(p).ends_with(".safetensors")).cloned().collect();
    st.sort();
    // Prefer the full-precision file over variants such as `*.fp16.safetensors`.
    let plain: Vec<PathBuf> = st.iter().filter(|p| name(p).matches('.').count() == 1).cloned().collect();
    if !plain.is_empty() {
        return Ok(plain);
    }
    if let Some(v) = st.into_iter().next() {
        return Ok(vec![v]);
    }
    if let Some(pickle) = entries.iter().find(|p| {
        let n = name(p);
        n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt") || n.ends_with(".pth")
    }) {
        return Err(pickle_refusal(pickle));
    }
    Err(Error::model(dir, "no .safetensors weights in this component folder"))
}

/// Opens a diffusers component: its config and its weights.
pub fn open_component(root: &Path, name: &str) -> Result<(PathBuf, WeightSource)> {
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(Error::model(root, format!("component folder '{name}/' is missing (listed in model_index.json or required for SDXL)")));
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::model(&dir, "config.json is missing"));
    }
    let ws = WeightSource::from_files(&component_weights(&dir)?)?;
    Ok((config, ws))
}

/// The repo whose configs and tokenizers describe SDXL base single-file checkpoints (what
/// diffusers' `from_single_file` fetches for them).
pub const SDXL_BASE_REPO: &str = "stabilityai/stable-diffusion-xl-base-1.0";

/// The files of a diffusers SDXL repo we need, given a listing (when online) or the names we
/// look for in the cache (offline).
fn wanted_files(listing: Option<&[String]>, configs_only: bool) -> Vec<String> {
    let mut want = vec!["model_index.json".to_string(), "scheduler/scheduler_config.json".into()];
    for tk in ["tokenizer", "tokenizer_2"] {
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"] {
            want.push(format!("{tk}/{f}"));
        }
    }
    for (comp, stem) in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")] {
        want.push(format!("{comp}/config.json"));
        if configs_only {
            continue;
        }
        match listing {
            Some(files) => {
                let of_comp: Vec<&String> = files.iter().filter(|f| f.starts_with(&format!("{comp}/")) && f.contains(".safetensors")).collect();
                let plain: Vec<&String> = of_comp.iter().copied().filter(|f| !f.contains(".fp16.")).collect();
                let chosen = if plain.is_empty() { of_comp } else { plain };
                want.extend(chosen.into_iter().cloned());
            }
            None => {
                want.push(format!("{comp}/{stem}.safetensors"));
                want.push(format!("{comp}/{stem}.fp16.safetensors"));
            }
        }
    }
    want
}

/// Resolves `repo` to a local snapshot folder through the HF cache, downloading what is
/// missing unless offline (`HF_HUB_OFFLINE=1`). The token comes from `HF_TOKEN` or the HF
/// token file.
pub fn fetch_hub_repo(repo: &str, configs_only: bool) -> Result<PathBuf> {
    let HubRepo { cache, cached: crepo, offline, api, listing } = HubRepo::open(repo);
    let files = wanted_files(listing.as_deref(), configs_only);
    let mut snapshot: Option<PathBuf> = None;
    let mut missing = Vec::new();
    for f in &files {
        let optional = f.starts_with("tokenizer") && !f.ends_with("vocab.json") && !f.ends_with("merges.txt")
            || f.contains(".fp16.");
        let in_listing = listing.as_ref().map(|l| l.contains(f));
        if in_listing == Some(false) {
            continue;
        }
        let path = match crepo.get(f) {
            Some(p) => Some(p),
            None => match (&api, &listing) {
                (Some(a), Some(_)) => Some(a.model(repo.to_string()).get(f).map_err(|e| Error::Hub(format!("{repo}: downloading {f}: {e}")))?),
                _ => None,
            },
        };
        match path {
            Some(p) => {
                if f == "model_index.json" {
                    snapshot = p.parent().map(Path::to_path_buf);
                }
            }
            None if optional => {}
            None => missing.push(f.clone()),
        }
    }
    // tokenizer.json can stand in for vocab/merges.
    missing.retain(|f| {
        let tk = f.split('/').next().unwrap_or("");
        !((f.ends_with("vocab.json") || f.ends_with("merges.txt")) && crepo.get(&format!("{tk}/tokenizer.json")).is_some())
    });
    // Offline the weight file may exist under either name.
    missing.retain(|f| !(f.ends_with("safetensors") && crepo.get(&f.replace(".safetensors", ".fp16.safetensors")).is_some()));
    if !missing.is_empty() || snapshot.is_none() {
        let why = if offline {
            "HF_HUB_OFFLINE is set".to_string()
        } else if listing.is_none() {
            "the hub could not be reached (offline, or the repo is private and no token was found in HF_TOKEN or the HF token file)".to_string()
        } else {
            "some files could not be downloaded".to_string()
        };
        return Err(Error::Hub(format!(
            "model {repo:?} is not fully in the HF cache ({}) and {why}; missing: {}",
            cache.path().display(),
            missing.join(", ")
        )));
    }
    snapshot.ok_or_else(|| Error::Hub(format!("{repo}: no model_index.json")))
}

/// Component weights for a single-file checkpoint, mapped to diffusers names.
pub fn open_single_file(path: &Path, config_root: &Path) -> Result<checkpoint::SgmComponents> {
    let unet = parse_config(&config_root.join("unet/config.json"))?;
    let vae = parse_config(&config_root.join("vae/config.json"))?;
    let te2 = parse_config(&config_root.join("text_encoder_2/config.json"))?;
    checkpoint::open_sgm(path, &unet, &vae, &te2)
}
