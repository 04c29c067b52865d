//! The `loramix generate` command line, run as a user would.

mod common;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::*;

fn loramix() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loramix"))
}

/// The first image a `generate` run printed, which must have succeeded: its pixels and its
/// `parameters` text.
fn first_image(o: &std::process::Output) -> (Vec<u8>, String) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().unwrap());
    let text = loramix::studio::png_text_chunks(&std::fs::read(&path).unwrap()).unwrap().remove("parameters").unwrap();
    (image::open(&path).unwrap().to_rgb8().into_raw(), text)
}

#[test]
fn generate_with_init_noise_saves_latents_and_png() {
    let tmp = tempfile::tempdir().unwrap();
    let g = goldens("tiny2");
    let gj = golden_json("tiny2");
    // pipe5: euler, 5 steps, cfg 7, negative "blurry, ugly".
    let case = &gj["pipeline"]["pipe5"];
    let noise_path = tmp.path().join("noise.safetensors");
    let mut m = HashMap::new();
    m.insert("latents".to_string(), g["pipe5.init_noise"].clone());
    candle_core::safetensors::save(&m, &noise_path).unwrap();
    let lat_path = tmp.path().join("final.safetensors");
    let out = loramix()
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap()])
        .args(["--prompt", case["prompt"].as_str().unwrap(), "--negative-prompt", case["negative"].as_str().unwrap()])
        .args(["--steps", "5", "--cfg", "7", "--sampler", "euler", "--width", "32", "--height", "32", "--seed", "42"])
        .arg("--init-noise")
        .arg(&noise_path)
        .arg("--save-latents")
        .arg(&lat_path)
        .arg("--out")
        .arg(tmp.path().join("imgs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step 5/5") && stderr.contains("it/s"), "progress on stderr: {stderr}");
    let lat = candle_core::safetensors::load(&lat_path, &Device::Cpu).unwrap();
    assert_close("cli latents", &lat["latents"], &g["pipe5.latents"], 1e-3);
    let png_path = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    assert!(png_path.ends_with("00000-42.png"), "{png_path}");
    let bytes = std::fs::read(&png_path).unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("parameters") && text.contains("Sampler: Euler, CFG scale: 7, Seed: 42, Size: 32x32"), "A1111 parameters chunk");
}

#[test]
fn cli_errors_are_clear() {
    let model = fixture("tiny2").join("pipeline");
    let out = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--sampler", "plms"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("unknown sampler \"plms\""), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("noise.safetensors");
    let mut m = HashMap::new();
    m.insert("noise".to_string(), Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&m, &bad).unwrap();
    let out = loramix()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--width", "32", "--height", "32", "--init-noise"])
        .arg(&bad)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("no tensor named 'latents'") && e.contains("noise.safetensors"), "{e}");

    let out = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--device", "cuda"]).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--features cuda"), "{e}");
}


/// A repo id resolves through the standard HF cache layout offline; what is missing is listed.
#[test]
fn hub_repo_from_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--loramix--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snap = repo.join("snapshots/0123abcd");
    copy_dir(&fixture("tiny2").join("pipeline"), &snap);
    let run = |model: &str| {
        loramix()
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_TOKEN")
            .args(["generate", "--model", model, "--prompt", "a cat", "--steps", "2", "--seed", "1", "--width", "32", "--height", "32"])
            .arg("--out")
            .arg(home.path().join("out"))
            .output()
            .unwrap()
    };
    let out = run("loramix/tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::remove_file(snap.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out = run("loramix/tiny");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("not fully in the HF cache") && e.contains("unet/diffusion_pytorch_model.safetensors") && e.contains("HF_HUB_OFFLINE"), "{e}");

    let out = run("nobody/nothing");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("\"nobody/nothing\"") && e.contains("model_index.json"), "{e}");
}

/// Every image of a batch is written even when stdout is closed early (`| head -0`).
#[test]
fn closed_stdout_does_not_lose_images() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = loramix()
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a cat"])
        .args(["--steps", "2", "--batch-size", "3", "--seed", "5", "--width", "32", "--height", "32"])
        .arg("--out")
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is printed
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 3);
}

/// `--batch-count 2 --batch-size 2 --seed 5`: four images, the second batch from seed 7, equal to
/// a run of its own with `--seed 7`, each batch timed on stderr; per-batch files are refused.
#[test]
fn batch_count_runs_batches_from_consecutive_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let run = |seed: &str, count: &str, out: &std::path::Path| {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "2", "--batch-size", "2"])
            .args(["--seed", seed, "--batch-count", count, "--width", "32", "--height", "32"])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = run("5", "2", &tmp.path().join("both"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("batch 1/2: ") && stderr.contains("batch 2/2: "), "{stderr}");
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let names: Vec<&str> = paths.iter().map(|p| p.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, ["00000-5.png", "00001-5.png", "00002-7.png", "00003-7.png"]);
    let alone = run("7", "1", &tmp.path().join("alone"));
    assert!(alone.status.success());
    let alone_paths: Vec<String> = String::from_utf8_lossy(&alone.stdout).lines().map(str::to_string).collect();
    for (a, b) in paths[2..].iter().zip(&alone_paths) {
        let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
        assert_eq!(a.as_raw(), b.as_raw(), "batch 2 of seed 5 is the batch of seed 7");
    }
    let text = String::from_utf8_lossy(&std::fs::read(&paths[2]).unwrap()).to_string();
    assert!(text.contains("Seed: 7"), "the second batch's images carry their own seed");
    let bad = loramix()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--batch-count", "2", "--save-latents"])
        .arg(tmp.path().join("l.safetensors"))
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--batch-count 1"));
}

