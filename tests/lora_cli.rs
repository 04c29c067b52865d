//! `loramix lora ...` and `generate --lora` / `<lora:NAME:w>`, run as a user would; the final
//! latents equal the diffusers goldens of tests/fixtures/lora.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use common::*;

fn loramix() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loramix"))
}

fn lora_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

fn lora(lib: &Path, args: &[&str]) -> Output {
    loramix().arg("lora").arg("--library").arg(lib).args(args).env_remove("LORAMIX_HOME").output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn lora_import_list_show_set_rm() {
    let lib = tempfile::tempdir().unwrap();
    let empty = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad/empty.safetensors");
    let out = lora(lib.path(), &["import", lora_fixtures().to_str().unwrap(), empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a failed file makes the exit status 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("added ").count(), 5, "{stdout}");
    assert!(stdout.contains("failed") && stdout.contains("empty.safetensors") && stdout.contains("the file is empty"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 added, 0 already in the library, 2 failed"), "the fixture folder's golden.safetensors is not a LoRA either");

    let again = lora(lib.path(), &["import", "--json", lora_fixtures().to_str().unwrap()]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&again.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines.iter().filter(|l| l["status"] == "existing").count(), 5, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l["status"] == "failed").count(), 1, "{lines:?}");

    let list = json(&lora(lib.path(), &["list", "--json"]));
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 5);
    for key in ["sha256", "file_name", "display_name", "size", "format", "ranks", "alphas", "base_model", "module_count", "trigger_words", "role", "user_tags", "thumbnail", "added_at"] {
        assert!(entries[0].get(key).is_some(), "list --json lacks '{key}'");
    }
    let formats: Vec<&str> = entries.iter().map(|e| e["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["kohya", "kohya", "loha", "lokr", "diffusers"]);

    let show = json(&lora(lib.path(), &["show", "kohya_sgm", "--json"]));
    assert_eq!(show["base_model"], "sdxl");
    assert_eq!(show["alphas"], serde_json::json!([1.0, 2.0]));
    let by_hash = json(&lora(lib.path(), &["show", &show["sha256"].as_str().unwrap()[..10], "--json"]));
    assert_eq!(by_hash["display_name"], "kohya_sgm");

    assert!(json(&lora(lib.path(), &["list", "--role", "style", "--json"])).as_array().unwrap().is_empty());
    assert!(lora(lib.path(), &["set", "peft", "--role", "style", "--tags", "neon,night"]).status.success());
    let styles = json(&lora(lib.path(), &["list", "--role", "style", "--json"]));
    assert_eq!(styles[0]["display_name"], "peft");
    assert_eq!(styles[0]["user_tags"], serde_json::json!(["neon", "night"]));
    assert_eq!(json(&lora(lib.path(), &["list", "--tag", "night", "--json"])).as_array().unwrap().len(), 1);
    assert_eq!(json(&lora(lib.path(), &["list", "--base", "sd1", "--json"])).as_array().unwrap().len(), 0);

    let rm = lora(lib.path(), &["rm", "lokr"]);
    assert!(rm.status.success());
    assert_eq!(json(&lora(lib.path(), &["list", "--json"])).as_array().unwrap().len(), 4);
    let missing = lora(lib.path(), &["show", "lokr"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no LoRA named 'lokr'"));
}

#[test]
fn generate_with_lora_file_and_prompt_tag_equals_diffusers() {
    let lib = tempfile::tempdir().unwrap();
    assert!(lora(lib.path(), &["import", lora_fixtures().join("peft.safetensors").to_str().unwrap()]).status.success());
    let g = candle_core::safetensors::load(lora_fixtures().join("golden.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let noise = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), g["init_noise"].clone())]), &noise).unwrap();
    let kohya = format!("{}:0.8", lora_fixtures().join("kohya_sgm.safetensors").display());
    for (case, prompt, extra) in [
        ("kohya_sgm", "a photo of a cat", vec!["--lora", kohya.as_str()]),
        ("peft", "a photo of a cat<lora:peft:0.7>", vec![]),
        ("sgm_plus_peft", "a photo of a cat<lora:peft:0.5>", vec!["--lora", kohya.as_str()]),
    ] {
        let lat = tmp.path().join(format!("{case}.safetensors"));
        let out = loramix()
            .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap()])
            .args(["--prompt", prompt, "--negative-prompt", "blurry", "--steps", "5", "--cfg", "5", "--sampler", "euler"])
            .args(["--width", "32", "--height", "32", "--seed", "3"])
            .args(&extra)
            .arg("--library")
            .arg(lib.path())
            .arg("--init-noise")
            .arg(&noise)
            .arg("--save-latents")
            .arg(&lat)
            .arg("--out")
            .arg(tmp.path().join(case))
            .env_remove("LORAMIX_HOME")
            .output()
            .unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let ours = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
        assert_close(case, &ours["latents"], &g[&format!("{case}.latents")], 1e-3);
        let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
        let bytes = std::fs::read(&png).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("Lora hashes: \""), "{case}: PNG parameters lack Lora hashes");
    }
    let out = loramix()
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "x <lora:nobody:1>", "--steps", "1"])
        .arg("--library")
        .arg(lib.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no LoRA named 'nobody'"));
}

#[test]
fn subspace_build_show_add_and_generate_with_a_member() {
    let lib = tempfile::tempdir().unwrap();
    let loras = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld/loras");
    assert!(lora(lib.path(), &["import", loras.to_str().unwrap()]).status.success());
    // Three members at K = N·r in f32: every member exact.
    let s = json(&lora(lib.path(), &["subspace", "build", "vlox", "krin", "dotted", "--components", "24", "--dtype", "f32", "--name", "s3", "--json"]));
    assert_eq!(s["members"].as_array().unwrap().len(), 3);
    for m in s["members"].as_array().unwrap() {
        assert!(m["error"].as_f64().unwrap() <= 1e-4, "{m}");
        assert!(m["module_errors"].as_object().unwrap().len() > 10);
    }
    assert!(s["bytes_before"].as_u64().unwrap() > 0 && s["ratio"].as_f64().unwrap() > 0.0);
    // A non-member projected in: a real error, reported, and it joins.
    let m = json(&lora(lib.path(), &["subspace", "add", "s3", "striped", "--json"]));
    assert!(m["error"].as_f64().unwrap() > 0.05 && !m["in_basis"].as_bool().unwrap(), "{m}");
    let shown = json(&lora(lib.path(), &["subspace", "show", "s3", "--json"]));
    assert_eq!(shown["members"].as_array().unwrap().len(), 4);
    let text = String::from_utf8_lossy(&lora(lib.path(), &["subspace", "show", "s3"]).stdout).to_string();
    assert!(text.contains("storage:") && text.contains("projected in") && text.contains("ΔW error"), "{text}");
    // Bad input: two ways to pick members, and an unknown one; nothing is written.
    let out = lora(lib.path(), &["subspace", "build", "vlox", "--all", "--name", "t"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not both"));
    let out = lora(lib.path(), &["subspace", "build", "vlox", "zzz", "--name", "t"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("zzz"));
    assert_eq!(json(&lora(lib.path(), &["subspace", "list", "--json"])).as_array().unwrap().len(), 1);
    // generate --lora NAME@S gives the same image as the file (exact basis), and the PNG names it.
    let out_dir = tempfile::tempdir().unwrap();
    let gen = |args: &[&str], dir: &str| {
        let mut cmd = loramix();
        cmd.args(["generate", "--prompt", "a vlox emblem on a teal background, dotted style", "--steps", "4", "--seed", "3", "--out"])
            .arg(out_dir.path().join(dir))
            .arg("--library")
            .arg(lib.path());
        for a in args {
            if a.contains(':') {
                cmd.arg("--lora");
            }
            cmd.arg(a);
        }
        let o = cmd
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(String::from_utf8_lossy(&o.stdout).trim()).unwrap().to_rgb8()
    };
    let max_diff = |a: &image::RgbImage, b: &image::RgbImage| a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
    let a = gen(&["vlox:0.8"], "a");
    let b = gen(&["vlox@s3:0.8"], "b");
    assert!(max_diff(&a, &b) <= 1, "largest pixel difference {}", max_diff(&a, &b));
    // Unfused and per step (auto), two members run through the shared basis: the same image as
    // the two files as separate branches.
    let c = gen(&["vlox:1:subject", "dotted:1:style", "--mix", "auto"], "c");
    let d = gen(&["vlox@s3:1:subject", "dotted@s3:1:style", "--mix", "auto"], "d");
    assert!(max_diff(&c, &d) <= 2, "largest pixel difference {}", max_diff(&c, &d));
    let png = std::fs::read_dir(out_dir.path().join("b")).unwrap().next().unwrap().unwrap().path();
    let params = loramix::studio::png_text_chunks(&std::fs::read(png).unwrap()).unwrap()["parameters"].clone();
    assert!(params.contains("<lora:vlox@s3:0.8>"), "{params}");
}

#[test]
fn lora_train_full_and_as_loadings() {
    let lib = tempfile::tempdir().unwrap();
    let loras = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld/loras");
    assert!(lora(lib.path(), &["import", loras.to_str().unwrap()]).status.success());
    assert!(json(&lora(lib.path(), &["subspace", "build", "vlox", "krin", "--components", "16", "--dtype", "f32", "--name", "two", "--json"]))["members"].is_array());
    // Three training images with a kohya caption file for one of them.
    let imgs = tempfile::tempdir().unwrap();
    for (i, c) in [[200u8, 40, 40], [40, 170, 60], [40, 70, 220]].iter().enumerate() {
        image::RgbImage::from_fn(64, 64, |x, y| if (x / 8 + y / 8) % 2 == 0 { image::Rgb(*c) } else { image::Rgb([235, 225, 200]) })
            .save(imgs.path().join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::write(imgs.path().join("0.txt"), "a zorp emblem on a cream background").unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--images", imgs.path().to_str().unwrap(), "--prompt", "a zorp emblem", "--steps", "3", "--batch", "2", "--json"];
        args.extend_from_slice(extra);
        lora(lib.path(), &args)
    };
    // A normal rank-4 LoRA: a library entry whose file loads like any other.
    let full = json(&train(&["--rank", "4", "--name", "zorp", "--base", "loramix-miniworld"]));
    assert_eq!(full["steps"], 3);
    assert!(full["loss_curve"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap().is_finite()));
    let shown = json(&lora(lib.path(), &["show", "zorp", "--json"]));
    assert_eq!(shown["ranks"], serde_json::json!([4]));
    assert_eq!(shown["base_model"], "loramix-miniworld");
    // Loadings on the subspace: far fewer trainable numbers, and the result joins the subspace
    // exactly (its reconstruction is in the basis).
    let ld = json(&train(&["--subspace", "two", "--name", "zorp2"]));
    assert!(ld["trainable"].as_u64().unwrap() * 4 < full["trainable"].as_u64().unwrap() * 8 / 4, "{ld} vs {full}");
    assert!(ld["subspace_error"].as_f64().unwrap() < 1e-3, "{ld}");
    let sub = json(&lora(lib.path(), &["subspace", "show", "two", "--json"]));
    assert!(sub["members"].as_array().unwrap().iter().any(|m| m["display_name"] == "zorp2" && m["in_basis"] == false));
    // Bad input: a name in use, a folder that is not there (resuming is tested in tests/train.rs).
    let out = lora(lib.path(), &["train", "--images", imgs.path().to_str().unwrap(), "--prompt", "x", "--name", "zorp", "--steps", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already has a LoRA named zorp"));
    let out = lora(lib.path(), &["train", "--images", "/no/such/dir", "--prompt", "x", "--name", "q", "--steps", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"));
}
