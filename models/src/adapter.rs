//! The LoRA-capable layer types.
//!
//! Every linear and convolution that a LoRA can target is built as one of these types. Each
//! carries a shared, lockable state so that code outside the model — the LoRA loader, the
//! per-step mixing engine — can attach low-rank branches, change their weights between steps,
//! or swap in a fused weight, without the model code knowing anything about LoRA formats.
//!
//! Forward: `y = W x + b + Σ_i weight_i · scale_i · ΔW_i x`, with ΔW_i kept factored (`up_i(down_i(x))`)
//! where it is low-rank.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

/// The weights of one update attached to a layer.
///
/// For a linear layer a low-rank `down` is `[rank, in]` and `up` is `[out, rank]`. For a
/// convolution `down` is a kernel `[rank, in, kh, kw]` applied with the base layer's stride and
/// padding, and `up` is `[out, rank, 1, 1]`. LoHa factors become a low-rank pair at load time
/// (a Hadamard product of two rank-r products is exactly a rank-r² product). Updates with no
/// useful low-rank form (LoKr's Kronecker products, LyCORIS full diffs) are `Dense`: a ΔW with
/// the base weight's shape.
#[derive(Debug, Clone)]
pub enum BranchWeights {
    LowRank { down: Tensor, up: Tensor },
    Dense(Tensor),
}

impl BranchWeights {
    /// ΔW (without scale) in the base weight's shape.
    pub fn delta(&self) -> Result<Tensor> {
        match self {
            Self::Dense(d) => Ok(d.clone()),
            Self::LowRank { down, up } if down.rank() == 2 => up.matmul(down),
            Self::LowRank { down, up } => {
                let (r, i, kh, kw) = down.dims4()?;
                let o = up.dim(0)?;
                up.reshape((o, r))?.matmul(&down.reshape((r, i * kh * kw))?)?.reshape((o, i, kh, kw))
            }
        }
    }
}

/// One update attached to a layer: `weight · scale · ΔW`.
#[derive(Debug, Clone)]
pub struct LowRankBranch {
    /// Caller-chosen name (usually the adapter's name) so weights can be set by name.
    pub name: String,
    pub weights: BranchWeights,
    /// The format's own scale (alpha / rank for LoRA).
    pub scale: f64,
    /// The user's strength times whatever the mixing strategy sets for this step; 0 disables.
    pub weight: f64,
}

impl LowRankBranch {
    pub fn low_rank(name: impl Into<String>, down: Tensor, up: Tensor, scale: f64, weight: f64) -> Self {
        Self { name: name.into(), weights: BranchWeights::LowRank { down, up }, scale, weight }
    }
}

/// Mutable state of one adaptable layer.
#[derive(Debug, Default)]
pub struct LayerState {
    /// A replacement for the base weight (a fused static mix), kept beside the original so
    /// that "unfusing" is dropping it, never subtracting (which drifts).
    pub fused_weight: Option<Tensor>,
    pub branches: Vec<LowRankBranch>,
}

/// Shared handle to a layer's [`LayerState`].
#[derive(Debug, Clone, Default)]
pub struct AdapterSlot(Arc<RwLock<LayerState>>);

impl AdapterSlot {
    pub fn read(&self) -> RwLockReadGuard<'_, LayerState> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, LayerState> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    Conv2d { kernel: usize, stride: usize, padding: usize },
}

/// A cheap handle describing one adaptable layer, as listed by [`Adaptable`].
#[derive(Debug, Clone)]
pub struct AdaptableLayer {
    /// The diffusers / transformers module path, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    pub kind: LayerKind,
    pub in_features: usize,
    pub out_features: usize,
    pub base_weight: Tensor,
    pub slot: AdapterSlot,
}

/// Models and blocks list their adaptable layers in execution order.
pub trait Adaptable {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>);

    fn adaptable_layers(&self) -> Vec<AdaptableLayer> {
        let mut v = Vec::new();
        self.collect_adaptable(&mut v);
        v
    }
}