/// `--batch-seeds per-image`: A1111's seeds, so image k of a batch is the image `--seed S+k`
/// makes alone (an ancestral sampler, so every step's noise is per image too), named and
/// recorded with its own seed; the default shared generator's PNGs say so for a restore.
#[test]
fn per_image_batch_seeds_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let run = |seed: &str, extra: &[&str], out: &std::path::Path| {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "3", "--sampler", "euler_a"])
            .args(["--seed", seed, "--width", "32", "--height", "32"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = run("5", &["--batch-size", "2", "--batch-seeds", "per-image"], &tmp.path().join("batch"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let names: Vec<&str> = paths.iter().map(|p| p.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, ["00000-5.png", "00001-6.png"]);
    let text = String::from_utf8_lossy(&std::fs::read(&paths[1]).unwrap()).to_string();
    assert!(text.contains("Seed: 6,") && text.contains("Batch pos: 1") && !text.contains("Batch seeds"), "{text}");
    let alone = run("6", &[], &tmp.path().join("alone"));
    assert!(alone.status.success());
    let alone_path = String::from_utf8_lossy(&alone.stdout).lines().next().unwrap().to_string();
    let (a, b) = (image::open(&paths[1]).unwrap().to_rgb8(), image::open(&alone_path).unwrap().to_rgb8());
    let worst = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(worst <= 1, "image 1 of seed 5's batch is seed 6 alone ({worst} levels apart)");
    let shared = run("5", &["--batch-size", "2"], &tmp.path().join("shared"));
    let shared_paths: Vec<String> = String::from_utf8_lossy(&shared.stdout).lines().map(str::to_string).collect();
    let text = String::from_utf8_lossy(&std::fs::read(&shared_paths[1]).unwrap()).to_string();
    assert!(text.contains("Seed: 5,") && text.contains("Batch seeds: shared"), "{text}");
    let b2 = image::open(&shared_paths[1]).unwrap().to_rgb8();
    assert_ne!(b2.as_raw(), b.as_raw(), "a shared generator's second image is not seed 6's");
    let bad = run("5", &["--batch-seeds", "sometimes"], &tmp.path().join("bad"));
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("shared or per-image"), "{e}");
}

/// `--init-image --mask` from the command line: the latents are diffusers' inpainting latents
/// (golden case11: Euler, 6 steps, strength 0.75, seed 60), the PNG keeps every unmasked pixel
/// of the init image (A1111's overlay) and records A1111's img2img fields.
#[test]
fn inpaint_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = fixture("tiny2").join("img2img");
    let lat_path = tmp.path().join("final.safetensors");
    let out = loramix()
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a blue dog"])
        .args(["--steps", "6", "--cfg", "5", "--sampler", "euler", "--seed", "60", "--strength", "0.75", "--mask-blur", "0"])
        .arg("--init-image")
        .arg(d.join("init.png"))
        .arg("--mask")
        .arg(d.join("mask.png"))
        .arg("--save-latents")
        .arg(&lat_path)
        .arg("--out")
        .arg(tmp.path().join("imgs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g = candle_core::safetensors::load(d.join("golden.safetensors"), &Device::Cpu).unwrap();
    let lat = candle_core::safetensors::load(&lat_path, &Device::Cpu).unwrap();
    assert_close("cli inpaint latents", &lat["latents"], &g["case11.latents"], 1e-3);
    let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    let made = image::open(&png).unwrap().to_rgb8();
    let init = image::open(d.join("init.png")).unwrap().to_rgb8();
    let mask = image::open(d.join("mask.png")).unwrap().to_luma8();
    let (mut kept, mut changed) = (true, 0);
    for (x, y, m) in mask.enumerate_pixels() {
        if m[0] == 0 {
            kept &= made.get_pixel(x, y) == init.get_pixel(x, y);
        } else if made.get_pixel(x, y) != init.get_pixel(x, y) {
            changed += 1;
        }
    }
    assert!(kept, "unmasked pixels must be the init image's");
    assert!(changed > 100, "only {changed} masked pixels changed");
    let text = String::from_utf8_lossy(&std::fs::read(&png).unwrap()).to_string();
    assert!(text.contains("Denoising strength: 0.75, Mask blur: 0, Masked content: original"), "{text}");
    // Restoring the PNG gives back the img2img settings.
    let (s, _) = loramix::studio::settings_from_image(std::path::Path::new(&png)).unwrap();
    let init_s = s.init.unwrap();
    assert_eq!((init_s.strength, init_s.mask.is_some()), (0.75, true));

    // Bad input: clear errors that name the file or flag.
    let model = fixture("tiny2").join("pipeline");
    let run = |extra: &[&str]| {
        let o = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x"]).args(extra).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let not_image = tmp.path().join("notes.txt");
    std::fs::write(&not_image, "hello").unwrap();
    let e = run(&["--init-image", not_image.to_str().unwrap()]);
    assert!(e.contains("notes.txt") && e.contains("not a readable image"), "{e}");
    let e = run(&["--init-image", d.join("init.png").to_str().unwrap(), "--strength", "1.5"]);
    assert!(e.contains("--strength 1.5") && e.contains("[0, 1]"), "{e}");
    let e = run(&["--strength", "0.5"]);
    assert!(e.contains("--strength needs --init-image"), "{e}");
    let small = tmp.path().join("small_mask.png");
    image::GrayImage::new(16, 16).save(&small).unwrap();
    let e = run(&["--init-image", d.join("init.png").to_str().unwrap(), "--mask", small.to_str().unwrap()]);
    assert!(e.contains("small_mask.png") && e.contains("16x16") && e.contains("32x32"), "{e}");
}

/// Prompt editing in the hires pass counts on from the first pass, as A1111's: after 2 first
/// steps, `[red:blue:2]` and `[red:blue:1.0]` are red for the first pass and blue for the whole
/// hires pass, so they make one picture, and not `red`'s.
#[test]
fn prompt_editing_counts_on_into_the_hires_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let pixels = |prompt: &str| {
        let out = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--steps", "2", "--seed", "3", "--width", "32", "--height", "32"])
            .args(["--hr-scale", "1.5", "--hr-steps", "2", "--hr-denoise", "0.6", "--hr-upscaler", "Latent"])
            .arg("--out")
            .arg(tmp.path())
            .output()
            .unwrap();
        first_image(&out).0
    };
    let (by_step, by_fraction, red) = (pixels("a [red:blue:2] house"), pixels("a [red:blue:1.0] house"), pixels("a red house"));
    assert_eq!(by_step, by_fraction);
    assert_ne!(by_step, red);
}

/// Hires fix from the command line: a second pass at twice the size, A1111's fields in the
/// PNG, restored from it; pickles and unknown upscalers are refused with a clear message; an
/// ESRGAN-family model from the library's `models/ESRGAN` upscales the first pass.
#[test]
fn hires_fix_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let out = loramix()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a red house", "--steps", "6", "--seed", "3", "--clip-skip", "2"])
        .args(["--width", "32", "--height", "32", "--hr-scale", "1.5", "--hr-steps", "3", "--hr-denoise", "0.6", "--hr-upscaler", "Latent (bicubic antialiased)"])
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("hires step 3/3"), "the second pass runs the hires steps: {stderr}");
    let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
    let text = String::from_utf8_lossy(&std::fs::read(&png).unwrap()).to_string();
    // In A1111's create_infotext order: Denoising strength before Clip skip, the hires fields after.
    assert!(text.contains("Size: 32x32") && text.contains("Denoising strength: 0.6, Clip skip: 3, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (bicubic antialiased)"), "{text}");
    let chunks = loramix::studio::png_text_chunks(&std::fs::read(&png).unwrap()).unwrap();
    let back = loramix::studio::parse_parameters(&chunks["parameters"]).unwrap();
    let hr = back.hires.unwrap();
    assert_eq!((hr.scale, hr.steps, hr.denoise, hr.upscaler.as_str()), (1.5, 3, 0.6, "Latent (bicubic antialiased)"));
    assert!(back.init.is_none());
    let bad = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--hr-scale", "2", "--hr-upscaler", "RealESRGAN_x4plus.pth"]).output().unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("RealESRGAN_x4plus.pth") && e.contains("pickle"), "{e}");
    let lib = tmp.path().join("lib");
    let bad = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--hr-scale", "2", "--hr-upscaler", "4x-Missing", "--library"]).arg(&lib).output().unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("unknown hires upscaler \"4x-Missing\"") && e.contains("models/ESRGAN"), "{e}");

    // An ESRGAN-family model by name from the library's models/ESRGAN (A1111's folder), as A1111
    // resizes: the model once (×4 to 128²), then Lanczos down to 64², then the second pass.
    std::fs::create_dir_all(lib.join("models/ESRGAN")).unwrap();
    std::fs::copy(fixture("upscale").join("esrgan/tiny_x4.safetensors"), lib.join("models/ESRGAN/4x-tiny.safetensors")).unwrap();
    let run = |upscaler: &str, dir: &str| {
        let out = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a red house", "--steps", "4", "--seed", "3"])
            .args(["--width", "32", "--height", "32", "--hr-scale", "2", "--hr-denoise", "0.5", "--hr-upscaler", upscaler, "--library"])
            .arg(&lib)
            .arg("--out")
            .arg(tmp.path().join(dir))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
        (image::open(&png).unwrap().to_rgb8(), String::from_utf8_lossy(&std::fs::read(&png).unwrap()).to_string())
    };
    let (esrgan, text) = run("4x-tiny", "esrgan");
    assert_eq!(esrgan.dimensions(), (64, 64));
    assert!(text.contains("Hires upscaler: 4x-tiny"), "{text}");
    let (lanczos, _) = run("Lanczos", "lanczos");
    assert_ne!(esrgan.as_raw(), lanczos.as_raw(), "the model, not Lanczos, upscaled");
}

