//! Control models: opening one (a diffusers folder, one `.safetensors` file in diffusers names, or
//! a hub repo), and the control units a generation runs.
//!
//! A unit's model is a ControlNet or a T2I-Adapter, as in sd-webui-controlnet, which lists both
//! as ControlNet models and runs both from a unit.
//!
//! A single file has no config. Its shape is read from its tensors; what the tensors cannot say
//! (a ControlNet's attention heads, normalisation and timestep flavour; whether an adapter is the
//! SDXL kind) comes from the base UNet, which the model was made for.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use loramix_models::adapter::Adaptable;
use loramix_models::sdxl::{ControlNetConfig, ControlNetModel, ControlResiduals, T2IAdapter, T2IAdapterConfig, UNet2DConditionConfig};

use super::img2img::ResizeMode;
use super::model::{component_weights, read_json};
use crate::error::{Error, Result};
use crate::hub::HubRepo;
use crate::weights::{SafetensorsFile, WeightSource};

/// sd-webui-controlnet's "Control Mode". Balanced applies the weight as it is. The other two
/// use the extension's "soft injection": a ControlNet's residual k (of n, the mid block's last)
/// is weighted `0.825^(12 - k)` (13 for SD 1.5, the first 10 of them for SDXL), an adapter's
/// features `0.25, 0.62, 0.825, 1`; "ControlNet is more important" also takes the control off the
/// unconditional half of CFG ("cfg injection").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", try_from = "ControlModeText")]
pub enum ControlMode {
    #[default]
    Balanced,
    Prompt,
    Control,
}

impl ControlMode {
    pub const ALL: [ControlMode; 3] = [Self::Balanced, Self::Prompt, Self::Control];

    pub fn name(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::Prompt => "prompt",
            Self::Control => "control",
        }
    }

    /// As the extension labels it (and writes it in infotext).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Balanced => "Balanced",
            Self::Prompt => "My prompt is more important",
            Self::Control => "ControlNet is more important",
        }
    }

    pub fn is_balanced(&self) -> bool {
        *self == Self::Balanced
    }
}

impl std::str::FromStr for ControlMode {
    type Err = Error;
    /// Our names, the extension's labels, or its API numbers (0, 1, 2).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(t) || m.a1111_name().eq_ignore_ascii_case(t) || t.parse::<usize>().ok() == Self::ALL.iter().position(|x| x == m))
            .ok_or_else(|| Error::Argument(format!("control mode {s:?}: expected balanced, prompt or control (or the extension's \"My prompt is more important\", \"ControlNet is more important\", 0, 1, 2)")))
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ControlModeText {
    Number(u64),
    Name(String),
}

impl TryFrom<ControlModeText> for ControlMode {
    type Error = String;
    fn try_from(t: ControlModeText) -> std::result::Result<Self, String> {
        match t {
            ControlModeText::Number(n) => n.to_string().parse().map_err(|e: Error| e.to_string()),
            ControlModeText::Name(s) => s.parse().map_err(|e: Error| e.to_string()),
        }
    }
}

/// The extension's soft-injection weights of an adapter's features, in order.
const ADAPTER_SOFT_WEIGHTS: [f64; 4] = [0.25, 0.62, 0.825, 1.0];

/// What a unit runs.
#[derive(Debug, Clone)]
pub enum ControlModel {
    ControlNet(Arc<ControlNetModel>),
    /// Runs once per pass (it sees only the control image); its features are added inside the
    /// UNet's down blocks.
    Adapter(Arc<T2IAdapter>),
}

impl ControlModel {
    pub fn as_adaptable(&self) -> &dyn Adaptable {
        match self {
            Self::ControlNet(m) => m.as_ref(),
            Self::Adapter(m) => m.as_ref(),
        }
    }

