//! Model code for LoRAMix on candle.
//!
//! Module paths and weight names mirror diffusers / transformers exactly, so a reader can put a
//! file here beside its Python counterpart, and so LoRA keys (which name those modules) resolve
//! without translation tables. Every linear and convolution that a LoRA can target is an
//! [`adapter::AdaptableLinear`] or [`adapter::AdaptableConv2d`].

pub mod adapter;
pub mod clip;
pub mod esrgan;
pub mod llm;
pub mod vit;
pub mod sdxl;

pub use adapter::{set_seamless, ConvBorders, Seamless, AdaptableConv2d, AdaptableLayer, AdaptableLinear, Adaptable, LayerKind, LowRankBranch, BranchWeights, Route, SharedBasis, SharedLoadings, TokenRouting};