/// Textual-inversion embeddings from the command line: imported into the library (an A1111
/// file with its preview, a diffusers folder; twice is once), called by name, equal to
/// diffusers (tools/parity/make_ti_fixtures.py run0), `TI hashes` in the PNG; the same from
/// `--embedding DIR` without a library; an SD 1.5 embedding refused by name.
#[test]
fn textual_inversion_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ti = fixture("tiny2").join("ti");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(ti.join("vloxemb.safetensors"), src.join("vloxemb.safetensors")).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10])).save(src.join("vloxemb.preview.png")).unwrap();
    let lib = tmp.path().join("lib");
    let import = || {
        let out = loramix().args(["lora", "import", "--library"]).arg(&lib).arg(src.join("vloxemb.safetensors")).arg(ti.join("shinystyle")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = import();
    assert!(first.contains("added    embedding vloxemb (a1111, 2 vectors") && first.contains("added    embedding shinystyle (diffusers, 3 vectors"), "{first}");
    assert!(import().matches("exists   embedding").count() == 2);
    let out = loramix().args(["lora", "embedding", "list", "--json", "--library"]).arg(&lib).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|e| e["display_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["shinystyle", "vloxemb"]);
    assert!(list[1]["thumbnail"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert_eq!(list[0]["widths"], serde_json::json!([32, 32]));

    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ti.join("golden.json")).unwrap()).unwrap();
    let golden = candle_core::safetensors::load(ti.join("golden.safetensors"), &Device::Cpu).unwrap();
    let case = &gj["pipeline"]["run0"];
    let run = |extra: &[&str], home: &std::path::Path, name: &str| {
        let lat = tmp.path().join(format!("{name}.safetensors"));
        let out = loramix()
            .env("LORAMIX_HOME", home)
            .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap()])
            .args(["--prompt", case["prompt"].as_str().unwrap(), "--negative-prompt", case["negative"].as_str().unwrap()])
            .args(["--steps", "5", "--cfg", "5", "--sampler", "euler", "--width", "32", "--height", "32", "--seed", "21"])
            .args(extra)
            .arg("--save-latents")
            .arg(&lat)
            .arg("--out")
            .arg(tmp.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let l = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone();
        assert_close(&format!("{name} latents"), &l, &golden["run0.latents"], 1e-3);
        let png = std::fs::read_dir(tmp.path().join(name)).unwrap().next().unwrap().unwrap().path();
        let text = loramix::studio::png_text_chunks(&std::fs::read(&png).unwrap()).unwrap();
        text.get("parameters").cloned().unwrap()
    };
    let params = run(&["--library", lib.to_str().unwrap()], tmp.path(), "from-library");
    let sha = |p: &std::path::Path| {
        use sha2::Digest;
        let h = sha2::Sha256::digest(std::fs::read(p).unwrap());
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let shiny = list[0]["sha256"].as_str().unwrap();
    let want = format!("TI hashes: \"vloxemb: {}, shinystyle: {}\"", &sha(&ti.join("vloxemb.safetensors"))[..12], &shiny[..12]);
    assert!(params.contains(&want), "{params}\nwanted {want}");
    // No library: the fixtures folder (which also holds non-embedding files) by --embedding.
    let empty = tmp.path().join("empty-home");
    let params = run(&["--embedding", ti.to_str().unwrap()], &empty, "from-folder");
    assert!(params.contains("TI hashes: \"vloxemb: "), "{params}");
    assert!(!empty.join("library.sqlite").exists(), "a generate run must not create a library");
    // An SD 1.5 embedding named on the command line is refused with its file name.
    let sd15 = tmp.path().join("easyneg.safetensors");
    let z = Tensor::zeros((2, 768), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("emb_params".to_string(), z)]), &sd15).unwrap();
    let out = loramix()
        .env("LORAMIX_HOME", &empty)
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a cat", "--steps", "1"])
        .arg("--embedding")
        .arg(&sd15)
        .arg("--out")
        .arg(tmp.path().join("never"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("easyneg.safetensors") && err.contains("SD 1.x"), "{err}");
    // Rename (the new name is the word that calls it), refuse prompt syntax in names, remove.
    let lora = |args: &[&str]| loramix().arg("lora").args(args).arg("--library").arg(&lib).output().unwrap();
    assert!(lora(&["embedding", "rename", "shinystyle", "shinyxl"]).status.success());
    let bad = lora(&["embedding", "rename", "shinyxl", "a:b"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("must be non-empty and contain none of"));
    assert!(lora(&["embedding", "rm", "shinyxl"]).status.success());
    let left: serde_json::Value = serde_json::from_slice(&lora(&["embedding", "list", "--json"]).stdout).unwrap();
    assert_eq!(left.as_array().unwrap().iter().map(|e| e["display_name"].as_str().unwrap()).collect::<Vec<_>>(), ["vloxemb"]);
    assert_eq!(std::fs::read_dir(lib.join("embeddings")).unwrap().count(), 1, "the removed file is gone");
}

/// The few-step recipes of distilled models as their cards run them in diffusers
/// (tools/parity/make_distilled_fixtures.py): Lightning (Euler, trailing, 4 steps, CFG 0), the
/// same LoRA merged with a subject and a style LoRA, Hyper-SD (DDIM trailing), LCM-LoRA (LCM,
/// CFG 1) and Turbo (Euler a trailing, 1 step), from the command line.
#[test]
fn distilled_recipes_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let loras = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    let dir = fixture("tiny2").join("distilled");
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let run = |case: &serde_json::Value, spacing: bool, name: &str| -> (Tensor, String) {
        let lat = tmp.path().join(format!("{name}.safetensors"));
        let mut cmd = loramix();
        cmd.args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a photo of a cat"])
            .args(["--width", "32", "--height", "32", "--mix", "merge"])
            .args(["--sampler", case["scheduler"].as_str().unwrap()])
            .args(["--steps", &case["steps"].to_string(), "--cfg", &case["cfg"].to_string(), "--seed", &case["seed"].to_string()]);
        if let (true, Some(s)) = (spacing, case["spacing"].as_str()) {
            cmd.args(["--timestep-spacing", s]);
        }
        for l in case["loras"].as_array().unwrap() {
            cmd.arg("--lora").arg(format!("{}:{}", loras.join(format!("{}.safetensors", l[0].as_str().unwrap())).display(), l[1]));
        }
        let out = cmd.arg("--save-latents").arg(&lat).arg("--out").arg(tmp.path().join(name)).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
        let params = loramix::studio::png_text_chunks(&std::fs::read(png).unwrap()).unwrap()["parameters"].clone();
        (candle_core::safetensors::load(&lat, &Device::Cpu).unwrap()["latents"].clone(), params)
    };
    for (name, case) in gj.as_object().unwrap() {
        let (lat, params) = run(case, true, name);
        assert_close(name, &lat, &g[&format!("{name}.latents")], 1e-3);
        if case["spacing"].is_string() {
            assert!(params.contains("Timestep spacing: trailing"), "{params}");
            let back = loramix::studio::parse_parameters(&params).unwrap();
            assert_eq!(back.timestep_spacing, "trailing");
        }
    }
    // The model's own (leading) spacing is not the recipe: the flag is what makes it equal.
    let (lat, _) = run(&gj["lightning"], false, "lightning-leading");
    assert!(rel_l2(&lat, &g["lightning.latents"]) > 1e-2);
    let bad = loramix().args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "x", "--steps", "2", "--timestep-spacing", "uniform", "--out"]).arg(tmp.path().join("bad")).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("timestep spacing \"uniform\": expected linspace, leading or trailing"));
}

