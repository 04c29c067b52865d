//! 3×3, stride-1, padding-1 convolution by Winograd's minimal filtering F(2×2, 3×3) on the CPU.
//!
//! Every 3×3 convolution in the SDXL UNet and VAE is of this kind, and on the CPU they were the
//! largest op after the linear layers (BENCHMARKS.md, per-op table). im2col + GEMM spends 9·c
//! multiply-adds per output; F(2×2, 3×3) spends 4·c (16 products per 2×2 output tile instead of
//! 36), for three cheap linear transforms: inputs V = Bᵀ d B per 4×4 tile, weights U = G g Gᵀ once
//! per call, outputs Y = Aᵀ M A. The 16 products become 16 GEMMs `M[ξ] = U[ξ] · V[ξ]` over
//! channels. Tiles run in blocks of whole tile rows (transformed inputs ~2 MB) in parallel, as in
//! `conv.rs`. The transforms' coefficients are 0, ±1 and ½, so the result differs from direct
//! convolution by rounding only (relative L2 around 1e-7; tested against candle's convolution).
//! Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.

use std::cell::RefCell;

use candle_core::{Result, Tensor};

use crate::blocks::SharedOut;
use rayon::prelude::*;

/// Target size of one task's transformed inputs, in f32 elements (2 MiB).
const BLOCK_ELEMENTS: usize = 1 << 19;

