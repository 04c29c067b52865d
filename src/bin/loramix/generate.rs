//! `loramix generate`: text to images with LoRAs and a mixing strategy, written as PNGs that
//! carry A1111's parameters and our settings.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loramix::device::{parse_device, parse_dtype};
use loramix::lora::library::LoraLibrary;
use loramix::lora;
use loramix::mix;
use loramix::output;
use loramix::studio;
use loramix::sdxl::pipeline::VaeTilingMode;
use loramix::rng::BatchSeeds;
use loramix::sdxl::schedulers::Schedule;

/// The VAE's tile under `--low-memory`: ComfyUI's default tile, about 0.8 GB of VAE work in f32.
const LOW_MEMORY_VAE_TILE: usize = 512;
use loramix::{GenerateRequest, LoadOptions, SamplerKind, SdxlPipeline};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A diffusers folder, a single-file SDXL .safetensors checkpoint, or a Hugging Face repo id
    /// (default: the shipped miniworld model).
    #[arg(long, default_value = "models/miniworld", value_parser = crate::model_arg)]
    model: String,
    /// Configs and tokenizers for a single-file checkpoint (a diffusers folder).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A VAE in place of the model's: a diffusers vae folder or a .safetensors file (diffusers or LDM names).
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Omitted: no negative prompt (zero embeddings on SDXL). An explicit "" encodes the empty string.
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    cfg: f64,
    /// euler | euler_a | dpmpp_2m | dpmpp_2m_karras | ddim | heun | heun_karras | dpm2 | dpm2_karras | dpm2_a | dpmpp_2m_sde | dpmpp_2m_sde_karras | lcm | unipc | unipc_karras | euler_karras (default: the model's scheduler).
    #[arg(long)]
    sampler: Option<String>,
    /// karras | exponential | beta | sgm_uniform | ays (A1111's schedule type; default: the sampler's own).
    #[arg(long)]
    schedule: Option<String>,
    /// Text-encoder layers to skip beyond SDXL's penultimate (diffusers' clip_skip; A1111's "Clip skip" minus one).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// diffusers' timestep_spacing in place of the model's scheduler config: linspace, leading or
    /// trailing (SDXL Lightning, Turbo and Hyper-SD's cards use trailing for few steps).
    #[arg(long)]
    timestep_spacing: Option<String>,
    /// Default (or -1, as in A1111): a random seed, printed and recorded.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Seamless, tileable images (A1111's "Tiling"): every convolution of the UNet and the VAE
    /// wraps around the image's borders. Alone or `xy`: both axes; `x` or `y`: one axis
    /// (InvokeAI's Seamless X / Y). The VAE then decodes in one piece.
    #[arg(long, num_args = 0..=1, default_missing_value = "xy", value_name = "AXES")]
    tiling: Option<String>,
    /// A1111's variation seed: with --subseed-strength above 0, the starting noise moves toward
    /// this seed's (image k: subseed + k). Default (or -1): a random one, recorded.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed)]
    subseed: Option<u64>,
    /// A1111's "Variation seed strength": 0 (off) to 1 (the variation seed's own noise).
    #[arg(long, default_value_t = 0.0)]
    subseed_strength: f64,
    /// A1111's "Resize seed from width / height" (WxH pixels): each seed's noise as it is at that
    /// size, centred in this image's (cropped or surrounded by new noise), so a seed found at one
    /// size keeps its composition at another.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    seed_resize_from: Option<(usize, usize)>,
    /// A1111's "Eta noise seed delta" (ENSD; NovelAI's is 31337): the noise that ancestral and
    /// SDE samplers draw between steps comes from each image's seed plus N.
    #[arg(long, visible_alias = "ensd", value_name = "N", default_value_t = 0, allow_negative_numbers = true)]
    eta_noise_seed_delta: i64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// How a batch's images take their noise: `shared`, one generator for the batch as in
    /// diffusers and ComfyUI (the default here, where diffusers is the reference), or
    /// `per-image`, A1111's seed + k per image, each the image its seed makes alone (the app's
    /// and the API's default).
    #[arg(long, default_value = "shared", value_parser = parse_batch_seeds)]
    batch_seeds: BatchSeeds,
    /// Batches run one after another (A1111's batch count); batch i starts at seed + i·batch-size
    /// (with --sd-upscale, picture i is made from seed + i).
    #[arg(long, default_value_t = 1)]
    batch_count: usize,
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// The pictures' file type (A1111's `samples_format`). A PNG keeps our full record besides
    /// A1111's `parameters`; a JPEG or WebP keeps `parameters` as its EXIF UserComment, as A1111
    /// writes them. WebP is written lossless.
    #[arg(long, default_value = "png", value_parser = ["png", "jpg", "jpeg", "webp"], ignore_case = true)]
    samples_format: String,
    /// JPEG quality, 1 to 100 (A1111's `jpeg_quality`).
    #[arg(long, default_value_t = studio::SamplesFormat::DEFAULT_JPEG_QUALITY, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The VAE's dtype: `auto` (diffusers' rule: f32 for an f16 model whose VAE config says
    /// force_upcast, else the model's), or f32, f16, bf16 (ComfyUI's --fp32-vae, --fp16-vae,
    /// --bf16-vae). bf16 decodes SDXL's VAE without f16's overflow, on the GPU's tensor cores.
    #[arg(long, default_value = "auto")]
    vae_dtype: String,
    /// CUDA: let f32 matrix products use TF32 tensor cores (torch's `allow_tf32`; PyTorch's cuDNN
    /// convolutions, diffusers' VAE among them, do by default). With an f16 model this is the
    /// upcast VAE's decode (and LoRA weight products formed in f32 on the GPU).
    #[arg(long)]
    tf32: bool,
    /// Unscaled standard-normal starting noise: safetensors with key `latents`, [batch, 4, H/f, W/f].
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// img2img: start from this image instead of noise (its size, rounded down to the VAE's
    /// factor, unless --width/--height resize it).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img / inpainting denoising strength in [0, 1]: the share of the steps that run.
    #[arg(long)]
    strength: Option<f64>,
    /// Inpainting mask, the init image's size: white = repaint, black = keep.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Gaussian blur of the mask's edge, pixels (A1111's "Mask blur").
    #[arg(long, default_value_t = 4.0)]
    mask_blur: f64,
    /// What the masked area starts from: original | fill | latent_noise | latent_nothing.
    #[arg(long, default_value = "original")]
    masked_content: String,
    /// whole_picture | only_masked (the mask's padded box, generated at the output size and pasted back).
    #[arg(long, default_value = "whole_picture")]
    inpaint_area: String,
    /// only_masked: pixels of context around the mask (A1111's "Only masked padding, pixels").
    #[arg(long, default_value_t = 32)]
    inpaint_padding: u32,
    /// How an init image of another shape fits --width/--height (A1111's "Resize mode"):
    /// just_resize (stretch), crop_and_resize (cover, crop the centre), resize_and_fill (fit
    /// inside, stretch the edges over the rest) or just_resize_latent_upscale (encode at the
    /// image's size, stretch the latents bilinearly).
    /// (Default: just_resize.)
    #[arg(long)]
    resize_mode: Option<String>,
    /// A ControlNet or T2I-Adapter (one unit each; repeatable, their guidance adds up): a
    /// diffusers folder, one .safetensors in diffusers names (config read from its tensors), or
    /// a hub repo id.
    #[arg(long = "controlnet", value_name = "MODEL")]
    controlnets: Vec<String>,
    /// The picture each --controlnet reads (the control map itself with preprocessor none).
    /// This and the other --control-* flags take one value for every unit, or one per unit in
    /// the order of --controlnet.
    #[arg(long = "control-image", value_name = "PATH")]
    control_images: Vec<String>,
    /// The preprocessor (A1111's "Module"): none | canny (OpenCV's) | invert (dark lines on a
    /// light background to the light-on-dark maps line-art ControlNets take).
    #[arg(long = "control-preprocessor", value_name = "NAME")]
    control_preprocessors: Vec<String>,
    /// Control weight (diffusers' controlnet_conditioning_scale); default 1.
    #[arg(long = "control-weight", value_name = "W")]
    control_weights: Vec<f64>,
    /// The fraction of the steps where a unit starts acting (A1111's "Starting Control Step"); default 0.
    #[arg(long = "control-start", value_name = "F")]
    control_starts: Vec<f64>,
    /// The fraction of the steps where it stops (A1111's "Ending Control Step"); default 1.
    #[arg(long = "control-end", value_name = "F")]
    control_ends: Vec<f64>,
    /// How a control image of another shape fits the image: crop_and_resize (the default, as
    /// sd-webui-controlnet), just_resize or resize_and_fill.
    #[arg(long = "control-resize-mode", value_name = "MODE")]
    control_resize_modes: Vec<String>,
    /// The preprocessor's first threshold (canny: low, default 100).
    #[arg(long = "control-threshold-a", value_name = "X")]
    control_thresholds_a: Vec<f64>,
    /// The preprocessor's second threshold (canny: high, default 200).
    #[arg(long = "control-threshold-b", value_name = "X")]
    control_thresholds_b: Vec<f64>,
    /// diffusers' guess mode for every unit: it guides the conditional half of CFG only, its
    /// residuals scaled from 0.1 (first skip) to 1 (mid block).
    #[arg(long = "control-guess-mode")]
    control_guess_mode: bool,
    /// sd-webui-controlnet's Control Mode: balanced (the default), prompt ("My prompt is more
    /// important": the extension's soft weights) or control ("ControlNet is more important":
    /// soft weights on the conditional half of CFG only); the extension's labels work too.
    #[arg(long = "control-mode", value_name = "MODE")]
    control_modes: Vec<String>,
    /// Outpainting: grow the canvas by N pixels on every side, or L,T,R,B, and repaint the border.
    #[arg(long)]
    outpaint: Option<String>,
    /// Hires fix: upscale the first pass by this factor and run a second pass (A1111's "Hires upscale").
    #[arg(long)]
    hr_scale: Option<f64>,
    /// Latent | "Latent (antialiased)" | "Latent (bicubic)" | "Latent (bicubic antialiased)" | "Latent (nearest)" | "Latent (nearest-exact)" | None | Lanczos | Nearest,
    /// or an ESRGAN-family model (a .safetensors path, or a name from the library's models/ESRGAN).
    #[arg(long, default_value = "Latent")]
    hr_upscaler: String,
    /// Steps of the second pass (0: as many as the first).
    #[arg(long, default_value_t = 0)]
    hr_steps: usize,
    /// Denoising strength of the second pass.
    #[arg(long, default_value_t = 0.7)]
    hr_denoise: f64,
    /// A1111's "SD upscale" script: enlarge --init-image by this factor with
    /// --sd-upscale-upscaler (its default, None, keeps the size), then redraw it in overlapping
    /// tiles of --width × --height (img2img at --strength; one tile a batch: tile k takes seed + k).
    #[arg(long, value_name = "FACTOR")]
    sd_upscale: Option<f64>,
    /// SD upscale's "Tile overlap", in pixels.
    #[arg(long, default_value_t = 64, value_name = "PIXELS", requires = "sd_upscale")]
    sd_upscale_overlap: usize,
    /// SD upscale's "Upscaler": None (the image as it is), Lanczos, Nearest, or an ESRGAN-family
    /// model (a .safetensors path, or a name from the library's models/ESRGAN).
    #[arg(long, default_value = "None", value_name = "NAME", requires = "sd_upscale")]
    sd_upscale_upscaler: String,
    /// An A1111 style from <library>/styles.csv, applied by name (its `{prompt}` placeholder, or
    /// appended). Repeatable.
    #[arg(long = "style", value_name = "NAME")]
    styles: Vec<String>,
    /// A textual-inversion embedding (an SDXL `.safetensors` with `clip_l` and `clip_g`, or a
    /// diffusers folder), or a folder of them, callable by name in the prompts besides the
    /// model's `embeddings/` and the library's. Repeatable.
    #[arg(long = "embedding", value_name = "PATH")]
    embeddings: Vec<String>,
    /// Tiled VAE (diffusers' enable_vae_tiling): auto (tiles only when the whole image would
    /// not fit in the free memory; the log says so), on (the VAE's own tile size), off, or a
    /// tile size in pixels.
    #[arg(long, default_value = "auto")]
    vae_tiling: String,
    /// Keep memory low: the text encoders are released once the prompts are encoded (runs
    /// without LoRAs; LoRA layers span them), the UNet after the last denoising step, and the
    /// VAE is loaded only to decode, in tiles of 512 pixels (unless --vae-tiling says otherwise).
    #[arg(long)]
    low_memory: bool,
    /// Write the final latents (before VAE decode) to this safetensors file, key `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// A LoRA file, or a library name, with an optional strength (default 1). Repeatable.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Library for <lora:NAME:w> prompt tags and --lora names (default: $LORAMIX_HOME or the data dir).
    #[arg(long)]
    pub library: Option<PathBuf>,
    /// How several LoRAs combine: merge | switch | composite | klora | est | np | windows | auto.
    #[arg(long, default_value = "merge")]
    mix: String,
    /// --mix windows: step windows per role as fractions of the steps (default subject=0:0.7,style=0.3:1).
    #[arg(long)]
    windows: Option<String>,
    /// Run the unconditional half of CFG on the base weights (any per-step --mix).
    #[arg(long)]
    asymmetric_cfg: bool,
    /// --mix np: the soft projection's strength mu (default 0.5; large = hard projection).
    #[arg(long)]
    np_mu: Option<f64>,
    /// --mix klora / est, corrected mode: the layers they do not select on: follow (default) | merge.
    #[arg(long)]
    klora_others: Option<String>,
    /// `library`: add the library's LoRAs that the prompt calls for (trigger words, names, tags,
    /// text-encoder similarity), the best per role; the trace and the PNG say which and why.
    #[arg(long)]
    candidates: Option<String>,
    /// K-LoRA / auto time-scale pattern: s | s* (default s*).
    #[arg(long)]
    klora_pattern: Option<String>,
    /// corrected (progress = step/steps, alpha/rank scale) | reference (the reference's call counter, no alpha).
    #[arg(long, default_value = "corrected")]
    klora_mode: String,
    /// LoRA Switch period in steps.
    #[arg(long, default_value_t = 5)]
    switch_every: usize,
    /// Write the per-step, per-layer LoRA weights as JSON.
    #[arg(long)]
    mix_trace: Option<PathBuf>,
    /// DINO ViT-S/16 folder for --mix est (default: <library>/models/dino-vits16).
    #[arg(long)]
    est_embedder: Option<PathBuf>,
    /// Steps of EST's two preview generations (default: --steps).
    #[arg(long)]
    est_preview_steps: Option<usize>,
    /// Size of EST's previews, WxH (default: the output size).
    #[arg(long)]
    est_preview_size: Option<String>,
}

