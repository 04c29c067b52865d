//! Our own fused GPU kernels (`kernels/cuda/*.cu`), each beside the composed candle reference it
//! must equal. On devices without the kernel, the public functions run the reference, so model
//! code calls one function whatever the device.
//!
//! - `attention_hd64`: softmax(q kᵀ · scale) v for head dim 64 without materialising the score
//!   matrix (candle's path upcasts half precision to f32 and writes [q, k] scores to memory).
//! - `lora_branch`: the low-rank branch of every active LoRA of a layer, `base + ((x aᵀ) ⊙ s) bᵀ`,
//!   in one launch that keeps the [rows, r_total] intermediate on chip.

use candle_core::{DType, Result, Tensor, D};

/// Head dimension the fused attention kernel is specialised for (SDXL's and most LLMs').
pub const FUSED_HEAD_DIM: usize = 64;

/// Whether our kernels are in use: `LORAMIX_FUSED_KERNELS=0` runs the composed references instead,
/// so that a benchmark can time both in one build (tools/bench/gpu.sh) and a suspected kernel bug
/// can be ruled out without rebuilding.
pub fn fused_kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LORAMIX_FUSED_KERNELS").map(|v| v.trim() != "0").unwrap_or(true))
}

/// Whether `attention_hd64` runs our kernel (rather than the reference) for these inputs.
pub fn attention_is_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && q.device().is_cuda()
        && fused_kernels_enabled()
        && q.rank() == 4
        && [q, k, v].iter().all(|t| t.dim(D::Minus1).ok() == Some(FUSED_HEAD_DIM) && t.dtype() == q.dtype())
        && matches!(q.dtype(), DType::F16 | DType::BF16 | DType::F32)
}

/// `softmax(q kᵀ · scale) v` for `q: [b, h, lq, 64]`, `k, v: [b, h, lk, 64]`.
pub fn attention_hd64(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if attention_is_fused(q, k, v) {
        return cuda::attention(q, k, v, scale);
    }
    attention_reference(q, k, v, scale)
}

/// The composed reference: the sliced path of `attention.rs` (scores and softmax in f32, result in
/// q's dtype), which other devices and dtypes already use.
pub use crate::attention::sliced as attention_reference;

/// `base + ((x aᵀ) ⊙ scales) bᵀ` for `x: [m, k]`, `a: [r, k]` (the LoRAs' down matrices stacked),
/// `b: [n, r]` (their up matrices side by side), `scales: [r]` (each row's LoRA weight) and
/// `base: [m, n]`.
pub fn lora_branch(base: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scales: &[f32]) -> Result<Tensor> {
    let (m, kd) = x.dims2()?;
    let (r, ka) = a.dims2()?;
    let (n, rb) = b.dims2()?;
    if ka != kd || rb != r || scales.len() != r || base.dims2()? != (m, n) {
        candle_core::bail!(
            "lora_branch: x [{m}, {kd}], a [{r}, {ka}], b [{n}, {rb}], {} scales, base {:?} do not fit together",
            scales.len(),
            base.dims()
        );
    }
    // The kernel keeps 16 rows × r floats in shared memory: 48 KiB without an opt-in, r ≤ 768.
    #[cfg(feature = "cuda")]
    if base.device().is_cuda() && matches!(base.dtype(), DType::F16 | DType::BF16 | DType::F32) && r <= 768 && fused_kernels_enabled() {
        return cuda::lora_branch(base, x, a, b, scales);
    }
    lora_branch_reference(base, x, a, b, scales)
}

