//! A1111's hires fix (`processing.py` `StableDiffusionProcessingTxt2Img.sample_hr_pass`): the
//! first pass at W×H, an upscale by `scale` (latents with torch's interpolate, or the decoded
//! image with Lanczos or an ESRGAN-family model and encoded again), then an img2img pass that
//! runs A1111's step count at the hires denoising strength. Shared by the CLI and the app.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::settings::HiresSettings;
use crate::error::{Error, Result};
use crate::rng::BatchNoise;
use crate::sdxl::img2img::{self, InitImage, MaskedContent};
use crate::sdxl::pipeline::{GenerateRequest, SdxlPipeline};
use crate::sdxl::upscale::{self, Upscaler};
use crate::sdxl::upscale_model::UpscaleModel;
use crate::weights::{pickle_refusal, PICKLE_EXTENSIONS};

/// The folders under the library an upscaler model is looked up in by name: A1111's
/// `models/ESRGAN` and `models/RealESRGAN`, ComfyUI's `upscale_models`.
const MODEL_DIRS: [&str; 3] = ["models/ESRGAN", "models/RealESRGAN", "models/upscale_models"];

/// Where the hires upscaler `name` reads its model from: `None` for the built-in ones (latent
/// modes, Lanczos); else a `.safetensors` path as given, or `NAME.safetensors` in the library's
/// upscaler folders (A1111 lists those models by file stem). Pickles are refused.
pub fn upscaler_model_path(name: &str, library: Option<&Path>) -> Result<Option<PathBuf>> {
    model_path(name, library, "hires upscaler", &Upscaler::names(), true)
}

/// An upscaler by name only: a built-in one (`pixel_only`: no latent mode) or a model in the
/// library's folders, never a file path. What a client of the API may name: a path would let
/// it load, or probe for, any file the server can read.
pub fn upscaler_model_by_name(name: &str, library: Option<&Path>, pixel_only: bool, what: &str) -> Result<Option<PathBuf>> {
    let builtins: Vec<&str> = Upscaler::names().into_iter().filter(|n| !pixel_only || !n.starts_with("Latent")).collect();
    model_path(name, library, what, &builtins, false)
}

/// [`upscaler_model_path`] for the pixel upscalers alone (A1111's `sd_upscalers`: `None`,
/// `Lanczos`, `Nearest` and models), as the "SD upscale" script takes them.
pub fn pixel_upscaler_model_path(name: &str, library: Option<&Path>) -> Result<Option<PathBuf>> {
    pixel_upscaler_path(name, library, "SD upscale upscaler")
}

/// [`pixel_upscaler_model_path`] with `what` naming the field in errors.
pub fn pixel_upscaler_path(name: &str, library: Option<&Path>, what: &str) -> Result<Option<PathBuf>> {
    let builtins: Vec<&str> = Upscaler::names().into_iter().filter(|n| !n.starts_with("Latent")).collect();
    model_path(name, library, what, &builtins, true)
}

/// `paths`: a file path is taken as it is (the command line's and the app's); else names only.
fn model_path(name: &str, library: Option<&Path>, what: &str, builtins: &[&str], paths: bool) -> Result<Option<PathBuf>> {
    if let Ok(u) = name.parse::<Upscaler>() {
        if builtins.iter().any(|b| b.parse::<Upscaler>().ok() == Some(u)) {
            return Ok(None);
        }
        return Err(Error::Argument(format!("{what} {name:?}: expected one of {}, or an ESRGAN-family model", builtins.join(", "))));
    }
    let p = Path::new(name);
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(pickle_refusal(p));
    }
    if !paths && name.contains(['/', '\\']) {
        return Err(Error::Argument(format!("{what} {name:?}: expected an upscaler's name, not a path")));
    }
    if paths && p.is_file() {
        return Ok(Some(p.to_path_buf()));
    }
    if name.contains(['/', '\\']) {
        return Err(Error::BadFile { path: p.into(), message: format!("{what}: no such file") });
    }
    // A library name, with or without its extension.
    let name = name.strip_suffix(".safetensors").unwrap_or(name);
    let root = match library {
        Some(r) => Some(r.to_path_buf()),
        None => crate::lora::library::LoraLibrary::default_root().ok(),
    };
    if let Some(root) = &root {
        for d in MODEL_DIRS {
            let f = root.join(d).join(format!("{name}.safetensors"));
            if f.is_file() {
                return Ok(Some(f));
            }
            if root.join(d).join(format!("{name}.pth")).is_file() {
                return Err(pickle_refusal(&root.join(d).join(format!("{name}.pth"))));
            }
        }
    }
    Err(Error::Argument(format!(
        "unknown {what} {name:?}: expected one of {}, a .safetensors ESRGAN-family model (RRDBNet), or the name of one in {}",
        builtins.join(", "),
        match &root {
            Some(r) => MODEL_DIRS.iter().map(|d| r.join(d).display().to_string()).collect::<Vec<_>>().join(", "),
            None => "the library's models/ESRGAN".to_string(),
        }
    )))
}

