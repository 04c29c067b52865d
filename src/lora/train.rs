//! DreamBooth-style LoRA training in candle, on the loaded base model: either a normal LoRA of
//! rank R (the baseline) or, EigenLoRAx's way, only the loadings of a new member of a subspace
//! (2·K·r numbers per module; the subspace's components stay fixed).
//!
//! The loop is diffusers' `train_dreambooth_lora_sdxl.py` reduced to what a library user needs:
//! images VAE-encoded once (the latent mean times the scaling factor, so that a run is
//! reproducible), one prompt, a timestep drawn uniformly from the training schedule, noise from
//! our torch-compatible generator, `x_t = √ᾱ x₀ + √(1−ᾱ) ε`, MSE against ε (or v for
//! v-prediction models), AdamW from candle-nn. Our fused CPU kernels have no backward pass, so
//! the run switches them to their composed references (`loramix_kernels::set_differentiable`).
//! Checkpoints hold the trainable tensors and the step; a resumed run restarts AdamW's moments
//! (candle keeps them private), which the log says.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loramix_models::sdxl::AddedConditions;
use loramix_models::{BranchWeights, LayerKind, LowRankBranch, SharedBasis, SharedLoadings};

use super::subspace::{MemberFactors, ModuleBasis, ModuleLoadings};
use super::targets::AdapterTargets;
use crate::error::{Error, Result};
use crate::rng::TorchCpuRng;
use crate::sdxl::pipeline::SdxlPipeline;
use crate::sdxl::schedulers::{ConfigReader, NoiseSchedule};
use crate::weights::{f32_le_bytes, safetensors_bytes, RawTensor};

/// What is trained.
pub enum Trainable<'a> {
    /// A LoRA of this rank on `layers` (qualified paths; empty: kohya's LoCon set, see
    /// [`LOCON_LAYERS`]).
    Full { rank: usize, layers: Vec<String> },
    /// Loadings of rank `rank` on an uncentred subspace's modules (a centred one's mean would be a
    /// per-member term outside the basis, which the shared-basis forward does not carry).
    Loadings { rank: usize, basis: &'a BTreeMap<String, ModuleBasis> },
}

/// The UNet layers a LoRA is trained on by default: every transformer linear, proj_in/out and the
/// resnets' convolutions — kohya's LoCon preset, and the shape of the shipped miniworld LoRAs
/// (time embeddings, conv_in/out and the samplers are left alone, as kohya does).
pub const LOCON_LAYERS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"];

pub struct TrainOptions {
    pub steps: usize,
    /// Images per step (they share the step's timestep: our UNet takes one per call).
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
}

/// The training images as latents, each with its caption's conditioning.
pub struct TrainData {
    latents: Vec<Tensor>,
    /// Index into `conds` per image.
    caption_of: Vec<usize>,
    conds: Vec<(Tensor, Option<AddedConditions>)>,
}

