//! `loramix lora train`: a new LoRA from a folder of images and a prompt, trained on the base
//! model either as loadings on a subspace (`--subspace S`) or as a normal LoRA (`--rank R`).
//! The result is a library entry (and, with `--export`, a kohya file); a subspace-trained
//! LoRA also joins its subspace as a member.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loramix::lora::library::LoraLibrary;
use loramix::studio::{self, TrainEvent, TrainRequest};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Train only the loadings of a new member of this subspace (EigenLoRAx).
    #[arg(long)]
    subspace: Option<String>,
    /// Training images (png, jpg, webp), resized and centre-cropped to --resolution.
    #[arg(long)]
    images: PathBuf,
    /// The caption of every image without its own `<image stem>.txt` (kohya's caption files),
    /// DreamBooth style, e.g. "a zorp emblem".
    #[arg(long)]
    prompt: String,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Rank of the LoRA (without --subspace) or of the loadings (with it).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 4e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Square training size in pixels (default: the model's own).
    #[arg(long)]
    resolution: Option<usize>,
    /// Name of the new library entry.
    #[arg(long)]
    name: String,
    /// Base model id written into the file (`modelspec.architecture`); default: the subspace's,
    /// else stable-diffusion-xl-v1-base.
    #[arg(long)]
    base: Option<String>,
    /// Also write the result as a kohya LoRA file here.
    #[arg(long)]
    export: Option<PathBuf>,
    /// Ignore an existing checkpoint of this name and start over.
    #[arg(long)]
    restart: bool,
    #[arg(long, default_value_t = 25)]
    checkpoint_every: usize,
    #[arg(long, default_value = "models/miniworld", value_parser = crate::model_arg)]
    model: String,
    /// Print one JSON line with the run's numbers at the end.
    #[arg(long)]
    json: bool,
}

pub fn run(lib: &mut LoraLibrary, a: TrainArgs) -> Result<()> {
    let req = TrainRequest {
        images: a.images,
        prompt: a.prompt,
        name: a.name,
        subspace: a.subspace,
        rank: a.rank,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        resolution: a.resolution,
        base: a.base,
        export: a.export,
        restart: a.restart,
        checkpoint_every: a.checkpoint_every,
        model: a.model,
    };
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  {elapsed} (ETA {eta})").map_err(|e| anyhow::anyhow!("{e}"))?);
    let r = studio::train_lora(lib, &req, &mut |e| {
        match e {
            TrainEvent::Started { what, trainable, images, size, steps, resumed_at } => {
                if resumed_at > 0 {
                    bar.println(format!("resuming {} from its checkpoint at step {resumed_at} (AdamW's moments restart; --restart starts over)", req.name));
                }
                bar.println(format!("training {what}: {trainable} trainable numbers, {images} images at {size}², {steps} steps"));
                bar.set_position(resumed_at as u64);
            }
            TrainEvent::Step { step, loss, .. } => {
                bar.set_position(step as u64);
                bar.set_message(format!("{loss:.4}"));
            }
        }
        true
    })?;
    bar.finish();
    let entry = r.entry.as_ref().context("training stopped before its last step")?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"name": entry.display_name, "sha256": entry.sha256, "trainable": r.trainable, "steps": r.steps,
                "seconds": r.seconds, "final_loss": r.final_loss, "loss_curve": r.loss_curve, "subspace": req.subspace,
                "subspace_error": r.subspace_error})
        );
    } else {
        println!(
            "{}: {} trainable numbers, {} steps in {:.0} s, final loss {:.4}; in the library as {}",
            req.name, r.trainable, r.steps, r.seconds, r.final_loss, entry.display_name
        );
    }
    Ok(())
}
