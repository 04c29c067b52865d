//! The image studio as the app sees it: one serialisable [`Settings`] per job, batches with
//! progress events and live previews, PNGs that carry A1111-compatible `parameters` plus our own
//! JSON, settings restored from any such PNG, and batch export to a folder or a zip.
//!
//! The CLI's `generate` and the desktop app both go through the helpers here, so a PNG made by
//! either restores the same settings in the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::library::LoraLibrary;
use crate::lora::{self, AdapterTargets, LoadedLora, Role};
use crate::mix::{self, MixLora, MixOptions, MixPlan, Mixer};
use crate::output;
use crate::pipeline::{GenerateRequest, LoadOptions, SdxlPipeline, StepMixer};
use crate::schedulers::SamplerKind;

/// The PNG text chunk that holds our full settings as JSON.
pub const JSON_CHUNK: &str = "loramix";

/// One LoRA of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSetting {
    /// A path, a LoRA shipped with the model (`<model>/loras/NAME`), or a library name.
    pub name: String,
    pub weight: f64,
    /// subject | style | concept; `None`: from the file's metadata or the library.
    #[serde(default)]
    pub role: Option<String>,
    /// What follows the name in a `<lora:NAME:...>` tag when it says more than one weight:
    /// te/unet weights, loractl keyframes (`0.2@0,1@0.5`), lbw block weights and steps
    /// (`1:lbw=SDXL-OUTALL:start=5`). Overrides `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// Everything that determines a job's images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg: f64,
    /// Ours (`euler_a`) or A1111's (`Euler a`) name; empty: the model's scheduler.
    pub sampler: String,
    /// `None`: a random seed per job.
    pub seed: Option<u64>,
    /// 0: the model's default size.
    pub width: usize,
    pub height: usize,
    /// Batches run one after another, each `batch_size` images at once; seeds advance per batch.
    pub batch_count: usize,
    pub batch_size: usize,
    pub loras: Vec<LoraSetting>,
    /// merge | switch | composite | klora | est | np | windows | auto
    pub mix: String,
    pub klora_pattern: Option<String>,
    pub switch_every: usize,
    /// `windows`: step windows per role (`subject=0:0.7,style=0.3:1`).
    pub windows: Option<String>,
    /// The unconditional pass on the base weights (any per-step strategy).
    pub asymmetric_cfg: bool,
    /// Corrected K-LoRA on the layers it does not select on: follow (default) | merge.
    pub klora_others: Option<String>,
    /// Add the library's LoRAs the prompt calls for.
    pub candidates: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: "models/miniworld".into(),
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            cfg: 5.0,
            sampler: String::new(),
            seed: None,
            width: 0,
            height: 0,
            batch_count: 1,
            batch_size: 1,
            loras: vec![],
            mix: "merge".into(),
            klora_pattern: None,
            switch_every: 5,
            windows: None,
            asymmetric_cfg: false,
            klora_others: None,
            candidates: false,
        }
    }
}

/// What each image's PNG records besides the settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub settings: Settings,
    /// The seed of this image's batch (images of one batch share it, as in A1111's "Seed").
    pub seed: u64,
    pub batch_index: usize,
    pub index_in_batch: usize,
    pub width: usize,
    pub height: usize,
    pub sampler: String,
    pub lora_hashes: Vec<(String, String)>,
    pub mix_trace: Option<MixSummary>,
    pub version: String,
}

/// A compact mix trace for PNGs and the heatmap: the strategy and, per step and layer, each
/// LoRA's weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MixSummary {
    pub strategy: String,
    pub loras: Vec<String>,
    pub layers: usize,
    pub steps: usize,
    /// Mean weight per LoRA over steps and layers.
    pub mean_weight: Vec<f64>,
    /// `[step][layer]`: index of the LoRA with the largest weight, -1 where none is on.
    pub dominant: Vec<Vec<i32>>,
    /// `[step][layer]`: that LoRA's weight over the largest weight in the trace, in percent
    /// (soft weights: schedules, block weights, K-LoRA's follow rule).
    #[serde(default)]
    pub intensity: Vec<Vec<u8>>,
    /// LoRAs considered for the prompt and why each was picked or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<mix::candidates::Candidate>,
}

