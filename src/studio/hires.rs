//! A1111's hires fix (`processing.py` `StableDiffusionProcessingTxt2Img.sample_hr_pass`): the
//! first pass at W×H, an upscale by `scale` (latents with torch's interpolate, or the decoded
//! image with Lanczos and encoded again), then an img2img pass that runs A1111's step count at
//! the hires denoising strength. Shared by the CLI and the app.

use candle_core::{DType, Tensor};

use super::settings::HiresSettings;
use crate::error::{Error, Result};
use crate::rng::TorchCpuRng;
use crate::sdxl::img2img::{self, InitImage, MaskedContent};
use crate::sdxl::pipeline::{GenerateRequest, SdxlPipeline};
use crate::sdxl::upscale::{self, Upscaler};

/// The second pass's size: `scale ×` the first, rounded down to the VAE's factor.
pub fn hires_size(hr: &HiresSettings, (w, h): (usize, usize), factor: usize) -> Result<(usize, usize)> {
    if !(1.0..=8.0).contains(&hr.scale) {
        return Err(Error::Argument(format!("hires upscale must be in [1, 8], got {}", hr.scale)));
    }
    let round = |v: usize| ((v as f64 * hr.scale) as usize / factor) * factor;
    Ok((round(w), round(h)))
}

/// The request of the second pass, from the first pass's request and final latents.
pub fn hires_request(pipe: &SdxlPipeline, first: &GenerateRequest, first_latents: &Tensor, hr: &HiresSettings) -> Result<GenerateRequest> {
    let f = pipe.vae_scale_factor();
    let (dw, dh) = pipe.default_size();
    let size = (first.width.unwrap_or(dw), first.height.unwrap_or(dh));
    let (tw, th) = hires_size(hr, size, f)?;
    let upscaler: Upscaler = hr.upscaler.parse()?;
    let (total, run) = upscale::hires_steps(first.steps, hr.steps, hr.denoise)?;
    let latents = match upscaler {
        Upscaler::Latent(mode) => upscale::upscale_latents(first_latents, mode, th / f, tw / f)?,
        Upscaler::Lanczos => {
            let images = pipe.decode(first_latents)?;
            let mut pixels = Vec::with_capacity(images.len());
            for img in &images {
                pixels.push(img2img::image_tensor(&img2img::resize(img, tw as u32, th as u32), &pipe.device)?);
            }
            // A1111 samples the posterior from torch's global generator; ours is the seed's.
            pipe.encode_sampled(&Tensor::cat(&pixels, 0)?, &mut TorchCpuRng::new(first.seed))?
        }
    };
    let mut req = first.clone();
    req.width = Some(tw);
    req.height = Some(th);
    req.steps = total;
    req.init_noise = None;
    req.init = Some(InitImage {
        image: image::RgbImage::new(0, 0),
        // Exactly `run` of the `total` steps: ⌊total × strength⌋ = run.
        strength: ((run as f64 + 0.5) / total as f64).min(1.0),
        mask: None,
        masked_content: MaskedContent::Original,
        latents: Some(latents.to_dtype(DType::F32)?),
    });
    Ok(req)
}