/// What `generate` records is enough to make the image again: each PNG's settings, run as a
/// manifest line from another folder, give the same pixels. Among them the cases a record once
/// lost: a LoRA file whose name the model's own `loras/` also has, an explicit empty negative
/// prompt (encoded, unlike none), per-image seeds, timestep spacing, NP-LoRA's mu, K-LoRA's
/// mode, a role and an init image given by relative path.
#[test]
fn generated_pngs_restore_through_a_manifest_from_another_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/miniworld");
    let attn_vlox = model.join("loras-attn/vlox.safetensors");
    let (here, elsewhere) = (tmp.path().join("here"), tmp.path().join("elsewhere"));
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    let generate = |name: &str, extra: &[&str]| -> Vec<std::path::PathBuf> {
        let out = loramix()
            .current_dir(&here)
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a vlox emblem on a teal background, checkered style"])
            .args(["--steps", "4", "--seed", "5", "--out", name])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| here.join(l)).collect()
    };
    let none = generate("none", &[]);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("path", vec!["--lora", attn_vlox.to_str().unwrap()]),
        ("empty", vec!["--negative-prompt", ""]),
        ("mixed", vec!["--batch-size", "2", "--batch-seeds", "per-image", "--timestep-spacing", "trailing", "--lora", "vlox:0.8:subject", "--lora", "checkered", "--mix", "np", "--np-mu", "5"]),
        ("klora", vec!["--lora", "vlox", "--lora", "checkered", "--mix", "klora", "--klora-mode", "reference"]),
        ("init", vec!["--init-image", "none/00000-5.png", "--strength", "0.6"]),
        ("latent-resize", vec!["--init-image", "none/00000-5.png", "--strength", "0.6", "--resize-mode", "just_resize_latent_upscale", "--width", "48", "--height", "56"]),
        // A random variation seed is recorded; ancestral noise continues the image's own seed.
        ("variation", vec!["--batch-size", "2", "--batch-seeds", "per-image", "--subseed-strength", "0.4", "--sampler", "euler_a"]),
        ("tiling", vec!["--tiling", "x"]),
        ("ensd", vec!["--sampler", "euler_a", "--ensd", "31337", "--batch-size", "2", "--batch-seeds", "per-image"]),
        ("resize", vec!["--seed-resize-from", "48x80", "--subseed-strength", "0.3"]),
        // Tiles share their LoRAs and mix statistics within the job; `batch run` makes it again.
        ("sd-upscale", vec!["--init-image", "none/00000-5.png", "--strength", "0.3", "--sd-upscale", "1.5", "--sd-upscale-overlap", "16", "--lora", "vlox", "--lora", "checkered", "--mix", "klora", "--width", "64", "--height", "64"]),
    ];
    for (name, extra) in &cases {
        let made = generate(name, extra);
        let (_, rec) = loramix::studio::settings_from_image(&made[0]).unwrap();
        let line = loramix::studio::manifest_line(&rec.unwrap().settings, Some(made.len())).unwrap();
        let manifest = elsewhere.join(format!("{name}.jsonl"));
        std::fs::write(&manifest, line + "\n").unwrap();
        let out = loramix().current_dir(&elsewhere).args(["batch", "run", &format!("{name}.jsonl"), "--out", name]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let mut again: Vec<_> = std::fs::read_dir(elsewhere.join(name)).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
        again.sort();
        assert_eq!(again.len(), made.len(), "{name}");
        for (a, b) in made.iter().zip(&again) {
            assert!(pixels(a) == pixels(b), "{name}: {} is not made again by its settings", a.display());
        }
        if *name == "empty" {
            assert!(pixels(&made[0]) != pixels(&none[0]), "an encoded empty negative prompt is not none");
        }
    }
}

/// img2img enters the schedule late: the trace holds a row for every step that ran, from
/// `first_step` (it held none).
#[test]
fn an_img2img_mix_trace_has_the_steps_that_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    let run = |extra: &[&str]| {
        let out = loramix()
            .current_dir(tmp.path())
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a vlox emblem on a teal background, checkered style", "--steps", "10", "--seed", "3"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string()
    };
    let init = run(&["--out", "first"]);
    run(&["--out", "second", "--init-image", &init, "--strength", "0.5", "--lora", "vlox", "--lora", "checkered", "--mix", "klora", "--mix-trace", "t/trace.json"]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("t/trace.json")).unwrap()).unwrap();
    assert_eq!((trace["steps"].as_u64(), trace["first_step"].as_u64(), trace["weights"].as_array().map(Vec::len)), (Some(10), Some(5), Some(5)), "{}", trace["first_step"]);
    // Second-order samplers call the model twice a step: the trace still counts steps, and a
    // window over the first half of them ends half-way.
    for sampler in ["heun", "dpm2"] {
        run(&["--out", sampler, "--sampler", sampler, "--lora", "vlox:1:subject", "--lora", "checkered:1:style", "--mix", "windows", "--windows", "subject=0:0.5,style=0:1", "--mix-trace", "t/second.json"]);
        let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("t/second.json")).unwrap()).unwrap();
        let rows = trace["weights"].as_array().unwrap();
        assert_eq!((trace["steps"].as_u64(), rows.len()), (Some(10), 10), "{sampler}");
        let subject_on: Vec<bool> = rows.iter().map(|r| r.as_array().unwrap().iter().any(|l| l[0].as_f64().unwrap() != 0.0)).collect();
        assert_eq!(subject_on, [true, true, true, true, true, false, false, false, false, false], "{sampler}");
    }
}

/// `auto` offered more LoRAs of a role than one keeps every one the prompt names, and narrows
/// to the named one when it names one.
#[test]
fn auto_keeps_every_lora_the_prompt_names() {
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    let loras = |prompt: &str, name: &str| -> Vec<String> {
        let trace = tmp.path().join(format!("{name}.json"));
        let out = loramix()
            .current_dir(tmp.path())
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--steps", "2", "--seed", "3", "--out", name])
            .args(["--lora", "vlox", "--lora", "krin", "--lora", "checkered", "--mix", "auto", "--mix-trace"])
            .arg(&trace)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        t["loras"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(loras("a vlox emblem and a krin emblem on a teal background, checkered style", "both"), ["vlox", "krin", "checkered"]);
    assert_eq!(loras("a krin emblem on a teal background, checkered style", "one"), ["krin", "checkered"]);
}

/// A single-file checkpoint's PNGs carry A1111's `Model hash` (sha256, ten digits), hashed once
/// and then kept beside the library.
#[test]
fn a_single_file_checkpoint_has_a1111_model_hash() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let root = fixture("tiny3");
    let ckpt = root.join("sgm.safetensors");
    let want = format!("{:x}", sha2::Sha256::digest(std::fs::read(&ckpt).unwrap()));
    let home = tmp.path().join("home");
    let run = |out: &str| {
        let o = loramix()
            .args(["generate", "--model", ckpt.to_str().unwrap(), "--config", root.join("pipeline").to_str().unwrap()])
            .args(["--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--seed", "1", "--out"])
            .arg(tmp.path().join(out))
            .env("LORAMIX_HOME", &home)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let png = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
        loramix::studio::png_text_chunks(&std::fs::read(png).unwrap()).unwrap().remove("parameters").unwrap()
    };
    let text = run("a");
    assert!(text.contains(&format!("Size: 32x32, Model hash: {}, Model: sgm,", &want[..10])), "{text}");
    let cache = std::fs::read_to_string(home.join("model-hashes.json")).unwrap();
    assert!(cache.contains(&want), "{cache}");
    assert_eq!(run("b"), text);
    // A diffusers folder has no A1111 hash.
    let o = loramix()
        .args(["generate", "--model", root.join("pipeline").to_str().unwrap(), "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32", "--out"])
        .arg(tmp.path().join("c"))
        .env("LORAMIX_HOME", &home)
        .output()
        .unwrap();
    let png = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
    let text = loramix::studio::png_text_chunks(&std::fs::read(png).unwrap()).unwrap().remove("parameters").unwrap();
    assert!(!text.contains("Model hash"), "{text}");
}

/// A1111's variation seeds from the command line: strength 1 starts from the variation seed's
/// noise (with a deterministic sampler, that seed's image), image k takes subseed + k and keeps
/// the job's seed, and the PNG says so in A1111's words.
#[test]
fn variation_seeds_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let run = |out: &str, extra: &[&str]| -> Vec<std::path::PathBuf> {
        let o = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "3", "--sampler", "euler", "--width", "32", "--height", "32", "--out"])
            .arg(tmp.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{out}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().map(std::path::PathBuf::from).collect()
    };
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    let nine = run("nine", &["--seed", "9"]);
    let ten = run("ten", &["--seed", "10"]);
    let full = run("full", &["--seed", "1", "--subseed", "9", "--subseed-strength", "1", "--batch-size", "2", "--batch-seeds", "per-image"]);
    // Batched and alone differ by GEMM rounding only (as per_image_batch_seeds_from_the_command_line).
    let worst = |a: &std::path::Path, b: &std::path::Path| pixels(a).iter().zip(pixels(b)).map(|(x, y)| x.abs_diff(y)).max().unwrap();
    assert!(worst(&full[0], &nine[0]) <= 1 && worst(&full[1], &ten[0]) <= 1, "strength 1 is the variation seed's image, image k's is subseed + k");
    let half = run("half", &["--seed", "1", "--subseed", "9", "--subseed-strength", "0.5", "--batch-count", "2"]);
    let second = loramix::studio::png_text_chunks(&std::fs::read(&half[1]).unwrap()).unwrap().remove("parameters").unwrap();
    assert!(second.contains("Seed: 1,") && second.contains("Variation seed: 10,"), "the second batch keeps the seed: {second}");
    let one = run("one", &["--seed", "1"]);
    assert!(worst(&half[0], &one[0]) > 8 && worst(&half[0], &nine[0]) > 8);
    let text = loramix::studio::png_text_chunks(&std::fs::read(&half[0]).unwrap()).unwrap().remove("parameters").unwrap();
    assert!(text.contains("Seed: 1,") && text.contains("Variation seed: 9, Variation seed strength: 0.5"), "{text}");
    assert!(!loramix::studio::png_text_chunks(&std::fs::read(&one[0]).unwrap()).unwrap()["parameters"].contains("Variation"));
    let full1 = loramix::studio::png_text_chunks(&std::fs::read(&full[1]).unwrap()).unwrap().remove("parameters").unwrap();
    // Variations of one image: every image keeps the job's seed (A1111's all_seeds).
    assert!(full1.contains("Seed: 1,") && full1.contains("Variation seed: 10,"), "{full1}");
    let o = loramix().args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--subseed-strength", "1.5"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--subseed-strength 1.5"), "{e}");
}

