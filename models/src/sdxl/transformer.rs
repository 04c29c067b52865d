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

    /// A cross-attention: its keys and values, made from the prompt alone, are kept while the
    /// prompt tensor and the weights stay the same ([`crate::adapter::ProductMemo`]).
    pub fn cross(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let mut a = Self::new(vb, query_dim, context_dim, heads, head_dim)?;
        a.to_k = a.to_k.remembering_inputs();
        a.to_v = a.to_v.remembering_inputs();
        Ok(a)
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, lq, _) = x.dims3()?;
        let lk = ctx.dim(1)?;
        let q = self.to_q.forward(x)?;
        // Views, not copies: the attention kernels copy what they cannot read in place.
        let heads = |t: Tensor, l: usize| -> Result<Tensor> { t.reshape((b, l, self.heads, self.head_dim))?.transpose(1, 2) };
        let attend = |q: &Tensor, k: Tensor, v: Tensor| -> Result<Tensor> {
            let o = loramix_kernels::scaled_dot_product_attention(&heads(q.clone(), lq)?, &heads(k, lk)?, &heads(v, lk)?, (self.head_dim as f64).powf(-0.5))?;
            o.transpose(1, 2)?.reshape((b, lq, self.heads * self.head_dim))
        };
        let regions = match context {
            Some(_) => self.kv_by_region(ctx, b, lq)?,
            None => None,
        };
        let o = match regions {
            // The masked queries (the subject's region) attend to the prompt as the leading
            // LoRAs read it, the others as the yielding ones do: one more attention over the
            // prompt's few tokens, no more UNet passes.
            Some(((k_lead, v_lead), (k_yield, v_yield), m)) => {
                self.probe(&heads, &q, &k_lead, lq, lk)?;
                let o_lead = attend(&q, k_lead, v_lead)?;
                let o_yield = attend(&q, k_yield, v_yield)?;
                let m = m.to_dtype(o_lead.dtype())?;
                (o_yield.broadcast_mul(&m.affine(-1.0, 1.0)?)? + o_lead.broadcast_mul(&m)?)?
            }
            None => {
                let k = self.to_k.forward(ctx)?;
                let v = self.to_v.forward(ctx)?;
                if context.is_some() {
                    self.probe(&heads, &q, &k, lq, lk)?;
                }
                attend(&q, k, v)?
            }
        };
        self.to_out.forward(&o)
    }

    /// Records the mixer's probe map (attention mass on the subjects' trigger tokens) when asked.
    fn probe(&self, heads: &dyn Fn(Tensor, usize) -> Result<Tensor>, q: &Tensor, k: &Tensor, lq: usize, lk: usize) -> Result<()> {
        let tokens = self.to_q.slot().read().probe_tokens.clone();
        if let Some(tokens) = tokens.filter(|t| !t.is_empty()) {
            let map = self.attention_mass(&heads(q.clone(), lq)?, &heads(k.clone(), lk)?, &tokens)?;
            self.to_q.slot().write().probe_map = Some(map);
        }
        Ok(())
    }

    /// Keys and values per region under a query mask on `to_k` / `to_v`: ((k, v) of the leading
    /// branches, (k, v) of the yielding ones, the mask over the queries `[b, lq, 1]`).
    #[allow(clippy::type_complexity)]
    fn kv_by_region(&self, ctx: &Tensor, b: usize, lq: usize) -> Result<Option<((Tensor, Tensor), (Tensor, Tensor), Tensor)>> {
        let (k, v) = (self.to_k.forward_by_route(ctx)?, self.to_v.forward_by_route(ctx)?);
        let Some(mask) = k.as_ref().or(v.as_ref()).map(|(_, _, m)| m.clone()) else { return Ok(None) };
        let Some(m) = crate::adapter::resize_mask(&mask, b, Some(lq), None)? else { return Ok(None) };
        let split = |t: Option<(Tensor, Tensor, Tensor)>, layer: &AdaptableLinear| -> Result<(Tensor, Tensor)> {
            match t {
                Some((lead, yielding, _)) => Ok((lead, yielding)),
                None => {
                    let y = layer.forward(ctx)?;
                    Ok((y.clone(), y))
                }
            }
        };
        let (k_lead, k_yield) = split(k, &self.to_k)?;
        let (v_lead, v_yield) = split(v, &self.to_v)?;
        Ok(Some(((k_lead, v_lead), (k_yield, v_yield), m)))
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
            attn2: Attention::cross(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{LowRankBranch, Route};
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// Under a query mask on `to_k` / `to_v`, every query attends to the prompt as the leading
    /// (and free) branches read it where the mask is 1, as the yielding (and free) ones do where
    /// it is 0, and in proportion between: the output is the mask's blend of the two attentions
    /// (exact, because `to_out` is affine and the blend's weights sum to one per query).
    #[test]
    fn query_mask_splits_cross_attention_by_route() -> Result<()> {
        let dev = Device::Cpu;
        let (qd, cd, heads, hd) = (8, 6, 2, 4);
        let mut m = HashMap::new();
        for (name, shape) in [("to_q.weight", (8, qd)), ("to_k.weight", (8, cd)), ("to_v.weight", (8, cd)), ("to_out.0.weight", (qd, 8))] {
            m.insert(name.to_string(), Tensor::randn(0f32, 1., shape, &dev)?);
        }
        m.insert("to_out.0.bias".to_string(), Tensor::randn(0f32, 1., qd, &dev)?);
        let attn = Attention::new(VarBuilder::from_tensors(m, DType::F32, &dev), qd, cd, heads, hd)?;
        let branch = |name: &str, route: Route| -> Result<LowRankBranch> {
            let mut b = LowRankBranch::low_rank(name, Tensor::randn(0f32, 1., (2, cd), &dev)?, Tensor::randn(0f32, 1., (8, 2), &dev)?, 0.5, 0.9);
            b.route = route;
            Ok(b)
        };
        for layer in [&attn.to_k, &attn.to_v] {
            layer.slot().write().branches = vec![branch("subject", Route::Lead)?, branch("style", Route::Yield)?, branch("other", Route::Free)?];
        }
        let x = Tensor::randn(0f32, 1., (2, 16, qd), &dev)?;
        let ctx = Tensor::randn(0f32, 1., (2, 5, cd), &dev)?;
        let mask = Tensor::rand(0f32, 1., (2, 1, 4, 4), &dev)?;
        // Each route alone, without the mask.
        let only = |off: &str| -> Result<Tensor> {
            for layer in [&attn.to_k, &attn.to_v] {
                for b in layer.slot().write().branches.iter_mut() {
                    b.weight = if b.name == off { 0.0 } else { 0.9 };
                }
            }
            attn.forward(&x, Some(&ctx))
        };
        let (lead, yielding) = (only("style")?, only("subject")?);
        for layer in [&attn.to_k, &attn.to_v] {
            let mut s = layer.slot().write();
            s.branches.iter_mut().for_each(|b| b.weight = 0.9);
            s.query_mask = Some(mask.clone());
        }
        let got = attn.forward(&x, Some(&ctx))?;
        let m = mask.reshape((2, 16, 1))?;
        let want = (lead.broadcast_mul(&m)? + yielding.broadcast_mul(&m.affine(-1.0, 1.0)?)?)?;
        let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        Ok(())
    }
}
