//! Single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors` style, Stability's SGM layout),
//! read through the same model code as a diffusers folder.
//!
//! Instead of rewriting tensors into a converted copy, we build a name map (diffusers name →
//! SGM key, plus a layout transform) and serve tensors lazily from the one mapped file. The
//! map is derived from the component configs, so it follows any block layout, and it is the
//! inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
//! `convert_open_clip_checkpoint`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use loramix_models::clip::ClipTextConfig;
use loramix_models::sdxl::{AutoencoderKlConfig, UNet2DConditionConfig};

use crate::error::{Error, Result};
use crate::weights::{SafetensorsFile, Source, Transform, WeightSource};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const TE2_PREFIX: &str = "conditioner.embedders.1.model.";

/// What a single file holds, judged from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    SdxlBase,
    SdxlRefiner,
    Sd1Or2,
    Unknown,
}

pub fn detect(names: &[String]) -> CheckpointKind {
    let has = |p: &str| names.iter().any(|n| n.starts_with(p));
    if has(UNET_PREFIX) && has(TE1_PREFIX) && has(TE2_PREFIX) {
        CheckpointKind::SdxlBase
    } else if has(UNET_PREFIX) && has("conditioner.embedders.0.model.") {
        CheckpointKind::SdxlRefiner
    } else if has(UNET_PREFIX) && has("cond_stage_model.") {
        CheckpointKind::Sd1Or2
    } else {
        CheckpointKind::Unknown
    }
}

/// (SGM prefix, diffusers prefix, inner renames) for one module.
struct PrefixRule {
    sgm: String,
    diffusers: String,
    renames: &'static [(&'static str, &'static str)],
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut", "conv_shortcut")];
const VAE_ATTENTION: &[(&str, &str)] =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];
const NONE: &[(&str, &str)] = &[];

fn rule(sgm: impl Into<String>, diffusers: impl Into<String>, renames: &'static [(&'static str, &'static str)]) -> PrefixRule {
    PrefixRule { sgm: sgm.into(), diffusers: diffusers.into(), renames }
}