impl TrainData {
    /// `images` with their captions, resized (Lanczos) and centre-cropped to `size` × `size`,
    /// VAE-encoded once; each distinct caption is encoded once.
    pub fn new(pipe: &SdxlPipeline, images: &[(image::RgbImage, String)], size: usize) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::Argument("no training images".into()));
        }
        let f = pipe.vae_scale_factor();
        if size == 0 || !size.is_multiple_of(f) {
            return Err(Error::Argument(format!("training resolution {size}: expected a multiple of {f}")));
        }
        let mut latents = Vec::new();
        let mut captions: Vec<String> = Vec::new();
        let mut caption_of = Vec::new();
        for (img, caption) in images {
            let (w, h) = img.dimensions();
            let s = size as f64 / w.min(h) as f64;
            let (rw, rh) = (((w as f64 * s).round() as u32).max(size as u32), ((h as f64 * s).round() as u32).max(size as u32));
            let r = if (rw, rh) == (w, h) { img.clone() } else { crate::sdxl::img2img::resize(img, rw, rh) };
            let (x0, y0) = ((rw - size as u32) / 2, (rh - size as u32) / 2);
            let c = image::imageops::crop_imm(&r, x0, y0, size as u32, size as u32).to_image();
            let px: Vec<f32> = (0..3).flat_map(|ch| c.pixels().map(move |p| p.0[ch] as f32 / 127.5 - 1.0)).collect();
            let x = Tensor::from_vec(px, (1, 3, size, size), &pipe.device)?.to_dtype(pipe.vae_dtype())?;
            let dist = pipe.vae()?.encode(&x)?;
            latents.push((dist.mean.to_dtype(DType::F32)? * pipe.vae()?.config().scaling_factor)?);
            caption_of.push(match captions.iter().position(|c| c == caption) {
                Some(i) => i,
                None => {
                    captions.push(caption.clone());
                    captions.len() - 1
                }
            });
        }
        let mut conds = Vec::new();
        for caption in &captions {
            let (cond, _) = pipe.encode_prompts(caption, None, false)?;
            let added = if pipe.unet()?.uses_added_conditions() {
                let pooled = cond.pooled.clone().ok_or_else(|| Error::Argument("the model needs a pooled text embedding".into()))?;
                let ids = [size as f32, size as f32, 0.0, 0.0, size as f32, size as f32];
                Some(AddedConditions { text_embeds: pooled, time_ids: Tensor::from_slice(&ids, (1, 6), &pipe.device)? })
            } else {
                None
            };
            conds.push((cond.context, added));
        }
        Ok(Self { latents, caption_of, conds })
    }

    pub fn len(&self) -> usize {
        self.latents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latents.is_empty()
    }

    /// A batch of images (latents, contexts, added conditions stacked); contexts of different
    /// lengths (long captions) are padded by repeating the last chunk, which the model never
    /// sees differently from a shorter caption's padding.
    fn batch(&self, idx: &[usize]) -> Result<(Tensor, Tensor, Option<AddedConditions>)> {
        let x = Tensor::cat(&idx.iter().map(|&i| self.latents[i].clone()).collect::<Vec<_>>(), 0)?;
        let ctxs: Vec<&Tensor> = idx.iter().map(|&i| &self.conds[self.caption_of[i]].0).collect();
        let len = ctxs.iter().map(|c| c.dim(1)).collect::<candle_core::Result<Vec<_>>>()?;
        let max = len.iter().copied().max().unwrap_or(0);
        if len.iter().any(|&l| l != max) {
            return Err(Error::Argument("captions of different lengths (over 75 tokens) in one batch: shorten them or use --batch 1".into()));
        }
        let ctx = Tensor::cat(&ctxs, 0)?;
        let added = match &self.conds[self.caption_of[idx[0]]].1 {
            Some(_) => {
                let a: Vec<&AddedConditions> = idx.iter().filter_map(|&i| self.conds[self.caption_of[i]].1.as_ref()).collect();
                Some(AddedConditions {
                    text_embeds: Tensor::cat(&a.iter().map(|x| x.text_embeds.clone()).collect::<Vec<_>>(), 0)?,
                    time_ids: Tensor::cat(&a.iter().map(|x| x.time_ids.clone()).collect::<Vec<_>>(), 0)?,
                })
            }
            None => None,
        };
        Ok((x, ctx, added))
    }
}

/// The trainable tensors of a run, by name (`{layer path}.down` / `.up`), and how they attach.
pub struct TrainState {
    pub vars: BTreeMap<String, Var>,
    pub step: usize,
}

fn kaiming(rng: &mut TorchCpuRng, n: usize, fan_in: usize) -> Vec<f32> {
    // PEFT's LoRA A init: kaiming_uniform(a = √5) = U(−1/√fan_in, 1/√fan_in).
    let b = 1.0 / (fan_in as f32).sqrt();
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * b).collect()
}

