//! Group normalisation fused with the SiLU that follows it in every resnet.
//!
//! candle-nn's `GroupNorm` is built from a dozen tensor ops (each a full pass over memory);
//! at SDXL sizes that made it 5× slower than torch on the CPU. The fused kernel makes two
//! passes per group (statistics, then normalise + affine + optional SiLU), with statistics
//! accumulated in f64. On CUDA our kernel (`fused.rs`, `cuda/elementwise.cu`) does the same in three
//! launches; other devices and dtypes use the composed reference.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Parameters of one GroupNorm layer, with host copies for the CPU kernel and f32 copies on the
/// device for the CUDA one (made once, not per call).
#[derive(Debug, Clone)]
pub struct GroupNormParams {
    pub groups: usize,
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
    host: Option<(Vec<f32>, Vec<f32>)>,
    device_f32: Option<(Tensor, Tensor)>,
}

impl GroupNormParams {
    pub fn new(groups: usize, eps: f64, weight: Tensor, bias: Tensor) -> Result<Self> {
        let host = if weight.device().is_cpu() {
            Some((weight.to_dtype(DType::F32)?.to_vec1()?, bias.to_dtype(DType::F32)?.to_vec1()?))
        } else {
            None
        };
        let device_f32 = if weight.device().is_cpu() { None } else { Some((weight.to_dtype(DType::F32)?.contiguous()?, bias.to_dtype(DType::F32)?.contiguous()?)) };
        Ok(Self { groups, eps, weight, bias, host, device_f32 })
    }

    /// Weight and bias as contiguous f32 on their device.
    pub fn device_f32(&self) -> Result<(Tensor, Tensor)> {
        match &self.device_f32 {
            Some((w, b)) => Ok((w.clone(), b.clone())),
            None => Ok((self.weight.to_dtype(DType::F32)?.contiguous()?, self.bias.to_dtype(DType::F32)?.contiguous()?)),
        }
    }
}

struct FusedGroupNorm<'a> {
    groups: usize,
    eps: f64,
    weight: &'a [f32],
    bias: &'a [f32],
    silu: bool,
}

impl CustomOp1 for FusedGroupNorm<'_> {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let data = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("fused-group-norm: expected contiguous f32"),
        };
        let cpg = c / self.groups;
        let block = cpg * spatial;
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(block).zip(data.par_chunks(block)).enumerate().for_each(|(i, (o, x))| {
            let g = i % self.groups;
            let count = x.len() as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / count;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for ch in 0..cpg {
                let cidx = g * cpg + ch;
                let scale = (rstd * self.weight[cidx] as f64) as f32;
                let shift = (self.bias[cidx] as f64 - mean * rstd * self.weight[cidx] as f64) as f32;
                let (xs, os) = (&x[ch * spatial..(ch + 1) * spatial], &mut o[ch * spatial..(ch + 1) * spatial]);
                if self.silu {
                    for (ov, &xv) in os.iter_mut().zip(xs) {
                        let y = xv * scale + shift;
                        *ov = y / (1.0 + (-y).exp());
                    }
                } else {
                    for (ov, &xv) in os.iter_mut().zip(xs) {
                        *ov = xv * scale + shift;
                    }
                }
            }
        });
        let _ = n;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The composed reference (any device, any dtype): normalise in f32, then affine.
pub fn group_norm_reference(x: &Tensor, p: &GroupNormParams, silu: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xg = x.to_dtype(DType::F32)?.reshape((n, p.groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + p.eps)?.sqrt()?)?.reshape(dims.clone())?;
    let mut shape = vec![1usize; dims.len()];
    shape[1] = c;
    let w = p.weight.to_dtype(DType::F32)?.reshape(shape.clone())?;
    let b = p.bias.to_dtype(DType::F32)?.reshape(shape)?;
    let y = normed.broadcast_mul(&w)?.broadcast_add(&b)?;
    let y = if silu { y.silu()? } else { y };
    y.to_dtype(dtype)
}

/// GroupNorm over `[n, c, ...]`, optionally followed by SiLU.
pub fn group_norm(x: &Tensor, p: &GroupNormParams, silu: bool) -> Result<Tensor> {
    if crate::fused::differentiable() {
        return group_norm_reference(x, p, silu);
    }
    if let Some(y) = crate::fused::group_norm(x, p, silu)? {
        return Ok(y);
    }
    match &p.host {
        Some((w, b)) if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 => {
            let op = FusedGroupNorm { groups: p.groups, eps: p.eps, weight: w, bias: b, silu };
            x.contiguous()?.apply_op1_no_bwd(&op)
        }
        _ => group_norm_reference(x, p, silu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_equals_reference() -> Result<()> {
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &d)? + 0.7)?;
        let p = GroupNormParams::new(4, 1e-5, Tensor::randn(1f32, 0.3, 12, &d)?, Tensor::randn(0f32, 0.3, 12, &d)?)?;
        for silu in [false, true] {
            let a = group_norm(&x, &p, silu)?;
            let b = group_norm_reference(&x, &p, silu)?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "silu={silu}: {diff}");
        }
        Ok(())
    }
}