    pub fn needs_guess_mode(&self) -> bool {
        matches!(self, Self::ControlNet(m) if m.needs_guess_mode())
    }
}

/// A unit's control input at one pass's size, made once per pass.
#[derive(Debug, Clone)]
pub enum PreparedControl {
    /// A ControlNet and the image it sees at every step, `[rows, 3, H, W]`.
    ControlNet(Arc<ControlNetModel>, Tensor),
    /// A T2I-Adapter's features, already scaled by the unit's weight, one per block.
    Features(ControlResiduals),
}

/// One control model applied to a generation (A1111's "ControlNet Unit").
#[derive(Debug, Clone)]
pub struct ControlUnit {
    pub model: ControlModel,
    /// The control map as the model sees it (already preprocessed), at any size: it is fitted
    /// to each pass's size with `resize_mode`.
    pub image: RgbImage,
    /// diffusers' `controlnet_conditioning_scale` / `adapter_conditioning_scale`, A1111's
    /// "Control Weight".
    pub weight: f64,
    /// diffusers' `control_guidance_start` / `_end`, A1111's "Starting / Ending Control Step":
    /// the fraction of the steps the unit acts on. An adapter's end is diffusers'
    /// `adapter_conditioning_factor` (its start is always 0 there).
    pub start: f64,
    pub end: f64,
    pub resize_mode: ResizeMode,
    /// diffusers' `guess_mode`: the ControlNet sees only the conditional rows, its residuals
    /// scaled from 0.1 to 1 (always on for a model whose config says `global_pool_conditions`).
    pub guess_mode: bool,
    /// sd-webui-controlnet's control mode ([`ControlMode`]).
    pub control_mode: ControlMode,
    /// The extension's soft weights in this pass even when balanced.
    pub soft_injection: bool,
    /// Soft weights in the hires pass: sd-webui-controlnet forces them there for canny (and
    /// mlsd) maps, "to reduce artifacts"; the hires request sets `soft_injection` from this.
    pub soft_in_hires: bool,
}

impl ControlUnit {
    /// Whether the unit acts at entry `i` of the `n` schedule entries this run takes (diffusers'
    /// `controlnet_keep`: entries, so Heun's and DPM2's two model calls per step count twice, and
    /// an img2img run counts from its first step).
    /// An adapter ends as diffusers' adapter pipelines count: while the entry `i < ⌊steps · end⌋`,
    /// `steps` being the sampling steps (Heun's and DPM2's `n` entries are about twice as many),
    /// which can differ from the ControlNet rule by a step where the product rounds down.
    pub fn acts_at(&self, i: usize, n: usize, steps: usize) -> bool {
        let nf = n as f64;
        if (i as f64 / nf) < self.start {
            return false;
        }
        match self.model {
            ControlModel::Adapter(_) => i < (steps as f64 * self.end) as usize,
            ControlModel::ControlNet(_) => ((i + 1) as f64 / nf) <= self.end,
        }
    }

    /// Whether this unit can run on an image of `(w, h)` pixels from a VAE that downscales by
    /// `vae_factor`: an adapter unshuffles the image by its downscale factor, which must divide
    /// both sides and put its first feature where the UNet's blocks are (SDXL's kind: half the
    /// latent; the others: the latent).
    pub fn check_size(&self, (w, h): (usize, usize), vae_factor: usize) -> Result<()> {
        let ControlModel::Adapter(a) = &self.model else { return Ok(()) };
        let c = a.config();
        let want = if c.adapter_type == "full_adapter_xl" { 2 * vae_factor } else { vae_factor };
        if c.downscale_factor != want {
            return Err(Error::Argument(format!(
                "this T2I-Adapter ({}) unshuffles the image by {}; this model needs {want} (an adapter made for another architecture, SD 1.5 vs SDXL?)",
                c.adapter_type, c.downscale_factor
            )));
        }
        let d = c.downscale_factor;
        if w % d != 0 || h % d != 0 {
            return Err(Error::Argument(format!("the image is {w}x{h}; this T2I-Adapter needs sides that are multiples of {d}: give such a width and height (and hires scale)")));
        }
        Ok(())
    }

    /// The control image for an image of `(h, w)` pixels, `[1, channels, h, w]` in [0, 1].
    /// A one-channel adapter sees the map's luma, as PIL's `convert("L")` gives it (a grey map
    /// such as canny's passes unchanged).
    pub fn cond_tensor(&self, (h, w): (usize, usize), device: &Device, dtype: DType) -> Result<Tensor> {
        let img = super::img2img::resize_to(self.resize_mode, &self.image, w as u32, h as u32);
        let (iw, ih) = img.dimensions();
        let grey = matches!(&self.model, ControlModel::Adapter(a) if a.config().in_channels == 1);
        let c = if grey { 1 } else { 3 };
        let data: Vec<f32> = if grey {
            img.pixels().map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as f32 / 255.0).collect()
        } else {
            img.into_raw().into_iter().map(|v| v as f32 / 255.0).collect()
        };
        let t = Tensor::from_vec(data, (ih as usize, iw as usize, c), device)?.permute((2, 0, 1))?.unsqueeze(0)?;
        Ok(t.to_dtype(dtype)?)
    }