impl<T: Adaptable> Adaptable for Vec<T> {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.iter().for_each(|x| x.collect_adaptable(out));
    }
}

impl<T: Adaptable> Adaptable for Option<T> {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        if let Some(x) = self {
            x.collect_adaptable(out)
        }
    }
}

/// A linear layer that LoRA can target.
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    base: Linear,
    path: String,
    in_features: usize,
    out_features: usize,
    slot: AdapterSlot,
}

impl AdaptableLinear {
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        Ok(Self {
            base: Linear::new(weight, bias),
            path: vb.prefix(),
            in_features,
            out_features,
            slot: AdapterSlot::default(),
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }
}

/// `x @ down^T @ up^T` summed over active branches, in x's dtype.
fn linear_branches(x: &Tensor, state: &LayerState) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for b in state.branches.iter().filter(|b| b.weight != 0.0) {
        let h = match &b.weights {
            BranchWeights::LowRank { down, up } => x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?,
            BranchWeights::Dense(delta) => x.broadcast_matmul(&delta.t()?)?,
        };
        let h = (h * (b.weight * b.scale))?;
        acc = Some(match acc {
            None => h,
            Some(a) => (a + h)?,
        });
    }
    Ok(acc)
}

/// On CUDA, every active low-rank branch of the layer at once: the LoRAs' down matrices stacked,
/// their up matrices side by side, one scale per rank row, as two cuBLAS GEMMs (`(x Aᵀ ⊙ s) Bᵀ`)
/// instead of two per LoRA plus their adds. Our one-launch kernel for the same sum
/// (`loramix_kernels::lora_branch`, tested against the reference) measured slower than these two
/// tensor-core GEMMs at every size on an H100 — 0.76× at 8192 rows down to 0.24× for one row
/// (BENCHMARKS.md) — so it is not dispatched here. `None` where a branch has no low-rank form
/// (the caller then runs the branches one by one) or with `LORAMIX_FUSED_KERNELS=0`. Stacking per
/// call copies only the small factor matrices.
#[cfg(feature = "cuda")]
fn stacked_linear_branches(x: &Tensor, y: &Tensor, state: &LayerState) -> Result<Option<Tensor>> {
    let active: Vec<&LowRankBranch> = state.branches.iter().filter(|b| b.weight != 0.0).collect();
    if active.is_empty() || !x.device().is_cuda() || !loramix_kernels::fused::fused_kernels_enabled() {
        return Ok(None);
    }
    let (mut downs, mut ups, mut scales) = (vec![], vec![], vec![]);
    for b in &active {
        match &b.weights {
            BranchWeights::LowRank { down, up } if down.rank() == 2 => {
                scales.extend(std::iter::repeat_n((b.weight * b.scale) as f32, down.dim(0)?));
                downs.push(down.to_dtype(x.dtype())?);
                ups.push(up.to_dtype(x.dtype())?);
            }
            _ => return Ok(None),
        }
    }
    let a = Tensor::cat(&downs, 0)?;
    let bm = Tensor::cat(&ups, 1)?;
    let in_f = x.dim(candle_core::D::Minus1)?;
    let out_dims = y.dims().to_vec();
    let out_f = *out_dims.last().unwrap_or(&0);
    let x2 = x.reshape(((), in_f))?;
    let y2 = y.reshape(((), out_f))?;
    let s = Tensor::from_slice(&scales, (1, scales.len()), x.device())?.to_dtype(x.dtype())?;
    let low = x2.matmul(&a.t()?)?.broadcast_mul(&s)?;
    Ok(Some((y2 + low.matmul(&bm.t()?)?)?.reshape(out_dims)?))
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let state = self.slot.read();
        // Bias through `bias_add` (our one-pass kernel on CUDA; candle's broadcast add elsewhere).
        let weight = state.fused_weight.as_ref().unwrap_or(self.base.weight());
        let y = Linear::new(weight.clone(), None).forward(x)?;
        let y = match self.base.bias() {
            Some(b) => loramix_kernels::fused::bias_add(&y, b, y.rank() - 1)?,
            None => y,
        };
        #[cfg(feature = "cuda")]
        if let Some(out) = stacked_linear_branches(x, &y, &state)? {
            return Ok(out);
        }
        match linear_branches(x, &state)? {
            Some(delta) => y + delta,
            None => Ok(y),
        }
    }
}

