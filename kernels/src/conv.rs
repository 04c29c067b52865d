//! 2-D convolution as im2col followed by GEMM, in blocks of output rows.
//!
//! candle's CPU conv2d spent more time building its column matrix than multiplying. Building the
//! whole column matrix of an image ourselves was better, but at 64×64 latents with 256+ input
//! channels that matrix is 38–56 MB: every call then took fresh pages from the kernel (glibc
//! maps allocations over 32 MB and unmaps them on free), and the GEMM streamed its right-hand
//! side from memory, so those convolutions ran at 40% of their GEMM's speed and 2–3× slower than
//! oneDNN. Here each task builds the columns of a few output rows (about 2 MB) in a buffer it keeps,
//! multiplies them straight into its columns of the output (bias pre-filled, so no extra pass),
//! and the tasks run in parallel with single-threaded GEMMs. Where an image has too few blocks to
//! share out, the blocks run in turn with a parallel GEMM. On CUDA the columns come from our kernel
//! (`fused::im2col`, all batch elements at once) and the GEMM is one batched cuBLAS call.

use std::cell::RefCell;

use candle_core::{DType, Result, Tensor};

use crate::blocks::SharedOut;

/// Target size of one task's column block, in f32 elements (2 MiB: 1, 4 and 8 MiB measured slower
/// on 64×64 latents with 128–384 channels).
const BLOCK_ELEMENTS: usize = 1 << 19;

/// Multiply-adds (batch × out × in channels × 9 × height × width) from which a 3×3 stride-1
/// convolution runs as Winograd (`winograd.rs`) instead of im2col. Below it the
/// transforms' passes and the pool's wake-up outweigh the GEMM savings: on 2 AVX-512 cores
/// Winograd lost at 2.4–4.7 M (batch 2, 32 → 32 channels at 8×8: 0.15 against 0.04 ms) and won
/// from 9 M (batch 1, 128 → 128 at 8×8: 0.20 against 0.28 ms) up to SDXL's sizes (1.3–1.6× from
/// 16×16 latents).
const WINOGRAD_MIN_MACS: usize = 8 << 20;

