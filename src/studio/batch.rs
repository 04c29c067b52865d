//! Batch manifests: one job per JSONL line, in the [`Settings`] JSON our PNGs carry, run into
//! names the manifest fixes, so a run can be killed, restarted, sharded or retried by a
//! scheduler that delivers at least once, and still makes each image exactly once.
//!
//! - A line is a `Settings` object, plus `"images": N` for how many images it makes (default
//!   `batch_count × batch_size`). Blank lines and lines starting with `#` or `//` are skipped but
//!   keep their numbers, so errors and names match the editor's line numbers.
//! - Image `k` of the job on line `L` is `LLLLL-KKKK.png` (`00003-0000.png`): a name fixed by
//!   the manifest, never a counter. A line without a seed gets one from its own text (SHA-256 of
//!   its settings), so its bytes depend on the line alone: no timestamp, no path.
//! - `--shard I/N` runs the lines whose index (0-based, counting job lines only) is `I mod N`;
//!   `I` is 1..=N, and 0 is read as N, so shards counted from 0 or from 1 both cover every line.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::jobs::{ImageOutputs, Studio, StudioEvent};
use super::settings::Settings;
use crate::error::{Error, Result};
use crate::output;

/// One job of a manifest.
#[derive(Debug, Clone)]
pub struct ManifestJob {
    /// 1-based line number in the file.
    pub line: usize,
    /// With its seed fixed (given, or from the line's text).
    pub settings: Settings,
    pub images: usize,
}

/// A line that is not a job, with its number.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub error: String,
}

/// Every job of a manifest, and the lines that are not jobs.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    pub jobs: Vec<ManifestJob>,
    pub errors: Vec<LineError>,
}

/// Which share of the jobs this run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1..=count
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Argument(format!("--shard {s:?}: expected I/N with 1 <= I <= N (0/N is read as N/N)"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if n == 0 || i > n {
            return Err(bad());
        }
        Ok(Self { index: if i == 0 { n } else { i }, count: n })
    }
}

impl Shard {
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    pub fn takes(&self, job_index: usize) -> bool {
        job_index % self.count == self.index % self.count
    }

    pub fn label(&self) -> String {
        format!("{}/{}", self.index, self.count)
    }
}

/// The keys a line may hold: every `Settings` field and `images`.
fn known_keys() -> Vec<String> {
    let full = Settings {
        schedule: "x".into(),
        vae: "x".into(),
        clip_skip: 1,
        tiling: "xy".into(),
        timestep_spacing: "x".into(),
        batch_seeds: crate::rng::BatchSeeds::PerImage,
        hires: Some(Default::default()),
        init: Some(Default::default()),
        sd_upscale: Some(Default::default()),
        styles: vec!["x".into()],
        embeddings: vec!["x".into()],
        controlnet: vec![Default::default()],
        encode_empty_negative: true,
        dtype: "x".into(),
        klora_mode: Some("x".into()),
        np_mu: Some(1.0),
        subseed: Some(1),
        subseed_strength: 0.5,
        seed_resize_from_w: 8,
        seed_resize_from_h: 8,
        eta_noise_seed_delta: 1,
        ..Settings::default()
    };
    match serde_json::to_value(full) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => vec![],
    }
}

/// A seed from the line's settings alone, in A1111's range.
pub fn seed_of(settings: &Settings) -> u64 {
    let text = serde_json::to_string(settings).unwrap_or_default();
    let d = Sha256::digest(text.as_bytes());
    u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as u64
}

