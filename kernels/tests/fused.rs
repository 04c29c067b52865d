//! Our CUDA kernels (kernels/cuda) against their composed references on random inputs. Without
//! the `cuda` feature the GPU tests are reported as ignored, with the reason; built with it, they
//! need a CUDA device and fail without one. The reference tests run everywhere.

use candle_core::{DType, Device, Result, Tensor};
use loramix_kernels::fused::{attention_hd64, lora_branch};
#[cfg(feature = "cuda")]
use loramix_kernels::fused::{attention_reference, lora_branch_reference};

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
    }
    Ok(())
}

/// Three LoRAs of ranks 4, 8 and 16 (one switched off by a zero scale) on a 1280-wide layer, with
/// a ragged last row block, against the f32 reference on the CPU.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: build with --features cuda and run where a CUDA device is")]
fn fused_lora_branch_equals_reference() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let dev = gpu();
        let (m, kd, n, r) = (1000, 1280, 640, 28);
        let mut scales = vec![0.75f32; 4];
        scales.extend([0.0f32; 8]);
        scales.extend([1.5f32; 16]);
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
            let e = rel_l2(&got, &want)?;
            eprintln!("lora branch {dt:?}: rel L2 {e:.2e}");
            assert!(e < tol, "lora branch {dt:?}: rel L2 {e:e} > {tol:e}");
        }
    }
    Ok(())
}