/// The composed reference, accumulated in f32.
pub fn lora_branch_reference(base: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scales: &[f32]) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let s = Tensor::from_slice(scales, (1, scales.len()), x.device())?;
    let low = f(x)?.matmul(&f(a)?.t()?)?.broadcast_mul(&s)?;
    (f(base)? + low.matmul(&f(b)?.t()?)?)?.to_dtype(base.dtype())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Storage, Tensor};
    use half::{bf16, f16};

    const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
    /// Must match ROWS and TC_ROWS (query rows per block; 128 threads each) in attention.cu and
    /// ROWS / THREADS in lora.cu.
    const ATTENTION_ROWS_F32: u32 = 128;
    const ATTENTION_ROWS_TC: u32 = 64;
    const LORA_ROWS: u32 = 16;
    const LORA_THREADS: u32 = 256;

    fn contiguous_slice<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((o1, o2)) => Ok(s.as_cuda_slice::<T>()?.slice(o1..o2)),
            None => bail!("{what} must be contiguous"),
        }
    }

    fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("no fused kernel for {other:?}"),
        })
    }

    struct Attention {
        scale: f32,
    }

    impl CustomOp3 for Attention {
        fn name(&self) -> &'static str {
            "loramix-attention-hd64"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the fused attention kernel is CUDA-only; the CPU uses attention_reference")
        }

        fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout, k: &CudaStorage, kl: &Layout, v: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (b, h, lq, d) = ql.shape().dims4()?;
            let (kb, kh, lk, kd) = kl.shape().dims4()?;
            if (kb, kh, kd) != (b, h, d) || vl.shape() != kl.shape() || d != super::FUSED_HEAD_DIM {
                bail!("fused attention: q {:?}, k {:?}, v {:?} (head dim must be 64)", ql.shape(), kl.shape(), vl.shape());
            }
            let dev = q.device().clone();
            // Half precision goes through the tensor cores; f32 through the CUDA cores.
            let (name, rows) = match q.dtype() {
                DType::F32 => ("attention_hd64_f32".to_string(), ATTENTION_ROWS_F32),
                dt => (format!("attention_hd64_tc_{}", suffix(dt)?), ATTENTION_ROWS_TC),
            };
            let func = dev.get_or_load_custom_func(&name, "loramix_attention", ATTENTION_PTX)?;
            let cfg = LaunchConfig { grid_dim: ((lq as u32).div_ceil(rows), (b * h) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let (lq_i, lk_i) = (lq as i32, lk as i32);
            macro_rules! launch {
                ($t:ty) => {{
                    let qs = contiguous_slice::<$t>(q, ql, "q")?;
                    let ks = contiguous_slice::<$t>(k, kl, "k")?;
                    let vs = contiguous_slice::<$t>(v, vl, "v")?;
                    // SAFETY: every element is written by the kernel.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(b * h * lq * d)? };
                    let mut bld = func.builder();
                    bld.arg(&qs).arg(&ks).arg(&vs).arg(&out).arg(&lq_i).arg(&lk_i).arg(&self.scale);
                    // SAFETY: argument list matches the kernel's signature.
                    unsafe { bld.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = match q.dtype() {
                DType::F32 => launch!(f32),
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                other => bail!("no fused attention for {other:?}"),
            };
            Ok((st, ql.shape().clone()))
        }
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        q.apply_op3_no_bwd(&k, &v, &Attention { scale: scale as f32 })
    }

    /// In place on `out` (a fresh copy of the base output), with `x` and `a` as the op's sources
    /// and `b` and the scales held by the op.
    struct LoraBranch {
        b: Tensor,
        scales: Tensor,
    }

    impl InplaceOp3 for LoraBranch {
        fn name(&self) -> &'static str {
            "loramix-lora-branch"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
            bail!("the fused LoRA branch is CUDA-only; the CPU uses lora_branch_reference")
        }

        fn cuda_fwd(&self, out: &mut CudaStorage, ol: &Layout, x: &CudaStorage, xl: &Layout, a: &CudaStorage, al: &Layout) -> Result<()> {
            let (m, kd) = xl.shape().dims2()?;
            let (r, _) = al.shape().dims2()?;
            let (_, n) = ol.shape().dims2()?;
            let dev = x.device().clone();
            let name = format!("lora_branch_{}", suffix(x.dtype())?);
            let func = dev.get_or_load_custom_func(&name, "loramix_lora", LORA_PTX)?;
            let (bst, bl) = self.b.storage_and_layout();
            let (sst, sl) = self.scales.storage_and_layout();
            let (Storage::Cuda(bs), Storage::Cuda(ss)) = (&*bst, &*sst) else { bail!("lora_branch: b and scales must be on the CUDA device") };
            let scales = contiguous_slice::<f32>(ss, sl, "scales")?;
            let cfg = LaunchConfig {
                grid_dim: ((m as u32).div_ceil(LORA_ROWS), 1, 1),
                block_dim: (LORA_THREADS, 1, 1),
                shared_mem_bytes: LORA_ROWS * r as u32 * 4,
            };
            let (m_i, k_i, n_i, r_i) = (m as i32, kd as i32, n as i32, r as i32);
            macro_rules! launch {
                ($t:ty) => {{
                    let xs = contiguous_slice::<$t>(x, xl, "x")?;
                    let as_ = contiguous_slice::<$t>(a, al, "a")?;
                    let b_ = contiguous_slice::<$t>(bs, bl, "b")?;
                    let Some((o1, o2)) = ol.contiguous_offsets() else { bail!("out must be contiguous") };
                    let mut os = out.as_cuda_slice_mut::<$t>()?.slice_mut(o1..o2);
                    let mut bld = func.builder();
                    bld.arg(&xs).arg(&as_).arg(&b_).arg(&scales).arg(&mut os).arg(&m_i).arg(&k_i).arg(&n_i).arg(&r_i);
                    // SAFETY: argument list matches the kernel's signature; shared memory sized for r.
                    unsafe { bld.launch(cfg) }.w()?;
                }};
            }
            match x.dtype() {
                DType::F32 => launch!(f32),
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                other => bail!("no fused LoRA branch for {other:?}"),
            }
            Ok(())
        }
    }

    pub fn lora_branch(base: &Tensor, x: &Tensor, a: &Tensor, b: &Tensor, scales: &[f32]) -> Result<Tensor> {
        let dt = base.dtype();
        let out = base.to_dtype(dt)?.contiguous()?.copy()?;
        let (x, a, b) = (x.to_dtype(dt)?.contiguous()?, a.to_dtype(dt)?.contiguous()?, b.to_dtype(dt)?.contiguous()?);
        let scales = Tensor::from_slice(scales, scales.len(), base.device())?;
        out.inplace_op3(&x, &a, &LoraBranch { b, scales })?;
        Ok(out)
    }
}
