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
            Some((
                weight.to_dtype(DType::F32)?.to_vec1()?,
                bias.to_dtype(DType::F32)?.to_vec1()?,
            ))
        } else {
            None
        };
        let device_f32 = if weight.device().is_cpu() {
            None
        } else {
            Some((
                weight.to_dtype(DType::F32)?.contiguous()?,
                bias.to_dtype(DType::F32)?.contiguous()?,
            ))
        };
        Ok(Self {
            groups,
            eps,
            weight,
            bias,
            host,
            device_f32,
        })
    }

    /// Weight and bias as contiguous f32 on their device.
    pub fn device_f32(&self) -> Result<(Tensor, Tensor)> {
        match &self.device_f32 {
            Some((w, b)) => Ok((w.clone(), b.clone())),
            None => Ok((
                self.weight.to_dtype(DType::F32)?.contiguous()?,
                self.bias.to_dtype(DType::F32)?.contiguous()?,
            )),
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
        // SAFETY: `normalize_group` writes every element of each group.
        let mut out = unsafe { crate::uninit_output(data.len()) };
        let group = |(i, (o, x)): (usize, (&mut [f32], &[f32]))| {
            let g = i % self.groups;
            let (w, b) = (&self.weight[g * cpg..(g + 1) * cpg], &self.bias[g * cpg..(g + 1) * cpg]);
            normalize_group(o, x, w, b, spatial, self.eps, self.silu);
        };
        if data.len() < crate::linear::SERIAL_ELEMENTS {
            out.chunks_mut(block).zip(data.chunks(block)).enumerate().for_each(group);
        } else {
            out.par_chunks_mut(block).zip(data.par_chunks(block)).enumerate().for_each(group);
        }
        let _ = n;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

crate::simd::multiversion! {
    /// One group (`cpg` channels of `spatial` values): statistics, then affine and optional SiLU.
    fn normalize_group(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], spatial: usize, eps: f64, with_silu: bool) {
        let count = x.len() as f64;
        let mean = lane_sum(x, |v| v) / count;
        let m = mean as f32;
        let var = lane_sum(x, |v| (v - m) * (v - m)) / count;
        let rstd = 1.0 / (var + eps).sqrt();
        for ch in 0..weight.len() {
            let scale = (rstd * weight[ch] as f64) as f32;
            let shift = (bias[ch] as f64 - mean * rstd * weight[ch] as f64) as f32;
            let (xs, os) = (&x[ch * spatial..(ch + 1) * spatial], &mut o[ch * spatial..(ch + 1) * spatial]);
            if with_silu {
                for (ov, &xv) in os.iter_mut().zip(xs) {
                    *ov = silu(xv * scale + shift);
                }
            } else {
                for (ov, &xv) in os.iter_mut().zip(xs) {
                    *ov = xv * scale + shift;
                }
            }
        }
    }
}

/// `Σ f(x)` in f64 from 16 f32 lanes over blocks of 1024: the loop vectorises (a single f64
/// accumulator cannot, and made the statistics pass 6× slower than torch's), and no f32
/// partial sum holds more than 64 terms.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; 16];
        let mut lanes = block.chunks_exact(16);
        for c in &mut lanes {
            for i in 0..16 {
                acc[i] += f(c[i]);
            }
        }
        total += acc.iter().map(|&v| v as f64).sum::<f64>()
            + lanes.remainder().iter().map(|&v| f(v) as f64).sum::<f64>();
    }
    total
}

/// `y · sigmoid(y)` without a libm call or branch (the exponential of −|y| only), so it vectorises.
#[inline(always)]
fn silu(y: f32) -> f32 {
    let e = crate::attention::exp_nonpositive(-y.abs());
    let r = 1.0 / (1.0 + e);
    y * if y >= 0.0 { r } else { e * r }
}

crate::simd::multiversion! {
    /// One row of a layer norm, statistics as in `normalize_group`.
    fn layer_norm_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f64) {
        let count = x.len() as f64;
        let mean = lane_sum(x, |v| v) / count;
        let m = mean as f32;
        let var = lane_sum(x, |v| (v - m) * (v - m)) / count;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        for (((ov, &xv), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *ov = (xv - m) * rstd * w + b;
        }
    }
}

