//! img2img and inpainting equal to diffusers' `StableDiffusionXLImg2ImgPipeline` and
//! `StableDiffusionXLInpaintPipeline` (4-channel and 9-channel UNets) on the tiny pipeline
//! (goldens: tools/parity/make_img2img_fixtures.py). Bound: relative L2 ≤ 1e-3 end to end.

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use loramix::rng::BatchSeeds;
use loramix::sdxl::img2img::{self, InitImage, MaskedContent};
use loramix::{GenerateRequest, LoadOptions, SdxlPipeline};

fn dir() -> std::path::PathBuf {
    fixture("tiny2").join("img2img")
}

fn request(case: &serde_json::Value) -> GenerateRequest {
    let d = dir();
    let masked = case["kind"].as_str().unwrap() != "img2img";
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative"].as_str().map(str::to_string),
        steps: case["steps"].as_u64().unwrap() as usize,
        cfg: case["cfg"].as_f64().unwrap(),
        sampler: Some(case["sampler"].as_str().unwrap().parse().unwrap()),
        seed: case["seed"].as_u64().unwrap(),
        batch_seeds: case.get("batch_seeds").and_then(|v| v.as_str()).map_or(BatchSeeds::Shared, |v| v.parse().unwrap()),
        width: Some(32),
        height: Some(32),
        batch_size: case["batch"].as_u64().unwrap() as usize,
        init: Some(InitImage {
            image: img2img::load_image(&d.join("init.png")).unwrap(),
            strength: case["strength"].as_f64().unwrap(),
            mask: masked.then(|| img2img::load_mask(&d.join("mask.png")).unwrap()),
            masked_content: MaskedContent::Original,
            latents: None,
            resize_latents: false,
        }),
        ..Default::default()
    }
}

/// The tiny pipeline with the 9-channel inpainting UNet in place of its own.
fn inpaint_pipeline(tmp: &Path) -> SdxlPipeline {
    let root = fixture("tiny2").join("pipeline");
    for entry in std::fs::read_dir(&root).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "unet" {
            if entry.path().is_dir() {
                copy_dir(&entry.path(), &tmp.join(&name));
            } else {
                std::fs::copy(entry.path(), tmp.join(&name)).unwrap();
            }
        }
    }
    copy_dir(&dir().join("inpaint_unet"), &tmp.join("unet"));
    SdxlPipeline::load(tmp.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn img2img_and_inpainting_latents_equal_diffusers() {
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pipe9 = inpaint_pipeline(tmp.path());
    let g = candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let cases = gj.as_object().unwrap();
    assert!(cases.len() >= 17, "{} cases", cases.len());
    assert!(cases.values().any(|c| c["batch_seeds"] == "per_image"), "a case with diffusers' list of generators");
    for (key, case) in cases {
        let p = if case["kind"] == "inpaint9" { &pipe9 } else { &pipe };
        let lat = p.generate_latents(&request(case), &mut |_| true).unwrap();
        assert_close(&format!("{key} {case}"), &lat, &g[&format!("{key}.latents")], 1e-3);
    }
}

/// A1111's promise for per-image seeds: image k of a batch is the image that seed + k makes
/// alone, with an ancestral sampler (fresh noise every step) in txt2img, img2img (a posterior
/// sample per image), 4-channel and 9-channel inpainting; a shared generator's second image
/// is not.
#[test]
fn per_image_seeds_make_each_image_as_its_seed_alone() {
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pipe9 = inpaint_pipeline(tmp.path());
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let img2img = request(&gj["case1"]);
    let mut txt2img = GenerateRequest { init: None, ..img2img.clone() };
    txt2img.steps = 4;
    let inpaint = request(&gj["case12"]);
    assert!(inpaint.init.as_ref().unwrap().mask.is_some());
    let mut inpaint9 = request(&gj["case15"]);
    inpaint9.sampler = Some("euler_a".parse().unwrap());
    for (what, p, base) in [("txt2img", &pipe, txt2img), ("img2img", &pipe, img2img), ("inpaint", &pipe, inpaint), ("inpaint9", &pipe9, inpaint9)] {
        let seed = 90;
        let batch = GenerateRequest { seed, batch_size: 3, batch_seeds: BatchSeeds::PerImage, ..base.clone() };
        let lat = p.generate_latents(&batch, &mut |_| true).unwrap();
        for k in 0..3 {
            let alone = GenerateRequest { seed: seed + k as u64, batch_size: 1, batch_seeds: BatchSeeds::Shared, ..base.clone() };
            let one = p.generate_latents(&alone, &mut |_| true).unwrap();
            let d = rel_l2(&lat.narrow(0, k, 1).unwrap(), &one);
            assert!(d <= 1e-5, "{what}: image {k} of the batch vs seed {} alone: rel. L2 {d}", seed + k as u64);
        }
        let shared = GenerateRequest { seed, batch_size: 2, batch_seeds: BatchSeeds::Shared, ..base.clone() };
        let lat = p.generate_latents(&shared, &mut |_| true).unwrap();
        let alone = p.generate_latents(&GenerateRequest { seed: seed + 1, batch_size: 1, ..base.clone() }, &mut |_| true).unwrap();
        assert!(rel_l2(&lat.narrow(0, 1, 1).unwrap(), &alone) > 0.1, "{what}: a shared generator's second image is its own");
    }
}

#[test]
fn img2img_runs_only_the_strength_share_of_the_steps() {
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let mut req = request(&gj["case1"]); // euler_a, 6 steps, strength 0.75 → 4 steps
    let mut seen = vec![];
    pipe.generate_latents(&req, &mut |p| {
        seen.push((p.step, p.steps));
        true
    })
    .unwrap();
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    // Too little strength to run a step, or outside [0, 1]: clear errors.
    req.init.as_mut().unwrap().strength = 0.1;
    let e = pipe.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("no step to run"), "{e}");
    req.init.as_mut().unwrap().strength = 1.5;
    let e = pipe.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("strength must be in [0, 1]"), "{e}");
    // A mask of another size.
    req.init.as_mut().unwrap().strength = 0.5;
    req.init.as_mut().unwrap().mask = Some(image::GrayImage::new(16, 32));
    let e = pipe.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("mask is 16x32"), "{e}");
}