    /// Whether the extension's soft weights apply (a mode other than balanced, or forced).
    pub fn soft(&self) -> bool {
        self.soft_injection || !self.control_mode.is_balanced()
    }

    /// Whether the unconditional half of CFG goes without this unit's control (diffusers' guess
    /// mode, the extension's "ControlNet is more important", or a pooled ControlNet).
    pub fn cond_only(&self) -> bool {
        self.guess_mode || self.control_mode == ControlMode::Control || self.model.needs_guess_mode()
    }

    /// What the unit needs at every step of a pass making `(h, w)` pixels with `rows` batch rows,
    /// the first `uncond` of them CFG's unconditional half: the control image, or an adapter's
    /// weighted features (diffusers' adapter pipelines run the adapter once and repeat its
    /// features over the batch and the CFG halves).
    pub fn prepare(&self, size: (usize, usize), rows: usize, uncond: usize, device: &Device, dtype: DType) -> Result<PreparedControl> {
        let cond = self.cond_tensor(size, device, dtype)?;
        Ok(match &self.model {
            ControlModel::ControlNet(m) => PreparedControl::ControlNet(m.clone(), cond.repeat((rows, 1, 1, 1))?),
            ControlModel::Adapter(a) => {
                let features = a.forward(&cond)?;
                // Soft weights zip with the features, as the extension's: a fifth feature has none.
                let weights: Vec<f64> = if self.soft() { ADAPTER_SOFT_WEIGHTS.iter().map(|k| k * self.weight).collect() } else { vec![self.weight; features.len()] };
                let intrablock = features
                    .iter()
                    .zip(&weights)
                    .map(|(f, &k)| {
                        let f = (f * k)?.repeat((rows, 1, 1, 1))?;
                        if self.cond_only() && uncond > 0 {
                            Tensor::cat(&[&f.narrow(0, 0, uncond)?.zeros_like()?, &f.narrow(0, uncond, rows - uncond)?], 0)
                        } else {
                            Ok(f)
                        }
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                PreparedControl::Features(ControlResiduals { intrablock, ..Default::default() })
            }
        })
    }

    pub fn validate(&self) -> Result<()> {
        let ok = |x: f64| (0.0..=1.0).contains(&x);
        if !self.weight.is_finite() {
            return Err(Error::Argument(format!("controlnet weight must be a finite number, got {}", self.weight)));
        }
        if !ok(self.start) || !ok(self.end) || self.start > self.end {
            return Err(Error::Argument(format!(
                "controlnet guidance start {} and end {}: expected 0 ≤ start ≤ end ≤ 1",
                self.start, self.end
            )));
        }
        if !self.resize_mode.fits_pixels() {
            return Err(Error::Argument(format!(
                "resize mode {:?} is img2img's: a control map is fitted with Just Resize, Crop and Resize or Resize and Fill",
                self.resize_mode.a1111_name()
            )));
        }
        if self.guess_mode && matches!(self.model, ControlModel::Adapter(_)) {
            return Err(Error::Argument("guess mode is for ControlNets; this unit's model is a T2I-Adapter".into()));
        }
        if self.guess_mode && !self.control_mode.is_balanced() {
            return Err(Error::Argument(format!(
                "guess mode (diffusers') and control mode {:?} (the extension's) are two ways to favour the control: choose one",
                self.control_mode.a1111_name()
            )));
        }
        Ok(())
    }
}

/// What kind of control model a folder's config or a file's tensor names say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ControlNet,
    Adapter,
}

/// Opens a ControlNet or a T2I-Adapter for a model whose UNet has `base`'s config.
pub fn load(spec: &str, base: &UNet2DConditionConfig, device: &Device, dtype: DType) -> Result<ControlModel> {
    let p = Path::new(spec);
    if crate::hub::is_repo_id(spec) && !p.exists() {
        let dir = fetch_hub_controlnet(spec)?;
        return load(&dir.to_string_lossy(), base, device, dtype);
    }
    let kind = if p.is_dir() {
        let cfg_path = p.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::model(p, "a ControlNet folder needs config.json (diffusers' ControlNetModel or T2IAdapter layout)"));
        }
        check_class(&read_json(&cfg_path)?).map_err(|m| Error::model(&cfg_path, m))?
    } else if p.is_file() {
        file_kind(&SafetensorsFile::open(p)?.names())
    } else {
        return Err(Error::Argument(format!("controlnet {spec:?}: no such file or folder, and not a Hugging Face repo id (owner/name)")));
    };
    match kind {
        Kind::ControlNet => Ok(ControlModel::ControlNet(Arc::new(load_controlnet(p, base, device, dtype)?))),
        Kind::Adapter => Ok(ControlModel::Adapter(Arc::new(load_adapter(p, base, device, dtype)?))),
    }
}

