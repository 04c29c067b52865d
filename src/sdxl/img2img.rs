//! img2img and inpainting inputs: the init image and mask as diffusers' image processors see
//! them, and A1111's pixel-space steps around an inpainting run (mask blur, "masked content:
//! fill", "inpaint area: only masked", the overlay that keeps unmasked pixels).
//!
//! The denoising itself (strength → start step, VAE encode with the seeded sample, the noise,
//! the per-step blend or the 9-channel UNet input) lives in the pipeline and equals diffusers'
//! `StableDiffusionXLImg2ImgPipeline` / `StableDiffusionXLInpaintPipeline`. What only A1111
//! defines follows `modules/processing.py` (`StableDiffusionProcessingImg2Img.init`) and
//! `modules/masking.py`; each function says where it differs.

use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};
use crate::resample::{self, Filter};

/// A1111's "Masked content": what the masked area starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskedContent {
    /// The init image itself (diffusers' behaviour).
    #[default]
    Original,
    /// The masked area painted with blurred surrounding colours before encoding.
    Fill,
    /// Filled, then the masked latents replaced by fresh noise.
    LatentNoise,
    /// Filled, then the masked latents zeroed.
    LatentNothing,
}

impl MaskedContent {
    pub const ALL: [MaskedContent; 4] = [Self::Original, Self::Fill, Self::LatentNoise, Self::LatentNothing];
    pub fn name(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Fill => "fill",
            Self::LatentNoise => "latent_noise",
            Self::LatentNothing => "latent_nothing",
        }
    }
    /// As A1111 writes it (`Masked content: latent noise`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Fill => "fill",
            Self::LatentNoise => "latent noise",
            Self::LatentNothing => "latent nothing",
        }
    }
}

impl FromStr for MaskedContent {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s || m.a1111_name() == s).ok_or_else(|| {
            Error::Argument(format!("masked content {s:?}: expected one of {}", Self::ALL.map(|m| m.name()).join(", ")))
        })
    }
}

/// The init image of an img2img or inpainting run, at the output size (at its own size under
/// `resize_latents`).
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: RgbImage,
    /// diffusers' `strength` (A1111's "Denoising strength"), in [0, 1].
    pub strength: f64,
    /// White = repaint, at the image's size; `None`: img2img.
    pub mask: Option<GrayImage>,
    /// Only `LatentNoise` and `LatentNothing` act in the pipeline; `Fill` is applied to
    /// `image` beforehand by [`fill`].
    pub masked_content: MaskedContent,
    /// Already-encoded, scaled latents `[1 or batch, C, H/f, W/f]` to start from instead of
    /// encoding `image` (hires fix's second pass); `image` is then unused.
    pub latents: Option<Tensor>,
    /// A1111's resize mode 3: `image` is at its own size, encoded there, and its latents are
    /// stretched to the output's as `torch.nn.functional.interpolate(…, mode="bilinear")`.
    pub resize_latents: bool,
}

impl InitImage {
    pub fn validate(&self, width: usize, height: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.strength) || !self.strength.is_finite() {
            return Err(Error::Argument(format!("strength must be in [0, 1], got {}", self.strength)));
        }
        if let Some(l) = &self.latents {
            if self.mask.is_some() {
                return Err(Error::Argument("a latent start cannot be combined with a mask".into()));
            }
            let d = l.dims();
            if d.len() != 4 {
                return Err(Error::Argument(format!("start latents have shape {d:?}, expected [batch, channels, h, w]")));
            }
            return Ok(());
        }
        let (w, h) = self.image.dimensions();
        if self.resize_latents {
            if self.mask.is_some() {
                return Err(Error::Argument("a latent resize cannot be combined with a mask".into()));
            }
            return Ok(());
        }
        if (w as usize, h as usize) != (width, height) {
            return Err(Error::Argument(format!("init image is {w}x{h}, but the output is {width}x{height}: resize it first")));
        }
        if let Some(m) = &self.mask {
            if m.dimensions() != (w, h) {
                let (mw, mh) = m.dimensions();
                return Err(Error::Argument(format!("mask is {mw}x{mh}, but the init image is {w}x{h}: they must be the same size")));
            }
        }
        Ok(())
    }
}

/// `[1, 3, H, W]` in [-1, 1]: diffusers' `VaeImageProcessor.preprocess` (÷255 in float32, then
/// `2x − 1`).
pub fn image_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0).collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?.to_device(device)?)
}

