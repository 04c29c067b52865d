//! 3×3, stride-1, padding-1 convolution by Winograd's minimal filtering on the CPU: F(4×4, 3×3),
//! or F(2×2, 3×3) for small latents.
//!
//! Every 3×3 convolution in the SDXL UNet and VAE is of this kind, and on the CPU they were the
//! largest op after the linear layers (BENCHMARKS.md, per-op table). im2col + GEMM spends 9·c
//! multiply-adds per output; F(m×m, 3×3) transforms (m + 2)² input tiles, V = Bᵀ d B, and the
//! weights, U = G g Gᵀ, multiplies them elementwise as (m + 2)² GEMMs `M[ξ] = U[ξ] · V[ξ]` over
//! channels, and transforms back, Y = Aᵀ M A: F(2×2) spends 4·c multiply-adds per output (16
//! products per 2×2 tile), F(4×4) 2.25·c (36 per 4×4 tile). Tiles run in blocks of whole tile
//! rows in parallel, as in `conv.rs`, or, for small latents, all at once. F(2×2)'s coefficients
//! are 0, ±1 and ½ (relative L2 error around 1e-7 against candle's convolution); F(4×4)'s, with
//! points 0, ±1, ±2, reach 8 and 1/24 (around 1e-6 to 3e-6, tested up to 256 input channels).
//! Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.

use std::cell::RefCell;

use candle_core::{Result, Tensor};

use crate::blocks::SharedOut;
use rayon::prelude::*;

/// Target size of one task's transformed inputs, in f32 elements (2 MiB).
const BLOCK_ELEMENTS: usize = 1 << 19;

/// The output tile: F(2×2, 3×3) on 4×4 input tiles (16 products for 4 outputs) or F(4×4, 3×3) on
/// 6×6 tiles (36 products for 16 outputs: 2.25 multiply-adds per output and input channel instead
/// of 4, and fewer transformed inputs to write and read). F(4×4)'s transforms have coefficients up
/// to 8 and 1/24, so its rounding error is larger (relative L2 around 1e-6 in f32 on random data,
/// tested below against candle's convolution); its weight transform is 4× the weight's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    /// Output pixels per tile side.
    fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Products per tile: the input tile's area.
    fn planes(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
}