thread_local! {
    /// One column buffer per thread, reused across calls: no page faults after the first.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}


struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// Columns for output rows `rows` of one image `[c, h, w]`: `cols[(ci·k + ky)·k + kx][p]`, `p`
    /// the pixel within the block. Every element is written (the buffer is reused).
    fn im2col_rows(&self, x: &[f32], rows: std::ops::Range<usize>, cols: &mut [f32]) {
        let (k, s, p, w, ow) = (self.k, self.stride, self.padding as isize, self.w, self.ow);
        let px = rows.len() * ow;
        for ci in 0..self.c {
            let plane = &x[ci * self.h * w..(ci + 1) * self.h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let dst = &mut cols[((ci * k + ky) * k + kx) * px..][..px];
                    for (r, oy) in rows.clone().enumerate() {
                        let d = &mut dst[r * ow..(r + 1) * ow];
                        let iy = (oy * s) as isize + ky as isize - p;
                        if iy < 0 || iy >= self.h as isize {
                            d.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        if s == 1 {
                            // ix = ox + kx - p: copy the in-range span, zero the rest.
                            let off = kx as isize - p;
                            let lo = ((-off).max(0) as usize).min(ow);
                            let hi =
                                ((w as isize - off).min(ow as isize)).max(lo as isize) as usize;
                            d[..lo].fill(0.0);
                            d[hi..].fill(0.0);
                            if lo < hi {
                                d[lo..hi].copy_from_slice(
                                    &src[(lo as isize + off) as usize
                                        ..(hi as isize + off) as usize],
                                );
                            }
                        } else {
                            for (ox, v) in d.iter_mut().enumerate() {
                                let ix = (ox * s) as isize + kx as isize - p;
                                *v = if ix >= 0 && ix < w as isize {
                                    src[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// `out[:, rows] += weight · columns(rows)` for one image; `out` is that image's `[o, oh·ow]`.
    fn block(
        &self,
        x: &[f32],
        weight: &[f32],
        rows: std::ops::Range<usize>,
        out: SharedOut,
        parallelism: gemm::Parallelism,
    ) {
        let kk = self.c * self.k * self.k;
        let px = rows.len() * self.ow;
        let n = self.oh * self.ow;
        // Taken out of the cell for the block and put back after it, so that a block re-entered
        // on this thread while gemm waits for the pool gets columns of its own (not a borrow panic).
        let mut cols = COLUMNS.with(|buf| buf.take());
        if cols.len() < kk * px {
            cols.resize(kk * px, 0.0);
        }
        self.im2col_rows(x, rows.clone(), &mut cols[..kk * px]);
        // SAFETY: `weight` is [o, kk] row-major, `cols` [kk, px] row-major, and the
        // destination is columns rows.start·ow .. +px of the [o, n] row-major output,
        // which no other task writes.
        unsafe {
            gemm::gemm(
                self.o,
                px,
                kk,
                out.ptr().add(rows.start * self.ow),
                1,
                n as isize,
                true,
                weight.as_ptr(),
                1,
                kk as isize,
                cols.as_ptr(),
                1,
                px as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        COLUMNS.with(|buf| buf.replace(cols));
    }
}

/// A `[b, o, n]` output holding each channel's bias (zeros without one), for a GEMM to accumulate onto.
fn output_with_bias(b: usize, o: usize, n: usize, bias: Option<&Tensor>) -> Result<Vec<f32>> {
    let Some(bias) = bias else {
        return Ok(vec![0f32; b * o * n]);
    };
    let bias: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
    // SAFETY: every row is filled just below.
    let mut out = unsafe { crate::uninit_output(b * o * n) };
    out.chunks_mut(n.max(1)).enumerate().for_each(|(row, dst)| dst.fill(bias[row % o]));
    Ok(out)
}

/// A 1×1 convolution on the CPU: per image `y = W [o, c] · x [c, h·w]`, bias written first and
/// accumulated onto, small products on the calling thread (as in `linear.rs`).
fn conv1x1_cpu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (o, c, _, _) = weight.dims4()?;
    let (b, _, h, w) = x.dims4()?;
    let n = h * w;
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let bias: Option<Vec<f32>> = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
    // SAFETY: each image's product writes all of its [o, n] block (bias first, when there is one).
    let mut out = unsafe { crate::uninit_output(b * o * n) };
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    let (xd, wd) = (crate::host_f32(&xs, &x, "conv2d")?, crate::host_f32(&ws, &weight, "conv2d")?);
    for (img, dst) in out.chunks_mut((o * n).max(1)).enumerate() {
        let product = crate::blocks::Product {
            m: o, n, k: c,
            dst: dst.as_mut_ptr(), dst_cs: 1, dst_rs: n as isize,
            bias: bias.as_ref().map_or(crate::blocks::Bias::None, |b| crate::blocks::Bias::PerRow(b.as_ptr())),
            lhs: wd.as_ptr(), lhs_cs: 1, lhs_rs: c as isize,
            rhs: xd[img * c * n..].as_ptr(), rhs_cs: 1, rhs_rs: n as isize,
        };
        // SAFETY: dst is [o, n], W [o, c] and this image's x [c, n], all row-major, and the
        // bias [o], in bounds.
        unsafe { product.run_split() };
    }
    drop((xs, ws));
    Tensor::from_vec(out, (b, o, h, w), x.device())
}

/// The blocked CPU path: f32, square kernel, dilation 1, groups 1.
fn conv2d_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (o, c, k, _) = weight.dims4()?;
    let (b, _, h, w) = x.dims4()?;
    let (oh, ow) = (
        (h + 2 * padding - k) / stride + 1,
        (w + 2 * padding - k) / stride + 1,
    );
    let g = Geometry {
        c,
        h,
        w,
        o,
        k,
        stride,
        padding,
        oh,
        ow,
    };
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let n = oh * ow;
    let mut out = output_with_bias(b, o, n, bias)?;
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    let (xd, wd) = (crate::host_f32(&xs, &x, "conv2d")?, crate::host_f32(&ws, &weight, "conv2d")?);
    let rows_per_block = (BLOCK_ELEMENTS / (c * k * k * ow).max(1)).clamp(1, oh);
    let base = SharedOut::new(&mut out);
    crate::blocks::for_row_blocks(b, oh, rows_per_block, b * o * c * k * k * n, |img, rows, parallelism| {
        // SAFETY: image `img`'s output starts at img·o·n inside `out`; `rows` are this task's.
        let dst = unsafe { base.add(img * o * n) };
        g.block(&xd[img * c * h * w..(img + 1) * c * h * w], wd, rows, dst, parallelism);
    });
    drop((xs, ws));
    Tensor::from_vec(out, (b, o, oh, ow), x.device())
}

/// `conv2d(x [b, c, h, w], weight [o, c, k, k], bias [o])`, square kernel, dilation 1, groups 1.
/// Falls back to candle's conv2d off the CPU or for non-f32 dtypes.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (o, c, k, k2) = weight.dims4()?;
    let (b, _, h, w) = x.dims4()?;
    let _span = crate::profile::span(match (k, k2) {
        (1, 1) => "conv 1x1",
        (3, 3) => "conv 3x3",
        _ => "conv (other)",
    });
    if crate::fused::differentiable() {
        return conv2d_reference(x, weight, bias, stride, padding);
    }
    if let Some(half) = crate::half_on_cpu(x) {
        let bias = bias.map(crate::f32_copy).transpose()?;
        return conv2d(&crate::f32_copy(x)?, &crate::f32_copy(weight)?, bias.as_ref(), stride, padding)?.to_dtype(half);
    }
    if k == 1 && k2 == 1 && stride == 1 && padding == 0 {
        if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            return conv1x1_cpu(x, weight, bias);
        }
        // A 1×1 convolution is a matmul over pixels.
        let y = weight.reshape((o, c))?.broadcast_matmul(&x.reshape((b, c, h * w))?)?.reshape((b, o, h, w))?;
        return match bias {
            Some(bias) => crate::fused::bias_add(&y, bias, 1),
            None => Ok(y),
        };
    }
    if k == k2 {
        if let Some(cols) = crate::fused::im2col(x, k, stride, padding)? {
            // [o, c·k·k] × [b, c·k·k, oh·ow]: the output comes out in NCHW order.
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            let y = weight
                .reshape((o, c * k * k))?
                .broadcast_matmul(&cols)?
                .reshape((b, o, oh, ow))?;
            return match bias {
                Some(bias) => crate::fused::bias_add(&y, bias, 1),
                None => Ok(y),
            };
        }
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 && k == k2 {
        if k == 3 && stride == 1 && padding == 1 && b * o * c * 9 * h * w >= WINOGRAD_MIN_MACS && crate::fused::fused_kernels_enabled() {
            let bias: Vec<f32> = match bias {
                Some(bias) => bias.to_dtype(DType::F32)?.to_vec1()?,
                None => vec![0.0; o],
            };
            return crate::winograd::conv3x3(x, weight, &bias);
        }
        return conv2d_cpu(x, weight, bias, stride, padding);
    }
    let y = conv2d_reference(x, weight, None, stride, padding)?;
    match bias {
        Some(bias) => crate::fused::bias_add(&y, bias, 1),
        None => Ok(y),
    }
}

/// candle's own convolution: the reference.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn im2col_conv_equals_reference() -> Result<()> {
        let d = Device::Cpu;
        for (stride, padding, h, w) in [(1, 1, 9, 7), (2, 1, 9, 8), (2, 0, 8, 8), (1, 0, 6, 5)] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, w), &d)?;
            let wt = Tensor::randn(0f32, 0.3, (6, 5, 3, 3), &d)?;
            let b = Tensor::randn(0f32, 0.3, 6, &d)?;
            let a = conv2d(&x, &wt, Some(&b), stride, padding)?;
            let r = conv2d_reference(&x, &wt, Some(&b), stride, padding)?;
            assert_eq!(a.dims(), r.dims());
            let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "stride {stride} pad {padding}: {diff}");
        }
        let x = Tensor::randn(0f32, 1., (2, 5, 4, 3), &d)?;
        let wt = Tensor::randn(0f32, 0.3, (6, 5, 1, 1), &d)?;
        let diff = (conv2d(&x, &wt, None, 1, 0)? - conv2d_reference(&x, &wt, None, 1, 0)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "1x1: {diff}");
        Ok(())
    }

    #[test]
    fn blocked_conv_equals_reference_across_blocks() -> Result<()> {
        // Several row blocks per image (64 or 128 channels × 9 × width exceed one block's rows),
        // tasks in parallel, odd sizes so the last block is short; stride 1 and 2.
        let d = Device::Cpu;
        for (c, h, w, stride) in [(64, 61, 64, 1), (128, 64, 63, 2)] {
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &d)?;
            let wt = Tensor::randn(0f32, 0.05, (24, c, 3, 3), &d)?;
            let b = Tensor::randn(0f32, 0.3, 24, &d)?;
            let r = conv2d_reference(&x, &wt, Some(&b), stride, 1)?;
            // The dispatch (Winograd for the stride-1 case, big enough here) and im2col itself.
            for (path, a) in [("conv2d", conv2d(&x, &wt, Some(&b), stride, 1)?), ("im2col", conv2d_cpu(&x, &wt, Some(&b), stride, 1)?)] {
                assert_eq!(a.dims(), r.dims());
                let rel = ((&a - &r)?.sqr()?.sum_all()?.sqrt()? / r.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
                assert!(rel < 1e-5, "{path}: c {c} stride {stride}: relative L2 {rel}");
            }
        }
        Ok(())
    }

    #[test]
    fn pointwise_conv_equals_reference() -> Result<()> {
        let d = Device::Cpu;
        // A small product (calling thread) and large ones (pool) split by pixels and by output
        // channels, with and without bias.
        for (c, o, hw) in [(5, 6, 3), (96, 80, 40), (128, 520, 6)] {
            let x = Tensor::randn(0f32, 1., (2, c, hw, hw + 1), &d)?;
            let wt = Tensor::randn(0f32, 0.1, (o, c, 1, 1), &d)?;
            let b = Tensor::randn(0f32, 0.3, o, &d)?;
            for bias in [Some(&b), None] {
                let a = conv2d(&x, &wt, bias, 1, 0)?;
                let r = conv2d_reference(&x, &wt, bias, 1, 0)?;
                let rel = ((&a - &r)?.sqr()?.sum_all()?.sqrt()? / r.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
                assert!(rel < 1e-5, "c {c} o {o} bias {}: relative L2 {rel}", bias.is_some());
            }
        }
        Ok(())
    }
}