impl MixSummary {
    pub fn of(trace: &mix::MixTrace) -> Self {
        let n = trace.loras.len();
        let mut sum = vec![0.0; n];
        let mut count = 0usize;
        let dominant = trace
            .weights
            .iter()
            .map(|step| {
                step.iter()
                    .map(|w| {
                        count += 1;
                        for (s, x) in sum.iter_mut().zip(w) {
                            *s += x;
                        }
                        let (mut best, mut arg) = (0.0, -1);
                        for (i, &x) in w.iter().enumerate() {
                            if x.abs() > best {
                                best = x.abs();
                                arg = i as i32;
                            }
                        }
                        arg
                    })
                    .collect()
            })
            .collect();
        Self {
            strategy: trace.strategy.clone(),
            loras: trace.loras.clone(),
            layers: trace.layers.len(),
            steps: trace.steps,
            mean_weight: sum.iter().map(|s| s / count.max(1) as f64).collect(),
            intensity: {
                let max = trace.weights.iter().flatten().flatten().fold(0.0f64, |m, w| m.max(w.abs()));
                trace
                    .weights
                    .iter()
                    .map(|step| step.iter().map(|w| (100.0 * w.iter().fold(0.0f64, |m, x| m.max(x.abs())) / max.max(1e-12)).round() as u8).collect())
                    .collect()
            },
            dominant,
            candidates: trace.candidates.clone(),
        }
    }
}

/// The A1111 `parameters` text: prompt (with `<lora:NAME:w>` tags), negative prompt, settings
/// line with `Lora hashes`.
pub fn parameters_text(r: &ImageRecord) -> String {
    let s = &r.settings;
    let mut text = s.prompt.clone();
    for l in &s.loras {
        let tag = format!("<lora:{}:", lora_tag_name(&l.name));
        if !text.contains(&tag) {
            match &l.schedule {
                Some(fields) => text.push_str(&format!(" <lora:{}:{fields}>", lora_tag_name(&l.name))),
                None => text.push_str(&format!(" <lora:{}:{}>", lora_tag_name(&l.name), l.weight)),
            }
        }
    }
    if !s.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", s.negative_prompt));
    }
    let model = Path::new(&s.model).file_name().and_then(|n| n.to_str()).unwrap_or(&s.model);
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        s.steps, r.sampler, s.cfg, r.seed, r.width, r.height
    ));
    if s.batch_size > 1 {
        text.push_str(&format!(", Batch size: {}, Batch pos: {}", s.batch_size, r.index_in_batch));
    }
    if !r.lora_hashes.is_empty() {
        let h: Vec<String> = r.lora_hashes.iter().map(|(n, h)| format!("{n}: {h}")).collect();
        text.push_str(&format!(", Lora hashes: \"{}\"", h.join(", ")));
        text.push_str(&format!(", LoRA mix: {}", s.mix));
    }
    if let Some(t) = r.mix_trace.as_ref().filter(|t| !t.candidates.is_empty()) {
        let picked: Vec<&str> = t.candidates.iter().filter(|c| c.picked).map(|c| c.name.as_str()).collect();
        text.push_str(&format!(", LoRA picked: \"{}\"", picked.join(", ")));
    }
    text.push_str(&format!(", Version: loramix {}", env!("CARGO_PKG_VERSION")));
    text
}

/// The name a LoRA goes by in `<lora:NAME:w>`: a path's file stem, else the name itself.
pub fn lora_tag_name(name: &str) -> String {
    let p = Path::new(name);
    if name.ends_with(".safetensors") || name.contains('/') || name.contains('\\') {
        p.file_stem().and_then(|s| s.to_str()).unwrap_or(name).to_string()
    } else {
        name.to_string()
    }
}

