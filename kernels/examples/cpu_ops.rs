use candle_core::{Device, Tensor};
use std::time::Instant;
fn med(f: &dyn Fn() -> candle_core::Result<Tensor>) -> f64 {
    for _ in 0..3 { f().unwrap(); }
    let mut t: Vec<f64> = (0..21).map(|_| { let s = Instant::now(); f().unwrap(); s.elapsed().as_secs_f64()*1e3 }).collect();
    t.sort_by(|a,b| a.total_cmp(b)); t[10]
}
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, c) in [(512usize, 640usize), (2048, 320), (8192, 160)] {
        let x = Tensor::randn(0f32, 1., (2, m / 2, c), &d)?;
        let ln = candle_nn::LayerNorm::new(Tensor::randn(0f32, 1., c, &d)?, Tensor::randn(0f32, 1., c, &d)?, 1e-5);
        let t = med(&|| loramix_kernels::layer_norm(&x, &ln));
        let h = Tensor::randn(0f32, 1., (2, m / 2, 8 * c), &d)?;
        let g = med(&|| loramix_kernels::geglu(&h));
        println!("{m}x{c}: layer_norm {t:.3} ms   geglu({}) {g:.3} ms", 8 * c);
    }
    Ok(())
}