/// The mask as diffusers' mask processor binarises it: 1 where the 8-bit value ÷ 255 ≥ 0.5.
pub fn binary_mask(mask: &GrayImage) -> Vec<f32> {
    mask.as_raw().iter().map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect()
}

/// `torch.nn.functional.interpolate(mask, size=(h, w))` (mode "nearest"): source index
/// `floor(dst · in / out)`.
pub fn downsample_nearest(mask: &[f32], (in_h, in_w): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let (sy, sx) = (in_h as f32 / h as f32, in_w as f32 / w as f32);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let iy = ((y as f32 * sy).floor() as usize).min(in_h - 1);
        for x in 0..w {
            let ix = ((x as f32 * sx).floor() as usize).min(in_w - 1);
            out.push(mask[iy * in_w + ix]);
        }
    }
    out
}

/// Reads an init image. Transparency is flattened onto white, as A1111's
/// `images.flatten(img, opts.img2img_background_color)` does by default.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| Error::BadFile { path: path.into(), message: format!("not a readable image: {e}") })?;
    Ok(flatten(img))
}

/// [`load_image`] of an image in memory (an API request's).
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    image::load_from_memory(bytes).map(flatten).map_err(|e| format!("not a readable image: {e}"))
}

fn flatten(img: image::DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            o[c] = (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        }
    }
    out
}

/// Reads a mask (white = repaint). A mask with real transparency is read from its alpha (a
/// painted layer), as A1111's `create_binary_mask`; otherwise PIL's `convert("L")` luma.
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    let img = image::open(path).map_err(|e| Error::BadFile { path: path.into(), message: format!("not a readable mask image: {e}") })?;
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        if rgba.pixels().any(|p| p[3] != 255) {
            return Ok(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([if rgba.get_pixel(x, y)[3] > 128 { 255 } else { 0 }])));
        }
    }
    let rgb = img.to_rgb8();
    // PIL's ITU-R 601-2 luma in fixed point: (R·19595 + G·38470 + B·7471 + 2^15) >> 16.
    Ok(GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y);
        image::Luma([((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8])
    }))
}

/// A1111's mask blur: `cv2.GaussianBlur` along x then y with kernel size `2·⌊2.5σ + 0.5⌋ + 1`
/// and cv2's default border (reflect-101). cv2 rounds 8-bit results with fixed-point kernels;
/// we round a float result, so single values can differ by one.
pub fn blur_mask(mask: &GrayImage, sigma: f64) -> GrayImage {
    if sigma <= 0.0 {
        return mask.clone();
    }
    let k = 2 * (2.5 * sigma + 0.5) as usize + 1;
    let half = (k / 2) as i64;
    let mut kernel: Vec<f64> = (0..k).map(|i| (-((i as i64 - half) as f64).powi(2) / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|v| *v /= sum);
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let reflect = |i: i64, n: i64| -> i64 {
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let m = i.rem_euclid(period);
        if m < n { m } else { period - m }
    };
    let src: Vec<f64> = mask.as_raw().iter().map(|&v| v as f64).collect();
    let mut tmp = vec![0f64; src.len()];
    for y in 0..h {
        for x in 0..w {
            tmp[(y * w + x) as usize] = kernel.iter().enumerate().map(|(i, kv)| kv * src[(y * w + reflect(x + i as i64 - half, w)) as usize]).sum::<f64>().round();
        }
    }
    GrayImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as i64, y as i64);
        let v: f64 = kernel.iter().enumerate().map(|(i, kv)| kv * tmp[(reflect(y + i as i64 - half, h) * w + x) as usize]).sum();
        image::Luma([v.round().clamp(0.0, 255.0) as u8])
    })
}

/// Three passes of a running box blur that together have variance σ² (PIL's `GaussianBlur` is
/// built the same way, with fractional box edges; ours uses whole pixels), edges clamped.
/// Works on premultiplied RGBA in f32.
fn box_gaussian(data: &mut [f32], w: usize, h: usize, sigma: f64) {
    if sigma <= 0.0 {
        return;
    }
    let r = (((4.0 * sigma * sigma + 1.0).sqrt() - 1.0) / 2.0).round().max(1.0) as i64;
    let mut line = Vec::new();
    for _ in 0..3 {
        for (len, count, stride, step) in [(w, h, w * 4, 4), (h, w, 4, w * 4)] {
            for j in 0..count {
                for c in 0..4 {
                    let base = j * stride + c;
                    line.clear();
                    line.extend((0..len).map(|i| data[base + i * step]));
                    let at = |i: i64| line[i.clamp(0, len as i64 - 1) as usize];
                    let mut acc: f32 = (-r..=r).map(at).sum();
                    let n = (2 * r + 1) as f32;
                    for i in 0..len as i64 {
                        data[base + i as usize * step] = acc / n;
                        acc += at(i + r + 1) - at(i - r);
                    }
                }
            }
        }
    }
}

