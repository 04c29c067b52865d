//! Our CUDA kernels (kernels/cuda) against their composed references on random inputs. Without
//! the `cuda` feature the GPU tests are reported as ignored, with the reason; built with it, they
//! need a CUDA device and fail without one. The reference tests run everywhere.

use candle_core::{DType, Device, Result, Tensor};
use loramix_kernels::fused::{attention_hd64, lora_branch};
#[cfg(feature = "cuda")]
use loramix_kernels::fused::{attention_reference, lora_branch_reference};
#[cfg(feature = "cuda")]
use loramix_kernels::{activation::geglu_reference, norm::group_norm_reference, GroupNormParams};

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(num / b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-30))
}

/// The references agree with the CPU attention the models use, and with a direct formula.
#[test]
fn references_equal_the_cpu_paths() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (2, 3, 37, 64), &dev)?;
    let k = Tensor::randn(0f32, 1., (2, 3, 19, 64), &dev)?;
    let v = Tensor::randn(0f32, 1., (2, 3, 19, 64), &dev)?;
    let e = rel_l2(&attention_hd64(&q, &k, &v, 0.125)?, &loramix_kernels::scaled_dot_product_attention(&q, &k, &v, 0.125)?)?;
    assert!(e < 1e-5, "attention reference vs CPU attention: {e:e}");

    let (m, kd, n) = (9, 12, 7);
    let x = Tensor::randn(0f32, 1., (m, kd), &dev)?;
    let a = Tensor::randn(0f32, 1., (5, kd), &dev)?;
    let b = Tensor::randn(0f32, 1., (n, 5), &dev)?;
    let base = Tensor::randn(0f32, 1., (m, n), &dev)?;
    let scales = [0.5f32, 0.5, 2.0, 0.0, -1.0];
    let got = lora_branch(&base, &x, &a, &b, &scales)?.to_vec2::<f32>()?;
    let (xv, av, bv, basev) = (x.to_vec2::<f32>()?, a.to_vec2::<f32>()?, b.to_vec2::<f32>()?, base.to_vec2::<f32>()?);
    for i in 0..m {
        for j in 0..n {
            let mut want = basev[i][j] as f64;
            for r in 0..5 {
                let low: f64 = (0..kd).map(|c| xv[i][c] as f64 * av[r][c] as f64).sum();
                want += low * scales[r] as f64 * bv[j][r] as f64;
            }
            assert!((got[i][j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "[{i}, {j}]: {} vs {want}", got[i][j]);
        }
    }
    assert!(lora_branch(&base, &x, &a, &b, &scales[..4]).is_err(), "a scale per rank row");
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu() -> Device {
    Device::new_cuda(0).expect("built with --features cuda: these tests need a CUDA device")
}

/// Self- and cross-attention shapes with ragged tiles, in each dtype, against the f32 reference on
/// the CPU from the same (rounded) inputs. Half precision: the kernel reads and writes f16/bf16,
/// accumulates in f32 and rounds the probabilities to the input dtype before P·V (as
/// flash-attention does); the bound is that rounding and the output's (bf16: 8 bits of mantissa).
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_attention_equals_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        // Ragged query blocks (64 rows per tensor-core block, 128 per f32 block) and key tiles
        // (32 / 64 keys), cross-attention's 77 keys, and SDXL's 4096-token self-attention.
        for (b, h, lq, lk) in [(2, 5, 300, 300), (2, 5, 1024, 77), (2, 5, 5, 129), (1, 3, 130, 33), (1, 2, 4096, 4096)] {
            let q = Tensor::randn(0f32, 1., (b, h, lq, 64), &Device::Cpu)?;
            let k = Tensor::randn(0f32, 1., (b, h, lk, 64), &Device::Cpu)?;
            let v = Tensor::randn(0f32, 1., (b, h, lk, 64), &Device::Cpu)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
                let (q, k, v) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?);
                assert!(loramix_kernels::fused::attention_is_fused(&q.to_device(&dev)?, &k.to_device(&dev)?, &v.to_device(&dev)?));
                let got = attention_hd64(&q.to_device(&dev)?, &k.to_device(&dev)?, &v.to_device(&dev)?, 0.125)?;
                assert_eq!(got.dtype(), dt);
                let want = attention_reference(&q.to_dtype(DType::F32)?, &k.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?, 0.125)?;
                let e = rel_l2(&got, &want)?;
                eprintln!("attention {lq}x{lk} {dt:?}: rel L2 {e:.2e}");
                assert!(e < tol, "attention {lq}x{lk} {dt:?}: rel L2 {e:e} > {tol:e}");
            }
        }
        // Views that start mid-buffer (3 elements in: not 16-byte aligned) are copied first.
        let len = 2 * 5 * 77 * 64;
        let flat = Tensor::randn(0f32, 1., 3 + 3 * len, &Device::Cpu)?.to_dtype(DType::F16)?;
        let view = |i: usize| flat.narrow(0, 3 + i * len, len)?.reshape((2, 5, 77, 64));
        let (q, k, v) = (view(0)?, view(1)?, view(2)?);
        let got = attention_hd64(&q.to_device(&dev)?, &k.to_device(&dev)?, &v.to_device(&dev)?, 0.125)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let e = rel_l2(&got, &attention_reference(&f(&q)?, &f(&k)?, &f(&v)?, 0.125)?)?;
        eprintln!("attention on unaligned views F16: rel L2 {e:.2e}");
        assert!(e < 2e-3, "attention on unaligned views: rel L2 {e:e}");
        // Token-major operands ([b, l, h, 64] viewed as [b, h, l, 64], as the models pass them) are
        // read in place, and the output comes back in the caller's logical order.
        for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let tm = |l: usize| Tensor::randn(0f32, 1., (2, l, 5, 64), &Device::Cpu)?.to_dtype(dt);
            let (q, k, v) = (tm(300)?.transpose(1, 2)?, tm(77)?.transpose(1, 2)?, tm(77)?.transpose(1, 2)?);
            let got = attention_hd64(&q.to_device(&dev)?, &k.to_device(&dev)?, &v.to_device(&dev)?, 0.125)?;
            assert_eq!(got.dims(), &[2, 5, 300, 64]);
            let e = rel_l2(&got, &attention_reference(&f(&q)?, &f(&k)?, &f(&v)?, 0.125)?)?;
            eprintln!("attention on token-major views {dt:?}: rel L2 {e:.2e}");
            assert!(e < tol, "attention on token-major views {dt:?}: rel L2 {e:e}");
        }
    }
    Ok(())
}

