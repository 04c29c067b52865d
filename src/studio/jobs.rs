//! Running jobs: loading the model and the LoRAs once, planning the mix, then batches with
//! progress events, previews and cancellation, each image written atomically with its metadata.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::hires::hires_request;
use super::init::prepare_init;
use super::metadata::encode_image;
use super::preview::{LatentPreview, Previewer};
use super::settings::{ImageRecord, MixSummary, Settings};
use crate::error::{Error, Result};
use crate::lora::library::LoraLibrary;
use crate::lora::{self, AdapterTargets, LoadedLora, Role};
use crate::mix::{self, MixLora, MixOptions, MixPlan, Mixer};
use crate::output;
use crate::sdxl::pipeline::{GenerateRequest, LoadOptions, SdxlPipeline, StepMixer};
use crate::sdxl::schedulers::{self, SamplerKind, Schedule};

/// Progress of a running job.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StudioEvent {
    Loading { model: String },
    Loaded { model: String, seconds: f64 },
    LoraLoaded { name: String, role: String, layers: usize, warnings: Vec<String> },
    Step { batch: usize, batches: usize, step: usize, steps: usize, its: f64, eta_seconds: f64 },
    Image { path: PathBuf, seed: u64, batch: usize, index: usize },
    MixTrace { summary: MixSummary },
}

fn parse_role(r: &str) -> Result<Role> {
    Role::parse(r).ok_or_else(|| Error::Argument(format!("role {r:?}: expected subject or style")))
}

/// What loading one LoRA reported.
#[derive(Debug, Clone, Serialize)]
pub struct LoraLoadReport {
    pub name: String,
    pub format: String,
    pub base: String,
    pub role: String,
    pub layers: usize,
    pub warnings: Vec<String>,
}

/// Loaded LoRAs of a job, with what each load reported.
pub struct LoadedLoras {
    pub mix: Vec<MixLora>,
    /// (name, A1111 addnet hash, 12 hex digits)
    pub hashes: Vec<(String, String)>,
    pub reports: Vec<LoraLoadReport>,
}

/// Resolves and loads LoRAs given as (name or path, weight, role) and `<lora:NAME:w>` tags:
/// a path, then the model's own `loras/`, then the library.
pub fn load_loras(
    args: &[(String, f64, Option<Role>)],
    prompt_tags: &[lora::PromptLora],
    library: Option<&Path>,
    model_loras: &Path,
    targets: &AdapterTargets,
) -> Result<LoadedLoras> {
    let choices = lora::library::resolve_choices(args, prompt_tags, library, Some(model_loras))?;
    let mut out = LoadedLoras { mix: vec![], hashes: vec![], reports: vec![] };
    let mut lib: Option<LoraLibrary> = None;
    for c in &choices {
        let l = match &c.subspace {
            Some((member, sub)) => {
                if lib.is_none() {
                    lib = Some(LoraLibrary::open(&match library {
                        Some(r) => r.to_path_buf(),
                        None => LoraLibrary::default_root()?,
                    })?);
                }
                lib.as_ref().ok_or_else(|| Error::Argument("library".into()))?.subspace_member_lora(sub, member, &c.name, targets)?
            }
            None => LoadedLora::load(&c.path, &c.name, targets)?,
        };
        let role = c.role.unwrap_or(l.info.role);
        let mut warnings = vec![];
        if !l.report.unmatched_keys.is_empty() {
            let n = l.report.unmatched_keys.len();
            let shown: Vec<&str> = l.report.unmatched_keys.iter().take(8).map(String::as_str).collect();
            warnings.push(format!("{n} keys match no layer of this model: {}{}", shown.join(", "), if n > 8 { ", ..." } else { "" }));
        }
        for (k, why) in &l.report.skipped {
            warnings.push(format!("{k} skipped: {why}"));
        }
        out.reports.push(LoraLoadReport {
            name: c.name.clone(),
            format: l.info.format.as_str().to_string(),
            base: l.info.base_model.label().to_string(),
            role: role.as_str().to_string(),
            layers: l.report.matched.len(),
            warnings,
        });
        out.hashes.push((c.name.clone(), l.addnet_hash[..12].to_string()));
        out.mix.push(MixLora { lora: l, role, strength: c.weight, schedule: c.schedule.clone() });
    }
    Ok(out)
}