impl Adaptable for AdaptableLinear {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        out.push(AdaptableLayer {
            path: self.path.clone(),
            kind: LayerKind::Linear,
            in_features: self.in_features,
            out_features: self.out_features,
            base_weight: self.base.weight().clone(),
            slot: self.slot.clone(),
        });
    }
}

/// A 2-D convolution that LoRA can target (kohya "conv LoRA" / LoCon on resnets).
#[derive(Debug, Clone)]
pub struct AdaptableConv2d {
    base: Conv2d,
    path: String,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    slot: AdapterSlot,
}

impl AdaptableConv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let cfg = Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
        Ok(Self {
            base: Conv2d::new(weight, Some(bias), cfg),
            path: vb.prefix(),
            in_channels,
            out_channels,
            kernel,
            cfg,
            slot: AdapterSlot::default(),
        })
    }

}

impl Module for AdaptableConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let state = self.slot.read();
        let (stride, padding) = (self.cfg.stride, self.cfg.padding);
        let weight = state.fused_weight.as_ref().unwrap_or(self.base.weight());
        let mut y = loramix_kernels::conv2d(x, weight, self.base.bias(), stride, padding)?;
        for b in state.branches.iter().filter(|b| b.weight != 0.0) {
            let h = match &b.weights {
                BranchWeights::LowRank { down, up } => {
                    let h = loramix_kernels::conv2d(x, down, None, stride, padding)?;
                    loramix_kernels::conv2d(&h, up, None, 1, 0)?
                }
                BranchWeights::Dense(delta) => loramix_kernels::conv2d(x, delta, None, stride, padding)?,
            };
            y = (y + (h * (b.weight * b.scale))?)?;
        }
        Ok(y)
    }
}

impl Adaptable for AdaptableConv2d {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        out.push(AdaptableLayer {
            path: self.path.clone(),
            kind: LayerKind::Conv2d { kernel: self.kernel, stride: self.cfg.stride, padding: self.cfg.padding },
            in_features: self.in_channels,
            out_features: self.out_channels,
            base_weight: self.base.weight().clone(),
            slot: self.slot.clone(),
        });
    }
}

/// A GroupNorm layer's parameters (`weight`, `bias` under `vb`) for the fused kernel.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<loramix_kernels::GroupNormParams> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("{}: {channels} channels cannot be split into {groups} groups", vb.prefix());
    }
    loramix_kernels::GroupNormParams::new(groups, eps, vb.get(channels, "weight")?, vb.get(channels, "bias")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    /// The unfused branch equals applying the fused weight W + w·s·B A.
    #[test]
    fn branch_equals_fused_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 6, &dev)?;
        let mut m = HashMap::new();
        m.insert("l.weight".to_string(), w.clone());
        m.insert("l.bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let layer = AdaptableLinear::new(vb.pp("l"), 5, 6, true)?;
        let down = Tensor::randn(0f32, 1., (2, 5), &dev)?;
        let up = Tensor::randn(0f32, 1., (6, 2), &dev)?;
        layer.slot.write().branches.push(LowRankBranch::low_rank("a", down.clone(), up.clone(), 0.5, 0.8));
        let x = Tensor::randn(0f32, 1., (3, 4, 5), &dev)?;
        let y = layer.forward(&x)?;
        let fused = (w + (up.matmul(&down)? * 0.4)?)?;
        let y2 = Linear::new(fused, Some(b)).forward(&x)?;
        let d = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        assert_eq!(layer.adaptable_layers()[0].path, "l");
        Ok(())
    }
}
