//! Running jobs: loading the model and the LoRAs once, planning the mix, then batches with
//! progress events, previews and cancellation, each image written atomically with its metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::hires::hires_request;
use super::init::prepare_init;
use super::metadata::encode_image_as;
use super::preview::{LatentPreview, Previewer};
use super::dynamic_prompt::{apply_styles, expand as expand_prompt, is_dynamic, read_styles, WildcardDir};
use super::settings::{DrawnPrompts, ImageRecord, MixSummary, Settings};
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
    /// `record`: what the picture records, which a JPEG or WebP keeps only as A1111 text.
    Image {
        path: PathBuf,
        seed: u64,
        batch: usize,
        index: usize,
        #[serde(skip)]
        record: Box<ImageRecord>,
    },
    /// A fixed-name image already there and valid, not made again.
    Kept { path: PathBuf },
    MixTrace { summary: MixSummary },
    /// Something the user should know about how the job runs (e.g. the VAE switched to tiles).
    Notice { message: String },
}

fn parse_role(r: &str) -> Result<Role> {
    Role::parse(r).ok_or_else(|| Error::Argument(format!("role {r:?}: expected subject, style or concept")))
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
    let sim = mix::candidates::text_similarity(pipe.text()?);
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
        let sim = mix::candidates::text_similarity(pipe.text()?);
        plan.narrow_to_prompt(prompt, Some(&sim))?;
    }
    plan.candidates.splice(0..0, candidates);
    plan.locate_subjects(&pipe.text()?.tokenizer, prompt)?;
    Ok(plan)
}

/// A random seed in A1111's range.
pub fn random_seed() -> u64 {
    // The clock, the process and a per-process count, mixed (splitmix64's finaliser), so two
    // draws in one clock tick (a grid's `seed=-1,-1`) differ and nearby ticks are far apart.
    static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut z = (t as u64 ^ (std::process::id() as u64).rotate_left(32)).wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % 4_294_967_296
}

/// Loads models once and runs jobs on them.
#[derive(Default)]
pub struct Studio {
    loaded: Mutex<Option<(String, Arc<SdxlPipeline>, Previewer)>>,
    /// Device, dtype and config folder for every model it loads (a job's VAE comes from its settings).
    load: LoadOptions,
    /// What mixes compute once, shared between the jobs of a batch (see [`MixSharing`]).
    shared: Mutex<SharedMix>,
    /// ControlNets loaded for earlier jobs.
    controlnets: super::ControlNets,
}

/// Mix computations kept between the jobs of a batch, all exact (the same inputs give the same
/// values): prepared strategies (weight statistics) and loaded LoRAs, each per LoRA set (the
/// given LoRAs, the library's picks for the prompt, and the prompt's tags).
#[derive(Default)]
struct SharedMix {
    on: bool,
    strategies: HashMap<String, Box<dyn mix::MixStrategy>>,
    loras: HashMap<String, Arc<LoadedLoras>>,
    stats: MixSharing,
}

/// How often a batch computed a mix's weight statistics and loaded its LoRAs, and how often
/// it reused them.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct MixSharing {
    pub statistics_computed: usize,
    pub statistics_shared: usize,
    pub loras_loaded: usize,
    pub loras_shared: usize,
}

impl Studio {
    pub fn new() -> Self {
        Self::default()
    }

    /// The device models run on (an Extras upscaler too).
    pub fn device(&self) -> &candle_core::Device {
        &self.load.device
    }

    pub fn with_load_options(load: LoadOptions) -> Self {
        Self { loaded: Mutex::default(), load: LoadOptions { vae: None, ..load }, shared: Mutex::default(), controlnets: Default::default() }
    }

    /// Batch-aware mixing: with `on`, jobs reuse the weight statistics of an earlier mix of the
    /// same LoRAs, and the loaded LoRAs and candidate scores of an earlier job with the same
    /// tags, LoRA list and prompt; off (the default, and for single jobs) every job computes its
    /// own. Returns the counts since the last call.
    pub fn share_mixes(&self, on: bool) -> MixSharing {
        let mut g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let stats = g.stats;
        *g = SharedMix { on, ..Default::default() };
        stats
    }