/// A1111's `masking.fill`: the masked area painted with the surrounding colours, blurred at
/// radii 256, 64, 16 (twice), 4 (four times), 2 (twice) and 0, each composited over the last,
/// so that "fill" starts the repaint from plausible colours rather than from what was there.
pub fn fill(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    // Premultiplied RGBA with alpha = 1 − mask.
    let mut masked = vec![0f32; w * h * 4];
    for (i, (p, m)) in image.pixels().zip(mask.pixels()).enumerate() {
        let a = 1.0 - m[0] as f32 / 255.0;
        for c in 0..3 {
            masked[i * 4 + c] = p[c] as f32 / 255.0 * a;
        }
        masked[i * 4 + 3] = a;
    }
    let mut out = vec![0f32; w * h * 4]; // straight RGBA, starts transparent
    for (radius, repeats) in [(256.0, 1), (64.0, 1), (16.0, 2), (4.0, 4), (2.0, 2), (0.0, 1)] {
        let mut blurred = masked.clone();
        box_gaussian(&mut blurred, w, h, radius);
        for _ in 0..repeats {
            for i in 0..w * h {
                let sa = blurred[i * 4 + 3];
                if sa <= 0.0 {
                    continue;
                }
                let da = out[i * 4 + 3];
                let oa = sa + da * (1.0 - sa);
                for c in 0..3 {
                    let sc = blurred[i * 4 + c] / sa;
                    out[i * 4 + c] = (sc * sa + out[i * 4 + c] * da * (1.0 - sa)) / oa;
                }
                out[i * 4 + 3] = oa;
            }
        }
    }
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = (y as usize * w + x as usize) * 4;
        image::Rgb([0, 1, 2].map(|c| (out[i + c] * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

/// A1111's "only masked" crop: the mask's bounding box grown by `pad` (`get_crop_region_v2`),
/// then widened to the output's aspect ratio inside the image (`expand_crop_region`).
/// `None` when the mask is empty. Returns `(x1, y1, x2, y2)`, exclusive ends.
pub fn crop_region(mask: &GrayImage, pad: u32, out_w: usize, out_h: usize) -> Option<(u32, u32, u32, u32)> {
    let (w, h) = mask.dimensions();
    let (mut x1, mut y1, mut x2, mut y2) = (w, h, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] != 0 {
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    if x2 == 0 {
        return None;
    }
    let (x1, y1, x2, y2) = (x1.saturating_sub(pad) as i64, y1.saturating_sub(pad) as i64, (x2 + pad).min(w) as i64, (y2 + pad).min(h) as i64);
    let (mut x1, mut y1, mut x2, mut y2) = (x1, y1, x2, y2);
    let (iw, ih) = (w as i64, h as i64);
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_out = out_w as f64 / out_h as f64;
    // A1111 grows the short side around its centre to `desired`, slides it back inside
    // `[0, limit)`, and clips. Python's `//` floors; the difference is never negative here.
    let grow = |lo: &mut i64, hi: &mut i64, desired: f64, limit: i64| {
        let diff = (desired - (*hi - *lo) as f64) as i64;
        *lo -= diff.div_euclid(2);
        *hi += diff - diff.div_euclid(2);
        if *hi >= limit {
            let d = *hi - limit;
            *hi -= d;
            *lo -= d;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        *hi = (*hi).min(limit);
    };
    if ratio_crop > ratio_out {
        grow(&mut y1, &mut y2, (x2 - x1) as f64 / ratio_out, ih);
    } else {
        grow(&mut x1, &mut x2, (y2 - y1) as f64 * ratio_out, iw);
    }
    Some((x1 as u32, y1 as u32, x2 as u32, y2 as u32))
}

/// Lanczos resampling of an image or a mask, as A1111's `images.resize_image` does without an
/// upscaler model: PIL's `resize(…, LANCZOS)`, which [`resample`] is bit for bit.
pub fn resize<P>(img: &image::ImageBuffer<P, Vec<u8>>, w: u32, h: u32) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8>,
{
    resample::resize(img, w, h, Filter::Lanczos)
}

/// A1111's `Upscaler.upscale(img, scale)` (`modules/upscaler.py`): `step(image, scale)` runs
/// until the image is at least `scale ×` the original rounded down to 8 pixels (at most three
/// times, and not again once a step leaves the size unchanged; at scale 1, once), then Lanczos
/// to that rounded size.
pub fn a1111_upscale<I: Upscalable, E>(img: &I, scale: f64, mut step: impl FnMut(&I, f64) -> std::result::Result<I, E>) -> std::result::Result<I, E> {
    let mut im = img.clone();
    let (dest_w, dest_h) = a1111_upscaled_size(img.size(), scale);
    for i in 0..3 {
        let (w, h) = im.size();
        if w >= dest_w && h >= dest_h && (i > 0 || scale != 1.0) {
            break;
        }
        let before = im.size();
        im = step(&im, scale)?;
        if im.size() == before {
            break;
        }
    }
    // Pillow refuses an empty size; below 8 pixels A1111 fails where we skip this resize.
    if im.size() != (dest_w, dest_h) && dest_w > 0 && dest_h > 0 {
        im = im.lanczos(dest_w, dest_h);
    }
    Ok(im)
}

/// What [`a1111_upscale`] needs of a picture: its size and Pillow's Lanczos `resize` (which
/// premultiplies an RGBA picture's alpha; a plain buffer is resized band by band).
pub trait Upscalable: Clone {
    fn size(&self) -> (u32, u32);
    fn lanczos(&self, w: u32, h: u32) -> Self;
}

impl<P: image::Pixel<Subpixel = u8>> Upscalable for image::ImageBuffer<P, Vec<u8>> {
    fn size(&self) -> (u32, u32) {
        self.dimensions()
    }
    fn lanczos(&self, w: u32, h: u32) -> Self {
        resize(self, w, h)
    }
}

/// The size [`a1111_upscale`] ends at: `scale ×` each side, rounded down to 8 pixels
/// (`int((w * scale) // 8 * 8)`).
pub fn a1111_upscaled_size((w, h): (u32, u32), scale: f64) -> (u32, u32) {
    let side = |n: u32| ((n as f64 * scale) / 8.0).floor() as u32 * 8;
    (side(w), side(h))
}

/// A1111's `resize_image` with an upscaler (`modules/images.py`'s inner `resize`): when
/// enlarging, [`a1111_upscale`] by the larger of the two axes' ratios; then Lanczos to exactly
/// `w × h`.
pub fn upscale_with<E>(img: &RgbImage, w: u32, h: u32, step: impl FnMut(&RgbImage, f64) -> std::result::Result<RgbImage, E>) -> std::result::Result<RgbImage, E> {
    let scale = (w as f64 / img.width() as f64).max(h as f64 / img.height() as f64);
    let im = if scale > 1.0 { a1111_upscale(img, scale, step)? } else { img.clone() };
    Ok(resize(&im, w, h))
}

/// A1111's img2img "Resize mode": how an init image (and its mask) of another shape is fitted
/// to the output size. Written as `just_resize` and the like; read also in A1111's words
/// (`"Crop and resize"`) and numbers (0, 1, 2), as the command line takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", try_from = "ResizeModeText")]
pub enum ResizeMode {
    /// Stretched to the size (A1111's default).
    #[default]
    JustResize,
    /// Scaled to cover the size, keeping its aspect ratio, and cropped around the centre.
    CropAndResize,
    /// Scaled to fit inside, keeping its aspect ratio; the bands left are filled by stretching
    /// the image's edge rows or columns.
    ResizeAndFill,
    /// A1111's "Just resize (latent upscale)" (its number 3): the image is encoded at its own
    /// size and its latents are stretched bilinearly to the output's. An img2img mode only; in
    /// pixels [`resize_to`] fits as A1111's `resize_image(3, …)` does, by its last branch,
    /// resize and fill.
    #[serde(rename = "just_resize_latent_upscale")]
    LatentUpscale,
}

impl ResizeMode {
    /// The modes that fit pixels, and so a ControlNet map (sd-webui-controlnet's three).
    pub const ALL: [ResizeMode; 3] = [Self::JustResize, Self::CropAndResize, Self::ResizeAndFill];
    /// A1111's img2img modes, in its order (its API's numbers).
    pub const IMG2IMG: [ResizeMode; 4] = [Self::JustResize, Self::CropAndResize, Self::ResizeAndFill, Self::LatentUpscale];
    pub fn name(self) -> &'static str {
        match self {
            Self::JustResize => "just_resize",
            Self::CropAndResize => "crop_and_resize",
            Self::ResizeAndFill => "resize_and_fill",
            Self::LatentUpscale => "just_resize_latent_upscale",
        }
    }
    /// As A1111 labels it.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::JustResize => "Just resize",
            Self::CropAndResize => "Crop and resize",
            Self::ResizeAndFill => "Resize and fill",
            Self::LatentUpscale => "Just resize (latent upscale)",
        }
    }
    /// A1111's API number (`resize_mode`: 0, 1, 2, 3).
    pub fn from_a1111_index(i: u64) -> Option<Self> {
        Self::IMG2IMG.get(i as usize).copied()
    }
    /// Whether the mode fits pixels (every mode but the latent upscale).
    pub fn fits_pixels(self) -> bool {
        self != Self::LatentUpscale
    }

    /// A ControlNet unit's mode as sd-webui-controlnet reads one (`resize_mode_from_value`):
    /// its three names (and their old aliases) or numbers, where 3, img2img's latent upscale,
    /// and any larger number fall back to Just Resize.
    pub fn parse_control(s: &str) -> Result<Self> {
        if let Ok(n) = s.trim().parse::<u64>() {
            return Ok(Self::ALL.get(n as usize).copied().unwrap_or(Self::JustResize));
        }
        s.parse::<Self>().ok().filter(|m| m.fits_pixels()).ok_or_else(|| {
            Error::Argument(format!("control resize mode {s:?}: expected one of {} (or 0, 1, 2)", Self::ALL.map(|m| m.name()).join(", ")))
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ResizeModeText {
    Number(u64),
    Name(String),
}

impl TryFrom<ResizeModeText> for ResizeMode {
    type Error = String;
    fn try_from(t: ResizeModeText) -> std::result::Result<Self, String> {
        match t {
            ResizeModeText::Number(n) => Self::from_a1111_index(n).ok_or_else(|| format!("resize mode {n}: expected 0, 1, 2 or 3")),
            ResizeModeText::Name(s) => s.parse().map_err(|e: Error| e.to_string()),
        }
    }
}

impl FromStr for ResizeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // sd-webui-controlnet's names from its older versions, which its API still takes.
        match s.trim().to_ascii_lowercase().as_str() {
            "envelope (outer fit)" | "outer fit (shrink to fit)" | "outer fit" => return Ok(Self::ResizeAndFill),
            "scale to fit (inner fit)" | "inner fit (scale to fit)" | "inner fit" => return Ok(Self::CropAndResize),
            _ => {}
        }
        let key = s.trim().to_ascii_lowercase().replace(['-', ' '], "_").replace(['(', ')'], "");
        Self::IMG2IMG
            .into_iter()
            .find(|m| m.name() == key || key.parse::<u64>().ok().and_then(Self::from_a1111_index) == Some(*m))
            .ok_or_else(|| Error::Argument(format!("resize mode {s:?}: expected one of {} (or A1111's 0, 1, 2, 3)", Self::IMG2IMG.map(|m| m.name()).join(", "))))
    }
}

/// `img` fitted to `w`×`h` as A1111's `images.resize_image(resize_mode, …)` does without an
/// upscaler model: the scaled sizes use its integer arithmetic (`im.width * height //
/// im.height`), the image is pasted at `(w // 2 - src_w // 2, h // 2 - src_h // 2)` on black,
/// and "resize and fill" fills each band with PIL's resize of a zero-height (or zero-width) box
/// at the edge, which extrapolates the edge rows, leaving a remainder row black where A1111
/// does. A1111 passes no filter there, so the bands are Pillow's default, bicubic, while the
/// scaling is Lanczos ([`resize`]). Bit for bit A1111's.
pub fn resize_to<P>(mode: ResizeMode, img: &image::ImageBuffer<P, Vec<u8>>, w: u32, h: u32) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8>,
{
    let (iw, ih) = img.dimensions();
    if mode == ResizeMode::JustResize || iw == 0 || ih == 0 {
        return resize(img, w, h);
    }
    // ratio vs src_ratio, as w/h against iw/ih, compared exactly.
    let (lhs, rhs) = (w as u64 * ih as u64, iw as u64 * h as u64);
    let scaled_w = ((iw as u64 * h as u64) / ih as u64).max(1) as u32;
    let scaled_h = ((ih as u64 * w as u64) / iw as u64).max(1) as u32;
    let (src_w, src_h) = match mode {
        ResizeMode::CropAndResize => (if lhs > rhs { w } else { scaled_w }, if lhs <= rhs { h } else { scaled_h }),
        _ => (if lhs < rhs { w } else { scaled_w }, if lhs >= rhs { h } else { scaled_h }),
    };
    let resized = resize(img, src_w, src_h);
    let mut out = image::ImageBuffer::<P, Vec<u8>>::new(w, h);
    let (ox, oy) = ((w / 2) as i64 - (src_w / 2) as i64, (h / 2) as i64 - (src_h / 2) as i64);
    image::imageops::replace(&mut out, &resized, ox, oy);
    if mode == ResizeMode::CropAndResize {
        return out;
    }
    // Each band is `resized.resize(band, box=<the edge, zero rows or columns thick>)`.
    let band = |bw: u32, bh: u32, region: [f32; 4]| resample::resize_region(&resized, bw, bh, Filter::Bicubic, region).expect("an edge box lies on the image");
    if lhs < rhs {
        let fill = (h / 2).saturating_sub(src_h / 2);
        if fill > 0 {
            image::imageops::replace(&mut out, &band(w, fill, [0.0, 0.0, w as f32, 0.0]), 0, 0);
            let bottom = band(w, fill, [0.0, src_h as f32, w as f32, src_h as f32]);
            image::imageops::replace(&mut out, &bottom, 0, (fill + src_h) as i64);
        }
    } else if lhs > rhs {
        let fill = (w / 2).saturating_sub(src_w / 2);
        if fill > 0 {
            image::imageops::replace(&mut out, &band(fill, h, [0.0, 0.0, 0.0, h as f32]), 0, 0);
            let right = band(fill, h, [src_w as f32, 0.0, src_w as f32, h as f32]);
            image::imageops::replace(&mut out, &right, (fill + src_w) as i64, 0);
        }
    }
    out
}

/// A1111's overlay after inpainting: the original where `overlay_mask` is 0, the generated
/// image where it is 255, blended between (the blurred mask is the alpha). With `paste`, the
/// generated image is first resized into that region of the original (`apply_overlay`).
pub fn overlay(original: &RgbImage, generated: &RgbImage, overlay_mask: &GrayImage, paste: Option<(u32, u32, u32, u32)>) -> RgbImage {
    let base = match paste {
        Some((x1, y1, x2, y2)) => {
            let mut base = original.clone();
            // A1111's `apply_overlay`: `resize_image(1, …)`, crop and resize.
            let patch = resize_to(ResizeMode::CropAndResize, generated, x2 - x1, y2 - y1);
            image::imageops::replace(&mut base, &patch, x1 as i64, y1 as i64);
            base
        }
        None => generated.clone(),
    };
    RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let a = 1.0 - overlay_mask.get_pixel(x, y)[0] as f32 / 255.0; // the original's alpha
        let (o, g) = (original.get_pixel(x, y), base.get_pixel(x, y));
        image::Rgb([0, 1, 2].map(|c| (o[c] as f32 * a + g[c] as f32 * (1.0 - a)).round() as u8))
    })
}

/// A1111's whole-picture overlay mask: the blurred mask doubled and clipped, so the generated
/// image shows fully from half-way up the blur's edge.
pub fn whole_picture_overlay_mask(blurred: &GrayImage) -> GrayImage {
    GrayImage::from_fn(blurred.width(), blurred.height(), |x, y| image::Luma([(blurred.get_pixel(x, y)[0] as u32 * 2).min(255) as u8]))
}

/// Outpainting: the image on a canvas grown by `(left, top, right, bottom)` pixels, the new
/// border filled (A1111's `fill`) and masked white for repainting.
pub fn outpaint_canvas(image: &RgbImage, (l, t, r, b): (u32, u32, u32, u32)) -> (RgbImage, GrayImage) {
    let (w, h) = (image.width() + l + r, image.height() + t + b);
    let mut canvas = RgbImage::new(w, h);
    image::imageops::replace(&mut canvas, image, l as i64, t as i64);
    let mask = GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= l && x < l + image.width() && y >= t && y < t + image.height();
        image::Luma([if inside { 0 } else { 255 }])
    });
    (fill(&canvas, &mask), mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A1111's `resize_image` geometry on shapes where the scaled image is the image itself,
    /// so the expected pixels are exact: crop keeps the centre, fill stretches the edge columns
    /// or rows, and the names parse as A1111 and our flags write them.
    #[test]
    fn resize_modes_follow_a1111() {
        for (name, mode) in [("Crop and Resize", ResizeMode::CropAndResize), ("Envelope (Outer Fit)", ResizeMode::ResizeAndFill), ("Inner Fit (Scale to Fit)", ResizeMode::CropAndResize), ("2", ResizeMode::ResizeAndFill), ("Just resize (latent upscale)", ResizeMode::LatentUpscale), ("3", ResizeMode::LatentUpscale)] {
            assert_eq!(name.parse::<ResizeMode>().unwrap(), mode, "{name}");
            let v: ResizeMode = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(v, mode, "{name} in a manifest");
            assert_eq!(mode.a1111_name().parse::<ResizeMode>().unwrap(), mode, "A1111's words read back");
            assert_eq!(serde_json::to_value(mode).unwrap(), serde_json::json!(mode.name()));
        }
        assert!(!ResizeMode::LatentUpscale.fits_pixels());
        let wide = RgbImage::from_fn(40, 20, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 3]));
        let crop = resize_to(ResizeMode::CropAndResize, &wide, 20, 20);
        assert_eq!(crop.dimensions(), (20, 20));
        assert!(crop.enumerate_pixels().all(|(x, y, p)| p == wide.get_pixel(x + 10, y)), "crop keeps columns 10..30");
        // The bands' values are Pillow's (`im.resize((10, 40), box=(0, 0, 0, 40))`, its default
        // bicubic, and the same at the other edges), which extrapolate the edge: 95, 90, 85 give 96.
        let tall = RgbImage::from_fn(20, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 3, 9]));
        let fill = resize_to(ResizeMode::ResizeAndFill, &tall, 40, 40);
        for (x, y, p) in fill.enumerate_pixels() {
            let want = match x {
                0..10 => image::Rgb([0, y as u8 * 3, 9]),
                10..30 => *tall.get_pixel(x - 10, y),
                _ => image::Rgb([96, y as u8 * 3, 9]),
            };
            assert_eq!(p, &want, "({x}, {y})");
        }
        // Wider than the canvas's ratio: row bands, and an odd remainder row left black, as
        // A1111's paste offsets leave it.
        let fill = resize_to(ResizeMode::ResizeAndFill, &wide, 40, 25);
        assert_eq!(fill.get_pixel(7, 0), &image::Rgb([35, 0, 3]));
        assert_eq!(fill.get_pixel(7, 2), wide.get_pixel(7, 0));
        assert_eq!(fill.get_pixel(7, 12), wide.get_pixel(7, 10));
        assert_eq!(fill.get_pixel(7, 22), &image::Rgb([35, 134, 3]));
        assert_eq!(fill.get_pixel(7, 24), &image::Rgb([0, 0, 0]));
        let column = GrayImage::from_raw(1, 3, vec![200, 0, 100]).unwrap();
        let edge = resample::resize_region(&column, 1, 2, Filter::Lanczos, [0.0, 0.0, 1.0, 0.0]).unwrap();
        assert_eq!(edge.as_raw(), &vec![249, 249], "Pillow: rows 200, 0, 100 extrapolate to 249");
        let mask = GrayImage::from_fn(40, 20, |x, _| image::Luma([if x < 20 { 0 } else { 255 }]));
        assert_eq!(resize_to(ResizeMode::CropAndResize, &mask, 20, 20).get_pixel(12, 3)[0], 255);
        assert_eq!(resize_to(ResizeMode::JustResize, &wide, 20, 20), resize(&wide, 20, 20));
        for (s, m) in [("Crop and resize", ResizeMode::CropAndResize), ("resize-and-fill", ResizeMode::ResizeAndFill), ("0", ResizeMode::JustResize), ("2", ResizeMode::ResizeAndFill)] {
            assert_eq!(s.parse::<ResizeMode>().unwrap(), m, "{s}");
        }
        assert!("4".parse::<ResizeMode>().unwrap_err().to_string().contains("crop_and_resize"));
        // In pixels mode 3 is A1111's `resize_image` last branch: resize and fill.
        assert_eq!(resize_to(ResizeMode::LatentUpscale, &tall, 40, 40), resize_to(ResizeMode::ResizeAndFill, &tall, 40, 40));
        // A ControlNet unit reads numbers as the extension: 3 and more are Just Resize.
        assert_eq!(ResizeMode::parse_control("3").unwrap(), ResizeMode::JustResize);
        assert_eq!(ResizeMode::parse_control("Resize and Fill").unwrap(), ResizeMode::ResizeAndFill);
        let e = ResizeMode::parse_control("just_resize_latent_upscale").unwrap_err().to_string();
        assert!(e.ends_with("expected one of just_resize, crop_and_resize, resize_and_fill (or 0, 1, 2)"), "{e}");
    }

    /// A1111's `images.resize_image` in its three modes (every fill direction, odd remainders,
    /// masks) and its "Lanczos" and "Nearest" upscalers, from goldens written with Pillow
    /// following A1111's code: equal byte for byte.
    #[test]
    fn resize_image_equals_a1111() {
        use crate::resample::tests::{fixtures, gray, rgb};
        use crate::sdxl::upscale::Upscaler;
        let (cases, tensors) = fixtures();
        let mut checked = 0;
        for case in cases.iter().filter(|c| c["kind"] != "resize") {
            let key = case["key"].as_str().unwrap();
            let source = &tensors[&format!("source.{}", case["source"].as_str().unwrap())];
            let size: Vec<u32> = case["size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = match (case["kind"].as_str().unwrap(), source.2) {
                ("resize_image", c) => {
                    let mode = ResizeMode::from_a1111_index(case["mode"].as_u64().unwrap()).unwrap();
                    if c == 1 { resize_to(mode, &gray(source), size[0], size[1]).into_raw() } else { resize_to(mode, &rgb(source), size[0], size[1]).into_raw() }
                }
                ("upscaler", _) => case["upscaler"].as_str().unwrap().parse::<Upscaler>().unwrap().upscale_image(&rgb(source), size[0], size[1]).into_raw(),
                (kind, _) => panic!("kind {kind}"),
            };
            let want = &tensors[key];
            let diff = got.iter().zip(&want.3).filter(|(a, b)| a != b).count();
            assert_eq!((got.len(), diff), (want.3.len(), 0), "{key}: {diff} bytes differ from A1111's");
            checked += 1;
        }
        assert_eq!(checked, 88, "every resize_image and upscaler case ran");
    }

    #[test]
    fn crop_region_follows_a1111() {
        // A 10x10 mark at (40..50, 20..30) in a 100x80 mask, padding 5, square output: the
        // 20x20 box stays square and is placed inside the image.
        let mut m = GrayImage::new(100, 80);
        for y in 20..30 {
            for x in 40..50 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        assert_eq!(crop_region(&m, 5, 64, 64), Some((35, 15, 55, 35)));
        // Wide output: the box widens to 2:1 around its centre.
        assert_eq!(crop_region(&m, 5, 128, 64), Some((25, 15, 65, 35)));
        // Near the edge the box slides back inside.
        assert_eq!(crop_region(&m, 5, 512, 64), Some((0, 15, 100, 35)));
        assert_eq!(crop_region(&GrayImage::new(8, 8), 4, 8, 8), None);
    }

    #[test]
    fn mask_blur_keeps_hard_masks_binary_inside_and_softens_edges() {
        let mut m = GrayImage::new(32, 8);
        for y in 0..8 {
            for x in 16..32 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        let b = blur_mask(&m, 4.0);
        assert_eq!(b.get_pixel(0, 4)[0], 0);
        assert_eq!(b.get_pixel(31, 4)[0], 255);
        let edge = b.get_pixel(16, 4)[0];
        assert!((120..=140).contains(&edge), "{edge}");
        assert_eq!(blur_mask(&m, 0.0), m);
    }

    #[test]
    fn fill_paints_the_hole_with_surrounding_colour_and_keeps_the_rest() {
        let img = RgbImage::from_fn(32, 32, |_, _| image::Rgb([200, 40, 10]));
        let mut hole = img.clone();
        let mut m = GrayImage::new(32, 32);
        for y in 12..20 {
            for x in 12..20 {
                m.put_pixel(x, y, image::Luma([255]));
                hole.put_pixel(x, y, image::Rgb([0, 255, 0]));
            }
        }
        let f = fill(&hole, &m);
        assert_eq!(f.get_pixel(0, 0), &image::Rgb([200, 40, 10]));
        let c = f.get_pixel(16, 16);
        assert!((c[0] as i32 - 200).abs() <= 2 && (c[1] as i32 - 40).abs() <= 2, "{c:?}");
    }

    #[test]
    fn masked_content_names() {
        for m in MaskedContent::ALL {
            assert_eq!(m.name().parse::<MaskedContent>().unwrap(), m);
            assert_eq!(m.a1111_name().parse::<MaskedContent>().unwrap(), m);
        }
        assert!("blank".parse::<MaskedContent>().unwrap_err().to_string().contains("latent_noise"));
    }
}
