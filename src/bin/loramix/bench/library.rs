//! `loramix bench --suite library`: importing N generated SDXL LoRAs into a fresh library,
//! ours beside a Python equivalent (safetensors header read, sha256, atomic copy, one SQLite
//! row per file — what a Python app such as A1111 does to index a LoRA folder) in one run.
//!
//! The files carry the full kohya SDXL key set (every transformer linear of the UNet and both
//! text encoders: 986 modules, ~3000 tensors, a header of a few hundred KB plus realistic
//! `ss_*` metadata) at rank 1 in f16, so header work is real-size while the data stays small
//! enough for 1,000 files on a laptop disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use safetensors::tensor::{Dtype, TensorView};

use loramix::error::{Error, Result};
use loramix::lora::library::LoraLibrary;

pub struct LibraryBench {
    pub files: usize,
    pub total_bytes: u64,
    pub ours_seconds: f64,
    pub reference_seconds: Option<f64>,
    pub index_bytes: u64,
    pub reference_index_bytes: Option<u64>,
    /// Reading every file's header and describing it (format, ranks, alphas, base, triggers).
    pub inspect_seconds: f64,
}

/// (kohya module name, in, out) for every transformer linear of SDXL, from the shape manifest.
fn sdxl_modules(repo: &Path) -> Result<Vec<(String, usize, usize)>> {
    let path = repo.join("tests/fixtures/sdxl/manifest_sdxl_base.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::model(&path, e.to_string()))?;
    let mut out = Vec::new();
    for (comp, prefix, inside) in [("unet", "lora_unet_", "attentions"), ("text_encoder", "lora_te1_", "encoder.layers"), ("text_encoder_2", "lora_te2_", "encoder.layers")] {
        let Some(keys) = m["diffusers"][comp].as_object() else { continue };
        let mut names: Vec<(&String, &serde_json::Value)> = keys.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (k, shape) in names {
            let Some(path) = k.strip_suffix(".weight") else { continue };
            let dims: Vec<usize> = shape.as_array().map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect()).unwrap_or_default();
            if dims.len() != 2 || !path.contains(inside) || path.contains("norm") {
                continue;
            }
            out.push((format!("{prefix}{}", path.replace('.', "_")), dims[1], dims[0]));
        }
    }
    Ok(out)
}

/// Finite f16 bits from a counter-based hash (distinct files, no NaN/Inf).
fn f16_bytes(n: usize, seed: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let h = (h ^ (h >> 31)) as u16;
            ((h & 0x83FF) | 0x2C00).to_le_bytes()
        })
        .collect()
}