/// `--candidates library`: scores the library's LoRAs for the prompt (trigger words, names,
/// tags, our text encoder), adds the picked ones to `args` (unless given) and returns every
/// decision for the trace.
pub fn library_candidates(
    pipe: &SdxlPipeline,
    library: Option<&Path>,
    prompt: &str,
    args: &mut Vec<(String, f64, Option<Role>)>,
) -> Result<Vec<mix::candidates::Candidate>> {
    let root = match library {
        Some(r) => r.to_path_buf(),
        None => LoraLibrary::default_root()?,
    };
    let entries = LoraLibrary::open(&root)?.list(&Default::default())?;
    let offered: Vec<mix::candidates::Offered> = entries
        .iter()
        .map(|e| mix::candidates::Offered { name: e.display_name.clone(), role: Role::parse(&e.role).unwrap_or(Role::Unknown), phrases: mix::candidates::phrases_of(e) })
        .collect();
    let sim = mix::candidates::text_similarity(&pipe.text);
    let picks = mix::candidates::select(prompt, &offered, Some(&sim))?;
    for (c, e) in picks.iter().zip(&entries) {
        let given = args.iter().any(|(p, _, _)| Path::new(p) == e.path || *p == e.display_name);
        if c.picked && !given {
            // By hash: the library resolves it to this entry under its display name.
            args.push((e.sha256.clone(), 1.0, Some(c.role)));
        }
    }
    Ok(picks)
}

/// The mix plan of a job: `auto` keeps the LoRAs the prompt names when offered more than it asks
/// for; the subjects' trigger words are located in the prompt (for `auto`'s regions); the
/// candidates considered go to the trace.
pub fn plan_mix(
    pipe: &SdxlPipeline,
    targets: &AdapterTargets,
    loras: Vec<MixLora>,
    prompt: &str,
    strategy: &str,
    candidates: Vec<mix::candidates::Candidate>,
) -> Result<MixPlan> {
    let mut plan = MixPlan::new(targets, loras)?;
    if strategy == "auto" {
        let sim = mix::candidates::text_similarity(&pipe.text);
        plan.narrow_to_prompt(prompt, Some(&sim))?;
    }
    plan.candidates.splice(0..0, candidates);
    plan.locate_subjects(&pipe.text.tokenizer, prompt)?;
    Ok(plan)
}

/// A random seed in A1111's range.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64 ^ (std::process::id() as u64).rotate_left(32)) % 4_294_967_296
}

/// Loads models once and runs jobs on them.
#[derive(Default)]
pub struct Studio {
    loaded: Mutex<Option<(String, Arc<SdxlPipeline>, Previewer)>>,
}

impl Studio {
    pub fn new() -> Self {
        Self::default()
    }

