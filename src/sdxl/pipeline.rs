//! The SDXL text-to-image pipeline: the same steps, in the same order, as diffusers'
//! `StableDiffusionXLPipeline.__call__`, so that equal inputs give equal latents.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use loramix_models::clip::{ClipTextConfig, ClipTextModel};
use loramix_models::adapter::Adaptable;
use loramix_models::{set_seamless, ConvBorders, Seamless};
use loramix_models::sdxl::{AddedConditions, AutoencoderKl, AutoencoderKlConfig, ControlInput, ControlResiduals, UNet2DConditionConfig, UNet2DConditionModel, VaeTiling};
use crate::sdxl::controlnet::{ControlUnit, PreparedControl};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::sdxl::model::{self, ModelSource};
use crate::rng::{BatchNoise, BatchSeeds, Variation};
use crate::sdxl::embedding::Embeddings;
use crate::sdxl::img2img::{self, InitImage, MaskedContent};
use crate::sdxl::prompt_schedule;
use crate::sdxl::schedulers::{self, SamplerKind, Schedule};
use crate::sdxl::text::{Conditioning, TextEncoders};
use crate::sdxl::tokenizer::ClipTokenizer;

/// The largest side we generate (SDXL's own sizes stop near 2048; the rest is hires-fix room).
pub const MAX_SIDE: usize = 8192;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Configs and tokenizers for a single-file checkpoint (a diffusers folder, like
    /// diffusers' `from_single_file(config=...)`); default: SDXL base from the HF cache/hub.
    pub config_dir: Option<PathBuf>,
    /// A VAE in place of the model's (A1111's "SD VAE"): a diffusers `vae/` folder (its own
    /// config, so an fp16-safe VAE decodes f16 without upcasting) or a single `.safetensors`
    /// file in diffusers or LDM names (the model's VAE config).
    pub vae: Option<PathBuf>,
    /// Leave the UNet unread until [`SdxlPipeline::load_unet`] (`--low-memory` without LoRAs:
    /// the prompts are encoded and the text encoders released first, so the two never share
    /// the memory).
    pub defer_unet: bool,
    /// The VAE's dtype in place of diffusers' rule (ComfyUI's `--fp32-vae` / `--bf16-vae`). bf16
    /// has f32's range, so a VAE that overflows f16 (SDXL's own) can decode in it on the tensor
    /// cores at half of f32's memory traffic; the error against f32 is the user's trade.
    pub vae_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, config_dir: None, vae: None, defer_unet: false, vae_dtype: None }
    }
}

/// When the VAE works in tiles (diffusers' `enable_vae_tiling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTilingMode {
    /// Tiles only when the whole image would not fit in the memory free now (the log says so).
    #[default]
    Auto,
    /// Always, in tiles of this many pixels (`None`: the VAE's `sample_size`, diffusers' default).
    On(Option<usize>),
    Off,
}

impl VaeTilingMode {
    /// `auto`, `off`, `on` (the VAE's default tiles) or a tile size in pixels.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" | "false" | "no" => Ok(Self::Off),
            "on" | "true" | "yes" => Ok(Self::On(None)),
            n => match n.parse::<usize>() {
                Ok(px) if px >= 64 => Ok(Self::On(Some(px))),
                _ => Err(Error::Argument(format!("VAE tiling {s:?}: expected auto, on, off or a tile size of at least 64 pixels"))),
            },
        }
    }
}

/// How one VAE pass will run: whole, or in tiles, and why (for the log).
#[derive(Debug, Clone, PartialEq)]
pub struct VaePlan {
    pub tiling: Option<VaeTiling>,
    /// Set when tiling was switched on automatically.
    pub note: Option<String>,
}

/// Bytes the VAE holds at once for a `[batch, _, height, width]` image run whole: the decoder's
/// full-resolution stages keep about three tensors of its widest full-resolution width (the last
/// upsampler's input, its norm, the convolution's output) alive, in f32 (the kernels compute in f32).
pub fn vae_working_bytes(config: &AutoencoderKlConfig, batch: usize, height: usize, width: usize) -> u64 {
    let c = &config.block_out_channels;
    let widest = c.first().copied().unwrap_or(0).max(c.get(1).copied().unwrap_or(0));
    3 * widest as u64 * (batch * height * width) as u64 * 4
}

/// Memory the OS says is free for us now (available, not merely unused).
fn available_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

/// Why a tiled VAE and seamless images do not mix.
const SEAMLESS_UNTILED: &str = "a tiled VAE cannot make seamless (tiling) images: its tiles do not wrap around the borders; use --vae-tiling off";

/// A component's weights, read again from the model's files when the VAE was released.
type VaeLoader = Box<dyn Fn() -> Result<AutoencoderKl> + Send + Sync>;

/// The UNet's weights, read when a deferred load asks for them.
type UnetLoader = Box<dyn FnOnce() -> Result<UNet2DConditionModel> + Send + Sync>;

/// The prompt texts, CFG, clip skip and embedding set one conditioning was encoded for.
type ConditioningKey = (String, Option<String>, bool, usize, String);

/// The SDXL pipeline. Its three models can be released once used (`--low-memory`): the text
/// encoders after encoding (the conditioning is kept), the UNet after denoising, the VAE after
/// decoding (it is read again from the model's files if needed again; the other two are not,
/// since LoRA layers attach to them).
pub struct SdxlPipeline {
    text: Option<TextEncoders>,
    unet: Option<UNet2DConditionModel>,
    /// Set while the UNet's load is deferred ([`LoadOptions::defer_unet`]).
    unet_loader: Option<UnetLoader>,
    vae: std::sync::OnceLock<AutoencoderKl>,
    vae_loader: VaeLoader,
    unet_config: UNet2DConditionConfig,
    vae_config: AutoencoderKlConfig,
    /// Conditioning encoded ahead ([`Self::encode_ahead`]), used once the text encoders are released.
    encoded: std::sync::Mutex<std::collections::HashMap<ConditioningKey, (Conditioning, Option<Conditioning>)>>,
    /// Tiled VAE decode and encode.
    pub vae_tiling: VaeTilingMode,
    /// The borders the last generation wrapped; the VAE passes that follow it (decode, hires
    /// re-encode) and any model read again keep them.
    seamless: ConvBorders,
    vae_dtype: DType,
    pub scheduler_config: Value,
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    pub dtype: DType,
    /// What the user named, for metadata.
    pub source: String,
}

