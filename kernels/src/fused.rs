//! Our own fused GPU kernels (`kernels/cuda/*.cu`), each beside the composed candle reference it
//! must equal. On devices without the kernel, the public functions run the reference, so model
//! code calls one function whatever the device.
//!
//! - `attention_hd64`: softmax(q kᵀ · scale) v for head dim 64 without materialising the score
//!   matrix (candle's path upcasts half precision to f32 and writes [q, k] scores to memory).
//! - `lora_branch`: the low-rank branch of every active LoRA of a layer, `base + ((x aᵀ) ⊙ s) bᵀ`,
//!   in one launch that keeps the [rows, r_total] intermediate on chip. It does its arithmetic on
//!   CUDA cores and measured slower than two cuBLAS GEMMs over the stacked factors at every size
//!   tried on an H100 (BENCHMARKS.md), so the models use the GEMMs; it stays, tested and timed,
//!   as the baseline a tensor-core version has to beat.
//! - `group_norm`, `bias_add`, `geglu`: memory-bound steps that candle runs as chains of generic
//!   broadcasting kernels (GroupNorm alone is ten passes in f32); profiling SDXL at 1024² on an
//!   H100 put them at the top of the UNet's and the VAE's time (BENCHMARKS.md).

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

static DIFFERENTIABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Training switch: while on, every kernel runs its composed candle reference, so that autograd
/// reaches through the whole model (our fused kernels have forward passes only). Process-wide:
/// a trainer turns it on for its run.
pub fn set_differentiable(on: bool) {
    DIFFERENTIABLE.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn differentiable() -> bool {
    DIFFERENTIABLE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `attention_hd64` runs our kernel (rather than the reference) for these inputs.
pub fn attention_is_fused(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && q.device().is_cuda()
        && fused_kernels_enabled()
        && !differentiable()
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
    // The kernel keeps 16 rows × r floats in shared memory beside its 24 KiB of staging tiles:
    // under the 48 KiB a kernel gets without an opt-in for r ≤ 256 (e.g. four rank-64 LoRAs).
    #[cfg(feature = "cuda")]
    if base.device().is_cuda() && matches!(base.dtype(), DType::F16 | DType::BF16 | DType::F32) && r <= 256 && fused_kernels_enabled() {
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

/// GroupNorm (+ SiLU) over `[n, c, ...]` through our kernel where it applies (CUDA, kernels on);
/// `None` elsewhere, and the caller runs its own path (`norm::group_norm`).
pub fn group_norm(x: &Tensor, p: &crate::GroupNormParams, silu: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && fused_kernels_enabled() && x.rank() >= 3 && matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32) {
        return cuda::group_norm(x, p, silu).map(Some);
    }
    let _ = (x, p, silu);
    Ok(None)
}

/// `y + bias` with `bias` along dimension `channel_dim` of `y` (a Linear's last dimension, a
/// convolution's dimension 1). On CUDA our kernel, one pass; candle's broadcasting add recomputes
/// a strided index per element and ran at a tenth of the memory bandwidth there.
pub fn bias_add(y: &Tensor, bias: &Tensor, channel_dim: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && fused_kernels_enabled() && !differentiable() && bias.dtype() == y.dtype() && matches!(y.dtype(), DType::F16 | DType::BF16 | DType::F32) {
        return cuda::bias_add(y, bias, channel_dim);
    }
    let mut shape = vec![1usize; y.rank()];
    shape[channel_dim] = bias.elem_count();
    y.broadcast_add(&bias.reshape(shape)?)
}

/// `h[..., :n] * gelu_erf(h[..., n:])` in one pass through our kernel where it applies (CUDA,
/// kernels on); `None` elsewhere.
pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda() && fused_kernels_enabled() && matches!(h.dtype(), DType::F16 | DType::BF16 | DType::F32) && h.dim(D::Minus1)? % 2 == 0 {
        return cuda::geglu(h).map(Some);
    }
    let _ = h;
    Ok(None)
}

/// `x [b, c, h, w]` → `[b, c·k·k, oh·ow]` columns (zero padding) through our kernel where it
/// applies (CUDA, kernels on, b·c·k·k within a grid's height); `None` elsewhere. candle's own
/// im2col for CUDA produced the transposed layout at a tenth of the memory bandwidth, and its GEMM
/// result then needed a transposing copy back to NCHW.
pub fn im2col(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && fused_kernels_enabled() && !differentiable() && x.rank() == 4 && matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32) {
        let (b, c, h, w) = x.dims4()?;
        if b * c * k * k <= 65535 && h + 2 * padding >= k && w + 2 * padding >= k && stride > 0 {
            return cuda::im2col(x, k, stride, padding).map(Some);
        }
    }
    let _ = (x, k, stride, padding);
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Storage, Tensor};
    use half::{bf16, f16};

    const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
    const ELEMENTWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
    /// Must match GN_CHUNK and GN_THREADS in elementwise.cu.
    const GN_CHUNK: usize = 16384;
    const GN_THREADS: u32 = 256;
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

    /// Runs the site's own `launch!` macro with the Rust type of a float dtype.
    macro_rules! by_float_dtype {
        ($dt:expr, $what:literal, $launch:ident) => {
            match $dt {
                DType::F32 => $launch!(f32),
                DType::F16 => $launch!(f16),
                DType::BF16 => $launch!(bf16),
                other => bail!("no {} kernel for {other:?}", $what),
            }
        };
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
            if q.dtype() == DType::F32 {
                // CUDA cores, contiguous [b·h, l, 64] operands.
                let func = dev.get_or_load_custom_func("attention_hd64_f32", "loramix_attention", ATTENTION_PTX)?;
                let cfg = LaunchConfig { grid_dim: ((lq as u32).div_ceil(ATTENTION_ROWS_F32), (b * h) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                let (lq_i, lk_i) = (lq as i32, lk as i32);
                let qs = contiguous_slice::<f32>(q, ql, "q")?;
                let ks = contiguous_slice::<f32>(k, kl, "k")?;
                let vs = contiguous_slice::<f32>(v, vl, "v")?;
                // SAFETY: every element is written by the kernel.
                let out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(b * h * lq * d)? };
                let mut bld = func.builder();
                bld.arg(&qs).arg(&ks).arg(&vs).arg(&out).arg(&lq_i).arg(&lk_i).arg(&self.scale);
                // SAFETY: argument list matches the kernel's signature.
                unsafe { bld.launch(cfg) }.w()?;
                return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), ql.shape().clone()));
            }
            // Tensor cores. Operands are read through their strides; the output is written as
            // [b, lq, h, 64] (the order the models' output projection wants), shape returned so.
            let func = dev.get_or_load_custom_func(&format!("attention_hd64_tc_{}", suffix(q.dtype())?), "loramix_attention", ATTENTION_PTX)?;
            let cfg = LaunchConfig { grid_dim: ((lq as u32).div_ceil(ATTENTION_ROWS_TC), (b * h) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let (lq_i, lk_i, h_i) = (lq as i32, lk as i32, h as i32);
            let strides = |l: &Layout| -> Result<[i64; 3]> {
                let st = l.stride();
                if !rows_aligned(l) {
                    bail!("fused attention: rows must be 16-byte aligned with a unit stride along the head dim (strides {st:?}, offset {})", l.start_offset());
                }
                Ok([st[0] as i64, st[1] as i64, st[2] as i64])
            };
            let (qst, kst, vst) = (strides(ql)?, strides(kl)?, strides(vl)?);
            let ost = [(lq * h * d) as i64, d as i64, (h * d) as i64];
            macro_rules! launch {
                ($t:ty) => {{
                    let qs = q.as_cuda_slice::<$t>()?.slice(ql.start_offset()..);
                    let ks = k.as_cuda_slice::<$t>()?.slice(kl.start_offset()..);
                    let vs = v.as_cuda_slice::<$t>()?.slice(vl.start_offset()..);
                    // SAFETY: every element is written by the kernel.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(b * h * lq * d)? };
                    let mut bld = func.builder();
                    bld.arg(&qs).arg(&ks).arg(&vs).arg(&out).arg(&lq_i).arg(&lk_i).arg(&h_i);
                    for s in qst.iter().chain(&kst).chain(&vst).chain(&ost) {
                        bld.arg(s);
                    }
                    bld.arg(&self.scale);
                    // SAFETY: argument list matches the kernel's signature.
                    unsafe { bld.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = match q.dtype() {
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                other => bail!("no fused attention for {other:?}"),
            };
            Ok((st, Shape::from((b, lq, h, d))))
        }
    }

    /// Contiguous and starting on a 16-byte boundary (the kernels read 4- and 16-byte vectors).
    fn aligned(t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        if (t.layout().start_offset() * t.dtype().size_in_bytes()) % 16 == 0 {
            Ok(t)
        } else {
            t.force_contiguous() // a fresh buffer: offset 0
        }
    }

    /// Rows the tensor-core kernel can read in place: unit stride along the head dim, strides and
    /// offset in multiples of 8 elements (16 bytes).
    fn rows_aligned(l: &Layout) -> bool {
        let st = l.stride();
        st.len() == 4 && st[3] == 1 && st[..3].iter().chain([&l.start_offset()]).all(|s| s % 8 == 0)
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let op = Attention { scale: scale as f32 };
        if q.dtype() == DType::F32 {
            let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
            return q.apply_op3_no_bwd(&k, &v, &op);
        }
        let prep = |t: &Tensor| if rows_aligned(t.layout()) { Ok(t.clone()) } else { aligned(t) };
        let (q, k, v) = (prep(q)?, prep(k)?, prep(v)?);
        // [b, lq, h, 64] in memory, [b, h, lq, 64] as the caller sees it.
        q.apply_op3_no_bwd(&k, &v, &op)?.transpose(1, 2)
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
            by_float_dtype!(x.dtype(), "fused LoRA branch", launch);
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

    struct GroupNorm {
        groups: usize,
        eps: f32,
        silu: bool,
        weight: Tensor,
        bias: Tensor,
    }

    impl CustomOp1 for GroupNorm {
        fn name(&self) -> &'static str {
            "loramix-group-norm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the CUDA GroupNorm kernel is CUDA-only; the CPU has its own (norm.rs)")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dims = xl.dims();
            let (n, c) = (dims[0], dims[1]);
            let hw: usize = dims[2..].iter().product();
            if self.groups == 0 || c % self.groups != 0 || self.weight.elem_count() != c || self.bias.elem_count() != c {
                bail!("group norm: {c} channels, {} groups, {} weights, {} biases", self.groups, self.weight.elem_count(), self.bias.elem_count());
            }
            let cg = c / self.groups;
            let len = cg * hw;
            let rows = n * self.groups;
            let chunks = len.div_ceil(GN_CHUNK).max(1);
            let dev = x.device().clone();
            let sfx = suffix(x.dtype())?;
            let reduce = dev.get_or_load_custom_func(&format!("group_norm_reduce_{sfx}"), "loramix_elementwise", ELEMENTWISE_PTX)?;
            let apply = dev.get_or_load_custom_func(&format!("group_norm_apply_{sfx}"), "loramix_elementwise", ELEMENTWISE_PTX)?;
            let sums: CudaSlice<f32> = dev.alloc_zeros(rows * chunks)?;
            let sqsums: CudaSlice<f32> = dev.alloc_zeros(rows * chunks)?;
            let (wst, wl) = self.weight.storage_and_layout();
            let (bst, bl) = self.bias.storage_and_layout();
            let (Storage::Cuda(ws), Storage::Cuda(bs)) = (&*wst, &*bst) else { bail!("group norm: weight and bias must be on the CUDA device") };
            let w = contiguous_slice::<f32>(ws, wl, "weight")?;
            let b = contiguous_slice::<f32>(bs, bl, "bias")?;
            let cfg = LaunchConfig { grid_dim: (chunks as u32, rows as u32, 1), block_dim: (GN_THREADS, 1, 1), shared_mem_bytes: 0 };
            let (pass0, pass1, silu) = (0i32, 1i32, self.silu as i32);
            let (hw_i, cg_i, g_i) = (hw as i32, cg as i32, self.groups as i32);
            macro_rules! launch {
                ($t:ty) => {{
                    let xs = contiguous_slice::<$t>(x, xl, "x")?;
                    // SAFETY: the apply kernel writes every element.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n * c * hw)? };
                    // SAFETY (all three): argument lists match the kernels' signatures.
                    let mut l0 = reduce.builder();
                    l0.arg(&xs).arg(&sqsums).arg(&sums).arg(&len).arg(&pass0);
                    unsafe { l0.launch(cfg) }.w()?;
                    let mut l1 = reduce.builder();
                    l1.arg(&xs).arg(&sums).arg(&sqsums).arg(&len).arg(&pass1);
                    unsafe { l1.launch(cfg) }.w()?;
                    let mut l2 = apply.builder();
                    l2.arg(&xs).arg(&w).arg(&b).arg(&out).arg(&sums).arg(&sqsums).arg(&len).arg(&hw_i).arg(&cg_i).arg(&g_i).arg(&self.eps).arg(&silu);
                    unsafe { l2.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = by_float_dtype!(x.dtype(), "GroupNorm", launch);
            Ok((st, xl.shape().clone()))
        }
    }

    pub fn group_norm(x: &Tensor, p: &crate::GroupNormParams, silu: bool) -> Result<Tensor> {
        let (weight, bias) = p.device_f32()?;
        let op = GroupNorm { groups: p.groups, eps: p.eps as f32, silu, weight, bias };
        aligned(x)?.apply_op1_no_bwd(&op)
    }

    struct BiasAdd {
        channel_dim: usize,
    }

    impl CustomOp2 for BiasAdd {
        fn name(&self) -> &'static str {
            "loramix-bias-add"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the bias kernel is CUDA-only")
        }

        fn cuda_fwd(&self, y: &CudaStorage, yl: &Layout, bias: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dims = yl.dims();
            let c = dims[self.channel_dim];
            if bl.shape().elem_count() != c {
                bail!("bias add: {} biases for {c} channels (dimension {} of {:?})", bl.shape().elem_count(), self.channel_dim, dims);
            }
            let inner: usize = dims[self.channel_dim + 1..].iter().product();
            let total = yl.shape().elem_count();
            let dev = y.device().clone();
            let func = dev.get_or_load_custom_func(&format!("bias_add_{}", suffix(y.dtype())?), "loramix_elementwise", ELEMENTWISE_PTX)?;
            let cfg = LaunchConfig { grid_dim: (total.div_ceil(256).clamp(1, 65535 * 8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (inner_i, c_i) = (inner as i32, c as i32);
            macro_rules! launch {
                ($t:ty) => {{
                    let ys = contiguous_slice::<$t>(y, yl, "y")?;
                    let bs = contiguous_slice::<$t>(bias, bl, "bias")?;
                    // SAFETY: every element is written by the kernel.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(total.max(1))? };
                    let mut bld = func.builder();
                    bld.arg(&ys).arg(&bs).arg(&out).arg(&total).arg(&inner_i).arg(&c_i);
                    // SAFETY: argument list matches the kernel's signature.
                    unsafe { bld.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = by_float_dtype!(y.dtype(), "bias", launch);
            Ok((st, yl.shape().clone()))
        }
    }

    pub fn bias_add(y: &Tensor, bias: &Tensor, channel_dim: usize) -> Result<Tensor> {
        y.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &BiasAdd { channel_dim })
    }

    struct Geglu;

    impl CustomOp1 for Geglu {
        fn name(&self) -> &'static str {
            "loramix-geglu"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the CUDA GEGLU kernel is CUDA-only; the CPU has its own (activation.rs)")
        }

        fn cuda_fwd(&self, h: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
            let mut dims = hl.dims().to_vec();
            let two_n = *dims.last().unwrap_or(&0);
            let n = two_n / 2;
            let rows = hl.shape().elem_count().checked_div(two_n).unwrap_or(0);
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            let total = rows * n;
            let dev = h.device().clone();
            let func = dev.get_or_load_custom_func(&format!("geglu_{}", suffix(h.dtype())?), "loramix_elementwise", ELEMENTWISE_PTX)?;
            let cfg = LaunchConfig { grid_dim: ((total as u32).div_ceil(256).clamp(1, 65535 * 8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let n_i = n as i32;
            macro_rules! launch {
                ($t:ty) => {{
                    let hs = contiguous_slice::<$t>(h, hl, "h")?;
                    // SAFETY: every element is written by the kernel.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>(total.max(1))? };
                    let mut bld = func.builder();
                    bld.arg(&hs).arg(&out).arg(&rows).arg(&n_i);
                    // SAFETY: argument list matches the kernel's signature.
                    unsafe { bld.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = by_float_dtype!(h.dtype(), "GEGLU", launch);
            Ok((st, Shape::from(dims)))
        }
    }

    pub fn geglu(h: &Tensor) -> Result<Tensor> {
        h.contiguous()?.apply_op1_no_bwd(&Geglu)
    }

    struct Im2Col {
        k: usize,
        stride: usize,
        padding: usize,
    }

    impl CustomOp1 for Im2Col {
        fn name(&self) -> &'static str {
            "loramix-im2col"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the CUDA im2col kernel is CUDA-only; the CPU has its own (conv.rs)")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (b, c, h, w) = xl.shape().dims4()?;
            let (k, s, p) = (self.k, self.stride, self.padding);
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let rows = b * c * k * k;
            let dev = x.device().clone();
            let func = dev.get_or_load_custom_func(&format!("im2col_{}", suffix(x.dtype())?), "loramix_elementwise", ELEMENTWISE_PTX)?;
            let cfg = LaunchConfig { grid_dim: ((oh * ow).div_ceil(256).clamp(1, 1024) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let args = [c, h, w, k, s, p, oh, ow].map(|v| v as i32);
            macro_rules! launch {
                ($t:ty) => {{
                    let xs = contiguous_slice::<$t>(x, xl, "x")?;
                    // SAFETY: every element is written by the kernel.
                    let out: CudaSlice<$t> = unsafe { dev.alloc::<$t>((rows * oh * ow).max(1))? };
                    let mut bld = func.builder();
                    bld.arg(&xs).arg(&out);
                    for a in &args {
                        bld.arg(a);
                    }
                    // SAFETY: argument list matches the kernel's signature.
                    unsafe { bld.launch(cfg) }.w()?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }};
            }
            let st = by_float_dtype!(x.dtype(), "im2col", launch);
            Ok((st, Shape::from((b, c * k * k, oh * ow))))
        }
    }

    pub fn im2col(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Im2Col { k, stride, padding })
    }
}
