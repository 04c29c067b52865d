//! Stable Diffusion XL, equal to diffusers: the pipeline and its schedulers, both text encoders
//! with A1111's prompt syntax and tokenizers, finding and reading models (diffusers folders,
//! single-file checkpoints, HF repos), and the noise that makes seeds match torch.
//!
//! Owns text → latents → image for one request. Uses the model code (`loramix-models`), the
//! weights readers and the hub; it knows nothing of LoRAs, mixing or the app: those attach to
//! the UNet's layers from outside through [`pipeline::StepMixer`].

pub mod checkpoint;
pub mod controlnet;
pub mod embedding;
pub mod img2img;
pub mod model;
pub mod pipeline;
pub mod preprocessor;
pub mod prompt;
pub mod prompt_schedule;
pub mod schedulers;
pub mod text;
pub mod tile_grid;
pub mod tokenizer;
pub mod upscale;
pub mod upscale_model;