/// A1111 builds prompt-editing schedules over steps × 2 for second-order samplers and counts
/// model calls: with Heun at 4 steps, `[…:0.5]` switches after call int(0.5 × 8) = 4, which is
/// where `[…:4]` switches (over 4 steps it would be after call 2).
#[test]
fn prompt_editing_with_a_second_order_sampler_counts_as_a1111() {
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    let run = |out: &str, prompt: &str, sampler: &str| {
        let o = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--steps", "4", "--seed", "2", "--sampler", sampler, "--out"])
            .arg(tmp.path().join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let p = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
        image::open(p).unwrap().to_rgb8().into_raw()
    };
    let edit = "[a red circle on a cream background:a blue square on a teal background:";
    assert!(run("h_frac", &format!("{edit}0.5]"), "heun") == run("h_step", &format!("{edit}4]"), "heun"));
    // With a first-order sampler the two differ (0.5 of 4 steps is step 2).
    assert!(run("e_frac", &format!("{edit}0.5]"), "euler") != run("e_step", &format!("{edit}4]"), "euler"));
}

/// `--tiling` makes seamless images: with every convolution wrapping, rolling the starting
/// noise by a multiple of the UNet's downsampling rolls the image by the same amount (to float
/// rounding),
/// which only a periodic image can do (without it, the image changes). One axis wraps only
/// that axis. The PNG says `Tiling: True` / `Tiling: X`, and a tiled VAE or a bad axis name
/// is refused with the flag named.
#[test]
fn tiling_images_wrap_around() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let noise = loramix::rng::BatchNoise::new(7, 1, loramix::rng::BatchSeeds::Shared).randn(&[1, 4, 16, 24]).unwrap();
    let noise = Tensor::from_vec(noise, (1, 4, 16, 24), &Device::Cpu).unwrap();
    // Rolled by 8 latent rows and 12 latent columns (tiny2's UNet downsamples once).
    let roll = |t: &Tensor, dim: usize, k: usize| {
        let n = t.dim(dim).unwrap();
        Tensor::cat(&[&t.narrow(dim, n - k, k).unwrap(), &t.narrow(dim, 0, n - k).unwrap()], dim).unwrap()
    };
    for (name, t) in [("n0", noise.clone()), ("rows", roll(&noise, 2, 8)), ("cols", roll(&noise, 3, 12))] {
        candle_core::safetensors::save(&HashMap::from([("latents".to_string(), t)]), tmp.path().join(format!("{name}.safetensors"))).unwrap();
    }
    let run = |noise: &str, tiling: &[&str]| -> (image::RgbImage, String) {
        let out = tmp.path().join(format!("out-{noise}-{}", tiling.join("")));
        let o = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a brick wall", "--steps", "3", "--sampler", "euler", "--width", "48", "--height", "32", "--init-noise"])
            .arg(tmp.path().join(format!("{noise}.safetensors")))
            .arg("--out")
            .arg(&out)
            .args(tiling)
            .output()
            .unwrap();
        assert!(o.status.success(), "{noise} {tiling:?}: {}", String::from_utf8_lossy(&o.stderr));
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().unwrap());
        let text = loramix::studio::png_text_chunks(&std::fs::read(&path).unwrap()).unwrap().remove("parameters").unwrap();
        (image::open(&path).unwrap().to_rgb8(), text)
    };
    // The image rolled by (dy, dx) pixels, against `b`: the largest difference.
    let rolled_diff = |a: &image::RgbImage, b: &image::RgbImage, dy: u32, dx: u32| -> u8 {
        let (w, h) = a.dimensions();
        let mut worst = 0;
        for y in 0..h {
            for x in 0..w {
                let p = a.get_pixel(x, y);
                let q = b.get_pixel((x + dx) % w, (y + dy) % h);
                worst = worst.max(p.0.iter().zip(q.0).map(|(u, v)| u.abs_diff(v)).max().unwrap());
            }
        }
        worst
    };
    // tiny2's VAE halves: 8 latent rows are 16 pixels, 12 latent columns 24.
    let (base, text) = run("n0", &["--tiling"]);
    assert!(text.contains(", Tiling: True,"), "{text}");
    // Within a level: the convolutions' tiles fall elsewhere on rolled input, so floats round differently.
    assert!(rolled_diff(&base, &run("rows", &["--tiling"]).0, 16, 0) <= 1, "both axes wrap: rows");
    assert!(rolled_diff(&base, &run("cols", &["--tiling", "xy"]).0, 0, 24) <= 1, "both axes wrap: columns");
    let (x, text) = run("n0", &["--tiling", "x"]);
    assert!(text.contains(", Tiling: X,"), "{text}");
    assert!(rolled_diff(&x, &run("cols", &["--tiling", "x"]).0, 0, 24) <= 1, "x wraps columns");
    assert!(rolled_diff(&x, &run("rows", &["--tiling", "x"]).0, 16, 0) > 8, "x does not wrap rows");
    let (plain, text) = run("n0", &[]);
    assert!(!text.contains("Tiling"), "{text}");
    assert!(rolled_diff(&plain, &run("cols", &[]).0, 0, 24) > 8, "without tiling the borders do not wrap");
    for (args, want) in [(vec!["--tiling", "sideways"], "--tiling \"sideways\""), (vec!["--tiling", "--vae-tiling", "on"], "--vae-tiling off")] {
        let o = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a", "--steps", "1", "--width", "32", "--height", "32", "--out"])
            .arg(tmp.path().join("bad"))
            .args(&args)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{args:?}: {e}");
    }
}