/// Parses one manifest line's text.
pub fn parse_line(text: &str) -> std::result::Result<(Settings, Option<usize>), String> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m).to_string();
        format!("column {}: malformed JSON: {msg}", e.column())
    })?;
    let obj = value.as_object_mut().ok_or("expected a JSON object with the job's settings")?;
    let images = match obj.remove("images") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=100_000).contains(&n) => Some(n as usize),
            _ => return Err(format!("field images: {v}: expected a whole number from 1 to 100000")),
        },
    };
    // A1111's -1: no seed given (the line's own, below).
    for key in ["seed", "subseed", "seed_resize_from_w", "seed_resize_from_h"] {
        if obj.get(key).and_then(serde_json::Value::as_i64) == Some(-1) {
            obj.remove(key);
        }
    }
    let known = known_keys();
    if let Some(k) = obj.keys().find(|k| !known.contains(k)) {
        let mut names = known.clone();
        names.sort();
        return Err(format!("field {k}: unknown (expected images or one of {})", names.join(", ")));
    }
    let settings: Settings = serde_path_to_error::deserialize(value).map_err(|e| format!("field {}: {}", e.path(), e.inner()))?;
    if settings.prompt.trim().is_empty() && settings.init.is_none() {
        return Err("field prompt: expected a prompt".into());
    }
    if settings.batch_count == 0 || settings.batch_size == 0 {
        return Err("fields batch_count and batch_size: expected at least 1".into());
    }
    for (name, v) in [("width", settings.width), ("height", settings.height)] {
        if v != 0 && !super::settings::side_fits_any_model(v) {
            return Err(format!("field {name}: {v}: expected a multiple of the model's VAE factor (8 for SDXL) up to {}", crate::sdxl::pipeline::MAX_SIDE));
        }
    }
    if settings.steps == 0 || settings.steps > 1000 {
        return Err(format!("field steps: {}: expected 1 to 1000", settings.steps));
    }
    if settings.switch_every == 0 {
        return Err("field switch_every: 0: expected at least 1".into());
    }
    if settings.init.as_ref().is_some_and(|i| i.image.is_empty()) {
        return Err("field init.image: expected the init image's path".into());
    }
    if !(0.0..=1.0).contains(&settings.subseed_strength) {
        return Err(format!("field subseed_strength: {}: expected 0 to 1", settings.subseed_strength));
    }
    for (name, v) in [("seed_resize_from_w", settings.seed_resize_from_w), ("seed_resize_from_h", settings.seed_resize_from_h)] {
        if v != 0 && !(8..=crate::sdxl::pipeline::MAX_SIDE).contains(&v) {
            return Err(format!("field {name}: {v}: expected -1, 0 or a size from 8 to {} pixels", crate::sdxl::pipeline::MAX_SIDE));
        }
    }
    Ok((settings, images))
}

impl Manifest {
    /// A JSONL manifest, or a picture of ours or A1111's (PNG, JPEG, WebP): one job that makes
    /// that image again (its line number is 1).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if matches!(image::guess_format(&bytes), Ok(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP)) {
            return Ok(Self::parse(&image_line(path)?));
        }
        let picture_name = path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str()));
        if picture_name {
            return Err(Error::BadFile { path: path.into(), message: "expected a PNG, JPEG or WebP picture, but its content is none of them".into() });
        }
        let text = String::from_utf8(bytes).map_err(|e| Error::BadFile { path: path.into(), message: format!("not a UTF-8 JSONL manifest (or a PNG, JPEG or WebP picture): {e}") })?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        // Editors on Windows may start the file with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut m = Manifest::default();
        for (i, raw) in text.lines().enumerate() {
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') || t.starts_with("//") {
                continue;
            }
            match parse_line(t) {
                Ok((mut settings, images)) => {
                    if settings.seed.is_none() {
                        settings.seed = Some(seed_of(&settings));
                    }
                    // A rerun must make the same images: a variation seed from the line too.
                    if settings.subseed.is_none() && settings.subseed_strength != 0.0 {
                        settings.subseed = Some(seed_of(&settings));
                    }
                    // An SD upscale makes one picture per batch; its batch size groups tiles.
                    let per_batch = if settings.sd_upscale.is_some() { 1 } else { settings.batch_size };
                    let images = images.unwrap_or(settings.batch_count * per_batch);
                    m.jobs.push(ManifestJob { line: i + 1, settings, images });
                }
                Err(error) => m.errors.push(LineError { line: i + 1, error }),
            }
        }
        m
    }
}

/// The fixed name of image `image` of the job on `line`.
pub fn image_name(line: usize, image: usize) -> String {
    format!("{line:05}-{image:04}.png")
}

