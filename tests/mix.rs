//! Mixing strategies against their references (goldens: tools/parity/make_mix_fixtures.py):
//! K-LoRA and EST-LoRA decision for decision in both modes and patterns at 6 and 50 steps
//! (reference mode from each reference's own `KLoRALinearLayer` inside real sampling); `auto` reducing to K-LoRA
//! for one subject and one style; merge / switch / composite final latents against diffusers.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use loramix::lora::{AdapterTargets, LoadedLora, Role};
use loramix::mix::{self, MixLora, MixOptions, MixPlan, Mixer};
use loramix::{LoadOptions, SdxlPipeline};

fn mix_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mix")
}

fn pipeline() -> SdxlPipeline {
    SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn plan(targets: &AdapterTargets, strengths: (f64, f64)) -> MixPlan {
    let load = |n: &str| LoadedLora::load(&mix_dir().join(format!("{n}.safetensors")), n, targets).unwrap();
    MixPlan::new(
        targets,
        vec![
            MixLora { lora: load("content"), role: Role::Subject, strength: strengths.0 },
            MixLora { lora: load("style"), role: Role::Style, strength: strengths.1 },
        ],
    )
    .unwrap()
}

fn strategy(name: &str, pattern: &str, mode: &str) -> Box<dyn mix::MixStrategy> {
    mix::build(&MixOptions { strategy: name.into(), klora_pattern: Some(pattern.into()), klora_mode: mode.into(), ..Default::default() }).unwrap()
}

#[test]
fn klora_and_est_decisions_equal_the_references_in_both_modes() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let tables: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(mix_dir().join("klora.json")).unwrap()).unwrap();
    for (key, table) in tables.as_object().unwrap() {
        let parts: Vec<&str> = key.split('/').collect();
        let (mode, pattern, steps) = (parts[0], parts[1], parts[2].parse::<usize>().unwrap());
        let strat = match mode.strip_prefix("est-") {
            None => strategy("klora", pattern, mode),
            // EST-LoRA with the discrepancy its previews would give (the tables fix d).
            Some(m) => {
                let previews = mix::est::Previews { steps: 0, width: 0, height: 0, seed: 0, discrepancy: table["discrepancy"].as_f64().unwrap() };
                let opts = MixOptions { strategy: "est".into(), klora_pattern: Some(pattern.into()), klora_mode: m.into(), est_previews: Some(previews), ..Default::default() };
                mix::build(&opts).unwrap()
            }
        };
        let mode = mode.trim_start_matches("est-");
        let mixer = Mixer::new(&targets, plan(&targets, (1.0, 1.0)), strat).unwrap();
        let ours = mixer.plan_weights(steps);
        let rows: Vec<String> = mixer.plan().layers.iter().filter(|l| l.is_linear).map(|l| l.path.clone()).collect();
        let layers: Vec<&str> = table["layers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        // Reference tables list layers in the reference's call order (its counter depends on
        // it): our execution order must be the same. Corrected tables are in module order.
        let selectors: Vec<&str> = rows.iter().map(|s| s.as_str()).filter(|p| layers.contains(p)).collect();
        if mode == "reference" {
            assert_eq!(selectors, layers, "{key}: layer order differs from the reference's call order");
        } else {
            assert_eq!(selectors.len(), layers.len(), "{key}");
        }
        let mut differ = 0;
        for (step, row) in table["content"].as_array().unwrap().iter().enumerate() {
            for (i, want) in row.as_array().unwrap().iter().enumerate() {
                let r = rows.iter().position(|p| p == layers[i]).unwrap();
                let (c, s) = (ours[step][r][0], ours[step][r][1]);
                assert!((c > 0.0) != (s > 0.0), "{key}: exactly one LoRA per selector layer");
                if (c > 0.0) != want.as_bool().unwrap() {
                    differ += 1;
                }
            }
        }
        assert_eq!(differ, 0, "{key}: {differ} decisions differ from the reference");
        // Layers outside the selector set (the ff modules both files carry) get no LoRA.
        for (r, p) in rows.iter().enumerate() {
            if p.ends_with("ff.net.2") {
                assert!(ours.iter().all(|st| st[r].iter().all(|w| *w == 0.0)), "{key}: {p} must stay off");
            }
        }
        mixer.finish();
    }
}

#[test]
fn auto_reduces_to_klora_for_one_subject_and_one_style() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    for pattern in ["s", "s*"] {
        for steps in [6, 30] {
            let k = Mixer::new(&targets, plan(&targets, (1.0, 0.7)), strategy("klora", pattern, "corrected")).unwrap();
            let kw = k.plan_weights(steps);
            k.finish();
            let a = Mixer::new(&targets, plan(&targets, (1.0, 0.7)), strategy("auto", pattern, "corrected")).unwrap();
            assert_eq!(a.plan_weights(steps), kw, "pattern {pattern}, {steps} steps");
            a.finish();
        }
    }
}

