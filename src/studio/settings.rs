//! What a job is: one serialisable [`Settings`] per job (the app's form, the CLI's flags, a batch
//! line), and what each image's PNG records beside it.

use serde::{Deserialize, Serialize};

use crate::mix;
use crate::rng::BatchSeeds;
use crate::sdxl::controlnet::ControlMode;
use crate::sdxl::img2img::{MaskedContent, ResizeMode};

/// One LoRA of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSetting {
    /// A path, a LoRA shipped with the model (`<model>/loras/NAME`), or a library name.
    pub name: String,
    /// Absent in a manifest line: 1, as `--lora NAME` and `<lora:NAME>`.
    #[serde(default = "one")]
    pub weight: f64,
    /// subject | style | concept; `None`: from the file's metadata or the library.
    #[serde(default)]
    pub role: Option<String>,
    /// What follows the name in a `<lora:NAME:...>` tag when it says more than one weight:
    /// te/unet weights, loractl keyframes (`0.2@0,1@0.5`), lbw block weights and steps
    /// (`1:lbw=SDXL-OUTALL:start=5`). Overrides `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// Everything that determines a job's images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    /// An empty negative prompt is encoded as the empty string (`--negative-prompt ""`,
    /// diffusers' `negative_prompt=""`). False: an empty one means none, which SDXL models with
    /// `force_zeros_for_empty_prompt` answer with zero embeddings (diffusers' `None`, A1111's
    /// empty field). The two give different images, so a record must say which.
    #[serde(skip_serializing_if = "is_false")]
    pub encode_empty_negative: bool,
    pub steps: usize,
    pub cfg: f64,
    /// Ours (`euler_a`) or A1111's (`Euler a`) name; empty: the model's scheduler.
    pub sampler: String,
    /// A1111's schedule type (`karras`, `exponential`, `beta`, `sgm_uniform`, `ays`); empty:
    /// the sampler's own.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub schedule: String,
    /// A VAE in place of the model's: a diffusers `vae/` folder or a `.safetensors` file; empty: the model's.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub vae: String,
    /// diffusers' `clip_skip` (0: SDXL's penultimate layer). PNGs write A1111's `Clip skip: N+1`.
    #[serde(skip_serializing_if = "is_zero")]
    pub clip_skip: usize,
    /// Seamless (tileable) images: `xy` is A1111's "Tiling" (every convolution wraps around),
    /// `x` / `y` wrap one axis (InvokeAI's "Seamless X/Y"); empty: off. A manifest may also say
    /// `true` / `false`, as A1111's API does.
    #[serde(skip_serializing_if = "String::is_empty", deserialize_with = "tiling_field")]
    pub tiling: String,
    /// diffusers' `timestep_spacing` over the model's scheduler config (`trailing` for
    /// Lightning / Turbo / Hyper-SD); empty: the model's.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub timestep_spacing: String,
    /// The model's dtype for this job (`f16`, `bf16`); empty: the runner's (`--dtype`, f32 by
    /// default). Recorded because f16 and f32 give different pixels.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub dtype: String,
    /// `None`: a random seed per job.
    pub seed: Option<u64>,
    /// A1111's variation seed ("Variation seed"; the API's `subseed`): with a strength above 0,
    /// each image's starting noise moves toward this seed's. Image k of the job takes subseed + k
    /// while every image keeps the job's seed, as in A1111. `None`: a random one per job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subseed: Option<u64>,
    /// "Variation seed strength", 0 (off) to 1 (the variation seed's noise).
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub subseed_strength: f64,
    /// A1111's "Resize seed from width / height" (pixels; 0: off): each seed's noise as it is at
    /// that size, centred in this one, so a seed found at one size keeps its composition.
    #[serde(skip_serializing_if = "is_zero")]
    pub seed_resize_from_w: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub seed_resize_from_h: usize,
    /// A1111's "Eta noise seed delta" (ENSD; 31337 is NovelAI's): the noise that ancestral and
    /// SDE samplers draw between steps comes from each image's seed plus this. 0: off.
    #[serde(skip_serializing_if = "is_zero_i64")]
    pub eta_noise_seed_delta: i64,
    /// 0: the model's default size.
    pub width: usize,
    pub height: usize,
    /// Batches run one after another, each `batch_size` images at once; seeds advance per batch.
    pub batch_count: usize,
    pub batch_size: usize,
    /// How a batch's images take their noise. Absent: shared, which is what every record made
    /// before the choice existed used; the app and the API ask for A1111's per-image seeds.
    #[serde(skip_serializing_if = "is_shared")]
    pub batch_seeds: BatchSeeds,
    pub loras: Vec<LoraSetting>,
    /// merge | switch | composite | klora | est | np | windows | auto
    pub mix: String,
    pub klora_pattern: Option<String>,
    pub switch_every: usize,
    /// `windows`: step windows per role (`subject=0:0.7,style=0.3:1`).
    pub windows: Option<String>,
    /// The unconditional pass on the base weights (any per-step strategy).
    pub asymmetric_cfg: bool,
    /// Corrected K-LoRA on the layers it does not select on: follow (default) | merge.
    pub klora_others: Option<String>,
    /// K-LoRA / EST-LoRA: `corrected` (`None`, the default) or `reference`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub klora_mode: Option<String>,
    /// NP-LoRA's projection strength μ; `None`: the strategy's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub np_mu: Option<f64>,
    /// Add the library's LoRAs the prompt calls for.
    pub candidates: bool,
    /// A1111's hires fix; `None`: one pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresSettings>,
    /// img2img and inpainting (A1111's img2img tab); `None`: text to image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSettings>,
    /// A1111's "SD upscale" script over the img2img job (`init`): tiles of `width × height`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sd_upscale: Option<SdUpscaleSettings>,
    /// A1111 styles applied by name from `<library>/styles.csv`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub styles: Vec<String>,
    /// Textual-inversion embedding files or folders beside the model's and the library's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<String>,
    /// ControlNet units (sd-webui-controlnet's); their residuals add up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controlnet: Vec<ControlNetSetting>,
}

