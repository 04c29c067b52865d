//! Compute kernels shared by the model code.
//!
//! Each kernel has a plain implementation built from candle ops, which is the reference its
//! fused CPU version (and any CUDA / Metal version behind the features) is tested against.
//! Model code calls one function whatever the device and dtype.

pub mod activation;
pub mod attention;
mod blocks;
pub mod conv;
pub mod finite;
pub mod fused;
pub mod linear;
pub mod norm;
pub mod profile;
mod simd;
pub mod winograd;

pub use activation::geglu;
pub use attention::scaled_dot_product_attention;
pub use conv::conv2d;
pub use finite::{count_non_finite, RawDType};
pub use fused::{attention_hd64, differentiable, lora_branch, set_differentiable};
pub use linear::linear;
pub use norm::{group_norm, layer_norm, GroupNormParams};

/// Runs `f` on a thread of rayon's pool (directly when already on one), so that a model's forward
/// opens its kernels' parallel regions from inside the pool.
///
/// Why: a UNet step opens a parallel region per kernel call, about 700 in a mid-size step, with
/// serial candle ops in between. From a thread outside the pool, each region injects its job and
/// sleeps until the pool has run it, and the pool's threads have gone to sleep in the gap: on the
/// 2-vCPU VM a small region cost 55–100 µs after 0.1–1 ms of serial work, against 10–14 µs when
/// the caller is a pool thread, which starts on the work at once while the other thread wakes
/// (OpenMP's threads, torch's, spin between regions instead; rayon has no spin setting). The work
/// and its results are the same wherever it runs.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// The half-precision dtype of a CPU computation whose first tensor is f16 or bf16 (`None` otherwise,
/// and under autograd). Why: candle's CPU backend has no fast half-precision GEMM, convolution or
/// norm, and torch's CPU kernels compute f16 in f32 too. So the kernels keep half-precision
/// *storage* (an f16 SDXL holds half an f32 one's memory, the point of `--dtype f16` on a laptop)
/// and run their f32 code on upcast copies, rounding the output back: per op, what diffusers in
/// f16 on the CPU computes. A layer's f32 weight copy lives only for that call.
pub(crate) fn half_on_cpu(first: &candle_core::Tensor) -> Option<candle_core::DType> {
    use candle_core::DType;
    (first.device().is_cpu() && matches!(first.dtype(), DType::F16 | DType::BF16) && !fused::differentiable()).then_some(first.dtype())
}

/// f32 elements a row chunk of [`half_rows`] may hold (16 MB; tests use small chunks, so that
/// their tensors span several, with a partial last one).
#[cfg(not(test))]
const HALF_CHUNK_ELEMENTS: usize = 1 << 22;
#[cfg(test)]
const HALF_CHUNK_ELEMENTS: usize = 1 << 10;

/// Runs the f32 row kernel `f` (`[rows, k]` → `[rows, n]`) over a half-precision `x` (`[..., k]`)
/// in chunks of rows, writing the half-precision output directly. Why: upcasting a whole
/// activation, and the kernel's whole f32 output, held three copies of the largest tensors of an
/// SDXL step (the feed-forward's 10,240-wide projection: 0.5 GB at 1024²); chunks hold one.
pub(crate) fn half_rows(x: &candle_core::Tensor, n: usize, f: impl Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    use half::slice::HalfFloatSliceExt;
    let k = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?;
    let chunk = (HALF_CHUNK_ELEMENTS / k.max(n).max(1)).max(1);
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let run = |write: &mut dyn FnMut(usize, &[f32])| -> candle_core::Result<()> {
        for r in (0..rows).step_by(chunk) {
            let len = chunk.min(rows - r);
            let y = f(&x2.narrow(0, r, len)?.to_dtype(DType::F32)?)?.contiguous()?;
            let (storage, _) = y.storage_and_layout();
            write(r * n, host_f32(&storage, &y, "half_rows")?);
        }
        Ok(())
    };
    match x.dtype() {
        DType::BF16 => {
            let mut out = vec![half::bf16::ZERO; rows * n];
            run(&mut |at, v| out[at..at + v.len()].convert_from_f32_slice(v))?;
            Tensor::from_vec(out, out_shape, x.device())
        }
        _ => {
            let mut out = vec![half::f16::ZERO; rows * n];
            run(&mut |at, v| out[at..at + v.len()].convert_from_f32_slice(v))?;
            Tensor::from_vec(out, out_shape, x.device())
        }
    }
}

/// Upcasts to f32 (a no-op on f32 tensors).
pub(crate) fn f32_copy(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    t.to_dtype(candle_core::DType::F32)
}