/// The upscaler models in the library's folders, by the name hires fix takes (file stem).
pub fn upscaler_models(library: &Path) -> Vec<String> {
    let mut names: Vec<String> = MODEL_DIRS
        .iter()
        .filter_map(|d| std::fs::read_dir(library.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().to_string()))
        .collect();
    // A1111's `sd_upscalers` order (its built-ins first, then by lower-case name), which the
    // API's upscaler indices count in.
    names.sort_by_key(|n| (n.to_lowercase(), n.clone()));
    names.dedup();
    names
}

/// The model hires fix upscales with, loaded once per job (`None`: a built-in upscaler).
pub fn hires_upscaler_model(hr: &HiresSettings, library: Option<&Path>, device: &candle_core::Device) -> Result<Option<UpscaleModel>> {
    upscaler_model_path(&hr.upscaler, library)?.map(|p| UpscaleModel::load(&p, device)).transpose()
}

/// The factor `k` with ⌊from × k⌋ = to. The engine floors sizes (`hires_size`) and step counts
/// (img2img's ⌊steps × strength⌋), and `to / from` alone can land a hair below.
pub fn factor_reaching(to: usize, from: usize) -> f64 {
    let k = to as f64 / from as f64;
    if ((from as f64 * k) as usize) < to {
        k.next_up()
    } else {
        k
    }
}

/// The second pass's size: `scale ×` the first, rounded down to the VAE's factor.
pub fn hires_size(hr: &HiresSettings, (w, h): (usize, usize), factor: usize) -> Result<(usize, usize)> {
    if !(1.0..=8.0).contains(&hr.scale) {
        return Err(Error::Argument(format!("hires upscale must be in [1, 8], got {}", hr.scale)));
    }
    let round = |v: usize| ((v as f64 * hr.scale) as usize / factor) * factor;
    Ok((round(w), round(h)))
}

/// The request of the second pass, from the first pass's request and final latents.
/// `model` is [`hires_upscaler_model`]'s for `hr` (required when `hr.upscaler` names a model).
pub fn hires_request(pipe: &SdxlPipeline, first: &GenerateRequest, first_latents: &Tensor, hr: &HiresSettings, model: Option<&UpscaleModel>) -> Result<GenerateRequest> {
    let f = pipe.vae_scale_factor();
    let (dw, dh) = pipe.default_size();
    let size = (first.width.unwrap_or(dw), first.height.unwrap_or(dh));
    let (tw, th) = hires_size(hr, size, f)?;
    let upscaler = match (hr.upscaler.parse::<Upscaler>(), model) {
        (Ok(u), _) => Some(u),
        (Err(_), Some(_)) => None,
        (Err(e), None) => return Err(e),
    };
    let (total, run) = upscale::hires_steps(first.steps, hr.steps, hr.denoise)?;
    let latents = match upscaler {
        Some(Upscaler::Latent(mode)) => upscale::upscale_latents(first_latents, mode, th / f, tw / f)?,
        _ => {
            // A1111's `images.resize_image(0, …, upscaler_name)` on each decoded image.
            let images = pipe.decode(first_latents)?;
            let mut pixels = Vec::with_capacity(images.len());
            for img in &images {
                let big = match model.filter(|_| upscaler.is_none()) {
                    Some(m) => m.upscale_to(img, tw as u32, th as u32)?,
                    None => upscaler.unwrap_or(Upscaler::Resize).upscale_image(img, tw as u32, th as u32),
                };
                pixels.push(img2img::image_tensor(&big, &pipe.device)?);
            }
            // A1111 samples the posterior from torch's global generator; ours is the seed's.
            pipe.encode_sampled(&Tensor::cat(&pixels, 0)?, &mut BatchNoise::new(first.seed, pixels.len(), first.batch_seeds))?
        }
    };
    let mut req = first.clone();
    req.width = Some(tw);
    req.height = Some(th);
    req.steps = total;
    req.hires_of = Some((first.steps, run));
    req.init_noise = None;
    req.init = Some(InitImage {
        image: image::RgbImage::new(0, 0),
        // Exactly `run` of the `total` steps: ⌊total × strength⌋ = run.
        strength: ((run as f64 + 0.5) / total as f64).min(1.0),
        mask: None,
        masked_content: MaskedContent::Original,
        latents: Some(latents.to_dtype(DType::F32)?),
        resize_latents: false,
    });
    for u in &mut req.control {
        u.soft_injection |= u.soft_in_hires;
    }
    Ok(req)
}
