//! Compute kernels shared by the model code.
//!
//! Each kernel has a plain implementation built from candle ops, which is the reference its
//! fused CPU version (and any CUDA / Metal version behind the features) is tested against.
//! Model code calls one function whatever the device and dtype.

pub mod activation;
pub mod attention;
mod blocks;
pub mod conv;
pub mod finite;
pub mod fused;
pub mod linear;
pub mod norm;
pub mod profile;
mod simd;
pub mod winograd;

pub use activation::geglu;
pub use attention::scaled_dot_product_attention;
pub use conv::conv2d;
pub use finite::{count_non_finite, RawDType};
pub use fused::{attention_hd64, differentiable, lora_branch, set_differentiable};
pub use linear::linear;
pub use norm::{group_norm, layer_norm, GroupNormParams};

/// The f32 values of a contiguous CPU tensor, borrowed from its storage guard (the CPU kernels read
/// their inputs in place). `what` names the kernel in the error.
pub(crate) fn host_f32<'a>(storage: &'a candle_core::Storage, t: &candle_core::Tensor, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => {
            let (a, z) = t.layout().contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: expected a contiguous tensor")))?;
            Ok(&data[a..z])
        }
        _ => candle_core::bail!("{what}: expected f32 on the CPU"),
    }
}
