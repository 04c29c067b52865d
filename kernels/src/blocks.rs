//! Scheduling shared by the CPU convolutions: an output split into blocks of rows per image,
//! each block computed by one task that owns its part of the output.

use std::ops::Range;

use rayon::prelude::*;

/// An output buffer that tasks write in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);
// SAFETY: every user hands each task a part of the buffer no other task writes, and the buffer
// outlives the tasks.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr())
    }

    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }

    /// # Safety
    /// `offset` must stay inside the buffer.
    pub(crate) unsafe fn add(self, offset: usize) -> Self {
        Self(unsafe { self.0.add(offset) })
    }
}

/// Runs `task(image, rows, parallelism)` over blocks of `rows_per_block` of `rows` rows in each of
/// `images` images. With enough blocks to share out they run in parallel, each with a
/// single-threaded GEMM (its working set stays in its core's cache); otherwise one at a time with
/// the GEMM on the pool, unless the whole job (`macs` multiply-adds) is too small to repay waking it.
pub(crate) fn for_row_blocks(images: usize, rows: usize, rows_per_block: usize, macs: usize, task: impl Fn(usize, Range<usize>, gemm::Parallelism) + Sync) {
    let step = rows_per_block.max(1);
    let blocks: Vec<(usize, Range<usize>)> = (0..images).flat_map(|img| (0..rows).step_by(step).map(move |r| (img, r..(r + step).min(rows)))).collect();
    let threads = rayon::current_num_threads();
    if blocks.len() >= 2 * threads {
        blocks.into_par_iter().for_each(|(img, r)| task(img, r, gemm::Parallelism::None));
    } else {
        let parallelism = if macs < crate::linear::SERIAL_MACS || threads < 2 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
        blocks.into_iter().for_each(|(img, r)| task(img, r, parallelism));
    }
}

/// A bias added to every row (`PerColumn`: one value per output column) or every column
/// (`PerRow`) of a product's output.
#[derive(Clone, Copy)]
pub(crate) enum Bias {
    None,
    PerColumn(*const f32),
    PerRow(*const f32),
}

/// One f32 GEMM `dst = lhs · rhs + bias`, in gemm's terms: every operand by its pointer, column
/// stride and row stride. `dst` is only written.
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: *mut f32,
    pub dst_cs: isize,
    pub dst_rs: isize,
    pub bias: Bias,
    pub lhs: *const f32,
    pub lhs_cs: isize,
    pub lhs_rs: isize,
    pub rhs: *const f32,
    pub rhs_cs: isize,
    pub rhs_rs: isize,
}
// SAFETY: `run_split`'s tasks each write their own rows or columns of `dst`; the caller of
// `run_split` promises the buffers outlive the call.
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

impl Product {
    /// The bias is written into `dst` first and the GEMM accumulates onto it, so there is no
    /// second pass over the output; under `run_split` each thread writes its own part just
    /// before its GEMM, while that part is in its cache (a separate fill of a 2048×2560 output
    /// took 1.9 ms of its linear's 12.7).
    ///
    /// # Safety
    /// The operands must address `[m, k]`, `[k, n]` and `[m, n]` matrices inside live buffers,
    /// the bias `n` (per column) or `m` (per row) values, and no other thread may touch `dst`'s
    /// elements during the call.
    pub(crate) unsafe fn run(&self, parallelism: gemm::Parallelism) {
        // SAFETY: the caller's promise: every (i, j) below is inside dst, every bias index inside the bias.
        unsafe {
            match self.bias {
                Bias::None => {}
                Bias::PerColumn(b) => {
                    for i in 0..self.m {
                        let row = self.dst.offset(i as isize * self.dst_rs);
                        if self.dst_cs == 1 {
                            std::ptr::copy_nonoverlapping(b, row, self.n);
                        } else {
                            (0..self.n).for_each(|j| *row.offset(j as isize * self.dst_cs) = *b.add(j));
                        }
                    }
                }
                Bias::PerRow(b) => {
                    for i in 0..self.m {
                        let row = self.dst.offset(i as isize * self.dst_rs);
                        if self.dst_cs == 1 {
                            std::slice::from_raw_parts_mut(row, self.n).fill(*b.add(i));
                        } else {
                            (0..self.n).for_each(|j| *row.offset(j as isize * self.dst_cs) = *b.add(i));
                        }
                    }
                }
            }
            gemm::gemm(
                self.m, self.n, self.k,
                self.dst, self.dst_cs, self.dst_rs, !matches!(self.bias, Bias::None),
                self.lhs, self.lhs_cs, self.lhs_rs,
                self.rhs, self.rhs_cs, self.rhs_rs,
                1.0, 1.0, false, false, false, parallelism,
            );
        }
    }

    /// Runs the product on the pool as one single-threaded GEMM per thread, over equal parts of
    /// the larger of the output's two dimensions; small products (under `SERIAL_MACS`) run on the
    /// calling thread.
    ///
    /// Why not gemm's own threading: on the UNet's shapes with 2 threads, halves computed
    /// independently were 1.05–1.35× faster than gemm's split of the same product (2048×320 →
    /// 2560: 9.0 against 10.0 ms; 512×2560 → 640: 5.2 against 7.1 ms; 154×2048 → 640: 1.6
    /// against 2.6 ms). Splitting the longer side keeps each part's shared operand the smaller
    /// one: by columns each thread packs all of `lhs`, by rows all of `rhs`. Every output is the
    /// same dot product either way.
    ///
    /// # Safety
    /// As for `run`.
    pub(crate) unsafe fn run_split(&self) {
        let threads = rayon::current_num_threads();
        if self.m * self.n * self.k < crate::linear::SERIAL_MACS || threads < 2 {
            // SAFETY: the caller's promise.
            return unsafe { self.run(gemm::Parallelism::None) };
        }
        let by_columns = self.n >= self.m;
        let len = if by_columns { self.n } else { self.m };
        let chunk = len.div_ceil(threads).next_multiple_of(16);
        (0..len.div_ceil(chunk)).into_par_iter().for_each(|i| {
            let (start, end) = (i * chunk, ((i + 1) * chunk).min(len));
            let mut part = *self;
            // SAFETY: the part's operands are sub-matrices of the caller's (columns start..end
            // of dst and rhs, or rows start..end of dst and lhs), and no two parts share an
            // output element.
            unsafe {
                if by_columns {
                    part.n = end - start;
                    part.dst = self.dst.offset(start as isize * self.dst_cs);
                    part.rhs = self.rhs.offset(start as isize * self.rhs_cs);
                    if let Bias::PerColumn(b) = self.bias {
                        part.bias = Bias::PerColumn(b.add(start));
                    }
                } else {
                    part.m = end - start;
                    part.dst = self.dst.offset(start as isize * self.dst_rs);
                    part.lhs = self.lhs.offset(start as isize * self.lhs_rs);
                    if let Bias::PerRow(b) = self.bias {
                        part.bias = Bias::PerRow(b.add(start));
                    }
                }
                part.run(gemm::Parallelism::None);
            }
        });
    }
}
