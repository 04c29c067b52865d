//! ViT image encoder (transformers `ViTModel`), used as the DINO ViT-S/16 embedder of
//! EST-LoRA's style discrepancy. Weight names follow transformers 5 (`layers.{i}.attention.q_proj`);
//! the engine renames older checkpoints (`encoder.layer.{i}.attention.attention.query`) on load.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, layer_norm, linear, Conv2d, Conv2dConfig, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use serde::Deserialize;

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_channels() -> usize {
    3
}

/// The fields of transformers' `ViTConfig` that the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ViTConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
}

impl ViTConfig {
    /// facebook/dino-vits16.
    pub fn dino_vits16() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            intermediate_size: 1536,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            qkv_bias: true,
        }
    }
}

#[derive(Debug, Clone)]
struct ViTLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

fn ln(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(size, LayerNormConfig { eps, ..Default::default() }, vb)
}

impl ViTLayer {
    fn new(vb: VarBuilder, c: &ViTConfig) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |n: &str, i: usize, o: usize, bias: bool| -> Result<Linear> {
            if bias {
                linear(i, o, vb.pp(n))
            } else {
                candle_nn::linear_no_bias(i, o, vb.pp(n))
            }
        };
        Ok(Self {
            q: lin("attention.q_proj", h, h, c.qkv_bias)?,
            k: lin("attention.k_proj", h, h, c.qkv_bias)?,
            v: lin("attention.v_proj", h, h, c.qkv_bias)?,
            o: lin("attention.o_proj", h, h, true)?,
            norm1: ln(h, c.layer_norm_eps, vb.pp("layernorm_before"))?,
            norm2: ln(h, c.layer_norm_eps, vb.pp("layernorm_after"))?,
            fc1: lin("mlp.fc1", h, c.intermediate_size, true)?,
            fc2: lin("mlp.fc2", c.intermediate_size, h, true)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let d = h / self.heads;
        let y = self.norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(self.q.forward(&y)?)?, split(self.k.forward(&y)?)?, split(self.v.forward(&y)?)?);
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        let x = (x + self.o.forward(&a)?)?;
        let y = self.norm2.forward(&x)?;
        let y = self.fc2.forward(&self.fc1.forward(&y)?.gelu_erf()?)?;
        x + y
    }
}

#[derive(Debug, Clone)]
pub struct ViTModel {
    patch: Conv2d,
    cls: Tensor,
    pos: Tensor,
    layers: Vec<ViTLayer>,
    norm: LayerNorm,
    config: ViTConfig,
}

impl ViTModel {
    pub fn new(vb: VarBuilder, config: &ViTConfig) -> Result<Self> {
        let c = config;
        if c.hidden_act != "gelu" {
            candle_core::bail!("ViT config: hidden_act '{}' is not supported (expected gelu)", c.hidden_act);
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!("ViT config: hidden_size {} is not divisible by {} heads", c.hidden_size, c.num_attention_heads);
        }
        let e = vb.pp("embeddings");
        let n = (c.image_size / c.patch_size).pow(2);
        let patch = conv2d(
            c.num_channels,
            c.hidden_size,
            c.patch_size,
            Conv2dConfig { stride: c.patch_size, ..Default::default() },
            e.pp("patch_embeddings.projection"),
        )?;
        Ok(Self {
            patch,
            cls: e.get((1, 1, c.hidden_size), "cls_token")?,
            pos: e.get((1, n + 1, c.hidden_size), "position_embeddings")?,
            layers: (0..c.num_hidden_layers).map(|i| ViTLayer::new(vb.pp(format!("layers.{i}")), c)).collect::<Result<_>>()?,
            norm: ln(c.hidden_size, c.layer_norm_eps, vb.pp("layernorm"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    /// `pixel_values` `[B, 3, image_size, image_size]` (normalised) → last hidden state
    /// `[B, 1 + patches, hidden]` after the final layer norm.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, hh, ww) = pixel_values.dims4()?;
        if hh != self.config.image_size || ww != self.config.image_size {
            candle_core::bail!("ViT expects {0}x{0} pixels, got {hh}x{ww}", self.config.image_size);
        }
        let x = self.patch.forward(&pixel_values.to_dtype(DType::F32)?)?; // [B, H, h, w]
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [B, N, H]
        let cls = self.cls.broadcast_as((b, 1, self.config.hidden_size))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        self.norm.forward(&x)
    }

    /// DINO's image embedding: the CLS token of the last hidden state.
    pub fn cls_embedding(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward(pixel_values)?.narrow(1, 0, 1)?.squeeze(1)
    }
}
