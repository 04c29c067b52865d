//! Loading: full-size SDXL base key/shape manifests in the diffusers and single-file (SGM)
//! layouts, the single-file path end to end, and clear errors for bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use loramix::sdxl::checkpoint::sgm_maps;
use loramix::weights::WeightSource;
use loramix::{GenerateRequest, LoadOptions, SamplerKind, SdxlPipeline};
use loramix_models::clip::{ClipTextConfig, ClipTextModel};
use loramix_models::sdxl::{AutoencoderKl, AutoencoderKlConfig, UNet2DConditionConfig, UNet2DConditionModel};
use serde_json::Value;

struct Manifest {
    unet: UNet2DConditionConfig,
    vae: AutoencoderKlConfig,
    te1: ClipTextConfig,
    te2: ClipTextConfig,
    diffusers: HashMap<String, HashMap<String, Vec<usize>>>,
    sgm: HashMap<String, Vec<usize>>,
}

fn manifest() -> Manifest {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl/manifest_sdxl_base.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let c = &v["configs"];
    Manifest {
        unet: serde_json::from_value(c["unet"].clone()).unwrap(),
        vae: serde_json::from_value(c["vae"].clone()).unwrap(),
        te1: serde_json::from_value(c["text_encoder"].clone()).unwrap(),
        te2: serde_json::from_value(c["text_encoder_2"].clone()).unwrap(),
        diffusers: serde_json::from_value(v["diffusers"].clone()).unwrap(),
        sgm: serde_json::from_value(v["sgm"].clone()).unwrap(),
    }
}

fn build_all(m: &Manifest, unet: WeightSource, vae: WeightSource, te1: WeightSource, te2: WeightSource) -> Result<(), String> {
    let dev = Device::Cpu;
    UNet2DConditionModel::new(unet.into_var_builder(DType::F32, &dev), &m.unet).map_err(|e| e.to_string())?;
    AutoencoderKl::new(vae.into_var_builder(DType::F32, &dev), &m.vae).map_err(|e| e.to_string())?;
    ClipTextModel::new(te1.into_var_builder(DType::F32, &dev), &m.te1).map_err(|e| e.to_string())?;
    ClipTextModel::new(te2.into_var_builder(DType::F32, &dev), &m.te2).map_err(|e| e.to_string())?;
    Ok(())
}

fn diffusers_sources(m: &Manifest, edit: impl Fn(&str, &mut HashMap<String, Vec<usize>>)) -> [WeightSource; 4] {
    ["unet", "vae", "text_encoder", "text_encoder_2"].map(|c| {
        let mut shapes = m.diffusers[c].clone();
        edit(c, &mut shapes);
        WeightSource::from_manifest(shapes, None, c)
    })
}

fn sgm_sources(m: &Manifest, shapes: HashMap<String, Vec<usize>>) -> Result<[WeightSource; 4], String> {
    let names: Vec<String> = shapes.keys().cloned().collect();
    let maps = sgm_maps(Path::new("sd_xl_base_1.0.safetensors"), &names, &|k| shapes.contains_key(k), &m.unet, &m.vae, &m.te2)
        .map_err(|e| e.to_string())?;
    let mk = |idx, label| WeightSource::from_manifest(shapes.clone(), Some(idx), label);
    Ok([mk(maps.unet, "unet"), mk(maps.vae, "vae"), mk(maps.text_encoder, "te1"), mk(maps.text_encoder_2, "te2")])
}

#[test]
fn full_sdxl_base_manifest_loads_in_both_layouts() {
    let m = manifest();
    assert_eq!(m.diffusers["unet"].len(), 1680);
    let [u, v, t1, t2] = diffusers_sources(&m, |_, _| {});
    build_all(&m, u, v, t1, t2).expect("diffusers layout");
    let [u, v, t1, t2] = sgm_sources(&m, m.sgm.clone()).unwrap();
    build_all(&m, u, v, t1, t2).expect("single-file SGM layout");
}