impl GenerateArgs {
    pub fn format(&self) -> loramix::Result<studio::SamplesFormat> {
        studio::SamplesFormat::parse(&self.samples_format, self.jpeg_quality)
    }
}

/// The ControlNet units of the flags, checked before the model loads.
pub fn controlnet_settings(a: &GenerateArgs) -> Result<Vec<studio::ControlNetSetting>> {
    let n = a.controlnets.len();
    fn pick<T: Clone>(flag: &str, v: &[T], n: usize, i: usize) -> Result<Option<T>> {
        match v.len() {
            0 => Ok(None),
            1 => Ok(Some(v[0].clone())),
            k if k == n => Ok(Some(v[i].clone())),
            k => anyhow::bail!("{flag} is given {k} times for {n} --controlnet units: give it once (for all) or once per unit"),
        }
    }
    if n == 0 {
        let given = [
            ("--control-image", a.control_images.len()),
            ("--control-preprocessor", a.control_preprocessors.len()),
            ("--control-weight", a.control_weights.len()),
            ("--control-start", a.control_starts.len()),
            ("--control-end", a.control_ends.len()),
            ("--control-resize-mode", a.control_resize_modes.len()),
            ("--control-threshold-a", a.control_thresholds_a.len()),
            ("--control-threshold-b", a.control_thresholds_b.len()),
            ("--control-guess-mode", a.control_guess_mode as usize),
            ("--control-mode", a.control_modes.len()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, k)| *k > 0) {
            anyhow::bail!("{flag} needs --controlnet MODEL");
        }
        return Ok(vec![]);
    }
    (0..n)
        .map(|i| {
            let d = studio::ControlNetSetting::default();
            let image = pick("--control-image", &a.control_images, n, i)?
                .ok_or_else(|| anyhow::anyhow!("--controlnet {} needs --control-image PATH", a.controlnets[i]))?;
            let resize_mode = match pick("--control-resize-mode", &a.control_resize_modes, n, i)? {
                Some(m) => loramix::sdxl::img2img::ResizeMode::parse_control(&m).with_context(|| format!("--control-resize-mode {m}"))?,
                None => d.resize_mode,
            };
            let control_mode = match pick("--control-mode", &a.control_modes, n, i)? {
                Some(m) => m.parse().with_context(|| format!("--control-mode {m}"))?,
                None => d.control_mode,
            };
            let module = pick("--control-preprocessor", &a.control_preprocessors, n, i)?.unwrap_or(d.module);
            let (ta, tb) = (pick("--control-threshold-a", &a.control_thresholds_a, n, i)?, pick("--control-threshold-b", &a.control_thresholds_b, n, i)?);
            loramix::sdxl::preprocessor::Preprocessor::parse(&module, ta, tb).with_context(|| format!("--control-preprocessor {module}"))?;
            if !Path::new(&image).is_file() {
                anyhow::bail!("--control-image {image}: {}", if Path::new(&image).exists() { "not a file" } else { "no such file" });
            }
            Ok(studio::ControlNetSetting {
                model: a.controlnets[i].clone(),
                image,
                module,
                weight: pick("--control-weight", &a.control_weights, n, i)?.unwrap_or(d.weight),
                guidance_start: pick("--control-start", &a.control_starts, n, i)?.unwrap_or(d.guidance_start),
                guidance_end: pick("--control-end", &a.control_ends, n, i)?.unwrap_or(d.guidance_end),
                resize_mode,
                threshold_a: ta,
                threshold_b: tb,
                guess_mode: a.control_guess_mode,
                control_mode,
            })
        })
        .collect()
}

