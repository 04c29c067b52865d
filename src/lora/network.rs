//! A LoRA file resolved against a loaded model: every module matched to its layer, converted to
//! a [`BranchWeights`] with its scale, shape-checked, with a report of what did not match.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loramix_models::{BranchWeights, LayerKind, LowRankBranch, SharedBasis, SharedLoadings};

use super::info::{component_of, group_modules, inspect, BaseModel, LoraInfo, ParamKey};
use super::keys::{Component, ModuleName, Param};
use super::targets::AdapterTargets;
use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// One module of a LoRA, ready to attach: `ΔW = scale · weights.delta()` on layer `target`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Index into [`AdapterTargets::targets`].
    pub target: usize,
    /// The module's name as written in the file.
    pub key: String,
    /// f32, on the CPU; cast to the model's dtype and device on attach.
    pub weights: BranchWeights,
    pub scale: f64,
    /// The same module as loadings on a subspace's basis, for the shared-basis forward.
    pub shared: Option<SharedModule>,
}

/// A module of a subspace member (uncentred): `weights` = `basis.up · up` and `down · basis.down`.
#[derive(Debug, Clone)]
pub struct SharedModule {
    /// The subspace's name: members of one subspace share one basis per layer.
    pub key: String,
    /// C_Aᵀ `[K_d, in]` (`[K_d, in, k, k]` on a conv) and C_B `[out, K_u]` (`[out, K_u, 1, 1]`), f32 on the CPU.
    pub basis: std::sync::Arc<(Tensor, Tensor)>,
    /// L_A,iᵀ `[r, K_d]` and L_B,i `[K_u, r]`.
    pub down: Tensor,
    pub up: Tensor,
}

/// What a load matched and what it left out, by name.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    /// Qualified layer paths (`unet.down_blocks...to_q`) that received a module.
    pub matched: Vec<String>,
    /// Tensor names that address no layer of the loaded model.
    pub unmatched_keys: Vec<String>,
    /// Modules we recognised but do not apply, with the reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct LoadedLora {
    /// The branch name used on every layer (unique among attached LoRAs).
    pub name: String,
    pub path: PathBuf,
    pub info: LoraInfo,
    /// sha256 of the tensor data (A1111's "addnet" / Civitai AutoV3 hash), for `Lora hashes`.
    pub addnet_hash: String,
    pub modules: Vec<LoraModule>,
    pub report: LoadReport,
}

/// PEFT adapter settings that diffusers stores in the `lora_adapter_metadata` header entry.
#[derive(Debug, Default)]
struct PeftConfig {
    alpha: Option<f64>,
    rank: Option<f64>,
    alpha_pattern: HashMap<String, f64>,
    rslora: bool,
}

fn peft_configs(meta: &HashMap<String, String>) -> HashMap<Component, PeftConfig> {
    let mut out = HashMap::new();
    let Some(raw) = meta.get("lora_adapter_metadata") else { return out };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(raw) else { return out };
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let get = |k: &str| map.get(&format!("{}.{k}", c.name()));
        let cfg = PeftConfig {
            alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            rank: get("r").and_then(|v| v.as_f64()),
            alpha_pattern: get("alpha_pattern")
                .and_then(|v| v.as_object())
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                .unwrap_or_default(),
            rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        if cfg.alpha.is_some() || cfg.rank.is_some() || !cfg.alpha_pattern.is_empty() {
            out.insert(c, cfg);
        }
    }
    out
}

