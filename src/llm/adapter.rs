//! PEFT LoRA and activated-LoRA adapters for the LLM: `adapter_config.json` +
//! `adapter_model.safetensors`, attached as branches on the model's linears.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use loramix_models::llm::{LlmModel, LoraBranch};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// How an adapter decides where it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterKind {
    /// A standard LoRA: every position.
    Lora,
    /// An activated LoRA: from the last occurrence of its invocation sequence on.
    Activated { invocation: Vec<u32> },
}

/// An adapter loaded into a model.
#[derive(Debug, Clone)]
pub struct LlmAdapter {
    /// The folder's name unless given otherwise; what `--invoke` refers to.
    pub name: String,
    pub path: PathBuf,
    pub kind: AdapterKind,
    /// The invocation string from the config (`invocation_string`), when there is one.
    pub invocation_string: Option<String>,
    pub rank: usize,
    pub alpha: f64,
    /// Module paths that carry a branch of this adapter.
    pub modules: Vec<String>,
}

impl LlmAdapter {
    pub fn invocation(&self) -> Option<&[u32]> {
        match &self.kind {
            AdapterKind::Activated { invocation } => Some(invocation),
            AdapterKind::Lora => None,
        }
    }
}

/// PEFT's aLoRA offset: the start of the LAST full occurrence of `invocation` in `ids`, counted
/// from the end (so ≥ `invocation.len()`); `None` when it does not occur (the adapter is off).
pub fn alora_offset(ids: &[u32], invocation: &[u32]) -> Option<usize> {
    if invocation.is_empty() || invocation.len() > ids.len() {
        return None;
    }
    (0..=ids.len() - invocation.len()).rev().find(|&s| ids[s..s + invocation.len()] == *invocation).map(|s| ids.len() - s)
}

/// The fields of a PEFT `LoraConfig` that change inference.
struct PeftConfig {
    r: usize,
    lora_alpha: f64,
    use_rslora: bool,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
    invocation_tokens: Option<Vec<u32>>,
    invocation_string: Option<String>,
}

fn config_error(path: &Path, field: &str, expected: &str) -> Error {
    Error::model(path, format!("field '{field}': expected {expected}"))
}

fn parse_config(path: &Path) -> Result<PeftConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::model(path, format!("peft_type {peft_type:?} is not supported (expected LORA)")));
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(Error::model(path, "DoRA adapters (use_dora: true) are not supported; PEFT's aLoRA excludes DoRA too"));
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(Error::model(path, "fan_in_fan_out adapters (GPT-2 Conv1D layers) do not apply to Llama-family models"));
    }
    if v.get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err(Error::model(path, "adapters with lora_bias are not supported"));
    }
    if let Some(m) = v.get("modules_to_save").filter(|m| !m.is_null()) {
        if m.as_array().map(|a| !a.is_empty()).unwrap_or(true) {
            return Err(Error::model(path, format!("modules_to_save ({m}) replaces whole modules; only LoRA branches are supported")));
        }
    }
    let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| config_error(path, "r", "a positive integer"))? as usize;
    let lora_alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(x) => x.as_f64().ok_or_else(|| config_error(path, "lora_alpha", "a number"))?,
    };
    let pattern = |field: &str| -> Result<Vec<(String, f64)>> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)).ok_or_else(|| config_error(path, &format!("{field}.{k}"), "a number")))
                .collect(),
            Some(_) => Err(config_error(path, field, "an object of pattern -> number")),
        }
    };
    let invocation_tokens = match v.get("alora_invocation_tokens") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|i| i as u32))
                .collect::<Option<Vec<u32>>>()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| config_error(path, "alora_invocation_tokens", "a non-empty list of token ids"))?,
        ),
        Some(_) => return Err(config_error(path, "alora_invocation_tokens", "a list of token ids")),
    };
    Ok(PeftConfig {
        r,
        lora_alpha,
        use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        rank_pattern: pattern("rank_pattern")?.into_iter().map(|(k, f)| (k, f as usize)).collect(),
        alpha_pattern: pattern("alpha_pattern")?,
        invocation_tokens,
        invocation_string: v.get("invocation_string").and_then(Value::as_str).map(str::to_string),
    })
}

/// PEFT's `get_pattern_key`: the first pattern `p` with `(.*\.)?(p)$` matching the module name.
fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Result<Option<T>> {
    for (p, val) in patterns {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).map_err(|e| Error::Argument(format!("pattern {p:?}: {e}")))?;
        if re.is_match(module) {
            return Ok(Some(*val));
        }
    }
    Ok(None)
}

