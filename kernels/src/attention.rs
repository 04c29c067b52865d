//! Scaled dot-product attention, sliced over query rows.
//!
//! The plain formulation materialises a `[batch·heads, q, k]` score matrix: at SDXL's 1024²
//! that is 4096×4096 per head, over a gigabyte per batch element. Slicing the queries keeps the
//! peak to `slice × k` scores per head while computing exactly the same numbers (softmax is per
//! row), so results do not depend on the slice size.

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor, D};
use rayon::prelude::*;

/// Largest score matrix (elements) held at once per call; ~256 MiB in f32.
const MAX_SCORE_ELEMENTS: usize = 64 * 1024 * 1024;

/// `softmax(q kᵀ · scale) v` for `q: [b, h, lq, d]`, `k, v: [b, h, lk, d]`.
///
/// Scores and softmax run in f32 whatever the input dtype (half-precision softmax over long
/// rows loses several bits); the result has the dtype of `q`.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let in_dtype = q.dtype();
    let rows_per_slice = (MAX_SCORE_ELEMENTS / (b * h * lk).max(1)).clamp(1, lq.max(1));
    let k_t = k.to_dtype(DType::F32)?.transpose(2, 3)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    // Scaling q (d wide) is far cheaper than scaling the scores (lk wide).
    let q = (q.to_dtype(DType::F32)? * scale)?;
    let mut outs = Vec::with_capacity(lq.div_ceil(rows_per_slice));
    let mut start = 0;
    while start < lq {
        let len = rows_per_slice.min(lq - start);
        let qs = q.narrow(2, start, len)?.contiguous()?;
        let scores = qs.matmul(&k_t)?;
        let probs = softmax_rows(scores)?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    let out = if outs.len() == 1 { outs.pop().expect("one slice") } else { Tensor::cat(&outs, 2)? };
    out.to_dtype(in_dtype)
}

/// Softmax over rows of a contiguous f32 CPU buffer, in place and in parallel: no extra
/// buffer the size of the score matrix is allocated.
struct SoftmaxRowsInPlace;

impl InplaceOp1 for SoftmaxRowsInPlace {
    fn name(&self) -> &'static str {
        "softmax-rows-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        let (a, b) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("softmax: expected contiguous".into()))?;
        match storage {
            CpuStorage::F32(v) => {
                v[a..b].par_chunks_mut(width).for_each(|row| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                });
                Ok(())
            }
            _ => candle_core::bail!("softmax-rows-inplace: expected f32"),
        }
    }
}

/// Softmax over the last dimension of freshly computed scores (consumed).
fn softmax_rows(scores: Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 && scores.is_contiguous() {
        scores.inplace_op1(&SoftmaxRowsInPlace)?;
        Ok(scores)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// Numerically stable softmax over the last dimension (subtracts the row max, as torch does).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?;
        let p = softmax_last_dim(&s)?;
        p.matmul(v)
    }

    #[test]
    fn sliced_equals_naive() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 17, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 11, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 11, 8), &dev)?;
        let a = scaled_dot_product_attention(&q, &k, &v, 0.3)?;
        let b = naive(&q, &k, &v, 0.3)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