#[test]
fn merge_switch_composite_latents_equal_diffusers() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let g = candle_core::safetensors::load(mix_dir().join("golden.safetensors"), &Device::Cpu).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(mix_dir().join("golden.json")).unwrap()).unwrap();
    let req = request_from_diffusers(&gj["generate"], &g["init_noise"]);
    let w = (gj["weights"]["content"].as_f64().unwrap(), gj["weights"]["style"].as_f64().unwrap());
    let mut results: Vec<(String, Tensor)> = Vec::new();
    for name in ["merge", "switch", "composite"] {
        let mut mixer = Mixer::new(&targets, plan(&targets, w), strategy(name, "s*", "corrected")).unwrap();
        let lat = pipe.generate_latents_mixed(&req, Some(&mut mixer), &mut |_| true).unwrap();
        let trace = mixer.finish();
        assert_eq!(trace.weights.len(), req.steps);
        assert_close(name, &lat, &g[&format!("{name}.latents")], 1e-3);
        results.push((name.into(), lat));
    }
    // The three strategies really differ.
    assert!(rel_l2(&results[0].1, &results[1].1) > 1e-3 && rel_l2(&results[0].1, &results[2].1) > 1e-3);
    // Finishing a mix restores the base model.
    let base = pipe.generate_latents(&req, &mut |_| true).unwrap();
    let again = pipe.generate_latents(&req, &mut |_| true).unwrap();
    assert_eq!(rel_l2(&base, &again), 0.0);
    assert!(rel_l2(&base, &results[0].1) > 1e-3);
}

#[test]
fn mix_trace_file_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loramix"))
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a cat", "--steps", "4"])
        .arg("--lora")
        .arg(format!("{}:1.0:subject", mix_dir().join("content.safetensors").display()))
        .arg("--lora")
        .arg(format!("{}:0.9:style", mix_dir().join("style.safetensors").display()))
        .args(["--mix", "klora", "--klora-pattern", "s", "--klora-mode", "reference", "--seed", "1"])
        .arg("--mix-trace")
        .arg(&trace)
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(t["strategy"], "klora");
    assert_eq!(t["steps"], 4);
    assert_eq!(t["loras"], serde_json::json!(["content", "style"]));
    let layers = t["layers"].as_array().unwrap();
    assert!(layers.iter().any(|l| l == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"));
    let w = t["weights"].as_array().unwrap();
    assert_eq!(w.len(), 4);
    assert_eq!(w[0].as_array().unwrap().len(), layers.len());
    assert_eq!(w[0][0].as_array().unwrap().len(), 2);
    let q = layers.iter().position(|l| l == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").unwrap();
    let pair: Vec<f64> = w[2][q].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(pair == [1.0, 0.0] || pair == [0.0, 0.9], "{pair:?}");
    // Wrong roles are explained.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_loramix"))
        .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a cat", "--steps", "2"])
        .arg("--lora")
        .arg(format!("{}:1.0:style", mix_dir().join("content.safetensors").display()))
        .arg("--lora")
        .arg(format!("{}:1.0:style", mix_dir().join("style.safetensors").display()))
        .args(["--mix", "klora"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("exactly one subject and one style"));
}

#[test]
fn est_end_to_end_with_previews_and_an_embedder() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.json");
    let vit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit/new");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_loramix"))
            .args(["generate", "--model", fixture("tiny2").join("pipeline").to_str().unwrap(), "--prompt", "a cat", "--steps", "5", "--seed", "2"])
            .arg("--lora")
            .arg(format!("{}:1.0:subject", mix_dir().join("content.safetensors").display()))
            .arg("--lora")
            .arg(format!("{}:1.0:style", mix_dir().join("style.safetensors").display()))
            .args(["--mix", "est"])
            .args(extra)
            .arg("--out")
            .arg(tmp.path())
            .env("LORAMIX_HOME", tmp.path().join("home"))
            .output()
            .unwrap()
    };
    // A random-weight ViT stands in for DINO here; the embedder itself is checked in tests/embed.rs.
    let out = run(&["--est-embedder", vit.to_str().unwrap(), "--est-preview-steps", "3", "--mix-trace", trace.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("style discrepancy d ="));
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(t["strategy"], "est");
    let p = &t["details"]["previews"];
    assert_eq!(p["steps"], 3);
    assert_eq!((p["width"].as_u64(), p["height"].as_u64()), (Some(32), Some(32)));
    let d = p["discrepancy"].as_f64().unwrap();
    assert!((0.0..=2.0).contains(&d));
    assert_eq!(t["details"]["beta"].as_f64().unwrap(), d, "d replaces beta in the time scale");
    assert_eq!(t["details"]["pattern"], "s", "EST's default pattern");
    // Without an embedder the message says what to get and where to put it.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("facebook/dino-vits16"));
}