    /// Mix sharing on until the guard drops (off again then, if it was off): the jobs of one
    /// SD upscale, its tiles, load their LoRAs and compute their mix statistics once.
    pub(super) fn sharing_mixes(&self) -> SharingMixes<'_> {
        let mut g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let switched = !g.on;
        if switched {
            *g = SharedMix { on: true, ..Default::default() };
        }
        SharingMixes { studio: self, switched }
    }

    /// Pooled text embeddings of `prompts` (LoRA tags removed) under `model`'s encoders: what a
    /// batch clusters its prompts by.
    pub fn prompt_embeddings(&self, model: &str, vae: &str, library: Option<&Path>, prompts: &[String]) -> Result<Vec<Vec<f32>>> {
        let (pipe, _) = self.pipeline(model, vae, "", library, &mut |_| {})?;
        prompts
            .iter()
            .map(|p| {
                let (clean, _) = lora::extract_prompt_loras(p)?;
                mix::candidates::pooled_embedding(pipe.text()?, &clean)
            })
            .collect()
    }

    /// `dtype` empty: the studio's.
    pub(super) fn pipeline(&self, model: &str, vae: &str, dtype: &str, library: Option<&Path>, on_event: &mut dyn FnMut(StudioEvent)) -> Result<(Arc<SdxlPipeline>, Previewer)> {
        let dtype = if dtype.is_empty() { self.load.dtype } else { crate::device::parse_dtype(dtype)? };
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        // A VAE override and the dtype are part of what is loaded.
        let key = format!("{model}\u{0}{vae}\u{0}{dtype:?}");
        if let Some((m, p, prev)) = guard.as_ref() {
            if *m == key {
                return Ok((p.clone(), prev.clone()));
            }
        }
        on_event(StudioEvent::Loading { model: model.to_string() });
        let t0 = Instant::now();
        let opts = LoadOptions { vae: (!vae.is_empty()).then(|| PathBuf::from(vae)), dtype, ..self.load.clone() };
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

    /// Runs a job: `batch_count` batches of `batch_size`, PNGs written atomically to `out_dir`
    /// under A1111's next free numbers. `on_preview` gets a latent preview after every step.
    /// Cancelling stops within one step and keeps the images already written.
    pub fn generate(
        &self,
        settings: &Settings,
        library: Option<&Path>,
        out_dir: &Path,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(StudioEvent),
        on_preview: &mut dyn FnMut(&image::RgbImage),
    ) -> Result<Vec<PathBuf>> {
        let outputs = ImageOutputs { dir: out_dir, names: None, images: None, keep_interrupted: false, skip: None, format: Default::default() };
        Ok(self.run(settings, library, &outputs, cancel, on_event, on_preview)?.written)
    }

    /// Runs a job into `outputs`. With fixed names, an image whose file is already there and
    /// holds this job's image (same settings, seed and position, a PNG that decodes) is kept and
    /// not made again, so a killed run restarted finishes with nothing made twice.
    pub fn run(
        &self,
        settings: &Settings,
        library: Option<&Path>,
        outputs: &ImageOutputs,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(StudioEvent),
        on_preview: &mut dyn FnMut(&image::RgbImage),
    ) -> Result<JobOutput> {
        if settings.sd_upscale.is_some() {
            return self.run_sd_upscale(settings, library, outputs, cancel, on_event, on_preview);
        }
        if settings.steps == 0 || settings.steps > 1000 {
            return Err(Error::Argument(format!("steps {}: expected 1 to 1000", settings.steps)));
        }
        if settings.batch_count == 0 || settings.batch_size == 0 {
            return Err(Error::Argument("batch count and batch size must be at least 1".into()));
        }
        let total = outputs.images.unwrap_or(settings.batch_count * settings.batch_size);
        let sampler = if settings.sampler.is_empty() { None } else { Some(settings.sampler.parse::<SamplerKind>()?) };
        let schedule: Schedule = settings.schedule.parse()?;
        let mut mix_opts = MixOptions {
            strategy: settings.mix.clone(),
            klora_pattern: settings.klora_pattern.clone(),
            klora_mode: settings.klora_mode.clone().unwrap_or_else(|| "corrected".into()),
            switch_every: settings.switch_every.max(1),
            windows: settings.windows.clone(),
            asymmetric_cfg: settings.asymmetric_cfg,
            klora_others: settings.klora_others.clone(),
            np_mu: settings.np_mu,
            ..Default::default()
        };
        if settings.mix == "est" {
            return Err(Error::Argument("the est strategy needs its DINO embedder; use the CLI's --mix est --est-embedder".into()));
        }
        mix::build(&mix_opts)?;
        let library_root = || -> Result<PathBuf> {
            match library {
                Some(r) => Ok(r.to_path_buf()),
                None => LoraLibrary::default_root(),
            }
        };
        // Styles first (their text may hold wildcards), then draws per image.
        let (styled, styled_negative) = if settings.styles.is_empty() {
            (settings.prompt.clone(), settings.negative_prompt.clone())
        } else {
            let path = library_root()?.join("styles.csv");
            let styles = if path.exists() { read_styles(&path)? } else { vec![] };
            apply_styles(&settings.prompt, &settings.negative_prompt, &settings.styles, &styles)
                .map_err(|e| Error::Argument(format!("{e} ({})", path.display())))?
        };
        let dynamic = is_dynamic(&styled) || is_dynamic(&styled_negative);
        let wildcards = WildcardDir::of_library(&library_root().unwrap_or_default());
        let draw = |seed: u64| -> Result<(String, String)> {
            if !dynamic {
                return Ok((styled.clone(), styled_negative.clone()));
            }
            Ok((expand_prompt(&styled, &wildcards, seed)?, expand_prompt(&styled_negative, &wildcards, seed)?))
        };
        // Every prompt-level error (unclosed tags, missing wildcards) before the model loads.
        let seed0 = settings.seed.unwrap_or_else(random_seed);
        lora::extract_prompt_loras(&draw(seed0)?.0)?;
        if !(0.0..=1.0).contains(&settings.subseed_strength) {
            return Err(Error::Argument(format!("variation seed strength {}: expected 0 to 1", settings.subseed_strength)));
        }
        // A1111 draws a variation seed when none is given; image k's is subseed + k, and every
        // image keeps the job's seed (variations of one image).
        let varied = settings.subseed_strength != 0.0;
        let subseed0 = varied.then(|| settings.subseed.unwrap_or_else(random_seed));
        let subseed_of = |unit: &Unit| subseed0.map(|s| s.wrapping_add(unit.first as u64));
        let image_seed = |unit: &Unit, i: usize| settings.batch_seeds.seed_of_varied(unit.seed, i, varied);
        let unit_seed = |first: usize| if varied { seed0 } else { seed0.wrapping_add(first as u64) };
        // What one generation call makes: a batch sharing a prompt, or (when every image draws
        // its own prompt) one image with A1111's per-image seed.
        struct Unit {
            seed: u64,
            batch: usize,
            first: usize,
            count: usize,
        }
        let bs = settings.batch_size;
        let units: Vec<Unit> = if dynamic {
            (0..total).map(|k| Unit { seed: unit_seed(k), batch: k / bs, first: k, count: 1 }).collect()
        } else {
            (0..total.div_ceil(bs)).map(|b| Unit { seed: unit_seed(b * bs), batch: b, first: b * bs, count: bs.min(total - b * bs) }).collect()
        };
        let names_of = |unit: &Unit| -> Option<Vec<PathBuf>> { outputs.names.map(|n| (0..unit.count).map(|i| outputs.dir.join(n(unit.first + i))).collect()) };
        // Which fixed-name files already hold their image (same settings, seed and position).
        let kept_of = |unit: &Unit| -> Vec<bool> {
            match names_of(unit) {
                Some(paths) => paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| holds_image(p, settings, image_seed(unit, i), unit.batch, if dynamic { unit.first % bs } else { i }))
                    .collect(),
                None => vec![false; unit.count],
            }
        };
        let kept: Vec<Vec<bool>> = units.iter().map(kept_of).collect();
        let mut out = JobOutput::default();
        if outputs.names.is_some() && kept.iter().flatten().all(|k| *k) {
            // A finished job: nothing to load.
            for p in units.iter().filter_map(names_of).flatten() {
                on_event(StudioEvent::Kept { path: p.clone() });
                out.kept.push(p);
            }
            return Ok(out);
        }
        let (pipe, preview) = self.pipeline(&settings.model, &settings.vae, &settings.dtype, library, on_event)?;
        let targets = AdapterTargets::of_pipeline(&pipe);
        let embeddings = super::job_embeddings(&settings.model, library, &settings.embeddings)?;
        let control = super::control_units(&settings.controlnet, &pipe, &self.controlnets)?;
        let hires_model = match settings.hires.as_ref().filter(|_| settings.init.is_none()) {
            Some(hr) => super::hires_upscaler_model(hr, library, &pipe.device)?,
            None => None,
        };
        let mut scheduled_tags = Vec::new();
        let mut args = Vec::new();
        for l in &settings.loras {
            match &l.schedule {
                // A schedule is written as in a prompt tag; it goes the tag's way.
                Some(fields) => {
                    let (_, mut t) = lora::extract_prompt_loras(&format!("<lora:{}:{fields}>", l.name))
                        .map_err(|e| Error::Argument(format!("LoRA {}: schedule {fields:?}: {e}", l.name)))?;
                    scheduled_tags.append(&mut t);
                }
                None => args.push((l.name.clone(), l.weight, l.role.as_deref().map(parse_role).transpose()?)),
            }
        }
        let (dw, dh) = pipe.default_size();
        let given = |v: usize| (v != 0).then_some(v);
        let prepared = settings.init.as_ref().map(|i| prepare_init(i, (given(settings.width), given(settings.height)), pipe.vae_scale_factor())).transpose()?;
        let mut control = control;
        if let Some(p) = &prepared {
            control.iter_mut().for_each(|u| p.fit_control(u));
        }
        let (w, h) = match &prepared {
            Some(p) => (p.width, p.height),
            None => (given(settings.width).unwrap_or(dw), given(settings.height).unwrap_or(dh)),
        };
        super::control::check_pass_sizes(&control, (w, h), settings.init.is_some(), settings.hires.as_ref().filter(|_| settings.init.is_none()), pipe.vae_scale_factor())?;
        let (base, resolved) = schedulers::resolve(sampler.map_or_else(|| pipe.default_sampler(), Ok)?, schedule)?;
        let sampler_name = base.a1111_name().to_string();
        let schedule_name = if resolved == Schedule::Default { String::new() } else { resolved.a1111_name().to_string() };
        std::fs::create_dir_all(outputs.dir).map_err(|e| Error::io(outputs.dir, e))?;
        let batches = units.len();
        let mut loaded_for: Vec<(String, Arc<LoadedLoras>)> = vec![];
        let mut scored: Vec<(String, Vec<(String, f64, Option<Role>)>, Vec<mix::candidates::Candidate>)> = vec![];
        let mut idx = output::first_free_index(outputs.dir);
        let mut skipped_networks: Vec<String> = Vec::new();
        let model_hash = super::model_hash::model_shorthash(&settings.model).unwrap_or_default();
        for (u, unit) in units.iter().enumerate() {
            // A Skip pressed between batches (loading, decoding) is dropped, as in A1111.
            if let Some(s) = outputs.skip {
                s.store(false, Ordering::SeqCst);
            }
            let recorded = settings.recorded();
            let record = |i: usize, hashes: Vec<(String, String)>, ti_hashes: Vec<(String, String)>, summary: Option<MixSummary>, drawn: Option<DrawnPrompts>| ImageRecord {
                settings: recorded.clone(),
                seed: image_seed(unit, i),
                batch_index: unit.batch,
                index_in_batch: if dynamic { unit.first % bs } else { i },
                width: w,
                height: h,
                sampler: sampler_name.clone(),
                schedule: schedule_name.clone(),
                lora_hashes: hashes,
                subseed: subseed_of(unit).map(|s| settings.batch_seeds.seed_of(s, i)),
                model_hash: model_hash.clone(),
                ti_hashes,
                mix_trace: summary,
                version: env!("CARGO_PKG_VERSION").to_string(),
                drawn,
            };
            let fixed = names_of(unit);
            let keep = &kept[u];
            if keep.iter().all(|k| *k) {
                for p in fixed.iter().flatten() {
                    on_event(StudioEvent::Kept { path: p.clone() });
                    out.kept.push(p.clone());
                }
                continue;
            }
            let (prompt_drawn, negative_drawn) = draw(unit.seed)?;
            let (prompt, mut tags, skipped) = lora::extract_extra_networks(&prompt_drawn)?;
            for kind in skipped {
                if !skipped_networks.contains(&kind) {
                    // A1111's "Skipping unknown extra network": the tag leaves the prompt.
                    on_event(StudioEvent::Notice { message: format!("skipping the prompt's <{kind}:…> tags: not a network this app has (LoRA tags are <lora:…> or <lyco:…>)") });
                    skipped_networks.push(kind);
                }
            }
            tags.extend(scheduled_tags.iter().cloned());
            // The library's candidates are scored per prompt (text only, cheap; sharing picks
            // between prompts gave prompts other subjects' LoRAs), once per distinct prompt.
            let (job_args, picked) = match scored.iter().find(|(p, _, _)| *p == prompt) {
                Some((_, a, c)) => (a.clone(), c.clone()),
                None => {
                    let mut job_args = args.clone();
                    let picked = if settings.candidates { library_candidates(&pipe, library, &prompt, &mut job_args)? } else { Vec::new() };
                    scored.push((prompt.clone(), job_args.clone(), picked.clone()));
                    (job_args, picked)
                }
            };
            // LoRAs load once per distinct set (given, picked and `<lora:…>` tags, which
            // wildcards may draw), in a job and across the jobs of a batch.
            let key = format!(
                "{}\u{0}{}\u{0}{}\u{0}{}",
                settings.model,
                library.map(|l| l.display().to_string()).unwrap_or_default(),
                job_args.iter().map(|(n, w, r)| format!("{n}:{w}:{r:?}")).collect::<Vec<_>>().join(","),
                tags.iter().map(|t| t.text.as_str()).collect::<Vec<_>>().join("\u{1}"),
            );
            if !loaded_for.iter().any(|(k, _)| *k == key) {
                // An earlier job of the batch loaded the same LoRAs.
                let batch_cached = {
                    let g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                    g.on.then(|| g.loras.get(&key).cloned()).flatten()
                };
                if let Some(l) = batch_cached {
                    if !l.reports.is_empty() {
                        self.shared.lock().unwrap_or_else(|e| e.into_inner()).stats.loras_shared += 1;
                    }
                    loaded_for.push((key.clone(), l));
                }
            }
            let loaded = match loaded_for.iter().find(|(k, _)| *k == key) {
                Some((_, l)) => l.clone(),
                None => {
                    // The model's own `loras/`, a bare shipped name (`Model: miniworld`) included.
                    let model_dir = crate::hub::shipped(&settings.model).unwrap_or_else(|| PathBuf::from(&settings.model));
                    let l = load_loras(&job_args, &tags, library, &model_dir.join("loras"), &targets)?;
                    for r in &l.reports {
                        on_event(StudioEvent::LoraLoaded { name: r.name.clone(), role: r.role.clone(), layers: r.layers, warnings: r.warnings.clone() });
                    }
                    let l = Arc::new(l);
                    let mut g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                    // A job without LoRAs loads an empty set: nothing to count.
                    if !l.reports.is_empty() {
                        g.stats.loras_loaded += 1;
                    }
                    if g.on {
                        if g.loras.len() >= 64 {
                            g.loras.clear();
                        }
                        g.loras.insert(key.clone(), l.clone());
                    }
                    drop(g);
                    loaded_for.push((key, l.clone()));
                    l
                }
            };
            let (loaded, picked) = (&*loaded, &picked);
            for r in &loaded.reports {
                if !out.loras.contains(&r.name) {
                    out.loras.push(r.name.clone());
                }
            }
            let req = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: (!negative_drawn.is_empty() || settings.encode_empty_negative).then(|| negative_drawn.clone()),
                steps: settings.steps,
                cfg: settings.cfg,
                sampler,
                schedule,
                clip_skip: settings.clip_skip,
                timestep_spacing: (!settings.timestep_spacing.is_empty()).then(|| settings.timestep_spacing.clone()),
                seed: unit.seed,
                batch_seeds: settings.batch_seeds,
                width: Some(w),
                height: Some(h),
                batch_size: unit.count,
                init_noise: None,
                init: prepared.as_ref().map(|p| p.init.clone()),
                embeddings: embeddings.clone(),
                variation: subseed_of(unit).map(|seed| crate::rng::Variation { seed, strength: settings.subseed_strength }),
                seamless: settings.seamless()?,
                seed_resize_from: settings.seed_resize_from(),
                eta_noise_seed_delta: settings.eta_noise_seed_delta,
                control: control.clone(),
                hires_of: None,
            };
            let ti_hashes = super::embedding_hashes(&pipe, &req)?;
            let new_mixer = |mix_opts: &MixOptions| -> Result<Option<Mixer>> {
                if loaded.mix.is_empty() {
                    return Ok(None);
                }
                let plan = plan_mix(&pipe, &targets, loaded.mix.clone(), &prompt, &mix_opts.strategy, picked.clone())?;
                let key = mix_key(&settings.model, &settings.vae, mix_opts, &plan);
                let shared = {
                    let g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                    g.strategies.get(&key).and_then(|s| s.share())
                };
                if let Some(strategy) = shared {
                    self.shared.lock().unwrap_or_else(|e| e.into_inner()).stats.statistics_shared += 1;
                    return Ok(Some(Mixer::prepared(&targets, plan, strategy)?));
                }
                let m = Mixer::new(&targets, plan, mix::build(mix_opts)?)?;
                let mut g = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                g.stats.statistics_computed += 1;
                if g.on {
                    if let Some(s) = m.share_strategy() {
                        if g.strategies.len() >= 64 {
                            g.strategies.clear();
                        }
                        g.strategies.insert(key, s);
                    }
                }
                Ok(Some(m))
            };
            mix_opts.est_previews = None;
            let mut mixer = new_mixer(&mix_opts)?;
            let last_denoised: std::cell::RefCell<Option<candle_core::Tensor>> = Default::default();
            // An interrupted pass ends on the clean latents its last step predicted, where the
            // job keeps them.
            let partial = || if outputs.keep_interrupted { last_denoised.borrow_mut().take() } else { None };
            // `cut`: the first pass stopped early (no hires pass follows).
            let (mut interrupted, mut cut) = (false, false);
            let mut progress = |p: &crate::sdxl::pipeline::StepProgress, rest_units: usize| {
                if outputs.keep_interrupted {
                    *last_denoised.borrow_mut() = p.denoised.clone();
                }
                let its = p.step as f64 / p.elapsed.as_secs_f64().max(1e-9);
                let remaining = (p.steps - p.step) as f64 / its + (rest_units * p.steps) as f64 / its;
                on_event(StudioEvent::Step { batch: u, batches, step: p.step, steps: p.steps, its, eta_seconds: remaining });
                if let Some(l) = &p.latents {
                    if let Ok(img) = preview.render(l) {
                        on_preview(&img);
                    }
                }
                !cancel.load(Ordering::Relaxed) && !outputs.skip.is_some_and(|s| s.load(Ordering::Relaxed))
            };
            // A stopped pass: Skip (its flag taken) ends this batch only, Interrupt the job.
            let stopped = || {
                let skipped = outputs.skip.is_some_and(|s| s.swap(false, Ordering::SeqCst)) && !cancel.load(Ordering::SeqCst);
                (skipped, partial())
            };
            let latents = pipe.generate_latents_mixed(&req, mixer.as_mut().map(|m| m as &mut dyn StepMixer), &mut |p| progress(p, batches - u - 1));
            let latents = match latents {
                Err(Error::Cancelled) => match stopped() {
                    (skipped, Some(l)) => {
                        (interrupted, cut) = (!skipped, true);
                        l
                    }
                    (true, None) => continue,
                    (false, None) => return Err(Error::Cancelled),
                },
                other => other?,
            };
            // Hires fix: the second pass reports its steps the same way (the UI shows both).
            let latents = match settings.hires.as_ref().filter(|_| settings.init.is_none() && !cut) {
                None => latents,
                Some(hr) => {
                    let second = hires_request(&pipe, &req, &latents, hr, hires_model.as_ref())?;
                    let mut hr_mixer = new_mixer(&mix_opts)?;
                    let out = pipe.generate_latents_mixed(&second, hr_mixer.as_mut().map(|m| m as &mut dyn StepMixer), &mut |p| progress(p, 0));
                    match out {
                        Err(Error::Cancelled) => match stopped() {
                            (skipped, Some(l)) => {
                                interrupted = !skipped;
                                l
                            }
                            (true, None) => continue,
                            (false, None) => return Err(Error::Cancelled),
                        },
                        other => other?,
                    }
                }
            };
            let summary = mixer.take().map(|m| MixSummary::of(&m.finish()));
            if let Some(s) = &summary {
                on_event(StudioEvent::MixTrace { summary: s.clone() });
            }
            let drawn = (prompt_drawn != settings.prompt || negative_drawn != settings.negative_prompt)
                .then(|| DrawnPrompts { prompt: prompt_drawn.clone(), negative_prompt: negative_drawn.clone() });
            if let Ok((b, _, h, w)) = latents.dims4() {
                let f = pipe.vae_scale_factor();
                if let Some(message) = pipe.vae_plan(b, h * f, w * f).note {
                    on_event(StudioEvent::Notice { message });
                }
            }
            for (i, img) in pipe.decode(&latents)?.iter().enumerate() {
                if keep[i] {
                    if let Some(p) = fixed.as_ref().map(|f| f[i].clone()) {
                        on_event(StudioEvent::Kept { path: p.clone() });
                        out.kept.push(p);
                    }
                    continue;
                }
                let img = &match &prepared {
                    Some(p) => p.finish(img),
                    None => img.clone(),
                };
                let rec = record(i, loaded.hashes.clone(), ti_hashes.clone(), summary.clone(), drawn.clone());
                let (path, format) = match &fixed {
                    Some(f) => (f[i].clone(), super::SamplesFormat::Png),
                    None => {
                        let (format, note) = outputs.format.or_png(img.width(), img.height(), &super::parameters_text(&rec));
                        if let Some(message) = note {
                            on_event(StudioEvent::Notice { message });
                        }
                        (output::next_image_path(outputs.dir, rec.seed, format.extension(), &mut idx), format)
                    }
                };
                output::write_atomic(&path, &encode_image_as(img, &rec, format)?)?;
                on_event(StudioEvent::Image { path: path.clone(), seed: rec.seed, batch: unit.batch, index: rec.index_in_batch, record: Box::new(rec.clone()) });
                out.written.push(path);
            }
            out.prompts.push(prompt_drawn);
            if interrupted {
                return Err(Error::Cancelled);
            }
        }
        Ok(out)
    }
}

