//! What a LoRA file is, from its header alone: format, ranks, alphas, base model, trigger words
//! and a role guess. No weight tensor is read (only scalar `alpha` entries, a few bytes each),
//! so a library import of a thousand files is bound by hashing, not parsing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::keys::{parse_key, Component, ModuleName, Param, FLAT_PREFIXES};
use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// The base model family a LoRA was trained for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseModel {
    Sd1,
    Sd2,
    Sdxl,
    SdxlRefiner,
    Sd3,
    Flux,
    /// Named in metadata but not a family we know (e.g. our own miniworld).
    Other(String),
    Unknown,
}

impl BaseModel {
    pub fn label(&self) -> String {
        match self {
            Self::Sd1 => "SD 1.x".into(),
            Self::Sd2 => "SD 2.x".into(),
            Self::Sdxl => "SDXL".into(),
            Self::SdxlRefiner => "SDXL refiner".into(),
            Self::Sd3 => "SD 3".into(),
            Self::Flux => "Flux".into(),
            Self::Other(s) => s.clone(),
            Self::Unknown => "unknown".into(),
        }
    }

    /// Short id used in the library and on the command line (`--base sdxl`).
    pub fn id(&self) -> String {
        match self {
            Self::Sd1 => "sd1".into(),
            Self::Sd2 => "sd2".into(),
            Self::Sdxl => "sdxl".into(),
            Self::SdxlRefiner => "sdxl_refiner".into(),
            Self::Sd3 => "sd3".into(),
            Self::Flux => "flux".into(),
            Self::Other(s) => s.clone(),
            Self::Unknown => "unknown".into(),
        }
    }

    /// Families whose LoRAs can never fit an SDXL-architecture UNet.
    pub fn is_foreign_to_sdxl(&self) -> bool {
        matches!(self, Self::Sd1 | Self::Sd2 | Self::SdxlRefiner | Self::Sd3 | Self::Flux)
    }

    /// From kohya's `ss_base_model_version` or Stability's `modelspec.architecture`.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Option<(Self, String)> {
        if let Some(v) = meta.get("modelspec.architecture") {
            let a = v.to_ascii_lowercase();
            let base = if a.starts_with("stable-diffusion-xl-v1-refiner") {
                Self::SdxlRefiner
            } else if a.starts_with("stable-diffusion-xl") {
                Self::Sdxl
            } else if a.starts_with("stable-diffusion-v1") {
                Self::Sd1
            } else if a.starts_with("stable-diffusion-v2") {
                Self::Sd2
            } else if a.starts_with("stable-diffusion-v3") || a.starts_with("stable-diffusion-3") {
                Self::Sd3
            } else if a.starts_with("flux") {
                Self::Flux
            } else {
                Self::Other(v.split('/').next().unwrap_or(v).to_string())
            };
            return Some((base, format!("modelspec.architecture = \"{v}\"")));
        }
        if let Some(v) = meta.get("ss_base_model_version") {
            let a = v.to_ascii_lowercase();
            let base = if a.starts_with("sdxl_refiner") {
                Self::SdxlRefiner
            } else if a.starts_with("sdxl") {
                Self::Sdxl
            } else if a.starts_with("sd_v1") || a == "sd1" {
                Self::Sd1
            } else if a.starts_with("sd_v2") {
                Self::Sd2
            } else if a.starts_with("sd3") || a.starts_with("sd_3") {
                Self::Sd3
            } else if a.starts_with("flux") {
                Self::Flux
            } else {
                Self::Other(v.clone())
            };
            return Some((base, format!("ss_base_model_version = \"{v}\"")));
        }
        None
    }

    /// From the cross-attention width a UNet cross-attention LoRA reads.
    pub fn from_cross_attention_width(width: usize) -> Option<Self> {
        match width {
            768 => Some(Self::Sd1),
            1024 => Some(Self::Sd2),
            2048 => Some(Self::Sdxl),
            1280 => Some(Self::SdxlRefiner),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Subject,
    Style,
    /// Neither a thing nor a rendering: a pose, a lighting, a detail tweaker. Mixed freely.
    Concept,
    Unknown,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "subject" | "character" | "object" => Some(Self::Subject),
            "style" => Some(Self::Style),
            "concept" => Some(Self::Concept),
            "unknown" | "" => Some(Self::Unknown),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subject => "subject",
            Self::Style => "style",
            Self::Concept => "concept",
            Self::Unknown => "unknown",
        }
    }
}