thread_local! {
    /// Per thread: transformed inputs, then the 16 products, reused across calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` on this thread's scratch, grown to `v_len` transformed-input and `m_len` product
/// elements (their contents are stale: `f` writes before it reads).
///
/// The buffers are taken out of the cell for the call and put back after it, so that a call
/// re-entered on this thread (a pool thread waiting inside `f` may run another convolution's
/// task) gets buffers of its own instead of a borrow panic.
fn with_scratch<R>(v_len: usize, m_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let (mut v, mut m) = SCRATCH.with(|s| s.take());
    if v.len() < v_len {
        v.resize(v_len, 0.0);
    }
    if m.len() < m_len {
        m.resize(m_len, 0.0);
    }
    let r = f(&mut v[..v_len], &mut m[..m_len]);
    SCRATCH.with(|s| s.replace((v, m)));
    r
}

/// U = G g Gᵀ for every (o, c) into `u`: `[16][o][c]`. Blocks of output channels transform in
/// parallel, each into its rows of the 16 planes.
fn transform_weights(w: &[f32], o: usize, c: usize, u: &mut [f32]) {
    let block = (o / (4 * rayon::current_num_threads()).max(1)).max(1);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..o.div_ceil(block)).map(|_| Vec::with_capacity(16)).collect();
    for plane in u[..16 * o * c].chunks_mut(o * c) {
        for (t, rows) in tasks.iter_mut().zip(plane.chunks_mut(block * c)) {
            t.push(rows);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(bi, mut planes)| {
        let mut taps = vec![0f32; 15 * c];
        let rows = planes[0].len() / c;
        for r in 0..rows {
            let oi = bi * block + r;
            weight_row(&w[oi * 9 * c..(oi + 1) * 9 * c], &mut taps, &mut planes, r * c, c);
        }
    });
}

crate::simd::multiversion! {
    /// One output channel: `w` is `[c][3][3]`; U[ξ] goes to `planes[ξ][at..at + c]`. The taps are
    /// first laid out tap-major (`taps[tap][ci]`) so that both halves of the transform run as
    /// whole-row vector operations over input channels (a loop over `ci` that writes sixteen
    /// planes per channel did not vectorise: the weight transform took half of a 16×16 call).
    fn weight_row(w: &[f32], taps: &mut [f32], planes: &mut [&mut [f32]], at: usize, c: usize) {
        let (g, t) = taps.split_at_mut(9 * c);
        for (ci, kernel) in w[..9 * c].chunks_exact(9).enumerate() {
            for (tap, &v) in kernel.iter().enumerate() {
                g[tap * c + ci] = v;
            }
        }
        // t = G g, kernel column by column: its rows 1 and 2 (rows 0 and 3 are g's rows 0 and 2).
        for j in 0..3 {
            let (g0, g1, g2) = (&g[j * c..(j + 1) * c], &g[(3 + j) * c..(4 + j) * c], &g[(6 + j) * c..(7 + j) * c]);
            let (t1, t2) = t[2 * j * c..(2 * j + 2) * c].split_at_mut(c);
            for ((((a, b), x0), x1), x2) in t1.iter_mut().zip(t2.iter_mut()).zip(g0).zip(g1).zip(g2) {
                *a = 0.5 * (x0 + x1 + x2);
                *b = 0.5 * (x0 - x1 + x2);
            }
        }
        let (g, t) = (&*g, &*t);
        let row = |r: usize, j: usize| -> &[f32] {
            match r {
                0 => &g[j * c..(j + 1) * c],
                3 => &g[(6 + j) * c..(7 + j) * c],
                _ => &t[(2 * j + r - 1) * c..(2 * j + r) * c],
            }
        };
        // U = t Gᵀ, row by row of t.
        for r in 0..4 {
            let (t0, t1, t2) = (row(r, 0), row(r, 1), row(r, 2));
            planes[r * 4][at..at + c].copy_from_slice(t0);
            planes[r * 4 + 3][at..at + c].copy_from_slice(t2);
            let (p1, p2) = planes[r * 4 + 1..r * 4 + 3].split_at_mut(1);
            for ((((a, b), x0), x1), x2) in p1[0][at..at + c].iter_mut().zip(p2[0][at..at + c].iter_mut()).zip(t0).zip(t1).zip(t2) {
                *a = 0.5 * (x0 + x1 + x2);
                *b = 0.5 * (x0 - x1 + x2);
            }
        }
    }
}

thread_local! {
    /// The caller's transformed weights, reused across calls (16/9 of the weight's size).
    static WEIGHTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The largest weight transform (f32 elements, 64 MB) kept in the thread's buffer between calls.
/// Above it are only full-size SDXL's widest convolutions (105–210 MB), whose allocation is small
/// beside their work. In tests, small enough that the last test case takes the other path.
#[cfg(not(test))]
const REUSED_WEIGHT_ELEMENTS: usize = 1 << 24;
#[cfg(test)]
const REUSED_WEIGHT_ELEMENTS: usize = 1 << 12;

/// Batches with at most this many tiles in all (2×32×32 pixels) run as one set of GEMMs
/// (`Geometry::whole_batch`) rather than in row blocks.
const WHOLE_BATCH_TILES: usize = 512;
/// ... provided their transformed inputs and products fit in this many f32 elements (16 MiB).
const WHOLE_BATCH_ELEMENTS: usize = 1 << 22;

struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    tiles_w: usize,
}

impl Geometry {
    /// V = Bᵀ d B for the tiles of tile rows `rows` of one image: `v[ξ][ci][t]`.
    fn transform_inputs(&self, x: &[f32], rows: std::ops::Range<usize>, v: &mut [f32]) {
        let tw = self.tiles_w;
        let p = rows.len() * tw;
        let mut scratch = vec![0f32; 8 * (tw + 1)];
        for ci in 0..self.c {
            let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for (r, ty) in rows.clone().enumerate() {
                input_tile_row(plane, self.h, self.w, ty, tw, &mut scratch, v, self.c * p, ci * p + r * tw);
            }
        }
    }

    /// Y = Aᵀ M A plus bias into output rows 2·rows of one image `[o, h, w]`.
    fn transform_outputs(&self, m: &[f32], rows: std::ops::Range<usize>, bias: &[f32], out: SharedOut) {
        let (h, w, tw) = (self.h, self.w, self.tiles_w);
        let p = rows.len() * tw;
        let mut scratch = vec![0f32; 4 * tw];
        #[allow(clippy::needless_range_loop)] // oi also offsets the output plane
        for oi in 0..self.o {
            for (r, ty) in rows.clone().enumerate() {
                // SAFETY: output rows 2ty, 2ty + 1 of channel oi belong to this task alone.
                let plane = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(oi * h * w), h * w) };
                output_tile_row(m, self.o * p, oi * p + r * tw, tw, bias[oi], &mut scratch, plane, h, w, ty);
            }
        }
    }

    /// `m[ξ] = U[ξ] · v[ξ]` over `p` tiles: `U[ξ]` is `[o, c]` row-major inside `u`, `v[ξ]` `[c, p]`
    /// and `m[ξ]` `[o, p]` with rows `row_stride` apart.
    ///
    /// # Safety
    /// `v` and `m` must address matrices of those shapes inside live buffers, and no other thread
    /// may touch `m`'s rows during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(&self, u: &[f32], xi: usize, v: *const f32, m: *mut f32, p: usize, row_stride: usize, parallelism: gemm::Parallelism) {
        let (c, o) = (self.c, self.o);
        let product = crate::blocks::Product {
            m: o, n: p, k: c,
            dst: m, dst_cs: 1, dst_rs: row_stride as isize,
            bias: crate::blocks::Bias::None,
            lhs: u[xi * o * c..(xi + 1) * o * c].as_ptr(), lhs_cs: 1, lhs_rs: c as isize,
            rhs: v, rhs_cs: 1, rhs_rs: row_stride as isize,
        };
        // SAFETY: U[ξ] lies inside `u` ([16][o][c]); the rest is the caller's promise.
        unsafe { product.run(parallelism) }
    }

    /// All images' tiles as one set of 16 GEMMs, for small latents. Split into row blocks, a
    /// 2×16×16 input gives the GEMMs only 32–64 tiles each, too few to repay reading U[ξ] (the
    /// weights' transform, 16/9 of their size) once per block; here each U[ξ] is read once and the
    /// 16 GEMMs run in parallel with all tiles. Inputs are transformed in parallel over channels,
    /// outputs over output channels. Layouts are channel-major, `v[ci][ξ][t]` and `m[oi][ξ][t]`,
    /// so that each task owns one contiguous range; the GEMMs read and write them with a row
    /// stride of 16 planes.
    fn whole_batch(&self, x: &[f32], u: &[f32], bias: &[f32], b: usize, tiles_h: usize, out: &mut [f32]) {
        let (c, o, h, w, tw) = (self.c, self.o, self.h, self.w, self.tiles_w);
        let tiles = tiles_h * tw;
        let p = b * tiles;
        with_scratch(16 * c * p, 16 * o * p, |v, m| {
            let channels_per_task = c.div_ceil(4 * rayon::current_num_threads()).max(1);
            v.par_chunks_mut(16 * p * channels_per_task).enumerate().for_each(|(k, vs)| {
                let mut scratch = vec![0f32; 8 * (tw + 1)];
                for (i, vc) in vs.chunks_mut(16 * p).enumerate() {
                    let ci = k * channels_per_task + i;
                    for img in 0..b {
                        let plane = &x[(img * c + ci) * h * w..][..h * w];
                        for ty in 0..tiles_h {
                            input_tile_row(plane, h, w, ty, tw, &mut scratch, vc, p, img * tiles + ty * tw);
                        }
                    }
                }
            });
            let (vp, mp) = (SharedOut::new(v), SharedOut::new(m));
            (0..16).into_par_iter().for_each(|xi| {
                // SAFETY: v[ξ] is [c, p] and m[ξ] [o, p] with row stride 16p, inside v and m;
                // each ξ writes only its own rows of m.
                unsafe { self.product(u, xi, vp.ptr().add(xi * p), mp.ptr().add(xi * p), p, 16 * p, gemm::Parallelism::None) }
            });
            let m = &*m;
            out.par_chunks_mut(h * w).enumerate().for_each_init(|| vec![0f32; 4 * tw], |scratch, (j, plane)| {
                let (img, oi) = (j / o, j % o);
                for ty in 0..tiles_h {
                    output_tile_row(&m[oi * 16 * p..(oi + 1) * 16 * p], p, img * tiles + ty * tw, tw, bias[oi], scratch, plane, h, w, ty);
                }
            });
        });
    }

    fn block(&self, x: &[f32], u: &[f32], bias: &[f32], rows: std::ops::Range<usize>, out: SharedOut, parallelism: gemm::Parallelism) {
        let p = rows.len() * self.tiles_w;
        let (c, o) = (self.c, self.o);
        with_scratch(16 * c * p, 16 * o * p, |v, m| {
            self.transform_inputs(x, rows.clone(), v);
            for xi in 0..16 {
                // SAFETY: v[ξ] is [c, p] and m[ξ] [o, p], row-major, inside v and m.
                unsafe { self.product(u, xi, v.as_ptr().add(xi * c * p), m.as_mut_ptr().add(xi * o * p), p, p, parallelism) }
            }
            self.transform_outputs(m, rows, bias, out);
        });
    }
}

