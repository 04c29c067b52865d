//! Our CUDA kernels against the composed candle paths they replace, at SDXL's 1024² shapes (f16):
//! median milliseconds per call of each and the ratio. Run on a GPU machine (tools/bench/gpu.sh):
//!
//!   cargo run --release -p loramix-kernels --features cuda --example kernel_bench
//!
//! Inputs are random normal (never zeros, which can run faster than real data). Each case warms
//! up first, then times 20 calls one by one, synchronising the device around each.

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use loramix_kernels::fused::{attention_hd64, attention_reference, lora_branch, lora_branch_reference};
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
    println!("| kernel (f16, SDXL 1024², CFG batch 2) | ours (ms) | candle path (ms) | candle / ours | ours TFLOP/s |");
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
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.0} |", theirs / ours, flop / ours / 1e9);
    }
    // Two rank-16 LoRAs on a 640-wide projection at 4096 tokens × 2, and on a 1280-wide one at 1024 × 2.
    for (label, m, kd, n, r) in [("LoRA branch, 2 × rank 16, 8192×640→640", 8192, 640, 640, 32), ("LoRA branch, 2 × rank 16, 2048×1280→1280", 2048, 1280, 1280, 32)] {
        let x = Tensor::randn(0f32, 1., (m, kd), &dev)?.to_dtype(dt)?;
        let a = (Tensor::randn(0f32, 1., (r, kd), &dev)? * 0.03)?.to_dtype(dt)?;
        let b = (Tensor::randn(0f32, 1., (n, r), &dev)? * 0.03)?.to_dtype(dt)?;
        let base = Tensor::randn(0f32, 1., (m, n), &dev)?.to_dtype(dt)?;
        let scales = vec![0.5f32; r];
        let ours = median_ms(&|| lora_branch(&base, &x, &a, &b, &scales))?;
        // The composed path in the input dtype, as the models ran it before the kernel.
        let s = Tensor::from_slice(&scales, (1, r), &dev)?.to_dtype(dt)?;
        let theirs = median_ms(&|| base.clone() + x.matmul(&a.t()?)?.broadcast_mul(&s)?.matmul(&b.t()?)?)?;
        let _ = lora_branch_reference;
        let flop = 2.0 * (m * r * (kd + n)) as f64;
        println!("| {label} | {ours:.3} | {theirs:.3} | {:.2} | {:.1} |", theirs / ours, flop / ours / 1e9);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("kernel_bench times our CUDA kernels: build with --features cuda and run where a CUDA device is");
    std::process::exit(2);
}