/// The adapter family of a file (one file may mix LoRA and LyCORIS modules: `mixed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// kohya sd-scripts `lora_down` / `lora_up` (LoRA and LoCon).
    Kohya,
    /// diffusers / PEFT `lora_A` / `lora_B` (and the older `lora.down` spellings).
    Diffusers,
    Loha,
    Lokr,
    /// LyCORIS full-matrix `diff` modules.
    Full,
    Mixed,
}

impl LoraFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kohya => "kohya",
            Self::Diffusers => "diffusers",
            Self::Loha => "loha",
            Self::Lokr => "lokr",
            Self::Full => "full",
            Self::Mixed => "mixed",
        }
    }
}

/// Everything the library records about a LoRA file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraInfo {
    pub format: LoraFormat,
    /// Distinct ranks, ascending.
    pub ranks: Vec<usize>,
    /// Distinct alphas, ascending (empty when the file stores none).
    pub alphas: Vec<f64>,
    pub base_model: BaseModel,
    /// Where `base_model` came from (a metadata key or a tensor shape).
    pub base_evidence: String,
    pub module_count: usize,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    pub trigger_words: Vec<String>,
    pub role: Role,
    pub title: Option<String>,
    /// `modelspec.thumbnail` as stored (a `data:image/...;base64,` URI).
    pub thumbnail: Option<String>,
    pub uses_dora: bool,
    /// The text-embedding width the UNet cross-attention modules read, when present.
    pub cross_attention_width: Option<usize>,
    /// Tensor names that are not part of any adapter module we know.
    pub foreign_keys: Vec<String>,
}

/// A file's modules: module key → (its name, parameter → tensor name).
pub type ModuleMap = BTreeMap<String, (ModuleName, BTreeMap<ParamKey, String>)>;

/// Groups a file's tensor names into modules; returns (modules, unparsed names).
pub fn group_modules(names: &[String]) -> (ModuleMap, Vec<String>) {
    let mut modules: BTreeMap<String, (ModuleName, BTreeMap<ParamKey, String>)> = BTreeMap::new();
    let mut unparsed = Vec::new();
    for n in names {
        match parse_key(n) {
            Some(k) => {
                modules.entry(k.module.clone()).or_insert_with(|| (k.name.clone(), BTreeMap::new())).1.insert(ParamKey(k.param), n.clone());
            }
            None => unparsed.push(n.clone()),
        }
    }
    unparsed.sort();
    (modules, unparsed)
}

/// `Param` with an order, for deterministic maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamKey(pub Param);
impl PartialOrd for ParamKey {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ParamKey {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0 as u8).cmp(&(o.0 as u8))
    }
}

pub fn component_of(name: &ModuleName) -> Component {
    match name {
        ModuleName::Flat(f) => FLAT_PREFIXES.iter().find(|(p, _)| f.starts_with(p)).map(|(_, c)| *c).unwrap_or(Component::Unet),
        ModuleName::Dotted(c, _) => *c,
    }
}

fn not_a_lora(path: &Path, names: &[String]) -> Error {
    let sample: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
    let hint = if names.iter().any(|n| n == "clip_l" || n == "clip_g" || n == "emb_params" || n == "string_to_param.*") {
        " — it looks like a textual-inversion embedding".to_string()
    } else if names.iter().any(|n| n.starts_with("model.diffusion_model.")) {
        " — it looks like a full checkpoint; load it with --model".to_string()
    } else {
        String::new()
    };
    Error::BadFile {
        path: path.to_path_buf(),
        message: format!(
            "not a LoRA: no tensor name is a LoRA/LyCORIS module (expected e.g. 'lora_unet_*.lora_down.weight' or 'unet.*.lora_A.weight'; found {sample:?}){hint}"
        ),
    }
}