fn unet_rules(c: &UNet2DConditionConfig) -> Vec<PrefixRule> {
    let n = c.block_out_channels.len();
    let mut r = vec![
        rule("time_embed.0", "time_embedding.linear_1", NONE),
        rule("time_embed.2", "time_embedding.linear_2", NONE),
        rule("label_emb.0.0", "add_embedding.linear_1", NONE),
        rule("label_emb.0.2", "add_embedding.linear_2", NONE),
        rule("input_blocks.0.0", "conv_in", NONE),
        rule("out.0", "conv_norm_out", NONE),
        rule("out.2", "conv_out", NONE),
        rule("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
        rule("middle_block.1", "mid_block.attentions.0", NONE),
        rule("middle_block.2", "mid_block.resnets.1", UNET_RESNET),
    ];
    let mut idx = 1;
    for (i, ty) in c.down_block_types.iter().enumerate() {
        let cross = UNet2DConditionConfig::has_cross_attention(ty);
        for j in 0..c.layers_per_block {
            r.push(rule(format!("input_blocks.{idx}.0"), format!("down_blocks.{i}.resnets.{j}"), UNET_RESNET));
            if cross {
                r.push(rule(format!("input_blocks.{idx}.1"), format!("down_blocks.{i}.attentions.{j}"), NONE));
            }
            idx += 1;
        }
        if i + 1 < n {
            r.push(rule(format!("input_blocks.{idx}.0.op"), format!("down_blocks.{i}.downsamplers.0.conv"), NONE));
            idx += 1;
        }
    }
    let mut idx = 0;
    for (i, ty) in c.up_block_types.iter().enumerate() {
        let cross = UNet2DConditionConfig::has_cross_attention(ty);
        let layers = c.layers_per_block + 1;
        for j in 0..layers {
            r.push(rule(format!("output_blocks.{idx}.0"), format!("up_blocks.{i}.resnets.{j}"), UNET_RESNET));
            if cross {
                r.push(rule(format!("output_blocks.{idx}.1"), format!("up_blocks.{i}.attentions.{j}"), NONE));
            }
            if j + 1 == layers && i + 1 < n {
                let k = if cross { 2 } else { 1 };
                r.push(rule(format!("output_blocks.{idx}.{k}.conv"), format!("up_blocks.{i}.upsamplers.0.conv"), NONE));
            }
            idx += 1;
        }
    }
    r
}

fn vae_rules(c: &AutoencoderKlConfig) -> Vec<PrefixRule> {
    let n = c.block_out_channels.len();
    let mut r = vec![
        rule("encoder.norm_out", "encoder.conv_norm_out", NONE),
        rule("decoder.norm_out", "decoder.conv_norm_out", NONE),
    ];
    for part in ["encoder", "decoder"] {
        r.push(rule(format!("{part}.conv_in"), format!("{part}.conv_in"), NONE));
        r.push(rule(format!("{part}.conv_out"), format!("{part}.conv_out"), NONE));
        r.push(rule(format!("{part}.mid.block_1"), format!("{part}.mid_block.resnets.0"), VAE_RESNET));
        r.push(rule(format!("{part}.mid.attn_1"), format!("{part}.mid_block.attentions.0"), VAE_ATTENTION));
        r.push(rule(format!("{part}.mid.block_2"), format!("{part}.mid_block.resnets.1"), VAE_RESNET));
    }
    for i in 0..n {
        for j in 0..c.layers_per_block {
            r.push(rule(format!("encoder.down.{i}.block.{j}"), format!("encoder.down_blocks.{i}.resnets.{j}"), VAE_RESNET));
        }
        if i + 1 < n {
            r.push(rule(format!("encoder.down.{i}.downsample.conv"), format!("encoder.down_blocks.{i}.downsamplers.0.conv"), NONE));
        }
        // The LDM decoder numbers its up blocks from the lowest resolution upwards in reverse.
        let src = n - 1 - i;
        for j in 0..c.layers_per_block + 1 {
            r.push(rule(format!("decoder.up.{src}.block.{j}"), format!("decoder.up_blocks.{i}.resnets.{j}"), VAE_RESNET));
        }
        if i + 1 < n {
            r.push(rule(format!("decoder.up.{src}.upsample.conv"), format!("decoder.up_blocks.{i}.upsamplers.0.conv"), NONE));
        }
    }
    r.push(rule("quant_conv", "quant_conv", NONE));
    r.push(rule("post_quant_conv", "post_quant_conv", NONE));
    r
}

/// The SGM (kohya SDXL) module path of a diffusers UNet module path, e.g.
/// `down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`, `up_blocks.0.resnets.2.conv1`
/// → `output_blocks.2.0.in_layers.2`. Kohya trains SDXL on the SGM UNet, so its LoRA keys use
/// these names; mapping from our layer list (rather than parsing the key) follows any block layout.
pub fn unet_sgm_module_path(config: &UNet2DConditionConfig, diffusers_path: &str) -> Option<String> {
    let rules = unet_rules(config);
    let best = rules
        .iter()
        .filter(|r| diffusers_path == r.diffusers || diffusers_path.starts_with(&format!("{}.", r.diffusers)))
        .max_by_key(|r| r.diffusers.len())?;
    let Some(tail) = diffusers_path.strip_prefix(&format!("{}.", best.diffusers)) else {
        return Some(best.sgm.clone());
    };
    for (sgm, diffusers) in best.renames {
        if tail == *diffusers {
            return Some(format!("{}.{sgm}", best.sgm));
        }
        if let Some(t) = tail.strip_prefix(&format!("{diffusers}.")) {
            return Some(format!("{}.{sgm}.{t}", best.sgm));
        }
    }
    Some(format!("{}.{tail}", best.sgm))
}

/// Maps every key under `prefix` through the longest matching rule.
fn apply_rules(names: &[String], prefix: &str, rules: &[PrefixRule]) -> HashMap<String, Source> {
    let mut by_prefix: HashMap<&str, &PrefixRule> = HashMap::new();
    for r in rules {
        by_prefix.insert(r.sgm.as_str(), r);
    }
    let mut out = HashMap::new();
    for key in names {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        // Longest rule prefix: walk the dotted prefixes from longest to shortest.
        let parts: Vec<&str> = rest.split('.').collect();
        for cut in (1..parts.len()).rev() {
            let head = parts[..cut].join(".");
            if let Some(r) = by_prefix.get(head.as_str()) {
                let mut tail = parts[cut..].join(".");
                for (from, to) in r.renames {
                    if let Some(t) = tail.strip_prefix(&format!("{from}.")) {
                        tail = format!("{to}.{t}");
                        break;
                    }
                }
                out.insert(format!("{}.{tail}", r.diffusers), Source { file: 0, key: key.clone(), transform: Transform::Identity });
                break;
            }
        }
    }
    out
}

fn te1_map(names: &[String]) -> HashMap<String, Source> {
    names
        .iter()
        .filter_map(|k| {
            k.strip_prefix(TE1_PREFIX)
                .map(|n| (n.to_string(), Source { file: 0, key: k.clone(), transform: Transform::Identity }))
        })
        .collect()
}

/// OpenCLIP-G (open_clip layout) → transformers `CLIPTextModelWithProjection` names.
fn te2_map(has_key: &dyn Fn(&str) -> bool, c: &ClipTextConfig) -> HashMap<String, Source> {
    let d = c.hidden_size;
    let mut out = HashMap::new();
    let mut put = |name: String, key: String, transform: Transform| {
        out.insert(name, Source { file: 0, key, transform });
    };
    let p = TE2_PREFIX;
    put("text_model.embeddings.token_embedding.weight".into(), format!("{p}token_embedding.weight"), Transform::Identity);
    put("text_model.embeddings.position_embedding.weight".into(), format!("{p}positional_embedding"), Transform::Identity);
    put("text_model.final_layer_norm.weight".into(), format!("{p}ln_final.weight"), Transform::Identity);
    put("text_model.final_layer_norm.bias".into(), format!("{p}ln_final.bias"), Transform::Identity);
    put("text_projection.weight".into(), format!("{p}text_projection"), Transform::Transpose);
    for i in 0..c.num_hidden_layers {
        let s = format!("{p}transformer.resblocks.{i}");
        let t = format!("text_model.encoder.layers.{i}");
        for (from, to) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")] {
            for w in ["weight", "bias"] {
                put(format!("{t}.{to}.{w}"), format!("{s}.{from}.{w}"), Transform::Identity);
            }
        }
        for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            put(format!("{t}.self_attn.{proj}.weight"), format!("{s}.attn.in_proj_weight"), Transform::Rows { start: k * d, len: d });
            put(format!("{t}.self_attn.{proj}.bias"), format!("{s}.attn.in_proj_bias"), Transform::Rows { start: k * d, len: d });
        }
    }
    // Drop entries whose source key is absent so that "missing tensor" errors name the
    // diffusers name and the model's expected shape.
    out.retain(|_, s| has_key(&s.key));
    out
}