/// Builds a model from `ws`, naming the file in a weights error.
fn build<M>(ws: WeightSource, dtype: DType, device: &Device, new: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<M>) -> Result<M> {
    let label = ws.label().to_string();
    new(ws.into_var_builder(dtype, device)).map_err(|e| {
        // The weights' errors name their file already.
        let m = e.to_string();
        if m.contains(&label) { Error::Argument(m) } else { Error::model(PathBuf::from(label), m) }
    })
}

fn load_controlnet(p: &Path, base: &UNet2DConditionConfig, device: &Device, dtype: DType) -> Result<ControlNetModel> {
    let (config, ws) = if p.is_dir() {
        let cfg_path = p.join("config.json");
        let json = read_json(&cfg_path)?;
        let cfg = ControlNetConfig::from_json(json).map_err(|m| Error::model(&cfg_path, m))?;
        let files = component_weights(p)?;
        for f in &files {
            check_plain(&SafetensorsFile::open(f)?.names()).map_err(|m| Error::model(f, m))?;
        }
        (cfg, WeightSource::from_files(&files)?)
    } else {
        let file = SafetensorsFile::open(p)?;
        let cfg = infer_config(&file, base).map_err(|m| Error::model(p, m))?;
        check_plain(&file.names()).map_err(|m| Error::model(p, m))?;
        (cfg, WeightSource::from_files(&[p.to_path_buf()])?)
    };
    check_fits(&config, base).map_err(|m| Error::model(p, m))?;
    build(ws, dtype, device, |vb| ControlNetModel::new(vb, &config))
}

fn load_adapter(p: &Path, base: &UNet2DConditionConfig, device: &Device, dtype: DType) -> Result<T2IAdapter> {
    let (config, ws) = if p.is_dir() {
        let cfg_path = p.join("config.json");
        let cfg = T2IAdapterConfig::from_json(read_json(&cfg_path)?).map_err(|m| Error::model(&cfg_path, m))?;
        let files = component_weights(p)?;
        for f in &files {
            check_adapter_plain(&SafetensorsFile::open(f)?.names()).map_err(|m| Error::model(f, m))?;
        }
        (cfg, WeightSource::from_files(&files)?)
    } else {
        let file = SafetensorsFile::open(p)?;
        check_adapter_plain(&file.names()).map_err(|m| Error::model(p, m))?;
        let cfg = infer_adapter_config(&file, base).map_err(|m| Error::model(p, m))?;
        (cfg, WeightSource::from_files(&[p.to_path_buf()])?)
    };
    check_adapter_fits(&config, base).map_err(|m| Error::model(p, m))?;
    build(ws, dtype, device, |vb| T2IAdapter::new(vb, &config))
}

/// A file whose tensors are all `adapter.*` is a diffusers T2I-Adapter; anything else is read
/// as a ControlNet (whose checks then say what it is not).
fn file_kind(names: &[String]) -> Kind {
    if !names.is_empty() && names.iter().all(|n| n.starts_with("adapter.")) {
        Kind::Adapter
    } else {
        Kind::ControlNet
    }
}

/// A diffusers `T2IAdapter` has only `adapter.conv_in` and `adapter.body.*`: another prefix is a
/// `MultiAdapter` or another model, which would load without the tensors it does not name.
fn check_adapter_plain(names: &[String]) -> std::result::Result<(), String> {
    only_modules(names, &["adapter.conv_in.", "adapter.body."], "a diffusers T2IAdapter", "a MultiAdapter or another model, which is not supported here (give each adapter its own unit)")
}

/// `Err` naming the first few tensors outside `modules` (prefixes): a variant or another model
/// would otherwise load without them, since weights are read by name.
fn only_modules(names: &[String], modules: &[&str], model: &str, what: &str) -> std::result::Result<(), String> {
    let mut other: Vec<&str> = names.iter().map(String::as_str).filter(|n| !modules.iter().any(|m| n.starts_with(m))).collect();
    if other.is_empty() {
        return Ok(());
    }
    other.sort();
    Err(format!(
        "tensors outside {model} ({}{}): {what}",
        other.iter().take(3).copied().collect::<Vec<_>>().join(", "),
        if other.len() > 3 { format!(" and {} more", other.len() - 3) } else { String::new() }
    ))
}

