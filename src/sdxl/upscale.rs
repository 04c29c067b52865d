//! Hires fix upscalers: A1111's latent upscalers (`torch.nn.functional.interpolate` on the
//! latents, `modules/shared_items.py` `latent_upscale_modes`) and its pixel-space "None",
//! "Lanczos" and "Nearest" (`modules/upscaler.py`), bit for bit through [`crate::resample`].
//!
//! Interpolation is written here as two separable weight matrices (`Wₕ · X · W_wᵀ`) that
//! reproduce torch's `align_corners=False` index rules exactly: candle's resize kernels do not
//! cover bicubic, and one formulation for all modes keeps them comparable. Hires fix only
//! enlarges, where torch's `antialias=True` changes nothing, so the antialiased modes equal
//! their plain ones for bilinear; torch's antialiased bicubic uses PIL's kernel, reproduced
//! here. img2img's resize mode 3 also shrinks, with plain bilinear (no antialias), which the
//! same weights give.

use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::resample::{self, Filter};
use crate::sdxl::img2img;

/// What the first pass is enlarged with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upscaler {
    Latent(LatentMode),
    /// Decode, resize in pixel space, encode again. A1111's "None": one Lanczos resize to the size.
    Resize,
    /// A1111's "Lanczos" upscaler: Lanczos by the scale factor, then to the size ([`img2img::upscale_with`]).
    Lanczos,
    /// A1111's "Nearest" upscaler: nearest neighbour by the scale factor, then Lanczos to the size.
    Nearest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    Nearest,
    NearestExact,
    Bilinear,
    Bicubic,
    /// torch's antialiased bicubic is PIL's filter (a = −0.5, weights normalised), not the
    /// plain kernel (a = −0.75), even when enlarging.
    BicubicAntialiased,
}

impl Upscaler {
    /// A1111's names (`Hires upscaler: Latent (bicubic antialiased)`), with the mode and antialias flag.
    const NAMES: [(&'static str, Upscaler, bool); 9] = [
        ("Latent", Upscaler::Latent(LatentMode::Bilinear), false),
        ("Latent (antialiased)", Upscaler::Latent(LatentMode::Bilinear), true),
        ("Latent (bicubic)", Upscaler::Latent(LatentMode::Bicubic), false),
        ("Latent (bicubic antialiased)", Upscaler::Latent(LatentMode::BicubicAntialiased), true),
        ("Latent (nearest)", Upscaler::Latent(LatentMode::Nearest), false),
        ("Latent (nearest-exact)", Upscaler::Latent(LatentMode::NearestExact), false),
        ("None", Upscaler::Resize, false),
        ("Lanczos", Upscaler::Lanczos, false),
        ("Nearest", Upscaler::Nearest, false),
    ];

    pub fn names() -> Vec<&'static str> {
        Self::NAMES.iter().map(|n| n.0).collect()
    }

    /// A1111's spelling of a built-in upscaler written another way (`lanczos`,
    /// `latent_bicubic`), which is what PNGs record; any other name as it is.
    pub fn canonical(name: &str) -> String {
        Self::NAMES.iter().find(|(n, _, _)| Self::same_name(n, name)).map_or_else(|| name.to_string(), |(n, _, _)| n.to_string())
    }

    /// Whether `given` names A1111's `name`: as written, or in our lower-case spellings
    /// (latent, latent_bicubic, latent_nearest_exact, lanczos).
    fn same_name(name: &str, given: &str) -> bool {
        let norm = |n: &str| n.to_lowercase().replace(['(', ')'], "").replace([' ', '-'], "_").replace("__", "_");
        name == given.trim() || norm(name) == norm(given.trim())
    }

    /// A decoded image enlarged to `w × h` in pixel space, as A1111's `resize_image(0, image, w,
    /// h, upscaler_name)` does for this upscaler. The latent modes are not pixel upscalers and
    /// resize as "None" does.
    pub fn upscale_image(self, img: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
        let out = match self.pixel_step() {
            Some(step) => img2img::upscale_with(img, w, h, step),
            None => Ok(img2img::resize(img, w, h)),
        };
        match out {
            Ok(i) => i,
            Err(never) => match never {},
        }
    }