/// `--seed-resize-from WxH` (A1111's "Resize seed from"): the image's own size is the plain
/// image; another size changes the noise and is recorded; sizes the VAE cannot take are named.
/// The noise itself equals A1111's (`rng::tests::seed_resize_equals_a1111`).
#[test]
fn seed_resize_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let run = |out: &str, extra: &[&str]| -> std::process::Output {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "3", "--sampler", "euler", "--seed", "4", "--out"])
            .arg(tmp.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let image = first_image;
    let (plain, _) = image(&run("plain", &["--width", "32", "--height", "32"]));
    let (same, _) = image(&run("same", &["--width", "32", "--height", "32", "--seed-resize-from", "32x32"]));
    assert!(plain == same, "resizing from the image's own size is the plain image");
    let (wide, _) = image(&run("wide", &["--width", "48", "--height", "32"]));
    let (resized, text) = image(&run("resized", &["--width", "48", "--height", "32", "--seed-resize-from", "32x32"]));
    assert!(wide != resized, "the resized seed's noise differs from the plain seed's");
    assert!(text.contains("Seed resize from: 32x32"), "{text}");
    for (value, want) in [("32by32", "--seed-resize-from"), ("1x32", "--seed-resize-from 1x32: expected at least 8")] {
        let o = run("bad", &["--width", "32", "--height", "32", "--seed-resize-from", value]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{value}: {e}");
    }
}

/// `--eta-noise-seed-delta N` (A1111's ENSD): the noise ancestral samplers draw between steps
/// comes from seed + N. So seed S with N equals seed S + N started from seed S's noise, pixel for
/// pixel; Euler draws no noise and is unchanged, and only samplers that draw noise write `ENSD`.
#[test]
fn eta_noise_seed_delta_reseeds_the_ancestral_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let noise = loramix::rng::BatchNoise::new(3, 1, loramix::rng::BatchSeeds::Shared).randn(&[1, 4, 16, 16]).unwrap();
    let noise = Tensor::from_vec(noise, (1, 4, 16, 16), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), noise)]), tmp.path().join("seed3.safetensors")).unwrap();
    let run = |out: &str, extra: &[&str]| -> (Vec<u8>, String) {
        first_image(
            &loramix()
                .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "4", "--width", "32", "--height", "32", "--out"])
                .arg(tmp.path().join(out))
                .args(extra)
                .output()
                .unwrap(),
        )
    };
    let init = tmp.path().join("seed3.safetensors");
    let (ensd, text) = run("ensd", &["--sampler", "euler_a", "--seed", "3", "--ensd", "31337"]);
    assert!(text.contains(", ENSD: 31337"), "{text}");
    let (shifted, _) = run("shifted", &["--sampler", "euler_a", "--seed", "31340", "--init-noise", init.to_str().unwrap()]);
    assert!(ensd == shifted, "ENSD's steps draw from seed + delta");
    let (plain, _) = run("plain", &["--sampler", "euler_a", "--seed", "3"]);
    assert!(ensd != plain, "ENSD changes an ancestral sampler's image");
    let (euler, text) = run("euler", &["--sampler", "euler", "--seed", "3", "--eta-noise-seed-delta", "31337"]);
    assert!(!text.contains("ENSD"), "{text}");
    assert!(euler == run("euler-plain", &["--sampler", "euler", "--seed", "3"]).0, "Euler draws no noise: ENSD changes nothing");
}

/// `--resize-mode` fits an init image of another shape as A1111's "Resize mode": each mode
/// gives its own picture, the record names it, and a bad name is refused up front.
#[test]
fn resize_modes_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let init = tmp.path().join("wide.png");
    image::RgbImage::from_fn(64, 32, |x, y| image::Rgb([(x * 4) as u8, (y * 8) as u8, if x < 32 { 40 } else { 220 }])).save(&init).unwrap();
    let run = |mode: &str| -> std::process::Output {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "4", "--strength", "0.5", "--seed", "2", "--width", "32", "--height", "32", "--init-image"])
            .arg(&init)
            .args(["--resize-mode", mode, "--out"])
            .arg(tmp.path().join(mode))
            .output()
            .unwrap()
    };
    let mut pictures = vec![];
    for mode in ["just_resize", "crop_and_resize", "resize_and_fill"] {
        let o = run(mode);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().unwrap());
        let text = loramix::studio::png_text_chunks(&std::fs::read(&path).unwrap()).unwrap().remove("parameters").unwrap();
        assert_eq!(text.contains("Resize mode: "), mode != "just_resize", "{text}");
        let (_, rec) = loramix::studio::settings_from_image(&path).unwrap();
        assert_eq!(rec.unwrap().settings.init.unwrap().resize_mode.name(), mode);
        pictures.push(image::open(&path).unwrap().to_rgb8().into_raw());
    }
    assert!(pictures[0] != pictures[1] && pictures[1] != pictures[2] && pictures[0] != pictures[2], "each mode fits the image its own way");
    let o = run("squash");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("resize mode \"squash\""), "{e}");
}