#[test]
fn an_inpainting_unet_refuses_text_to_image() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe9 = inpaint_pipeline(tmp.path());
    let req = GenerateRequest { prompt: "a cat".into(), steps: 2, width: Some(32), height: Some(32), ..Default::default() };
    let e = pipe9.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("inpainting UNet") && e.contains("mask"), "{e}");
}

/// A1111's latent upscalers equal `torch.nn.functional.interpolate` (align_corners=False) for
/// every mode at integer and fractional scales, and when shrinking, as img2img's resize mode 3
/// does (tools/parity/make_upscale_fixtures.py).
#[test]
fn latent_upscalers_equal_torch_interpolate() {
    use loramix::sdxl::upscale::{interpolate_latents, upscale_latents, LatentMode, Upscaler};
    let g = candle_core::safetensors::load(fixture("upscale").join("latent.safetensors"), &Device::Cpu).unwrap();
    let x = &g["input"];
    let mut n = 0;
    for (key, want) in &g {
        let Some((name, size)) = key.split_once('.') else { continue };
        let (h, w) = size.split_once('x').unwrap();
        let mode = match "Latent".parse::<Upscaler>().unwrap() {
            _ if name.starts_with("bilinear") => LatentMode::Bilinear,
            _ if name == "bicubic_aa" => LatentMode::BicubicAntialiased,
            _ if name.starts_with("bicubic") => LatentMode::Bicubic,
            _ if name == "nearest" => LatentMode::Nearest,
            _ => LatentMode::NearestExact,
        };
        let (h, w): (usize, usize) = (h.parse().unwrap(), w.parse().unwrap());
        let ours = if h >= x.dim(2).unwrap() && w >= x.dim(3).unwrap() {
            upscale_latents(x, mode, h, w).unwrap()
        } else {
            assert!(upscale_latents(x, mode, h, w).is_err(), "hires fix only enlarges");
            interpolate_latents(x, mode, h, w).unwrap()
        };
        assert_close(key, &ours, want, 1e-5);
        n += 1;
    }
    assert_eq!(n, 39);
}

