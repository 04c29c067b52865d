//! Scaled dot-product attention.
//!
//! The plain formulation materialises a `[batch·heads, q, k]` score matrix: at SDXL's 1024²
//! that is 4096×4096 per head, over a gigabyte per batch element, and the softmax then streams
//! it through memory three times. On the CPU we work per (head, 256-query block) instead: the
//! block's scores (256 × k floats, 1 MB at 1024 keys) stay in cache between the two GEMMs and the
//! softmax, and the blocks run in parallel with single-threaded GEMMs. Softmax is per row, so
//! this computes the same numbers as the sliced reference, which other devices and dtypes use.

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor, D};
use rayon::prelude::*;

/// Largest score matrix (elements) held at once per call; ~256 MiB in f32.
const MAX_SCORE_ELEMENTS: usize = 64 * 1024 * 1024;

/// `softmax(q kᵀ · scale) v` for `q: [b, h, lq, d]`, `k, v: [b, h, lk, d]`.
///
/// Scores and softmax run in f32 whatever the input dtype (half-precision softmax over long
/// rows loses several bits); the result has the dtype of `q`. On CUDA with head dim 64 this is
/// our fused kernel (`fused.rs`), which never materialises the scores.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let _span = crate::profile::span("attention");
    if crate::fused::differentiable() {
        // Composed ops only (no in-place softmax), so that autograd reaches q, k and v.
        let s = (q.contiguous()?.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?;
        return softmax_last_dim(&s)?.matmul(&v.contiguous()?);
    }
    if let Some(half) = crate::half_on_cpu(q) {
        let (q, k, v) = (crate::f32_copy(q)?, crate::f32_copy(k)?, crate::f32_copy(v)?);
        return scaled_dot_product_attention(&q, &k, &v, scale)?.to_dtype(half);
    }
    if crate::fused::attention_is_fused(q, k, v) {
        crate::fused::attention_hd64(q, k, v, scale)
    } else if q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
        blocked_cpu(q, k, v, scale)
    } else {
        sliced(q, k, v, scale)
    }
}

/// Queries per task. Measured on the AMD Zen 3 VM (2 threads, head dim 64, blocks of 64 to 1024
/// timed in alternation in one process): 256 was the fastest or tied at every UNet shape, e.g.
/// 2×5 heads × 1024² 20.4 against 21.7 ms at 128 and 22.6 at 64; 2 heads × 4096² 66.6 against 67.2
/// (128) and 68.1 (512). Fewer, larger blocks make the two GEMMs' shapes better for gemm (each
/// packs k and v once per block), and at the UNet's shapes there are still ≥ 20 blocks to share.
const QUERY_BLOCK: usize = 256;

/// A `[b, h, l, d]` operand read in place: the UNet hands over `[b, l, h·d]` projections viewed
/// as heads (a transpose), and copying them out took a fifth of attention's time.
struct Operand<'a> {
    data: &'a [f32],
    offset: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl<'a> Operand<'a> {
    /// `t` must be f32 in host memory with a dense last dimension.
    fn strided(storage: &'a candle_core::Storage, t: &Tensor) -> Result<Self> {
        let layout = t.layout();
        match (storage, layout.stride()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(data)), &[batch, head, row, 1]) => Ok(Self { data, offset: layout.start_offset(), batch, head, row }),
            _ => candle_core::bail!("attention: expected a [b, h, l, d] f32 CPU tensor with a dense last dimension"),
        }
    }

    /// First element of head `hi` of batch element `bi`, and of row `r` within it.
    fn at(&self, bi: usize, hi: usize, r: usize) -> *const f32 {
        self.data[self.offset + bi * self.batch + hi * self.head + r * self.row..].as_ptr()
    }
}