/// What one manifest line did.
#[derive(Debug, Clone, Serialize)]
pub struct LineSummary {
    pub line: usize,
    pub prompt: String,
    pub seed: u64,
    pub images: Vec<String>,
    pub written: usize,
    pub kept: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A cluster of the manifest's prompts (batch-aware mixing) and the mixes its lines used.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSummary {
    pub id: usize,
    pub model: String,
    /// The member nearest the centroid.
    pub prompt: String,
    pub lines: Vec<usize>,
    /// `strategy: LoRA, LoRA` per distinct mix among this shard's lines of the cluster.
    pub mixes: Vec<String>,
}

/// `batch.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    pub manifest: String,
    pub shard: String,
    /// Jobs of this shard.
    pub jobs: usize,
    /// Images this shard is to make.
    pub images: usize,
    pub written: usize,
    /// Already there and valid, so not made again.
    pub kept: usize,
    pub failed_lines: usize,
    pub seconds: f64,
    /// Lines that are not jobs (every shard reports them).
    pub errors: Vec<LineError>,
    /// Batch-aware mixing: the prompt clusters (over the whole manifest, so every shard agrees),
    /// and how often weight statistics and candidate scores were computed versus reused.
    pub batch_aware: bool,
    pub clusters: Vec<ClusterSummary>,
    pub sharing: super::jobs::MixSharing,
    pub lines: Vec<LineSummary>,
}

impl BatchSummary {
    /// `batch.json` for the whole manifest, `batch.shard-I-of-N.json` for a shard.
    pub fn file_name(shard: Shard) -> String {
        if shard.count == 1 {
            "batch.json".into()
        } else {
            format!("batch.shard-{}-of-{}.json", shard.index, shard.count)
        }
    }
}

/// Progress of a batch run over the whole manifest (this shard's share).
#[derive(Debug, Clone)]
pub enum BatchEvent {
    Started { jobs: usize, images: usize },
    /// An image made or found: `done` of `total`.
    Image { line: usize, path: PathBuf, kept: bool, done: usize, total: usize },
    LineFailed { line: usize, error: String },
    Step { line: usize, step: usize, steps: usize },
}

/// k-means with cosine distance on unit vectors, seeded by farthest points from the first
/// (deterministic: every shard of a manifest must find the same clusters). Why ours: a dozen
/// lines over a few thousand short vectors, where a clustering crate would bring a linear-algebra
/// stack with it. Returns each vector's cluster.
pub fn kmeans(vectors: &[Vec<f32>], k: usize) -> Vec<usize> {
    let n = vectors.len();
    if n == 0 || k <= 1 {
        return vec![0; n];
    }
    let unit: Vec<Vec<f32>> = vectors
        .iter()
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter().map(|x| x / norm).collect()
        })
        .collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut centres = vec![unit[0].clone()];
    while centres.len() < k.min(n) {
        let far = (0..n)
            .map(|i| (i, centres.iter().map(|c| dot(&unit[i], c)).fold(f32::MIN, f32::max)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .map_or(0, |(i, _)| i);
        centres.push(unit[far].clone());
    }
    let mut assign = vec![0usize; n];
    for _ in 0..50 {
        let next: Vec<usize> = unit
            .iter()
            .map(|v| (0..centres.len()).max_by(|&a, &b| dot(v, &centres[a]).total_cmp(&dot(v, &centres[b])).then(b.cmp(&a))).unwrap_or(0))
            .collect();
        let moved = next != assign;
        assign = next;
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&Vec<f32>> = unit.iter().zip(&assign).filter(|(_, a)| **a == c).map(|(v, _)| v).collect();
            if members.is_empty() {
                continue;
            }
            let mut m = vec![0f32; centre.len()];
            for v in &members {
                for (x, y) in m.iter_mut().zip(v.iter()) {
                    *x += y;
                }
            }
            let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            *centre = m.iter().map(|x| x / norm).collect();
        }
        if !moved {
            break;
        }
    }
    assign
}