    /// A1111's `Upscaler.upscale(img, scale)` for this pixel upscaler, as the "SD upscale"
    /// script calls it; "None" leaves the image as it is (the script skips it).
    pub fn upscale_by(self, img: &image::RgbImage, scale: f64) -> image::RgbImage {
        match self.pixel_step() {
            Some(step) => match img2img::a1111_upscale(img, scale, step) {
                Ok(i) => i,
                Err(never) => match never {},
            },
            None => img.clone(),
        }
    }

    /// `do_upscale` of A1111's "Lanczos" and "Nearest": `img.resize((int(img.width * scale),
    /// int(img.height * scale)), filter)`.
    fn pixel_step(self) -> Option<impl Fn(&image::RgbImage, f64) -> std::result::Result<image::RgbImage, std::convert::Infallible>> {
        let filter = match self {
            Upscaler::Lanczos => Filter::Lanczos,
            Upscaler::Nearest => Filter::Nearest,
            Upscaler::Resize | Upscaler::Latent(_) => return None,
        };
        Some(move |im: &image::RgbImage, scale: f64| Ok(resample::resize(im, (im.width() as f64 * scale) as u32, (im.height() as f64 * scale) as u32, filter)))
    }
}

impl FromStr for Upscaler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim();
        Self::NAMES.iter().find(|(n, _, _)| Self::same_name(n, key)).map(|(_, u, _)| *u).ok_or_else(|| {
            // Model upscalers (ESRGAN-family) are resolved by the studio (`upscaler_model_path`).
            Error::Argument(format!("unknown hires upscaler {key:?}; expected one of {}, or an ESRGAN-family .safetensors model", Self::names().join(", ")))
        })
    }
}

/// `(out × in)` interpolation weights along one axis, as torch computes them for
/// `align_corners=False` and an output size (scale = in / out).
fn axis_weights(mode: LatentMode, n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f32 / n_out as f32;
    let mut w = vec![0f32; n_out * n_in];
    let last = n_in as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    for o in 0..n_out {
        let row = &mut w[o * n_in..(o + 1) * n_in];
        match mode {
            LatentMode::Nearest => row[((o as f32 * scale).floor() as i64).min(last) as usize] = 1.0,
            LatentMode::NearestExact => row[(((o as f32 + 0.5) * scale).floor() as i64).min(last) as usize] = 1.0,
            LatentMode::Bilinear => {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as i64).min(last);
                let i1 = (i0 + 1).min(last);
                let l = src - i0 as f32;
                row[i0 as usize] += 1.0 - l;
                row[i1 as usize] += l;
            }
            LatentMode::BicubicAntialiased => {
                // aten's _compute_weights_aa with the bicubic filter (a = -0.5), scale ≤ 1.
                let filter = |x: f32| {
                    let (a, x) = (-0.5f32, x.abs());
                    if x < 1.0 {
                        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                    } else if x < 2.0 {
                        (((x - 5.0) * x + 8.0) * x - 4.0) * a
                    } else {
                        0.0
                    }
                };
                let support = 2.0 * scale.max(1.0);
                let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
                let center = scale * (o as f32 + 0.5);
                let xmin = ((center - support + 0.5) as i64).max(0);
                let xmax = ((center + support + 0.5) as i64).min(n_in as i64);
                let ws: Vec<f32> = (xmin..xmax).map(|j| filter((j as f32 - center + 0.5) * invscale)).collect();
                let total: f32 = ws.iter().sum();
                for (j, wv) in (xmin..xmax).zip(ws) {
                    row[j as usize] += if total != 0.0 { wv / total } else { 0.0 };
                }
            }
            LatentMode::Bicubic => {
                const A: f32 = -0.75;
                let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
                let src = (o as f32 + 0.5) * scale - 0.5;
                let i = src.floor() as i64;
                let t = src - i as f32;
                for (k, c) in [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)].into_iter().enumerate() {
                    row[clamp(i - 1 + k as i64)] += c;
                }
            }
        }
    }
    w
}

