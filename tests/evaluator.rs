//! The miniworld evaluator: the Rust runner equals the PyTorch classifier it ships with, the
//! prompt parser reads what a prompt asks for, and the scores rank sensibly on images our engine
//! makes — subject LoRAs high on subject fidelity, style LoRAs high on style fidelity, the base
//! model low on both.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::*;
use loramix::evaluator::{requested, MiniworldEvaluator};
use loramix::lora::{fuse, AdapterTargets, LoadedLora};
use loramix::{GenerateRequest, LoadOptions, SdxlPipeline};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn evaluator() -> MiniworldEvaluator {
    MiniworldEvaluator::load(&root().join("models/miniworld/evaluator"), &Device::Cpu).unwrap()
}

#[test]
fn runner_equals_pytorch() {
    let ev = evaluator();
    let g = candle_core::safetensors::load(root().join("tests/fixtures/evaluator/golden.safetensors"), &Device::Cpu).unwrap();
    let logits = ev.logits(&g["images"]).unwrap();
    for (head, l) in &logits {
        assert_close(head, l, &g[&format!("logits.{head}")], 1e-4);
    }
}

#[test]
fn prompts_are_parsed_into_requested_attributes() {
    let heads = evaluator().heads();
    let r = requested("a vlox emblem on a teal background, striped style <lora:vlox:1>", &heads);
    assert_eq!(r.get("subject").map(String::as_str), Some("vlox"));
    assert_eq!(r.get("style").map(String::as_str), Some("striped"));
    assert_eq!(r.get("background").map(String::as_str), Some("teal"));
    assert!(!r.contains_key("color") && !r.contains_key("shape"));
    let r = requested("a big red circle on a cream background, flat style", &heads);
    assert_eq!((r["color"].as_str(), r["shape"].as_str(), r["background"].as_str()), ("red", "circle", "cream"));
    assert!(!r.contains_key("subject"));
}

#[test]
fn scores_rank_lora_outputs_above_the_base_model() {
    let ev = evaluator();
    let pipe = SdxlPipeline::load(root().join("models/miniworld").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let mut run = |prompt: &str, lora: Option<&str>| -> Vec<loramix::evaluator::Scores> {
        targets.clear();
        if let Some(name) = lora {
            let l = LoadedLora::load(&root().join(format!("models/miniworld/loras/{name}.safetensors")), name, &targets).unwrap();
            fuse(&targets, &[(&l, 1.0)]).unwrap();
        }
        let req = GenerateRequest { prompt: prompt.into(), steps: 20, seed: 5, batch_size: 4, ..Default::default() };
        let lat = pipe.generate_latents(&req, &mut |_| true).unwrap();
        let imgs = pipe.decode(&lat).unwrap();
        targets.clear();
        imgs.iter().map(|i| ev.score(i, prompt).unwrap()).collect()
    };
    let mean = |v: &[loramix::evaluator::Scores], f: fn(&loramix::evaluator::Scores) -> Option<f64>| {
        v.iter().filter_map(f).sum::<f64>() / v.len() as f64
    };
    for (subject, bg) in [("vlox", "teal"), ("tebo", "cream")] {
        let p = format!("a {subject} emblem on a {bg} background, flat style");
        let with = mean(&run(&p, Some(subject)), |s| s.subject);
        let without = mean(&run(&p, None), |s| s.subject);
        eprintln!("{subject}: subject fidelity {with:.3} with its LoRA, {without:.3} base");
        assert!(with > 0.5 && with > without + 0.3, "{subject}: {with:.3} vs base {without:.3}");
    }
    for style in ["striped", "checkered"] {
        let p = format!("a big red circle on a cream background, {style} style");
        let with = mean(&run(&p, Some(style)), |s| s.style);
        let without = mean(&run(&p, None), |s| s.style);
        eprintln!("{style}: style fidelity {with:.3} with its LoRA, {without:.3} base");
        assert!(with > 0.5 && with > without + 0.3, "{style}: {with:.3} vs base {without:.3}");
    }
}