/// Creates the trainable tensors (down random, up zero, so training starts at the base model)
/// and attaches them as branches named `name`.
pub fn attach_trainable(targets: &AdapterTargets, trainable: &Trainable, name: &str, seed: u64) -> Result<TrainState> {
    let dev = targets.targets.first().map(|t| t.layer.base_weight.device().clone()).unwrap_or(Device::Cpu);
    let mut rng = TorchCpuRng::new(seed);
    let mut vars = BTreeMap::new();
    if matches!(trainable, Trainable::Full { rank: 0, .. } | Trainable::Loadings { rank: 0, .. }) {
        return Err(Error::Argument("--rank 0: expected at least 1".into()));
    }
    let unet: Vec<usize> = (0..targets.targets.len()).filter(|&i| targets.targets[i].component == super::keys::Component::Unet).collect();
    match trainable {
        Trainable::Full { rank, layers } => {
            let r = *rank;
            for &i in &unet {
                let t = &targets.targets[i];
                let path = t.qualified_path();
                let wanted = if layers.is_empty() { LOCON_LAYERS.iter().any(|l| path.ends_with(&format!(".{l}"))) } else { layers.contains(&path) };
                if !wanted {
                    continue;
                }
                let (inf, outf) = (t.layer.in_features, t.layer.out_features);
                let (down_shape, up_shape, fan_in) = match t.layer.kind {
                    LayerKind::Linear => (vec![r, inf], vec![outf, r], inf),
                    LayerKind::Conv2d { kernel, .. } => (vec![r, inf, kernel, kernel], vec![outf, r, 1, 1], inf * kernel * kernel),
                };
                let down = Var::from_tensor(&Tensor::from_vec(kaiming(&mut rng, down_shape.iter().product(), fan_in), down_shape, &dev)?)?;
                let up = Var::zeros(up_shape, DType::F32, &dev)?;
                let mut s = t.layer.slot.write();
                s.branches.retain(|b| b.name != name);
                s.branches.push(LowRankBranch::low_rank(name, down.as_tensor().clone(), up.as_tensor().clone(), 1.0, 1.0));
                vars.insert(format!("{path}.down"), down);
                vars.insert(format!("{path}.up"), up);
            }
        }
        Trainable::Loadings { rank, basis } => {
            let r = *rank;
            if basis.values().any(|b| b.up.mean.iter().chain(&b.down.mean).any(|m| *m != 0.0)) {
                return Err(Error::Argument(
                    "loadings can be trained on an uncentred subspace only; build one with --centering uncentred (the default)".into(),
                ));
            }
            let bases = super::subspace::basis_tensors(basis, targets)?;
            for &i in &unet {
                let t = &targets.targets[i];
                let path = t.qualified_path();
                let (Some(b), Some(bt)) = (basis.get(&path), bases.get(&path)) else { continue };
                let down = Var::from_tensor(&Tensor::from_vec(kaiming(&mut rng, r * b.down.k, b.down.k), (r, b.down.k), &dev)?)?;
                let up = Var::zeros((b.up.k, r), DType::F32, &dev)?;
                let mut s = t.layer.slot.write();
                s.branches.retain(|x| x.name != name);
                let key = format!("train:{name}");
                let bi = match s.bases.iter().position(|x| x.key == key) {
                    Some(i) => i,
                    None => {
                        s.bases.push(SharedBasis { key, down: bt.0.to_device(&dev)?, up: bt.1.to_device(&dev)? });
                        s.bases.len() - 1
                    }
                };
                // `weights` is never read while every active branch is a basis member.
                let placeholder = BranchWeights::LowRank { down: Tensor::zeros((1, 1), DType::F32, &dev)?, up: Tensor::zeros((1, 1), DType::F32, &dev)? };
                s.branches.push(LowRankBranch {
                    name: name.to_string(),
                    weights: placeholder,
                    scale: 1.0,
                    weight: 1.0,
                    route: Default::default(),
                    shared: Some(SharedLoadings { basis: bi, down: down.as_tensor().clone(), up: up.as_tensor().clone() }),
                });
                vars.insert(format!("{path}.down"), down);
                vars.insert(format!("{path}.up"), up);
            }
            if vars.is_empty() {
                return Err(Error::Argument("the subspace has no module on this model's UNet layers".into()));
            }
        }
    }
    Ok(TrainState { vars, step: 0 })
}