/// One ControlNet unit, with sd-webui-controlnet's names. A misspelt field is an error, not a
/// default silently used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlNetSetting {
    /// A diffusers ControlNet folder, one `.safetensors` in diffusers names, or a hub repo id.
    pub model: String,
    /// The picture the preprocessor reads (or the control map itself, with `none`).
    pub image: String,
    /// The preprocessor ("Module"): none | canny | invert.
    pub module: String,
    /// "Control Weight" (diffusers' `controlnet_conditioning_scale`).
    pub weight: f64,
    /// "Starting / Ending Control Step", fractions of the steps.
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// How the map fits the image's size; sd-webui-controlnet's default is crop and resize.
    pub resize_mode: ResizeMode,
    /// The preprocessor's "Threshold A / B" (canny: low and high; `None`: 100 and 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_a: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_b: Option<f64>,
    /// diffusers' `guess_mode` (the extension's old `guessmode`): the unit guides the
    /// conditional half of CFG only, with its residuals scaled from 0.1 to 1.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub guess_mode: bool,
    /// The extension's "Control Mode" (`balanced`, `prompt`, `control`; its labels and numbers
    /// are read too).
    #[serde(skip_serializing_if = "ControlMode::is_balanced")]
    pub control_mode: ControlMode,
}

impl Default for ControlNetSetting {
    fn default() -> Self {
        Self {
            model: String::new(),
            image: String::new(),
            module: "none".into(),
            weight: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            resize_mode: ResizeMode::CropAndResize,
            threshold_a: None,
            threshold_b: None,
            guess_mode: false,
            control_mode: ControlMode::Balanced,
        }
    }
}

/// Hires fix, with A1111's names (`Hires upscale`, `Hires upscaler`, `Hires steps`,
/// `Denoising strength`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HiresSettings {
    pub scale: f64,
    /// `Latent`, `Latent (bicubic antialiased)`, `Lanczos`, … (see `sdxl::upscale`).
    pub upscaler: String,
    /// Steps of the second pass; 0: as many as the first.
    pub steps: usize,
    pub denoise: f64,
}

impl Default for HiresSettings {
    fn default() -> Self {
        Self { scale: 2.0, upscaler: "Latent".into(), steps: 0, denoise: 0.7 }
    }
}

/// A1111's "SD upscale" script (`scripts/sd_upscale.py`): its "Scale Factor", "Tile overlap"
/// and "Upscaler".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SdUpscaleSettings {
    pub scale: f64,
    /// Pixels each tile shares with its neighbours, blended across.
    pub overlap: usize,
    /// `None` (the image as it is), `Lanczos`, `Nearest`, or an ESRGAN-family model.
    pub upscaler: String,
}

impl Default for SdUpscaleSettings {
    fn default() -> Self {
        Self { scale: 2.0, overlap: 64, upscaler: "None".into() }
    }
}

/// "Inpaint area".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InpaintArea {
    #[default]
    WholePicture,
    /// The mask's padded bounding box is cropped, generated at the output size and pasted back.
    OnlyMasked,
}

/// img2img / inpainting inputs with A1111's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InitSettings {
    /// The init image's path.
    pub image: String,
    /// "Denoising strength", in [0, 1].
    pub strength: f64,
    /// White = repaint; `None`: img2img.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// "Mask blur" (Gaussian sigma, pixels).
    pub mask_blur: f64,
    pub masked_content: MaskedContent,
    pub inpaint_area: InpaintArea,
    /// "Only masked padding, pixels".
    pub padding: u32,
    /// Outpainting: grow the canvas by left, top, right, bottom pixels and repaint the border.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outpaint: Option<[u32; 4]>,
    /// How an init image of another shape fits the output size (A1111's "Resize mode").
    #[serde(skip_serializing_if = "is_just_resize")]
    pub resize_mode: ResizeMode,
}