impl PeftConfig {
    /// PEFT's rule: `alpha_pattern` entry whose key ends the module path, else `lora_alpha`.
    fn scale(&self, path: &str, rank: usize) -> Option<f64> {
        let alpha = self
            .alpha_pattern
            .iter()
            .filter(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}")))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, v)| *v)
            .or(self.alpha)?;
        Some(if self.rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A LoRA file's addnet hash (A1111's `Lora hashes`, Civitai's AutoV3): sha256 of its tensor
/// data, so that edits of its metadata keep it.
pub fn addnet_hash_of(path: &std::path::Path) -> Result<String> {
    Ok(sha256_hex(SafetensorsFile::open(path)?.data_bytes()))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn f32_cpu(file: &SafetensorsFile, name: &str) -> Result<Tensor> {
    Ok(file.load(name)?.to_dtype(DType::F32)?)
}

/// A mismatch between a module and its layer, explained in terms of base models when the
/// shapes tell one.
struct ShapeMismatch {
    what: String,
}

impl LoadedLora {
    /// Reads `path` and resolves it against `targets`. Refuses DoRA, LoRAs for another base
    /// (from metadata and from shapes), and files of which nothing matches.
    pub fn load(path: &Path, name: &str, targets: &AdapterTargets) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let info = inspect(&file)?;
        let refuse = |message: String| Error::BadFile { path: path.to_path_buf(), message };
        if info.uses_dora {
            return Err(refuse(
                "this is a DoRA (weight-decomposed) LoRA: it rescales every output channel by the norm of W + ΔW, which \
                 cannot be applied or mixed per step as an additive branch. LoRAMix does not support DoRA yet; diffusers \
                 silently drops the `dora_scale` tensors and applies the rest, which gives a different image — we refuse \
                 instead. Use a plain LoRA export of this model."
                    .into(),
            ));
        }
        let fits_by_shape = info.cross_attention_width == Some(targets.cross_attention_dim) && !info.base_evidence.contains('=');
        if info.base_model.is_foreign_to_sdxl() && !fits_by_shape {
            return Err(refuse(format!(
                "this LoRA is for {} ({}), but the loaded model is {}",
                info.base_model.label(),
                info.base_evidence,
                targets.describe_model()
            )));
        }
        let meta = file.user_metadata();
        let peft = peft_configs(&meta);
        let (modules, unparsed) = group_modules(&file.names());
        let mut report = LoadReport { unmatched_keys: unparsed, ..Default::default() };
        let mut out = Vec::new();
        let mut mismatch: Option<ShapeMismatch> = None;
        for (module, (mname, params)) in &modules {
            let key_of = |p: Param| params.get(&ParamKey(p)).cloned();
            let Some(ti) = targets.find(mname) else {
                report.unmatched_keys.extend(params.values().cloned());
                continue;
            };
            let target = &targets.targets[ti];
            let converted = convert_module(&file, module, params, target.layer.kind, target.layer.in_features, target.layer.out_features);
            let (weights, rank, kind_alpha_default) = match converted {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(ModuleError::Unsupported(why)) => {
                    report.skipped.push((module.clone(), why));
                    continue;
                }
                Err(ModuleError::Shape(what)) => {
                    mismatch.get_or_insert(ShapeMismatch { what: format!("{what} (layer {})", target.qualified_path()) });
                    continue;
                }
                Err(ModuleError::Engine(e)) => return Err(e),
            };
            let alpha = key_of(Param::Alpha).and_then(|k| file.scalar(&k));
            let scale = match (&weights, alpha) {
                // LoKr with both factors full ignores alpha (LyCORIS; diffusers' `_bake_lokr_alpha_`).
                (_, _) if !kind_alpha_default => 1.0,
                (_, Some(a)) if a != 0.0 => a / rank as f64,
                _ => match (mname, peft.get(&component_of(mname))) {
                    (ModuleName::Dotted(_, p), Some(cfg)) => cfg.scale(p, rank).unwrap_or(1.0),
                    _ => 1.0,
                },
            };
            report.matched.push(target.qualified_path());
            out.push(LoraModule { target: ti, key: module.clone(), weights, scale, shared: None });
        }
        if let Some(m) = mismatch {
            let width_hint = match info.base_model {
                BaseModel::Unknown | BaseModel::Other(_) => String::new(),
                ref b => format!("this LoRA looks made for {} ({}); ", b.label(), info.base_evidence),
            };
            return Err(refuse(format!(
                "{width_hint}its shapes do not fit the loaded model, {}: {}",
                targets.describe_model(),
                m.what
            )));
        }
        if out.is_empty() {
            let sample: Vec<&String> = report.unmatched_keys.iter().take(4).collect();
            let reason = if report.skipped.is_empty() {
                format!("none of its modules names a layer of the loaded model (e.g. {sample:?})")
            } else {
                format!("no module can be applied: {}", report.skipped.iter().take(3).map(|(k, w)| format!("{k}: {w}")).collect::<Vec<_>>().join("; "))
            };
            let base = match info.base_model {
                BaseModel::Unknown => String::new(),
                ref b => format!(" It was made for {} ({}).", b.label(), info.base_evidence),
            };
            return Err(refuse(format!("{reason}; the loaded model is {}.{base}", targets.describe_model())));
        }
        report.unmatched_keys.sort();
        let addnet_hash = sha256_hex(file.data_bytes());
        Ok(Self { name: name.to_string(), path: path.to_path_buf(), info, addnet_hash, modules: out, report })
    }

    /// `scale · ΔW` of one module, f32 on the CPU (what diffusers' PEFT layer adds at weight 1).
    pub fn delta(&self, m: &LoraModule) -> Result<Tensor> {
        Ok((m.weights.delta()? * m.scale)?)
    }

    /// The same in f32 on `device`: fusing a GPU model's layers where they live avoids a round
    /// trip of every base weight through host memory (seconds per image for SDXL).
    pub fn delta_on(&self, m: &LoraModule, device: &Device) -> Result<Tensor> {
        let f = |t: &Tensor| t.to_device(device)?.to_dtype(DType::F32);
        let weights = match &m.weights {
            BranchWeights::LowRank { down, up } => BranchWeights::LowRank { down: f(down)?, up: f(up)? },
            BranchWeights::Dense(d) => BranchWeights::Dense(f(d)?),
        };
        Ok((weights.delta()? * m.scale)?)
    }
}

enum ModuleError {
    Unsupported(String),
    Shape(String),
    Engine(Error),
}

impl From<Error> for ModuleError {
    fn from(e: Error) -> Self {
        Self::Engine(e)
    }
}
impl From<candle_core::Error> for ModuleError {
    fn from(e: candle_core::Error) -> Self {
        Self::Engine(e.into())
    }
}

/// Converts one module's tensors to branch weights in the layer's layout.
/// Returns (weights, rank for alpha/rank, whether alpha applies).
fn convert_module(
    file: &SafetensorsFile,
    module: &str,
    params: &BTreeMap<ParamKey, String>,
    kind: LayerKind,
    inf: usize,
    outf: usize,
) -> std::result::Result<Option<(BranchWeights, usize, bool)>, ModuleError> {
    let get = |p: Param| -> std::result::Result<Option<Tensor>, ModuleError> {
        match params.get(&ParamKey(p)) {
            Some(n) => Ok(Some(f32_cpu(file, n)?)),
            None => Ok(None),
        }
    };
    let need = |p: Param, t: Option<Tensor>| -> std::result::Result<Tensor, ModuleError> {
        t.ok_or_else(|| ModuleError::Shape(format!("{module}: the {p:?} tensor is missing")))
    };
    let has = |p: Param| params.contains_key(&ParamKey(p));
    let k = match kind {
        LayerKind::Linear => 1,
        LayerKind::Conv2d { kernel, .. } => kernel,
    };
    let is_conv = matches!(kind, LayerKind::Conv2d { .. });
    let shape_err = |what: &str, got: &[usize], want: String| ModuleError::Shape(format!("{module}.{what} has shape {got:?}, expected {want}"));

    if has(Param::Down) || has(Param::Up) {
        let down = need(Param::Down, get(Param::Down)?)?;
        let up = need(Param::Up, get(Param::Up)?)?;
        let r = down.dim(0)?;
        let mut down = match get(Param::Mid)? {
            // Tucker LoCon: 1×1 down, k×k core, 1×1 up. Folding the core into the down kernel
            // is exact because the 1×1 down has no stride or padding of its own.
            Some(mid) => {
                let (rm, rj, kh, kw) = mid.dims4().map_err(|_| shape_err("lora_mid.weight", mid.dims(), "[r, r, k, k]".into()))?;
                let d2 = down.reshape((rj, down.elem_count() / rj))?;
                mid.permute((0, 2, 3, 1))?.reshape((rm * kh * kw, rj))?.matmul(&d2)?.reshape((rm, kh, kw, d2.dim(1)?))?.permute((0, 3, 1, 2))?.contiguous()?
            }
            None => down,
        };
        let down_dims = down.dims().to_vec();
        let r_out = down_dims[0];
        down = if is_conv {
            if down_dims == [r_out, inf] && k == 1 {
                down.reshape((r_out, inf, 1, 1))?
            } else if down_dims == [r_out, inf, k, k] {
                down
            } else {
                return Err(shape_err("down", &down_dims, format!("[rank, {inf}, {k}, {k}]")));
            }
        } else if down_dims == [r_out, inf] || down_dims == [r_out, inf, 1, 1] {
            down.reshape((r_out, inf))?
        } else {
            return Err(shape_err("down", &down_dims, format!("[rank, {inf}]")));
        };
        let up_dims = up.dims().to_vec();
        let ur = up_dims.get(1).copied().unwrap_or(0);
        let up_ok = up_dims.first() == Some(&outf) && ur == r_out && (up_dims.len() == 2 || up_dims[2..] == [1, 1]);
        if !up_ok {
            return Err(shape_err("up", &up_dims, format!("[{outf}, {r_out}]")));
        }
        let up = if is_conv { up.reshape((outf, r_out, 1, 1))? } else { up.reshape((outf, r_out))? };
        return Ok(Some((BranchWeights::LowRank { down, up }, r, true)));
    }

    if has(Param::HadaW1A) {
        if has(Param::HadaT1) || has(Param::HadaT2) {
            return Err(ModuleError::Unsupported("Tucker-decomposed LoHa (hada_t1/hada_t2) is not supported".into()));
        }
        let (w1a, w1b) = (need(Param::HadaW1A, get(Param::HadaW1A)?)?, need(Param::HadaW1B, get(Param::HadaW1B)?)?);
        let (w2a, w2b) = (need(Param::HadaW2A, get(Param::HadaW2A)?)?, need(Param::HadaW2B, get(Param::HadaW2B)?)?);
        let cols = inf * k * k;
        let check = |n: &str, t: &Tensor, rows: Option<usize>, c: Option<usize>| -> std::result::Result<(), ModuleError> {
            let d = t.dims();
            let ok = d.len() == 2 && rows.is_none_or(|r| d[0] == r) && c.is_none_or(|c| d[1] == c);
            if ok {
                return Ok(());
            }
            let r = rows.map(|r| r.to_string()).unwrap_or_else(|| "rank".into());
            let c = c.map(|c| c.to_string()).unwrap_or_else(|| "rank".into());
            Err(shape_err(n, d, format!("[{r}, {c}]")))
        };
        let w1b = w1b.reshape((w1b.dim(0)?, w1b.elem_count() / w1b.dim(0)?))?;
        let w2b = w2b.reshape((w2b.dim(0)?, w2b.elem_count() / w2b.dim(0)?))?;
        check("hada_w1_a", &w1a, Some(outf), None)?;
        check("hada_w2_a", &w2a, Some(outf), None)?;
        check("hada_w1_b", &w1b, Some(w1a.dim(1)?), Some(cols))?;
        check("hada_w2_b", &w2b, Some(w2a.dim(1)?), Some(cols))?;
        let (r1, r2) = (w1b.dim(0)?, w2b.dim(0)?);
        // (A1 B1) ⊙ (A2 B2) = U D with U[o,(a,b)] = A1[o,a] A2[o,b] and D[(a,b),i] = B1[a,i] B2[b,i].
        let up = w1a.unsqueeze(2)?.broadcast_mul(&w2a.unsqueeze(1)?)?.reshape((outf, r1 * r2))?;
        let down = w1b.unsqueeze(1)?.broadcast_mul(&w2b.unsqueeze(0)?)?.reshape((r1 * r2, cols))?;
        let (down, up) = if is_conv {
            (down.reshape((r1 * r2, inf, k, k))?, up.reshape((outf, r1 * r2, 1, 1))?)
        } else {
            (down, up)
        };
        return Ok(Some((BranchWeights::LowRank { down, up }, r1, true)));
    }

    if has(Param::LokrW1) || has(Param::LokrW1A) || has(Param::LokrW2) || has(Param::LokrW2A) {
        if has(Param::LokrT2) {
            return Err(ModuleError::Unsupported("Tucker-decomposed LoKr (lokr_t2) is not supported".into()));
        }
        let w1 = match get(Param::LokrW1)? {
            Some(w) => w,
            None => need(Param::LokrW1A, get(Param::LokrW1A)?)?.matmul(&need(Param::LokrW1B, get(Param::LokrW1B)?)?)?,
        };
        let w2 = match get(Param::LokrW2)? {
            Some(w) => w,
            None => {
                let a = need(Param::LokrW2A, get(Param::LokrW2A)?)?;
                let b = need(Param::LokrW2B, get(Param::LokrW2B)?)?;
                let b2 = b.reshape((b.dim(0)?, b.elem_count() / b.dim(0)?))?;
                a.matmul(&b2)?
            }
        };
        let rank = params
            .get(&ParamKey(Param::LokrW2B))
            .or_else(|| params.get(&ParamKey(Param::LokrW1B)))
            .and_then(|n| file.shape_of(n))
            .and_then(|s| s.first().copied());
        if w1.rank() != 2 {
            return Err(shape_err("lokr_w1", w1.dims(), "a matrix".into()));
        }
        let (o1, i1) = w1.dims2()?;
        if o1 == 0 || i1 == 0 || !outf.is_multiple_of(o1) || !inf.is_multiple_of(i1) {
            return Err(shape_err("lokr_w1", w1.dims(), format!("factors of [{outf}, {inf}]")));
        }
        let (o2, i2) = (outf / o1, inf / i1);
        let w2 = if w2.elem_count() == o2 * i2 * k * k {
            w2.reshape((o2, i2, k, k))?
        } else {
            return Err(shape_err("lokr_w2", w2.dims(), format!("[{o2}, {i2}{}]", if k > 1 { format!(", {k}, {k}") } else { String::new() })));
        };
        // kron(w1, w2)[a·o2 + c, b·i2 + d] = w1[a, b] · w2[c, d] (per kernel tap for convs).
        let delta = w1
            .reshape((o1, 1, i1, 1, 1, 1))?
            .broadcast_mul(&w2.reshape((1, o2, 1, i2, k, k))?)?
            .reshape((outf, inf, k, k))?;
        let delta = if is_conv { delta } else { delta.reshape((outf, inf))? };
        return Ok(Some((BranchWeights::Dense(delta), rank.unwrap_or(1), rank.is_some())));
    }

    if has(Param::Diff) {
        let d = need(Param::Diff, get(Param::Diff)?)?;
        let want = if is_conv { vec![outf, inf, k, k] } else { vec![outf, inf] };
        if d.elem_count() != want.iter().product::<usize>() || d.dim(0)? != outf {
            return Err(shape_err("diff", d.dims(), format!("{want:?}")));
        }
        if has(Param::DiffBias) {
            return Err(ModuleError::Unsupported("full-module bias differences (diff_b) are not supported".into()));
        }
        return Ok(Some((BranchWeights::Dense(d.reshape(want)?), 1, false)));
    }
    if has(Param::Magnitude) || has(Param::Alpha) {
        return Err(ModuleError::Unsupported("only an alpha or magnitude, no weights".into()));
    }
    Ok(None)
}

fn on_layer(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(like.device())?.to_dtype(like.dtype())?)
}

/// The unfused path: attaches every module of each LoRA as a branch named after the LoRA, with
/// the given strength; the mixing engine changes per-layer weights later by branch name.
pub fn attach(targets: &AdapterTargets, loras: &[(&LoadedLora, f64)]) -> Result<()> {
    for (lora, strength) in loras {
        for m in &lora.modules {
            let layer = &targets.targets[m.target].layer;
            let weights = match &m.weights {
                BranchWeights::LowRank { down, up } => {
                    BranchWeights::LowRank { down: on_layer(down, &layer.base_weight)?, up: on_layer(up, &layer.base_weight)? }
                }
                BranchWeights::Dense(d) => BranchWeights::Dense(on_layer(d, &layer.base_weight)?),
            };
            let mut s = layer.slot.write();
            s.branches.retain(|b| b.name != lora.name);
            let shared = match &m.shared {
                Some(sm) => {
                    let basis = match s.bases.iter().position(|b| b.key == sm.key) {
                        Some(i) => i,
                        None => {
                            let (down, up) = (on_layer(&sm.basis.0, &layer.base_weight)?, on_layer(&sm.basis.1, &layer.base_weight)?);
                            s.bases.push(SharedBasis { key: sm.key.clone(), down, up });
                            s.bases.len() - 1
                        }
                    };
                    Some(SharedLoadings { basis, down: on_layer(&sm.down, &layer.base_weight)?, up: on_layer(&sm.up, &layer.base_weight)? })
                }
                None => None,
            };
            s.branches.push(LowRankBranch { name: lora.name.clone(), weights, scale: m.scale, weight: *strength, route: Default::default(), shared });
        }
    }
    Ok(())
}

/// The fused path for a static mix: `W' = W + Σ m_i s_i ΔW_i`, computed in f32 on the layer's
/// device into a fresh tensor kept beside the original (dropping it restores the base exactly).
pub fn fuse(targets: &AdapterTargets, loras: &[(&LoadedLora, f64)]) -> Result<()> {
    let mut deltas: BTreeMap<usize, Tensor> = BTreeMap::new();
    for (lora, strength) in loras {
        for m in &lora.modules {
            let d = (lora.delta_on(m, targets.targets[m.target].layer.base_weight.device())? * *strength)?;
            let acc = match deltas.remove(&m.target) {
                Some(a) => (a + d)?,
                None => d,
            };
            deltas.insert(m.target, acc);
        }
    }
    for (ti, d) in deltas {
        let layer = &targets.targets[ti].layer;
        let base = layer.base_weight.to_dtype(DType::F32)?;
        let fused = (base + d.reshape(layer.base_weight.dims())?)?;
        layer.slot.write().fused_weight = Some(fused.to_dtype(layer.base_weight.dtype())?);
    }
    Ok(())
}