/// Writes the trainable tensors and the step (atomically).
pub fn save_checkpoint(state: &TrainState, path: &Path) -> Result<()> {
    let mut data: Vec<RawTensor> = Vec::new();
    for (k, v) in &state.vars {
        let t = v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        data.push((k.clone(), t.dims().to_vec(), f32_le_bytes(&t.flatten_all()?.to_vec1::<f32>()?)));
    }
    let meta = [("loramix.train.step".to_string(), state.step.to_string())].into();
    let bytes = safetensors_bytes(safetensors::tensor::Dtype::F32, &data, Some(meta), "checkpoint")?;
    crate::output::write_atomic(path, &bytes)
}

/// Restores tensors and the step saved by [`save_checkpoint`] into a freshly attached state.
pub fn load_checkpoint(state: &mut TrainState, path: &Path) -> Result<()> {
    let f = crate::weights::SafetensorsFile::open(path)?;
    let step = f.user_metadata().get("loramix.train.step").and_then(|s| s.parse().ok());
    let bad = |m: String| Error::BadFile { path: path.to_path_buf(), message: m };
    let step = step.ok_or_else(|| bad("not a LoRAMix training checkpoint (no loramix.train.step)".into()))?;
    for (k, v) in &state.vars {
        let t = f.load(k).map_err(|_| bad(format!("{k} is missing: the checkpoint is from another run (different subspace, rank or model)")))?;
        if t.dims() != v.dims() {
            return Err(bad(format!("{k}: shape {:?}, this run has {:?}: the checkpoint is from another run (different subspace, rank or model)", t.dims(), v.dims())));
        }
        v.set(&t.to_dtype(DType::F32)?.to_device(v.device())?)?;
    }
    state.step = step;
    Ok(())
}

/// Runs the loop from `state.step` to `opts.steps`. `on_step(step, loss)` returns false to stop
/// (after a checkpoint). Returns the mean loss of the last 10 % of the steps run.
pub fn train(
    pipe: &SdxlPipeline,
    data: &TrainData,
    state: &mut TrainState,
    opts: &TrainOptions,
    checkpoint: &Path,
    on_step: &mut dyn FnMut(usize, f64) -> bool,
) -> Result<f64> {
    let c = ConfigReader(&pipe.scheduler_config);
    let sched = NoiseSchedule::from_config(&c, 0.00085, 0.012, "scaled_linear")?;
    let v_pred = c.string("prediction_type", "epsilon")? == "v_prediction";
    let vars: Vec<Var> = state.vars.values().cloned().collect();
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: opts.lr, weight_decay: 1e-2, ..Default::default() })?;
    // Each step's draws come from the seed and the step, so a resumed run continues the same stream.
    let mut losses = Vec::new();
    let was = loramix_kernels::differentiable();
    loramix_kernels::set_differentiable(true);
    let result = (|| -> Result<()> {
        while state.step < opts.steps {
            let mut rng = TorchCpuRng::new(opts.seed.wrapping_mul(1_000_003).wrapping_add(state.step as u64));
            let n = data.len();
            let idx: Vec<usize> = (0..opts.batch.max(1)).map(|_| (rng.uniform() * n as f32) as usize % n).collect();
            let (x0, context, added) = data.batch(&idx)?;
            let t = ((rng.uniform() * sched.num_train_timesteps as f32) as usize).min(sched.num_train_timesteps - 1);
            let ab = sched.alphas_cumprod[t] as f64;
            let noise = Tensor::from_vec(rng.randn(x0.elem_count()), x0.dims(), &Device::Cpu)?.to_device(x0.device())?;
            let xt = ((&x0 * ab.sqrt())? + (&noise * (1.0 - ab).sqrt())?)?;
            let pred = pipe.unet()?.forward(&xt.to_dtype(pipe.dtype)?, t as f32, &context, added.as_ref())?.to_dtype(DType::F32)?;
            let target = if v_pred { ((&noise * ab.sqrt())? - (&x0 * (1.0 - ab).sqrt())?)? } else { noise };
            let loss = (pred - target)?.sqr()?.mean_all()?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(Error::Argument(format!("the loss became {l} at step {}: lower the learning rate", state.step)));
            }
            losses.push(l);
            state.step += 1;
            let go_on = on_step(state.step, l);
            if state.step.is_multiple_of(opts.checkpoint_every.max(1)) || state.step == opts.steps || !go_on {
                save_checkpoint(state, checkpoint)?;
            }
            if !go_on {
                break;
            }
        }
        Ok(())
    })();
    loramix_kernels::set_differentiable(was);
    result?;
    let tail = &losses[losses.len() - (losses.len() / 10).max(1).min(losses.len())..];
    Ok(if tail.is_empty() { f64::NAN } else { tail.iter().sum::<f64>() / tail.len() as f64 })
}

