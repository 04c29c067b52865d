//! A LoRA training job as the CLI (`lora train`) and the app run it: images and captions read
//! from a folder, the model loaded, the trainer run with checkpoints (a job started again with
//! the same name resumes), the result written as a kohya file into the library — and, when
//! trained as loadings, added to its subspace.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::library::{LoraEntry, LoraLibrary};
use crate::lora::subspace::MemberFactors;
use crate::lora::train::{self, TrainData, TrainOptions, Trainable};
use crate::lora::AdapterTargets;
use crate::sdxl::pipeline::{LoadOptions, SdxlPipeline};

/// Everything a training job needs (the app's form, the CLI's flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRequest {
    pub images: PathBuf,
    /// The caption of every image without its own `<stem>.txt`.
    pub prompt: String,
    pub name: String,
    /// Train only the loadings of a new member of this subspace.
    pub subspace: Option<String>,
    pub rank: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub resolution: Option<usize>,
    /// `modelspec.architecture` base id; default: the subspace's, else SDXL base.
    pub base: Option<String>,
    pub export: Option<PathBuf>,
    /// Ignore an existing checkpoint.
    pub restart: bool,
    pub checkpoint_every: usize,
    pub model: String,
}

/// Progress of a training job.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainEvent {
    Started { what: String, trainable: usize, images: usize, size: usize, steps: usize, resumed_at: usize },
    Step { step: usize, steps: usize, loss: f64 },
}

/// What a finished (or stopped) job produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub entry: Option<LoraEntry>,
    pub trainable: usize,
    pub steps: usize,
    pub seconds: f64,
    pub final_loss: f64,
    pub loss_curve: Vec<f64>,
    /// With a subspace: the new member's ΔW error there (storage rounding only).
    pub subspace_error: Option<f64>,
    /// Stopped before the last step; the checkpoint is kept and the same request resumes.
    pub stopped: bool,
}

fn read_images(dir: &Path, prompt: &str) -> Result<Vec<(image::RgbImage, String)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str())))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Argument(format!("{}: no training images (png, jpg or webp)", dir.display())));
    }
    files
        .iter()
        .map(|p| {
            let img = image::open(p).map_err(|e| Error::BadFile { path: p.clone(), message: format!("not a readable image: {e}") })?.to_rgb8();
            let caption = match std::fs::read_to_string(p.with_extension("txt")) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                _ => prompt.to_string(),
            };
            Ok((img, caption))
        })
        .collect()
}

/// Runs a training job on the library at `lib`. `on_event` returns false to stop (the
/// checkpoint is kept; the same request resumes).
pub fn train_lora(lib: &mut LoraLibrary, req: &TrainRequest, on_event: &mut dyn FnMut(TrainEvent) -> bool) -> Result<TrainReport> {
    let name = req.name.trim();
    if name.is_empty() || name.contains(['<', '>', ':', '@', '/', '\\']) {
        return Err(Error::Argument(format!("name {name:?}: expected a name without < > : @ / \\")));
    }
    if lib.resolve(name).is_ok() {
        return Err(Error::Argument(format!("the library already has a LoRA named {name}; pick another name")));
    }
    if req.prompt.trim().is_empty() {
        return Err(Error::Argument("prompt: expected the training caption, e.g. \"a zorp emblem\"".into()));
    }
    for (flag, v) in [("--steps", req.steps), ("--batch", req.batch)] {
        if v == 0 {
            return Err(Error::Argument(format!("{flag} 0: expected at least 1")));
        }
    }
    if !(req.lr.is_finite() && req.lr > 0.0) {
        return Err(Error::Argument(format!("--lr {}: expected a positive number", req.lr)));
    }
    let subspace = req.subspace.as_deref().map(|s| lib.load_subspace(s)).transpose()?;
    let images = read_images(&req.images, &req.prompt)?;
    let pipe = SdxlPipeline::load(&req.model, &LoadOptions::default())?;
    let targets = AdapterTargets::of_pipeline(&pipe);
    let size = req.resolution.unwrap_or(pipe.default_size().0);
    let data = TrainData::new(&pipe, &images, size)?;
    let trainable = match &subspace {
        Some((_, basis)) => Trainable::Loadings { rank: req.rank, basis },
        None => Trainable::Full { rank: req.rank, layers: vec![] },
    };
    let mut state = train::attach_trainable(&targets, &trainable, "train", req.seed)?;
    let params: usize = state.vars.values().map(|v| v.elem_count()).sum();
    let dir = lib.root().join("training");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let ckpt = dir.join(format!("{name}.ckpt.safetensors"));
    if ckpt.exists() && !req.restart {
        train::load_checkpoint(&mut state, &ckpt)?;
    }
    let what = match &req.subspace {
        Some(s) => format!("loadings on subspace {s}"),
        None => format!("a rank-{} LoRA", req.rank),
    };
    on_event(TrainEvent::Started { what: what.clone(), trainable: params, images: images.len(), size, steps: req.steps, resumed_at: state.step });
    let t0 = Instant::now();
    let opts = TrainOptions { steps: req.steps, batch: req.batch, lr: req.lr, seed: req.seed, checkpoint_every: req.checkpoint_every };
    let mut curve = Vec::new();
    let mut stopped = false;
    let run = train::train(&pipe, &data, &mut state, &opts, &ckpt, &mut |step, loss| {
        curve.push(loss);
        let go = on_event(TrainEvent::Step { step, steps: req.steps, loss });
        stopped |= !go;
        go
    });
    targets.clear();
    let final_loss = run?;
    let seconds = t0.elapsed().as_secs_f64();
    let report = |entry, subspace_error| TrainReport { entry, trainable: params, steps: state.step, seconds, final_loss, loss_curve: curve.clone(), subspace_error, stopped };
    if stopped && state.step < req.steps {
        return Ok(report(None, None));
    }
    // The result as factors: the trained LoRA, or the subspace's reconstruction of the loadings.
    let (factors, base): (MemberFactors, String) = match &subspace {
        Some((header, basis)) => {
            let loadings = train::trained_loadings(&state, basis)?;
            (loadings.iter().map(|(p, l)| (p.clone(), basis[p].reconstruct(l))).collect(), header.base_model.clone())
        }
        None => (train::full_factors(&state)?, "stable-diffusion-xl-v1-base".to_string()),
    };
    let base = req.base.clone().unwrap_or(base);
    let meta = [
        ("modelspec.architecture", format!("{base}/lora")),
        ("modelspec.title", name.to_string()),
        ("modelspec.trigger_phrase", req.prompt.clone()),
        ("ss_output_name", name.to_string()),
        ("ss_network_dim", req.rank.to_string()),
        ("ss_network_alpha", req.rank.to_string()),
        ("ss_max_train_steps", req.steps.to_string()),
        ("ss_learning_rate", req.lr.to_string()),
        ("ss_num_train_images", images.len().to_string()),
        ("ss_training_comment", format!("trained with loramix lora train: {what}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = train::kohya_bytes(&factors, &targets, meta)?;
    let staged = dir.join(format!("{name}.safetensors"));
    crate::output::write_atomic(&staged, &bytes)?;
    if let Some(e) = &req.export {
        crate::output::write_atomic(e, &bytes)?;
    }
    lib.import(std::slice::from_ref(&staged), &mut |_| {})?;
    let _ = std::fs::remove_file(&staged);
    let entry = lib.resolve(name)?;
    let member = match &req.subspace {
        Some(s) => Some(lib.add_to_subspace(s, &entry.sha256, &targets)?),
        None => None,
    };
    let _ = std::fs::remove_file(&ckpt);
    Ok(report(Some(entry), member.map(|m| m.error)))
}