/// LayerNorm over the last dimension. candle-nn's ran 4× slower than torch's at SDXL transformer
/// widths on the CPU; this is one vectorised pass for statistics and one to normalise, rows in
/// parallel. Other devices and dtypes (and autograd) use candle-nn's, the reference.
pub fn layer_norm(x: &Tensor, norm: &candle_nn::LayerNorm) -> Result<Tensor> {
    let _span = crate::profile::span("layer norm");
    let dim = x.dim(candle_core::D::Minus1)?;
    if crate::half_on_cpu(x).is_some() {
        let norm32 = candle_nn::LayerNorm::new(crate::f32_copy(norm.weight())?, match norm.bias() {
            Some(b) => crate::f32_copy(b)?,
            None => Tensor::zeros(dim, DType::F32, x.device())?,
        }, norm.eps());
        return crate::half_rows(x, dim, |rows| layer_norm(rows, &norm32));
    }
    if crate::fused::differentiable()
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || norm.weight().dtype() != DType::F32
    {
        return candle_core::Module::forward(norm, x);
    }
    let weight: Vec<f32> = norm.weight().to_vec1()?;
    let bias: Vec<f32> = match norm.bias() {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
        None => vec![0.0; dim],
    };
    let x = x.contiguous()?;
    let (storage, _) = x.storage_and_layout();
    let data = crate::host_f32(&storage, &x, "layer_norm")?;
    // SAFETY: `layer_norm_row` writes every element of each row.
    let mut out = unsafe { crate::uninit_output(data.len()) };
    // ~16k values per task, so that a task's rows amortise rayon's cost.
    let rows_per_task = (16 * 1024 / dim.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * dim)
        .zip(data.par_chunks(rows_per_task * dim))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_mut(dim).zip(x.chunks(dim)) {
                layer_norm_row(orow, xrow, &weight, &bias, norm.eps());
            }
        });
    drop(storage);
    Tensor::from_vec(out, x.shape(), x.device())
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
    let normed = centered
        .broadcast_div(&(var + p.eps)?.sqrt()?)?
        .reshape(dims.clone())?;
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
    let _span = crate::profile::span("group norm (+SiLU)");
    if crate::fused::differentiable() {
        return group_norm_reference(x, p, silu);
    }
    if let Some(y) = crate::fused::group_norm(x, p, silu)? {
        return Ok(y);
    }
    if let (Some(half), Some(_)) = (crate::half_on_cpu(x), &p.host) {
        // One image at a time: statistics are per image, so the result is the same, and the f32
        // copy and output are an image's, not the batch's. In full-size SDXL's f16 step at 1024²
        // the whole batch's (2×960×128×128: 126 MB each) made the step's peak memory.
        let images = x.dim(0)?;
        if images > 1 && x.rank() >= 3 {
            let parts = (0..images).map(|i| group_norm(&x.narrow(0, i, 1)?, p, silu)).collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&parts, 0);
        }
        return group_norm(&crate::f32_copy(x)?, p, silu)?.to_dtype(half);
    }
    match &p.host {
        Some((w, b)) if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 => {
            let op = FusedGroupNorm {
                groups: p.groups,
                eps: p.eps,
                weight: w,
                bias: b,
                silu,
            };
            x.contiguous()?.apply_op1_no_bwd(&op)
        }
        _ => group_norm_reference(x, p, silu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A half-precision batch runs one image at a time; each image's result is the f32 kernel's
    /// on that image, rounded once, as for the whole batch at once.
    #[test]
    fn half_batch_equals_f32_per_image() -> Result<()> {
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (3, 12, 5, 7), &d)? + 0.7)?.to_dtype(DType::F16)?;
        let p = GroupNormParams::new(4, 1e-5, Tensor::randn(1f32, 0.3, 12, &d)?, Tensor::randn(0f32, 0.3, 12, &d)?)?;
        for silu in [false, true] {
            let got = group_norm(&x, &p, silu)?;
            assert_eq!(got.dtype(), DType::F16);
            let want = group_norm(&x.to_dtype(DType::F32)?, &p, silu)?.to_dtype(DType::F16)?;
            let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "silu {silu}");
        }
        Ok(())
    }

    #[test]
    fn fused_equals_reference() -> Result<()> {
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &d)? + 0.7)?;
        let p = GroupNormParams::new(
            4,
            1e-5,
            Tensor::randn(1f32, 0.3, 12, &d)?,
            Tensor::randn(0f32, 0.3, 12, &d)?,
        )?;
        for silu in [false, true] {
            let a = group_norm(&x, &p, silu)?;
            let b = group_norm_reference(&x, &p, silu)?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "silu={silu}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn layer_norm_equals_candle_nn() -> Result<()> {
        let d = Device::Cpu;
        for dim in [7, 320, 1280] {
            let x = (Tensor::randn(0f32, 2.0, (2, 33, dim), &d)? + 5.0)?;
            let norm = candle_nn::LayerNorm::new(
                Tensor::randn(1f32, 0.3, dim, &d)?,
                Tensor::randn(0f32, 0.3, dim, &d)?,
                1e-5,
            );
            let a = layer_norm(&x, &norm)?;
            let b = candle_core::Module::forward(&norm, &x)?;
            let rel = ((&a - &b)?.sqr()?.sum_all()?.sqrt()? / b.sqr()?.sum_all()?.sqrt()?)?
                .to_scalar::<f32>()?;
            assert!(rel < 1e-5, "dim {dim}: relative L2 {rel}");
        }
        Ok(())
    }

    #[test]
    fn fused_equals_reference_on_large_groups_with_offset() -> Result<()> {
        // 6 channels × 48² per group (17,280 values, many 1024-blocks) and a mean far from zero.
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.5, (2, 24, 48, 48), &d)? + 20.0)?;
        let p = GroupNormParams::new(
            4,
            1e-6,
            Tensor::randn(1f32, 0.3, 24, &d)?,
            Tensor::randn(0f32, 0.3, 24, &d)?,
        )?;
        for silu in [false, true] {
            let a = group_norm(&x, &p, silu)?;
            let b = group_norm_reference(&x, &p, silu)?;
            let rel = ((&a - &b)?.sqr()?.sum_all()?.sqrt()? / b.sqr()?.sum_all()?.sqrt()?)?
                .to_scalar::<f32>()?;
            assert!(rel < 1e-5, "silu={silu}: relative L2 {rel}");
        }
        Ok(())
    }
}