/// A1111's resize mode 3, "Just resize (latent upscale)": the init image encoded at its own
/// (odd) size, the latents stretched with torch's bilinear interpolate, shrinking and
/// enlarging, through the studio's preparation as the command line and the app run it
/// (goldens: tools/parity/make_latent_resize_fixtures.py).
#[test]
fn latent_upscale_resize_mode_equals_a1111_on_diffusers() {
    use loramix::sdxl::img2img::ResizeMode;
    use loramix::studio::{prepare_init, InitSettings, InpaintArea};
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let d = dir().join("latent_resize");
    let g = candle_core::safetensors::load(d.join("golden.safetensors"), &Device::Cpu).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).unwrap()).unwrap();
    let f = pipe.vae_scale_factor();
    for (key, case) in gj.as_object().unwrap() {
        let image = d.join(case["init"].as_str().unwrap()).to_string_lossy().into_owned();
        let (w, h) = (case["width"].as_u64().unwrap() as usize, case["height"].as_u64().unwrap() as usize);
        let s = InitSettings { image, strength: case["strength"].as_f64().unwrap(), resize_mode: ResizeMode::LatentUpscale, ..Default::default() };
        let p = prepare_init(&s, (Some(w), Some(h)), f).unwrap();
        assert!(p.init.resize_latents && p.init.image.dimensions() != (w as u32, h as u32), "{key}: the image is kept at its size");
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            steps: case["steps"].as_u64().unwrap() as usize,
            cfg: case["cfg"].as_f64().unwrap(),
            sampler: Some(case["sampler"].as_str().unwrap().parse().unwrap()),
            seed: case["seed"].as_u64().unwrap(),
            width: Some(w),
            height: Some(h),
            batch_size: case["batch"].as_u64().unwrap() as usize,
            init: Some(p.init.clone()),
            ..Default::default()
        };
        let lat = pipe.generate_latents(&req, &mut |_| true).unwrap();
        assert_close(&format!("{key} {case}"), &lat, &g[&format!("{key}.latents")], 1e-3);
        // A plain resize of the same picture is another start.
        let plain = prepare_init(&InitSettings { resize_mode: ResizeMode::JustResize, ..s.clone() }, (Some(w), Some(h)), f).unwrap();
        let other = pipe.generate_latents(&GenerateRequest { init: Some(plain.init), ..req.clone() }, &mut |_| true).unwrap();
        assert!(rel_l2(&other, &lat) > 1e-2, "{key}: resize mode 3 differs from just resize");
    }
    // Whole-picture inpainting at another size has no latent resize (A1111 fails there too);
    // "only masked" fits its crop in pixels, as A1111's, and works.
    let tmp = tempfile::tempdir().unwrap();
    let image = d.join("init_a.png").to_string_lossy().into_owned();
    let mut m = image::GrayImage::new(45, 37);
    for y in 10..20 {
        for x in 10..30 {
            m.put_pixel(x, y, image::Luma([255]));
        }
    }
    let mask = tmp.path().join("mask.png");
    m.save(&mask).unwrap();
    let s = InitSettings { image, mask: Some(mask.to_string_lossy().into()), resize_mode: ResizeMode::LatentUpscale, ..Default::default() };
    let e = prepare_init(&s, (Some(32), Some(32)), f).unwrap_err().to_string();
    assert!(e.contains("latent upscale") && e.contains("45x37") && e.contains("32x32"), "{e}");
    let p = prepare_init(&InitSettings { inpaint_area: InpaintArea::OnlyMasked, ..s.clone() }, (Some(32), Some(32)), f).unwrap();
    assert!(!p.init.resize_latents && p.init.image.dimensions() == (32, 32));
    // At the image's own size a mask is fine (the latent resize is then the identity).
    let even = tmp.path().join("even.png");
    image::imageops::crop_imm(&image::open(&s.image).unwrap().to_rgb8(), 0, 0, 44, 36).to_image().save(&even).unwrap();
    let m44 = tmp.path().join("m44.png");
    image::imageops::crop_imm(&m, 0, 0, 44, 36).to_image().save(&m44).unwrap();
    let s = InitSettings { image: even.to_string_lossy().into(), mask: Some(m44.to_string_lossy().into()), ..s };
    let p = prepare_init(&s, (None, None), f).unwrap();
    assert!(p.init.mask.is_some() && !p.init.resize_latents && (p.width, p.height) == (44, 36));
}