/// The img2img / inpainting part of the flags, checked before the model loads.
fn init_settings(a: &GenerateArgs) -> Result<Option<studio::InitSettings>> {
    let Some(image) = &a.init_image else {
        for (set, flag) in [(a.strength.is_some(), "--strength"), (a.mask.is_some(), "--mask"), (a.outpaint.is_some(), "--outpaint"), (a.resize_mode.is_some(), "--resize-mode")] {
            if set {
                anyhow::bail!("{flag} needs --init-image FILE");
            }
        }
        return Ok(None);
    };
    let strength = a.strength.unwrap_or(0.75);
    if !(0.0..=1.0).contains(&strength) {
        anyhow::bail!("--strength {strength}: expected a number in [0, 1]");
    }
    let inpaint_area = match a.inpaint_area.as_str() {
        "whole_picture" | "Whole picture" => studio::InpaintArea::WholePicture,
        "only_masked" | "Only masked" => studio::InpaintArea::OnlyMasked,
        o => anyhow::bail!("--inpaint-area {o:?}: expected whole_picture or only_masked"),
    };
    let outpaint = match a.outpaint.as_deref() {
        None => None,
        Some(v) => {
            let parts: Vec<u32> = v
                .split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--outpaint {v:?}: expected N or L,T,R,B in pixels"))?;
            match parts[..] {
                [n] => Some([n; 4]),
                [l, t, r, b] => Some([l, t, r, b]),
                _ => anyhow::bail!("--outpaint {v:?}: expected N or L,T,R,B in pixels"),
            }
        }
    };
    let s = studio::InitSettings {
        image: image.to_string_lossy().into_owned(),
        strength,
        mask: a.mask.as_ref().map(|m| m.to_string_lossy().into_owned()),
        mask_blur: a.mask_blur,
        masked_content: a.masked_content.parse()?,
        inpaint_area,
        padding: a.inpaint_padding,
        outpaint,
        resize_mode: match &a.resize_mode {
            Some(m) => m.parse().with_context(|| format!("--resize-mode {m}"))?,
            None => Default::default(),
        },
    };
    // Unreadable files fail now, not after the model has loaded.
    studio::prepare_init(&s, (a.width, a.height), 8)?;
    Ok(Some(s))
}

