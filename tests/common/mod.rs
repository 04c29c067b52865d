//! Shared helpers for the golden-comparison tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

pub fn fixture(config: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl").join(config)
}

pub fn goldens(config: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(config).join("golden.safetensors"), &Device::Cpu).expect("golden.safetensors")
}

pub fn golden_json(config: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(config).join("golden.json")).expect("golden.json")).expect("json")
}

/// ‖a − b‖₂ / ‖b‖₂ in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den.max(1e-30)
}

#[track_caller]
pub fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, tol: f64) {
    let e = rel_l2(ours, golden);
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
    eprintln!("{what}: rel L2 {e:.2e}");
}

/// Our request for a diffusers call recorded in a golden's `generate` object (prompt,
/// negative_prompt, num_inference_steps, guidance_scale, height, width), Euler, from `init_noise`.
pub fn request_from_diffusers(gen: &Value, init_noise: &Tensor) -> loramix::GenerateRequest {
    loramix::GenerateRequest {
        prompt: gen["prompt"].as_str().unwrap().into(),
        negative_prompt: gen["negative_prompt"].as_str().map(str::to_string),
        steps: gen["num_inference_steps"].as_u64().unwrap() as usize,
        cfg: gen["guidance_scale"].as_f64().unwrap(),
        sampler: Some("euler".parse().unwrap()),
        width: Some(gen["width"].as_u64().unwrap() as usize),
        height: Some(gen["height"].as_u64().unwrap() as usize),
        init_noise: Some(init_noise.clone()),
        ..Default::default()
    }
}

/// Recursive copy (tests break copies of fixture pipelines).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}