/// Three LoRAs of ranks 4, 8 and 16 (one switched off by a zero scale) on a 1280-wide layer with a
/// ragged last row block; and two LoRAs of ranks 32 and 8 (two blocks of 32 rank rows, the second
/// ragged) on a 300-wide input (a ragged column chunk) — against the f32 reference on the CPU.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_lora_branch_equals_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        // (rows, in, out, [(rank, scale)] per LoRA)
        type Case = (usize, usize, usize, &'static [(usize, f32)]);
        let cases: [Case; 2] = [(1000, 1280, 640, &[(4, 0.75), (8, 0.0), (16, 1.5)]), (37, 300, 200, &[(32, 0.5), (8, -1.25)])];
        for (m, kd, n, loras) in cases {
            let scales: Vec<f32> = loras.iter().flat_map(|&(r, s)| std::iter::repeat_n(s, r)).collect();
            let r = scales.len();
            let x = Tensor::randn(0f32, 1., (m, kd), &Device::Cpu)?;
            let a = (Tensor::randn(0f32, 1., (r, kd), &Device::Cpu)? * 0.03)?;
            let b = (Tensor::randn(0f32, 1., (n, r), &Device::Cpu)? * 0.03)?;
            let base = Tensor::randn(0f32, 1., (m, n), &Device::Cpu)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
                let c = |t: &Tensor| t.to_dtype(dt);
                let (x, a, b, base) = (c(&x)?, c(&a)?, c(&b)?, c(&base)?);
                let got = lora_branch(&base.to_device(&dev)?, &x.to_device(&dev)?, &a.to_device(&dev)?, &b.to_device(&dev)?, &scales)?;
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let want = lora_branch_reference(&f(&base)?, &f(&x)?, &f(&a)?, &f(&b)?, &scales)?;
                // The branch alone, so that an error in it is not hidden under the base output.
                let e = rel_l2(&(got.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - f(&base)?)?, &(want - f(&base)?)?)?;
                eprintln!("lora branch {m}x{kd}->{n}, r {r}, {dt:?}: rel L2 of the branch {e:.2e}");
                assert!(e < tol * 10.0, "lora branch {m}x{kd}->{n} r {r} {dt:?}: rel L2 {e:e}");
            }
        }
    }
    Ok(())
}

