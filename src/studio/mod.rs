//! The image studio as the app sees it: one serialisable [`Settings`] per job, batches with
//! progress events and live previews, PNGs that carry A1111-compatible `parameters` plus our own
//! JSON, settings restored from any such PNG, and batch export to a folder or a zip.
//!
//! The CLI's `generate` and the desktop app both go through the helpers here, so a PNG made by
//! either restores the same settings in the other. Uses every engine room below it (sdxl, lora,
//! mix); nothing in the engine uses the studio.

mod batch;
mod control;
mod dynamic_prompt;
mod embeddings;
mod export;
mod extras;
mod generation_parameters;
pub(crate) use generation_parameters::{python_int, python_strip};
mod grid;
mod hires;
mod image_info;
mod init;
mod jobs;
mod metadata;
pub(crate) mod model_hash;
mod preview;
mod sd_upscale;
mod settings;
mod training;

pub use batch::{export_manifest, image_name, kmeans, ClusterSummary, manifest_line, parse_line, run_batch, seed_of, BatchEvent, BatchSummary, LineError, LineSummary, Manifest, ManifestJob, Shard};
pub use dynamic_prompt::{apply_styles, expand as expand_prompt, is_dynamic, parse_styles, read_styles, PromptStyle, WildcardDir, WildcardSource};
pub use embeddings::{embedding_hashes, job_embeddings};
pub use export::{export, fill_template};
pub use extras::{blend, decode_extras_input, extras_chunks, extras_picture, extras_to_folder, infotext_html, read_extras_input, ExtrasEvent, ExtrasImage, ExtrasResize, ExtrasSettings, ExtrasSource, PreparedExtras, Postprocessed, MAX_EXTRAS_SIDE};
pub use generation_parameters::{parse_generation_parameters, GenerationParameters, PasteContext};
pub use grid::{apply as apply_axis, draw_grid, run_grid, Axis, AxisKind, GridCell, GridOutput};
pub use hires::{factor_reaching, hires_request, hires_size, hires_upscaler_model, pixel_upscaler_model_path, pixel_upscaler_path, upscaler_model_by_name, upscaler_model_path, upscaler_models};
pub use image_info::{read_image_info, user_comment_exif, user_comment_text, ImageInfo, PngInfo, SamplesFormat};
pub use init::{prepare_init, PreparedInit};
pub use jobs::*;
pub use metadata::*;
pub use model_hash::{cached_model_sha256, model_sha256, model_shorthash, shorthash};
pub use preview::{LatentPreview, Previewer};
pub use sd_upscale::check_sd_upscale;
pub use control::{a1111_model_name as a1111_controlnet_name, check_pass_sizes, control_units, ControlNets};
pub use settings::{parse_tiling, tiling_name, ControlNetSetting, DrawnPrompts, HiresSettings, ImageRecord, InitSettings, InpaintArea, LoraSetting, MixSummary, SdUpscaleSettings, Settings};
pub use training::{train_lora, TrainEvent, TrainReport, TrainRequest};
