//! LoRAMix engine: SDXL text-to-image on candle, equal to diffusers, with LoRAs mixed per layer
//! and per step, and an LLM with activated LoRAs.
//!
//! The engine knows nothing about any UI; the `loramix` binary (`src/bin/loramix/`) and the
//! desktop shell (`src-tauri/`) are thin layers over it. Rooms, each depending only on those
//! above it in this list (and on the shared files: `error`, `device`, `weights`, `rng`, `hub`,
//! `output`, `resample`):
//!
//! - [`sdxl`]: the pipeline, schedulers, text encoding, prompt syntax, model loading;
//! - [`lora`]: LoRA files, their application, the prompt tags and schedules, and the library;
//! - [`eval`]: the miniworld evaluator and image embedders;
//! - [`mix`]: the mixing strategies behind `MixStrategy`;
//! - [`studio`]: settings, PNG metadata, previews, the job runner, export;
//! - [`llm`]: the LLM session with aLoRA and PEFT adapters (uses only the shared files);
//! - `api` (feature `api`): the A1111-compatible HTTP API over the studio.

pub mod device;
pub mod error;
pub mod hub;
pub mod output;
pub mod resample;
pub mod rng;
pub mod weights;

pub mod eval;
pub mod llm;
pub mod lora;
pub mod mix;
pub mod sdxl;
pub mod studio;

#[cfg(feature = "api")]
pub mod api;

pub use error::{Error, Result};
pub use sdxl::pipeline::{GenerateRequest, LoadOptions, SdxlPipeline};
pub use loramix_models::Seamless;
pub use sdxl::schedulers::SamplerKind;