/// Splits `a: 1, b: "x, y", c: 3` into pairs (A1111's settings line; values may be quoted).
fn split_settings_line(line: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim().to_string();
        let mut after = rest[colon + 1..].trim_start();
        let value;
        if let Some(stripped) = after.strip_prefix('"') {
            // A quoted value: up to the next unescaped quote.
            let mut end = None;
            let mut esc = false;
            for (i, c) in stripped.char_indices() {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == '"' {
                    end = Some(i);
                    break;
                }
            }
            let e = end.unwrap_or(stripped.len());
            value = stripped[..e].replace("\\\"", "\"");
            after = stripped.get(e + 1..).unwrap_or("");
            rest = after.trim_start().strip_prefix(',').unwrap_or(after).trim_start();
        } else {
            match after.find(", ") {
                Some(i) => {
                    value = after[..i].trim().to_string();
                    rest = after[i + 2..].trim_start();
                }
                None => {
                    value = after.trim().to_string();
                    rest = "";
                }
            }
        }
        out.push((key, value));
    }
    out
}

/// Settings from an A1111 `parameters` text (ours, A1111's, Forge's, ...). `<lora:NAME:w>` tags
/// move from the prompt into [`Settings::loras`].
pub fn parse_parameters(text: &str) -> Result<Settings> {
    let lines: Vec<&str> = text.lines().collect();
    let settings_at = lines.iter().rposition(|l| l.trim_start().starts_with("Steps:"));
    let (body, settings_line) = match settings_at {
        Some(i) => (&lines[..i], Some(lines[i])),
        None => (&lines[..], None),
    };
    let mut prompt_lines = vec![];
    let mut negative_lines = vec![];
    let mut in_negative = false;
    for l in body {
        if let Some(n) = l.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative_lines.push(n.trim_start());
        } else if in_negative {
            negative_lines.push(l);
        } else {
            prompt_lines.push(*l);
        }
    }
    let (prompt, tags) = lora::extract_prompt_loras(&prompt_lines.join("\n"))?;
    // Tags with block weights or schedules stay in the prompt, where they say all they say.
    let scheduled: Vec<&str> = tags.iter().filter(|t| t.schedule.is_some()).map(|t| t.text.as_str()).collect();
    let prompt = if scheduled.is_empty() { prompt.trim().to_string() } else { format!("{} {}", prompt.trim(), scheduled.join(" ")) };
    let mut s = Settings {
        prompt,
        negative_prompt: negative_lines.join("\n").trim().to_string(),
        loras: tags.into_iter().filter(|t| t.schedule.is_none()).map(|t| LoraSetting { name: t.name, weight: t.weight, role: None, schedule: None }).collect(),
        ..Settings::default()
    };
    let bad = |k: &str, v: &str, want: &str| Error::Argument(format!("parameters: {k} {v:?}: expected {want}"));
    if let Some(line) = settings_line {
        for (k, v) in split_settings_line(line) {
            match k.as_str() {
                "Steps" => s.steps = v.parse().map_err(|_| bad(&k, &v, "an integer"))?,
                "Sampler" => {
                    s.sampler = v.parse::<SamplerKind>().map(|k| k.name().to_string()).unwrap_or(v.clone());
                }
                "Schedule type" if v == "Karras" && s.sampler == "dpmpp_2m" => s.sampler = "dpmpp_2m_karras".into(),
                "CFG scale" => s.cfg = v.parse().map_err(|_| bad(&k, &v, "a number"))?,
                "Seed" => s.seed = Some(v.parse().map_err(|_| bad(&k, &v, "an integer"))?),
                "Size" => {
                    let (w, h) = v.split_once('x').ok_or_else(|| bad(&k, &v, "WxH"))?;
                    s.width = w.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?;
                    s.height = h.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?;
                }
                "Model" => s.model = v,
                "Batch size" => s.batch_size = v.parse().unwrap_or(1),
                "LoRA mix" => s.mix = v,
                _ => {}
            }
        }
    }
    Ok(s)
}