pub fn generate_files(repo: &Path, dir: &Path, count: usize) -> Result<u64> {
    let modules = sdxl_modules(repo)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tags: HashMap<String, u32> = (0..300).map(|i| (format!("tag{i}"), 1 + (i * 7) % 50)).collect();
    let mut total = 0;
    for f in 0..count {
        let path = dir.join(format!("style_{f:04}.safetensors"));
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(modules.len() * 3);
        for (i, (name, inf, outf)) in modules.iter().enumerate() {
            let seed = (f * 100_000 + i) as u64;
            data.push((format!("{name}.lora_down.weight"), vec![1, *inf], f16_bytes(*inf, seed)));
            data.push((format!("{name}.lora_up.weight"), vec![*outf, 1], f16_bytes(*outf, seed + 50_000)));
            data.push((format!("{name}.alpha"), vec![], half::f16::from_f32(1.0).to_le_bytes().to_vec()));
        }
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(k, s, b)| TensorView::new(Dtype::F16, s.clone(), b).map(|v| (k.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Argument(format!("bench file: {e}")))?;
        let meta: HashMap<String, String> = [
            ("ss_network_module", "networks.lora".to_string()),
            ("ss_network_dim", "1".into()),
            ("ss_network_alpha", "1.0".into()),
            ("ss_base_model_version", "sdxl_base_v1-0".into()),
            ("ss_output_name", format!("style_{f:04}")),
            ("ss_tag_frequency", serde_json::json!({ "10_style": tags }).to_string()),
            ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora".into()),
            ("modelspec.title", format!("Bench style {f}")),
            ("modelspec.trigger_phrase", format!("style{f}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::Argument(format!("{}: {e}", path.display())))?;
        total += std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
    }
    Ok(total)
}

fn dir_size(p: &Path) -> u64 {
    ["library.sqlite", "library.sqlite-wal", "index.sqlite", "index.sqlite-wal"]
        .iter()
        .filter_map(|n| std::fs::metadata(p.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

pub fn run(repo: &Path, python: Option<&Path>, count: usize, work: &Path) -> Result<LibraryBench> {
    let src = work.join("loras");
    let _ = std::fs::remove_dir_all(work);
    eprintln!("writing {count} SDXL LoRA files to {} ...", src.display());
    let total_bytes = generate_files(repo, &src, count)?;

    let t = Instant::now();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    for p in &names {
        let f = loramix::weights::SafetensorsFile::open(p)?;
        loramix::lora::inspect(&f)?;
    }
    let inspect_seconds = t.elapsed().as_secs_f64();

    let reference = match python {
        Some(py) => {
            let lib = work.join("reference_library");
            let t = Instant::now();
            let out = Command::new(py)
                .arg(repo.join("tools/bench/import_ref.py"))
                .arg(&src)
                .arg(&lib)
                .output()
                .map_err(|e| Error::Argument(format!("running {}: {e}", py.display())))?;
            if !out.status.success() {
                return Err(Error::Argument(format!("reference import failed: {}", String::from_utf8_lossy(&out.stderr))));
            }
            Some((t.elapsed().as_secs_f64(), dir_size(&lib)))
        }
        None => None,
    };

    let lib_dir = work.join("library");
    let t = Instant::now();
    let mut lib = LoraLibrary::open(&lib_dir)?;
    let outcomes = lib.import(std::slice::from_ref(&src), &mut |_| {})?;
    let secs = t.elapsed().as_secs_f64();
    let failed = outcomes.iter().filter(|o| matches!(o, loramix::lora::library::ImportOutcome::Failed { .. })).count();
    if failed > 0 {
        return Err(Error::Argument(format!("{failed} bench files failed to import")));
    }
    drop(lib);
    let index_bytes = dir_size(&lib_dir);
    // Gigabytes of generated files: do not leave them behind.
    let _ = std::fs::remove_dir_all(work);
    Ok(LibraryBench {
        inspect_seconds,
        files: count,
        total_bytes,
        ours_seconds: secs,
        reference_seconds: reference.map(|r| r.0),
        index_bytes,
        reference_index_bytes: reference.map(|r| r.1),
    })
}

pub fn table(b: &LibraryBench) -> String {
    let mb = b.total_bytes as f64 / 1e6;
    let mut s = "| import (fresh library) | files | data | loramix s | Python reference s | ratio (reference / loramix) | index size |\n|---|---|---|---|---|---|---|\n".to_string();
    let (r, ratio) = match b.reference_seconds {
        Some(r) => (format!("{r:.2}"), format!("{:.2}x", r / b.ours_seconds)),
        None => ("—".into(), "—".into()),
    };
    s.push_str(&format!(
        "| SDXL LoRAs (986 modules, rank 1, f16) | {} | {mb:.0} MB | {:.2} ({:.0} files/s) | {r} | {ratio} | {:.1} KB ({:.2} KB/file) |\n",
        b.files,
        b.ours_seconds,
        b.files as f64 / b.ours_seconds,
        b.index_bytes as f64 / 1e3,
        b.index_bytes as f64 / 1e3 / b.files as f64
    ));
    s.push_str(&format!(
        "\nHeader-only inspection (format, ranks, alphas, base model, trigger words) of all {} files: {:.2} s ({:.2} ms/file); the rest of an import is hashing, the NaN/Inf scan and the synced copy.\n",
        b.files,
        b.inspect_seconds,
        b.inspect_seconds * 1e3 / b.files as f64
    ));
    if let Some(ri) = b.reference_index_bytes {
        s.push_str(&format!("\nReference index: {:.1} KB.\n", ri as f64 / 1e3));
    }
    s
}

pub fn default_work_dir(repo: &Path) -> PathBuf {
    repo.join("target/bench/library")
}
