//! LoRAMix engine: SDXL text-to-image on candle, equal to diffusers.
//!
//! The engine knows nothing about any UI; the `loramix` binary and the desktop shell are thin
//! layers over [`pipeline::SdxlPipeline`].

pub mod bench;
pub mod bench_library;
pub mod bench_llm;
pub mod bench_mix;
pub mod checkpoint;
pub mod device;
pub mod embed;
pub mod evaluator;
pub mod error;
pub mod library;
pub mod llm;
pub mod mix;
pub mod lora;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod prompt;
pub mod rng;
pub mod schedulers;
pub mod studio;
pub mod text;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use pipeline::{GenerateRequest, LoadOptions, SdxlPipeline};
pub use schedulers::SamplerKind;