crate::simd::multiversion! {
    /// The 4×4 tiles of tile row `ty` of one channel plane, all `tw` of them at once: the four
    /// input rows 2ty − 1 … 2ty + 2 are split into even and odd columns (of the padded row), so
    /// both transforms are contiguous vector operations over tiles. Writes
    /// `v[ξ·plane_stride + at + tx]`.
    #[allow(clippy::too_many_arguments)]
    fn input_tile_row(plane: &[f32], h: usize, w: usize, ty: usize, tw: usize, scratch: &mut [f32], v: &mut [f32], plane_stride: usize, at: usize) {
        let n = tw + 1;
        // even[i][k] = row i at column 2k − 1, odd[i][k] = row i at column 2k (zero outside).
        let (even, odd) = scratch.split_at_mut(4 * n);
        for i in 0..4 {
            let iy = 2 * ty as isize - 1 + i as isize;
            let (e, o) = (&mut even[i * n..(i + 1) * n], &mut odd[i * n..(i + 1) * n]);
            if iy < 0 || iy >= h as isize {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            for k in 0..n {
                e[k] = if k >= 1 && 2 * k - 1 < w { src[2 * k - 1] } else { 0.0 };
                o[k] = if 2 * k < w { src[2 * k] } else { 0.0 };
            }
        }
        // Bᵀ across rows, in place: rows become t0 = d0 − d2, t1 = d1 + d2, t2 = d2 − d1, t3 = d1 − d3.
        for half in [&mut *even, &mut *odd] {
            let (r01, r23) = half.split_at_mut(2 * n);
            let (d0, d1) = r01.split_at_mut(n);
            let (d2, d3) = r23.split_at_mut(n);
            for k in 0..n {
                let (a, b, c, d) = (d0[k], d1[k], d2[k], d3[k]);
                d0[k] = a - c;
                d1[k] = b + c;
                d2[k] = c - b;
                d3[k] = b - d;
            }
        }
        // B across columns: a tile's columns are even[tx], odd[tx], even[tx + 1], odd[tx + 1].
        for i in 0..4 {
            let (e, o) = (&even[i * n..(i + 1) * n], &odd[i * n..(i + 1) * n]);
            for (j, f) in [0usize, 1, 2, 3].into_iter().zip([0u8, 1, 2, 3]) {
                let dst = &mut v[(i * 4 + j) * plane_stride + at..][..tw];
                for tx in 0..tw {
                    dst[tx] = match f {
                        0 => e[tx] - e[tx + 1],
                        1 => o[tx] + e[tx + 1],
                        2 => e[tx + 1] - o[tx],
                        _ => o[tx] - o[tx + 1],
                    };
                }
            }
        }
    }
}

crate::simd::multiversion! {
    /// Aᵀ M A for the `tw` tiles of tile row `ty` of one output channel, vectorised over tiles,
    /// plus `bias`, into rows 2ty and 2ty + 1 of `plane` (`[h, w]`).
    #[allow(clippy::too_many_arguments)]
    fn output_tile_row(m: &[f32], plane_stride: usize, at: usize, tw: usize, bias: f32, scratch: &mut [f32], plane: &mut [f32], h: usize, w: usize, ty: usize) {
        let row = |xi: usize| &m[xi * plane_stride + at..][..tw];
        for i in 0..2 {
            let oy = 2 * ty + i;
            if oy >= h {
                continue;
            }
            // t[j] = (Aᵀ M)[i][j] for the four columns j, over tiles.
            let (t01, t23) = scratch.split_at_mut(2 * tw);
            let (t0, t1) = t01.split_at_mut(tw);
            let (t2, t3) = t23.split_at_mut(tw);
            for (j, t) in [t0, t1, t2, t3].into_iter().enumerate() {
                let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                for tx in 0..tw {
                    t[tx] = if i == 0 { m0[tx] + m1[tx] + m2[tx] } else { m1[tx] - m2[tx] - m3[tx] };
                }
            }
            let (t01, t23) = scratch.split_at(2 * tw);
            let (t0, t1) = t01.split_at(tw);
            let (t2, t3) = t23.split_at(tw);
            let dst = &mut plane[oy * w..(oy + 1) * w];
            let full = w / 2;
            for tx in 0..full {
                dst[2 * tx] = t0[tx] + t1[tx] + t2[tx] + bias;
                dst[2 * tx + 1] = t1[tx] - t2[tx] - t3[tx] + bias;
            }
            if w % 2 == 1 {
                dst[w - 1] = t0[full] + t1[full] + t2[full] + bias;
            }
        }
    }
}

/// `conv2d(x [b, c, h, w], weight [o, c, 3, 3], bias)` with stride 1 and padding 1; f32 on the CPU.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &[f32]) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    let (b, xc, h, w) = x.dims4()?;
    if (kh, kw) != (3, 3) || xc != c || bias.len() != o {
        candle_core::bail!("winograd: expected a [o, {xc}, 3, 3] weight and {o} biases, got {:?} and {}", weight.dims(), bias.len());
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    let (xd, wd) = (crate::host_f32(&xs, &x, "winograd")?, crate::host_f32(&ws, &weight, "winograd")?);
    // Transforms up to 64 MB reuse this thread's buffer; larger ones (SDXL's 2560→1280
    // convolutions: 210 MB) get their own, freed on return, so the largest does not stay resident.
    // Taken out of the cell for the call (and put back below), so that a call re-entered on this
    // thread while it waits for the pool gets a buffer of its own instead of a borrow panic.
    let reuse = 16 * o * c <= REUSED_WEIGHT_ELEMENTS;
    let mut transformed = if reuse { WEIGHTS.with(|cell| cell.take()) } else { Vec::new() };
    if transformed.len() < 16 * o * c {
        transformed.resize(16 * o * c, 0.0);
    }
    transform_weights(wd, o, c, &mut transformed);
    let result = conv3x3_transformed(xd, &transformed[..16 * o * c], bias, (b, c, h, w, o), x.device());
    if reuse {
        WEIGHTS.with(|cell| cell.replace(transformed));
    }
    result
}

/// The convolution from the transformed weights `u` (`[16][o][c]`).
fn conv3x3_transformed(xd: &[f32], u: &[f32], bias: &[f32], (b, c, h, w, o): (usize, usize, usize, usize, usize), device: &candle_core::Device) -> Result<Tensor> {
    let (tiles_h, tiles_w) = (h.div_ceil(2), w.div_ceil(2));
    let g = Geometry { c, h, w, o, tiles_w };
    // SAFETY: both schedules write every output row of every channel and image (the output
    // transform covers rows 2ty and 2ty + 1 < h and every column of them).
    let mut out = unsafe { crate::uninit_output(b * o * h * w) };
    if b * tiles_h * tiles_w <= WHOLE_BATCH_TILES && 16 * (c + o) * b * tiles_h * tiles_w <= WHOLE_BATCH_ELEMENTS {
        g.whole_batch(xd, u, bias, b, tiles_h, &mut out);
        return Tensor::from_vec(out, (b, o, h, w), device);
    }
    let rows_per_block = (BLOCK_ELEMENTS / (16 * c.max(o) * tiles_w).max(1)).clamp(1, tiles_h);
    let base = SharedOut::new(&mut out);
    crate::blocks::for_row_blocks(b, tiles_h, rows_per_block, 4 * b * o * c * h * w, |img, rows, parallelism| {
        // SAFETY: image `img`'s output starts at img·o·h·w inside `out`; tile rows `rows` are this task's.
        let dst = unsafe { base.add(img * o * h * w) };
        g.block(&xd[img * c * h * w..(img + 1) * c * h * w], u, bias, rows, dst, parallelism);
    });
    Tensor::from_vec(out, (b, o, h, w), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Convolutions from several threads at once, each on the pool (as a UNet's forward runs):
    /// a pool thread waiting inside one may run another's task, which must not find this thread's
    /// buffers borrowed. Every result equals the same convolution run alone.
    #[test]
    fn concurrent_calls_on_the_pool() -> Result<()> {
        let d = Device::Cpu;
        let cases: Vec<(Tensor, Tensor, Vec<f32>)> = (0..4)
            .map(|i| -> Result<_> {
                let (c, o) = (32 + 8 * i, 24 + 8 * i);
                Ok((Tensor::randn(0f32, 1., (2, c, 24, 24), &d)?, Tensor::randn(0f32, 0.1, (o, c, 3, 3), &d)?, vec![0.1; o]))
            })
            .collect::<Result<_>>()?;
        let alone: Vec<Vec<f32>> = cases.iter().map(|(x, w, b)| conv3x3(x, w, b)?.flatten_all()?.to_vec1()).collect::<Result<_>>()?;
        std::thread::scope(|s| {
            let handles: Vec<_> = cases
                .iter()
                .map(|(x, w, b)| s.spawn(move || -> Result<Vec<Vec<f32>>> { (0..10).map(|_| crate::on_pool(|| conv3x3(x, w, b)?.flatten_all()?.to_vec1())).collect() }))
                .collect();
            for (h, want) in handles.into_iter().zip(&alone) {
                for got in h.join().expect("no thread panicked")? {
                    assert_eq!(&got, want);
                }
            }
            Ok(())
        })
    }

    #[test]
    fn equals_direct_convolution() -> Result<()> {
        let d = Device::Cpu;
        // Odd and even sizes (partial edge tiles); the whole batch at once and in row blocks.
        for (b, c, o, h, w) in [(2, 3, 5, 7, 6), (1, 16, 8, 8, 9), (2, 64, 24, 33, 64)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &d)?;
            let wt = Tensor::randn(0f32, 0.1, (o, c, 3, 3), &d)?;
            let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.1 - 0.3).collect();
            let a = conv3x3(&x, &wt, &bias)?;
            let r = x.conv2d(&wt, 1, 1, 1, 1)?.broadcast_add(&Tensor::from_slice(&bias, (1, o, 1, 1), &d)?)?;
            assert_eq!(a.dims(), r.dims());
            let rel = ((&a - &r)?.sqr()?.sum_all()?.sqrt()? / r.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
            assert!(rel < 1e-5, "b {b} c {c} o {o} {h}x{w}: relative L2 {rel}");
        }
        Ok(())
    }
}
