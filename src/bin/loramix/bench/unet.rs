//! `loramix bench`: seconds per SDXL UNet step on the CPU, ours beside diffusers on the same
//! weights, inputs and thread count, measured in one run and reported as a ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loramix_models::sdxl::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};

use loramix::error::{Error, Result};
use loramix::sdxl::model;

/// One benchmarked UNet.
pub struct BenchCase {
    pub name: &'static str,
    pub unet_dir: PathBuf,
    /// Latent height, width.
    pub latent: (usize, usize),
    /// Passed to the Python side to create the weights when absent.
    pub create: Option<&'static str>,
}

pub fn default_cases(repo: &Path) -> Vec<BenchCase> {
    vec![
        BenchCase { name: "tiny2 (fixture, 32x32 px)", unet_dir: repo.join("tests/fixtures/sdxl/tiny2/pipeline/unet"), latent: (4, 4), create: None },
        BenchCase { name: "tiny3 (fixture, 48x40 px)", unet_dir: repo.join("tests/fixtures/sdxl/tiny3/pipeline/unet"), latent: (12, 10), create: None },
        BenchCase { name: "mid (160/320/640, 512x512 px)", unet_dir: repo.join("target/bench/mid/unet"), latent: (64, 64), create: Some("mid") },
    ]
}

pub struct BenchRow {
    pub name: String,
    pub params: usize,
    pub ours: f64,
    pub reference: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the diffusers side (creating shared weights if needed); returns seconds per step.
fn reference(python: &Path, repo: &Path, case: &BenchCase, iters: usize, threads: usize) -> Result<(f64, usize)> {
    let mut cmd = Command::new(python);
    cmd.arg(repo.join("tools/bench/unet_step.py"))
        .arg("--unet")
        .arg(&case.unet_dir)
        .args(["--height", &case.latent.0.to_string(), "--width", &case.latent.1.to_string()])
        .args(["--threads", &threads.to_string(), "--iters", &iters.to_string()]);
    if let Some(c) = case.create {
        cmd.args(["--create", c]);
    }
    let out = cmd.output().map_err(|e| Error::Argument(format!("running {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(Error::Argument(format!("diffusers benchmark failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Argument(format!("diffusers benchmark output {line:?}: {e}")))?;
    Ok((v["seconds_per_step"].as_f64().unwrap_or(f64::NAN), v["params"].as_u64().unwrap_or(0) as usize))
}

fn ours(case: &BenchCase, iters: usize) -> Result<(f64, usize)> {
    let root = case.unet_dir.parent().unwrap_or(Path::new("."));
    let (config_path, ws) = model::open_component(root, case.unet_dir.file_name().and_then(|n| n.to_str()).unwrap_or("unet"))?;
    let cfg: UNet2DConditionConfig = model::parse_config(&config_path)?;
    let dev = Device::Cpu;
    let unet = UNet2DConditionModel::new(ws.into_var_builder(DType::F32, &dev), &cfg)
        .map_err(|e| Error::model(&case.unet_dir, e.to_string()))?;
    let params: usize = loramix_models::Adaptable::adaptable_layers(&unet).iter().map(|l| l.base_weight.elem_count()).sum();
    let (h, w) = case.latent;
    let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, h, w), &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, cfg.cross_attention_dim), &dev)?;
    let proj = cfg.projection_class_embeddings_input_dim.unwrap_or(0).saturating_sub(6 * cfg.addition_time_embed_dim.unwrap_or(0));
    let added = AddedConditions {
        text_embeds: Tensor::randn(0f32, 1.0, (2, proj), &dev)?,
        time_ids: Tensor::from_slice(&[8.0f32 * h as f32, 8.0 * w as f32, 0.0, 0.0, 8.0 * h as f32, 8.0 * w as f32], (1, 6), &dev)?.repeat((2, 1))?,
    };
    let added = cfg.addition_embed_type.as_ref().map(|_| added);
    unet.forward(&x, 500.0, &ctx, added.as_ref())?; // warm-up
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        unet.forward(&x, 500.0, &ctx, added.as_ref())?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), params))
}

/// Runs every case; with `python`, the diffusers side runs first so both use the same weights.
pub fn run(repo: &Path, python: Option<&Path>, iters: usize, threads: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for case in default_cases(repo) {
        let reference = match python {
            Some(py) => Some(reference(py, repo, &case, iters, threads)?),
            None if !case.unet_dir.is_dir() => continue,
            None => None,
        };
        let (t, params) = ours(&case, iters)?;
        rows.push(BenchRow { name: case.name.to_string(), params: reference.map(|r| r.1).filter(|&p| p > 0).unwrap_or(params), ours: t, reference: reference.map(|r| r.0) });
    }
    Ok(rows)
}

pub fn table(rows: &[BenchRow], threads: usize) -> String {
    let mut s = format!(
        "| UNet config (CFG batch 2, f32, CPU, {threads} threads) | params | loramix s/step | diffusers s/step | ratio (diffusers / loramix) |\n|---|---|---|---|---|\n"
    );
    for r in rows {
        let (d, ratio) = match r.reference {
            Some(d) => (format!("{d:.4}"), format!("{:.2}x", d / r.ours)),
            None => ("—".into(), "—".into()),
        };
        s.push_str(&format!("| {} | {:.1}M | {:.4} | {d} | {ratio} |\n", r.name, r.params as f64 / 1e6, r.ours));
    }
    s
}