/// Sets LoRA layer weights before each UNet pass: the mixing engine's hook into sampling.
pub trait StepMixer {
    /// UNet passes for step `step` of `steps` at `timestep`: 1, or one per LoRA (Composite).
    fn passes(&mut self, step: usize, steps: usize, timestep: f64) -> Result<usize>;
    /// Sets every layer's branch weights for pass `pass` of step `step`.
    fn apply(&mut self, step: usize, pass: usize) -> Result<()>;
    /// Asymmetric CFG: the unconditional half of the batch runs on the base weights (in a pass
    /// of its own, after [`Self::apply_base`]) and only the conditional half with the LoRAs.
    fn asymmetric_cfg(&self) -> bool {
        false
    }
    /// Sets the LoRA branches for the unconditional pass: off (the base model), or the share of
    /// their weights the strategy keeps there.
    fn apply_base(&mut self) -> Result<()> {
        Ok(())
    }
    /// The latent's height and width, the UNet batch (rows) and whether it is a CFG batch
    /// (unconditional rows first), before the first step.
    fn begin(&mut self, _latent_hw: (usize, usize), _rows: usize, _cfg: bool) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None` = no negative prompt (zeros when the model forces them); `Some("")` encodes the
    /// empty string, exactly as diffusers distinguishes `negative_prompt=None` and `""`.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub cfg: f64,
    /// `None`: the model folder's own scheduler.
    pub sampler: Option<SamplerKind>,
    /// A1111's schedule type on top of the sampler (`Default`: the sampler's own).
    pub schedule: Schedule,
    /// diffusers' `clip_skip`: 0 = SDXL's penultimate layer; A1111's "Clip skip" is this + 1.
    pub clip_skip: usize,
    pub seed: u64,
    /// Whether the batch's images share one generator (diffusers) or take A1111's seeds.
    pub batch_seeds: BatchSeeds,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub batch_size: usize,
    /// Unscaled standard-normal noise `[batch, 4, H/f, W/f]` (diffusers' `latents=`).
    pub init_noise: Option<Tensor>,
    /// img2img / inpainting: start from this image (at the output size) instead of noise.
    pub init: Option<InitImage>,
    /// Textual-inversion embeddings the prompts may call by name.
    pub embeddings: Embeddings,
    /// diffusers' `timestep_spacing` in place of the model's scheduler config (`trailing` is
    /// what SDXL Lightning, Turbo and Hyper-SD's model cards set for few-step sampling).
    pub timestep_spacing: Option<String>,
    /// A1111's variation seed: the starting noise (the noise added to an init image) moved
    /// toward another seed's.
    pub variation: Option<Variation>,
    /// A1111's "Resize seed from" (width, height in pixels): the seed's noise as it is at that
    /// size, centred in this one ([`crate::rng::first_noise`]).
    pub seed_resize_from: Option<(usize, usize)>,
    /// A1111's "Eta noise seed delta" (ENSD): once the starting noise is drawn, the noise of
    /// later steps comes from generators seeded with each image's seed plus this.
    pub eta_noise_seed_delta: i64,
    /// Seamless (tileable) images: the UNet's and the VAE's convolutions wrap these borders.
    pub seamless: Seamless,
    /// ControlNet and T2I-Adapter units; their residuals add up (diffusers'
    /// `MultiControlNetModel` and `MultiAdapter`).
    pub control: Vec<ControlUnit>,
    /// A1111's hires-fix pass: (the first pass's steps, the steps this pass runs). Prompt
    /// editing then counts on from the first pass, over the steps run
    /// ([`prompt_schedule::WhenOffset::hires`]).
    pub hires_of: Option<(usize, usize)>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 30,
            cfg: 5.0,
            sampler: None,
            schedule: Schedule::Default,
            clip_skip: 0,
            seed: 0,
            batch_seeds: BatchSeeds::Shared,
            width: None,
            height: None,
            batch_size: 1,
            init_noise: None,
            init: None,
            embeddings: Embeddings::default(),
            timestep_spacing: None,
            variation: None,
            seed_resize_from: None,
            eta_noise_seed_delta: 0,
            seamless: Seamless::OFF,
            control: Vec::new(),
            hires_of: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepProgress {
    pub step: usize,
    pub steps: usize,
    pub elapsed: Duration,
    /// The sample after this step (for previews).
    pub latents: Option<Tensor>,
    /// The clean latents this step predicted (the sampler's x0), where the sampler gives them:
    /// A1111 decodes these when a run is interrupted.
    pub denoised: Option<Tensor>,
}

fn wrap(label: &str, e: candle_core::Error) -> Error {
    Error::Model { path: PathBuf::from(label), message: e.to_string() }
}

/// The VAE's weights and config: the model's own, or `--vae`'s (a folder brings its own config;
/// a file uses the model's).
fn vae_source(root: &Path, single_file: Option<&Path>, opts: &LoadOptions, model_cfg: &AutoencoderKlConfig) -> Result<(crate::weights::WeightSource, AutoencoderKlConfig)> {
    match &opts.vae {
        None => {
            let ws = match single_file {
                Some(f) => model::open_single_file(f, root)?.vae,
                None => model::open_component(root, "vae")?.1,
            };
            Ok((ws, model_cfg.clone()))
        }
        Some(p) if p.is_dir() => {
            let (config, ws) = model::open_component(p.parent().unwrap_or(Path::new(".")), p.file_name().and_then(|n| n.to_str()).unwrap_or(""))?;
            Ok((ws, model::parse_config(&config)?))
        }
        Some(p) if p.is_file() => Ok((crate::sdxl::checkpoint::open_vae_file(p, model_cfg)?, model_cfg.clone())),
        Some(p) => Err(Error::model(p, "--vae: no such file or folder")),
    }
}

/// diffusers decodes in f32 when the model runs in f16 unless the VAE is fp16-safe; a dtype the
/// user chose wins.
fn vae_dtype_for(opts: &LoadOptions, config: &AutoencoderKlConfig) -> DType {
    match opts.vae_dtype {
        Some(chosen) => chosen,
        None if opts.dtype == DType::F16 && config.force_upcast => DType::F32,
        None => opts.dtype,
    }
}

impl SdxlPipeline {
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        if opts.device.is_cpu() && opts.dtype == DType::BF16 {
            return Err(Error::Argument("bf16 is not supported on the CPU (candle's CPU backend has no bf16 matmul); use --dtype f32 or f16, or bf16 on cuda/metal".into()));
        }
        if opts.device.is_cpu() && opts.vae_dtype == Some(DType::BF16) {
            return Err(Error::Argument("--vae-dtype bf16 is not supported on the CPU (candle's CPU backend has no bf16 matmul); use f32 or f16, or bf16 on cuda/metal".into()));
        }
        match ModelSource::parse(spec)? {
            ModelSource::Folder(dir) => Self::load_folder(&dir, None, opts, spec),
            ModelSource::HubRepo(repo) => {
                let dir = model::fetch_hub_repo(&repo, false)?;
                Self::load_folder(&dir, None, opts, spec)
            }
            ModelSource::SingleFile(file) => {
                // Refuse pickles and broken files before looking for configs.
                crate::weights::SafetensorsFile::open(&file)?;
                let config_root = match &opts.config_dir {
                    Some(d) => d.clone(),
                    None => model::fetch_hub_repo(model::SDXL_BASE_REPO, true).map_err(|e| {
                        Error::model(
                            &file,
                            format!("a single-file checkpoint needs SDXL's configs and tokenizers: pass --config <diffusers folder>, or have {} in the HF cache ({e})", model::SDXL_BASE_REPO),
                        )
                    })?,
                };
                Self::load_folder(&config_root, Some(&file), opts, spec)
            }
        }
    }

    /// `single_file`: take the weights from this checkpoint and only configs/tokenizers from `root`.
    fn load_folder(root: &Path, single_file: Option<&Path>, opts: &LoadOptions, spec: &str) -> Result<Self> {
        let index_path = root.join("model_index.json");
        let index = if index_path.is_file() {
            model::read_json(&index_path)?
        } else if single_file.is_some() {
            Value::Null
        } else {
            return Err(Error::model(root, "not a diffusers model folder: model_index.json is missing"));
        };
        if single_file.is_none() {
            for comp in ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"] {
                if index.get(comp).is_none_or(|v| v.is_null() || v.get(0).is_some_and(Value::is_null)) {
                    return Err(Error::model(&index_path, format!("model_index.json lists no '{comp}': not an SDXL pipeline")));
                }
            }
        }
        for comp in ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"] {
            if !root.join(comp).is_dir() {
                return Err(Error::model(root, format!("component folder '{comp}/' is missing")));
            }
        }
        let dev = &opts.device;
        let dtype = opts.dtype;
        let unet_cfg: UNet2DConditionConfig = model::parse_config(&root.join("unet/config.json"))?;
        let vae_cfg: AutoencoderKlConfig = model::parse_config(&root.join("vae/config.json"))?;
        let te1_cfg: ClipTextConfig = model::parse_config(&root.join("text_encoder/config.json"))?;
        let mut te2_cfg: ClipTextConfig = model::parse_config(&root.join("text_encoder_2/config.json"))?;
        // SDXL's second encoder is always CLIPTextModelWithProjection; accept configs saved
        // without an `architectures` list.
        if te2_cfg.architectures.is_none() {
            te2_cfg.architectures = Some(vec!["CLIPTextModelWithProjection".into()]);
        }
        let (unet_ws, te1_ws, te2_ws) = match single_file {
            Some(f) => {
                let c = model::open_single_file(f, root)?;
                (c.unet, c.text_encoder, c.text_encoder_2)
            }
            None => (
                model::open_component(root, "unet")?.1,
                model::open_component(root, "text_encoder")?.1.with_prefix("text_model.", &["text_projection."]),
                model::open_component(root, "text_encoder_2")?.1.with_prefix("text_model.", &["text_projection."]),
            ),
        };
        let labels = (unet_ws.label().to_string(), te1_ws.label().to_string(), te2_ws.label().to_string());
        // The same loader reads the VAE now (first, so a bad `--vae` fails before the UNet loads)
        // and again after `release_vae`.
        let vae_loader: VaeLoader = {
            let (root, single_file, opts, model_cfg) = (root.to_path_buf(), single_file.map(Path::to_path_buf), opts.clone(), vae_cfg);
            Box::new(move || {
                let (ws, cfg) = vae_source(&root, single_file.as_deref(), &opts, &model_cfg)?;
                let label = ws.label().to_string();
                AutoencoderKl::new(ws.into_var_builder(vae_dtype_for(&opts, &cfg), &opts.device), &cfg).map_err(|e| wrap(&label, e))
            })
        };
        let vae = vae_loader()?;
        let vae_cfg = vae.config().clone();
        let vae_dtype = vae_dtype_for(opts, &vae_cfg);
        let unet_loader: UnetLoader = {
            let (cfg, dev, label) = (unet_cfg.clone(), dev.clone(), labels.0.clone());
            Box::new(move || UNet2DConditionModel::new(unet_ws.into_var_builder(dtype, &dev), &cfg).map_err(|e| wrap(&label, e)))
        };
        let (unet, unet_loader) = if opts.defer_unet { (None, Some(unet_loader)) } else { (Some(unet_loader()?), None) };
        let encoder = ClipTextModel::new(te1_ws.into_var_builder(dtype, dev), &te1_cfg).map_err(|e| wrap(&labels.1, e))?;
        let encoder_2 = ClipTextModel::new(te2_ws.into_var_builder(dtype, dev), &te2_cfg).map_err(|e| wrap(&labels.2, e))?;
        if encoder_2.config().projection_dim.is_none() || !te2_cfg.has_projection() {
            return Err(Error::model(root.join("text_encoder_2"), "expected a CLIPTextModelWithProjection (SDXL's second encoder)"));
        }
        let width = te1_cfg.hidden_size + te2_cfg.hidden_size;
        if width != unet_cfg.cross_attention_dim {
            return Err(Error::model(
                root.join("unet/config.json"),
                format!("cross_attention_dim is {}, but the text encoders give {} + {} = {width}", unet_cfg.cross_attention_dim, te1_cfg.hidden_size, te2_cfg.hidden_size),
            ));
        }
        let scheduler_config = model::read_json(&root.join("scheduler/scheduler_config.json"))?;
        let text = TextEncoders {
            tokenizer: ClipTokenizer::from_dir(&root.join("tokenizer"))?,
            encoder,
            tokenizer_2: Some(ClipTokenizer::from_dir(&root.join("tokenizer_2"))?),
            encoder_2: Some(encoder_2),
            layer_from_end: 1,
            device: dev.clone(),
            dtype,
        };
        Ok(Self {
            text: Some(text),
            unet,
            unet_loader,
            vae: vae.into(),
            vae_loader,
            unet_config: unet_cfg,
            vae_config: vae_cfg,
            encoded: Default::default(),
            vae_tiling: VaeTilingMode::Auto,
            seamless: ConvBorders::default(),
            vae_dtype,
            scheduler_config,
            force_zeros_for_empty_prompt: index.get("force_zeros_for_empty_prompt").and_then(Value::as_bool).unwrap_or(true),
            device: dev.clone(),
            dtype,
            source: spec.to_string(),
        })
    }

    /// The text encoders, unless released.
    pub fn text(&self) -> Result<&TextEncoders> {
        self.text.as_ref().ok_or_else(|| Error::Internal("the text encoders were released after encoding (low memory)".into()))
    }

    /// The UNet, unless released (or not loaded yet).
    pub fn unet(&self) -> Result<&UNet2DConditionModel> {
        self.unet.as_ref().ok_or_else(|| match self.unet_loader {
            Some(_) => Error::Argument("the UNet is not loaded yet (deferred load: call load_unet)".into()),
            None => Error::Internal("the UNet was released after denoising (low memory)".into()),
        })
    }

    /// Reads a deferred UNet (a no-op when it is loaded).
    pub fn load_unet(&mut self) -> Result<()> {
        if let Some(load) = self.unet_loader.take() {
            let unet = load()?;
            set_seamless(&unet, self.seamless.get());
            self.unet = Some(unet);
        }
        Ok(())
    }

    /// The text encoders if they are loaded (LoRA targets attach to what is there).
    pub fn loaded_text(&self) -> Option<&TextEncoders> {
        self.text.as_ref()
    }

    pub fn loaded_unet(&self) -> Option<&UNet2DConditionModel> {
        self.unet.as_ref()
    }

    /// The VAE, read again from the model's files if it was released.
    pub fn vae(&self) -> Result<&AutoencoderKl> {
        if let Some(v) = self.vae.get() {
            return Ok(v);
        }
        let v = (self.vae_loader)()?;
        set_seamless(&v, self.seamless.get());
        Ok(self.vae.get_or_init(|| v))
    }

    /// Makes the UNet's and the VAE's convolutions wrap the borders `s` names (A1111's
    /// "Tiling"). [`Self::generate_latents_mixed`] sets its request's; the VAE passes after it
    /// keep that.
    pub fn set_seamless(&self, s: Seamless) {
        self.seamless.set(s);
        if let Some(u) = &self.unet {
            set_seamless(u, s);
        }
        if let Some(v) = self.vae.get() {
            set_seamless(v, s);
        }
    }

    pub fn unet_config(&self) -> &UNet2DConditionConfig {
        &self.unet_config
    }

    pub fn vae_config(&self) -> &AutoencoderKlConfig {
        &self.vae_config
    }

    /// Encodes every prompt and negative prompt `req` will use (each entry of their prompt
    /// editing schedules), so that the text encoders can be released before denoising.
    pub fn encode_ahead(&self, req: &GenerateRequest) -> Result<()> {
        let cfg = req.cfg > 1.0;
        let pos = prompt_schedule::prompt_schedule(&req.prompt, req.steps)?;
        let neg = req.negative_prompt.as_deref().map(|n| prompt_schedule::prompt_schedule(n, req.steps)).transpose()?;
        for k in 0..req.steps.max(1) {
            let p = &pos[prompt_schedule::entry_at(&pos, k)].1;
            let n = neg.as_ref().map(|s| s[prompt_schedule::entry_at(s, k)].1.as_str());
            let key: ConditioningKey = (p.clone(), n.map(str::to_string), cfg, req.clip_skip, req.embeddings.fingerprint());
            if self.encoded().contains_key(&key) {
                continue;
            }
            let c = self.encode_prompts_with(p, n, cfg, req.clip_skip, &req.embeddings)?;
            self.encoded().insert(key, c);
        }
        Ok(())
    }

    /// The conditioning encoded ahead. A poisoned lock only means another thread panicked; the
    /// entries are whole values, so they stay usable.
    fn encoded(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ConditioningKey, (Conditioning, Option<Conditioning>)>> {
        self.encoded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the text encoders' weights; prompts encoded ahead stay usable.
    pub fn release_text_encoders(&mut self) {
        self.text = None;
        crate::weights::return_freed_memory();
    }

    /// Drops the UNet's weights (after the last denoising pass).
    pub fn release_unet(&mut self) {
        self.unet = None;
        crate::weights::return_freed_memory();
    }

    /// Drops the VAE's weights; the next VAE pass reads them again.
    pub fn release_vae(&mut self) {
        self.vae.take();
        crate::weights::return_freed_memory();
    }

    /// The dtype the VAE runs in (f32 when an f16 model's VAE must be upcast).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downscale()
    }

    pub fn default_size(&self) -> (usize, usize) {
        let s = self.unet_config.sample_size.unwrap_or(128) * self.vae_scale_factor();
        (s, s)
    }

    pub fn default_sampler(&self) -> Result<SamplerKind> {
        SamplerKind::from_config(&self.scheduler_config)
    }

    /// Positive and negative conditioning, as `encode_prompt` builds them.
    pub fn encode_prompts(&self, prompt: &str, negative: Option<&str>, cfg: bool) -> Result<(Conditioning, Option<Conditioning>)> {
        self.encode_prompts_skip(prompt, negative, cfg, 0)
    }

    /// [`Self::encode_prompts`] with diffusers' `clip_skip` on the prompt. diffusers encodes the
    /// negative prompt from the penultimate layer whatever `clip_skip` is; so do we, to give
    /// its numbers (A1111 skips on both).
    pub fn encode_prompts_skip(&self, prompt: &str, negative: Option<&str>, cfg: bool, clip_skip: usize) -> Result<(Conditioning, Option<Conditioning>)> {
        self.encode_prompts_with(prompt, negative, cfg, clip_skip, &Embeddings::default())
    }

    /// [`Self::encode_prompts_skip`] with textual-inversion embeddings, in both prompts as
    /// diffusers' `maybe_convert_prompt` applies them.
    pub fn encode_prompts_with(
        &self,
        prompt: &str,
        negative: Option<&str>,
        cfg: bool,
        clip_skip: usize,
        embeddings: &Embeddings,
    ) -> Result<(Conditioning, Option<Conditioning>)> {
        let Some(text) = &self.text else {
            let key: ConditioningKey = (prompt.to_string(), negative.map(str::to_string), cfg, clip_skip, embeddings.fingerprint());
            let cached = self.encoded().get(&key).cloned();
            return cached.ok_or_else(|| Error::Internal(format!("the text encoders were released (low memory) before the prompt {prompt:?} was encoded")));
        };
        let pos = text.encode_with(prompt, clip_skip, embeddings)?;
        if !cfg {
            return Ok((pos, None));
        }
        let (neg, zero) = match negative {
            None if self.force_zeros_for_empty_prompt => (TextEncoders::zeros_like(&pos)?, true),
            other => (text.encode_with(other.unwrap_or(""), 0, embeddings)?, false),
        };
        let (pos, neg) = text.match_lengths(pos, neg, zero)?;
        Ok((pos, Some(neg)))
    }

    /// Runs the denoising loop and returns the final latents (before VAE scaling/decoding).
    /// `on_step` is called after every step; returning `false` cancels.
    pub fn generate_latents(&self, req: &GenerateRequest, on_step: &mut dyn FnMut(&StepProgress) -> bool) -> Result<Tensor> {
        self.generate_latents_mixed(req, None, on_step)
    }

    /// [`Self::generate_latents`] with a mixer that sets the LoRA layer weights before every
    /// UNet pass. A step with several passes (LoRA Composite) averages their noise predictions
    /// — unconditional and conditional halves separately, since they are batched — before CFG.
    pub fn generate_latents_mixed(
        &self,
        req: &GenerateRequest,
        mut mixer: Option<&mut dyn StepMixer>,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let (dw, dh) = self.default_size();
        let (width, height) = (req.width.unwrap_or(dw), req.height.unwrap_or(dh));
        if width == 0 || height == 0 || width % f != 0 || height % f != 0 {
            return Err(Error::Argument(format!("width and height must be positive multiples of {f}, got {width}x{height}")));
        }
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(Error::Argument(format!("size {width}x{height}: expected at most {MAX_SIDE} pixels a side")));
        }
        if req.batch_size == 0 {
            return Err(Error::Argument("batch size must be at least 1".into()));
        }
        if !req.cfg.is_finite() {
            return Err(Error::Argument(format!("cfg must be a finite number, got {}", req.cfg)));
        }
        let b = req.batch_size;
        let unet = self.unet()?;
        if !req.seamless.is_off() && matches!(self.vae_tiling, VaeTilingMode::On(_)) {
            return Err(Error::Argument(SEAMLESS_UNTILED.into()));
        }
        self.set_seamless(req.seamless);
        for (k, unit) in req.control.iter().enumerate() {
            unit.validate()?;
            unit.check_size((width, height), self.vae_scale_factor()).map_err(|e| Error::Argument(format!("controlnet unit {k}: {e}")))?;
            set_seamless(unit.model.as_adaptable(), req.seamless);
        }
        let latent_channels = self.vae_config.latent_channels;
        let in_channels = self.unet_config.in_channels;
        // diffusers' inpainting UNets take [latents, mask, masked-image latents] (4 + 1 + 4).
        let inpaint_unet = in_channels == 2 * latent_channels + 1;
        if in_channels != latent_channels && !inpaint_unet {
            return Err(Error::Argument(format!(
                "the UNet takes {in_channels} input channels; expected {latent_channels} (a regular UNet) or {} (an inpainting UNet)",
                2 * latent_channels + 1
            )));
        }
        // img2img on an inpainting UNet conditions on an all-white mask (A1111's
        // `inpainting_image_conditioning` with no mask: `new_ones`), so the whole picture is
        // its to redraw and nothing is pasted back.
        let whole;
        let req = match &req.init {
            Some(i) if inpaint_unet && i.mask.is_none() && i.latents.is_none() && !i.resize_latents => {
                let mut r = req.clone();
                let (iw, ih) = i.image.dimensions();
                if let Some(i) = r.init.as_mut() {
                    i.mask = Some(image::GrayImage::from_pixel(iw, ih, image::Luma([255])));
                }
                whole = r;
                &whole
            }
            _ => req,
        };
        if inpaint_unet && req.init.as_ref().is_none_or(|i| i.mask.is_none()) {
            return Err(Error::Argument("this is an inpainting UNet (9 input channels): it needs an init image (and a mask, or the whole picture is redrawn); a latent start or resize mode 3 is not for it".into()));
        }
        if let Some(init) = &req.init {
            init.validate(width, height)?;
            let (iw, ih) = init.image.dimensions();
            if init.resize_latents && init.latents.is_none() && (iw < f as u32 || ih < f as u32) {
                return Err(Error::Argument(format!("init image is {iw}x{ih}: the VAE needs at least {f}x{f} pixels to encode")));
            }
            // Encoded at its own size, the picture is bound as an output is.
            if init.resize_latents && (iw as usize > MAX_SIDE || ih as usize > MAX_SIDE) {
                return Err(Error::Argument(format!("init image is {iw}x{ih}: resize mode 3 encodes it at that size; expected at most {MAX_SIDE} pixels a side")));
            }
            if req.init_noise.is_some() {
                return Err(Error::Argument("init noise and an init image cannot be combined".into()));
            }
        }
        // A variation at strength 0 is no variation.
        let variation = req.variation.filter(|v| v.strength != 0.0);
        if req.init_noise.is_some() && variation.is_some() {
            return Err(Error::Argument("init noise and a variation seed cannot be combined: the noise is given".into()));
        }
        let (h, w) = (height / f, width / f);
        let shape = [b, latent_channels, h, w];
        // A1111 takes the source size in latents by floor division and ignores it when it is the
        // image's own size.
        let resize_from = match req.seed_resize_from {
            None => None,
            Some((rw, rh)) if rw < f || rh < f || rw > MAX_SIDE || rh > MAX_SIDE => {
                return Err(Error::Argument(format!("resize seed from {rw}x{rh}: expected {f} to {MAX_SIDE} pixels a side")));
            }
            Some((rw, rh)) => Some((rh / f, rw / f)).filter(|&r| r != (h, w)),
        };
        if req.init_noise.is_some() && resize_from.is_some() {
            return Err(Error::Argument("init noise and resize seed from cannot be combined: the noise is given".into()));
        }
        let mut rng = BatchNoise::with_variation(req.seed, b, req.batch_seeds, variation.is_some());
        let sampler = match req.sampler {
            Some(s) => s,
            None => self.default_sampler()?,
        };
        let mut sched = match &req.timestep_spacing {
            None => schedulers::build(sampler, req.schedule, &self.scheduler_config, req.steps)?,
            Some(spacing) => {
                if !["linspace", "leading", "trailing"].contains(&spacing.as_str()) {
                    return Err(Error::Argument(format!("timestep spacing {spacing:?}: expected linspace, leading or trailing")));
                }
                let mut config = self.scheduler_config.clone();
                if let Some(o) = config.as_object_mut() {
                    o.insert("timestep_spacing".into(), Value::String(spacing.clone()));
                }
                schedulers::build(sampler, req.schedule, &config, req.steps)?
            }
        };
        let randn = |rng: &mut BatchNoise, dims: &[usize]| -> Result<Tensor> { Ok(batch_randn(rng, dims)?.to_device(&self.device)?) };
        // The starting noise, as A1111's `ImageRNG.first()`: the seed's, moved toward the
        // variation seed's. Later draws (ancestral noise) continue the seed's generator.
        let first_noise = |rng: &mut BatchNoise| -> Result<Tensor> {
            let noise = crate::rng::first_noise(rng, req.seed, req.batch_seeds, variation, &shape, resize_from)
                .ok_or_else(|| Error::Argument(format!("noise of shape {shape:?} for a batch of {} images with per-image seeds", rng.images())))?;
            Ok(Tensor::from_vec(noise, &shape[..], &Device::Cpu)?.to_device(&self.device)?)
        };
        let mut start_index = 0usize;
        let mut inpaint: Option<InpaintState> = None;
        let mut latents = match &req.init {
            None => {
                let noise = match &req.init_noise {
                    Some(n) => {
                        if n.dims() != shape {
                            return Err(Error::Argument(format!(
                                "init noise has shape {:?}, expected {:?} ([batch, channels, height/{f}, width/{f}])",
                                n.dims(),
                                shape
                            )));
                        }
                        n.to_dtype(DType::F32)?.to_device(&self.device)?
                    }
                    None => first_noise(&mut rng)?,
                };
                (noise * sched.init_noise_sigma())?
            }
            Some(init) => {
                // get_timesteps: strength → how many of the steps run, from entry t_start·order.
                let init_timestep = ((req.steps as f64 * init.strength) as usize).min(req.steps);
                if init_timestep == 0 {
                    return Err(Error::Argument(format!(
                        "strength {} leaves no step to run at {} steps (it runs ⌊steps × strength⌋ steps); raise --strength or --steps",
                        init.strength, req.steps
                    )));
                }
                start_index = (req.steps - init_timestep) * sched.order();
                let pixels = || img2img::image_tensor(&init.image, &self.device);
                match &init.mask {
                    None => {
                        let image_latents = match &init.latents {
                            Some(l) => {
                                if l.dims()[2..] != shape[2..] || l.dim(1)? != latent_channels || (l.dim(0)? != 1 && l.dim(0)? != b) {
                                    return Err(Error::Argument(format!("start latents have shape {:?}, expected [1 or {b}, {latent_channels}, {h}, {w}]", l.dims())));
                                }
                                let l = l.to_dtype(DType::F32)?.to_device(&self.device)?;
                                if l.dim(0)? == b { l } else { l.repeat((b, 1, 1, 1))? }
                            }
                            None if init.resize_latents => {
                                let z = self.encode_sampled(&pixels()?, &mut rng)?;
                                to_batch(super::upscale::interpolate_latents(&z, super::upscale::LatentMode::Bilinear, h, w)?, b)?
                            }
                            None => to_batch(self.encode_sampled(&pixels()?, &mut rng)?, b)?,
                        };
                        let noise = first_noise(&mut rng)?;
                        sched.add_noise(&image_latents, &noise, start_index)?
                    }
                    Some(mask) => {
                        let pixels = pixels()?;
                        let strength_max = init.strength == 1.0;
                        let bin = img2img::binary_mask(mask);
                        // 4-channel UNets blend the re-noised original back in after each step, so
                        // they always need its latents; 9-channel ones only to start from it.
                        let image_latents = if !inpaint_unet || !strength_max {
                            Some(to_batch(self.encode_sampled(&pixels, &mut rng)?, b)?)
                        } else {
                            None
                        };
                        let latent_mask = Tensor::from_vec(img2img::downsample_nearest(&bin, (height, width), (h, w)), (1, 1, h, w), &self.device)?;
                        let image_latents = match (image_latents, init.masked_content) {
                            // A1111's latent noise / latent nothing act on the encoded original.
                            (Some(l), MaskedContent::LatentNoise) => {
                                let n = randn(&mut rng, &shape)?;
                                Some((l.broadcast_mul(&(1.0 - &latent_mask)?)? + n.broadcast_mul(&latent_mask)?)?)
                            }
                            (Some(l), MaskedContent::LatentNothing) => Some(l.broadcast_mul(&(1.0 - &latent_mask)?)?),
                            (l, _) => l,
                        };
                        let noise = first_noise(&mut rng)?;
                        let latents = match (&image_latents, strength_max) {
                            (Some(l), false) => sched.add_noise(l, &noise, start_index)?,
                            _ => (&noise * sched.init_noise_sigma())?,
                        };
                        // The pipeline encodes the masked image (original × (mask < 0.5)) with the
                        // generator even when a 4-channel UNet never reads it: draw its sample so
                        // the noise of later steps stays diffusers'.
                        let masked_latents = if inpaint_unet {
                            let keep = Tensor::from_vec(bin.iter().map(|&m| 1.0 - m).collect::<Vec<f32>>(), (1, 1, height, width), &self.device)?;
                            Some(to_batch(self.encode_sampled(&pixels.broadcast_mul(&keep)?, &mut rng)?, b)?)
                        } else {
                            rng.skip(latent_channels * h * w);
                            None
                        };
                        inpaint = Some(InpaintState { image_latents, noise, mask: latent_mask.repeat((b, 1, 1, 1))?, masked_latents });
                        latents
                    }
                }
            }
        };
        let cfg = req.cfg > 1.0;
        // A1111 prompt editing / alternation: each prompt's text per model call. A1111 counts the
        // calls and builds the schedule over steps × 2 for second-order samplers
        // (`SamplerData.total_steps`, its `step_multiplier`), so an edit lands where it does there.
        let order = sched.order().max(1);
        let (schedule_steps, offset) = match req.hires_of {
            // Both passes sample with the same sampler, so with the same multiplier.
            Some((first, run)) => (run * order, prompt_schedule::WhenOffset::hires(first * order)),
            None => (req.steps * order, Default::default()),
        };
        let pos_schedule = prompt_schedule::prompt_schedule_from(&req.prompt, schedule_steps, offset)?;
        let neg_schedule = req.negative_prompt.as_deref().map(|n| prompt_schedule::prompt_schedule_from(n, schedule_steps, offset)).transpose()?;
        let conditioning = |pi: usize, ni: Option<usize>| -> Result<(Tensor, Option<AddedConditions>)> {
            let neg_text = ni.and_then(|ni| neg_schedule.as_ref().map(|s| s[ni].1.as_str()));
            let (pos, neg) = self.encode_prompts_with(&pos_schedule[pi].1, neg_text, cfg, req.clip_skip, &req.embeddings)?;
            let repeat = |t: &Tensor| Tensor::cat(&vec![t.clone(); b], 0);
            let mut contexts = Vec::new();
            let mut pooled = Vec::new();
            for c in neg.iter().chain(std::iter::once(&pos)) {
                contexts.push(repeat(&c.context)?);
                if let Some(p) = &c.pooled {
                    pooled.push(repeat(p)?);
                }
            }
            // In the UNet's dtype here, once: the UNet keeps its cross-attention keys and values
            // while this very tensor comes back (`ProductMemo`), and a per-call cast would be a
            // new tensor at every step.
            let context = Tensor::cat(&contexts, 0)?.to_dtype(self.dtype)?;
            let rows = context.dim(0)?;
            let added = if unet.uses_added_conditions() {
                let text_embeds = Tensor::cat(&pooled, 0)?;
                let ids = [height as f32, width as f32, 0.0, 0.0, height as f32, width as f32];
                let time_ids = Tensor::from_slice(&ids, (1, 6), &self.device)?.repeat((rows, 1))?;
                Some(AddedConditions { text_embeds, time_ids })
            } else {
                None
            };
            Ok((context, added))
        };
        let entries = |k: usize| (prompt_schedule::entry_at(&pos_schedule, k), neg_schedule.as_ref().map(|s| prompt_schedule::entry_at(s, k)));
        let mut cond_key = entries(0);
        let (mut context, mut added) = conditioning(cond_key.0, cond_key.1)?;
        let rows = context.dim(0)?;
        // The 9-channel UNet's extra input, for both CFG halves.
        let extra_input = match &inpaint {
            Some(InpaintState { mask, masked_latents: Some(ml), .. }) => {
                let e = Tensor::cat(&[mask, ml], 1)?;
                Some(if cfg { Tensor::cat(&[&e, &e], 0)? } else { e })
            }
            _ => None,
        };

        if let Some(m) = mixer.as_deref_mut() {
            m.begin((h, w), rows, cfg)?;
        }
        let mut context_views = RowViews::default();
        // The kept keys and values go with the generation, however it ends.
        let mut kept: Vec<&dyn Adaptable> = vec![unet];
        kept.extend(req.control.iter().map(|u| u.model.as_adaptable()));
        let _forget = ForgetKeptProducts(kept);
        let timesteps = sched.timesteps().to_vec();
        // The mixer counts sampling steps, not model calls: Heun and DPM2 take two entries of
        // the schedule per step (diffusers' `order`; its last step one), so a trace has a row
        // per step and a LoRA's start/stop or window falls where the user's step count puts it.
        let mix_steps = timesteps.len().div_ceil(order);
        let start = Instant::now();
        if req.eta_noise_seed_delta != 0 {
            // A1111's `ImageRNG.first()`: `generators = [create_generator(seed + ENSD) ...]`.
            rng = BatchNoise::with_variation(req.seed.wrapping_add_signed(req.eta_noise_seed_delta), b, req.batch_seeds, variation.is_some());
        }
        let mut draw = |dims: &[usize]| -> Result<Tensor> { batch_randn(&mut rng, dims) };
        // Each unit's control image at this pass's size, for every row, made once (an adapter's
        // features too: it does not see the latent).
        let vae_f = self.vae_scale_factor();
        let uncond = if cfg { b } else { 0 };
        let prepared = req.control.iter().map(|u| u.prepare((h * vae_f, w * vae_f), rows, uncond, &self.device, self.dtype)).collect::<Result<Vec<_>>>()?;
        for (i, &t) in timesteps.iter().enumerate().skip(start_index) {
            // A1111 counts the steps of this run (model calls) from 0.
            let key = entries(i - start_index);
            if key != cond_key {
                (context, added) = conditioning(key.0, key.1)?;
                cond_key = key;
            }
            let input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = sched.scale_model_input(&input, i)?;
            // ControlNets see the 4-channel input (an inpainting UNet's extra channels are its
            // own), with the same text and added conditions, on every row; a unit outside its
            // steps is not run (diffusers runs it at scale 0, which adds exact zeros).
            let mut control: Option<ControlResiduals> = None;
            for (unit, prep) in req.control.iter().zip(&prepared) {
                if !unit.acts_at(i - start_index, timesteps.len() - start_index, (timesteps.len() - start_index).div_ceil(order)) {
                    continue;
                }
                let (model, cond) = match prep {
                    PreparedControl::ControlNet(m, cond) => (m, cond),
                    PreparedControl::Features(r) => {
                        control = Some(match control {
                            None => r.clone(),
                            Some(acc) => acc.add(r)?,
                        });
                        continue;
                    }
                };
                let guess = unit.guess_mode || model.needs_guess_mode();
                let soft = unit.soft();
                let x = input.to_dtype(self.dtype)?;
                let r = if unit.cond_only() && cfg {
                    // diffusers' guess mode runs the ControlNet on the conditional rows only and
                    // gives the unconditional rows zeros; the extension's "ControlNet is more
                    // important" runs all rows and zeroes the unconditional ones: the same.
                    let added_c = match &added {
                        Some(a) => Some(AddedConditions { text_embeds: a.text_embeds.narrow(0, b, b)?, time_ids: a.time_ids.narrow(0, b, b)? }),
                        None => None,
                    };
                    let context_c = context_views.rows(&context, b, b)?;
                    let cond_c = cond.narrow(0, b, b)?;
                    let r = model.forward(&x.narrow(0, b, b)?, t as f32, &context_c, added_c.as_ref(), ControlInput { image: &cond_c, scale: unit.weight, guess, soft })?;
                    let pad = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&t.zeros_like()?, t], 0)?) };
                    ControlResiduals { down: r.down.iter().map(pad).collect::<Result<Vec<_>>>()?, mid: r.mid.as_ref().map(pad).transpose()?, intrablock: Vec::new() }
                } else {
                    model.forward(&x, t as f32, &context, added.as_ref(), ControlInput { image: cond, scale: unit.weight, guess, soft })?
                };
                control = Some(match control {
                    None => r,
                    Some(acc) => acc.add(&r)?,
                });
            }
            let input = match &extra_input {
                Some(e) => Tensor::cat(&[&input, e], 1)?,
                None => input,
            }
            .to_dtype(self.dtype)?;
            let passes = match mixer.as_deref_mut() {
                Some(m) => m.passes(i / order, mix_steps, t)?,
                None => 1,
            };
            // Asymmetric CFG: the unconditional rows once on the base weights, then the
            // strategy's passes on the conditional rows only (same FLOPs as the batched pass).
            let asymmetric = cfg && mixer.as_deref().is_some_and(|m| m.asymmetric_cfg());
            let (lo, n) = if asymmetric { (b, b) } else { (0, rows) };
            let (input_rows, context_rows) = (input.narrow(0, lo, n)?, context_views.rows(&context, lo, n)?);
            let added_rows = match &added {
                Some(a) => Some(AddedConditions { text_embeds: a.text_embeds.narrow(0, lo, n)?, time_ids: a.time_ids.narrow(0, lo, n)? }),
                None => None,
            };
            let control_rows = control.as_ref().map(|c| c.rows(lo, n)).transpose()?;
            let mut out: Option<Tensor> = None;
            for pass in 0..passes.max(1) {
                if let Some(m) = mixer.as_deref_mut() {
                    m.apply(i / order, pass)?;
                }
                let o = unet.forward_controlled(&input_rows, t as f32, &context_rows, added_rows.as_ref(), control_rows.as_ref())?.to_dtype(DType::F32)?;
                out = Some(match out {
                    None => o,
                    Some(acc) => (acc + o)?,
                });
            }
            let out = match out {
                Some(o) if passes > 1 => (o / passes as f64)?,
                Some(o) => o,
                None => return Err(Error::Internal("no UNet pass ran".into())),
            };
            let out = match mixer.as_deref_mut() {
                Some(m) if asymmetric => {
                    m.apply_base()?;
                    let added_u = match &added {
                        Some(a) => Some(AddedConditions { text_embeds: a.text_embeds.narrow(0, 0, b)?, time_ids: a.time_ids.narrow(0, 0, b)? }),
                        None => None,
                    };
                    let control_u = control.as_ref().map(|c| c.rows(0, b)).transpose()?;
                    let u = unet
                        .forward_controlled(&input.narrow(0, 0, b)?, t as f32, &context_views.rows(&context, 0, b)?, added_u.as_ref(), control_u.as_ref())?
                        .to_dtype(DType::F32)?;
                    Tensor::cat(&[u, out], 0)?
                }
                _ => out,
            };
            let guided = if cfg {
                let uncond = out.narrow(0, 0, b)?;
                let text = out.narrow(0, b, b)?;
                (&uncond + ((text - &uncond)? * req.cfg)?)?
            } else {
                out
            };
            latents = sched.step(&guided, i, &latents, &mut draw)?;
            // 4-channel inpainting: outside the mask, the original re-noised to the next step.
            if let Some(InpaintState { image_latents: Some(orig), noise, mask, masked_latents: None }) = &inpaint {
                let proper = if i + 1 < timesteps.len() { sched.add_noise(orig, noise, i + 1)? } else { orig.clone() };
                latents = (proper.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?;
            }
            let progress = StepProgress {
                step: i + 1 - start_index,
                steps: timesteps.len() - start_index,
                elapsed: start.elapsed(),
                latents: Some(latents.clone()),
                denoised: sched.denoised().cloned(),
            };
            if !on_step(&progress) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Pixels `[n, 3, H, W]` in [-1, 1] → scaled latents, sampling the VAE's posterior with
    /// the run's generator (`retrieve_latents(vae.encode(x), generator)` then the scaling,
    /// with `latents_mean`/`latents_std` where the VAE has them). With per-image seeds each
    /// image of the batch samples its own posterior (one image is encoded once for them all),
    /// as diffusers does with a list of generators.
    pub fn encode_sampled(&self, pixels: &Tensor, rng: &mut BatchNoise) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let x = pixels.to_dtype(self.vae_dtype)?;
        let mut dist = match self.vae_tiles(b, h, w)? {
            Some(t) => self.vae()?.encode_tiled(&x, &t)?,
            None => self.vae()?.encode(&x)?,
        };
        if rng.per_image() && b != rng.images() {
            dist.mean = to_batch(dist.mean, rng.images())?;
            dist.logvar = to_batch(dist.logvar, rng.images())?;
        }
        let noise = batch_randn(rng, dist.mean.dims())?.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let z = dist.sample(&noise)?.to_dtype(DType::F32)?;
        let c = &self.vae_config;
        Ok(match (&c.latents_mean, &c.latents_std) {
            (Some(m), Some(s)) => {
                let n = m.len();
                let m = Tensor::from_vec(m.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, n, 1, 1), z.device())?;
                let s = Tensor::from_vec(s.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, n, 1, 1), z.device())?;
                (z.broadcast_sub(&m)?.broadcast_div(&s)? * c.scaling_factor)?
            }
            _ => (z * c.scaling_factor)?,
        })
    }

    /// Final latents → RGB images, with diffusers' scaling and post-processing.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let c = &self.vae_config;
        let z = latents.to_dtype(DType::F32)?;
        let z = match (&c.latents_mean, &c.latents_std) {
            (Some(m), Some(s)) => {
                let n = m.len();
                let m = Tensor::from_vec(m.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, n, 1, 1), z.device())?;
                let s = Tensor::from_vec(s.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, n, 1, 1), z.device())?;
                (z.broadcast_mul(&s)? / c.scaling_factor)?.broadcast_add(&m)?
            }
            _ => (z / c.scaling_factor)?,
        };
        let (b, _, h, w) = z.dims4()?;
        let f = c.downscale();
        let z = z.to_dtype(self.vae_dtype)?;
        let pixels = match self.vae_tiles(b, h * f, w * f)? {
            Some(t) => self.vae()?.decode_tiled(&z, &t)?,
            None => self.vae()?.decode(&z)?,
        };
        to_images(&pixels.to_dtype(DType::F32)?)
    }

    /// The tiles of a VAE pass ([`Self::vae_plan`]). Tiles cut the wrap-around that seamless
    /// images need, so tiles the user asked for are refused under it (auto tiling stands down).
    fn vae_tiles(&self, batch: usize, height: usize, width: usize) -> Result<Option<VaeTiling>> {
        match self.vae_plan(batch, height, width).tiling {
            Some(_) if !self.seamless.get().is_off() => Err(Error::Argument(SEAMLESS_UNTILED.into())),
            t => Ok(t),
        }
    }

    /// How the VAE will run on `batch` images of `height`×`width` pixels under [`Self::vae_tiling`].
    /// Auto tiles when the whole pass would take more than ¾ of the free memory, with the
    /// VAE's default tiles halved (down to 256 pixels) until one tile fits.
    pub fn vae_plan(&self, batch: usize, height: usize, width: usize) -> VaePlan {
        let c = &self.vae_config;
        match self.vae_tiling {
            VaeTilingMode::Off => VaePlan { tiling: None, note: None },
            VaeTilingMode::On(None) => VaePlan { tiling: Some(VaeTiling::for_config(c)), note: None },
            VaeTilingMode::On(Some(px)) => VaePlan { tiling: Some(VaeTiling::with_tile_size(c, px)), note: None },
            VaeTilingMode::Auto => {
                let need = vae_working_bytes(c, batch, height, width);
                let free = available_memory();
                let gb = |b: u64| b as f64 / 1e9;
                if free == 0 || need <= free / 4 * 3 {
                    return VaePlan { tiling: None, note: None };
                }
                // Seamless images need the whole image in one VAE pass, whatever the memory.
                if !self.seamless.get().is_off() {
                    let note = format!(
                        "seamless tiling: the VAE decodes {width}x{height} x{batch} in one piece (its tiles would not wrap around), about {:.1} GB with {:.1} GB free",
                        gb(need),
                        gb(free)
                    );
                    return VaePlan { tiling: None, note: Some(note) };
                }
                let mut tiling = VaeTiling::for_config(c);
                while tiling.sample_tile > 256 && (tiling.sample_tile >= height.max(width) || vae_working_bytes(c, batch, tiling.sample_tile, tiling.sample_tile) > free / 4 * 3) {
                    tiling = VaeTiling::with_tile_size(c, tiling.sample_tile / 2);
                }
                let note = format!(
                    "tiled VAE: {width}x{height} x{batch} would need about {:.1} GB and {:.1} GB is free, so the VAE works in tiles of {} pixels (diffusers' enable_vae_tiling; --vae-tiling off to refuse)",
                    gb(need),
                    gb(free),
                    tiling.sample_tile
                );
                VaePlan { tiling: Some(tiling), note: Some(note) }
            }
        }
    }
}

/// The row ranges of one context tensor that a generation's UNet calls read, each made once: the
/// UNet keeps its cross-attention keys and values while the same context tensor comes back
/// (`loramix_models::adapter::ProductMemo`), and a fresh `narrow` at every step would be a new
/// tensor each time. A new context (a prompt-editing step) starts a new set.
#[derive(Default)]
struct RowViews {
    source: Option<candle_core::TensorId>,
    views: Vec<((usize, usize), Tensor)>,
}

impl RowViews {
    fn rows(&mut self, context: &Tensor, lo: usize, n: usize) -> Result<Tensor> {
        if self.source != Some(context.id()) {
            self.source = Some(context.id());
            self.views.clear();
        }
        if let Some((_, t)) = self.views.iter().find(|(k, _)| *k == (lo, n)) {
            return Ok(t.clone());
        }
        let t = context.narrow(0, lo, n)?;
        self.views.push(((lo, n), t.clone()));
        Ok(t)
    }
}

/// Drops the UNet's kept cross-attention products when a generation ends, however it ends, so
/// that a resident model does not hold the last prompt's keys and values between generations.
struct ForgetKeptProducts<'a>(Vec<&'a dyn Adaptable>);

impl Drop for ForgetKeptProducts<'_> {
    fn drop(&mut self) {
        for m in &self.0 {
            loramix_models::adapter::forget_kept_products(*m);
        }
    }
}

/// What a mask-driven run carries from its start into every step.
struct InpaintState {
    /// The encoded original (4-channel UNets blend it back in after each step).
    image_latents: Option<Tensor>,
    /// The start noise, reused to re-noise the original to each next step.
    noise: Tensor,
    /// `[b, 1, h, w]`, 1 = repaint.
    mask: Tensor,
    /// 9-channel UNets: the latents of the original with the masked area grey.
    masked_latents: Option<Tensor>,
}

/// `[b, 3, h, w]` in [-1, 1] → 8-bit RGB, rounding as diffusers' `numpy_to_pil` does.
pub fn to_images(pixels: &Tensor) -> Result<Vec<image::RgbImage>> {
    let x = ((pixels / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.round()?.to_dtype(DType::U8)?.permute((0, 2, 3, 1))?.contiguous()?.to_device(&Device::Cpu)?;
    let (b, h, w, _) = x.dims4()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let data: Vec<u8> = x.get(i)?.flatten_all()?.to_vec1()?;
        out.push(image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| Error::Internal("image buffer size mismatch".into()))?);
    }
    Ok(out)
}

/// `dims` of standard normals on the host, drawn by the batch's seed convention.
fn batch_randn(rng: &mut BatchNoise, dims: &[usize]) -> Result<Tensor> {
    let values = rng
        .randn(dims)
        .ok_or_else(|| Error::Argument(format!("noise of shape {dims:?} for a batch of {} images with per-image seeds", rng.images())))?;
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// One image's latents repeated to the batch (a batch already that size is kept).
fn to_batch(t: Tensor, b: usize) -> Result<Tensor> {
    match t.dim(0)? {
        n if n == b => Ok(t),
        1 => Ok(t.repeat((b, 1, 1, 1))?),
        n => Err(Error::Argument(format!("latents of {n} images for a batch of {b}"))),
    }
}
