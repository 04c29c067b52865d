//! Configs that mirror diffusers' `config.json` for `UNet2DConditionModel` and `AutoencoderKL`.
//!
//! Fields diffusers allows as "int or list" use [`PerBlock`]. Options this implementation does
//! not support are rejected by `validate` with the field named, rather than ignored.

use serde::Deserialize;

/// A value given once for all blocks, or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<usize>, String> {
        match self {
            Self::One(v) => Ok(vec![*v; n]),
            Self::Each(v) if v.len() == n => Ok(v.clone()),
            Self::Each(v) => Err(format!("unet config: {field} has {} entries, expected {n} (one per block)", v.len())),
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn heads_default() -> PerBlock {
    PerBlock::One(8)
}
fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn groups() -> usize {
    32
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn default_str() -> String {
    "default".into()
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn three() -> usize {
    3
}
fn one_f() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Historically misnamed in diffusers: this is the number of heads when
    /// `num_attention_heads` is absent.
    #[serde(default = "heads_default")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub upcast_attention: Option<bool>,
}

impl UNet2DConditionConfig {
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Heads per down block (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self) -> Result<Vec<usize>, String> {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(self.levels(), "num_attention_heads / attention_head_dim")
    }

    pub fn transformer_layers(&self) -> Result<Vec<usize>, String> {
        self.transformer_layers_per_block.expand(self.levels(), "transformer_layers_per_block")
    }

    /// Transformer depth per up block; diffusers reverses the down list unless given.
    pub fn reverse_transformer_layers(&self) -> Result<Vec<usize>, String> {
        match &self.reverse_transformer_layers_per_block {
            None | Some(serde_json::Value::Null) => Ok(self.transformer_layers()?.into_iter().rev().collect()),
            Some(v) => {
                let rows: Vec<Vec<usize>> = serde_json::from_value(v.clone()).map_err(|_| {
                    "unet config: reverse_transformer_layers_per_block must be a list of lists of integers".to_string()
                })?;
                // Per-layer depths inside a block are not used by any SDXL checkpoint; accept
                // them only when uniform within a block.
                rows.iter()
                    .map(|r| match r.first() {
                        Some(&d) if r.iter().all(|&x| x == d) => Ok(d),
                        _ => Err("unet config: non-uniform reverse_transformer_layers_per_block is not supported".into()),
                    })
                    .collect()
            }
        }
    }

    pub fn has_cross_attention(block_type: &str) -> bool {
        block_type.starts_with("CrossAttn")
    }

    pub fn validate(&self) -> Result<(), String> {
        let n = self.levels();
        if n == 0 {
            return Err("unet config: block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "unet config: down_block_types ({}) and up_block_types ({}) must both have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return Err(format!("unet config: down block type {t:?} is not supported (DownBlock2D, CrossAttnDownBlock2D)"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return Err(format!("unet config: up block type {t:?} is not supported (UpBlock2D, CrossAttnUpBlock2D)"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(format!("unet config: mid_block_type {m:?} is not supported (UNetMidBlock2DCrossAttn)"));
            }
        }
        let checks: [(bool, &str); 8] = [
            (self.act_fn != "silu", "act_fn must be \"silu\""),
            (self.resnet_time_scale_shift != "default", "resnet_time_scale_shift must be \"default\""),
            (self.time_embedding_type != "positional", "time_embedding_type must be \"positional\""),
            (self.class_embed_type.is_some(), "class_embed_type is not supported"),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim is not supported"),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim (LCM-distilled UNets) is not supported"),
            (self.dual_cross_attention, "dual_cross_attention is not supported"),
            (self.conv_in_kernel != 3 || self.conv_out_kernel != 3, "conv_in_kernel / conv_out_kernel must be 3"),
        ];
        if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
            return Err(format!("unet config: {msg}"));
        }
        if self.only_cross_attention.as_bool() == Some(true) {
            return Err("unet config: only_cross_attention is not supported".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() => {
                return Err("unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
            }
            Some("text_time") => {}
            Some(other) => return Err(format!("unet config: addition_embed_type {other:?} is not supported (text_time)")),
        }
        let heads = self.heads()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(format!("unet config: block {i} has {c} channels, not divisible into {h} heads"));
            }
            if c % self.norm_num_groups != 0 {
                return Err(format!("unet config: block {i} has {c} channels, not divisible into {} groups", self.norm_num_groups));
            }
        }
        self.transformer_layers()?;
        self.reverse_transformer_layers()?;
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKlConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn one_usize() -> usize {
    1
}
fn scaling() -> f64 {
    0.18215
}

impl AutoencoderKlConfig {
    /// Pixels per latent along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("vae config: block_out_channels is empty".into());
        }
        if self.act_fn != "silu" {
            return Err(format!("vae config: act_fn {:?} is not supported (silu)", self.act_fn));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(format!("vae config: down block type {t:?} is not supported (DownEncoderBlock2D)"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(format!("vae config: up block type {t:?} is not supported (UpDecoderBlock2D)"));
            }
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!("vae config: {c} channels not divisible into {} groups", self.norm_num_groups));
            }
        }
        Ok(())
    }
}