/// All text chunks of a PNG (tEXt, zTXt, iTXt).
pub fn png_text_chunks(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(|e| Error::Argument(format!("not a PNG: {e}")))?;
    let info = reader.info();
    let mut out = HashMap::new();
    for t in &info.uncompressed_latin1_text {
        out.insert(t.keyword.clone(), t.text.clone());
    }
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.insert(t.keyword.clone(), text);
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.insert(t.keyword.clone(), text);
        }
    }
    Ok(out)
}

/// Settings restored from a PNG made by us (our JSON chunk) or by A1111-compatible tools
/// (`parameters`).
pub fn settings_from_png(path: &Path) -> Result<(Settings, Option<ImageRecord>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let chunks = png_text_chunks(&bytes).map_err(|e| Error::BadFile { path: path.into(), message: e.to_string() })?;
    if let Some(j) = chunks.get(JSON_CHUNK) {
        let rec: ImageRecord = serde_json::from_str(j)
            .map_err(|e| Error::BadFile { path: path.into(), message: format!("'{JSON_CHUNK}' chunk: {e}") })?;
        let mut s = rec.settings.clone();
        s.seed = Some(rec.seed);
        return Ok((s, Some(rec)));
    }
    match chunks.get("parameters") {
        Some(p) => Ok((parse_parameters(p).map_err(|e| Error::BadFile { path: path.into(), message: e.to_string() })?, None)),
        None => Err(Error::BadFile {
            path: path.into(),
            message: "this PNG carries no generation settings (no 'parameters' or 'loramix' text chunk)".into(),
        }),
    }
}

/// PNG bytes with both text chunks.
pub fn encode_image(img: &image::RgbImage, rec: &ImageRecord) -> Result<Vec<u8>> {
    let json = serde_json::to_string(rec).map_err(|e| Error::Argument(e.to_string()))?;
    output::encode_png(img, &[("parameters", parameters_text(rec)), (JSON_CHUNK, json)])
}

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

/// A latent → RGB linear map fitted to the model's own VAE (a few solid colours encoded once),
/// for per-step previews that cost nothing next to a UNet step.
#[derive(Debug, Clone)]
pub struct LatentPreview {
    /// `[3][c + 1]` (the last column is the bias).
    m: Vec<Vec<f32>>,
}

impl LatentPreview {
    pub fn fit(pipe: &SdxlPipeline) -> Result<Self> {
        let colours: [[f32; 3]; 10] = [
            [-1.0, -1.0, -1.0],
            [1.0, 1.0, 1.0],
            [1.0, -1.0, -1.0],
            [-1.0, 1.0, -1.0],
            [-1.0, -1.0, 1.0],
            [1.0, 1.0, -1.0],
            [-1.0, 1.0, 1.0],
            [1.0, -1.0, 1.0],
            [0.0, 0.0, 0.0],
            [0.4, -0.2, 0.1],
        ];
        let s = pipe.vae_scale_factor() * 4;
        let mut data = Vec::with_capacity(colours.len() * 3 * s * s);
        for c in &colours {
            for v in c {
                data.extend(std::iter::repeat_n(*v, s * s));
            }
        }
        let x = Tensor::from_vec(data, (colours.len(), 3, s, s), &pipe.device)?;
        let dist = pipe.vae.encode(&x.to_dtype(pipe.vae_dtype())?)?;
        let scale = pipe.vae.config().scaling_factor;
        let z = (dist.mean.to_dtype(DType::F32)? * scale)?.mean((2, 3))?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let c = z[0].len();
        // Least squares rgb = M [z; 1] via the normal equations (c + 1 unknowns per channel).
        let n = c + 1;
        let mut ata = vec![vec![0f64; n]; n];
        let mut atb = vec![vec![0f64; 3]; n];
        for (row, col) in z.iter().zip(&colours) {
            let a: Vec<f64> = row.iter().map(|&v| v as f64).chain(std::iter::once(1.0)).collect();
            for i in 0..n {
                for j in 0..n {
                    ata[i][j] += a[i] * a[j];
                }
                for k in 0..3 {
                    atb[i][k] += a[i] * col[k] as f64;
                }
            }
        }
        for (i, row) in ata.iter_mut().enumerate() {
            row[i] += 1e-6; // ridge: keeps the solve stable for degenerate VAEs
        }
        let sol = solve(ata, atb);
        let m = (0..3).map(|k| (0..n).map(|i| sol[i][k] as f32).collect()).collect();
        Ok(Self { m })
    }