/// An adapter's feature widths must be the UNet's block widths, level for level.
fn check_adapter_fits(c: &T2IAdapterConfig, base: &UNet2DConditionConfig) -> std::result::Result<(), String> {
    let k = c.channels.len().min(base.block_out_channels.len());
    if c.channels[..k] != base.block_out_channels[..k] {
        return Err(format!(
            "this T2I-Adapter's features ({:?} channels) do not match the model's UNet blocks ({:?}): an adapter for another architecture (SD 1.5 vs SDXL?)",
            c.channels, base.block_out_channels
        ));
    }
    Ok(())
}

/// The config of a T2I-Adapter stored as one file in diffusers names (sd-webui-controlnet's
/// `t2i-adapter_diffusers_xl_*`). The plain and the SDXL adapter have the same tensors (they
/// differ only in where they pool); the base UNet says which: an SDXL UNet (text-time added
/// conditions) takes the SDXL kind.
fn infer_adapter_config(f: &SafetensorsFile, base: &UNet2DConditionConfig) -> std::result::Result<T2IAdapterConfig, String> {
    let names: BTreeSet<String> = f.names().into_iter().collect();
    // Weights are matrices or kernels: at least two dimensions, so [0] and [1] exist.
    let shape = |n: &str| f.shape_of(n).filter(|s| s.len() >= 2).ok_or_else(|| format!("tensor {n} is missing or not a weight (fewer than 2 dimensions)"));
    let count = |prefix: &str| -> usize {
        names.iter().filter_map(|n| n.strip_prefix(prefix)).filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok()).map(|i| i + 1).max().unwrap_or(0)
    };
    let blocks = count("adapter.body.");
    let res = count("adapter.body.0.resnets.");
    if blocks == 0 || res == 0 {
        return Err("no adapter.body.N.resnets.M tensors".into());
    }
    let light = names.contains("adapter.body.0.out_conv.weight");
    let (unshuffled, channels, ty) = if light {
        // The last block repeats the widest width at half the size.
        let channels = (0..blocks - 1).map(|i| shape(&format!("adapter.body.{i}.out_conv.weight")).map(|s| s[0])).collect::<std::result::Result<Vec<_>, _>>()?;
        (shape("adapter.body.0.in_conv.weight")?[1], channels, "light_adapter")
    } else {
        let channels = (0..blocks).map(|i| shape(&format!("adapter.body.{i}.resnets.0.block1.weight")).map(|s| s[0])).collect::<std::result::Result<Vec<_>, _>>()?;
        let ty = if base.addition_embed_type.as_deref() == Some("text_time") { "full_adapter_xl" } else { "full_adapter" };
        (shape("adapter.conv_in.weight")?[1], channels, ty)
    };
    // `in_channels · downscale²` input channels after the pixel unshuffle: 3 (RGB) or 1 (grey)
    // times a square; never both, since 3 is not a square.
    let (in_channels, downscale) = [3usize, 1]
        .iter()
        .find_map(|&c| {
            let d = ((unshuffled / c) as f64).sqrt().round() as usize;
            (unshuffled % c == 0 && d * d * c == unshuffled).then_some((c, d))
        })
        .ok_or_else(|| format!("the adapter's input has {unshuffled} channels: not 3 or 1 channels times a square downscale"))?;
    T2IAdapterConfig::from_json(serde_json::json!({
        "in_channels": in_channels,
        "channels": channels,
        "num_res_blocks": res,
        "downscale_factor": downscale,
        "adapter_type": ty,
    }))
}

/// Every tensor must belong to a plain `ControlNetModel`: the weights are read by name, so a
/// variant with more modules (ControlNet-Union / ControlNet++'s task embeddings, a ControlNet-XS)
/// would otherwise load and run without them, giving wrong images without an error.
fn check_plain(names: &[String]) -> std::result::Result<(), String> {
    const MODULES: [&str; 8] = [
        "conv_in.",
        "time_embedding.",
        "add_embedding.",
        "down_blocks.",
        "mid_block.",
        "controlnet_cond_embedding.",
        "controlnet_down_blocks.",
        "controlnet_mid_block.",
    ];
    only_modules(names, &MODULES, "a plain ControlNetModel", "a ControlNet variant (Union / ControlNet++, XS) or another model, which is not supported")
}

/// A ControlNet must make the UNet's skip connections, one for one.
fn check_fits(c: &ControlNetConfig, base: &UNet2DConditionConfig) -> std::result::Result<(), String> {
    let u = &c.unet;
    check_blocks(&u.block_out_channels, u.layers_per_block, base)?;
    if u.cross_attention_dim != base.cross_attention_dim {
        return Err(format!(
            "this ControlNet attends to {}-wide text embeddings; the model's are {} (a ControlNet for another architecture?)",
            u.cross_attention_dim, base.cross_attention_dim
        ));
    }
    Ok(())
}

