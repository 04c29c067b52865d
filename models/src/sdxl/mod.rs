//! Stable Diffusion XL, module for module as diffusers builds it.

pub mod config;
pub mod resnet;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod vae;

pub use config::{AutoencoderKlConfig, UNet2DConditionConfig};
pub use unet::{AddedConditions, UNet2DConditionModel};
pub use vae::{AutoencoderKl, VaeTiling};