/// Resize mode 3 encodes a picture of any size, so a tiled VAE can meet a last tile narrower
/// than the VAE's factor; that tile makes no latent and is left out (it used to underflow the
/// convolution's size), giving the untiled latent size.
#[test]
fn tiled_encode_of_an_odd_size_leaves_out_a_sliver_tile() {
    use loramix::sdxl::img2img::ResizeMode;
    use loramix::studio::{prepare_init, InitSettings};
    let mut pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    pipe.vae_tiling = loramix::sdxl::pipeline::VaeTilingMode::On(Some(16));
    let tmp = tempfile::tempdir().unwrap();
    // Tiles of 16 pixels every 12: the last starts at 36 and holds 1 pixel of 37.
    let pic = tmp.path().join("odd.png");
    image::RgbImage::from_fn(37, 25, |x, y| image::Rgb([(x * 7) as u8, (y * 9) as u8, 60])).save(&pic).unwrap();
    let s = InitSettings { image: pic.to_string_lossy().into(), strength: 0.5, resize_mode: ResizeMode::LatentUpscale, ..Default::default() };
    let p = prepare_init(&s, (Some(32), Some(24)), pipe.vae_scale_factor()).unwrap();
    let req = GenerateRequest { prompt: "a red house".into(), steps: 4, width: Some(32), height: Some(24), init: Some(p.init), ..Default::default() };
    let lat = pipe.generate_latents(&req, &mut |_| true).unwrap();
    assert_eq!(lat.dims(), &[1, 4, 12, 16]);
    // A tile size that is not a multiple of the VAE's factor is rounded down to one: the
    // picture keeps its size (17-pixel tiles once made it a pixel or two larger).
    pipe.vae_tiling = loramix::sdxl::pipeline::VaeTilingMode::On(Some(17));
    let images = pipe.decode(&lat).unwrap();
    assert_eq!(images[0].dimensions(), (32, 24));
}

/// img2img on an inpainting UNet, and a blank "Only masked" mask on one, condition on an
/// all-white mask (A1111's `inpainting_image_conditioning` without a mask): the same latents
/// as the whole picture masked white.
#[test]
fn an_inpainting_unet_redraws_the_whole_picture_without_a_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe9 = inpaint_pipeline(tmp.path());
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let mut plain = request(&gj["case15"]);
    plain.init.as_mut().unwrap().mask = None;
    let mut white = plain.clone();
    white.init.as_mut().unwrap().mask = Some(image::GrayImage::from_pixel(32, 32, image::Luma([255])));
    let a = pipe9.generate_latents(&plain, &mut |_| true).unwrap();
    let b = pipe9.generate_latents(&white, &mut |_| true).unwrap();
    assert!(rel_l2(&a, &b) < 1e-6);
    // Through the studio: a blank mask under "Only masked" drops the mask, as A1111 does.
    let blank = tmp.path().join("blank.png");
    image::GrayImage::new(32, 32).save(&blank).unwrap();
    let s = loramix::studio::InitSettings {
        image: dir().join("init.png").to_string_lossy().into(),
        mask: Some(blank.to_string_lossy().into()),
        inpaint_area: loramix::studio::InpaintArea::OnlyMasked,
        strength: 0.7,
        ..Default::default()
    };
    let p = loramix::studio::prepare_init(&s, (Some(32), Some(32)), pipe9.vae_scale_factor()).unwrap();
    assert!(p.init.mask.is_none() && p.note.as_deref().is_some_and(|n| n.contains("blank")));
    let c = pipe9.generate_latents(&GenerateRequest { init: Some(p.init), ..plain.clone() }, &mut |_| true).unwrap();
    assert_eq!(c.dims(), a.dims());
}
