//! The `loramix` command line: one file per subcommand, each a thin layer over the engine.

mod batch;
mod bench;
mod chat;
mod eval;
mod extras;
mod generate;
mod info;
mod grid;
mod llm;
mod lora;
mod serve;
mod subspace;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loramix", version, about = "SDXL image generation with training-free LoRA mixing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Generate(Box<generate::GenerateArgs>),
    /// Batch manifests: many jobs, fixed output names, restartable and shardable.
    Batch(batch::BatchArgs),
    /// An X/Y/Z plot: a job over up to three axes, with labelled grid PNGs.
    Grid(Box<grid::GridArgs>),
    /// The A1111-compatible HTTP API (/sdapi/v1/txt2img, img2img, progress, ...).
    Serve(serve::ServeArgs),
    /// A1111's Extras tab: upscale finished pictures (or folders of them), keeping their metadata.
    Extras(extras::ExtrasArgs),
    /// A1111's PNG Info: a picture's generation parameters (PNG, JPEG, WebP) and its other text.
    Info(info::InfoArgs),
    /// Seconds per SDXL UNet step on the CPU, beside diffusers (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// The LoRA library: import, list, show, remove, rename, set role and tags.
    Lora(lora::LoraArgs),
    /// Score miniworld images: subject fidelity, style fidelity, prompt alignment.
    Eval(eval::EvalArgs),
    /// Chat with an LLM, with LoRA and activated-LoRA adapters that reuse the KV cache.
    Chat(chat::ChatArgs),
    /// Train LLM-pane techniques: LoRA-Mixer routers, ChameleonLLM hypernetworks.
    Llm(llm::LlmArgs),
}

/// A model argument: our shipped models by their `models/...` path from any directory
/// ([`loramix::hub::shipped`]), anything else as given.
fn model_arg(s: &str) -> std::result::Result<String, String> {
    Ok(loramix::hub::shipped(s).map_or_else(|| s.to_string(), |p| p.to_string_lossy().into_owned()))
}

fn path_arg(s: &str) -> std::result::Result<std::path::PathBuf, String> {
    Ok(loramix::hub::shipped(s).unwrap_or_else(|| s.into()))
}

/// An error and its causes on one line, each cause once: our errors already name their cause
/// (`path: No such file or directory`), so anyhow's "Caused by" list would say it again.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    text
}

fn main() {
    if let Err(e) = run() {
        eprintln!("Error: {}", error_text(&e));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    loramix::weights::tune_allocator();
    match Cli::parse().command {
        Command::Generate(a) => generate::run(*a),
        Command::Lora(a) => lora::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Llm(a) => llm::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Batch(a) => batch::run(a),
        Command::Grid(a) => grid::run(*a),
        Command::Serve(a) => serve::run(a),
        Command::Extras(a) => extras::run(a),
        Command::Info(a) => info::run(a),
    }
}