/// What every path of a job needs from the flags, checked before any model loads.
pub struct JobParts {
    pub load: LoadOptions,
    pub init: Option<studio::InitSettings>,
    pub hires: Option<studio::HiresSettings>,
}

pub fn job_parts(a: &GenerateArgs) -> Result<JobParts> {
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose()?;
    let schedule: Schedule = a.schedule.as_deref().unwrap_or("").parse()?;
    if let Some(s) = sampler {
        loramix::sdxl::schedulers::resolve(s, schedule)?; // before the model loads
    }
    let init_settings = init_settings(a)?;
    controlnet_settings(a)?;
    let hires = match a.hr_scale {
        None => None,
        Some(scale) => {
            let h = studio::HiresSettings { scale, upscaler: loramix::sdxl::upscale::Upscaler::canonical(&a.hr_upscaler), steps: a.hr_steps, denoise: a.hr_denoise };
            // Names and ranges fail before the model loads.
            studio::upscaler_model_path(&h.upscaler, a.library.as_deref())?;
            loramix::sdxl::upscale::hires_steps(a.steps, h.steps, h.denoise)?;
            studio::hires_size(&h, (64, 64), 8)?;
            if init_settings.is_some() {
                anyhow::bail!("--hr-scale is for text to image; with --init-image set the size with --width/--height");
            }
            Some(h)
        }
    };
    let vae_dtype = match a.vae_dtype.as_str() {
        "auto" => None,
        name => Some(parse_dtype(name).map_err(|_| anyhow::anyhow!("--vae-dtype {name:?}: expected auto, f32, f16 or bf16"))?),
    };
    let device = parse_device(&a.device)?;
    if a.tf32 {
        if !device.is_cuda() {
            anyhow::bail!("--tf32: TF32 is a CUDA tensor-core mode; this run is on {}", a.device);
        }
        // Process-wide in candle; a CLI run (generate or grid) is one job, so nothing else
        // shares the setting.
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let load = LoadOptions { device, dtype: parse_dtype(&a.dtype)?, config_dir: a.config.clone(), vae: a.vae.clone(), defer_unet: false, vae_dtype };
    Ok(JobParts { load, init: init_settings, hires })
}

pub fn run(mut a: GenerateArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.subseed_strength) {
        anyhow::bail!("--subseed-strength {}: expected a number in [0, 1]", a.subseed_strength);
    }
    if a.subseed_strength != 0.0 && a.subseed.is_none() {
        a.subseed = Some(studio::random_seed());
    }
    if a.subseed_strength == 0.0 && a.subseed.take().is_some() {
        eprintln!("warning: --subseed does nothing without --subseed-strength above 0");
    }
    if a.subseed_strength != 0.0 && a.init_noise.is_some() {
        anyhow::bail!("--init-noise and --subseed-strength cannot be combined: the starting noise is given");
    }
    let seamless = seamless_arg(&a)?;
    if let Some((w, h)) = a.seed_resize_from {
        if w < 8 || h < 8 {
            anyhow::bail!("--seed-resize-from {w}x{h}: expected at least 8 pixels a side (the size a seed was found at)");
        }
        if a.init_noise.is_some() {
            anyhow::bail!("--init-noise and --seed-resize-from cannot be combined: the starting noise is given");
        }
    }
    let JobParts { load: mut opts, init: init_settings, hires } = job_parts(&a)?;
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose()?;
    let schedule: Schedule = a.schedule.as_deref().unwrap_or("").parse()?;
    if a.sd_upscale.is_some() || !a.styles.is_empty() || studio::is_dynamic(&a.prompt) || a.negative_prompt.as_deref().is_some_and(studio::is_dynamic) {
        return run_drawn(&a, opts, init_settings, hires);
    }
    let init_noise = a.init_noise.as_deref().map(output::load_latents).transpose()?;
    // Their folders exist before the run, so a missing one cannot lose a finished generation.
    for (flag, path) in [("--mix-trace", &a.mix_trace), ("--save-latents", &a.save_latents)] {
        if let Some(dir) = path.as_deref().and_then(std::path::Path::parent).filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("{flag}: creating {}", dir.display()))?;
        }
    }
    let lora_args = a.loras.iter().map(|s| lora::parse_lora_arg_with_role(s)).collect::<loramix::Result<Vec<_>>>()?;
    let mut mix_opts = mix::MixOptions {
        strategy: a.mix.clone(),
        klora_pattern: a.klora_pattern.clone(),
        klora_mode: a.klora_mode.clone(),
        switch_every: a.switch_every,
        est_previews: None,
        windows: a.windows.clone(),
        asymmetric_cfg: a.asymmetric_cfg,
        np_mu: a.np_mu,
        klora_others: a.klora_others.clone(),
    };
    if a.mix != "est" {
        mix::build(&mix_opts)?; // flag errors before the model loads
    }
    for w in mix::ignored_options(&mix_opts) {
        eprintln!("warning: {w}");
    }
    let (clean_prompt, prompt_tags, skipped) = lora::extract_extra_networks(&a.prompt)?;
    for kind in skipped.iter().collect::<std::collections::BTreeSet<_>>() {
        // A1111's "Skipping unknown extra network": the tag leaves the prompt.
        eprintln!("skipping the prompt's <{kind}:…> tags: not a network this app has (LoRA tags are <lora:…> or <lyco:…>)");
    }
    let model_loras = std::path::Path::new(&a.model).join("loras");
    // Resolve names before the model loads, so a typo fails fast.
    lora::library::resolve_choices(&lora_args, &prompt_tags, a.library.as_deref(), Some(&model_loras))?;
    let tiling = VaeTilingMode::parse(&a.vae_tiling)?;
    if !seamless.is_off() && matches!(tiling, VaeTilingMode::On(_)) {
        anyhow::bail!("--tiling with --vae-tiling {}: a tiled VAE cannot make seamless images (its tiles do not wrap around the borders); use --vae-tiling off or auto", a.vae_tiling);
    }
    // Low memory without LoRAs: the UNet is read only after the prompts are encoded and the
    // text encoders released, so the two are never in memory together.
    opts.defer_unet = a.low_memory && lora_args.is_empty() && prompt_tags.is_empty() && a.candidates.is_none();
    let t0 = Instant::now();
    let mut pipe = SdxlPipeline::load(&a.model, &opts).with_context(|| format!("loading model {}", a.model))?;
    eprintln!("loaded {} in {:.1}s", a.model, t0.elapsed().as_secs_f64());
    if opts.vae_dtype == Some(candle_core::DType::F16) && pipe.vae_config().force_upcast {
        eprintln!("warning: --vae-dtype f16 on a VAE whose config says force_upcast: SDXL's own VAE overflows f16 (black or NaN images); bf16 keeps f32's range, or use an fp16-fix VAE with --vae");
    }
    pipe.vae_tiling = match tiling {
        // Seamless images need the VAE whole (its tiles would not wrap around).
        VaeTilingMode::Auto if a.low_memory && seamless.is_off() => VaeTilingMode::On(Some(LOW_MEMORY_VAE_TILE)),
        t => t,
    };
    if a.low_memory {
        // Read again from the model's files when the decode needs it.
        pipe.release_vae();
    }
    let mut targets = Some(lora::AdapterTargets::of_pipeline(&pipe));
    let targets_ref = targets.as_ref().expect("just built");
    let mut lora_args = lora_args;
    let picked_candidates = match a.candidates.as_deref() {
        None => Vec::new(),
        Some("library") => {
            let picks = studio::library_candidates(&pipe, a.library.as_deref(), &clean_prompt, &mut lora_args)?;
            for c in &picks {
                eprintln!("candidate {} ({}): score {:.2}, {}{}", c.name, c.role.as_str(), c.score, if c.picked { "picked: " } else { "" }, c.reason);
            }
            picks
        }
        Some(o) => anyhow::bail!("--candidates {o}: expected library"),
    };
    let ll = studio::load_loras(&lora_args, &prompt_tags, a.library.as_deref(), &model_loras, targets_ref)?;
    for r in &ll.reports {
        eprintln!("lora {} ({}, {}, {}): {} layers matched", r.name, r.format, r.base, r.role, r.layers);
        for w in &r.warnings {
            eprintln!("warning: lora {}: {w}", r.name);
        }
    }
    let mix_loras = ll.mix.clone();
    let seed = a.seed.unwrap_or_else(studio::random_seed);
    let (dw, dh) = pipe.default_size();
    let prepared = init_settings.as_ref().map(|s| studio::prepare_init(s, (a.width, a.height), pipe.vae_scale_factor())).transpose()?;
    if let Some(n) = prepared.as_ref().and_then(|p| p.note.as_ref()) {
        eprintln!("warning: {n}");
    }
    let (width, height) = match &prepared {
        Some(p) => (p.width, p.height),
        None => (a.width.unwrap_or(dw), a.height.unwrap_or(dh)),
    };
    let mut control = studio::control_units(&controlnet_settings(&a)?, &pipe, &studio::ControlNets::default())?;
    if let Some(p) = &prepared {
        control.iter_mut().for_each(|u| p.fit_control(u));
    }
    studio::check_pass_sizes(&control, (width, height), prepared.is_some(), hires.as_ref().filter(|_| prepared.is_none()), pipe.vae_scale_factor())?;
    for c in &control {
        let (w, h) = c.image.dimensions();
        let kind = match c.model {
            loramix::sdxl::controlnet::ControlModel::ControlNet(_) => "controlnet",
            loramix::sdxl::controlnet::ControlModel::Adapter(_) => "t2i-adapter",
        };
        eprintln!("{kind}: {w}x{h} control map, weight {}, steps {}..{}", c.weight, c.start, c.end);
    }
    let req = GenerateRequest {
        prompt: clean_prompt,
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler,
        schedule,
        clip_skip: a.clip_skip,
        timestep_spacing: a.timestep_spacing.clone(),
        seed,
        batch_seeds: a.batch_seeds,
        width: Some(width),
        height: Some(height),
        batch_size: a.batch_size,
        init_noise,
        init: prepared.as_ref().map(|p| p.init.clone()),
        embeddings: studio::job_embeddings(&a.model, a.library.as_deref(), &a.embeddings)?,
        variation: None,
        seamless,
        seed_resize_from: a.seed_resize_from,
        eta_noise_seed_delta: a.eta_noise_seed_delta,
        control,
        hires_of: None,
    };
    // Before the text encoders may be released (--low-memory): they tokenize the prompts.
    let ti_hashes = studio::embedding_hashes(&pipe, &req)?;
    if a.batch_count == 0 {
        anyhow::bail!("--batch-count must be at least 1");
    }
    if a.batch_count > 1 && (a.mix_trace.is_some() || a.save_latents.is_some() || req.init_noise.is_some()) {
        anyhow::bail!("--mix-trace, --save-latents and --init-noise describe one batch: use them with --batch-count 1");
    }
    let plan = if mix_loras.is_empty() {
        if a.mix_trace.is_some() {
            anyhow::bail!("--mix-trace needs at least one --lora");
        }
        None
    } else {
        let plan = studio::plan_mix(&pipe, targets_ref, mix_loras, &req.prompt, &a.mix, picked_candidates)?;
        if a.mix == "est" {
            let dir = match &a.est_embedder {
                Some(d) => d.clone(),
                None => LoraLibrary::default_root()?.join("models/dino-vits16"),
            };
            if !dir.join("model.safetensors").exists() {
                anyhow::bail!(
                    "--mix est needs the DINO ViT-S/16 embedder: put facebook/dino-vits16's config.json, model.safetensors and \
                     preprocessor_config.json in {} or pass --est-embedder DIR",
                    dir.display()
                );
            }
            let embedder = loramix::eval::embed::ImageEmbedder::load(&dir, &opts.device)?;
            let mut preview = req.clone();
            preview.init_noise = None;
            preview.batch_size = 1;
            if a.est_preview_steps == Some(0) {
                anyhow::bail!("--est-preview-steps 0: expected at least 1");
            }
            if let Some(n) = a.est_preview_steps {
                preview.steps = n;
            }
            let size = a.est_preview_size.as_deref().map(|v| parse_size(v).map_err(anyhow::Error::msg).with_context(|| format!("--est-preview-size {v}"))).transpose()?;
            if let Some((w, h)) = size {
                if w == 0 || h == 0 || w > loramix::sdxl::pipeline::MAX_SIDE || h > loramix::sdxl::pipeline::MAX_SIDE {
                    anyhow::bail!("--est-preview-size {w}x{h}: expected positive sides up to {}", loramix::sdxl::pipeline::MAX_SIDE);
                }
                preview.width = Some(w);
                preview.height = Some(h);
            }
            let t = Instant::now();
            let previews = mix::est::style_discrepancy(&pipe, targets_ref, &plan, &preview, &embedder)?;
            eprintln!(
                "est: previews {} steps at {}x{}: style discrepancy d = {:.4} ({:.1}s)",
                previews.steps, previews.width, previews.height, previews.discrepancy, t.elapsed().as_secs_f64()
            );
            mix_opts.est_previews = Some(previews);
        }
        Some(plan)
    };
    let hashes = ll.hashes.clone();
    let mut plan = plan;
    if a.low_memory {
        if plan.is_none() {
            pipe.encode_ahead(&req)?;
            if let Some(h) = &hires {
                pipe.encode_ahead(&GenerateRequest { steps: loramix::sdxl::upscale::hires_steps(req.steps, h.steps, h.denoise)?.0, ..req.clone() })?;
            }
            drop(targets.take()); // it holds the encoders' weights too
            pipe.release_text_encoders();
            eprintln!("low memory: prompts encoded, text encoders released");
            if opts.defer_unet {
                let t = Instant::now();
                pipe.load_unet()?;
                eprintln!("low memory: UNet loaded after the encoders were released ({:.1}s)", t.elapsed().as_secs_f64());
            }
            targets = Some(lora::AdapterTargets::of_pipeline(&pipe));
        } else {
            eprintln!("low memory: the text encoders stay loaded while LoRAs are in use (their layers are LoRA targets)");
        }
    }
    // The hires upscaler model, read once for every batch.
    let upscaler_model = hires.as_ref().map(|h| studio::hires_upscaler_model(h, a.library.as_deref(), &pipe.device)).transpose()?.flatten();
    let mut idx = output::first_free_index(&a.out);
    let mut written = Vec::with_capacity(a.batch_count * a.batch_size);
    for batch in 0..a.batch_count {
        let t_batch = Instant::now();
        let mut req = req.clone();
        // Image k's variation seed is subseed + k; under a variation every image keeps the
        // job's seed (A1111: variations of one image), otherwise image k's seed is seed + k.
        let first = (batch * a.batch_size) as u64;
        req.variation = a.subseed.map(|s| loramix::rng::Variation { seed: s.wrapping_add(first), strength: a.subseed_strength });
        req.seed = if req.variation.is_some() { seed } else { seed.wrapping_add(first) };
        let targets_ref = targets.as_ref().expect("kept until the last batch");
        let mixer = plan.clone().map(|p| mix::Mixer::new(targets_ref, p, mix::build(&mix_opts)?)).transpose()?;
        let hires = match &hires {
            Some(h) => Some((h, upscaler_model.as_ref(), plan.clone().map(|p| mix::Mixer::new(targets_ref, p, mix::build(&mix_opts)?)).transpose()?)),
            None => None,
        };
        let denoised = denoise_batch(&a, &pipe, &req, mixer, hires)?;
        if batch + 1 == a.batch_count {
            // A one-shot run never denoises again: the decode gets the UNet's and encoders' memory.
            (plan, targets) = (None, None);
            pipe.release_unet();
            pipe.release_text_encoders();
        }
        written.extend(write_batch(&a, &pipe, &req, denoised, (batch, seed), (&hashes, &ti_hashes), (init_settings.as_ref(), prepared.as_ref()), &mut idx)?);
        eprintln!("batch {}/{}: {:.2}s", batch + 1, a.batch_count, t_batch.elapsed().as_secs_f64());
    }
    // Paths go to stdout for scripts; a closed pipe (`| head`) must not abort the run.
    let mut stdout = std::io::stdout().lock();
    for path in &written {
        if writeln!(stdout, "{}", path.display()).is_err() {
            break;
        }
    }
    if let Some(sub) = a.subseed {
        eprintln!("variation seed {sub}, strength {}", a.subseed_strength);
    }
    eprintln!("seed {seed}, {:.1}s total", t0.elapsed().as_secs_f64());
    Ok(())
}

