//! LoRA files of every family equal diffusers (kohya SGM and diffusers naming, PEFT with adapter
//! metadata) or the LyCORIS formula (LoHa, LoKr — diffusers has no SDXL loader for them):
//! the same layers matched, per-layer ΔW ≤ 1e-5, final latents ≤ 1e-3, unfused and fused.
//! Goldens: tools/parity/make_lora_fixtures.py.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use loramix::lora::{attach, fuse, AdapterTargets, LoadedLora};
use loramix::{LoadOptions, SdxlPipeline};

fn lora_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

fn lora_goldens() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn lora_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(lora_dir().join("golden.json")).unwrap()).unwrap()
}

fn pipeline() -> SdxlPipeline {
    SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn every_format_matches_the_reference_layers_and_deltas() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let g = lora_goldens();
    let gj = lora_json();
    for (name, layers) in gj["layers"].as_object().unwrap() {
        let lora = LoadedLora::load(&lora_dir().join(format!("{name}.safetensors")), name, &targets).unwrap();
        let want: BTreeSet<String> = layers.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let got: BTreeSet<String> = lora.report.matched.iter().cloned().collect();
        assert_eq!(got, want, "{name}: matched layers differ from the reference");
        assert!(lora.report.unmatched_keys.is_empty(), "{name}: unmatched {:?}", lora.report.unmatched_keys);
        let mut checked = 0;
        let mut worst: f64 = 0.0;
        for m in &lora.modules {
            let qual = targets.targets[m.target].qualified_path();
            if let Some(golden) = g.get(&format!("delta.{name}.{qual}")) {
                let ours = lora.delta(m).unwrap();
                let e = rel_l2(&ours.reshape(golden.dims()).unwrap(), golden);
                assert!(e <= 1e-5, "{name} {qual}: ΔW relative L2 error {e:.3e}");
                worst = worst.max(e);
                checked += 1;
            }
        }
        assert!(checked >= 8, "{name}: only {checked} golden deltas compared");
        eprintln!("{name}: {checked} layers, worst ΔW rel L2 {worst:.2e}");
    }
}

#[test]
fn generation_with_loras_equals_the_reference() {
    let pipe = pipeline();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let g = lora_goldens();
    let gj = lora_json();
    let req = request_from_diffusers(&gj["generate"], &g["init_noise"]);
    let base = pipe.generate_latents(&req, &mut |_| true).unwrap();
    assert_close("no LoRA", &base, &g["base.latents"], 1e-3);
    for (case, mix) in gj["cases"].as_object().unwrap() {
        let loras: Vec<(LoadedLora, f64)> = mix
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e[0].as_str().unwrap();
                (LoadedLora::load(&lora_dir().join(format!("{name}.safetensors")), name, &targets).unwrap(), e[1].as_f64().unwrap())
            })
            .collect();
        let refs: Vec<(&LoadedLora, f64)> = loras.iter().map(|(l, w)| (l, *w)).collect();
        let golden = &g[&format!("{case}.latents")];
        assert!(rel_l2(&base, golden) > 1e-2, "{case}: the LoRA must change the result");

        attach(&targets, &refs).unwrap();
        let unfused = pipe.generate_latents(&req, &mut |_| true).unwrap();
        targets.clear();
        assert_close(&format!("{case} unfused"), &unfused, golden, 1e-3);

        fuse(&targets, &refs).unwrap();
        let fused = pipe.generate_latents(&req, &mut |_| true).unwrap();
        targets.clear();
        assert_close(&format!("{case} fused"), &fused, golden, 1e-3);
    }
    // Clearing restores the base model exactly.
    let again = pipe.generate_latents(&req, &mut |_| true).unwrap();
    assert_eq!(rel_l2(&again, &base), 0.0);
}