/// The trained Full LoRA's factors per layer, as a member's factors (scale 1).
pub fn full_factors(state: &TrainState) -> Result<MemberFactors> {
    let mut out = BTreeMap::new();
    for (k, v) in &state.vars {
        let Some(path) = k.strip_suffix(".down") else { continue };
        let Some(up) = state.vars.get(&format!("{path}.up")) else { continue };
        let r = v.as_tensor().dim(0)?;
        let down = v.as_tensor().reshape((r, ()))?;
        let out_dim = up.as_tensor().dim(0)?;
        let f = super::subspace::ModuleFactors::from_up_down(
            &up.as_tensor().reshape((out_dim, r))?.flatten_all()?.to_vec1::<f32>()?,
            &down.flatten_all()?.to_vec1::<f32>()?,
            out_dim,
            r,
            down.dim(1)?,
            1.0,
        )?;
        out.insert(path.to_string(), f);
    }
    Ok(out)
}

/// The trained loadings as a member's loadings (column-major, as subspaces store them).
pub fn trained_loadings(state: &TrainState, basis: &BTreeMap<String, ModuleBasis>) -> Result<BTreeMap<String, ModuleLoadings>> {
    let mut out = BTreeMap::new();
    for path in basis.keys() {
        let (Some(d), Some(u)) = (state.vars.get(&format!("{path}.down")), state.vars.get(&format!("{path}.up"))) else { continue };
        let (r, _kd) = d.as_tensor().dims2()?;
        // L_A,iᵀ [r, K_d] row-major is column-major K_d × r; L_B [K_u, r] needs a transpose.
        let down: Vec<f64> = d.as_tensor().flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let up: Vec<f64> = u.as_tensor().t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        out.insert(path.clone(), ModuleLoadings { rank: r, up, down });
    }
    Ok(out)
}

/// A kohya LoRA file (alpha = rank, so scale 1) of `factors`, keyed by UNet layer path.
pub fn kohya_bytes(factors: &MemberFactors, targets: &AdapterTargets, meta: std::collections::HashMap<String, String>) -> Result<Vec<u8>> {
    let kinds: std::collections::HashMap<String, &super::targets::Target> = targets.targets.iter().map(|t| (t.qualified_path(), t)).collect();
    let mut data: Vec<RawTensor> = Vec::new();
    let bytes = f32_le_bytes;
    for (path, f) in factors {
        let t = kinds.get(path).ok_or_else(|| Error::Argument(format!("{path}: not a layer of {}", targets.describe_model())))?;
        let Some(rest) = path.strip_prefix("unet.") else { continue };
        let name = format!("lora_unet_{}", rest.replace('.', "_"));
        let (up, down) = f.to_up_down();
        let (down_shape, up_shape) = match t.layer.kind {
            LayerKind::Linear => (vec![f.rank, f.in_dim], vec![f.out_dim, f.rank]),
            LayerKind::Conv2d { kernel, .. } => (vec![f.rank, t.layer.in_features, kernel, kernel], vec![f.out_dim, f.rank, 1, 1]),
        };
        data.push((format!("{name}.lora_down.weight"), down_shape, bytes(&down)));
        data.push((format!("{name}.lora_up.weight"), up_shape, bytes(&up)));
        data.push((format!("{name}.alpha"), vec![], bytes(&[f.rank as f32])));
    }
    safetensors_bytes(safetensors::tensor::Dtype::F32, &data, Some(meta), "LoRA tensors")
}