    /// The first image of `latents` `[b, c, h, w]` as RGB at latent resolution.
    pub fn render(&self, latents: &Tensor) -> Result<image::RgbImage> {
        let z = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, c, h, w) = z.dims4()?;
        let z = z.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        let mut img = image::RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut px = [0u8; 3];
                for (k, p) in px.iter_mut().enumerate() {
                    let mut v = self.m[k][c];
                    for ch in 0..c {
                        v += self.m[k][ch] * z[ch * h * w + y * w + x];
                    }
                    *p = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        Ok(img)
    }
}

/// Per-step previews: the tiny autoencoder when its weights are present, else the linear map.
#[derive(Clone)]
pub enum Previewer {
    Linear(LatentPreview),
    Tiny(Arc<loramix_models::sdxl::taesd::TinyDecoder>),
}

impl Previewer {
    /// TAESD/TAESDXL weights in diffusers layout (`config.json` + `diffusion_pytorch_model.safetensors`)
    /// from the first of `dirs` that has them.
    pub fn find_tiny(dirs: &[PathBuf], device: &Device) -> Result<Option<Self>> {
        for d in dirs {
            let w = d.join("diffusion_pytorch_model.safetensors");
            let c = d.join("config.json");
            if w.exists() && c.exists() {
                let text = std::fs::read_to_string(&c).map_err(|e| Error::io(&c, e))?;
                let cfg: loramix_models::sdxl::taesd::TinyDecoderConfig =
                    serde_json::from_str(&text).map_err(|e| Error::model(&c, format!("not an AutoencoderTiny config: {e}")))?;
                let vb = crate::weights::WeightSource::from_files(&[w])?.into_var_builder(DType::F32, device);
                let dec = loramix_models::sdxl::taesd::TinyDecoder::new(vb, &cfg).map_err(|e| Error::model(d, e.to_string()))?;
                return Ok(Some(Self::Tiny(Arc::new(dec))));
            }
        }
        Ok(None)
    }

    pub fn render(&self, latents: &Tensor) -> Result<image::RgbImage> {
        match self {
            Self::Linear(l) => l.render(latents),
            Self::Tiny(t) => {
                let z = latents.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
                let img = t.decode(&z)?;
                crate::pipeline::to_images(&img)?.into_iter().next().ok_or_else(|| Error::Argument("empty preview".into()))
            }
        }
    }
}

