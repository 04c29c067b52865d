//! Stable Diffusion XL, module for module as diffusers builds it.

pub mod config;
pub mod controlnet;
pub mod resnet;
pub mod t2i_adapter;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod vae;

pub use config::{AutoencoderKlConfig, UNet2DConditionConfig};
pub use controlnet::{ControlInput, ControlNetConfig, ControlNetModel};
pub use t2i_adapter::{T2IAdapter, T2IAdapterConfig};
pub use unet::{AddedConditions, ControlResiduals, UNet2DConditionModel};
pub use vae::{AutoencoderKl, VaeTiling};