impl Default for InitSettings {
    fn default() -> Self {
        Self {
            image: String::new(),
            strength: 0.75,
            mask: None,
            mask_blur: 4.0,
            masked_content: MaskedContent::Original,
            inpaint_area: InpaintArea::WholePicture,
            padding: 32,
            outpaint: None,
            resize_mode: ResizeMode::JustResize,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: "models/miniworld".into(),
            prompt: String::new(),
            negative_prompt: String::new(),
            encode_empty_negative: false,
            steps: 25,
            cfg: 5.0,
            sampler: String::new(),
            schedule: String::new(),
            clip_skip: 0,
            tiling: String::new(),
            seed_resize_from_w: 0,
            seed_resize_from_h: 0,
            eta_noise_seed_delta: 0,
            timestep_spacing: String::new(),
            vae: String::new(),
            dtype: String::new(),
            seed: None,
            subseed: None,
            subseed_strength: 0.0,
            width: 0,
            height: 0,
            batch_count: 1,
            batch_size: 1,
            batch_seeds: BatchSeeds::Shared,
            loras: vec![],
            mix: "merge".into(),
            klora_pattern: None,
            switch_every: 5,
            windows: None,
            asymmetric_cfg: false,
            klora_others: None,
            klora_mode: None,
            np_mu: None,
            candidates: false,
            init: None,
            sd_upscale: None,
            hires: None,
            styles: vec![],
            embeddings: vec![],
            controlnet: vec![],
        }
    }
}

/// What each image's PNG records besides the settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub settings: Settings,
    /// The seed this image restores from: its own with per-image seeds (A1111's "Seed"), its
    /// batch's with a shared generator.
    pub seed: u64,
    pub batch_index: usize,
    pub index_in_batch: usize,
    pub width: usize,
    pub height: usize,
    pub sampler: String,
    /// A1111's `Schedule type` label; empty: the sampler's own schedule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schedule: String,
    pub lora_hashes: Vec<(String, String)>,
    /// This image's variation seed (with per-image seeds its own, as `seed`), when the settings
    /// have a variation strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subseed: Option<u64>,
    /// A1111's `Model hash` (a single-file checkpoint's short sha256); empty for folders and repo ids.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_hash: String,
    /// A1111's `TI hashes`: the embeddings the prompts called, `(name, shorthash)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ti_hashes: Vec<(String, String)>,
    pub mix_trace: Option<MixSummary>,
    pub version: String,
    /// The prompts as drawn for this image (styles, wildcards and `{a|b}` applied) when they
    /// differ from the settings' templates; the templates and the seed restore them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drawn: Option<DrawnPrompts>,
}

/// The prompts an image was made from after styles and dynamic prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrawnPrompts {
    pub prompt: String,
    pub negative_prompt: String,
}

/// A compact mix trace for PNGs and the heatmap: the strategy and, per step and layer, each
/// LoRA's weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MixSummary {
    pub strategy: String,
    pub loras: Vec<String>,
    pub layers: usize,
    pub steps: usize,
    /// Mean weight per LoRA over steps and layers.
    pub mean_weight: Vec<f64>,
    /// `[step][layer]`: index of the LoRA with the largest weight, -1 where none is on.
    pub dominant: Vec<Vec<i32>>,
    /// `[step][layer]`: that LoRA's weight over the largest weight in the trace, in percent
    /// (soft weights: schedules, block weights, K-LoRA's follow rule).
    #[serde(default)]
    pub intensity: Vec<Vec<u8>>,
    /// LoRAs considered for the prompt and why each was picked or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<mix::candidates::Candidate>,
}

impl MixSummary {
    pub fn of(trace: &mix::MixTrace) -> Self {
        let n = trace.loras.len();
        let mut sum = vec![0.0; n];
        let mut count = 0usize;
        let dominant = trace
            .weights
            .iter()
            .map(|step| {
                step.iter()
                    .map(|w| {
                        count += 1;
                        for (s, x) in sum.iter_mut().zip(w) {
                            *s += x;
                        }
                        let (mut best, mut arg) = (0.0, -1);
                        for (i, &x) in w.iter().enumerate() {
                            if x.abs() > best {
                                best = x.abs();
                                arg = i as i32;
                            }
                        }
                        arg
                    })
                    .collect()
            })
            .collect();
        Self {
            strategy: trace.strategy.clone(),
            loras: trace.loras.clone(),
            layers: trace.layers.len(),
            steps: trace.steps,
            mean_weight: sum.iter().map(|s| s / count.max(1) as f64).collect(),
            intensity: {
                let max = trace.weights.iter().flatten().flatten().fold(0.0f64, |m, w| m.max(w.abs()));
                trace
                    .weights
                    .iter()
                    .map(|step| step.iter().map(|w| (100.0 * w.iter().fold(0.0f64, |m, x| m.max(x.abs())) / max.max(1e-12)).round() as u8).collect())
                    .collect()
            },
            dominant,
            candidates: trace.candidates.clone(),
        }
    }
}

