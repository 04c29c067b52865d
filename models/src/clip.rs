//! CLIP text encoder as in transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
//!
//! SDXL uses CLIP-L (quick-GELU) and OpenCLIP-G (exact GELU, with a text projection). The
//! pipeline needs every layer's hidden state (it takes the penultimate one) and the pooled
//! end-of-text token, so [`ClipTextModel::forward`] returns all of them.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, LayerNormConfig, VarBuilder};
use serde::Deserialize;

use crate::adapter::{Adaptable, AdaptableLayer, AdaptableLinear};

/// Mirrors the fields of a transformers `CLIPTextConfig` (`text_encoder*/config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only meaningful for `CLIPTextModelWithProjection`.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

impl ClipTextConfig {
    pub fn has_projection(&self) -> bool {
        self.architectures.as_ref().is_some_and(|a| a.iter().any(|s| s == "CLIPTextModelWithProjection"))
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => candle_core::bail!("CLIP config: unsupported hidden_act {other:?} (expected quick_gelu or gelu)"),
        }
    }
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    out_proj: AdaptableLinear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: AdaptableLinear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: AdaptableLinear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: AdaptableLinear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: AdaptableLinear::new(vb.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?;
        let scores = scores.broadcast_add(causal_mask)?;
        let probs = loramix_kernels::attention::softmax_last_dim(&scores)?;
        let o = probs.matmul(&v.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let o = o.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let ln = LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() };
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm1: layer_norm(c.hidden_size, ln, vb.pp("layer_norm1"))?,
            fc1: AdaptableLinear::new(vb.pp("mlp.fc1"), c.hidden_size, c.intermediate_size, true)?,
            fc2: AdaptableLinear::new(vb.pp("mlp.fc2"), c.intermediate_size, c.hidden_size, true)?,
            layer_norm2: layer_norm(c.hidden_size, ln, vb.pp("layer_norm2"))?,
            act: Activation::parse(&c.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let m = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?)?;
        h + m
    }
}

/// Everything the pipelines need from one encoder pass.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[0]` is the embedding output, `hidden_states[i]` the output of layer i
    /// (before the final layer norm), as transformers' `output_hidden_states=True`.
    pub hidden_states: Vec<Tensor>,
    pub last_hidden_state: Tensor,
    /// Final-normed hidden state at the end-of-text token, `[batch, hidden]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` for the projection variant.
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<AdaptableLinear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` is rooted at the checkpoint root (keys `text_model.*`, `text_projection.weight`).
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let c = config;
        let tm = vb.pp("text_model");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(tm.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = match (c.has_projection(), c.projection_dim) {
            (true, Some(p)) => Some(AdaptableLinear::new(vb.pp("text_projection"), c.hidden_size, p, false)?),
            (true, None) => candle_core::bail!("CLIPTextModelWithProjection config has no projection_dim"),
            _ => None,
        };
        Ok(Self {
            token_embedding: embedding(c.vocab_size, c.hidden_size, tm.pp("embeddings.token_embedding"))?,
            position_embedding: embedding(c.max_position_embeddings, c.hidden_size, tm.pp("embeddings.position_embedding"))?,
            layers,
            final_layer_norm: layer_norm(
                c.hidden_size,
                LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() },
                tm.pp("final_layer_norm"),
            )?,
            text_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_slice(&mask, (t, t), device)
    }

    /// Index of the end-of-text token per row, as transformers picks it: with the legacy
    /// `eos_token_id == 2` configs (which SD checkpoints ship) it is the position of the
    /// largest id (EOS is the last vocab entry); otherwise the first occurrence of EOS.
    fn eos_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.config.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    row.iter().position(|&x| x == self.config.eos_token_id).unwrap_or(0)
                }
            })
            .collect()
    }

    /// `ids`: rows of equal length, already padded to the model's context length.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<ClipTextOutput> {
        self.forward_with_extra(ids, None, device)
    }

    /// [`Self::forward`] with `extra` (`[n, hidden]`) as token embeddings for ids
    /// `vocab_size..vocab_size + n`: textual-inversion vectors, placed as diffusers'
    /// `load_textual_inversion` places the tokens it adds to the vocabulary.
    pub fn forward_with_extra(&self, ids: &[Vec<u32>], extra: Option<&Tensor>, device: &Device) -> Result<ClipTextOutput> {
        let b = ids.len();
        let t = ids.first().map(|r| r.len()).unwrap_or(0);
        if ids.iter().any(|r| r.len() != t) {
            candle_core::bail!("CLIP input rows have different lengths");
        }
        if t > self.config.max_position_embeddings {
            candle_core::bail!("CLIP input of {t} tokens exceeds max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let vocab = self.config.vocab_size;
        let n_extra = match extra {
            Some(e) => e.dim(0)?,
            None => 0,
        };
        if let Some(&bad) = ids.iter().flatten().find(|&&x| x as usize >= vocab + n_extra) {
            candle_core::bail!("token id {bad} is outside the text encoder's vocabulary of {vocab} (+{n_extra} embedding vectors)");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let in_vocab: Vec<u32> = flat.iter().map(|&x| if (x as usize) < vocab { x } else { 0 }).collect();
        let input = Tensor::from_vec(in_vocab, (b, t), device)?;
        let pos = Tensor::arange(0u32, t as u32, device)?.unsqueeze(0)?;
        let mut tokens = self.token_embedding.forward(&input)?;
        if let Some(extra) = extra.filter(|_| flat.iter().any(|&x| x as usize >= vocab)) {
            // Positions past the vocabulary take their row of `extra`; the rest keep the table's.
            let is_extra: Vec<u8> = flat.iter().map(|&x| u8::from(x as usize >= vocab)).collect();
            let extra_idx: Vec<u32> = flat.iter().map(|&x| (x as usize).saturating_sub(vocab) as u32).collect();
            let picked = extra
                .to_dtype(tokens.dtype())?
                .to_device(device)?
                .index_select(&Tensor::from_vec(extra_idx, b * t, device)?, 0)?
                .reshape(tokens.shape())?;
            let mask = Tensor::from_vec(is_extra, (b, t, 1), device)?.broadcast_as(tokens.shape())?;
            tokens = mask.where_cond(&picked, &tokens)?;
        }
        let mut h = tokens.broadcast_add(&self.position_embedding.forward(&pos)?)?;
        let mask = Self::causal_mask(t, device)?;
        let mut hidden_states = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(&h, &mask)?;
            hidden_states.push(h.clone());
        }
        let last = self.final_layer_norm.forward(&h)?;
        let eos = self.eos_positions(ids);
        let pooled = Tensor::cat(
            &eos.iter().enumerate().map(|(i, &p)| last.narrow(0, i, 1)?.narrow(1, p, 1)?.squeeze(1)).collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { hidden_states, last_hidden_state: last, pooled, text_embeds })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}

impl Adaptable for ClipTextModel {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        for l in &self.layers {
            l.self_attn.q_proj.collect_adaptable(out);
            l.self_attn.k_proj.collect_adaptable(out);
            l.self_attn.v_proj.collect_adaptable(out);
            l.self_attn.out_proj.collect_adaptable(out);
            l.fc1.collect_adaptable(out);
            l.fc2.collect_adaptable(out);
        }
        self.text_projection.collect_adaptable(out);
    }
}