    fn pipeline(&self, model: &str, vae: &str, library: Option<&Path>, on_event: &mut dyn FnMut(StudioEvent)) -> Result<(Arc<SdxlPipeline>, Previewer)> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        // A VAE override is part of what is loaded.
        let key = if vae.is_empty() { model.to_string() } else { format!("{model}\u{0}{vae}") };
        if let Some((m, p, prev)) = guard.as_ref() {
            if *m == key {
                return Ok((p.clone(), prev.clone()));
            }
        }
        on_event(StudioEvent::Loading { model: model.to_string() });
        let t0 = Instant::now();
        let opts = LoadOptions { vae: (!vae.is_empty()).then(|| PathBuf::from(vae)), ..LoadOptions::default() };
        let pipe = Arc::new(SdxlPipeline::load(model, &opts)?);
        // TAESD beside the model, or TAESDXL in the library's models folder, when present.
        let mut tiny_dirs = vec![Path::new(model).join("taesd")];
        if let Some(l) = library {
            tiny_dirs.push(l.join("models/taesdxl"));
        }
        let preview = match Previewer::find_tiny(&tiny_dirs, &pipe.device)? {
            Some(p) => p,
            None => Previewer::Linear(LatentPreview::fit(&pipe)?),
        };
        on_event(StudioEvent::Loaded { model: model.to_string(), seconds: t0.elapsed().as_secs_f64() });
        *guard = Some((key, pipe.clone(), preview.clone()));
        Ok((pipe, preview))
    }

    /// Runs a job: `batch_count` batches of `batch_size`, PNGs written atomically to `out_dir`.
    /// `on_preview` gets a latent preview after every step. Cancelling stops within one step
    /// and keeps the images already written.
    pub fn generate(
        &self,
        settings: &Settings,
        library: Option<&Path>,
        out_dir: &Path,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(StudioEvent),
        on_preview: &mut dyn FnMut(&image::RgbImage),
    ) -> Result<Vec<PathBuf>> {
        if settings.steps == 0 || settings.steps > 1000 {
            return Err(Error::Argument(format!("steps {}: expected 1 to 1000", settings.steps)));
        }
        if settings.batch_count == 0 || settings.batch_size == 0 {
            return Err(Error::Argument("batch count and batch size must be at least 1".into()));
        }
        let sampler = if settings.sampler.is_empty() { None } else { Some(settings.sampler.parse::<SamplerKind>()?) };
        let schedule: Schedule = settings.schedule.parse()?;
        let mut mix_opts = MixOptions {
            strategy: settings.mix.clone(),
            klora_pattern: settings.klora_pattern.clone(),
            klora_mode: "corrected".into(),
            switch_every: settings.switch_every.max(1),
            windows: settings.windows.clone(),
            asymmetric_cfg: settings.asymmetric_cfg,
            klora_others: settings.klora_others.clone(),
            ..Default::default()
        };
        if settings.mix == "est" {
            return Err(Error::Argument("the est strategy needs its DINO embedder; use the CLI's --mix est --est-embedder".into()));
        }
        mix::build(&mix_opts)?;
        let (prompt, mut tags) = lora::extract_prompt_loras(&settings.prompt)?;
        let (pipe, preview) = self.pipeline(&settings.model, &settings.vae, library, on_event)?;
        let targets = AdapterTargets::of_pipeline(&pipe);
        let mut args = Vec::new();
        for l in &settings.loras {
            match &l.schedule {
                // A schedule is written as in a prompt tag; it goes the tag's way.
                Some(fields) => {
                    let (_, mut t) = lora::extract_prompt_loras(&format!("<lora:{}:{fields}>", l.name))
                        .map_err(|e| Error::Argument(format!("LoRA {}: schedule {fields:?}: {e}", l.name)))?;
                    tags.append(&mut t);
                }
                None => args.push((l.name.clone(), l.weight, l.role.as_deref().map(parse_role).transpose()?)),
            }
        }
        let picked = if settings.candidates { library_candidates(&pipe, library, &prompt, &mut args)? } else { Vec::new() };
        let loaded = load_loras(&args, &tags, library, &Path::new(&settings.model).join("loras"), &targets)?;
        for r in &loaded.reports {
            on_event(StudioEvent::LoraLoaded { name: r.name.clone(), role: r.role.clone(), layers: r.layers, warnings: r.warnings.clone() });
        }
        let (dw, dh) = pipe.default_size();
        let given = |v: usize| (v != 0).then_some(v);
        let prepared = settings.init.as_ref().map(|i| prepare_init(i, (given(settings.width), given(settings.height)), pipe.vae_scale_factor())).transpose()?;
        let (w, h) = match &prepared {
            Some(p) => (p.width, p.height),
            None => (given(settings.width).unwrap_or(dw), given(settings.height).unwrap_or(dh)),
        };
        let (base, resolved) = schedulers::resolve(sampler.map_or_else(|| pipe.default_sampler(), Ok)?, schedule)?;
        let sampler_name = base.a1111_name().to_string();
        let schedule_name = if resolved == Schedule::Default { String::new() } else { resolved.a1111_name().to_string() };
        let seed0 = settings.seed.unwrap_or_else(random_seed);
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let mut written = vec![];
        let mut idx = output::first_free_index(out_dir);
        for batch in 0..settings.batch_count {
            let seed = seed0 + (batch * settings.batch_size) as u64;
            let req = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: (!settings.negative_prompt.is_empty()).then(|| settings.negative_prompt.clone()),
                steps: settings.steps,
                cfg: settings.cfg,
                sampler,
                schedule,
                clip_skip: settings.clip_skip,
                seed,
                width: Some(w),
                height: Some(h),
                batch_size: settings.batch_size,
                init_noise: None,
                init: prepared.as_ref().map(|p| p.init.clone()),
            };
            let mut mixer = if loaded.mix.is_empty() {
                None
            } else {
                let plan = plan_mix(&pipe, &targets, loaded.mix.clone(), &prompt, &mix_opts.strategy, picked.clone())?;
                mix_opts.est_previews = None;
                Some(Mixer::new(&targets, plan, mix::build(&mix_opts)?)?)
            };
            let batches = settings.batch_count;
            let latents = pipe.generate_latents_mixed(&req, mixer.as_mut().map(|m| m as &mut dyn StepMixer), &mut |p| {
                let its = p.step as f64 / p.elapsed.as_secs_f64().max(1e-9);
                let remaining = (p.steps - p.step) as f64 / its + ((batches - batch - 1) * p.steps) as f64 / its;
                on_event(StudioEvent::Step { batch, batches, step: p.step, steps: p.steps, its, eta_seconds: remaining });
                if let Some(l) = &p.latents {
                    if let Ok(img) = preview.render(l) {
                        on_preview(&img);
                    }
                }
                !cancel.load(Ordering::Relaxed)
            });
            let latents = match latents {
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                other => other?,
            };
            // Hires fix: the second pass reports its steps the same way (the UI shows both).
            let latents = match settings.hires.as_ref().filter(|_| settings.init.is_none()) {
                None => latents,
                Some(hr) => {
                    let second = hires_request(&pipe, &req, &latents, hr)?;
                    let mut hr_mixer = if loaded.mix.is_empty() {
                        None
                    } else {
                        let plan = plan_mix(&pipe, &targets, loaded.mix.clone(), &prompt, &mix_opts.strategy, picked.clone())?;
                        Some(Mixer::new(&targets, plan, mix::build(&mix_opts)?)?)
                    };
                    let out = pipe.generate_latents_mixed(&second, hr_mixer.as_mut().map(|m| m as &mut dyn StepMixer), &mut |p| {
                        let its = p.step as f64 / p.elapsed.as_secs_f64().max(1e-9);
                        on_event(StudioEvent::Step { batch, batches, step: p.step, steps: p.steps, its, eta_seconds: (p.steps - p.step) as f64 / its });
                        if let Some(l) = &p.latents {
                            if let Ok(img) = preview.render(l) {
                                on_preview(&img);
                            }
                        }
                        !cancel.load(Ordering::Relaxed)
                    });
                    match out {
                        Err(Error::Cancelled) => return Err(Error::Cancelled),
                        other => other?,
                    }
                }
            };
            let summary = mixer.take().map(|m| MixSummary::of(&m.finish()));
            if let Some(s) = &summary {
                on_event(StudioEvent::MixTrace { summary: s.clone() });
            }
            for (i, img) in pipe.decode(&latents)?.iter().enumerate() {
                let img = &match &prepared {
                    Some(p) => p.finish(img),
                    None => img.clone(),
                };
                let rec = ImageRecord {
                    settings: settings.clone(),
                    seed,
                    batch_index: batch,
                    index_in_batch: i,
                    width: w,
                    height: h,
                    sampler: sampler_name.clone(),
                    schedule: schedule_name.clone(),
                    lora_hashes: loaded.hashes.clone(),
                    mix_trace: summary.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                };
                let path = output::next_image_path(out_dir, seed, &mut idx);
                output::write_atomic(&path, &encode_image(img, &rec)?)?;
                on_event(StudioEvent::Image { path: path.clone(), seed, batch, index: i });
                written.push(path);
            }
        }
        Ok(written)
    }
}