/// A tiling setting: `xy` (`both`, `on`, `true`), `x`, `y`, or off (empty, `off`, `none`, `false`).
pub fn parse_tiling(v: &str) -> Option<crate::Seamless> {
    use crate::Seamless;
    Some(match v.trim().to_ascii_lowercase().as_str() {
        "" | "off" | "none" | "false" | "no" | "0" => Seamless::OFF,
        "xy" | "both" | "on" | "true" | "yes" | "1" => Seamless::BOTH,
        "x" => Seamless { x: true, y: false },
        "y" => Seamless { x: false, y: true },
        _ => return None,
    })
}

/// The canonical name of a tiling setting, as [`Settings::tiling`] keeps it.
pub fn tiling_name(s: crate::Seamless) -> &'static str {
    match (s.x, s.y) {
        (true, true) => "xy",
        (true, false) => "x",
        (false, true) => "y",
        (false, false) => "",
    }
}

/// `tiling` in a manifest: A1111's boolean or one of [`parse_tiling`]'s names, kept canonical.
fn tiling_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let s = match &v {
        serde_json::Value::Bool(b) => Some(crate::Seamless { x: *b, y: *b }),
        serde_json::Value::String(n) => parse_tiling(n),
        serde_json::Value::Null => Some(crate::Seamless::OFF),
        _ => None,
    }
    .ok_or_else(|| serde::de::Error::custom(format!("tiling {v}: expected xy, x, y, off, true or false")))?;
    Ok(tiling_name(s).to_string())
}

fn one() -> f64 {
    1.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_just_resize(m: &ResizeMode) -> bool {
    *m == ResizeMode::JustResize
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn is_shared(s: &BatchSeeds) -> bool {
    *s == BatchSeeds::Shared
}

impl Settings {
    /// "Resize seed from" as (width, height), when both sides are set.
    pub fn seed_resize_from(&self) -> Option<(usize, usize)> {
        (self.seed_resize_from_w > 0 && self.seed_resize_from_h > 0).then_some((self.seed_resize_from_w, self.seed_resize_from_h))
    }

    /// The borders this job's images wrap ([`Self::tiling`]).
    pub fn seamless(&self) -> crate::Result<crate::Seamless> {
        parse_tiling(&self.tiling)
            .ok_or_else(|| crate::Error::Argument(format!("tiling {:?}: expected xy, x, y or off", self.tiling)))
    }

    /// The settings as an image's record keeps them: every file by its absolute path, so that
    /// the record restores from any working directory.
    pub fn recorded(&self) -> Settings {
        let mut s = self.clone();
        s.model = recorded_path(&s.model);
        s.vae = recorded_path(&s.vae);
        // A LoRA name that happens to be a folder here stays a name.
        for l in s.loras.iter_mut().filter(|l| std::path::Path::new(&l.name).is_file()) {
            l.name = recorded_path(&l.name);
        }
        for e in &mut s.embeddings {
            *e = recorded_path(e);
        }
        for c in &mut s.controlnet {
            c.model = recorded_path(&c.model);
            c.image = recorded_path(&c.image);
        }
        if let Some(i) = &mut s.init {
            i.image = recorded_path(&i.image);
            i.mask = i.mask.as_deref().map(recorded_path);
        }
        if let Some(h) = &mut s.hires {
            h.upscaler = recorded_path(&h.upscaler);
        }
        if let Some(u) = &mut s.sd_upscale {
            u.upscaler = recorded_path(&u.upscaler);
        }
        s
    }
}

/// A width or height some model we load can take: a multiple of the smallest VAE factor (4; 8
/// for SDXL) up to the largest side. The job's model checks its own factor when the job runs.
pub(super) fn side_fits_any_model(v: usize) -> bool {
    v.is_multiple_of(4) && v <= crate::sdxl::pipeline::MAX_SIDE
}

/// A path as a record keeps it: absolute when it names an existing file or folder, so that the
/// record restores from any working directory; anything else (a library name, a hub repo id, a
/// built-in upscaler) as given.
fn recorded_path(p: &str) -> String {
    let path = std::path::Path::new(p);
    if p.is_empty() || path.is_absolute() || !path.exists() {
        return p.to_string();
    }
    std::path::absolute(path).map_or_else(|_| p.to_string(), |a| a.to_string_lossy().into_owned())
}
