//! Compute kernels shared by the model code.
//!
//! Each kernel has a plain CPU implementation that is the reference for any accelerated
//! version behind the `cuda` / `metal` features (see the GPU issue). Keeping them in one crate
//! lets the model code call one function whatever the device.

pub mod attention;
pub mod finite;

pub use attention::scaled_dot_product_attention;
pub use finite::{count_non_finite, RawDType};
