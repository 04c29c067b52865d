//! Measuring images: the miniworld evaluator that every quality claim goes through, and the image
//! embedders that scoring uses (DINO for EST-LoRA's style discrepancy).
//!
//! Owns image → score. Uses the weights readers and the LoRA prompt syntax (to strip `<lora:…>`
//! tags from a prompt before reading what it asks for); nothing here generates images.

pub mod embed;
pub mod miniworld;
pub mod texture;

pub use miniworld::*;
pub use texture::{StyleStatistics, StyleStatisticsConfig};