/// Name maps (diffusers name → SGM key) of the four SDXL components.
pub struct SgmMaps {
    pub unet: HashMap<String, Source>,
    pub vae: HashMap<String, Source>,
    pub text_encoder: HashMap<String, Source>,
    pub text_encoder_2: HashMap<String, Source>,
}

/// Checks the file holds an SDXL base checkpoint and builds its name maps.
pub fn sgm_maps(
    path: &Path,
    names: &[String],
    has_key: &dyn Fn(&str) -> bool,
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKlConfig,
    te2: &ClipTextConfig,
) -> Result<SgmMaps> {
    match detect(names) {
        CheckpointKind::SdxlBase => {}
        CheckpointKind::SdxlRefiner => {
            return Err(Error::model(path, "this is an SDXL refiner checkpoint (one OpenCLIP-G text encoder); only SDXL base-architecture checkpoints are supported"))
        }
        CheckpointKind::Sd1Or2 => {
            return Err(Error::model(path, "this is an SD 1.x/2.x checkpoint (cond_stage_model.*); LoRAMix loads SDXL checkpoints"))
        }
        CheckpointKind::Unknown => {
            return Err(Error::model(
                path,
                format!("not an SDXL single-file checkpoint: expected keys under '{UNET_PREFIX}', '{TE1_PREFIX}' and '{TE2_PREFIX}'"),
            ))
        }
    }
    Ok(SgmMaps {
        unet: apply_rules(names, UNET_PREFIX, &unet_rules(unet)),
        vae: apply_rules(names, VAE_PREFIX, &vae_rules(vae)),
        text_encoder: te1_map(names),
        text_encoder_2: te2_map(has_key, te2),
    })
}

/// The four component weight sources of one SGM-layout SDXL file.
pub struct SgmComponents {
    pub unet: WeightSource,
    pub vae: WeightSource,
    pub text_encoder: WeightSource,
    pub text_encoder_2: WeightSource,
}

pub fn open_sgm(
    path: &Path,
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKlConfig,
    te2: &ClipTextConfig,
) -> Result<SgmComponents> {
    let file = SafetensorsFile::open(path)?;
    let names = file.names();
    let maps = sgm_maps(path, &names, &|k| file.shape_of(k).is_some(), unet, vae, te2)?;
    let label = path.display().to_string();
    let files = Arc::new(vec![file]);
    Ok(SgmComponents {
        unet: WeightSource::remapped(files.clone(), maps.unet, format!("{label} (unet)")),
        vae: WeightSource::remapped(files.clone(), maps.vae, format!("{label} (vae)")),
        text_encoder: WeightSource::remapped(files.clone(), maps.text_encoder, format!("{label} (text encoder 1)")),
        text_encoder_2: WeightSource::remapped(files, maps.text_encoder_2, format!("{label} (text encoder 2)")),
    })
}

/// A standalone VAE file (`--vae`): diffusers names (e.g. sdxl-vae-fp16-fix's
/// `diffusion_pytorch_model.safetensors`), or the original LDM names with or without the
/// checkpoint's `first_stage_model.` prefix (e.g. `sdxl_vae.safetensors`).
pub fn open_vae_file(path: &Path, vae: &AutoencoderKlConfig) -> Result<WeightSource> {
    let file = SafetensorsFile::open(path)?;
    let names = file.names();
    let label = format!("{} (vae)", path.display());
    let ldm = |prefix: &str| names.iter().any(|n| n.starts_with(&format!("{prefix}encoder.down.0.")) || n.starts_with(&format!("{prefix}decoder.up.0.")));
    let map = if ldm(VAE_PREFIX) {
        apply_rules(&names, VAE_PREFIX, &vae_rules(vae))
    } else if ldm("") {
        apply_rules(&names, "", &vae_rules(vae))
    } else if names.iter().any(|n| n.starts_with("encoder.down_blocks.") || n.starts_with("decoder.up_blocks.")) {
        return WeightSource::from_files(&[path.to_path_buf()]).map(|w| w.relabel(label));
    } else {
        return Err(Error::model(path, "not a VAE: expected encoder./decoder. weights in diffusers or LDM (first_stage_model.) names"));
    };
    Ok(WeightSource::remapped(Arc::new(vec![file]), map, label))
}