/// Clusters the manifest's jobs by their prompts' pooled text embeddings, per model: `k` is
/// ⌈√n⌉ (at most 16). Returns per job its cluster id (global) and the clusters' representatives.
/// Jobs whose model cannot be read (or one of whose prompts cannot be) stay out of the clusters:
/// each fails on its own line when it runs, and the others still run.
fn cluster_jobs(studio: &Studio, manifest: &Manifest, library: Option<&Path>) -> (Vec<Option<usize>>, Vec<(String, String, Vec<usize>)>) {
    let mut of_job = vec![None; manifest.jobs.len()];
    let mut clusters = vec![];
    let mut models: Vec<(String, String)> = manifest.jobs.iter().map(|j| (j.settings.model.clone(), j.settings.vae.clone())).collect();
    models.sort();
    models.dedup();
    for (model, vae) in models {
        let idx: Vec<usize> = (0..manifest.jobs.len()).filter(|&i| manifest.jobs[i].settings.model == model && manifest.jobs[i].settings.vae == vae).collect();
        let prompts: Vec<String> = idx.iter().map(|&i| manifest.jobs[i].settings.prompt.clone()).collect();
        let Ok(emb) = studio.prompt_embeddings(&model, &vae, library, &prompts) else { continue };
        let k = ((idx.len() as f64).sqrt().ceil() as usize).clamp(1, 16);
        let assign = kmeans(&emb, k);
        for c in 0..k {
            let members: Vec<usize> = (0..idx.len()).filter(|&m| assign[m] == c).collect();
            if members.is_empty() {
                continue;
            }
            // The representative: the member with the largest summed similarity to the others.
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt()).max(1e-12);
            let rep = members.iter().copied().max_by(|&a, &b| {
                let sa: f32 = members.iter().map(|&m| dot(&emb[a], &emb[m])).sum();
                let sb: f32 = members.iter().map(|&m| dot(&emb[b], &emb[m])).sum();
                sa.total_cmp(&sb).then(b.cmp(&a))
            });
            let id = clusters.len();
            for &m in &members {
                of_job[idx[m]] = Some(id);
            }
            let rep_prompt = rep.map(|r| crate::lora::extract_prompt_loras(&prompts[r]).map(|(p, _)| p.trim().to_string()).unwrap_or_default()).unwrap_or_default();
            clusters.push((model.clone(), rep_prompt, members.iter().map(|&m| manifest.jobs[idx[m]].line).collect()));
        }
    }
    (of_job, clusters)
}