/// [`Studio::sharing_mixes`]'s guard.
pub(super) struct SharingMixes<'a> {
    studio: &'a Studio,
    switched: bool,
}

impl Drop for SharingMixes<'_> {
    fn drop(&mut self) {
        if self.switched {
            *self.studio.shared.lock().unwrap_or_else(|e| e.into_inner()) = SharedMix::default();
        }
    }
}

/// What identifies a prepared strategy: the model, the strategy's options and every LoRA's
/// file hash, role, strength and schedule, in order.
fn mix_key(model: &str, vae: &str, opts: &MixOptions, plan: &MixPlan) -> String {
    let loras: Vec<String> = plan
        .loras
        .iter()
        .map(|l| format!("{}:{}:{}:{:?}", l.lora.addnet_hash, l.role.as_str(), l.strength, l.schedule.as_ref().map(|s| format!("{s:?}"))))
        .collect();
    format!(
        "{model}\u{0}{vae}\u{0}{}|{:?}|{}|{:?}|{}|{:?}|{:?}\u{0}{}",
        opts.strategy,
        opts.klora_pattern,
        opts.switch_every,
        opts.windows,
        opts.asymmetric_cfg,
        opts.klora_others,
        opts.np_mu,
        loras.join(",")
    )
}

/// Where a job's images go and how many it makes.
pub struct ImageOutputs<'a> {
    pub dir: &'a Path,
    /// A fixed file name per image index; `None`: A1111's next free `NNNNN-<seed>.png`.
    pub names: Option<&'a dyn Fn(usize) -> String>,
    /// Images to make; `None`: `batch_count × batch_size`.
    pub images: Option<usize>,
    /// An interrupted batch is decoded from the clean latents its last step predicted and
    /// written, as A1111's Interrupt does (the job still ends `Cancelled`). Off: only finished
    /// images are written, which fixed names need (a half-denoised file would pass as done).
    pub keep_interrupted: bool,
    /// A1111's Skip: when set, the running batch ends as an interrupted one would (kept under
    /// `keep_interrupted`, else dropped) and the job goes on with the next; the flag is cleared.
    pub skip: Option<&'a AtomicBool>,
    /// The file type of numbered pictures (fixed names are always PNGs, which keep the record
    /// that tells a finished file).
    pub format: super::SamplesFormat,
}