/// ControlNet from the command line: the canny preprocessor gives the same image as OpenCV's
/// own edge map given with preprocessor none (both fitted by crop and resize); the control
/// changes the image; the PNG names the unit as sd-webui-controlnet does, and its record makes
/// the same image again through a manifest run from another folder.
#[test]
fn controlnet_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tiny = fixture("tiny2");
    let (model, cn) = (tiny.join("pipeline"), tiny.join("controlnet"));
    let canny_dir = root.join("tests/fixtures/canny");
    let run = |name: &str, extra: &[&str]| -> (Vec<u8>, String, std::path::PathBuf) {
        let o = loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a red house", "--steps", "4", "--sampler", "euler", "--seed", "9"])
            .args(["--width", "48", "--height", "32", "--out"])
            .arg(tmp.path().join(name))
            .args(extra)
            .output()
            .unwrap();
        let (pixels, text) = first_image(&o);
        (pixels, text, std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()))
    };
    let shapes = canny_dir.join("shapes.png");
    let edges = canny_dir.join("shapes_50.7_80.2.png");
    let (canny, text, path) = run(
        "canny",
        &["--controlnet", cn.to_str().unwrap(), "--control-image", shapes.to_str().unwrap(), "--control-preprocessor", "canny", "--control-threshold-a", "50.7", "--control-threshold-b", "80.2", "--control-weight", "1.5", "--control-end", "0.75"],
    );
    let (given, _, _) = run("given", &["--controlnet", cn.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-weight", "1.5", "--control-end", "0.75"]);
    let (plain, _, _) = run("plain", &[]);
    assert!(canny == given, "the canny preprocessor's map is not OpenCV's");
    assert!(canny != plain, "the ControlNet changed nothing");
    assert!(
        text.contains("ControlNet 0: \"Module: canny, Model: controlnet [") && text.contains("Weight: 1.5, Resize Mode: Crop and Resize, Threshold A: 50.7, Threshold B: 80.2, Guidance Start: 0, Guidance End: 0.75"),
        "{text}"
    );
    // Two units add up; a unit's flags take one value for all or one each.
    let (two, _, _) = run("two", &["--controlnet", cn.to_str().unwrap(), "--controlnet", cn.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-weight", "0.75"]);
    let (one, _, _) = run("one", &["--controlnet", cn.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-weight", "1.5", "--control-end", "1"]);
    let differ = two.iter().zip(&one).filter(|(a, b)| a.abs_diff(**b) > 1).count();
    assert_eq!(differ, 0, "two units at 0.75 are not one at 1.5");
    // The record restores the unit, from another folder.
    let (_, rec) = loramix::studio::settings_from_image(&path).unwrap();
    let settings = rec.unwrap().settings;
    assert_eq!(settings.controlnet.len(), 1);
    let manifest = tmp.path().join("cn.jsonl");
    std::fs::write(&manifest, loramix::studio::manifest_line(&settings, Some(1)).unwrap() + "\n").unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let o = loramix().current_dir(&elsewhere).args(["batch", "run"]).arg(&manifest).args(["--out", "again"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = std::fs::read_dir(elsewhere.join("again")).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "png")).unwrap();
    assert!(image::open(&again).unwrap().to_rgb8().into_raw() == canny, "the record does not make the image again");
    // So does the PNG itself in place of a manifest.
    let o = loramix().current_dir(&elsewhere).args(["batch", "run"]).arg(&path).args(["--out", "from-png"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let from_png = elsewhere.join("from-png").join("00001-0000.png");
    assert!(image::open(&from_png).unwrap().to_rgb8().into_raw() == canny, "batch run of the PNG does not make it again");
    // A T2I-Adapter in a unit, beside a ControlNet.
    let adapter = tiny.join("t2i_adapter");
    let (both, text, _) = run("both", &["--controlnet", cn.to_str().unwrap(), "--controlnet", adapter.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-weight", "1.5", "--control-end", "0.75"]);
    assert!(both != given, "the adapter changed nothing");
    assert!(text.contains("ControlNet 1: \"Module: none, Model: t2i_adapter ["), "{text}");
    // Errors name the flag or the unit.
    let err = |extra: &[&str]| {
        let o = loramix().env_remove("RUST_BACKTRACE").args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--steps", "2", "--out"]).arg(tmp.path().join("err")).args(extra).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["--control-image", "a.png"]).contains("--control-image needs --controlnet MODEL"));
    assert!(err(&["--controlnet", cn.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-preprocessor", "depth"]).contains("expected none, canny or invert"));
    let e = err(&["--controlnet", model.join("unet").to_str().unwrap(), "--control-image", edges.to_str().unwrap()]);
    assert!(e.contains("controlnet unit 0") && e.contains("not a ControlNet config"), "{e}");
    let e = err(&["--controlnet", adapter.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--control-guess-mode"]);
    assert!(e.contains("controlnet unit 0") && e.contains("guess mode is for ControlNets"), "{e}");
    // An adapter's sizes are checked before the first pass, the hires pass's included.
    let e = err(&["--controlnet", adapter.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--width", "46", "--height", "32"]);
    assert!(e.contains("controlnet unit 0") && e.contains("46x32") && e.contains("multiples of 4"), "{e}");
    let e = err(&["--controlnet", adapter.to_str().unwrap(), "--control-image", edges.to_str().unwrap(), "--width", "48", "--height", "32", "--hr-scale", "1.3"]);
    assert!(e.contains("in the hires pass") && e.contains("62x40"), "{e}");
    assert!(!e.contains("hires fix:"), "the first pass ran: {e}");
}

/// A1111's "SD upscale" script: the init image enlarged by the upscaler, cut at A1111's
/// `split_grid` positions (worked out here from its formula), each tile an img2img run of its
/// own with the script's seed (batch `b`, place `k` in it: seed + b + k), blended back by
/// `combine_grid`. The job must equal those runs made one by one, byte for byte.
#[test]
fn sd_upscale_is_tiles_of_img2img_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let init = image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x * y) % 251) as u8]));
    let init_path = tmp.path().join("init.png");
    init.save(&init_path).unwrap();
    let run = |init: &std::path::Path, seed: u64, extra: &[&str], out: &str| {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a red house", "--steps", "4", "--strength", "0.5"])
            .args(["--width", "32", "--height", "32", "--seed", &seed.to_string()])
            .arg("--init-image")
            .arg(init)
            .args(extra)
            .arg("--out")
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    let job = run(&init_path, 7, &["--sd-upscale", "2", "--sd-upscale-overlap", "8", "--sd-upscale-upscaler", "Lanczos", "--batch-size", "2"], "job");
    let (pixels, text) = first_image(&job);
    assert!(text.contains("Size: 32x32") && text.contains("SD upscale: 2, SD upscale overlap: 8, SD upscale upscaler: Lanczos"), "{text}");
    // 48×40 × 2 = 96×80: 4 columns at x = 0, 21, 42, 64 (A1111: int(col × dx), dx = 64/3) and
    // 3 rows at y = 0, 24, 48.
    let big = loramix::sdxl::upscale::Upscaler::Lanczos.upscale_by(&init, 2.0);
    assert_eq!(big.dimensions(), (96, 80));
    let (xs, ys) = ([0i64, 21, 42, 64], [0i64, 24, 48]);
    let mut rows = vec![];
    let mut t = 0;
    for &y in &ys {
        let mut row = vec![];
        for &x in &xs {
            let tile = image::imageops::crop_imm(&big, x as u32, y as u32, 32, 32).to_image();
            let p = tmp.path().join(format!("tile{t}.png"));
            tile.save(&p).unwrap();
            let seed = 7 + (t / 2 + t % 2) as u64;
            let (made, _) = first_image(&run(&p, seed, &[], &format!("tile{t}")));
            row.push((x, 32, image::RgbImage::from_raw(32, 32, made).unwrap()));
            t += 1;
        }
        rows.push((y, 32, row));
    }
    let want = loramix::sdxl::tile_grid::combine_grid(&rows, 32, 96, 80, 8);
    assert_eq!(pixels.len(), want.as_raw().len(), "a 96x80 picture");
    assert!(pixels == *want.as_raw(), "the job equals its tiles made one by one and blended");
    // `batch run` of the PNG makes the one picture again (the batch size batches tiles).
    let png = String::from_utf8_lossy(&job.stdout).lines().next().unwrap().to_string();
    let again = loramix().args(["batch", "run", &png, "--out"]).arg(tmp.path().join("again")).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let made: Vec<_> = std::fs::read_dir(tmp.path().join("again")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(image::open(&made[0]).unwrap().to_rgb8().into_raw() == pixels, "batch run makes the SD upscale again");
    // What the script cannot take is refused before any model loads.
    for (extra, want) in [
        (&["--sd-upscale", "2", "--sd-upscale-overlap", "8", "--sd-upscale-upscaler", "Latent"][..], "SD upscale upscaler \"Latent\": expected one of None, Lanczos, Nearest"),
        (&["--sd-upscale", "2", "--sd-upscale-overlap", "32"][..], "tile overlap 32"),
        (&["--sd-upscale", "0"][..], "scale factor 0"),
        (&["--sd-upscale", "2", "--sd-upscale-overlap", "8", "--sd-upscale-upscaler", "4x-Missing"][..], "4x-Missing"),
    ] {
        let o = run(&init_path, 1, extra, "bad");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{extra:?}: {err}");
    }
    let o = loramix()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--sd-upscale", "2", "--out"])
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("init image"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `loramix extras`: A1111's Extras upscale on a picture and on a folder. The picture equals
/// the Pillow golden byte for byte (tools/parity/make_extras_fixtures.py), keeps its text
/// chunks, gains `postprocessing` and `extras`; a second run takes a new name; a model
/// upscaler (a tiny ESRGAN) is named in the line; bad flags fail before anything is written.
#[test]
fn extras_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extras");
    let out = tmp.path().join("up");
    let run = |args: &[&str]| loramix().arg("extras").args(args).env("LORAMIX_HOME", tmp.path().join("home")).output().unwrap();
    // A picture with a `parameters` chunk, as one of ours would have.
    let src = tmp.path().join("pic.png");
    let img = image::open(ex.join("a.png")).unwrap().to_rgb8();
    std::fs::write(&src, loramix::output::encode_png(&img, &[("parameters", "a cat\nSteps: 4, Seed: 3".into())]).unwrap()).unwrap();
    let o = run(&[src.to_str().unwrap(), "--scale-by", "2.5", "--upscaler-1", "Nearest", "--upscaler-2", "Lanczos", "--upscaler-2-visibility", "0.37", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(made.ends_with("pic.png"), "{made}");
    let want = image::open(ex.join("a_1.png")).unwrap().to_rgb8();
    assert!(image::open(&made).unwrap().to_rgb8() == want, "equal to A1111's");
    let chunks = loramix::studio::png_text_chunks(&std::fs::read(&made).unwrap()).unwrap();
    let line = "Postprocess upscale by: 2.5, Postprocess upscaler: Nearest, Postprocess upscaler 2: Lanczos";
    assert_eq!(chunks["parameters"], "a cat\nSteps: 4, Seed: 3");
    assert_eq!((chunks["postprocessing"].as_str(), chunks["extras"].as_str()), (line, line));
    // Again: a new name, nothing overwritten. A folder takes every picture in it.
    let o = run(&[src.to_str().unwrap(), "--scale-to", "100x60", "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).trim().ends_with("pic-1.png"));
    assert_eq!(image::open(out.join("pic-1.png")).unwrap().to_rgb8().dimensions(), (100, 60));
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    for n in ["a.png", "b.png", "c.png"] {
        std::fs::copy(ex.join(n), folder.join(n)).unwrap();
    }
    std::fs::write(folder.join("notes.txt"), "not a picture").unwrap();
    // A folder's unreadable picture is skipped, as A1111's "Batch from Directory" skips it.
    std::fs::write(folder.join("broken.png"), "not a picture either").unwrap();
    let o = run(&[folder.to_str().unwrap(), "--scale-to", "50x90", "--upscaler-2", "Nearest", "--upscaler-2-visibility", "0.999", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("skipped") && e.contains("broken.png") && e.contains("3 of 4 pictures written"), "{e}");
    for n in ["a", "b", "c"] {
        let want = image::open(ex.join(format!("{n}_5.png"))).unwrap().to_rgb8();
        assert!(image::open(out.join(format!("{n}.png"))).unwrap().to_rgb8() == want, "{n}: equal to A1111's");
    }
    // A listed one that cannot be read stops the run before anything is written.
    let fresh = tmp.path().join("fresh");
    let o = run(&[src.to_str().unwrap(), folder.join("broken.png").to_str().unwrap(), "--out", fresh.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("broken.png"));
    assert!(!fresh.exists(), "nothing written");
    // An RGBA picture keeps its transparency (A1111 1.10).
    let o = run(&[ex.join("c.png").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let made = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(image::open(&made).unwrap().to_rgba8() == image::open(ex.join("c_0.png")).unwrap().to_rgba8(), "RGBA, equal to A1111's");
    // A model upscaler, by path: its name (the file stem) is written.
    let model = fixture("upscale").join("esrgan/tiny_x4.safetensors");
    let o = run(&[src.to_str().unwrap(), "--scale-by", "2", "--upscaler-1", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(image::open(&made).unwrap().to_rgb8().dimensions(), (72, 40));
    assert!(loramix::studio::png_text_chunks(&std::fs::read(&made).unwrap()).unwrap()["postprocessing"].ends_with("Postprocess upscaler: tiny_x4"));
    // Bad input: named, and nothing written.
    let before = std::fs::read_dir(&out).unwrap().count();
    for (args, want) in [
        (vec!["--upscaler-1", "Latent"], "Extras upscaler 1"),
        (vec!["--scale-by", "9"], "from 1 to 8"),
        (vec!["--upscaler-2-visibility", "2"], "visibility"),
        (vec!["--scale-to", "12by5"], "--scale-to"),
    ] {
        let o = run(&[&[src.to_str().unwrap(), "--out", out.to_str().unwrap()], &args[..]].concat());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want), "{args:?}: {e}");
    }
    let o = run(&[tmp.path().join("absent.png").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("absent.png"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), before);
}

/// `--samples-format jpg|webp|jpeg` writes A1111's kind of JPEG or (lossless) WebP: the pixels
/// of the PNG run, the `parameters` as the EXIF comment, numbered after the PNG, named by the
/// format's name as A1111 names them, and they restore.
#[test]
fn samples_formats_carry_parameters_as_exif() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline");
    let run = |extra: &[&str]| {
        loramix()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a caf\u{e9}, \u{1F600}", "--steps", "2", "--seed", "4", "--width", "32", "--height", "32"])
            .args(extra)
            .arg("--out")
            .arg(tmp.path())
            .output()
            .unwrap()
    };
    let (png_pixels, png_text) = first_image(&run(&[]));
    for (format, name) in [("jpg", "00001-4.jpg"), ("WEBP", "00002-4.webp"), ("jpeg", "00003-4.jpeg")] {
        let out = run(&["--samples-format", format, "--jpeg-quality", "95"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().next().unwrap());
        assert_eq!(path.file_name().unwrap(), name);
        let bytes = std::fs::read(&path).unwrap();
        let info = loramix::studio::read_image_info(&bytes).unwrap();
        assert_eq!(info.parameters.as_deref(), Some(png_text.as_str()), "{format}");
        assert!(info.items.is_empty());
        let pixels = image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw();
        if format == "WEBP" {
            assert_eq!(pixels, png_pixels, "lossless");
        } else {
            let mse = pixels.iter().zip(&png_pixels).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / pixels.len() as f64;
            assert!(mse > 0.0 && mse < 20.0, "quality 95: mse {mse}");
        }
        let (restored, record) = loramix::studio::settings_from_image(&path).unwrap();
        assert!(record.is_none(), "a JPEG or WebP carries no JSON record");
        assert_eq!((restored.prompt.as_str(), restored.seed, restored.steps), ("a caf\u{e9}, \u{1F600}", Some(4), 2));
    }
    let out = run(&["--samples-format", "gif"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("png, jpg, jpeg, webp"));
    let out = run(&["--samples-format", "jpg", "--jpeg-quality", "0"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("1..=100"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `loramix info` is A1111's PNG Info: the parameters and other text of PNG, JPEG, WebP and
/// NovelAI pictures (as the golden reads them), as text or as the API's png-info JSON; an
/// unreadable picture is named and the others still shown.
#[test]
fn info_shows_what_png_info_shows() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_info");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let names = ["a1111_saved.jpg", "a1111_api.webp", "text.png", "novelai.png", "plain.jpg"];
    let home = tempfile::tempdir().unwrap();
    let out = loramix().env("LORAMIX_HOME", home.path()).arg("info").arg("--json").args(names.iter().map(|n| dir.join(n))).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // A1111's order: the answer's fields, then in `parameters` the settings line's pairs, the
    // prompts, and the defaults it fills in.
    let first = text.lines().next().unwrap();
    let at = |key: &str| first.find(key).unwrap_or_else(|| panic!("{key} in {first}"));
    let order = ["\"info\":", "\"items\":", "\"parameters\":{\"Steps\":\"20\"", "\"Version\":\"v1.10.1\"", "\"Prompt\":", "\"Clip skip\":\"1\"", "\"Masked area padding\":32", "\"Refiner switch by sampling steps\":false", "\"file\":"];
    assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{first}");
    assert_eq!(lines.len(), names.len());
    for (name, got) in names.iter().zip(&lines) {
        let want = &expected["read"][name];
        assert_eq!(got["info"], want["info"].as_str().map_or(serde_json::Value::from(""), serde_json::Value::from), "{name}");
        let items: serde_json::Map<String, serde_json::Value> = want["items"].as_array().unwrap().iter().map(|kv| (kv[0].as_str().unwrap().to_string(), kv[1].clone())).collect();
        assert_eq!(got["items"], serde_json::Value::Object(items), "{name}");
        assert!(got["file"].as_str().unwrap().ends_with(name));
    }
    assert_eq!((lines[0]["parameters"]["Seed"].as_str(), lines[0]["parameters"]["Size-1"].as_str()), (Some("1234"), Some("24")));
    assert_eq!(lines[3]["parameters"]["ENSD"].as_str(), Some("31337"));

    // `--library`: its styles.csv, whose text the prompt ends with, is taken back out.
    std::fs::write(home.path().join("styles.csv"), "name,prompt,negative_prompt\nWater,(watercolor:1.2) \u{1F600},\n").unwrap();
    let out = loramix().arg("info").arg("--json").arg("--library").arg(home.path()).arg(dir.join(names[0])).output().unwrap();
    let styled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(styled["parameters"]["Styles array"], serde_json::json!(["Water"]));
    assert_eq!(styled["parameters"]["Prompt"], "a caf\u{e9} at dusk, <lora:subject_cat:0.8>");

    let missing = dir.join("missing.png");
    let out = loramix().arg("info").arg(dir.join("text.png")).arg(&missing).arg(dir.join("plain.jpg")).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success());
    assert!(stderr.contains("missing.png") && stderr.contains("1 of 3 pictures"), "{stderr}");
    assert!(stdout.contains("[parameters]\na caf\u{e9} at dusk") && stdout.contains("[postprocessing]\nPostprocess upscale by: 2") && stdout.contains("Nothing found in the image."), "{stdout}");
    let out = loramix().arg("info").arg(dir.join("expected.json")).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("expected.json: not a PNG, JPEG or WebP"));
}