/// GroupNorm (+ SiLU) on CUDA against the composed f32 reference on the CPU: the UNet's shape
/// (several chunks per group), a rank-3 input, a group smaller than one chunk, each dtype.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_group_norm_equals_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        for (shape, groups) in [(vec![2usize, 320, 64, 70], 32usize), (vec![1, 64, 37], 8), (vec![3, 12, 5, 7], 4)] {
            let c = shape[1];
            // An offset mean and a scale away from 1: the variance pass must centre properly.
            let x = ((Tensor::randn(0f32, 2.0, shape.clone(), &Device::Cpu)? + 3.0)?).to_dtype(DType::F32)?;
            let w = Tensor::randn(1f32, 0.3, c, &Device::Cpu)?;
            let b = Tensor::randn(0f32, 0.3, c, &Device::Cpu)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
                let p_gpu = GroupNormParams::new(groups, 1e-5, w.to_dtype(dt)?.to_device(&dev)?, b.to_dtype(dt)?.to_device(&dev)?)?;
                let xd = x.to_dtype(dt)?;
                for silu in [false, true] {
                    let got = loramix_kernels::group_norm(&xd.to_device(&dev)?, &p_gpu, silu)?;
                    assert_eq!(got.dtype(), dt);
                    // The reference from the same rounded inputs and parameters, in f32.
                    let p_ref = GroupNormParams::new(groups, 1e-5, w.to_dtype(dt)?.to_dtype(DType::F32)?, b.to_dtype(dt)?.to_dtype(DType::F32)?)?;
                    let want = group_norm_reference(&xd.to_dtype(DType::F32)?, &p_ref, silu)?;
                    let e = rel_l2(&got, &want)?;
                    eprintln!("group norm {shape:?}/{groups} silu {silu} {dt:?}: rel L2 {e:.2e}");
                    assert!(e < tol, "group norm {shape:?}/{groups} silu {silu} {dt:?}: rel L2 {e:e}");
                }
            }
        }
    }
    Ok(())
}

/// The one-pass bias add (a Linear's last dimension; a convolution's dimension 1) and GEGLU on
/// CUDA against candle's ops in f32 on the CPU.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_bias_add_and_geglu_equal_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        let y = Tensor::randn(0f32, 1., (3, 70, 96), &Device::Cpu)?;
        let bl = Tensor::randn(0f32, 1., 96, &Device::Cpu)?;
        let yc = Tensor::randn(0f32, 1., (2, 24, 9, 11), &Device::Cpu)?;
        let bc = Tensor::randn(0f32, 1., 24, &Device::Cpu)?;
        let h = Tensor::randn(0f32, 1.5, (2, 77, 2 * 160), &Device::Cpu)?;
        for (dt, tol) in [(DType::F32, 1e-6), (DType::F16, 1e-3), (DType::BF16, 8e-3)] {
            let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
            let r = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F32);
            let got = loramix_kernels::fused::bias_add(&on(&y)?, &on(&bl)?, 2)?;
            let e = rel_l2(&got, &r(&y)?.broadcast_add(&r(&bl)?.reshape((1, 1, 96))?)?)?;
            eprintln!("bias add (last dim) {dt:?}: rel L2 {e:.2e}");
            assert!(e < tol, "bias add (last dim) {dt:?}: rel L2 {e:e}");
            let got = loramix_kernels::fused::bias_add(&on(&yc)?, &on(&bc)?, 1)?;
            let e = rel_l2(&got, &r(&yc)?.broadcast_add(&r(&bc)?.reshape((1, 24, 1, 1))?)?)?;
            eprintln!("bias add (channels) {dt:?}: rel L2 {e:.2e}");
            assert!(e < tol, "bias add (channels) {dt:?}: rel L2 {e:e}");
            let got = loramix_kernels::geglu(&on(&h)?)?;
            assert_eq!(got.dims(), &[2, 77, 160]);
            let e = rel_l2(&got, &geglu_reference(&r(&h)?)?)?;
            eprintln!("geglu {dt:?}: rel L2 {e:.2e}");
            assert!(e < tol * 2.0, "geglu {dt:?}: rel L2 {e:e}");
        }
    }
    Ok(())
}

/// Convolution through our CUDA im2col + one batched GEMM against candle's convolution in f32 on
/// the CPU: 3×3 with padding 1 (stride 1 and 2, the UNet's), stride 2 without padding (the VAE's
/// downsampler after its asymmetric pad), and a ragged size.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_conv_equals_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        for (stride, padding, h, w) in [(1usize, 1usize, 33usize, 20usize), (2, 1, 32, 32), (2, 0, 17, 17), (1, 0, 9, 7)] {
            let x = Tensor::randn(0f32, 1., (2, 24, h, w), &Device::Cpu)?;
            let wt = (Tensor::randn(0f32, 1., (40, 24, 3, 3), &Device::Cpu)? * 0.1)?;
            let b = Tensor::randn(0f32, 1., 40, &Device::Cpu)?;
            for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
                let on = |t: &Tensor| t.to_dtype(dt)?.to_device(&dev);
                let r = |t: &Tensor| t.to_dtype(dt)?.to_dtype(DType::F32);
                let got = loramix_kernels::conv2d(&on(&x)?, &on(&wt)?, Some(&on(&b)?), stride, padding)?;
                let want = loramix_kernels::conv::conv2d_reference(&r(&x)?, &r(&wt)?, Some(&r(&b)?), stride, padding)?;
                assert_eq!(got.dims(), want.dims());
                let e = rel_l2(&got, &want)?;
                eprintln!("conv 3x3 s{stride} p{padding} {h}x{w} {dt:?}: rel L2 {e:.2e}");
                assert!(e < tol, "conv s{stride} p{padding} {h}x{w} {dt:?}: rel L2 {e:e}");
            }
        }
    }
    Ok(())
}