/// Reads a LoRA's description from its header (and its scalar alphas).
pub fn inspect(file: &SafetensorsFile) -> Result<LoraInfo> {
    let names = file.names();
    let (modules, unparsed) = group_modules(&names);
    if modules.is_empty() {
        return Err(not_a_lora(file.path(), &names));
    }
    let meta = file.user_metadata();
    let mut formats = BTreeSet::new();
    let mut ranks = BTreeSet::new();
    let mut alphas: Vec<f64> = Vec::new();
    let (mut unet, mut te) = (0, 0);
    let mut uses_dora = false;
    let mut cross_width = None;
    let mut module_count = 0;
    for (module, (name, params)) in &modules {
        let has = |p: Param| params.contains_key(&ParamKey(p));
        let shape = |p: Param| params.get(&ParamKey(p)).and_then(|n| file.shape_of(n));
        let format = if has(Param::Down) || has(Param::Up) {
            Some(if matches!(name, ModuleName::Flat(_)) { LoraFormat::Kohya } else { LoraFormat::Diffusers })
        } else if has(Param::HadaW1A) {
            Some(LoraFormat::Loha)
        } else if has(Param::LokrW1) || has(Param::LokrW1A) || has(Param::LokrW2) || has(Param::LokrW2A) {
            Some(LoraFormat::Lokr)
        } else if has(Param::Diff) {
            Some(LoraFormat::Full)
        } else {
            None
        };
        uses_dora |= has(Param::Magnitude);
        let Some(format) = format else { continue };
        formats.insert(format.as_str());
        module_count += 1;
        match component_of(name) {
            Component::Unet => unet += 1,
            _ => te += 1,
        }
        let rank = match format {
            LoraFormat::Kohya | LoraFormat::Diffusers => shape(Param::Down).and_then(|s| s.first().copied()),
            LoraFormat::Loha => shape(Param::HadaW1B).and_then(|s| s.first().copied()),
            LoraFormat::Lokr => shape(Param::LokrW2B).or_else(|| shape(Param::LokrW1B)).and_then(|s| s.first().copied()),
            _ => None,
        };
        if let Some(r) = rank {
            ranks.insert(r);
        }
        if let Some(alpha_key) = params.get(&ParamKey(Param::Alpha)) {
            if let Some(a) = file.scalar(alpha_key) {
                if !alphas.iter().any(|x| (x - a).abs() < 1e-9) {
                    alphas.push(a);
                }
            }
        }
        let is_cross_kv = module.contains("attn2") && (module.ends_with("to_k") || module.ends_with("to_v"));
        if component_of(name) == Component::Unet && is_cross_kv && matches!(format, LoraFormat::Kohya | LoraFormat::Diffusers) {
            if let Some(s) = shape(Param::Down) {
                cross_width = cross_width.or(s.get(1).copied());
            }
        }
    }
    if module_count == 0 {
        return Err(not_a_lora(file.path(), &names));
    }
    // diffusers/PEFT files keep alphas in their adapter config rather than in tensors.
    if let Some(cfg) = meta.get("lora_adapter_metadata").and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()) {
        if let Some(o) = cfg.as_object() {
            for (k, v) in o {
                let vals: Vec<f64> = if k.ends_with(".lora_alpha") {
                    v.as_f64().into_iter().collect()
                } else if k.ends_with(".alpha_pattern") {
                    v.as_object().map(|m| m.values().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
                } else {
                    Vec::new()
                };
                for a in vals {
                    if !alphas.iter().any(|x| (x - a).abs() < 1e-9) {
                        alphas.push(a);
                    }
                }
            }
        }
    }
    alphas.sort_by(|a, b| a.total_cmp(b));
    let format = if formats.len() == 1 {
        match *formats.iter().next().unwrap_or(&"") {
            "kohya" => LoraFormat::Kohya,
            "diffusers" => LoraFormat::Diffusers,
            "loha" => LoraFormat::Loha,
            "lokr" => LoraFormat::Lokr,
            _ => LoraFormat::Full,
        }
    } else {
        LoraFormat::Mixed
    };

    let (base_model, base_evidence) = match BaseModel::from_metadata(&meta) {
        Some(b) => b,
        None => match cross_width.and_then(BaseModel::from_cross_attention_width) {
            Some(b) => (b, format!("cross-attention LoRAs read {}-wide text embeddings", cross_width.unwrap_or(0))),
            None if names.iter().any(|n| n.starts_with("lora_te2_") || n.starts_with("text_encoder_2.")) => {
                (BaseModel::Sdxl, "it has second-text-encoder (te2) modules".into())
            }
            None if names.iter().any(|n| n.starts_with("lora_te_")) => (BaseModel::Sd1, "it has single-text-encoder (lora_te_) modules".into()),
            None => (BaseModel::Unknown, "no metadata or telling shapes".into()),
        },
    };

    let trigger_words = trigger_words(&meta);
    let title = meta.get("modelspec.title").or_else(|| meta.get("ss_output_name")).cloned();
    let role = guess_role(&meta, &trigger_words, file.path());
    Ok(LoraInfo {
        format,
        ranks: ranks.into_iter().collect(),
        alphas,
        base_model,
        base_evidence,
        module_count,
        unet_modules: unet,
        text_encoder_modules: te,
        trigger_words,
        role,
        title,
        thumbnail: meta.get("modelspec.thumbnail").filter(|t| t.starts_with("data:image/")).cloned(),
        uses_dora,
        cross_attention_width: cross_width,
        foreign_keys: unparsed,
    })
}