fn check_blocks(channels: &[usize], layers: usize, base: &UNet2DConditionConfig) -> std::result::Result<(), String> {
    if channels != base.block_out_channels || layers != base.layers_per_block {
        return Err(format!(
            "this ControlNet's blocks ({channels:?} channels, {layers} layers each) do not match the model's UNet ({:?}, {}): a ControlNet for another architecture (SD 1.5 vs SDXL?)",
            base.block_out_channels, base.layers_per_block
        ));
    }
    Ok(())
}

/// What a file's tensor names say before its shapes are read: a Control-LoRA, the original
/// layout, or not a ControlNet at all.
fn check_layout(names: &BTreeSet<String>) -> std::result::Result<(), String> {
    // Stability's Control-LoRAs also hold `input_hint_block.*`: look for them first.
    if names.iter().any(|n| n.starts_with("lora_controlnet") || n.contains("lora_up") || n.ends_with(".up") || n.ends_with(".up.weight")) {
        return Err("this is a Control-LoRA, which is not supported; use a full diffusers ControlNet".into());
    }
    if names.iter().any(|n| n.starts_with("control_model.") || n.starts_with("input_hint_block.") || n.starts_with("zero_convs.")) {
        return Err("this ControlNet is in the original (LDM) layout; convert it to diffusers names (diffusers' ControlNetModel.from_single_file) or use a diffusers ControlNet".into());
    }
    if names.iter().any(|n| n.starts_with("body.")) && names.iter().any(|n| n == "conv_in.weight" || n.starts_with("body.0.in_conv.")) {
        return Err("this T2I-Adapter is in TencentARC's original layout (body.*, conv_in.*); convert it to diffusers names (T2IAdapter, tensors adapter.*) or use a diffusers T2I-Adapter".into());
    }
    if names.iter().any(|n| n.starts_with("adapters.")) {
        return Err("a MultiAdapter file is not supported: give each adapter its own unit".into());
    }
    if !names.contains("controlnet_cond_embedding.conv_in.weight") {
        return Err("neither a ControlNet nor a T2I-Adapter in diffusers names (no controlnet_cond_embedding.conv_in.weight, and not every tensor is adapter.*)".into());
    }
    Ok(())
}

/// Checks that `spec` (a folder or a file; a hub id is not looked at) holds a ControlNet or a
/// T2I-Adapter this build reads, from its config and tensor names alone: what a server checks
/// before it queues a job, so a wrong file is the request's fault, not a failed job.
pub fn inspect(spec: &str) -> Result<()> {
    let p = Path::new(spec);
    if p.is_dir() {
        let cfg_path = p.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::model(p, "a ControlNet folder needs config.json (diffusers' ControlNetModel or T2IAdapter layout)"));
        }
        let json = read_json(&cfg_path)?;
        let kind = check_class(&json).map_err(|m| Error::model(&cfg_path, m))?;
        if kind == Kind::Adapter {
            T2IAdapterConfig::from_json(json).map_err(|m| Error::model(&cfg_path, m))?;
        }
        for f in component_weights(p)? {
            let names = SafetensorsFile::open(&f)?.names();
            match kind {
                Kind::ControlNet => check_plain(&names),
                Kind::Adapter => check_adapter_plain(&names),
            }
            .map_err(|m| Error::model(&f, m))?;
        }
    } else if p.is_file() {
        let names = SafetensorsFile::open(p)?.names();
        if file_kind(&names) == Kind::Adapter {
            return check_adapter_plain(&names).map_err(|m| Error::model(p, m));
        }
        let names: BTreeSet<String> = names.into_iter().collect();
        check_layout(&names).map_err(|m| Error::model(p, m))?;
        check_plain(&names.into_iter().collect::<Vec<_>>()).map_err(|m| Error::model(p, m))?;
    }
    Ok(())
}