/// Loads the adapter in `dir` into `model` as adapter number `index`. `tokenize` turns a legacy
/// `invocation_string` into ids when `alora_invocation_tokens` is absent.
pub fn load_adapter(
    model: &mut LlmModel,
    dir: &Path,
    name: &str,
    index: usize,
    vocab_size: usize,
    tokenize: &dyn Fn(&str) -> Result<Vec<u32>>,
) -> Result<LlmAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.exists() {
        return Err(Error::model(dir, "not a PEFT adapter folder: adapter_config.json is missing"));
    }
    let cfg = parse_config(&cfg_path)?;
    // Checked before any layer is touched: a token the model cannot embed would fail only when invoked.
    if let Some(t) = cfg.invocation_tokens.iter().flatten().find(|&&t| t as usize >= vocab_size) {
        return Err(config_error(&cfg_path, "alora_invocation_tokens", &format!("token ids below the model's vocabulary size {vocab_size} (found {t})")));
    }
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(crate::weights::pickle_refusal(&dir.join("adapter_model.bin")));
        }
        return Err(Error::model(dir, "adapter_model.safetensors is missing"));
    }
    let file = SafetensorsFile::open(&weights_path)?;
    file.check_finite()?;
    let mut pairs: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    for key in file.names() {
        let module_key = key.strip_prefix("base_model.model.").unwrap_or(&key);
        let (module, which) = if let Some(m) = module_key.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = module_key.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(Error::Tensor {
                file: weights_path.display().to_string(),
                tensor: key.clone(),
                message: "not a LoRA factor (expected '<module>.lora_A.weight' or '<module>.lora_B.weight'; embeddings, \
                          biases and modules_to_save are not supported)"
                    .into(),
            });
        };
        let e = pairs.entry(module.to_string()).or_default();
        if which == 0 {
            e.0 = Some(key.clone());
        } else {
            e.1 = Some(key.clone());
        }
    }
    if pairs.is_empty() {
        return Err(Error::model(&weights_path, "holds no LoRA tensors"));
    }
    let mut linears: HashMap<String, &mut loramix_models::llm::AdaptedLinear> = model.linears_mut().into_iter().collect();
    let mut modules: Vec<String> = pairs.keys().cloned().collect();
    modules.sort();
    for module in &modules {
        let (a_key, b_key) = match &pairs[module] {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => return Err(Error::model(&weights_path, format!("module '{module}' lacks its lora_A or lora_B factor"))),
        };
        let linear = linears.get_mut(module).ok_or_else(|| {
            Error::model(&weights_path, format!("targets '{module}', which is not a linear layer of this model"))
        })?;
        let a = file.load(&a_key)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let b = file.load(&b_key)?.to_dtype(DType::F32)?;
        let r = pattern_value(&cfg.rank_pattern, module)?.unwrap_or(cfg.r);
        let alpha = pattern_value(&cfg.alpha_pattern, module)?.unwrap_or(cfg.lora_alpha);
        if a.dim(0)? != r {
            return Err(Error::Tensor {
                file: weights_path.display().to_string(),
                tensor: a_key,
                message: format!("rank {} but the config says r = {r}", a.dim(0)?),
            });
        }
        let scale = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        linear
            .attach(LoraBranch { adapter: index, a, b, scale })
            .map_err(|e| Error::model(&weights_path, format!("module '{module}': {e}")))?;
    }
    let kind = match (&cfg.invocation_tokens, &cfg.invocation_string) {
        (Some(t), _) => AdapterKind::Activated { invocation: t.clone() },
        (None, Some(s)) => {
            let t = tokenize(s)?;
            if t.is_empty() {
                return Err(Error::model(&cfg_path, "invocation_string tokenizes to nothing"));
            }
            AdapterKind::Activated { invocation: t }
        }
        (None, None) => AdapterKind::Lora,
    };
    Ok(LlmAdapter {
        name: name.to_string(),
        path: dir.to_path_buf(),
        kind,
        invocation_string: cfg.invocation_string,
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::alora_offset;

    /// PEFT's own test vectors (tests/test_lora_variants.py), invocation [1, 2].
    #[test]
    fn peft_offset_vectors() {
        let inv = [1, 2];
        let cases: [(&[u32], Option<usize>); 6] = [
            (&[0, 1, 2, 3], Some(3)),
            (&[0, 4, 5, 6], None),
            (&[1, 2, 1, 2], Some(2)),
            (&[0, 4, 1, 2], Some(2)),
            (&[1, 2, 3, 4], Some(4)),
            (&[0, 4, 1, 4], None),
        ];
        for (ids, want) in cases {
            assert_eq!(alora_offset(ids, &inv), want, "{ids:?}");
        }
        assert_eq!(alora_offset(&[1], &inv), None);
        assert_eq!(alora_offset(&[5, 1, 2], &[]), None);
    }
}