/// What one batch's denoising leaves for its decode.
struct Denoised {
    latents: candle_core::Tensor,
    summary: Option<studio::MixSummary>,
    hires: Option<studio::HiresSettings>,
}

/// One batch of `generate`: denoise (with the mixer, if any, and the hires fix's second pass).
fn denoise_batch(
    a: &GenerateArgs,
    pipe: &SdxlPipeline,
    req: &GenerateRequest,
    mut mixer: Option<mix::Mixer>,
    hires: Option<(&studio::HiresSettings, Option<&loramix::sdxl::upscale_model::UpscaleModel>, Option<mix::Mixer>)>,
) -> anyhow::Result<Denoised> {
    let bar = ProgressBar::new(a.steps as u64);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tty = std::io::stderr().is_terminal();
    let progress = |pass: &str, p: &loramix::sdxl::pipeline::StepProgress| {
        let its = p.step as f64 / p.elapsed.as_secs_f64().max(1e-9);
        if tty {
            bar.set_length(p.steps as u64);
            bar.set_position(p.step as u64);
            bar.set_message(format!("{pass}{its:.2} it/s"));
        } else {
            // Logs and pipes get one plain line per step.
            let eta = (p.steps - p.step) as f64 / its;
            eprintln!("{pass}step {}/{} {its:.2} it/s ETA {eta:.1}s", p.step, p.steps);
        }
        true
    };
    let latents = pipe.generate_latents_mixed(req, mixer.as_mut().map(|m| m as &mut dyn loramix::sdxl::pipeline::StepMixer), &mut |p| progress("", p))?;
    let hires_settings = hires.as_ref().map(|(h, _, _)| (*h).clone());
    let latents = match hires {
        None => latents,
        Some((hr, model, mut hr_mixer)) => {
            let second = studio::hires_request(pipe, req, &latents, hr, model)?;
            eprintln!("hires fix: {} to {}x{}", hr.upscaler, second.width.unwrap_or(0), second.height.unwrap_or(0));
            pipe.generate_latents_mixed(&second, hr_mixer.as_mut().map(|m| m as &mut dyn loramix::sdxl::pipeline::StepMixer), &mut |p| progress("hires ", p))?
        }
    };
    bar.finish();
    let mut summary = None;
    if let Some(m) = mixer.take() {
        let trace = m.finish();
        summary = Some(studio::MixSummary::of(&trace));
        if let Some(path) = &a.mix_trace {
            trace.write(path)?;
            eprintln!("wrote mix trace {}", path.display());
        }
    }
    if let Some(path) = &a.save_latents {
        output::save_latents(path, &latents)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(Denoised { latents, summary, hires: hires_settings })
}

/// Decodes one batch and writes the PNGs with their A1111 `parameters` and our JSON chunk;
/// returns the paths written.
#[allow(clippy::too_many_arguments)]
fn write_batch(
    a: &GenerateArgs,
    pipe: &SdxlPipeline,
    req: &GenerateRequest,
    Denoised { latents, summary, hires: hires_settings }: Denoised,
    (batch_index, seed): (usize, u64),
    (hashes, ti_hashes): (&[(String, String)], &[(String, String)]),
    (init_settings, prepared): (Option<&studio::InitSettings>, Option<&studio::PreparedInit>),
    idx: &mut usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let (b, _, h, w) = latents.dims4()?;
    let f = pipe.vae_scale_factor();
    if let Some(note) = pipe.vae_plan(b, h * f, w * f).note {
        eprintln!("{note}");
    }
    let images = pipe.decode(&latents)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (sampler, schedule) = loramix::sdxl::schedulers::resolve(req.sampler.map_or_else(|| pipe.default_sampler(), Ok)?, req.schedule)?;
    let (dw, dh) = pipe.default_size();
    let (w, h) = (req.width.unwrap_or(dw), req.height.unwrap_or(dh));
    // The same record the app writes: A1111 `parameters` (with <lora:..> tags and Lora hashes,
    // so A1111 and our drop-to-restore re-apply them) and our JSON chunk with the full settings.
    let settings = studio::Settings {
        sampler: sampler.name().to_string(),
        schedule: if schedule == Schedule::Default { String::new() } else { schedule.name().to_string() },
        seed: Some(seed),
        width: w,
        height: h,
        loras: lora_settings(a)?,
        candidates: a.candidates.is_some(),
        styles: vec![],
        ..settings_of(a, init_settings.cloned(), hires_settings)
    }
    .recorded();
    let model_hash = studio::model_shorthash(&settings.model).unwrap_or_default();
    let mut written = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let img = &match prepared {
            Some(p) => p.finish(img),
            None => img.clone(),
        };
        let rec = studio::ImageRecord {
            settings: settings.clone(),
            seed: req.batch_seeds.seed_of_varied(req.seed, i, req.variation.is_some()),
            batch_index,
            index_in_batch: i,
            width: w,
            height: h,
            sampler: sampler.a1111_name().to_string(),
            schedule: if schedule == Schedule::Default { String::new() } else { schedule.a1111_name().to_string() },
            lora_hashes: hashes.to_vec(),
            subseed: req.variation.map(|v| req.batch_seeds.seed_of(v.seed, i)),
            model_hash: model_hash.clone(),
            ti_hashes: ti_hashes.to_vec(),
            mix_trace: summary.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            drawn: None,
        };
        let (format, note) = a.format()?.or_png(img.width(), img.height(), &studio::parameters_text(&rec));
        if let Some(note) = note {
            eprintln!("{note}");
        }
        let path = output::next_image_path(&a.out, rec.seed, format.extension(), idx);
        output::write_atomic(&path, &studio::encode_image_as(img, &rec, format)?)?;
        written.push(path);
    }
    Ok(written)
}

