//! An img2img / inpainting job's inputs as A1111's img2img tab prepares them (outpaint canvas,
//! mask blur, "only masked" crop, "fill"), and the overlay that puts the result back, shared
//! by the CLI and the app so both give the same pictures.

use std::path::Path;

use image::{GrayImage, RgbImage};

use super::settings::{InitSettings, InpaintArea};
use crate::error::{Error, Result};
use crate::sdxl::img2img::{self, InitImage, MaskedContent};

/// What the pipeline gets, and what turns its output into the final picture.
#[derive(Debug, Clone)]
pub struct PreparedInit {
    pub init: InitImage,
    /// The generation size (the init image's, rounded down to the VAE's factor, unless set).
    pub width: usize,
    pub height: usize,
    original: RgbImage,
    overlay_mask: Option<GrayImage>,
    paste: Option<(u32, u32, u32, u32)>,
    /// Set when "only masked" found nothing to crop and fell back to the whole picture.
    pub note: Option<String>,
}

impl PreparedInit {
    /// A ControlNet unit's map in the frame this run generates. "Only masked" generates the
    /// mask's crop, so the map is cropped to the same region (scaled to the map's own size) and
    /// fitted with resize and fill, as sd-webui-controlnet does; otherwise the map is unchanged.
    pub fn fit_control(&self, unit: &mut crate::sdxl::controlnet::ControlUnit) {
        if let Some(map) = self.crop_control_map(&unit.image) {
            unit.image = map;
            unit.resize_mode = img2img::ResizeMode::ResizeAndFill;
        }
    }

    /// The region of `map` that "only masked" generates, or `None` when the whole picture is.
    fn crop_control_map(&self, map: &RgbImage) -> Option<RgbImage> {
        let (x1, y1, x2, y2) = self.paste?;
        let (cw, ch) = self.original.dimensions();
        let (iw, ih) = map.dimensions();
        if cw == 0 || ch == 0 || iw == 0 || ih == 0 {
            return None;
        }
        let sx = |v: u32| ((v as u64 * iw as u64) / cw as u64) as u32;
        let sy = |v: u32| ((v as u64 * ih as u64) / ch as u64) as u32;
        let (x, y) = (sx(x1).min(iw - 1), sy(y1).min(ih - 1));
        let (w, h) = (sx(x2).saturating_sub(x).max(1).min(iw - x), sy(y2).saturating_sub(y).max(1).min(ih - y));
        Some(image::imageops::crop_imm(map, x, y, w, h).to_image())
    }

    /// The generated image with the original kept outside the mask (A1111's overlay); img2img
    /// results pass through.
    pub fn finish(&self, generated: &RgbImage) -> RgbImage {
        match &self.overlay_mask {
            Some(m) => img2img::overlay(&self.original, generated, m, self.paste),
            None => generated.clone(),
        }
    }
}