/// Runs the shard's jobs of `manifest` into `out`, then writes the summary there atomically.
/// A job that fails is reported with its line number and the others still run. With
/// `batch_aware`, the jobs' prompts are clustered (reported per cluster with the mixes used)
/// and every mix of the same LoRAs shares its weight statistics and loaded LoRAs (exact:
/// the same inputs give the same values); without it each job computes its own.
///
/// Scoring library candidates once per cluster, on its representative prompt, was tried and
/// dropped: on miniworld the pooled text embeddings group prompts by layout and background more
/// than by subject, so a cluster's shared picks gave most of its lines another subject's LoRA.
#[allow(clippy::too_many_arguments)]
pub fn run_batch(
    studio: &Studio,
    manifest: &Manifest,
    manifest_name: &str,
    out: &Path,
    shard: Shard,
    library: Option<&Path>,
    batch_aware: bool,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Result<BatchSummary> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    studio.share_mixes(batch_aware);
    let (cluster_of, clusters) = if batch_aware && !manifest.jobs.is_empty() { cluster_jobs(studio, manifest, library) } else { (vec![], vec![]) };
    let mut cluster_mixes: Vec<Vec<String>> = vec![vec![]; clusters.len()];
    let jobs: Vec<(usize, &ManifestJob)> = manifest.jobs.iter().enumerate().filter(|(i, _)| shard.takes(*i)).collect();
    let total: usize = jobs.iter().map(|(_, j)| j.images).sum();
    on_event(BatchEvent::Started { jobs: jobs.len(), images: total });
    for e in &manifest.errors {
        on_event(BatchEvent::LineFailed { line: e.line, error: e.error.clone() });
    }
    let mut done = 0usize;
    let mut lines = Vec::with_capacity(jobs.len());
    for (ji, job) in jobs {
        let line = job.line;
        let names = move |k: usize| image_name(line, k);
        let cluster = cluster_of.get(ji).copied().flatten();
        let outputs = ImageOutputs { dir: out, names: Some(&names), images: Some(job.images), keep_interrupted: false, skip: None, format: Default::default() };
        let r = studio.run(
            &job.settings,
            library,
            &outputs,
            cancel,
            &mut |e| match e {
                StudioEvent::Image { path, .. } => {
                    done += 1;
                    on_event(BatchEvent::Image { line, path, kept: false, done, total });
                }
                StudioEvent::Kept { path } => {
                    done += 1;
                    on_event(BatchEvent::Image { line, path, kept: true, done, total });
                }
                StudioEvent::Step { step, steps, .. } => on_event(BatchEvent::Step { line, step, steps }),
                _ => {}
            },
            &mut |_| {},
        );
        let mut summary = LineSummary {
            line,
            prompt: job.settings.prompt.clone(),
            seed: job.settings.seed.unwrap_or(0),
            images: (0..job.images).map(|k| image_name(line, k)).collect(),
            written: 0,
            kept: 0,
            error: None,
        };
        match r {
            Ok(o) => {
                summary.written = o.written.len();
                summary.kept = o.kept.len();
                if let Some(c) = cluster {
                    let mix = format!("{}: {}", job.settings.mix, o.loras.join(", "));
                    if !o.loras.is_empty() && !cluster_mixes[c].contains(&mix) {
                        cluster_mixes[c].push(mix);
                    }
                }
            }
            Err(Error::Cancelled) => {
                studio.share_mixes(false);
                return Err(Error::Cancelled);
            }
            Err(e) => {
                on_event(BatchEvent::LineFailed { line, error: e.to_string() });
                summary.error = Some(e.to_string());
            }
        }
        lines.push(summary);
    }
    let summary = BatchSummary {
        manifest: manifest_name.to_string(),
        shard: shard.label(),
        jobs: lines.len(),
        images: total,
        written: lines.iter().map(|l| l.written).sum(),
        kept: lines.iter().map(|l| l.kept).sum(),
        failed_lines: lines.iter().filter(|l| l.error.is_some()).count() + manifest.errors.len(),
        seconds: t0.elapsed().as_secs_f64(),
        errors: manifest.errors.clone(),
        batch_aware,
        clusters: clusters
            .into_iter()
            .enumerate()
            .map(|(id, (model, prompt, lines))| ClusterSummary { id, model, prompt, lines, mixes: std::mem::take(&mut cluster_mixes[id]) })
            .collect(),
        sharing: studio.share_mixes(false),
        lines,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Argument(e.to_string()))?;
    output::write_atomic(&out.join(BatchSummary::file_name(shard)), &json)?;
    Ok(summary)
}

/// Settings as one manifest line (the Gallery's "save as manifest").
pub fn manifest_line(settings: &Settings, images: Option<usize>) -> Result<String> {
    let mut v = serde_json::to_value(settings).map_err(|e| Error::Argument(e.to_string()))?;
    if let (Some(n), Some(o)) = (images, v.as_object_mut()) {
        o.insert("images".into(), n.into());
    }
    serde_json::to_string(&v).map_err(|e| Error::Argument(e.to_string()))
}

/// The manifest line that makes the image at `path` again: its seed fixed; with per-image seeds
/// that is the image alone, with a shared generator its batch kept whole, since its images share
/// one noise stream.
fn image_line(path: &Path) -> Result<String> {
    let (mut s, rec) = super::metadata::settings_from_image(path)?;
    s.batch_count = 1;
    let images = match &rec {
        // One SD upscale picture: its batch size batches tiles, and stays.
        Some(r) if s.sd_upscale.is_some() => {
            s.seed = Some(r.seed);
            1
        }
        Some(r) => {
            s.seed = Some(r.seed);
            if s.batch_seeds == crate::rng::BatchSeeds::PerImage {
                s.batch_size = 1;
            }
            s.batch_size.max(1)
        }
        None => 1,
    };
    manifest_line(&s, Some(images))
}