/// Styles, wildcards and `{a|b}` draw a prompt per image, and SD upscale runs a job per tile:
/// the job runs through the studio (as in the app and `batch run`), which draws with each
/// image's seed and records the template.
fn run_drawn(a: &GenerateArgs, opts: LoadOptions, init: Option<studio::InitSettings>, hires: Option<studio::HiresSettings>) -> Result<()> {
    let why = if a.sd_upscale.is_some() { "--sd-upscale" } else { "--style, wildcards (__name__) or variants ({a|b})" };
    let settings = studio_settings(a, init, hires, why)?;
    let studio = studio::Studio::with_load_options(opts);
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let outputs = studio::ImageOutputs { dir: &a.out, names: None, images: None, keep_interrupted: false, skip: None, format: a.format()? };
    let job = studio.run(&settings, a.library.as_deref(), &outputs, &cancel, &mut |e| log_event(&e), &mut |_| {})?;
    let mut stdout = std::io::stdout().lock();
    for path in &job.written {
        if writeln!(stdout, "{}", path.display()).is_err() {
            break;
        }
    }
    eprintln!("seed {}", settings.seed.unwrap_or(0));
    Ok(())
}

/// The flags as one studio job (`Settings`), for the paths that run through the studio
/// (drawn prompts, grids); `why` names what needs it, for the flags it cannot carry.
pub fn studio_settings(a: &GenerateArgs, init: Option<studio::InitSettings>, hires: Option<studio::HiresSettings>, why: &str) -> Result<studio::Settings> {
    for (set, flag) in [
        (a.mix_trace.is_some(), "--mix-trace"),
        (a.save_latents.is_some(), "--save-latents"),
        (a.init_noise.is_some(), "--init-noise"),
        (a.mix == "est", "--mix est"),
        (a.low_memory, "--low-memory"),
        (a.vae_tiling != "auto", "--vae-tiling"),
    ] {
        if set {
            anyhow::bail!("{flag} cannot be used with {why}");
        }
    }
    seamless_arg(a)?;
    let mut settings = settings_of(a, init, hires);
    if why == "grid" {
        // A grid's Var. strength axis gives the strength; its cells keep the given seed.
        settings.subseed = a.subseed;
    }
    studio::check_sd_upscale(&settings, a.library.as_deref())?;
    settings.loras = lora_settings(a)?;
    settings.controlnet = controlnet_settings(a)?;
    settings.seed = Some(a.seed.unwrap_or_else(studio::random_seed));
    settings.candidates = match a.candidates.as_deref() {
        None => false,
        Some("library") => true,
        Some(o) => anyhow::bail!("--candidates {o}: expected library"),
    };
    Ok(settings)
}