/// `modelspec.trigger_phrase` (comma-separated), then the five most frequent training tags.
fn trigger_words(meta: &HashMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        let w = w.trim();
        if !w.is_empty() && !out.iter().any(|x| x == w) {
            out.push(w.to_string());
        }
    };
    if let Some(t) = meta.get("modelspec.trigger_phrase") {
        t.split(',').for_each(&mut push);
    }
    if let Some(freq) = meta.get("ss_tag_frequency").and_then(|s| serde_json::from_str::<HashMap<String, HashMap<String, f64>>>(s).ok()) {
        let mut totals: HashMap<&str, f64> = HashMap::new();
        for tags in freq.values() {
            for (tag, n) in tags {
                *totals.entry(tag.as_str()).or_default() += n;
            }
        }
        let mut v: Vec<(&str, f64)> = totals.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        v.iter().take(5).for_each(|(t, _)| push(t));
    }
    out
}

/// Subject or style, guessed from words in the metadata and file name; the user can correct it.
fn guess_role(meta: &HashMap<String, String>, triggers: &[String], path: &Path) -> Role {
    let mut text = String::new();
    for k in ["modelspec.title", "modelspec.description", "modelspec.tags", "ss_output_name", "ss_training_comment", "ss_dataset_dirs"] {
        if let Some(v) = meta.get(k) {
            text.push_str(v);
            text.push(' ');
        }
    }
    text.push_str(&triggers.join(" "));
    text.push(' ');
    text.push_str(&path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default());
    let text = text.to_ascii_lowercase();
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    const STYLE: &[&str] = &["style", "styles", "styled", "painting", "aesthetic", "artstyle", "texture", "illustration", "watercolor", "lineart", "sketch", "render"];
    const SUBJECT: &[&str] = &["subject", "character", "person", "man", "woman", "girl", "boy", "face", "object", "emblem", "dreambooth", "sks", "ohwx", "dog", "cat", "product", "mascot"];
    let style = words.iter().filter(|w| STYLE.contains(w)).count();
    let subject = words.iter().filter(|w| SUBJECT.contains(w)).count() + usize::from(meta.contains_key("ss_reg_dataset_dirs") && meta["ss_reg_dataset_dirs"] != "{}");
    match style.cmp(&subject) {
        std::cmp::Ordering::Greater => Role::Style,
        std::cmp::Ordering::Less => Role::Subject,
        std::cmp::Ordering::Equal => Role::Unknown,
    }
}