fn check_class(json: &serde_json::Value) -> std::result::Result<Kind, String> {
    let class = json.get("_class_name").and_then(|c| c.as_str());
    let controlnet_keys = json.get("controlnet_conditioning_channel_order").is_some() || json.get("conditioning_embedding_out_channels").is_some();
    match class {
        Some("ControlNetModel") => Ok(Kind::ControlNet),
        None if controlnet_keys => Ok(Kind::ControlNet),
        Some("T2IAdapter") => Ok(Kind::Adapter),
        None if json.get("adapter_type").is_some() => Ok(Kind::Adapter),
        Some("MultiAdapter") => Err("a MultiAdapter folder is not supported: give each adapter its own unit".into()),
        _ => Err(format!(
            "not a ControlNet config (_class_name {}): expected diffusers' ControlNetModel or T2IAdapter",
            class.unwrap_or("absent")
        )),
    }
}

/// The config of a ControlNet stored as one file in diffusers names, from its tensors' shapes
/// and, where shapes cannot tell, the base UNet's config.
fn infer_config(f: &SafetensorsFile, base: &UNet2DConditionConfig) -> std::result::Result<ControlNetConfig, String> {
    let names: BTreeSet<String> = f.names().into_iter().collect();
    check_layout(&names)?;
    // Weights are matrices or kernels: at least two dimensions, so [0] and [1] exist.
    let shape = |n: &str| f.shape_of(n).filter(|s| s.len() >= 2).ok_or_else(|| format!("tensor {n} is missing or not a weight (fewer than 2 dimensions)"));
    let count = |prefix: &str| -> usize {
        names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let levels = count("down_blocks.");
    let layers = count("down_blocks.0.resnets.");
    if levels == 0 || layers == 0 {
        return Err("no down_blocks.N.resnets.M tensors".into());
    }
    let conv_in = shape("conv_in.weight")?;
    let mut boc = Vec::new();
    for i in 0..levels {
        boc.push(shape(&format!("down_blocks.{i}.resnets.0.conv1.weight"))?[0]);
    }
    // Before anything the base cannot describe: a ControlNet for another architecture.
    check_blocks(&boc, layers, base)?;
    let mut types = Vec::new();
    let mut depth = Vec::new();
    let mut linear = base.use_linear_projection;
    let mut context = base.cross_attention_dim;
    for i in 0..levels {
        let attn = format!("down_blocks.{i}.attentions.0.");
        if names.iter().any(|n| n.starts_with(&attn)) {
            types.push("CrossAttnDownBlock2D");
            // The `-mid` / `-small` SDXL ControlNets have levels with attention but no
            // transformer block (depth 0: only the projections).
            depth.push(count(&format!("{attn}transformer_blocks.")));
            linear = shape(&format!("{attn}proj_in.weight"))?.len() == 2;
            if let Some(k) = f.shape_of(&format!("{attn}transformer_blocks.0.attn2.to_k.weight")).filter(|k| k.len() >= 2) {
                context = k[1];
            }
        } else {
            types.push("DownBlock2D");
            depth.push(1);
        }
    }
    // diffusers builds the mid block with the last level's depth; a file that says otherwise
    // is not a ControlNet this config can describe.
    let mid_depth = count("mid_block.attentions.0.transformer_blocks.");
    if types.last() == Some(&"CrossAttnDownBlock2D") && depth.last() != Some(&mid_depth) {
        return Err(format!("the mid block has {mid_depth} transformer blocks and the last down block {}: not a diffusers ControlNetModel layout", depth.last().copied().unwrap_or(0)));
    }
    // Heads keep the base UNet's width per head (64 in SDXL) wherever its blocks line up.
    let base_heads = base.heads()?;
    let heads: Vec<usize> = boc
        .iter()
        .enumerate()
        .map(|(i, &ch)| match (base.block_out_channels.get(i), base_heads.get(i)) {
            (Some(&bc), Some(&bh)) if bh > 0 && bc % bh == 0 && ch % (bc / bh) == 0 => ch / (bc / bh),
            _ => (ch / 64).max(1),
        })
        .collect();
    let embed_in = shape("controlnet_cond_embedding.conv_in.weight")?;
    let mut embed_channels = vec![embed_in[0]];
    for k in 0.. {
        match f.shape_of(&format!("controlnet_cond_embedding.blocks.{}.weight", 2 * k + 1)).filter(|s| !s.is_empty()) {
            Some(s) => embed_channels.push(s[0]),
            None => break,
        }
    }
    let add = f.shape_of("add_embedding.linear_1.weight").filter(|s| s.len() >= 2);
    let v = serde_json::json!({
        "in_channels": conv_in[1],
        "conditioning_channels": embed_in[1],
        "conditioning_embedding_out_channels": embed_channels,
        "block_out_channels": boc,
        "layers_per_block": layers,
        "down_block_types": types,
        "transformer_layers_per_block": depth,
        "num_attention_heads": heads,
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "addition_embed_type": add.as_ref().map(|_| "text_time"),
        "addition_time_embed_dim": add.as_ref().and(base.addition_time_embed_dim),
        "projection_class_embeddings_input_dim": add.as_ref().map(|s| s[1]),
        "norm_num_groups": base.norm_num_groups,
        "norm_eps": base.norm_eps,
        "flip_sin_to_cos": base.flip_sin_to_cos,
        "freq_shift": base.freq_shift,
    });
    ControlNetConfig::from_json(v)
}

/// The config and weights of a diffusers ControlNet repo, through the HF cache (downloading
/// when online).
fn fetch_hub_controlnet(repo: &str) -> Result<PathBuf> {
    let HubRepo { cached, api, listing, offline, .. } = HubRepo::open(repo);
    let weights = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];
    let get = |f: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(f) {
            return Ok(Some(p));
        }
        match (&api, &listing) {
            (Some(a), Some(l)) if l.iter().any(|x| x == f) => {
                a.model(repo.to_string()).get(f).map(Some).map_err(|e| Error::Hub(format!("{repo}: downloading {f}: {e}")))
            }
            _ => Ok(None),
        }
    };
    let config = get("config.json")?;
    let mut weight = None;
    for w in weights {
        if let Some(p) = get(w)? {
            weight = Some(p);
            break;
        }
    }
    match (config, weight) {
        (Some(c), Some(_)) => c.parent().map(Path::to_path_buf).ok_or_else(|| Error::Hub(format!("{repo}: no snapshot folder"))),
        _ => Err(Error::Hub(format!(
            "controlnet {repo:?} is not in the HF cache with config.json and {} ({}); download it with a network{}",
            weights[0],
            if offline { "HF_HUB_OFFLINE is set" } else { "the hub could not be reached or has no such files" },
            if offline { " (unset HF_HUB_OFFLINE)" } else { "" }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' adapter pipelines stop at `i < int(n * factor)`: with 50 steps and 0.58 that
    /// is 28 steps, where the ControlNet rule gives 29 (50 · 0.58 rounds below 29).
    #[test]
    fn an_adapter_ends_as_diffusers_counts() {
        let cfg = T2IAdapterConfig { in_channels: 3, channels: vec![4, 8, 8, 8], num_res_blocks: 1, downscale_factor: 4, adapter_type: "full_adapter_xl".into() };
        let adapter = T2IAdapter::new(candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap();
        let mut unit = ControlUnit {
            model: ControlModel::Adapter(Arc::new(adapter)),
            image: RgbImage::new(1, 1),
            weight: 1.0,
            start: 0.0,
            end: 0.58,
            resize_mode: ResizeMode::CropAndResize,
            guess_mode: false,
            control_mode: ControlMode::Balanced,
            soft_injection: false,
            soft_in_hires: false,
        };
        assert_eq!((0..50).filter(|&i| unit.acts_at(i, 50, 50)).count(), 28);
        // Heun: 7 entries for 4 steps; at 0.5, diffusers runs the adapter for entries 0 and 1.
        unit.end = 0.5;
        assert_eq!((0..7).filter(|&i| unit.acts_at(i, 7, 4)).collect::<Vec<_>>(), [0, 1]);
        unit.end = 0.58;
        unit.start = 0.1;
        assert_eq!((0..50).filter(|&i| unit.acts_at(i, 50, 50)).collect::<Vec<_>>(), (5..28).collect::<Vec<_>>());
        // Sizes: multiples of the unshuffle, and the XL kind at twice the VAE's factor.
        assert!(unit.check_size((48, 32), 2).is_ok());
        assert!(unit.check_size((46, 32), 2).unwrap_err().to_string().contains("multiples of 4"));
        assert!(unit.check_size((48, 32), 4).unwrap_err().to_string().contains("another architecture"));
    }

    #[test]
    fn variants_with_more_modules_are_refused() {
        let plain: Vec<String> = ["conv_in.weight", "controlnet_mid_block.bias", "down_blocks.0.resnets.0.conv1.weight"].map(String::from).to_vec();
        assert!(check_plain(&plain).is_ok());
        let mut union = plain.clone();
        union.extend(["task_embedding", "control_add_embedding.linear_1.weight", "spatial_ch_projs.weight", "transformer_layes.0.attn.in_proj_weight"].map(String::from));
        let e = check_plain(&union).unwrap_err();
        assert!(e.contains("control_add_embedding.linear_1.weight") && e.contains("and 1 more") && e.contains("not supported"), "{e}");
    }
}