#[test]
fn manifest_errors_name_the_missing_or_misshaped_tensor() {
    let m = manifest();
    let key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight";
    let [u, v, t1, t2] = diffusers_sources(&m, |c, s| {
        if c == "unet" {
            s.remove(key);
        }
    });
    let e = build_all(&m, u, v, t1, t2).unwrap_err();
    assert!(e.contains("missing tensor") && e.contains(key) && e.contains("[640, 2048]"), "{e}");

    let [u, v, t1, t2] = diffusers_sources(&m, |c, s| {
        if c == "vae" {
            s.insert("decoder.conv_in.weight".into(), vec![512, 4, 1, 3]);
        }
    });
    let e = build_all(&m, u, v, t1, t2).unwrap_err();
    assert!(e.contains("decoder.conv_in.weight") && e.contains("[512, 4, 1, 3]") && e.contains("expected [512, 4, 3, 3]"), "{e}");

    // SGM: a mis-shaped fused qkv projection names the diffusers tensor and the stored key.
    let mut sgm = m.sgm.clone();
    sgm.insert("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight".into(), vec![3 * 1280, 1024]);
    let [u, v, t1, t2] = sgm_sources(&m, sgm).unwrap();
    let e = build_all(&m, u, v, t1, t2).unwrap_err();
    assert!(e.contains("layers.3.self_attn.q_proj.weight") && e.contains("in_proj_weight"), "{e}");

    // A single file of another architecture is refused with what it is.
    let mut sd15 = HashMap::new();
    sd15.insert("model.diffusion_model.input_blocks.0.0.weight".to_string(), vec![320, 4, 3, 3]);
    sd15.insert("cond_stage_model.transformer.text_model.final_layer_norm.weight".to_string(), vec![768]);
    let e = sgm_sources(&m, sd15).err().unwrap();
    assert!(e.contains("SD 1.x/2.x"), "{e}");
}

#[test]
fn single_file_checkpoint_equals_diffusers_from_single_file() {
    let root = fixture("tiny3");
    let opts = LoadOptions { config_dir: Some(root.join("pipeline")), ..Default::default() };
    let pipe = SdxlPipeline::load(root.join("sgm.safetensors").to_str().unwrap(), &opts).unwrap();
    let g = candle_core::safetensors::load(root.join("sgm_golden.safetensors"), &Device::Cpu).unwrap();
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        steps: 4,
        cfg: 5.0,
        sampler: Some(SamplerKind::Euler),
        width: Some(40),
        height: Some(48),
        init_noise: Some(g["init_noise"].clone()),
        ..Default::default()
    };
    let lat = pipe.generate_latents(&req, &mut |_| true).unwrap();
    assert_close("single file vs diffusers from_single_file", &lat, &g["latents"], 1e-3);
}

/// A scratch copy of the tiny3 pipeline to break.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("pipe");
    copy_dir(&fixture("tiny3").join("pipeline"), &dst);
    (tmp, dst)
}


fn load_err(dir: &Path) -> String {
    match SdxlPipeline::load(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("loaded a broken model"),
        Err(e) => e.to_string(),
    }
}

fn rewrite_unet(dir: &Path, f: impl Fn(&mut HashMap<String, Tensor>)) {
    let p = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut m = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut m);
    candle_core::safetensors::save(&m, &p).unwrap();
}