/// Gaussian elimination with partial pivoting; `b` has several right-hand sides.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, piv);
        b.swap(col, piv);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            continue;
        }
        for r in 0..n {
            if r != col {
                let f = a[r][col] / d;
                if f != 0.0 {
                    let pivot_row = a[col].clone();
                    for (x, p) in a[r][col..].iter_mut().zip(&pivot_row[col..]) {
                        *x -= f * p;
                    }
                    for k in 0..b[r].len() {
                        b[r][k] -= f * b[col][k];
                    }
                }
            }
        }
    }
    (0..n).map(|i| b[i].iter().map(|v| if a[i][i].abs() < 1e-12 { 0.0 } else { v / a[i][i] }).collect()).collect()
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
    let choices = lora::resolve_choices(args, prompt_tags, library, Some(model_loras))?;
    let mut out = LoadedLoras { mix: vec![], hashes: vec![], reports: vec![] };
    for c in &choices {
        let l = LoadedLora::load(&c.path, &c.name, targets)?;
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

    fn pipeline(&self, model: &str, library: Option<&Path>, on_event: &mut dyn FnMut(StudioEvent)) -> Result<(Arc<SdxlPipeline>, Previewer)> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, p, prev)) = guard.as_ref() {
            if m == model {
                return Ok((p.clone(), prev.clone()));
            }
        }
        on_event(StudioEvent::Loading { model: model.to_string() });
        let t0 = Instant::now();
        let pipe = Arc::new(SdxlPipeline::load(model, &LoadOptions::default())?);
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
        *guard = Some((model.to_string(), pipe.clone(), preview.clone()));
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
        let (pipe, preview) = self.pipeline(&settings.model, library, on_event)?;
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
        let (w, h) = (if settings.width == 0 { dw } else { settings.width }, if settings.height == 0 { dh } else { settings.height });
        let sampler_name = match sampler {
            Some(s) => s,
            None => pipe.default_sampler()?,
        }
        .a1111_name()
        .to_string();
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
                seed,
                width: Some(w),
                height: Some(h),
                batch_size: settings.batch_size,
                init_noise: None,
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
            let summary = mixer.take().map(|m| MixSummary::of(&m.finish()));
            if let Some(s) = &summary {
                on_event(StudioEvent::MixTrace { summary: s.clone() });
            }
            for (i, img) in pipe.decode(&latents)?.iter().enumerate() {
                let rec = ImageRecord {
                    settings: settings.clone(),
                    seed,
                    batch_index: batch,
                    index_in_batch: i,
                    width: w,
                    height: h,
                    sampler: sampler_name.clone(),
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

/// Fills a file-name template for an exported image: `{seed}`, `{index}` (position in the
/// export), `{prompt}` (first words, file-name safe), `{model}`, `{steps}`, `{sampler}`, `{cfg}`,
/// `{width}`, `{height}`, `{stem}` (the original file name).
pub fn fill_template(template: &str, index: usize, original: &Path, settings: Option<&Settings>, seed: Option<u64>) -> String {
    let safe = |s: &str| -> String {
        let cleaned: String = s.chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let mut out = String::new();
        for part in cleaned.split('_').filter(|p| !p.is_empty()) {
            if !out.is_empty() {
                out.push('_');
            }
            out.push_str(part);
        }
        out.chars().take(60).collect()
    };
    let stem = original.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
    let mut out = template.to_string();
    let mut put = |k: &str, v: String| out = out.replace(&format!("{{{k}}}"), &v);
    put("index", format!("{index:05}"));
    put("stem", safe(&stem));
    put("seed", seed.map(|s| s.to_string()).unwrap_or_default());
    if let Some(s) = settings {
        put("prompt", safe(&s.prompt));
        put("model", safe(Path::new(&s.model).file_name().and_then(|n| n.to_str()).unwrap_or(&s.model)));
        put("steps", s.steps.to_string());
        put("sampler", safe(&s.sampler));
        put("cfg", s.cfg.to_string());
        put("width", s.width.to_string());
        put("height", s.height.to_string());
    }
    let name = safe(&out.replace(['{', '}'], ""));
    if name.is_empty() {
        format!("{index:05}")
    } else {
        name
    }
}

/// Exports PNGs to a folder (one atomic write each) or to one zip (written to a temporary file
/// and renamed), named by `template`. Returns what was written.
pub fn export(images: &[PathBuf], dest: &Path, template: &str, as_zip: bool) -> Result<Vec<PathBuf>> {
    if images.is_empty() {
        return Err(Error::Argument("nothing to export: no images selected".into()));
    }
    let mut named: Vec<(String, Vec<u8>)> = vec![];
    let mut used: HashMap<String, usize> = HashMap::new();
    for (i, p) in images.iter().enumerate() {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let (settings, seed) = match settings_from_png(p) {
            Ok((s, _)) => {
                let seed = s.seed;
                (Some(s), seed)
            }
            Err(_) => (None, None),
        };
        let mut name = fill_template(template, i + 1, p, settings.as_ref(), seed);
        let n = used.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            name = format!("{name}-{}", *n - 1);
        }
        named.push((format!("{name}.png"), bytes));
    }
    if as_zip {
        let zip_path = if dest.extension().is_some_and(|e| e == "zip") { dest.to_path_buf() } else { dest.join("loramix-export.zip") };
        let parent = zip_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut zw = zip_writer::ZipWriter::new(&mut buf);
            for (name, bytes) in &named {
                zw.add(name, bytes).map_err(|e| Error::io(&zip_path, e))?;
            }
            zw.finish().map_err(|e| Error::io(&zip_path, e))?;
        }
        output::write_atomic(&zip_path, &buf.into_inner())?;
        return Ok(vec![zip_path]);
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut out = vec![];
    for (name, bytes) in named {
        let mut path = dest.join(&name);
        let mut k = 1;
        while path.exists() {
            path = dest.join(format!("{}-{k}.png", name.trim_end_matches(".png")));
            k += 1;
        }
        output::write_atomic(&path, &bytes)?;
        out.push(path);
    }
    Ok(out)
}

/// A minimal stored (uncompressed) zip writer: PNGs are already compressed, and this keeps the
/// engine free of another dependency.
mod zip_writer {
    use std::io::{Seek, Write};

    pub struct ZipWriter<W: Write + Seek> {
        w: W,
        entries: Vec<(String, u32, u32, u32)>,
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    impl<W: Write + Seek> ZipWriter<W> {
        pub fn new(w: W) -> Self {
            Self { w, entries: vec![] }
        }

        pub fn add(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
            let offset = self.w.stream_position()? as u32;
            let crc = crc32(data);
            let n = name.as_bytes();
            let w = &mut self.w;
            w.write_all(&0x0403_4b50u32.to_le_bytes())?;
            w.write_all(&20u16.to_le_bytes())?; // version needed
            w.write_all(&0x0800u16.to_le_bytes())?; // UTF-8 names
            w.write_all(&0u16.to_le_bytes())?; // stored
            w.write_all(&0u32.to_le_bytes())?; // time, date
            w.write_all(&crc.to_le_bytes())?;
            w.write_all(&(data.len() as u32).to_le_bytes())?;
            w.write_all(&(data.len() as u32).to_le_bytes())?;
            w.write_all(&(n.len() as u16).to_le_bytes())?;
            w.write_all(&0u16.to_le_bytes())?;
            w.write_all(n)?;
            w.write_all(data)?;
            self.entries.push((name.to_string(), crc, data.len() as u32, offset));
            Ok(())
        }

        pub fn finish(mut self) -> std::io::Result<()> {
            let start = self.w.stream_position()? as u32;
            for (name, crc, size, offset) in &self.entries {
                let n = name.as_bytes();
                let w = &mut self.w;
                w.write_all(&0x0201_4b50u32.to_le_bytes())?;
                w.write_all(&20u16.to_le_bytes())?;
                w.write_all(&20u16.to_le_bytes())?;
                w.write_all(&0x0800u16.to_le_bytes())?;
                w.write_all(&0u16.to_le_bytes())?;
                w.write_all(&0u32.to_le_bytes())?;
                w.write_all(&crc.to_le_bytes())?;
                w.write_all(&size.to_le_bytes())?;
                w.write_all(&size.to_le_bytes())?;
                w.write_all(&(n.len() as u16).to_le_bytes())?;
                w.write_all(&[0u8; 12])?; // extra, comment, disk, internal attrs (2+2+2+2) + external (4)
                w.write_all(&offset.to_le_bytes())?;
                w.write_all(n)?;
            }
            let end = self.w.stream_position()? as u32;
            let count = self.entries.len() as u16;
            let w = &mut self.w;
            w.write_all(&0x0605_4b50u32.to_le_bytes())?;
            w.write_all(&[0u8; 4])?;
            w.write_all(&count.to_le_bytes())?;
            w.write_all(&count.to_le_bytes())?;
            w.write_all(&(end - start).to_le_bytes())?;
            w.write_all(&start.to_le_bytes())?;
            w.write_all(&0u16.to_le_bytes())?;
            w.flush()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_parameters_round_trip() {
        let text = "a red circle, <lora:vlox:0.8> flat style\nNegative prompt: blurry, dark\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 832x1216, Model hash: abc, Model: sdxl, Lora hashes: \"vlox: 0123456789ab, b: cdef\", Version: v1.10";
        let s = parse_parameters(text).unwrap();
        assert_eq!(s.prompt, "a red circle,  flat style");
        assert_eq!(s.negative_prompt, "blurry, dark");
        assert_eq!((s.steps, s.cfg, s.seed, s.width, s.height), (30, 6.5, Some(1234), 832, 1216));
        assert_eq!(s.sampler, "dpmpp_2m_karras");
        assert_eq!(s.loras, vec![LoraSetting { name: "vlox".into(), weight: 0.8, role: None, schedule: None }]);
        assert_eq!(s.model, "sdxl");
    }

    #[test]
    fn our_parameters_parse_back() {
        let settings = Settings {
            prompt: "a vlox emblem".into(),
            negative_prompt: "noise".into(),
            steps: 12,
            cfg: 4.0,
            seed: Some(9),
            loras: vec![LoraSetting { name: "models/miniworld/loras/vlox.safetensors".into(), weight: 0.7, role: None, schedule: None }],
            ..Settings::default()
        };
        let rec = ImageRecord {
            settings: settings.clone(),
            seed: 9,
            batch_index: 0,
            index_in_batch: 0,
            width: 64,
            height: 64,
            sampler: "Euler".into(),
            lora_hashes: vec![("vlox".into(), "0123456789ab".into())],
            mix_trace: None,
            version: "0".into(),
        };
        let back = parse_parameters(&parameters_text(&rec)).unwrap();
        assert_eq!(back.prompt, "a vlox emblem");
        assert_eq!(back.negative_prompt, "noise");
        assert_eq!((back.steps, back.cfg, back.seed, back.width, back.height), (12, 4.0, Some(9), 64, 64));
        assert_eq!(back.sampler, "euler");
        assert_eq!(back.loras, vec![LoraSetting { name: "vlox".into(), weight: 0.7, role: None, schedule: None }]);
        assert_eq!(back.mix, "merge");
        // A block-weighted, keyframed LoRA is written as its tag and comes back in the prompt.
        let mut rec2 = rec.clone();
        rec2.settings.loras = vec![LoraSetting { name: "vlox".into(), weight: 1.0, role: None, schedule: Some("1:lbw=SDXL-OUTALL:stop=10".into()) }];
        let text = parameters_text(&rec2);
        assert!(text.contains("<lora:vlox:1:lbw=SDXL-OUTALL:stop=10>"), "{text}");
        let back = parse_parameters(&text).unwrap();
        assert!(back.loras.is_empty());
        assert!(back.prompt.ends_with("<lora:vlox:1:lbw=SDXL-OUTALL:stop=10>"), "{}", back.prompt);
    }

    #[test]
    fn templates_are_file_name_safe() {
        let s = Settings { prompt: "a big/red: circle?".into(), ..Settings::default() };
        assert_eq!(fill_template("{index}-{seed}-{prompt}", 3, Path::new("x.png"), Some(&s), Some(7)), "00003-7-a_big_red_circle");
        assert_eq!(fill_template("../../{stem}", 1, Path::new("/a/b/img 1.png"), None, None), "img_1");
    }

    #[test]
    fn zip_is_readable() {
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut z = zip_writer::ZipWriter::new(&mut buf);
        z.add("a.png", b"hello").unwrap();
        z.add("b.png", b"world!").unwrap();
        z.finish().unwrap();
        let bytes = buf.into_inner();
        // End-of-central-directory record says two entries, and each local header names its file.
        let eocd = bytes.len() - 22;
        assert_eq!(&bytes[eocd..eocd + 4], &[0x50, 0x4b, 0x05, 0x06]);
        assert_eq!(u16::from_le_bytes([bytes[eocd + 10], bytes[eocd + 11]]), 2);
        assert_eq!(&bytes[30..35], b"a.png");
        // CRC-32 of "hello".
        assert_eq!(u32::from_le_bytes(bytes[14..18].try_into().unwrap()), 0x3610_a686);
    }
}
