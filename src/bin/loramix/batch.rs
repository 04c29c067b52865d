//! `loramix batch run MANIFEST.jsonl --out DIR [--shard I/N]`: a manifest's jobs into names it
//! fixes, skipping images already made, with one progress bar over the whole manifest.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use loramix::device::{parse_device, parse_dtype};
use loramix::studio::{self, BatchEvent, Manifest, Shard};
use loramix::LoadOptions;

#[derive(clap::Args)]
pub struct BatchArgs {
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(clap::Subcommand)]
enum BatchCommand {
    /// Run a JSONL manifest (exit status 2 when it finished but some lines are bad): one job per line, in the settings JSON our PNGs carry, plus
    /// `"images": N`. Images are named LLLLL-KKKK.png (manifest line, image); a valid file already
    /// there is kept, so a restarted run finishes the job and a finished one does nothing. A PNG
    /// (ours, or A1111's infotext) in place of the manifest is one job that makes it again.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    manifest: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Run every N-th job from the I-th (I in 1..=N; 0 is read as N).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Library for <lora:NAME:w> tags, LoRA names, wildcards and styles.csv.
    #[arg(long)]
    library: Option<PathBuf>,
    /// Compute every job's mix on its own: no prompt clusters, no shared weight statistics or
    /// loaded LoRAs (to measure what batch-aware mixing saves).
    #[arg(long)]
    one_by_one: bool,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: BatchArgs) -> Result<()> {
    match a.command {
        BatchCommand::Run(r) => run_manifest(r),
    }
}

fn run_manifest(a: RunArgs) -> Result<()> {
    let shard = a.shard.as_deref().map(str::parse::<Shard>).transpose()?.unwrap_or(Shard::ALL);
    let manifest = Manifest::read(&a.manifest)?;
    let name = a.manifest.display().to_string();
    let opts = LoadOptions { device: parse_device(&a.device)?, dtype: parse_dtype(&a.dtype)?, ..LoadOptions::default() };
    let studio = studio::Studio::with_load_options(opts);
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let bar = ProgressBar::new(0);
    let tty = std::io::stderr().is_terminal();
    if !tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} images {msg} ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let summary = studio::run_batch(&studio, &manifest, &name, &a.out, shard, a.library.as_deref(), !a.one_by_one, &cancel, &mut |e| match e {
        BatchEvent::Started { jobs, images } => {
            bar.set_length(images as u64);
            if !tty {
                eprintln!("shard {}: {jobs} jobs, {images} images", shard.label());
            }
        }
        BatchEvent::Image { line, path, kept, done, total } => {
            bar.set_position(done as u64);
            bar.set_message(format!("line {line}"));
            if !tty {
                eprintln!("[{done}/{total}] {} {}", if kept { "kept" } else { "wrote" }, path.display());
            }
        }
        BatchEvent::LineFailed { line, error } => bar.suspend(|| eprintln!("{name}:{line}: {error}")),
        BatchEvent::Step { .. } => bar.tick(),
    })?;
    bar.finish_and_clear();
    let path = a.out.join(studio::BatchSummary::file_name(shard));
    eprintln!(
        "{} images: {} written, {} already there; {} failed lines; {} prompt clusters; mix statistics computed {}, shared {}; LoRAs loaded {}, shared {}; {:.1}s; summary {}",
        summary.images,
        summary.written,
        summary.kept,
        summary.failed_lines,
        summary.clusters.len(),
        summary.sharing.statistics_computed,
        summary.sharing.statistics_shared,
        summary.sharing.loras_loaded,
        summary.sharing.loras_shared,
        summary.seconds,
        path.display()
    );
    if summary.failed_lines > 0 {
        // 2, not 1: the run finished and the bad lines are reported; running again cannot help
        // (schedulers such as tools/ray retry on any other failure).
        eprintln!("error: {} manifest lines failed (listed above and in {})", summary.failed_lines, path.display());
        std::process::exit(2);
    }
    Ok(())
}
