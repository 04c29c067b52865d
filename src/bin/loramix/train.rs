//! `loramix lora train`: a new LoRA from a folder of images and a prompt, trained on the base
//! model either as loadings on a subspace (`--subspace S`) or as a normal LoRA (`--rank R`).
//! The result is a library entry (and, with `--export`, a kohya file); a subspace-trained
//! LoRA also joins its subspace as a member.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loramix::lora::library::LoraLibrary;
use loramix::lora::subspace::MemberFactors;
use loramix::lora::train::{self, TrainData, TrainOptions, Trainable};
use loramix::lora::AdapterTargets;
use loramix::{LoadOptions, SdxlPipeline};

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
    #[arg(long, default_value = "models/miniworld")]
    model: String,
    /// Print one JSON line with the run's numbers at the end.
    #[arg(long)]
    json: bool,
}

fn read_images(dir: &Path, prompt: &str) -> Result<Vec<(image::RgbImage, String)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str())))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!("{}: no training images (png, jpg or webp)", dir.display());
    }
    files
        .iter()
        .map(|p| {
            let img = image::open(p).with_context(|| format!("reading image {}", p.display()))?.to_rgb8();
            let caption = match std::fs::read_to_string(p.with_extension("txt")) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                _ => prompt.to_string(),
            };
            Ok((img, caption))
        })
        .collect()
}

pub fn run(lib: &mut LoraLibrary, a: TrainArgs) -> Result<()> {
    if a.name.trim().is_empty() || a.name.contains(['<', '>', ':', '@']) {
        anyhow::bail!("--name {:?}: expected a name without < > : @", a.name);
    }
    if lib.resolve(&a.name).is_ok() {
        anyhow::bail!("the library already has a LoRA named {}; pick another --name", a.name);
    }
    let subspace = a.subspace.as_deref().map(|s| lib.load_subspace(s)).transpose()?;
    let images = read_images(&a.images, &a.prompt)?;
    let pipe = SdxlPipeline::load(&a.model, &LoadOptions::default()).with_context(|| format!("loading model {}", a.model))?;
    let targets = AdapterTargets::of_pipeline(&pipe);
    let size = a.resolution.unwrap_or(pipe.default_size().0);
    let data = TrainData::new(&pipe, &images, size)?;
    let trainable = match &subspace {
        Some((_, basis)) => Trainable::Loadings { rank: a.rank, basis },
        None => Trainable::Full { rank: a.rank, layers: vec![] },
    };
    let mut state = train::attach_trainable(&targets, &trainable, "train", a.seed)?;
    let params: usize = state.vars.values().map(|v| v.elem_count()).sum();
    let dir = lib.root().join("training");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ckpt = dir.join(format!("{}.ckpt.safetensors", a.name));
    if ckpt.exists() && !a.restart {
        train::load_checkpoint(&mut state, &ckpt)?;
        eprintln!("resuming {} from its checkpoint at step {} (AdamW's moments restart; --restart starts over)", a.name, state.step);
    }
    let what = match &a.subspace {
        Some(s) => format!("loadings on subspace {s}"),
        None => format!("a rank-{} LoRA", a.rank),
    };
    eprintln!("training {what}: {params} trainable numbers, {} images at {size}², {} steps", images.len(), a.steps);
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  {elapsed} (ETA {eta})").map_err(|e| anyhow::anyhow!("{e}"))?);
    bar.set_position(state.step as u64);
    let t0 = Instant::now();
    let opts = TrainOptions { steps: a.steps, batch: a.batch, lr: a.lr, seed: a.seed, checkpoint_every: a.checkpoint_every };
    let mut curve = Vec::new();
    let final_loss = train::train(&pipe, &data, &mut state, &opts, &ckpt, &mut |step, loss| {
        bar.set_position(step as u64);
        bar.set_message(format!("{loss:.4}"));
        curve.push(loss);
        true
    })?;
    bar.finish();
    let seconds = t0.elapsed().as_secs_f64();
    targets.clear();

    // The result as factors: the trained LoRA, or the subspace's reconstruction of the loadings.
    let (factors, base): (MemberFactors, String) = match &subspace {
        Some((header, basis)) => {
            let loadings = train::trained_loadings(&state, basis)?;
            (loadings.iter().map(|(p, l)| (p.clone(), basis[p].reconstruct(l))).collect(), header.base_model.clone())
        }
        None => (train::full_factors(&state)?, a.base.clone().unwrap_or_else(|| "stable-diffusion-xl-v1-base".into())),
    };
    let base = a.base.clone().unwrap_or(base);
    let mut meta = std::collections::HashMap::new();
    meta.insert("modelspec.architecture".to_string(), format!("{base}/lora"));
    meta.insert("modelspec.title".to_string(), a.name.clone());
    meta.insert("modelspec.trigger_phrase".to_string(), a.prompt.clone());
    meta.insert("ss_output_name".to_string(), a.name.clone());
    meta.insert("ss_network_dim".to_string(), a.rank.to_string());
    meta.insert("ss_network_alpha".to_string(), a.rank.to_string());
    meta.insert("ss_max_train_steps".to_string(), a.steps.to_string());
    meta.insert("ss_learning_rate".to_string(), a.lr.to_string());
    meta.insert("ss_num_train_images".to_string(), images.len().to_string());
    meta.insert("ss_training_comment".to_string(), format!("trained with loramix lora train: {what}"));
    let bytes = train::kohya_bytes(&factors, &targets, meta)?;
    let staged = dir.join(format!("{}.safetensors", a.name));
    loramix::output::write_atomic(&staged, &bytes)?;
    if let Some(e) = &a.export {
        loramix::output::write_atomic(e, &bytes)?;
    }
    lib.import(std::slice::from_ref(&staged), &mut |_| {})?;
    let entry = lib.resolve(&a.name)?;
    let entry = if entry.display_name != a.name { lib.rename(&entry.sha256, &a.name)? } else { entry };
    let _ = std::fs::remove_file(&staged);
    let member = match &a.subspace {
        Some(s) => Some(lib.add_to_subspace(s, &entry.sha256, &targets)?),
        None => None,
    };
    let _ = std::fs::remove_file(&ckpt);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"name": entry.display_name, "sha256": entry.sha256, "trainable": params, "steps": state.step,
                "seconds": seconds, "final_loss": final_loss, "loss_curve": curve, "subspace": a.subspace,
                "subspace_error": member.as_ref().map(|m| m.error)})
        );
    } else {
        println!(
            "{}: {what}, {params} trainable numbers, {} steps in {seconds:.0} s, final loss {final_loss:.4}; in the library as {}",
            a.name, state.step, entry.display_name
        );
    }
    Ok(())
}