/// `WxH`, two positive whole numbers.
fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("{s:?}: expected WxH in pixels, e.g. 512x768");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    match (w.trim().parse::<usize>(), h.trim().parse::<usize>()) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(bad()),
    }
}

/// `--tiling`'s axes.
fn seamless_arg(a: &GenerateArgs) -> Result<loramix::Seamless> {
    match a.tiling.as_deref() {
        None => Ok(loramix::Seamless::OFF),
        Some(t) => studio::parse_tiling(t).ok_or_else(|| anyhow::anyhow!("--tiling {t:?}: expected xy (both axes), x, y or off")),
    }
}

/// `--lora` as settings, with weight and role (a record keeps only what the user gave: the
/// prompt's tags stay in the prompt).
fn lora_settings(a: &GenerateArgs) -> Result<Vec<studio::LoraSetting>> {
    a.loras
        .iter()
        .map(|s| {
            let (name, weight, role) = lora::parse_lora_arg_with_role(s)?;
            Ok(studio::LoraSetting { name, weight, role: role.map(|r| r.as_str().to_string()), schedule: None })
        })
        .collect()
}

/// The flags as settings, as given (the callers fix seeds, LoRAs and resolved names; a record
/// makes its paths absolute with [`studio::Settings::recorded`]).
fn settings_of(a: &GenerateArgs, init: Option<studio::InitSettings>, hires: Option<studio::HiresSettings>) -> studio::Settings {
    studio::Settings {
        model: a.model.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone().unwrap_or_default(),
        encode_empty_negative: a.negative_prompt.as_deref() == Some(""),
        dtype: if a.dtype == "f32" { String::new() } else { a.dtype.clone() },
        klora_mode: (a.klora_mode != "corrected").then(|| a.klora_mode.clone()),
        np_mu: a.np_mu,
        steps: a.steps,
        cfg: a.cfg,
        sampler: a.sampler.clone().unwrap_or_default(),
        schedule: a.schedule.clone().unwrap_or_default(),
        vae: a.vae.as_ref().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default(),
        clip_skip: a.clip_skip,
        tiling: a.tiling.as_deref().and_then(studio::parse_tiling).map_or("", studio::tiling_name).to_string(),
        timestep_spacing: a.timestep_spacing.clone().unwrap_or_default(),
        seed: a.seed,
        subseed: a.subseed.filter(|_| a.subseed_strength != 0.0),
        subseed_strength: a.subseed_strength,
        seed_resize_from_w: a.seed_resize_from.map_or(0, |s| s.0),
        seed_resize_from_h: a.seed_resize_from.map_or(0, |s| s.1),
        eta_noise_seed_delta: a.eta_noise_seed_delta,
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        batch_count: a.batch_count,
        batch_size: a.batch_size,
        batch_seeds: a.batch_seeds,
        loras: vec![],
        mix: a.mix.clone(),
        klora_pattern: a.klora_pattern.clone(),
        switch_every: a.switch_every,
        windows: a.windows.clone(),
        asymmetric_cfg: a.asymmetric_cfg,
        klora_others: a.klora_others.clone(),
        candidates: a.candidates.is_some(),
        hires,
        init,
        sd_upscale: a.sd_upscale.map(|scale| studio::SdUpscaleSettings { scale, overlap: a.sd_upscale_overlap, upscaler: loramix::sdxl::upscale::Upscaler::canonical(&a.sd_upscale_upscaler) }),
        styles: a.styles.clone(),
        embeddings: a.embeddings.clone(),
        // Checked in `run` before any model loads.
        controlnet: controlnet_settings(a).unwrap_or_default(),
    }
}

/// One stderr line per studio event worth a line in a log.
pub fn log_event(e: &studio::StudioEvent) {
    match e {
        studio::StudioEvent::Loaded { model, seconds } => eprintln!("loaded {model} in {seconds:.1}s"),
        studio::StudioEvent::Notice { message } => eprintln!("{message}"),
        studio::StudioEvent::LoraLoaded { name, role, layers, warnings } => {
            eprintln!("lora {name} ({role}): {layers} layers matched");
            for w in warnings {
                eprintln!("warning: lora {name}: {w}");
            }
        }
        _ => {}
    }
}

/// Any u64 (what a record can hold: a batch's seed + k may pass i64's range), or -1.
fn parse_seed(s: &str) -> Result<u64, String> {
    match s.trim() {
        "-1" => Ok(studio::random_seed()),
        t => t.parse::<u64>().map_err(|_| format!("{s:?}: expected a whole number from 0, or -1 for a random seed")),
    }
}

fn parse_batch_seeds(s: &str) -> Result<BatchSeeds, String> {
    s.parse()
}
