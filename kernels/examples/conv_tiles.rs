//! Winograd F(2×2, 3×3) against F(4×4, 3×3) (and candle's im2col path) on the CPU, at the UNet's
//! and VAE's 3×3 shapes: median milliseconds per call of each, timed in alternation (one call of
//! each in turn, the order swapped every round) so that a slow spell of the machine hits both.
//!
//!   cargo run --release -p loramix-kernels --example conv_tiles [rounds]

use candle_core::{Device, Result, Tensor};
use loramix_kernels::winograd::{conv3x3_tiled, Tile};
use std::time::Instant;

fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let d = Device::Cpu;
    println!("| shape (b, c → o, h×w) | chosen | F2 ms | F4 ms | F2 / F4 |");
    println!("|---|---|---|---|---|");
    // Batch 2 (CFG): the benchmark UNets' levels (mid2 and conv: 128/256/512 channels; mid:
    // 160/320/640) at a 512² image, with the up blocks' concatenated inputs; full-size SDXL's
    // (320/640/1280) at 1024²; and the VAE decoder's (batch 1) at 512² and 1024².
    for (b, c, o, h) in [
        (2, 128, 128, 64), (2, 256, 128, 64), (2, 160, 160, 64), (2, 320, 160, 64),
        (2, 256, 256, 32), (2, 512, 256, 32), (2, 320, 320, 32), (2, 640, 320, 32),
        (2, 512, 512, 16), (2, 1024, 512, 16), (2, 640, 640, 16), (2, 1280, 640, 16), (2, 960, 640, 16),
        (2, 640, 640, 8), (2, 128, 128, 8), (1, 640, 640, 16),
        (2, 320, 320, 128), (2, 640, 640, 64), (2, 1280, 640, 64), (2, 1280, 1280, 32), (2, 2560, 1280, 32),
        (1, 512, 512, 64), (1, 256, 256, 128), (1, 128, 128, 256),
    ] {
        let x = Tensor::randn(0f32, 1., (b, c, h, h), &d)?;
        let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &d)?;
        let bias = vec![0.1f32; o];
        let time = |tile: Tile| -> Result<f64> {
            let s = Instant::now();
            loramix_kernels::on_pool(|| conv3x3_tiled(&x, &w, &bias, tile))?;
            Ok(s.elapsed().as_secs_f64() * 1e3)
        };
        time(Tile::F2)?;
        time(Tile::F4)?;
        let (mut f2, mut f4) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            if r % 2 == 0 {
                f2.push(time(Tile::F2)?);
                f4.push(time(Tile::F4)?);
            } else {
                f4.push(time(Tile::F4)?);
                f2.push(time(Tile::F2)?);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (a, z) = (med(&mut f2), med(&mut f4));
        println!("| {b}, {c} → {o}, {h}×{h} | {:?} | {a:.2} | {z:.2} | {:.2} |", loramix_kernels::winograd::choose_tile(b, h, h), a / z);
    }
    Ok(())
}
