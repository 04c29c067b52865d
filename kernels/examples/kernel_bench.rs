//! Our CUDA kernels against the composed candle paths they replace, at SDXL's 1024² shapes (f16
//! unless noted): median milliseconds per call of each, the ratio, and our achieved rate (TFLOP/s
//! for the matrix kernels, GB/s of compulsory traffic for the memory-bound ones). Run on a GPU machine (tools/bench/gpu.sh):
//!
//!   cargo run --release -p loramix-kernels --features cuda --example kernel_bench
//!
//! Inputs are random normal (never zeros, which can run faster than real data). Each case warms
//! up first, then times 20 calls one by one, synchronising the device around each.

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use loramix_kernels::fused::{attention_hd64, attention_reference, lora_branch};
    use std::time::Instant;

    let dev = Device::new_cuda(0)?;
    let median_ms = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize()?;
        let mut t = Vec::with_capacity(20);
        for _ in 0..20 {
            let s = Instant::now();
            f()?;
            dev.synchronize()?;
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(|a, b| a.total_cmp(b));
        Ok(t[t.len() / 2])
    };
    let dt = DType::F16;
    println!("| kernel (f16, SDXL 1024², CFG batch 2) | ours (ms) | candle path (ms) | candle / ours | ours (rate) |");
    println!("|---|---|---|---|---|");
    // (label, batch·heads, query tokens, key tokens): the UNet's self- and cross-attention at 64² and 32² latents' levels.
    for (label, bh, lq, lk) in [
        ("attention, self, 4096 tokens, 10 heads", 20, 4096, 4096),
        ("attention, self, 1024 tokens, 20 heads", 40, 1024, 1024),
        ("attention, cross, 4096×77, 10 heads", 20, 4096, 77),
        ("attention, cross, 1024×77, 20 heads", 40, 1024, 77),
    ] {
        let q = Tensor::randn(0f32, 1., (1, bh, lq, 64), &dev)?.to_dtype(dt)?;
        let k = Tensor::randn(0f32, 1., (1, bh, lk, 64), &dev)?.to_dtype(dt)?;
        let v = Tensor::randn(0f32, 1., (1, bh, lk, 64), &dev)?.to_dtype(dt)?;
        let ours = median_ms(&|| attention_hd64(&q, &k, &v, 0.125))?;
        let theirs = median_ms(&|| attention_reference(&q, &k, &v, 0.125))?;
        let flop = 4.0 * (bh * lq * lk * 64) as f64;
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.0} TFLOP/s |", theirs / ours, flop / ours / 1e9);
    }
    // Two rank-16 LoRAs on a 640-wide projection at 4096 tokens × 2, and on a 1280-wide one at 1024 × 2.
    // Down to the few rows of a text context (to_k / to_v read 2 × 77 tokens) and one decoded token.
    for (label, m, kd, n, r) in [
        ("LoRA branch, 2 × rank 16, 8192×640→640", 8192, 640, 640, 32),
        ("LoRA branch, 2 × rank 16, 2048×1280→1280", 2048, 1280, 1280, 32),
        ("LoRA branch, 2 × rank 16, 154×2048→640 (context)", 154, 2048, 640, 32),
        ("LoRA branch, 2 × rank 16, 1×4096→4096 (a decoded token)", 1, 4096, 4096, 32),
    ] {
        let x = Tensor::randn(0f32, 1., (m, kd), &dev)?.to_dtype(dt)?;
        let a = (Tensor::randn(0f32, 1., (r, kd), &dev)? * 0.03)?.to_dtype(dt)?;
        let b = (Tensor::randn(0f32, 1., (n, r), &dev)? * 0.03)?.to_dtype(dt)?;
        let base = Tensor::randn(0f32, 1., (m, n), &dev)?.to_dtype(dt)?;
        let scales = vec![0.5f32; r];
        let ours = median_ms(&|| lora_branch(&base, &x, &a, &b, &scales))?;
        // The composed path in the input dtype, as the models ran it before the kernel.
        let s = Tensor::from_slice(&scales, (1, r), &dev)?.to_dtype(dt)?;
        let theirs = median_ms(&|| base.clone() + x.matmul(&a.t()?)?.broadcast_mul(&s)?.matmul(&b.t()?)?)?;
        let flop = 2.0 * (m * r * (kd + n)) as f64;
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.1} TFLOP/s |", theirs / ours, flop / ours / 1e9);
    }
    // The memory-bound steps: GroupNorm + SiLU on the UNet's largest map and on the VAE decoder's
    // (f32, as the VAE runs), a Linear's bias add, the level-2 feed-forward's GEGLU.
    let gn_case = |label: &str, dims: (usize, usize, usize, usize), dt: DType| -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1., dims, &dev)?.to_dtype(dt)?;
        let p = loramix_kernels::GroupNormParams::new(32, 1e-5, Tensor::ones(dims.1, dt, &dev)?, Tensor::zeros(dims.1, dt, &dev)?)?;
        let ours = median_ms(&|| loramix_kernels::group_norm(&x, &p, true))?;
        let theirs = median_ms(&|| loramix_kernels::norm::group_norm_reference(&x, &p, true))?;
        let gb = 4.0 * (dims.0 * dims.1 * dims.2 * dims.3 * dt.size_in_bytes()) as f64 / 1e9; // 3 reads + 1 write
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.0} GB/s |", theirs / ours, gb / ours * 1e3);
        Ok(())
    };
    gn_case("GroupNorm + SiLU, 2×320×128×128 f16", (2, 320, 128, 128), dt)?;
    gn_case("GroupNorm + SiLU, 1×128×1024×1024 f32 (VAE)", (1, 128, 1024, 1024), DType::F32)?;
    let y = Tensor::randn(0f32, 1., (2, 1024, 10240), &dev)?.to_dtype(dt)?;
    let bias = Tensor::randn(0f32, 1., 10240, &dev)?.to_dtype(dt)?;
    let ours = median_ms(&|| loramix_kernels::fused::bias_add(&y, &bias, 2))?;
    let theirs = median_ms(&|| y.broadcast_add(&bias))?;
    let gb = 2.0 * (y.elem_count() * 2) as f64 / 1e9;
    println!("| bias add, 2×1024×10240 f16 | {ours:.3} | {theirs:.3} | {:.2} | {:.0} GB/s |", theirs / ours, gb / ours * 1e3);
    let ours = median_ms(&|| loramix_kernels::geglu(&y))?;
    let theirs = median_ms(&|| loramix_kernels::activation::geglu_reference(&y))?;
    let gb = 1.5 * (y.elem_count() * 2) as f64 / 1e9;
    println!("| GEGLU, 2×1024×10240 → 5120 f16 | {ours:.3} | {theirs:.3} | {:.2} | {:.0} GB/s |", theirs / ours, gb / ours * 1e3);
    // 3×3 convolutions: our im2col + one batched GEMM vs candle's im2col + GEMM + transposing copy.
    for (label, dims, dt) in [
        ("conv 3×3, 2×320×128×128 → 320 f16 (UNet)", (2usize, 320usize, 128usize, 128usize), DType::F16),
        ("conv 3×3, 1×128×1024×1024 → 128 f32 (VAE)", (1, 128, 1024, 1024), DType::F32),
    ] {
        let x = Tensor::randn(0f32, 1., dims, &dev)?.to_dtype(dt)?;
        let w = (Tensor::randn(0f32, 1., (dims.1, dims.1, 3, 3), &dev)? * 0.05)?.to_dtype(dt)?;
        let b = Tensor::randn(0f32, 1., dims.1, &dev)?.to_dtype(dt)?;
        let ours = median_ms(&|| loramix_kernels::conv2d(&x, &w, Some(&b), 1, 1))?;
        let theirs = median_ms(&|| loramix_kernels::conv::conv2d_reference(&x, &w, Some(&b), 1, 1))?;
        let flop = 2.0 * (dims.0 * dims.1 * dims.1 * 9 * dims.2 * dims.3) as f64;
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.0} TFLOP/s |", theirs / ours, flop / ours / 1e9);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("kernel_bench times our CUDA kernels: build with --features cuda and run where a CUDA device is");
    std::process::exit(2);
}