/// The Gallery's "save as manifest": one line per distinct job among `images` that makes that
/// image again (its seed fixed; with per-image seeds that is the image alone, with a shared
/// generator its batch kept whole, since its images share one noise stream),
/// written atomically to `dest` (`.jsonl`).
pub fn export_manifest(images: &[PathBuf], dest: &Path) -> Result<PathBuf> {
    if images.is_empty() {
        return Err(Error::Argument("nothing to export: no images selected".into()));
    }
    let mut lines: Vec<String> = vec![];
    for p in images {
        let line = image_line(p)?;
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    let dest = if dest.extension().is_some_and(|e| e == "jsonl") { dest.to_path_buf() } else { dest.with_extension("jsonl") };
    if let Some(d) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    output::write_atomic(&dest, format!("{}\n", lines.join("\n")).as_bytes())?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A1111's JPEG and WebP pictures are one-job manifests, as its PNGs are; a picture with
    /// nothing to restore is an error naming it.
    #[test]
    fn a1111_jpeg_and_webp_are_manifests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_info");
        for name in ["a1111_saved.jpg", "a1111_api.webp"] {
            let m = Manifest::read(&dir.join(name)).unwrap();
            assert!(m.errors.is_empty(), "{name}: {:?}", m.errors);
            let s = &m.jobs[0].settings;
            assert_eq!((s.seed, s.steps, s.width, s.height, m.jobs[0].images), (Some(1234), 20, 24, 16, 1), "{name}");
        }
        let err = Manifest::read(&dir.join("plain.webp")).unwrap_err().to_string();
        assert!(err.contains("plain.webp") && err.contains("no generation settings"), "{err}");
        // An empty or text file named as a picture is not taken for an empty manifest.
        let tmp = tempfile::tempdir().unwrap();
        for (name, content) in [("empty.jpg", &b""[..]), ("text.PNG", b"{\"prompt\": \"x\"}")] {
            std::fs::write(tmp.path().join(name), content).unwrap();
            let err = Manifest::read(&tmp.path().join(name)).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("expected a PNG, JPEG or WebP picture"), "{err}");
        }
    }

    /// Every field a record can hold reads back from a manifest line (fields skipped at their
    /// defaults were once unknown to the line parser).
    #[test]
    fn every_recorded_field_reads_back() {
        let s = Settings {
            prompt: "a vlox".into(),
            encode_empty_negative: true,
            schedule: "karras".into(),
            vae: "v.safetensors".into(),
            clip_skip: 1,
            timestep_spacing: "trailing".into(),
            dtype: "f16".into(),
            seed: Some(4),
            width: 68,
            batch_seeds: crate::rng::BatchSeeds::PerImage,
            klora_mode: Some("reference".into()),
            np_mu: Some(5.0),
            hires: Some(Default::default()),
            styles: vec!["s".into()],
            embeddings: vec!["e.safetensors".into()],
            ..Settings::default()
        };
        let (back, images) = parse_line(&manifest_line(&s, Some(3)).unwrap()).unwrap();
        assert_eq!((back, images), (s, Some(3)));
        assert_eq!(parse_line(r#"{"prompt": "a", "seed": -1}"#).unwrap().0.seed, None);
    }

    #[test]
    fn lines_parse_with_numbers_and_errors() {
        let text = "# comment\n{\"prompt\": \"a\", \"steps\": 4, \"images\": 3}\n\n{\"prompt\": \"b\", \"steps\": 4\n{\"prompt\": \"c\", \"width\": 65}\n{\"prompt\": \"d\", \"stpes\": 4}\n{\"prompt\": \"e\", \"steps\": \"many\"}\n[1]\n{\"prompt\": \"f\", \"seed\": 5}\n";
        let m = Manifest::parse(text);
        assert_eq!(m.jobs.iter().map(|j| (j.line, j.images)).collect::<Vec<_>>(), vec![(2, 3), (9, 1)]);
        assert_eq!(m.jobs[1].settings.seed, Some(5));
        let errs: Vec<(usize, &str)> = m.errors.iter().map(|e| (e.line, e.error.as_str())).collect();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs[0].0 == 4 && errs[0].1.contains("malformed JSON"), "{errs:?}");
        assert!(errs[1].0 == 5 && errs[1].1.contains("field width"), "{errs:?}");
        assert!(errs[2].0 == 6 && errs[2].1.contains("field stpes: unknown"), "{errs:?}");
        assert!(errs[3].0 == 7 && errs[3].1.contains("field steps"), "{errs:?}");
        assert!(errs[4].0 == 8 && errs[4].1.contains("JSON object"), "{errs:?}");
        // What a restore from A1111's text leaves (its img2img fields, no image) is named.
        let e = parse_line(r#"{"prompt": "a", "init": {"image": "", "strength": 0.5}}"#).unwrap_err();
        assert!(e.contains("field init.image"), "{e}");
        let e = parse_line(r#"{"prompt": "a", "subseed_strength": 2}"#).unwrap_err();
        assert!(e.contains("field subseed_strength"), "{e}");
        let (s, _) = parse_line(r#"{"prompt": "a", "subseed": -1, "subseed_strength": 0.5}"#).unwrap();
        assert_eq!((s.subseed, s.subseed_strength), (None, 0.5));
        let (s, _) = parse_line(r#"{"prompt": "a", "seed_resize_from_w": -1, "seed_resize_from_h": 640}"#).unwrap();
        assert_eq!((s.seed_resize_from_w, s.seed_resize_from_h, s.seed_resize_from()), (0, 640, None));
        // `tiling`: A1111's boolean or the axes, kept canonical; anything else is named.
        for (v, want) in [("true", "xy"), ("false", ""), ("\"x\"", "x"), ("\"Y\"", "y"), ("\"both\"", "xy"), ("null", "")] {
            assert_eq!(parse_line(&format!(r#"{{"prompt": "a", "tiling": {v}}}"#)).unwrap().0.tiling, want, "{v}");
        }
        for v in ["3", "\"z\""] {
            let e = parse_line(&format!(r#"{{"prompt": "a", "tiling": {v}}}"#)).unwrap_err();
            assert!(e.contains("field tiling") && e.contains("expected xy, x, y"), "{e}");
        }
    }

    #[test]
    fn seeds_depend_on_the_line_alone() {
        let a = Manifest::parse("{\"prompt\": \"a\"}\n{\"prompt\":  \"a\" }\n{\"prompt\": \"b\"}");
        assert_eq!(a.jobs[0].settings.seed, a.jobs[1].settings.seed);
        assert_ne!(a.jobs[0].settings.seed, a.jobs[2].settings.seed);
        assert!(a.jobs[0].settings.seed.unwrap() < 1 << 32);
    }

    #[test]
    fn shards_cover_every_job_once_from_0_or_1() {
        for n in 1..5 {
            for base in [0, 1] {
                let shards: Vec<Shard> = (base..base + n).map(|i| format!("{i}/{n}").parse().unwrap()).collect();
                for job in 0..20 {
                    assert_eq!(shards.iter().filter(|s| s.takes(job)).count(), 1);
                }
            }
        }
        assert!("4/3".parse::<Shard>().is_err() && "1/0".parse::<Shard>().is_err() && "x".parse::<Shard>().is_err());
    }

    #[test]
    fn kmeans_separates_directions_deterministically() {
        let v = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0], vec![0.1, 0.95], vec![0.95, 0.05]];
        let a = kmeans(&v, 2);
        assert_eq!(a, kmeans(&v, 2));
        assert_eq!(a[0], a[1]);
        assert_eq!(a[0], a[4]);
        assert_eq!(a[2], a[3]);
        assert_ne!(a[0], a[2]);
        assert_eq!(kmeans(&v, 1), vec![0; 5]);
    }

    #[test]
    fn a_saved_line_reads_back() {
        let s = Settings { prompt: "a vlox".into(), seed: Some(3), ..Settings::default() };
        let line = manifest_line(&s, Some(4)).unwrap();
        let (back, n) = parse_line(&line).unwrap();
        assert_eq!((back, n), (s, Some(4)));
    }
}
