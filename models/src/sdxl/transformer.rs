//! `Transformer2DModel` with `BasicTransformerBlock`s (diffusers `models/transformers/
//! transformer_2d.py`, `models/attention.py`): self-attention, cross-attention, GEGLU
//! feed-forward, with linear or 1×1-conv input/output projections.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use loramix_kernels::GroupNormParams;

use crate::adapter::{group_norm, Adaptable, AdaptableConv2d, AdaptableLayer, AdaptableLinear};

/// diffusers `Attention` as used in transformer blocks (no bias on q/k/v, bias on the output).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: AdaptableLinear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: AdaptableLinear::new(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: AdaptableLinear::new(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: AdaptableLinear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, lq, _) = x.dims3()?;
        let lk = ctx.dim(1)?;
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        // Views, not copies: the attention kernels copy what they cannot read in place.
        let heads = |t: Tensor, l: usize| -> Result<Tensor> { t.reshape((b, l, self.heads, self.head_dim))?.transpose(1, 2) };
        if context.is_some() {
            let tokens = self.to_q.slot().read().probe_tokens.clone();
            if let Some(tokens) = tokens.filter(|t| !t.is_empty()) {
                let map = self.attention_mass(&heads(q.clone(), lq)?, &heads(k.clone(), lk)?, &tokens)?;
                self.to_q.slot().write().probe_map = Some(map);
            }
        }
        let o = loramix_kernels::scaled_dot_product_attention(
            &heads(q, lq)?,
            &heads(k, lk)?,
            &heads(v, lk)?,
            (self.head_dim as f64).powf(-0.5),
        )?;
        let o = o.transpose(1, 2)?.reshape((b, lq, self.heads * self.head_dim))?;
        self.to_out.forward(&o)
    }
}

impl Attention {
    /// The attention mass each query token puts on the prompt tokens `tokens`, averaged over
    /// heads: `[batch, queries]` (for the mixer's cross-attention probe).
    fn attention_mass(&self, q: &Tensor, k: &Tensor, tokens: &[usize]) -> Result<Tensor> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let (q, k) = (q.to_dtype(candle_core::DType::F32)?.contiguous()?, k.to_dtype(candle_core::DType::F32)?.contiguous()?);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?; // [b, h, lq, lk]
        let lk = p.dim(3)?;
        let idx: Vec<u32> = tokens.iter().filter(|&&t| t < lk).map(|&t| t as u32).collect();
        if idx.is_empty() {
            return Tensor::zeros((q.dim(0)?, q.dim(2)?), candle_core::DType::F32, q.device());
        }
        let idx = Tensor::new(idx.as_slice(), q.device())?;
        p.index_select(&idx, 3)?.sum(3)?.mean(1)
    }
}

impl Adaptable for Attention {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.to_q.collect_adaptable(out);
        self.to_k.collect_adaptable(out);
        self.to_v.collect_adaptable(out);
        self.to_out.collect_adaptable(out);
    }
}

/// GEGLU feed-forward: `net.0.proj` to twice the inner width, `h * gelu(gate)`, `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: AdaptableLinear,
    out: AdaptableLinear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: AdaptableLinear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: AdaptableLinear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&loramix_kernels::geglu(&self.proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        let ln = LayerNormConfig { eps: 1e-5, ..Default::default() };
        Ok(Self {
            norm1: layer_norm(dim, ln, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: layer_norm(dim, ln, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: layer_norm(dim, ln, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Our LayerNorm kernel (candle-nn's on other devices and dtypes).
        let x = (self.attn1.forward(&loramix_kernels::layer_norm(x, &self.norm1)?, None)? + x)?;
        let x = (self.attn2.forward(&loramix_kernels::layer_norm(&x, &self.norm2)?, Some(context))? + &x)?;
        self.ff.forward(&loramix_kernels::layer_norm(&x, &self.norm3)?)? + x
    }
}

impl Adaptable for BasicTransformerBlock {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.attn1.collect_adaptable(out);
        self.attn2.collect_adaptable(out);
        self.ff.proj.collect_adaptable(out);
        self.ff.out.collect_adaptable(out);
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(AdaptableLinear),
    Conv(AdaptableConv2d),
}

impl Adaptable for Projection {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        match self {
            Self::Linear(l) => l.collect_adaptable(out),
            Self::Conv(c) => c.collect_adaptable(out),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNormParams,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct Transformer2DSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, s: &Transformer2DSpec) -> Result<Self> {
        let c = s.channels;
        let head_dim = c / s.heads;
        let inner = s.heads * head_dim;
        let (proj_in, proj_out) = if s.linear_projection {
            (
                Projection::Linear(AdaptableLinear::new(vb.pp("proj_in"), c, inner, true)?),
                Projection::Linear(AdaptableLinear::new(vb.pp("proj_out"), inner, c, true)?),
            )
        } else {
            (
                Projection::Conv(AdaptableConv2d::new(vb.pp("proj_in"), c, inner, 1, 1, 0)?),
                Projection::Conv(AdaptableConv2d::new(vb.pp("proj_out"), inner, c, 1, 1, 0)?),
            )
        };
        let blocks = (0..s.layers)
            .map(|i| BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), inner, s.heads, head_dim, s.context_dim))
            .collect::<Result<Vec<_>>>()?;
        // diffusers hard-codes eps = 1e-6 for this norm, whatever the UNet's norm_eps.
        Ok(Self { norm: group_norm(s.groups, c, 1e-6, vb.pp("norm"))?, proj_in, blocks, proj_out })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let normed = loramix_kernels::group_norm(x, &self.norm, false)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut t = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(normed)?)?,
            Projection::Conv(c) => to_tokens(c.forward(&normed)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => to_image(l.forward(&t)?)?,
            Projection::Conv(c) => c.forward(&to_image(t)?)?,
        };
        out + x
    }
}

impl Adaptable for Transformer2DModel {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.proj_in.collect_adaptable(out);
        self.blocks.collect_adaptable(out);
        self.proj_out.collect_adaptable(out);
    }
}
