//! 2-D convolution as an explicit im2col followed by one GEMM per batch element.
//!
//! candle's CPU conv2d spent more time building its column matrix than multiplying: at SDXL
//! sizes the whole convolution ran at about a third of torch's speed while the GEMM alone was on
//! par. The im2col here writes each column row with straight copies (zero padding at the edges)
//! in parallel over input channels; the GEMM is candle's. One batch element at a time bounds the
//! column buffer (≈190 MB for SDXL's first level at 1024²). On CUDA the columns come from our
//! kernel (`fused::im2col`, all batch elements at once) and the GEMM is one batched cuBLAS call.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn out_size(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    /// `[c, h, w]` → `[c·k·k, oh·ow]`.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c, h, w) = layout.shape().dims3()?;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("im2col: expected contiguous f32"),
        };
        let (k, s, p) = (self.kernel, self.stride, self.padding as isize);
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let row = oh * ow;
        let mut out = vec![0f32; c * k * k * row];
        out.par_chunks_mut(k * k * row).enumerate().for_each(|(ci, rows)| {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let dst = &mut rows[(ky * k + kx) * row..(ky * k + kx + 1) * row];
                    for oy in 0..oh {
                        let iy = (oy * s) as isize + ky as isize - p;
                        if iy < 0 || iy >= h as isize {
                            continue; // stays zero
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        let d = &mut dst[oy * ow..(oy + 1) * ow];
                        if s == 1 {
                            // ix = ox + kx - p: copy the in-range span.
                            let off = kx as isize - p;
                            let lo = (-off).max(0) as usize;
                            let hi = ((w as isize - off).min(ow as isize)).max(0) as usize;
                            if lo < hi {
                                d[lo..hi].copy_from_slice(&src[(lo as isize + off) as usize..(hi as isize + off) as usize]);
                            }
                        } else {
                            for (ox, v) in d.iter_mut().enumerate() {
                                let ix = (ox * s) as isize + kx as isize - p;
                                if ix >= 0 && ix < w as isize {
                                    *v = src[ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c * k * k, row))))
    }
}

/// `conv2d(x [b, c, h, w], weight [o, c, k, k], bias [o])`, square kernel, dilation 1, groups 1.
/// Falls back to candle's conv2d off the CPU or for non-f32 dtypes.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (o, c, k, k2) = weight.dims4()?;
    let (b, _, h, w) = x.dims4()?;
    if crate::fused::differentiable() {
        return conv2d_reference(x, weight, bias, stride, padding);
    }
    if k == 1 && k2 == 1 && stride == 1 && padding == 0 {
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
            let (oh, ow) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
            let y = weight.reshape((o, c * k * k))?.broadcast_matmul(&cols)?.reshape((b, o, oh, ow))?;
            return match bias {
                Some(bias) => crate::fused::bias_add(&y, bias, 1),
                None => Ok(y),
            };
        }
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && k == k2) {
        let y = conv2d_reference(x, weight, None, stride, padding)?;
        return match bias {
            Some(bias) => crate::fused::bias_add(&y, bias, 1),
            None => Ok(y),
        };
    }
    let op = Im2Col { kernel: k, stride, padding };
    let (oh, ow) = (op.out_size(h), op.out_size(w));
    let wm = weight.reshape((o, c * k * k))?;
    let x = x.contiguous()?;
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        let cols = x.get(i)?.apply_op1_no_bwd(&op)?;
        outs.push(wm.matmul(&cols)?);
    }
    let y = Tensor::stack(&outs, 0)?.reshape((b, o, oh, ow))?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

/// candle's own convolution: the reference.
pub fn conv2d_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
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
        let diff = (conv2d(&x, &wt, None, 1, 0)? - conv2d_reference(&x, &wt, None, 1, 0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "1x1: {diff}");
        Ok(())
    }
}