/// Reads and prepares `s` for a run at `size` (`None`: the init image's own size).
pub fn prepare_init(s: &InitSettings, size: (Option<usize>, Option<usize>), factor: usize) -> Result<PreparedInit> {
    if !(0.0..=1.0).contains(&s.strength) || !s.strength.is_finite() {
        return Err(Error::Argument(format!("strength (denoising strength) must be in [0, 1], got {}", s.strength)));
    }
    if !(0.0..=256.0).contains(&s.mask_blur) {
        return Err(Error::Argument(format!("mask blur must be in [0, 256] pixels, got {}", s.mask_blur)));
    }
    if s.image.is_empty() {
        // What a restore from A1111's text leaves: its img2img fields, not its image.
        return Err(Error::Argument("init image: none given (img2img, inpainting and outpainting start from an image file)".into()));
    }
    let image_path = Path::new(&s.image);
    let mut image = img2img::load_image(image_path)?;
    let mut mask = match &s.mask {
        Some(m) => {
            let mask = img2img::load_mask(Path::new(m))?;
            if mask.dimensions() != image.dimensions() {
                return Err(Error::BadFile {
                    path: m.into(),
                    message: format!(
                        "the mask is {}x{}, but the init image {} is {}x{}: they must be the same size",
                        mask.width(),
                        mask.height(),
                        s.image,
                        image.width(),
                        image.height()
                    ),
                });
            }
            Some(mask)
        }
        None => None,
    };
    if let Some(pad) = s.outpaint {
        // The grown canvas is checked before it is allocated.
        let (w, h) = (image.width() as u64 + pad[0] as u64 + pad[2] as u64, image.height() as u64 + pad[1] as u64 + pad[3] as u64);
        let max = crate::sdxl::pipeline::MAX_SIDE as u64;
        if w > max || h > max {
            return Err(Error::Argument(format!("outpaint: the canvas would be {w}x{h}: expected at most {max} pixels a side")));
        }
        let (canvas, border) = img2img::outpaint_canvas(&image, (pad[0], pad[1], pad[2], pad[3]));
        let union = match &mask {
            Some(m) => {
                let mut u = border.clone();
                image::imageops::replace(&mut u, m, pad[0] as i64, pad[1] as i64);
                for (o, b) in u.pixels_mut().zip(border.pixels()) {
                    o[0] = o[0].max(b[0]);
                }
                u
            }
            None => border,
        };
        image = canvas;
        mask = Some(union);
    }
    let round = |v: u32| (v as usize / factor) * factor;
    let width = size.0.unwrap_or_else(|| round(image.width()));
    let height = size.1.unwrap_or_else(|| round(image.height()));
    if width == 0 || height == 0 {
        return Err(Error::BadFile {
            path: image_path.into(),
            message: format!("the init image is {}x{}: smaller than one latent pixel ({factor}x{factor})", image.width(), image.height()),
        });
    }
    let (w, h) = (width as u32, height as u32);
    let plain = |image: RgbImage, note: Option<String>| {
        // Resize mode 3 hands the pipeline the image as it is: it is encoded at its own size.
        let resize_latents = s.resize_mode == img2img::ResizeMode::LatentUpscale && image.dimensions() != (w, h);
        let image_in = if resize_latents { image.clone() } else { img2img::resize_to(s.resize_mode, &image, w, h) };
        let init = InitImage { image: image_in, strength: s.strength, mask: None, masked_content: MaskedContent::Original, latents: None, resize_latents };
        PreparedInit { init, width, height, original: image, overlay_mask: None, paste: None, note }
    };
    let Some(mask) = mask else {
        return Ok(plain(image, None));
    };
    let blurred = img2img::blur_mask(&mask, s.mask_blur);
    let crop = match s.inpaint_area {
        InpaintArea::OnlyMasked => match img2img::crop_region(&blurred, s.padding, width, height) {
            Some(c) => Some(c),
            // A1111 drops the mask then: 'Unable to perform "Inpaint Only mask" because mask is
            // blank, switch to img2img mode.'
            None => return Ok(plain(image, Some("only masked: the mask is blank, so the whole picture goes through img2img (as A1111)".to_string()))),
        },
        InpaintArea::WholePicture => None,
    };
    let note = None;
    let (work_image, work_mask, original, overlay_mask) = match crop {
        Some((x1, y1, x2, y2)) => {
            let ci = image::imageops::crop_imm(&image, x1, y1, x2 - x1, y2 - y1).to_image();
            let cm = image::imageops::crop_imm(&blurred, x1, y1, x2 - x1, y2 - y1).to_image();
            // A1111 fits the crop with "resize and fill" (`resize_image(2, …)`): the crop has the
            // output's aspect ratio unless the image's edges cut it short.
            let fit = img2img::ResizeMode::ResizeAndFill;
            (img2img::resize_to(fit, &ci, w, h), img2img::resize_to(fit, &cm, w, h), image, blurred)
        }
        None if s.resize_mode == img2img::ResizeMode::LatentUpscale && image.dimensions() != (w, h) => {
            // A1111 fits the mask in pixels (resize and fill) but the picture in latents, so
            // the two no longer cover the same content; its "fill" and latent fills then fail
            // and "original" pastes the own-size picture over the output's corner. Not copied.
            return Err(Error::Argument(format!(
                "resize mode \"Just resize (latent upscale)\" does not inpaint the whole picture of a {}x{} image at {w}x{h} (the mask would be fitted in pixels, the picture in latents); use Just resize, or Only masked, or the image's own size",
                image.width(),
                image.height()
            )));
        }
        None => {
            let ri = img2img::resize_to(s.resize_mode, &image, w, h);
            let rm = img2img::resize_to(s.resize_mode, &blurred, w, h);
            let overlay = img2img::whole_picture_overlay_mask(&rm);
            (ri.clone(), rm, ri, overlay)
        }
    };
    let work_image = match s.masked_content {
        MaskedContent::Original => work_image,
        _ => img2img::fill(&work_image, &work_mask),
    };
    let init = InitImage { image: work_image, strength: s.strength, mask: Some(work_mask), masked_content: s.masked_content, latents: None, resize_latents: false };
    Ok(PreparedInit { init, width, height, original, overlay_mask: Some(overlay_mask), paste: crop, note })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, img: &image::DynamicImage) -> String {
        let p = dir.join(name);
        img.save(&p).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn mask_of_another_size_and_non_image_init_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let img = write(dir.path(), "init.png", &image::DynamicImage::ImageRgb8(RgbImage::new(32, 32)));
        let mask = write(dir.path(), "mask.png", &image::DynamicImage::ImageLuma8(GrayImage::new(16, 32)));
        let s = InitSettings { image: img.clone(), mask: Some(mask.clone()), ..Default::default() };
        let e = prepare_init(&s, (None, None), 8).unwrap_err().to_string();
        assert!(e.contains("mask.png") && e.contains("16x32") && e.contains("32x32"), "{e}");
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, "hello").unwrap();
        let s = InitSettings { image: txt.to_string_lossy().into(), ..Default::default() };
        let e = prepare_init(&s, (None, None), 8).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("not a readable image"), "{e}");
        let s = InitSettings { image: img, strength: 1.5, ..Default::default() };
        assert!(prepare_init(&s, (None, None), 8).unwrap_err().to_string().contains("[0, 1]"));
    }

    #[test]
    fn only_masked_crops_and_pastes_back_keeping_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let original = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 7]));
        let img = write(dir.path(), "init.png", &image::DynamicImage::ImageRgb8(original.clone()));
        let mut m = GrayImage::new(64, 48);
        for y in 10..20 {
            for x in 30..40 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        let mask = write(dir.path(), "mask.png", &image::DynamicImage::ImageLuma8(m));
        let s = InitSettings { image: img, mask: Some(mask), mask_blur: 0.0, inpaint_area: InpaintArea::OnlyMasked, padding: 4, ..Default::default() };
        let p = prepare_init(&s, (Some(32), Some(32)), 8).unwrap();
        assert_eq!((p.width, p.height), (32, 32));
        assert_eq!(p.init.image.dimensions(), (32, 32));
        let white = RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
        let out = p.finish(&white);
        assert_eq!(out.dimensions(), (64, 48));
        assert_eq!(out.get_pixel(0, 0), original.get_pixel(0, 0));
        assert_eq!(out.get_pixel(35, 15), &image::Rgb([255, 255, 255]));
        // A ControlNet map is cropped to the same region, at its own scale.
        let (x1, y1, x2, y2) = p.paste.unwrap();
        let same = p.crop_control_map(&original).unwrap();
        assert_eq!(same, image::imageops::crop_imm(&original, x1, y1, x2 - x1, y2 - y1).to_image());
        let double = image::imageops::resize(&original, 128, 96, image::imageops::FilterType::Nearest);
        let cropped = p.crop_control_map(&double).unwrap();
        assert_eq!(cropped.dimensions(), (2 * (x2 - x1), 2 * (y2 - y1)));
        assert_eq!(cropped.get_pixel(0, 0), original.get_pixel(x1, y1));
        let whole = InitSettings { inpaint_area: InpaintArea::WholePicture, ..s.clone() };
        assert!(prepare_init(&whole, (Some(32), Some(32)), 8).unwrap().crop_control_map(&original).is_none());
    }
}