/// Blocks of queries of every head in parallel; q, k and v are read where they lie, and the
/// output is written as `[b, lq, h, dv]` and returned as its `[b, h, lq, dv]` view, so that the
/// caller's merge of the heads back into `[b, lq, h·dv]` is free too.
fn blocked_cpu(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let dv = v.dim(3)?;
    if k.dims4()? != (b, h, lk, d) || v.dims4()? != (b, h, lk, dv) {
        candle_core::bail!("attention: q {:?}, k {:?} and v {:?} do not match", q.dims(), k.dims(), v.dims());
    }
    if b * h * lq * lk * d * dv == 0 {
        // Nothing to read in place (and softmax over no keys, or over all-zero scores, is the
        // reference's to define).
        return sliced(q, k, v, scale);
    }
    let dense_rows = |t: &Tensor| -> Result<Tensor> {
        if t.layout().stride().last() == Some(&1) { Ok(t.clone()) } else { t.contiguous() }
    };
    let (q, k, v) = (dense_rows(q)?, dense_rows(k)?, dense_rows(v)?);
    let (qs, _) = q.storage_and_layout();
    let (ks, _) = k.storage_and_layout();
    let (vs, _) = v.storage_and_layout();
    let (qo, ko, vo) = (Operand::strided(&qs, &q)?, Operand::strided(&ks, &k)?, Operand::strided(&vs, &v)?);
    // SAFETY: the tasks together cover every (image, head, query block), and each one's second
    // GEMM writes its [rows, dv] block without reading it.
    let mut out = unsafe { crate::uninit_output(b * lq * h * dv) };
    let out_ptr = crate::blocks::SharedOut::new(&mut out);
    let scale = scale as f32;
    let blocks_per_head = lq.div_ceil(QUERY_BLOCK);
    let block = |task: usize| {
        let (head, blk) = (task / blocks_per_head, task % blocks_per_head);
        let (bi, hi) = (head / h, head % h);
        let first = blk * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(lq - first);
        // SAFETY: the first GEMM writes all of it without reading it.
        let mut scores = unsafe { crate::uninit_output(rows * lk) };
        // SAFETY: each operand pointer with its strides addresses a [rows or lk, d or dv] block
        // inside its tensor's storage (checked by `at`'s slicing for the first element, and by
        // the layout for the rest); the output block is [rows, dv] with row stride h·dv inside
        // `out`, and no other task writes it.
        unsafe {
            // scores = scale · q_blk · kᵀ
            gemm::gemm(
                rows, lk, d,
                scores.as_mut_ptr(), 1, lk as isize, false,
                qo.at(bi, hi, first), 1, qo.row as isize,
                ko.at(bi, hi, 0), ko.row as isize, 1,
                0.0, scale, false, false, false, gemm::Parallelism::None,
            );
        }
        for row in scores.chunks_mut(lk) {
            softmax_row(row);
        }
        unsafe {
            // out = probs · v
            let dst = out_ptr.ptr().add(((bi * lq + first) * h + hi) * dv);
            gemm::gemm(
                rows, dv, lk,
                dst, 1, (h * dv) as isize, false,
                scores.as_ptr(), 1, lk as isize,
                vo.at(bi, hi, 0), 1, vo.row as isize,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            );
        }
    };
    // Small problems stay on the calling thread: waking the pool costs more than they do.
    if b * h * lq * lk * d < crate::linear::SERIAL_MACS {
        (0..b * h * blocks_per_head).for_each(block);
    } else {
        (0..b * h * blocks_per_head).into_par_iter().for_each(block);
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (b, lq, h, dv), q.device())?.transpose(1, 2)
}

/// `exp(x)` for `x <= 0` (softmax after subtracting the row max), relative error below 3e-7.
/// Branch-free integer/float arithmetic so the softmax loop vectorises; libm's `expf` per
/// element was a third of attention time.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n · LN2_HI is exact (Cody–Waite)
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let y = (x - n * LN2_HI) - n * LN2_LO; // |y| <= ln2 / 2
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    // 2ⁿ from the integer sitting in `shifted`'s mantissa.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(n_int.wrapping_add(127) << 23) * p
}

crate::simd::multiversion! {
    fn softmax_row(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in row.iter_mut() {
            *x = exp_nonpositive(*x - max);
        }
        // Eight partial sums so the reduction vectorises (a single running sum cannot).
        let mut acc = [0f32; 8];
        let chunks = row.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for i in 0..8 {
                acc[i] += c[i];
            }
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The reference: whole score rows, sliced over queries to bound memory.
pub fn sliced(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
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
    let out = if outs.len() == 1 {
        outs.pop().expect("one slice")
    } else {
        Tensor::cat(&outs, 2)?
    };
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
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: expected contiguous".into()))?;
        match storage {
            CpuStorage::F32(v) => {
                v[a..b].par_chunks_mut(width).for_each(softmax_row);
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
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.001;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
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
        let c = sliced(&q, &k, &v, 0.3)?;
        let diff = (c - naive(&q, &k, &v, 0.3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "sliced: max diff {diff}");
        // One ragged query block, value width != key width.
        let q = Tensor::randn(0f32, 1., (1, 2, 70, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 2, 45, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, 2, 45, 5), &dev)?;
        let diff = (scaled_dot_product_attention(&q, &k, &v, 0.4)? - naive(&q, &k, &v, 0.4)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "blocked: max diff {diff}");
        // As the UNet passes them: [b, l, h·d] projections viewed as heads, not copied; two
        // query blocks (the second ragged), on the pool.
        let view = |l: usize, d: usize| -> Result<Tensor> { Tensor::randn(0f32, 1., (2, l, 3, d), &dev)?.transpose(1, 2) };
        let (q, k, v) = (view(300, 16)?, view(200, 16)?, view(200, 12)?);
        assert!(!q.is_contiguous());
        let a = scaled_dot_product_attention(&q, &k, &v, 0.25)?;
        assert_eq!(a.dims(), &[2, 3, 300, 12]);
        let want = naive(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, 0.25)?;
        let diff = (a - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "strided: max diff {diff}");
        assert!(scaled_dot_product_attention(&q, &k.narrow(3, 0, 8)?, &v, 0.25).is_err(), "mismatched head widths must be refused");
        Ok(())
    }
}
