//! `y = x Wᵀ + b` on the CPU, the bias inside the GEMM.
//!
//! candle's matmul always hands gemm a rayon pool, and waking it costs ~25 µs per call: on the
//! small UNets (the parity fixtures) linear layers took 36 µs a call against torch's 7, and were
//! most of a step. Here small products run on the calling thread, large ones on the pool, and the
//! bias is written into the output before the GEMM accumulates onto it (no second pass).
//! Other devices, dtypes and autograd use candle's `Linear` and `bias_add`, the reference.

use candle_core::{DType, Module, Result, Tensor, D};

/// Multiply-adds below which a GEMM runs on the calling thread: waking the pool costs ~25 µs,
/// what one core spends on about 2²¹ multiply-adds, so below that a second thread cannot win.
pub const SERIAL_MACS: usize = 1 << 21;

/// Elements below which our elementwise kernels (GEGLU, group norm) run on the calling thread.
pub const SERIAL_ELEMENTS: usize = 1 << 16;

/// Rows up to which a product runs as dot products of the input rows with the weight's rows.
/// gemm is slow on so few rows with a transposed right-hand side: 2×640 → 640 (the UNet's time
/// embedding) took 0.16 ms on one thread, 5 GFLOP/s, where reading the weight once takes 0.05.
const DOT_ROWS: usize = 4;

crate::simd::multiversion! {
    /// `y[j] += x · w[j]` for the rows of `w` (`[y.len(), x.len()]` row-major), 16 lanes.
    fn dot_rows(y: &mut [f32], x: &[f32], w: &[f32]) {
        let k = x.len();
        for (yj, wj) in y.iter_mut().zip(w.chunks_exact(k.max(1))) {
            let mut acc = [0f32; 16];
            let (xc, wc) = (x.chunks_exact(16), wj.chunks_exact(16));
            let tail: f32 = xc.remainder().iter().zip(wc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in xc.zip(wc) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            *yj += acc.iter().sum::<f32>() + tail;
        }
    }
}

/// `x [..., in] · weight [out, in]ᵀ + bias [out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if crate::half_on_cpu(x).is_some() && weight.rank() == 2 {
        let bias = bias.map(crate::f32_copy).transpose()?;
        let weight = crate::f32_copy(weight)?;
        return crate::half_rows(x, weight.dim(0)?, |rows| linear(rows, &weight, bias.as_ref()));
    }
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 && bias.is_none_or(|b| b.dtype() == DType::F32);
    if !cpu_f32 || crate::fused::differentiable() || weight.rank() != 2 {
        let y = candle_nn::Linear::new(weight.clone(), None).forward(x)?;
        return match bias {
            Some(b) => crate::fused::bias_add(&y, b, y.rank() - 1),
            None => Ok(y),
        };
    }
    let (out_f, in_f) = weight.dims2()?;
    if x.dim(D::Minus1)? != in_f {
        candle_core::bail!("linear: input has {} features, the weight expects {in_f}", x.dim(D::Minus1)?);
    }
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = out_f;
    let m = x.elem_count() / in_f.max(1);
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let bias: Option<Vec<f32>> = bias.map(|b| b.to_vec1()).transpose()?;
    // SAFETY: the product writes every element (bias first, when there is one).
    let mut y = unsafe { crate::uninit_output(m * out_f) };
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    let (xd, wd) = (crate::host_f32(&xs, &x, "linear")?, crate::host_f32(&ws, &weight, "linear")?);
    if m <= DOT_ROWS {
        let y = dot_product_rows(xd, wd, bias.as_deref(), m, in_f, out_f);
        drop((xs, ws));
        return Tensor::from_vec(y, out_shape, x.device());
    }
    let product = crate::blocks::Product {
        m, n: out_f, k: in_f,
        dst: y.as_mut_ptr(), dst_cs: 1, dst_rs: out_f as isize,
        bias: bias.as_ref().map_or(crate::blocks::Bias::None, |b| crate::blocks::Bias::PerColumn(b.as_ptr())),
        lhs: xd.as_ptr(), lhs_cs: 1, lhs_rs: in_f as isize,
        // Wᵀ [in, out] read from the [out, in] row-major weight.
        rhs: wd.as_ptr(), rhs_cs: in_f as isize, rhs_rs: 1,
    };
    // SAFETY: y is [m, out] row-major, x [m, in] row-major, W [out, in] row-major and the bias
    // [out], all in bounds and alive for the call; nothing else touches y.
    unsafe { product.run_split() };
    drop((xs, ws));
    Tensor::from_vec(y, out_shape, x.device())
}

/// `x [m, in] · W [out, in]ᵀ + bias` as dot products, in parallel over blocks of output features
/// when the product is large enough to repay waking the pool.
fn dot_product_rows(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    let mut y = match bias {
        Some(b) => b.repeat(m),
        None => vec![0f32; m * out_f],
    };
    let threads = rayon::current_num_threads();
    let chunk = if m * in_f * out_f < SERIAL_MACS || threads < 2 { out_f.max(1) } else { out_f.div_ceil(threads).max(1) };
    for (i, row) in y.chunks_mut(out_f.max(1)).enumerate() {
        let xi = &x[i * in_f..(i + 1) * in_f];
        if chunk >= out_f {
            dot_rows(row, xi, w);
        } else {
            use rayon::prelude::*;
            row.par_chunks_mut(chunk).zip(w.par_chunks(chunk * in_f)).for_each(|(yc, wc)| dot_rows(yc, xi, wc));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_linear() -> Result<()> {
        let d = Device::Cpu;
        // Dot products (few rows; serial and pooled); a small (serial) product; pooled ones split by output features (evenly and not) and by
        // rows (evenly and not); with and without bias, 2-D and 3-D inputs.
        for (dims, in_f, out_f) in [(vec![3usize, 5], 5usize, 7usize), (vec![2, 1, 37], 37, 19), (vec![2, 2816], 2816, 1280), (vec![6, 70], 70, 9), (vec![2, 300, 320], 320, 640), (vec![150, 320], 320, 1000), (vec![2, 304, 96], 96, 100), (vec![4, 301, 64], 64, 96)] {
            let x = Tensor::randn(0f32, 1., dims.as_slice(), &d)?;
            let w = Tensor::randn(0f32, 0.1, (out_f, in_f), &d)?;
            let b = Tensor::randn(0f32, 0.1, out_f, &d)?;
            for bias in [None, Some(&b)] {
                let a = linear(&x, &w, bias)?;
                let r = candle_nn::Linear::new(w.clone(), bias.cloned()).forward(&x)?;
                assert_eq!(a.dims(), r.dims());
                let rel = ((&a - &r)?.sqr()?.sum_all()?.sqrt()? / r.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
                assert!(rel < 1e-6, "{dims:?} bias {}: relative L2 {rel}", bias.is_some());
            }
        }
        Ok(())
    }
}
