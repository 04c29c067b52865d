//! ESRGAN-family upscalers (RRDBNet) against spandrel, which A1111 and ComfyUI load them with,
//! and A1111's tiled upscale (tools/parity/make_esrgan_fixtures.py).

mod common;

use candle_core::{DType, Device};
use common::*;
use loramix::sdxl::upscale_model::UpscaleModel;

fn dir() -> std::path::PathBuf {
    fixture("upscale").join("esrgan")
}

fn input() -> image::RgbImage {
    image::open(dir().join("input.png")).unwrap().to_rgb8()
}

#[test]
fn rrdbnet_equals_spandrel_in_both_layouts() {
    let g = candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap();
    for (name, scale, unshuffle) in [("tiny_x4", 4.0, 1), ("tiny_x4_esrgan_old", 4.0, 1), ("tiny_x2", 2.0, 2)] {
        let m = UpscaleModel::load(&dir().join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
        assert_eq!((m.scale(), m.config().unshuffle, m.config().blocks, m.config().growth), (scale, unshuffle, 1, 32), "{name}");
        let out = m.forward_image(&input()).unwrap();
        assert_close(name, &out, &g[&format!("{name}.output")], 1e-4);
    }
    // An odd size through the pixel-unshuffle model: reflect-padded and cropped back.
    let m = UpscaleModel::load(&dir().join("tiny_x2.safetensors"), &Device::Cpu).unwrap();
    let odd = image::imageops::crop_imm(&input(), 0, 0, 29, 21).to_image();
    assert_eq!(m.upscale_patch(&odd).unwrap().dimensions(), (58, 42));
}

/// A1111's `upscale_with_model` (tiles, PIL masks, 8-bit truncation): every byte equal, but for
/// a byte's ±1 where f32 sums round across a truncation step.
#[test]
fn tiled_upscale_equals_a1111() {
    let g = candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap();
    let gj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let m = UpscaleModel::load(&dir().join("tiny_x4.safetensors"), &Device::Cpu).unwrap();
    let whole = m.upscale_tiled(&input(), 0, 0).unwrap();
    for (key, c) in gj["tiled"].as_object().unwrap() {
        let out = m.upscale_tiled(&input(), c["tile"].as_u64().unwrap() as usize, c["overlap"].as_u64().unwrap() as usize).unwrap();
        let want: Vec<u8> = g[key].to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().map(|&v| v as u8).collect();
        assert_eq!(out.as_raw().len(), want.len(), "{key}");
        let diff: Vec<i32> = out.as_raw().iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let worst = diff.iter().copied().max().unwrap();
        let off = diff.iter().filter(|&&d| d > 0).count();
        eprintln!("{key}: worst {worst}, {off} of {} bytes differ", diff.len());
        assert!(worst <= 1 && off * 1000 <= diff.len(), "{key}: worst {worst}, {off} of {} bytes differ", diff.len());
        if c["tile"].as_u64().unwrap() > 0 {
            // Tiling changes the picture near seams (the test would notice a skipped blend).
            assert_ne!(out.as_raw(), whole.as_raw(), "{key}");
        }
    }
    // A1111's Upscaler.upscale to 2.5× (×4 once, then Lanczos down to the multiple of 8).
    let up = m.upscale_to(&input(), 75, 55).unwrap();
    assert_eq!(up.dimensions(), (75, 55));
}

#[test]
fn upscaler_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("4x-UltraSharp.pth"), b"\x80\x02}q\x00.").unwrap();
    let e = UpscaleModel::load(&tmp.path().join("4x-UltraSharp.pth"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("4x-UltraSharp.pth") && e.contains("pickle"), "{e}");
    let z = candle_core::Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    let p = tmp.path().join("swinir.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("layers.0.residual_group.blocks.0.norm1.weight".to_string(), z)]), &p).unwrap();
    let e = UpscaleModel::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("swinir.safetensors") && e.contains("not an RRDBNet upscaler"), "{e}");
}