thread_local! {
    /// Per thread: transformed inputs, then the products, reused across calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` on this thread's scratch, grown to `v_len` transformed-input and `m_len` product
/// elements (their contents are stale: `f` writes before it reads). Scratch up to
/// `KEPT_SCRATCH_ELEMENTS` in all is kept between calls, so that its pages are not faulted in
/// again; larger (the whole-batch path's, up to 64 MB) is the call's own and freed on return, so
/// that it does not stay resident beside the later, larger activations of a step. (The part of it
/// over glibc's 32 MB mmap threshold, `weights::tune_allocator`, returns its pages at once; a
/// smaller part goes back to the heap.)
///
/// Kept buffers are taken out of the cell for the call and put back after it, so that a call
/// re-entered on this thread (a pool thread waiting inside `f` may run another convolution's
/// task) gets buffers of its own instead of a borrow panic.
fn with_scratch<R>(v_len: usize, m_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let keep = v_len + m_len <= KEPT_SCRATCH_ELEMENTS;
    // SAFETY (the call's own buffers): `f` writes every element before it reads it, as the
    // contract above says of the kept ones, whose contents are stale too.
    let (mut v, mut m) = if keep { SCRATCH.with(|s| s.take()) } else { unsafe { (crate::uninit_output(v_len), crate::uninit_output(m_len)) } };
    if v.len() < v_len {
        v.resize(v_len, 0.0);
    }
    if m.len() < m_len {
        m.resize(m_len, 0.0);
    }
    let r = f(&mut v[..v_len], &mut m[..m_len]);
    // Grown by calls of different shapes, the pair can exceed the bound; then it is dropped.
    if keep && v.len() + m.len() <= KEPT_SCRATCH_ELEMENTS {
        SCRATCH.with(|s| s.replace((v, m)));
    }
    r
}

/// Transforms the weights `wd` (`[o][c][3][3]`) chunk by chunk of `o_chunk` output channels into
/// `buf`, and hands each chunk to `f` as (first channel, channel count, its `[planes][n][c]`).
fn for_weight_chunks(tile: Tile, wd: &[f32], o: usize, c: usize, o_chunk: usize, buf: &mut [f32], mut f: impl FnMut(usize, usize, &[f32])) {
    for o_first in (0..o).step_by(o_chunk) {
        let n = o_chunk.min(o - o_first);
        let u = &mut buf[..tile.planes() * n * c];
        transform_weights(tile, &wd[o_first * 9 * c..(o_first + n) * 9 * c], n, c, u);
        f(o_first, n, u);
    }
}

/// U = G g Gᵀ for every (o, c) into `u`: `[planes][o][c]`. Blocks of output channels transform
/// in parallel, each into its rows of the planes.
fn transform_weights(tile: Tile, w: &[f32], o: usize, c: usize, u: &mut [f32]) {
    let planes = tile.planes();
    let block = (o / (4 * rayon::current_num_threads()).max(1)).max(1);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..o.div_ceil(block)).map(|_| Vec::with_capacity(planes)).collect();
    for plane in u[..planes * o * c].chunks_mut(o * c) {
        for (t, rows) in tasks.iter_mut().zip(plane.chunks_mut(block * c)) {
            t.push(rows);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(bi, mut planes)| {
        let mut taps = vec![0f32; 27 * c];
        let rows = planes[0].len() / c;
        for r in 0..rows {
            let oi = bi * block + r;
            let kernel = &w[oi * 9 * c..(oi + 1) * 9 * c];
            match tile {
                Tile::F2 => weight_row(kernel, &mut taps, &mut planes, r * c, c),
                Tile::F4 => weight_row4(kernel, &mut taps, &mut planes, r * c, c),
            }
        }
    });
}

/// F(4×4, 3×3)'s G applied to one column (x0, x1, x2) of kernel rows, elementwise over input
/// channels, into the six outputs.
#[inline(always)]
fn g6(x0: &[f32], x1: &[f32], x2: &[f32], out: [&mut [f32]; 6]) {
    let c = x0.len();
    let [o0, o1, o2, o3, o4, o5] = out;
    let (x1, x2, o0, o1, o2, o3, o4, o5) = (&x1[..c], &x2[..c], &mut o0[..c], &mut o1[..c], &mut o2[..c], &mut o3[..c], &mut o4[..c], &mut o5[..c]);
    for i in 0..c {
        let (a, b, d) = (x0[i], x1[i], x2[i]);
        o0[i] = a * 0.25;
        o1[i] = (a + b + d) * (-1.0 / 6.0);
        o2[i] = (a - b + d) * (-1.0 / 6.0);
        o3[i] = a * (1.0 / 24.0) + b * (1.0 / 12.0) + d * (1.0 / 6.0);
        o4[i] = a * (1.0 / 24.0) - b * (1.0 / 12.0) + d * (1.0 / 6.0);
        o5[i] = d;
    }
}

/// One output channel's kernels `w` (`[c][3][3]`) laid out tap-major into `g` (`[9][c]`).
#[inline(always)]
fn tap_major(w: &[f32], g: &mut [f32], c: usize) {
    for (ci, kernel) in w[..9 * c].chunks_exact(9).enumerate() {
        for (tap, &v) in kernel.iter().enumerate() {
            g[tap * c + ci] = v;
        }
    }
}

crate::simd::multiversion! {
    /// F(4×4, 3×3)'s U = G g Gᵀ for one output channel (`w` is `[c][3][3]`) into
    /// `planes[ξ][at..at + c]`, tap-major as `weight_row`.
    fn weight_row4(w: &[f32], taps: &mut [f32], planes: &mut [&mut [f32]], at: usize, c: usize) {
        let (g, t) = taps.split_at_mut(9 * c);
        tap_major(w, g, c);
        // t = G g: t[j][k] (j the kernel column, k the row of G) at (6j + k)·c.
        for (j, tj) in t[..18 * c].chunks_exact_mut(6 * c).enumerate() {
            let [a, b, d, e, f, h]: [&mut [f32]; 6] = {
                let mut it = tj.chunks_exact_mut(c);
                std::array::from_fn(|_| it.next().expect("six rows"))
            };
            g6(&g[j * c..(j + 1) * c], &g[(3 + j) * c..(4 + j) * c], &g[(6 + j) * c..(7 + j) * c], [a, b, d, e, f, h]);
        }
        // U[k][l] = Σ_j t[j][k] G[l][j]: G applied again, along the kernel columns.
        for k in 0..6 {
            let mut it = planes[6 * k..6 * k + 6].iter_mut();
            let out: [&mut [f32]; 6] = std::array::from_fn(|_| &mut it.next().expect("six planes")[at..at + c]);
            g6(&t[k * c..(k + 1) * c], &t[(6 + k) * c..(7 + k) * c], &t[(12 + k) * c..(13 + k) * c], out);
        }
    }
}

crate::simd::multiversion! {
    /// One output channel: `w` is `[c][3][3]`; U[ξ] goes to `planes[ξ][at..at + c]`. The taps are
    /// first laid out tap-major (`taps[tap][ci]`) so that both halves of the transform run as
    /// whole-row vector operations over input channels (a loop over `ci` that writes sixteen
    /// planes per channel did not vectorise: the weight transform took half of a 16×16 call).
    fn weight_row(w: &[f32], taps: &mut [f32], planes: &mut [&mut [f32]], at: usize, c: usize) {
        let (g, t) = taps.split_at_mut(9 * c);
        tap_major(w, g, c);
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
    /// The caller's transformed weights (a chunk of them), reused across calls.
    static WEIGHTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The largest chunk of transformed weights (f32 elements, 32 MB), kept in the thread's buffer
/// between calls; larger transforms run in chunks of output channels. Full-size SDXL at 1024² in
/// f16 peaked at 7,633–7,695 MiB with 64 MB chunks (and larger kept scratch), above issue 19's
/// bound of 1.15× its checkpoint (7,610 MiB); the chunks' cost is a repeated input transform, a
/// pass over c·tiles values beside GEMMs of up to 8.4 M multiply-adds per tile (5–8 M at SDXL's shapes). In tests, small enough
/// that most cases run in several chunks.
#[cfg(not(test))]
const REUSED_WEIGHT_ELEMENTS: usize = 1 << 23;
#[cfg(test)]
const REUSED_WEIGHT_ELEMENTS: usize = 1 << 12;

/// Fewest tiles in a row block, for transformed weights of `u_elements` f32: each block's GEMMs
/// read all of them, and blocks sized by `BLOCK_ELEMENTS` alone held one tile row (16 tiles) at
/// 640 channels. Timed in alternation in one process (F(4×4), 2 threads, AMD EPYC): with 128
/// tiles 640 → 640 at 2×64×64 took 104 against 145 ms, 320 → 320 at 2×128×128 181 against 224;
/// with weights under 8 MB, 128 tiles lost (320 → 160 at 2×64×64: 27.1 against 23.6 ms) where
/// 64 did not (24.9).
fn min_block_tiles(u_elements: usize) -> usize {
    if u_elements > 1 << 21 {
        128
    } else {
        64
    }
}

/// Batches with at most this many tiles in all (2×32×32 pixels with F(2×2), 2×64×64 with F(4×4))
/// run as one set of GEMMs (`Geometry::whole_batch`) rather than in row blocks.
const WHOLE_BATCH_TILES: usize = 512;
/// ... provided their transformed inputs and products fit in this many f32 elements (64 MiB,
/// freed on return above `KEPT_SCRATCH_ELEMENTS`). With 16 MiB, full-size SDXL's 1280 → 1280 convolutions at 2×32×32
/// ran in row blocks of 8 tiles each, 1.8× slower (F(4×4): 232 against 130 ms).
const WHOLE_BATCH_ELEMENTS: usize = 1 << 24;
/// Most transformed inputs and products (f32 elements, 16 MiB) that one row block's task holds,
/// unless a single tile row is larger (e.g. 512 → 512 channels at 512 pixels wide: 19 MB). Full-size SDXL's 960 → 320 convolutions at
/// 2×128×128 had 128-tile blocks of 24 MB on each thread, kept to the end of the step, where its
/// peak memory is; 64-tile blocks ran as fast (352 against 350 ms, in alternation).
/// In tests, small enough that the larger cases run in single-row blocks.
#[cfg(not(test))]
const SCRATCH_ELEMENTS: usize = 1 << 22;
#[cfg(test)]
const SCRATCH_ELEMENTS: usize = 1 << 16;
/// The most scratch a thread keeps between calls (f32 elements, 32 MiB). In tests, small enough
/// that the larger cases run on the call's own buffers.
#[cfg(not(test))]
const KEPT_SCRATCH_ELEMENTS: usize = 1 << 23;
#[cfg(test)]
const KEPT_SCRATCH_ELEMENTS: usize = 1 << 16;

#[derive(Clone, Copy)]
struct Geometry {
    tile: Tile,
    c: usize,
    h: usize,
    w: usize,
    /// Output channels of this call's chunk of the weight.
    o: usize,
    /// Output channels of the whole output, and where the chunk's first one is in it.
    o_all: usize,
    o_first: usize,
    tiles_w: usize,
}

impl Geometry {
    /// Scratch for one tile row's input transform.
    fn input_scratch(&self) -> Vec<f32> {
        vec![0f32; 48 * (self.tiles_w + 1)]
    }

    /// Scratch for one tile row's output transform.
    fn output_scratch(&self) -> Vec<f32> {
        vec![0f32; 24 * self.tiles_w]
    }

    /// The input transform of tile row `ty` of one channel plane into `v[ξ·plane_stride + at..]`.
    #[allow(clippy::too_many_arguments)]
    fn input_row(&self, plane: &[f32], ty: usize, scratch: &mut [f32], v: &mut [f32], plane_stride: usize, at: usize) {
        match self.tile {
            Tile::F2 => input_tile_row(plane, self.h, self.w, ty, self.tiles_w, scratch, v, plane_stride, at),
            Tile::F4 => input_tile_row4(plane, self.h, self.w, ty, self.tiles_w, scratch, v, plane_stride, at),
        }
    }

    /// The output transform of tile row `ty` of one output channel, from `m[ξ·plane_stride + at..]`.
    /// `plane` is `[h, w]`, `h` its height in rows (the image's, or a tile row's own rows).
    #[allow(clippy::too_many_arguments)]
    fn output_row(&self, m: &[f32], plane_stride: usize, at: usize, bias: f32, scratch: &mut [f32], plane: &mut [f32], h: usize, ty: usize) {
        match self.tile {
            Tile::F2 => output_tile_row(m, plane_stride, at, self.tiles_w, bias, scratch, plane, h, self.w, ty),
            Tile::F4 => output_tile_row4(m, plane_stride, at, self.tiles_w, bias, scratch, plane, h, self.w, ty),
        }
    }

    /// V = Bᵀ d B for the tiles of tile rows `rows` of one image: `v[ξ][ci][t]`.
    fn transform_inputs(&self, x: &[f32], rows: std::ops::Range<usize>, v: &mut [f32]) {
        let tw = self.tiles_w;
        let p = rows.len() * tw;
        let mut scratch = self.input_scratch();
        for ci in 0..self.c {
            let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for (r, ty) in rows.clone().enumerate() {
                self.input_row(plane, ty, &mut scratch, v, self.c * p, ci * p + r * tw);
            }
        }
    }

    /// Y = Aᵀ M A plus bias into the output rows of tile rows `rows` of one image `[o, h, w]`.
    fn transform_outputs(&self, m: &[f32], rows: std::ops::Range<usize>, bias: &[f32], out: SharedOut) {
        let (h, w, tw) = (self.h, self.w, self.tiles_w);
        let p = rows.len() * tw;
        let mut scratch = self.output_scratch();
        #[allow(clippy::needless_range_loop)] // oi also offsets the output plane
        for oi in 0..self.o {
            for (r, ty) in rows.clone().enumerate() {
                // The output rows of tile row ty alone, as rows 0.. of a plane of their height.
                let y0 = ty * self.tile.m();
                let rows_here = self.tile.m().min(h - y0);
                // SAFETY: rows y0 .. y0 + rows_here of channel oi belong to this task alone.
                let plane = unsafe { std::slice::from_raw_parts_mut(out.ptr().add((oi * h + y0) * w), rows_here * w) };
                self.output_row(m, self.o * p, oi * p + r * tw, bias[oi], &mut scratch, plane, rows_here, 0);
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
        // SAFETY: U[ξ] lies inside `u` ([planes][o][c]); the rest is the caller's promise.
        unsafe { product.run(parallelism) }
    }

    /// All images' tiles as one set of GEMMs (one per plane), for small latents. Split into row
    /// blocks, a 2×16×16 input gives the GEMMs only 32–64 tiles each, too few to repay reading
    /// U[ξ] (the weights' transform, 16/9 or 4 times their size) once per block; here each U[ξ] is
    /// read once and the GEMMs run in parallel with all tiles. Inputs are transformed in parallel
    /// over channels, outputs over output channels. Layouts are channel-major, `v[ci][ξ][t]` and
    /// `m[oi][ξ][t]`, so that each task owns one contiguous range; the GEMMs read and write them
    /// with a row stride of all planes.
    ///
    /// `self` covers all output channels; the weights `wd` are transformed into `u_buf` in chunks
    /// of `o_chunk` output channels, each multiplied with the inputs' transform, made once.
    #[allow(clippy::too_many_arguments)]
    fn whole_batch(&self, x: &[f32], wd: &[f32], bias: &[f32], b: usize, tiles_h: usize, o_chunk: usize, u_buf: &mut [f32], out: &mut [f32]) {
        let (c, h, w, tw, o) = (self.c, self.h, self.w, self.tiles_w, self.o);
        let planes = self.tile.planes();
        let tiles = tiles_h * tw;
        let p = b * tiles;
        with_scratch(planes * c * p, planes * o_chunk * p, |v, m| {
            let channels_per_task = c.div_ceil(4 * rayon::current_num_threads()).max(1);
            v.par_chunks_mut(planes * p * channels_per_task).enumerate().for_each(|(k, vs)| {
                let mut scratch = self.input_scratch();
                for (i, vc) in vs.chunks_mut(planes * p).enumerate() {
                    let ci = k * channels_per_task + i;
                    for img in 0..b {
                        let plane = &x[(img * c + ci) * h * w..][..h * w];
                        for ty in 0..tiles_h {
                            self.input_row(plane, ty, &mut scratch, vc, p, img * tiles + ty * tw);
                        }
                    }
                }
            });
            for_weight_chunks(self.tile, wd, o, c, o_chunk, u_buf, |o_first, n, u| {
                let chunk = Geometry { o: n, o_first, ..*self };
                let (vp, mp) = (SharedOut::new(v), SharedOut::new(m));
                (0..planes).into_par_iter().for_each(|xi| {
                    // SAFETY: v[ξ] is [c, p] and m[ξ] [n, p] with row stride planes·p, inside v
                    // and m; each ξ writes only its own rows of m.
                    unsafe { chunk.product(u, xi, vp.ptr().add(xi * p), mp.ptr().add(xi * p), p, planes * p, gemm::Parallelism::None) }
                });
                let m = &*m;
                let channels = o_first..o_first + n;
                out.par_chunks_mut(h * w).enumerate().filter(|(j, _)| channels.contains(&(j % o))).for_each_init(|| self.output_scratch(), |scratch, (j, plane)| {
                    let (img, oi) = (j / o, j % o - o_first);
                    for ty in 0..tiles_h {
                        self.output_row(&m[oi * planes * p..(oi + 1) * planes * p], p, img * tiles + ty * tw, bias[o_first + oi], scratch, plane, h, ty);
                    }
                });
            });
        });
    }

    fn block(&self, x: &[f32], u: &[f32], bias: &[f32], rows: std::ops::Range<usize>, out: SharedOut, parallelism: gemm::Parallelism) {
        let p = rows.len() * self.tiles_w;
        let (c, o) = (self.c, self.o);
        let planes = self.tile.planes();
        with_scratch(planes * c * p, planes * o * p, |v, m| {
            self.transform_inputs(x, rows.clone(), v);
            for xi in 0..planes {
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

crate::simd::multiversion! {
    /// F(4×4, 3×3)'s 6×6 tiles of tile row `ty` of one channel plane, all `tw` at once: the six
    /// input rows 4ty − 1 … 4ty + 4 are split into four column phases (column 4k + r − 1 of the
    /// row in phase r), so that a tile's six columns are phases 0–3 at k = tx and phases 0–1 at
    /// k = tx + 1, and both transforms run as vector operations over tiles. Writes
    /// `v[ξ·plane_stride + at + tx]`.
    #[allow(clippy::too_many_arguments)]
    fn input_tile_row4(plane: &[f32], h: usize, w: usize, ty: usize, tw: usize, scratch: &mut [f32], v: &mut [f32], plane_stride: usize, at: usize) {
        let n = tw + 1;
        let row_len = 4 * n;
        let (d, t) = scratch[..48 * n].split_at_mut(24 * n);
        for i in 0..6 {
            let iy = 4 * ty as isize - 1 + i as isize;
            let row = &mut d[i * row_len..(i + 1) * row_len];
            if iy < 0 || iy >= h as isize {
                row.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            for r in 0..4 {
                let phase = &mut row[r * n..(r + 1) * n];
                for (k, x) in phase.iter_mut().enumerate() {
                    let col = 4 * k + r;
                    // col is the padded column: the input's column col − 1.
                    *x = if col >= 1 && col - 1 < w { src[col - 1] } else { 0.0 };
                }
            }
        }
        // Bᵀ across the six rows, over every column at once.
        {
            let rows: [&[f32]; 6] = std::array::from_fn(|i| &d[i * row_len..(i + 1) * row_len]);
            let mut it = t.chunks_exact_mut(row_len);
            let out: [&mut [f32]; 6] = std::array::from_fn(|_| it.next().expect("six rows"));
            bt6(rows, out);
        }
        // B across the columns of each transformed row: tile tx's columns are phase 0–3 at tx
        // and phases 0–1 at tx + 1.
        for i in 0..6 {
            let row = &t[i * row_len..(i + 1) * row_len];
            let cols: [&[f32]; 6] = [&row[..tw], &row[n..n + tw], &row[2 * n..2 * n + tw], &row[3 * n..3 * n + tw], &row[1..1 + tw], &row[n + 1..n + 1 + tw]];
            // The six planes 6i … 6i + 5 at offset `at`, plane_stride apart.
            let base = &mut v[6 * i * plane_stride + at..];
            let (mut rest, mut out): (&mut [f32], [&mut [f32]; 6]) = (base, Default::default());
            for (j, slot) in out.iter_mut().enumerate() {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(if j < 5 { plane_stride } else { tw });
                *slot = &mut head[..tw];
                rest = tail;
            }
            bt6(cols, out);
        }
    }
}

/// F(4×4, 3×3)'s Bᵀ applied elementwise to six rows.
#[inline(always)]
fn bt6(d: [&[f32]; 6], out: [&mut [f32]; 6]) {
    let n = out[0].len();
    let [d0, d1, d2, d3, d4, d5] = d;
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    let [o0, o1, o2, o3, o4, o5] = out;
    let (o0, o1, o2, o3, o4, o5) = (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    for k in 0..n {
        let (a, b, c, e, f, g) = (d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]);
        o0[k] = 4.0 * a - 5.0 * c + f;
        o1[k] = -4.0 * (b + c) + e + f;
        o2[k] = 4.0 * (b - c) - e + f;
        o3[k] = 2.0 * (e - b) - c + f;
        o4[k] = 2.0 * (b - e) - c + f;
        o5[k] = 4.0 * b - 5.0 * e + g;
    }
}

crate::simd::multiversion! {
    /// F(4×4, 3×3)'s Aᵀ M A for the `tw` tiles of tile row `ty` of one output channel, plus
    /// `bias`, into rows 4ty … 4ty + 3 of `plane` (`[h, w]`).
    #[allow(clippy::too_many_arguments)]
    fn output_tile_row4(m: &[f32], plane_stride: usize, at: usize, tw: usize, bias: f32, scratch: &mut [f32], plane: &mut [f32], h: usize, w: usize, ty: usize) {
        let row = |xi: usize| &m[xi * plane_stride + at..][..tw];
        // s[i][j] = (Aᵀ M)[i][j] over tiles, at (6i + j)·tw.
        let s = &mut scratch[..24 * tw];
        for j in 0..6 {
            let (m0, m1, m2, m3, m4, m5) = (row(j), row(6 + j), row(12 + j), row(18 + j), row(24 + j), row(30 + j));
            let (s01, s23) = s.split_at_mut(12 * tw);
            let (s0, s1) = s01.split_at_mut(6 * tw);
            let (s2, s3) = s23.split_at_mut(6 * tw);
            let (s0, s1, s2, s3) = (&mut s0[j * tw..(j + 1) * tw], &mut s1[j * tw..(j + 1) * tw], &mut s2[j * tw..(j + 1) * tw], &mut s3[j * tw..(j + 1) * tw]);
            for tx in 0..tw {
                let (a, b, c, d, e, f) = (m0[tx], m1[tx], m2[tx], m3[tx], m4[tx], m5[tx]);
                s0[tx] = a + b + c + d + e;
                s1[tx] = (b - c) + 2.0 * (d - e);
                s2[tx] = (b + c) + 4.0 * (d + e);
                s3[tx] = (b - c) + 8.0 * (d - e) + f;
            }
        }
        let full = w / 4;
        for i in 0..4 {
            let oy = 4 * ty + i;
            if oy >= h {
                break;
            }
            let si = &s[6 * i * tw..6 * (i + 1) * tw];
            let col = |j: usize| &si[j * tw..(j + 1) * tw];
            let (m0, m1, m2, m3, m4, m5) = (col(0), col(1), col(2), col(3), col(4), col(5));
            let dst = &mut plane[oy * w..(oy + 1) * w];
            let y = |tx: usize| -> [f32; 4] {
                let (a, b, c, d, e, f) = (m0[tx], m1[tx], m2[tx], m3[tx], m4[tx], m5[tx]);
                [a + b + c + d + e + bias, (b - c) + 2.0 * (d - e) + bias, (b + c) + 4.0 * (d + e) + bias, (b - c) + 8.0 * (d - e) + f + bias]
            };
            for (tx, out) in dst[..4 * full].chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&y(tx));
            }
            if !w.is_multiple_of(4) {
                let last = y(full);
                dst[4 * full..].copy_from_slice(&last[..w % 4]);
            }
        }
    }
}

/// `conv2d(x [b, c, h, w], weight [o, c, 3, 3], bias)` with stride 1 and padding 1; f32 on the CPU.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &[f32]) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    conv3x3_tiled(x, weight, bias, choose_tile(b, h, w))
}

/// Fewest F(4×4) tiles in a call (all images) for F(4×4, 3×3) to be chosen. With fewer, each
/// transformed weight (36 planes, 4× the weight) is read by too few tiles to repay writing it:
/// batch 2 at 8×8 (8 tiles) lost, 640 → 640 by 0.71× and 128 → 128 by 0.93×, and won from 16×16
/// (32 tiles: 512 → 512 and 640 → 640 by 1.23×; `examples/conv_tiles.rs`, AMD EPYC, 2 threads).
const F4_MIN_TILES: usize = 32;

/// The tile for a convolution's shape: F(4×4, 3×3) from `F4_MIN_TILES` tiles, where it was
/// measured 1.2–1.7× faster than F(2×2) (`examples/conv_tiles.rs`: 16×16 to 128×128 latents,
/// 128 to 2560 channels), F(2×2, 3×3) below.
pub fn choose_tile(b: usize, h: usize, w: usize) -> Tile {
    if b * h.div_ceil(4) * w.div_ceil(4) >= F4_MIN_TILES {
        Tile::F4
    } else {
        Tile::F2
    }
}

/// `conv3x3` with the given tile.
pub fn conv3x3_tiled(x: &Tensor, weight: &Tensor, bias: &[f32], tile: Tile) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    let (b, xc, h, w) = x.dims4()?;
    if (kh, kw) != (3, 3) || xc != c || bias.len() != o {
        candle_core::bail!("winograd: expected a [o, {xc}, 3, 3] weight and {o} biases, got {:?} and {}", weight.dims(), bias.len());
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (xs, _) = x.storage_and_layout();
    let (ws, _) = weight.storage_and_layout();
    let (xd, wd) = (crate::host_f32(&xs, &x, "winograd")?, crate::host_f32(&ws, &weight, "winograd")?);
    // The weights are transformed in chunks of output channels of at most 32 MB, into this
    // thread's buffer, kept between calls: the widest convolutions (full-size SDXL's 2560 → 1280:
    // 210 MB as F(2×2), 470 MB as F(4×4)) would otherwise add their whole transform to the peak
    // memory and fault its fresh pages in on every call. The whole-batch path transforms the
    // inputs once for all chunks; in row blocks each chunk transforms them again, a pass over
    // c·tiles values beside the chunk's GEMMs of up to 8.4 M multiply-adds per tile.
    // The buffer is taken out of its cell for the call (and put back below), so that a call
    // re-entered on this thread while it waits for the pool gets one of its own instead of a
    // borrow panic.
    let planes = tile.planes();
    let chunks = (planes * o * c).div_ceil(REUSED_WEIGHT_ELEMENTS).clamp(1, o);
    let o_chunk = o.div_ceil(chunks);
    let mut transformed = WEIGHTS.with(|cell| cell.take());
    if transformed.len() < planes * o_chunk * c {
        transformed.resize(planes * o_chunk * c, 0.0);
    }
    // SAFETY: the chunks together cover every output channel, and each schedule writes every
    // output row of its chunk's channels in every image (the output transform covers the rows of
    // its tile row that are < h and every column of them).
    let mut out = unsafe { crate::uninit_output(b * o * h * w) };
    let (tiles_h, tiles_w) = (h.div_ceil(tile.m()), w.div_ceil(tile.m()));
    let g = Geometry { tile, c, h, w, o, o_all: o, o_first: 0, tiles_w };
    let p = b * tiles_h * tiles_w;
    if p <= WHOLE_BATCH_TILES && planes * (c + o_chunk) * p <= WHOLE_BATCH_ELEMENTS {
        g.whole_batch(xd, wd, bias, b, tiles_h, o_chunk, &mut transformed, &mut out);
    } else {
        for_weight_chunks(tile, wd, o, c, o_chunk, &mut transformed, |o_first, n, u| {
            Geometry { o: n, o_first, ..g }.row_blocks(xd, u, &bias[o_first..o_first + n], b, &mut out);
        });
    }
    WEIGHTS.with(|cell| cell.replace(transformed));
    Tensor::from_vec(out, (b, o, h, w), x.device())
}

impl Geometry {
    /// The convolution of the chunk from its transformed weights `u` (`[planes][o][c]`) into its
    /// channels of `out` (`[b, o_all, h, w]`), in blocks of tile rows.
    fn row_blocks(&self, xd: &[f32], u: &[f32], bias: &[f32], b: usize, out: &mut [f32]) {
        let (c, h, w, o, tiles_w) = (self.c, self.h, self.w, self.o, self.tiles_w);
        let tiles_h = h.div_ceil(self.tile.m());
        let planes = self.tile.planes();
        let min_rows = min_block_tiles(planes * o * c).div_ceil(tiles_w);
        let max_rows = (SCRATCH_ELEMENTS / (planes * (c + o) * tiles_w).max(1)).max(1);
        let rows_per_block = (BLOCK_ELEMENTS / (planes * c.max(o) * tiles_w).max(1)).max(min_rows).min(max_rows).clamp(1, tiles_h);
        let base = SharedOut::new(out);
        crate::blocks::for_row_blocks(b, tiles_h, rows_per_block, 4 * b * o * c * h * w, |img, rows, parallelism| {
            // SAFETY: the chunk's first channel of image `img` starts at (img·o_all + o_first)·h·w
            // inside `out`; tile rows `rows` of its channels are this task's.
            let dst = unsafe { base.add((img * self.o_all + self.o_first) * h * w) };
            self.block(&xd[img * c * h * w..(img + 1) * c * h * w], u, bias, rows, dst, parallelism);
        });
    }
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
        // Odd and even sizes (partial edge tiles, of each size of F(4×4)'s remainder); the whole
        // batch at once, and in row blocks (several per image, the last ragged); the last two cases
        // in weight chunks that do not divide the output channels (3 + 3 + 1 with F(4×4)).
        for (b, c, o, h, w) in [(2, 3, 5, 7, 6), (1, 16, 8, 8, 9), (2, 64, 24, 33, 64), (1, 8, 8, 10, 11), (2, 256, 16, 67, 73), (2, 40, 7, 9, 10), (2, 40, 7, 67, 73)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &d)?;
            let wt = Tensor::randn(0f32, 0.1, (o, c, 3, 3), &d)?;
            let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.1 - 0.3).collect();
            let r = x.conv2d(&wt, 1, 1, 1, 1)?.broadcast_add(&Tensor::from_slice(&bias, (1, o, 1, 1), &d)?)?;
            for tile in [Tile::F2, Tile::F4] {
                let a = conv3x3_tiled(&x, &wt, &bias, tile)?;
                assert_eq!(a.dims(), r.dims());
                let rel = ((&a - &r)?.sqr()?.sum_all()?.sqrt()? / r.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
                eprintln!("{tile:?} b {b} c {c} o {o} {h}x{w}: relative L2 {rel:e}");
                assert!(rel < 1e-5, "{tile:?} b {b} c {c} o {o} {h}x{w}: relative L2 {rel}");
            }
        }
        Ok(())
    }
}
