//! Every linear and convolution a LoRA can target is a LoRA-capable layer, listed with its
//! diffusers / transformers module path in execution order, and a branch attached from outside
//! changes the output exactly as a fused weight would.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loramix::{LoadOptions, SdxlPipeline};
use loramix_models::adapter::LowRankBranch;
use loramix_models::sdxl::AddedConditions;
use loramix_models::{Adaptable, LayerKind};

fn weight_keys(file: &std::path::Path) -> Vec<(String, usize)> {
    let m = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    m.into_iter().filter(|(k, t)| k.ends_with(".weight") && (t.rank() == 2 || t.rank() == 4)).map(|(k, t)| (k, t.rank())).collect()
}

#[test]
fn all_linears_and_convs_are_adaptable() {
    let root = fixture("tiny2").join("pipeline");
    let pipe = SdxlPipeline::load(root.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let layers = pipe.unet().unwrap().adaptable_layers();
    let paths: std::collections::HashSet<String> = layers.iter().map(|l| format!("{}.weight", l.path)).collect();
    let file_keys = weight_keys(&root.join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(paths.len(), layers.len(), "paths are unique");
    assert_eq!(layers.len(), file_keys.len(), "one adaptable layer per linear/conv weight");
    for (k, _) in &file_keys {
        assert!(paths.contains(k), "{k} is not adaptable");
    }
    // Execution order: time embedding first, conv_out last, attn1 q/k/v/out then attn2.
    assert_eq!(layers.first().unwrap().path, "time_embedding.linear_1");
    assert_eq!(layers.last().unwrap().path, "conv_out");
    let q = layers.iter().position(|l| l.path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").unwrap();
    let order: Vec<String> = layers[q..q + 8].iter().map(|l| l.path.rsplit('.').take(2).collect::<Vec<_>>().join("<")).collect();
    assert_eq!(order, ["to_q<attn1", "to_k<attn1", "to_v<attn1", "0<to_out", "to_q<attn2", "to_k<attn2", "to_v<attn2", "0<to_out"]);
    assert!(layers.iter().any(|l| matches!(l.kind, LayerKind::Conv2d { kernel: 3, .. })));

    // Both text encoders: every projection and MLP linear.
    for (enc, file) in [(&pipe.text().unwrap().encoder, "text_encoder/model.safetensors"), (pipe.text().unwrap().encoder_2.as_ref().unwrap(), "text_encoder_2/model.safetensors")] {
        let n = enc.adaptable_layers().len();
        let linears = weight_keys(&root.join(file)).iter().filter(|(k, r)| *r == 2 && !k.contains("embedding")).count();
        assert_eq!(n, linears, "{file}");
        assert!(enc.adaptable_layers()[0].path.starts_with("text_model.encoder.layers.0.self_attn.q_proj"));
    }
}

#[test]
fn attached_branch_equals_fused_weight() {
    let root = fixture("tiny2").join("pipeline");
    let pipe = SdxlPipeline::load(root.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let g = goldens("tiny2");
    let added = AddedConditions { text_embeds: g["unet.text_embeds"].clone(), time_ids: g["unet.time_ids"].clone() };
    let run = || pipe.unet().unwrap().forward(&g["unet.sample"], 421.0, &g["unet.context"], Some(&added)).unwrap();
    let base = run();
    let layers = pipe.unet().unwrap().adaptable_layers();
    let dev = Device::Cpu;
    for path in ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.1.resnets.0.conv1"] {
        let l = layers.iter().find(|l| l.path == path).unwrap();
        let (down, up) = match l.kind {
            LayerKind::Linear => (
                Tensor::randn(0f32, 0.2, (4, l.in_features), &dev).unwrap(),
                Tensor::randn(0f32, 0.2, (l.out_features, 4), &dev).unwrap(),
            ),
            LayerKind::Conv2d { kernel, .. } => (
                Tensor::randn(0f32, 0.2, (4, l.in_features, kernel, kernel), &dev).unwrap(),
                Tensor::randn(0f32, 0.2, (l.out_features, 4, 1, 1), &dev).unwrap(),
            ),
        };
        l.slot.write().branches.push(LowRankBranch::low_rank("x", down.clone(), up.clone(), 0.5, 1.5));
        let unfused = run();
        assert!(rel_l2(&unfused, &base) > 1e-4, "{path}: the branch has an effect");
        // Fused: W' = W + weight·scale·(up ∘ down), in a fresh tensor.
        let delta = match l.kind {
            LayerKind::Linear => up.matmul(&down).unwrap(),
            LayerKind::Conv2d { kernel, .. } => {
                let (o, r, i) = (l.out_features, 4, l.in_features);
                up.reshape((o, r)).unwrap().matmul(&down.reshape((r, i * kernel * kernel)).unwrap()).unwrap().reshape((o, i, kernel, kernel)).unwrap()
            }
        };
        let fused = (&l.base_weight + (delta * 0.75).unwrap()).unwrap();
        {
            let mut s = l.slot.write();
            s.branches.clear();
            s.fused_weight = Some(fused.to_dtype(DType::F32).unwrap());
        }
        let fused_out = run();
        assert_close(&format!("{path} fused vs unfused"), &fused_out, &unfused, 1e-5);
        l.slot.write().fused_weight = None;
        assert!(rel_l2(&run(), &base) == 0.0, "{path}: dropping the fused weight restores the base exactly");
    }
}
