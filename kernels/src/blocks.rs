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
