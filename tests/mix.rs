//! Mixing strategies against their references (goldens: tools/parity/make_mix_fixtures.py):
//! K-LoRA and EST-LoRA decision for decision in both modes and patterns at 6 and 50 steps
//! (reference mode from each reference's own `KLoRALinearLayer` inside real sampling); corrected
//! K-LoRA's rules for the layers it does not select on; `auto`'s layers and regions; NP-LoRA
//! against its formula in numpy (tools/parity/make_np_fixtures.py); merge / switch / composite
//! final latents against diffusers.

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
            MixLora { lora: load("content"), role: Role::Subject, strength: strengths.0, schedule: None },
            MixLora { lora: load("style"), role: Role::Style, strength: strengths.1, schedule: None },
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
        // Layers outside the selector set (the ff modules both files carry) get no LoRA in
        // reference mode, as in the reference.
        let linear: Vec<&mix::MixLayer> = mixer.plan().layers.iter().filter(|l| l.is_linear).collect();
        let mut others = 0;
        for (r, l) in linear.iter().enumerate() {
            if l.path.ends_with("ff.net.2") && l.modules.iter().all(|m| m.is_some()) {
                others += 1;
                // Corrected: the default rule `follow` splits the layer between the two LoRAs.
                let off = ours.iter().all(|st| st[r].iter().all(|w| *w == 0.0));
                let shared = ours.iter().all(|st| (st[r][0] + st[r][1] - 1.0).abs() < 1e-12);
                assert!(if mode == "reference" { off } else { shared }, "{key}: {}: {:?}", l.path, ours[0][r]);
            }
        }
        assert!(others > 0);
        mixer.finish();
    }
}

#[test]
fn klora_follow_rule_gives_each_lora_its_blocks_share() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let opts = MixOptions { strategy: "klora".into(), klora_others: Some("merge".into()), ..Default::default() };
    let m = Mixer::new(&targets, plan(&targets, (1.0, 0.7)), mix::build(&opts).unwrap()).unwrap();
    let w = m.plan_weights(4);
    let linear: Vec<&mix::MixLayer> = m.plan().layers.iter().filter(|l| l.is_linear).collect();
    for (li, l) in linear.iter().enumerate() {
        if l.path.ends_with("ff.net.2") && l.modules.iter().all(|m| m.is_some()) {
            assert!(w.iter().all(|st| st[li] == [1.0, 0.7]), "merge rule: {}", l.path);
        }
    }
    m.finish();
    let opts = MixOptions { strategy: "klora".into(), klora_others: Some("follow".into()), ..Default::default() };
    let m = Mixer::new(&targets, plan(&targets, (1.0, 0.7)), mix::build(&opts).unwrap()).unwrap();
    let w = m.plan_weights(10);
    let linear: Vec<&mix::MixLayer> = m.plan().layers.iter().filter(|l| l.is_linear).collect();
    let mut seen = 0;
    for (li, l) in linear.iter().enumerate() {
        if l.path.ends_with("ff.net.2") && l.modules.iter().all(|m| m.is_some()) {
            seen += 1;
            for step in &w {
                let (c, s) = (step[li][0], step[li][1] / 0.7);
                assert!((c + s - 1.0).abs() < 1e-12 && (0.0..=1.0).contains(&c), "{}: {c} + {s}", l.path);
            }
        }
    }
    assert!(seen > 0);
    m.finish();
    assert!(mix::build(&MixOptions { strategy: "klora".into(), klora_others: Some("x".into()), ..Default::default() }).is_err());
}

#[test]
fn auto_runs_every_lora_on_every_layer_it_adapts_with_regions() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let mut p = plan(&targets, (1.0, 0.7));
    // The fixture LoRAs carry no trigger words: salience routing, ordinary CFG.
    let m = Mixer::new(&targets, p.clone(), strategy("auto", "s*", "corrected")).unwrap();
    let linear: Vec<mix::MixLayer> = m.plan().layers.iter().filter(|l| l.is_linear).cloned().collect();
    for step in m.plan_weights(8) {
        for (li, l) in linear.iter().enumerate() {
            let want: Vec<f64> = [1.0, 0.7].iter().enumerate().map(|(j, s)| if l.modules[j].is_some() { *s } else { 0.0 }).collect();
            assert_eq!(step[li], want, "{}", l.path);
        }
    }
    let q = m.plan().layers.iter().find(|l| l.path.ends_with("attn1.to_q")).unwrap().target;
    assert!(targets.targets[q].layer.slot.read().routing.is_some());
    m.finish();
    // With subject tokens located, cross-attention probes and a partial unconditional instead.
    p.subject_tokens = vec![2, 3];
    let m = Mixer::new(&targets, p, strategy("auto", "s*", "corrected")).unwrap();
    let probe = m.plan().layers.iter().find(|l| l.path.ends_with("attn2.to_q")).unwrap().target;
    assert_eq!(targets.targets[probe].layer.slot.read().probe_tokens, Some(vec![2, 3]));
    assert!(targets.targets[q].layer.slot.read().routing.is_none());
    let trace = m.finish();
    assert_eq!(trace.details["uncond_fraction"], 0.7);
    assert!(trace.details["cross_attention_kv"].as_str().is_some_and(|s| s.starts_with("per region")));
}

#[test]
fn np_equals_the_papers_formula_line_by_line() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let golden = candle_core::safetensors::load(mix_dir().join("np_golden.safetensors"), &Device::Cpu).unwrap();
    let m = Mixer::new(&targets, plan(&targets, (1.0, 0.7)), strategy("np", "s*", "corrected")).unwrap();
    let mut checked = 0;
    for l in &m.plan().layers {
        let Some(want) = golden.get(&format!("lora_unet_{}", l.path.replace('.', "_"))) else { continue };
        let layer = &targets.targets[l.target].layer;
        let fused = layer.slot.read().fused_weight.clone().expect("np fuses every shared layer");
        let delta = (fused - &layer.base_weight).unwrap().reshape(want.dims()).unwrap();
        let err = (delta - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 1e-5, "{}: max |ΔW error| {err}", l.path);
        checked += 1;
    }
    assert_eq!(checked, golden.len());
    m.finish();
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