/// What a job did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct JobOutput {
    pub written: Vec<PathBuf>,
    /// Fixed-name files that already held their image.
    pub kept: Vec<PathBuf>,
    /// The prompt of each generation call as drawn (styles and dynamic prompts applied).
    pub prompts: Vec<String>,
    /// The LoRAs the job's mixes used (given and picked from the library), by name.
    pub loras: Vec<String>,
}

/// Whether `path` is a complete PNG of this image of the job: its record names the same
/// settings, seed and position, and its pixels decode at the size the record gives.
pub fn holds_image(path: &Path, settings: &Settings, seed: u64, batch_index: usize, index_in_batch: usize) -> bool {
    if !path.is_file() {
        return false;
    }
    let Ok((_, Some(rec))) = super::metadata::settings_from_image(path) else { return false };
    if rec.settings != settings.recorded() || rec.seed != seed || rec.batch_index != batch_index || rec.index_in_batch != index_in_batch {
        return false;
    }
    // The record's size is the first pass's (A1111's `Size`); a hires image is its upscale,
    // rounded down to the model's VAE factor, which the record does not name. An SD upscale's
    // is its tiles', and the picture the upscaled init image's size.
    if settings.sd_upscale.is_some() {
        return image::open(path).is_ok();
    }
    let hires = settings.hires.as_ref().filter(|_| settings.init.is_none());
    let sizes: Vec<(usize, usize)> = match hires {
        Some(hr) => (0..7).filter_map(|k| super::hires_size(hr, (rec.width, rec.height), 1 << k).ok()).collect(),
        None => vec![(rec.width, rec.height)],
    };
    match image::open(path) {
        Ok(img) => sizes.contains(&(img.width() as usize, img.height() as usize)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    /// Draws in quick succession (one clock tick, as a grid's `seed=-1,-1`) all differ, and stay
    /// A1111's 32-bit seeds.
    #[test]
    fn random_seeds_differ_within_a_tick() {
        let seeds: std::collections::HashSet<u64> = (0..300).map(|_| super::random_seed()).collect();
        assert_eq!(seeds.len(), 300, "a repeat among 300 draws (chance about 1e-5)");
        assert!(seeds.iter().all(|&s| s < 1 << 32));
    }
}