/// An output buffer of `len` f32 whose contents are not yet written.
///
/// Why not `vec![0.0; len]`: glibc serves a large allocation from heap pages the process already
/// holds (its mmap threshold rises to the size of freed blocks, up to 32 MB), and then `calloc`
/// must clear them: a 2048×2560 linear output in a UNet step spent about 2 ms of its 15 zeroing
/// values the GEMM then overwrote. torch's outputs are not cleared either, and candle's CPU backend allocates its own
/// outputs this way (`alloc_uninit`).
///
/// # Safety
/// The caller writes every element before any is read (f32 has no invalid bit patterns, so no
/// value can be invalid, only stale).
#[allow(clippy::uninit_vec)] // deliberately: the contract above, as in candle's `alloc_uninit`
pub(crate) unsafe fn uninit_output(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the caller's contract covers the contents.
    unsafe { v.set_len(len) };
    v
}

/// The f32 values of a contiguous CPU tensor, borrowed from its storage guard (the CPU kernels read
/// their inputs in place). `what` names the kernel in the error.
pub(crate) fn host_f32<'a>(storage: &'a candle_core::Storage, t: &candle_core::Tensor, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => {
            let (a, z) = t.layout().contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: expected a contiguous tensor")))?;
            Ok(&data[a..z])
        }
        _ => candle_core::bail!("{what}: expected f32 on the CPU"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor};

    /// `on_pool` runs its closure on a pool thread from outside the pool, and in place (on the
    /// same thread, with no new job) from inside it; the closure's value comes back either way.
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none());
        assert!(super::on_pool(|| rayon::current_thread_index().is_some()));
        let (outer, inner) = super::on_pool(|| {
            let outer = (std::thread::current().id(), rayon::current_thread_index());
            (outer, super::on_pool(|| (std::thread::current().id(), rayon::current_thread_index())))
        });
        assert_eq!(outer, inner);
        assert_eq!(super::on_pool(|| 6 * 7), 42);
    }

    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>().map(|d| d / b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap())
    }

    /// Half precision on the CPU: every kernel returns f16 and agrees with its f32 reference on
    /// the same (f16-rounded) inputs to f16's own rounding (2⁻¹¹ ≈ 4.9e-4 relative per value).
    #[test]
    fn half_precision_kernels_round_only_their_outputs() -> Result<()> {
        let d = Device::Cpu;
        let half = |t: Tensor| t.to_dtype(DType::F16);
        let x = half(Tensor::randn(0f32, 1., (2, 32, 12, 12), &d)?)?;
        let w = half(Tensor::randn(0f32, 0.1, (16, 32, 3, 3), &d)?)?;
        let b = half(Tensor::randn(0f32, 0.1, 16, &d)?)?;
        let x32 = x.to_dtype(DType::F32)?;
        let bound = 1e-3;
        let check = |what: &str, got: Tensor, want: Tensor| -> Result<()> {
            assert_eq!(got.dtype(), DType::F16, "{what}");
            let r = rel(&got, &want)?;
            assert!(r < bound, "{what}: rel {r}");
            Ok(())
        };
        let conv_ref = crate::conv::conv2d_reference(&x32, &w.to_dtype(DType::F32)?, Some(&b.to_dtype(DType::F32)?), 1, 1)?;
        check("conv 3x3", crate::conv2d(&x, &w, Some(&b), 1, 1)?, conv_ref)?;
        let tokens = half(Tensor::randn(0f32, 1., (2, 50, 32), &d)?)?;
        let t32 = tokens.to_dtype(DType::F32)?;
        let lw = half(Tensor::randn(0f32, 0.2, (24, 32), &d)?)?;
        let lb = half(Tensor::randn(0f32, 0.1, 24, &d)?)?;
        let lin_ref = t32.broadcast_matmul(&lw.to_dtype(DType::F32)?.t()?)?.broadcast_add(&lb.to_dtype(DType::F32)?)?;
        check("linear", crate::linear(&tokens, &lw, Some(&lb))?, lin_ref)?;
        let gn = crate::GroupNormParams::new(8, 1e-5, Tensor::ones(32, DType::F16, &d)?, Tensor::zeros(32, DType::F16, &d)?)?;
        check("group norm", crate::group_norm(&x, &gn, true)?, crate::norm::group_norm_reference(&x32, &gn, true)?)?;
        let ln = candle_nn::LayerNorm::new(half(Tensor::randn(1f32, 0.1, 32, &d)?)?, half(Tensor::randn(0f32, 0.1, 32, &d)?)?, 1e-5);
        let ln32 = candle_nn::LayerNorm::new(ln.weight().to_dtype(DType::F32)?, ln.bias().unwrap().to_dtype(DType::F32)?, 1e-5);
        check("layer norm", crate::layer_norm(&tokens, &ln)?, candle_core::Module::forward(&ln32, &t32)?)?;
        check("GEGLU", crate::geglu(&tokens)?, crate::activation::geglu_reference(&t32)?)?;
        let q = half(Tensor::randn(0f32, 1., (2, 2, 50, 16), &d)?)?;
        let q32 = q.to_dtype(DType::F32)?;
        check("attention", crate::scaled_dot_product_attention(&q, &q, &q, 0.25)?, crate::attention::sliced(&q32, &q32, &q32, 0.25)?)?;
        Ok(())
    }
}