/// Hires fix's latent upscale: [`interpolate_latents`] to a size no smaller.
pub fn upscale_latents(x: &Tensor, mode: LatentMode, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, h0, w0) = x.dims4()?;
    if h < h0 || w < w0 {
        return Err(Error::Argument(format!("hires fix enlarges: {h0}x{w0} latents cannot go to {h}x{w}")));
    }
    interpolate_latents(x, mode, h, w)
}

/// `interpolate(x, size=(h, w), mode=…, align_corners=False)` on `[b, c, H, W]` latents, either
/// way (img2img's resize mode 3 also shrinks).
pub fn interpolate_latents(x: &Tensor, mode: LatentMode, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, h0, w0) = x.dims4()?;
    if h == 0 || w == 0 || h0 == 0 || w0 == 0 {
        return Err(Error::Argument(format!("latents of {h0}x{w0} cannot be interpolated to {h}x{w}")));
    }
    let dev = x.device();
    let wh = Tensor::from_vec(axis_weights(mode, h0, h), (h, h0), &Device::Cpu)?.to_device(dev)?;
    let ww = Tensor::from_vec(axis_weights(mode, w0, w), (w, w0), &Device::Cpu)?.to_device(dev)?;
    let x32 = x.to_dtype(DType::F32)?.reshape((b * c, h0, w0))?;
    let rows = wh.unsqueeze(0)?.repeat((b * c, 1, 1))?.matmul(&x32)?; // [bc, h, w0]
    let out = rows.matmul(&ww.t()?.unsqueeze(0)?.repeat((b * c, 1, 1))?)?; // [bc, h, w]
    Ok(out.reshape((b, c, h, w))?.to_dtype(x.dtype())?)
}

/// A1111's hires step arithmetic (`sd_samplers_common.setup_img2img_steps` with the hires
/// steps given): the second pass runs `steps` steps (the first pass's count when 0) out of a
/// schedule of `⌊steps / min(denoise, 0.999)⌋`. Returns (schedule length, steps run).
pub fn hires_steps(first_pass_steps: usize, hires_steps: usize, denoise: f64) -> Result<(usize, usize)> {
    if !(denoise > 0.0 && denoise <= 1.0) {
        return Err(Error::Argument(format!("hires denoising strength must be in (0, 1], got {denoise}")));
    }
    let run = if hires_steps == 0 { first_pass_steps } else { hires_steps };
    let total = ((run as f64) / denoise.min(0.999)) as usize;
    Ok((total.max(run), run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upscaler_names_a1111_and_ours() {
        assert_eq!("Latent".parse::<Upscaler>().unwrap(), Upscaler::Latent(LatentMode::Bilinear));
        assert_eq!("latent_bicubic_antialiased".parse::<Upscaler>().unwrap(), Upscaler::Latent(LatentMode::BicubicAntialiased));
        assert_eq!("Latent (nearest-exact)".parse::<Upscaler>().unwrap(), Upscaler::Latent(LatentMode::NearestExact));
        assert_eq!("lanczos".parse::<Upscaler>().unwrap(), Upscaler::Lanczos);
        let e = "R-ESRGAN 4x+".parse::<Upscaler>().unwrap_err().to_string();
        assert!(e.contains("ESRGAN-family"), "{e}");
    }

    #[test]
    fn a1111_hires_steps() {
        // setup_img2img_steps: int(requested / min(denoise, 0.999)), t_enc = requested - 1.
        assert_eq!(hires_steps(20, 0, 0.7).unwrap(), (28, 20));
        assert_eq!(hires_steps(20, 10, 0.5).unwrap(), (20, 10));
        assert_eq!(hires_steps(20, 10, 1.0).unwrap(), (10, 10));
        assert!(hires_steps(20, 10, 0.0).is_err());
    }
}