#[test]
fn bad_models_give_clear_errors() {
    // A folder missing a component.
    let (_t, d) = scratch();
    std::fs::remove_dir_all(d.join("vae")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("vae") && e.contains("missing"), "{e}");

    // Not a model folder.
    let (_t, d) = scratch();
    std::fs::remove_file(d.join("model_index.json")).unwrap();
    assert!(load_err(&d).contains("model_index.json is missing"));

    // A wrong shape.
    let (_t, d) = scratch();
    rewrite_unet(&d, |m| {
        m.insert("conv_in.weight".into(), Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu).unwrap());
    });
    let e = load_err(&d);
    assert!(e.contains("conv_in.weight") && e.contains("[16, 4, 1, 1]") && e.contains("expected [16, 4, 3, 3]"), "{e}");

    // NaN weights.
    let (_t, d) = scratch();
    rewrite_unet(&d, |m| {
        let w = m["conv_out.weight"].clone();
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::NAN;
        m.insert("conv_out.weight".into(), Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap());
    });
    let e = load_err(&d);
    assert!(e.contains("conv_out.weight") && e.contains("NaN"), "{e}");

    // A non-safetensors weight file, and a pickle in its place.
    let (_t, d) = scratch();
    std::fs::write(d.join("unet/diffusion_pytorch_model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    let e = load_err(&d);
    assert!(e.contains("diffusion_pytorch_model.safetensors") && e.contains("not a safetensors file"), "{e}");
    let (_t, d) = scratch();
    std::fs::remove_file(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(d.join("unet/diffusion_pytorch_model.bin"), b"PK\x03\x04pickle").unwrap();
    let e = load_err(&d);
    assert!(e.contains("pickle") && e.contains("never unpickles"), "{e}");

    // A single-file .ckpt is refused before reading.
    let (_t, d) = scratch();
    let ckpt = d.join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02junk").unwrap();
    let e = SdxlPipeline::load(ckpt.to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("model.ckpt") && e.contains("pickle"), "{e}");

    // A name that is neither a path nor a repo id.
    let e = SdxlPipeline::load("./no/such/dir", &LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("no such file or folder"), "{e}");
}

#[test]
fn bad_requests_give_clear_errors() {
    let pipe = SdxlPipeline::load(fixture("tiny3").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let noise = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let req = GenerateRequest { prompt: "a cat".into(), steps: 2, width: Some(40), height: Some(48), init_noise: Some(noise), ..Default::default() };
    let e = pipe.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("init noise has shape [1, 4, 8, 8], expected [1, 4, 12, 10]"), "{e}");
    let req = GenerateRequest { prompt: "a cat".into(), steps: 2, width: Some(41), height: Some(48), ..Default::default() };
    let e = pipe.generate_latents(&req, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("multiples of 4"), "{e}");
    let req = GenerateRequest { prompt: "a cat".into(), steps: 3, width: Some(40), height: Some(48), ..Default::default() };
    let mut calls = 0;
    let e = pipe.generate_latents(&req, &mut |_| { calls += 1; false }).unwrap_err();
    assert!(matches!(e, loramix::Error::Cancelled) && calls == 1, "cancel stops within one step");
}

/// A component split into shards with a `*.safetensors.index.json` (as large repos ship)
/// loads to the same model; a full-precision file is preferred over an `fp16` variant.
#[test]
fn sharded_and_variant_weights() {
    let (_t, d) = scratch();
    let unet = d.join("unet");
    let all = candle_core::safetensors::load(unet.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<&String> = all.keys().collect();
    keys.sort();
    let (a, b) = keys.split_at(keys.len() / 2);
    let mut map = serde_json::Map::new();
    for (name, part) in [("diffusion_pytorch_model-00001-of-00002.safetensors", a), ("diffusion_pytorch_model-00002-of-00002.safetensors", b)] {
        let shard: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), all[*k].clone())).collect();
        candle_core::safetensors::save(&shard, unet.join(name)).unwrap();
        for k in part {
            map.insert((*k).clone(), Value::String(name.into()));
        }
    }
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    // A decoy half-precision variant beside the full-precision VAE must be ignored.
    std::fs::write(d.join("vae/diffusion_pytorch_model.fp16.safetensors"), b"not used").unwrap();

    let sharded = SdxlPipeline::load(d.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let plain = SdxlPipeline::load(fixture("tiny3").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let req = GenerateRequest { prompt: "a cat".into(), steps: 2, width: Some(40), height: Some(48), seed: 3, ..Default::default() };
    let x = sharded.generate_latents(&req, &mut |_| true).unwrap();
    let y = plain.generate_latents(&req, &mut |_| true).unwrap();
    assert_eq!(rel_l2(&x, &y), 0.0);
}
