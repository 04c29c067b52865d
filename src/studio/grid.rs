//! The X/Y/Z plot: a job varied along up to three axes, every cell's images written with their
//! full metadata, and one labelled grid PNG per Z value, drawn as A1111's `xyz_grid.py` draws
//! them (column labels above, row labels at the left, `Axis: value` text in DejaVu Sans), plus a
//! legend naming the axes and what the cells share.
//!
//! Axes (`AXIS=V1,V2,…`; values are CSV, so `"a, b"` is one value; numeric axes take A1111's
//! ranges `1-5`, `1-9 (+2)`, `0.2-1 [5]`):
//! `seed`, `steps`, `cfg`, `sampler`, `schedule`, `size` (`WxH`), `width`, `height`, `clip_skip`,
//! `prompt_sr` (A1111's Prompt S/R: the first value is searched for in both prompts and each value
//! put in its place), `lora:NAME` (that LoRA's weight), `mix` (strategy), `lbw` / `lbw:NAME`
//! (block-weight preset of every LoRA / of one), `checkpoint` (model), `vae`, `denoise`.
//! A1111's labels (`Seed`, `CFG Scale`, `Prompt S/R`, `Checkpoint name`, …) are accepted too.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};
use serde::Serialize;

use super::jobs::{ImageOutputs, Studio, StudioEvent};
use super::settings::{LoraSetting, Settings};
use crate::error::{Error, Result};
use crate::output;

/// What an axis varies.
#[derive(Debug, Clone, PartialEq)]
pub enum AxisKind {
    Seed,
    VarSeed,
    VarStrength,
    Steps,
    Cfg,
    Sampler,
    Schedule,
    Size,
    Width,
    Height,
    ClipSkip,
    PromptSr,
    LoraWeight(String),
    Mix,
    Lbw(Option<String>),
    Checkpoint,
    Vae,
    Denoise,
    /// sd-webui-controlnet's "[ControlNet] …" axes; each applies to every unit of the job.
    ControlWeight,
    ControlStart,
    ControlEnd,
    ControlModel,
    ControlModule,
    ControlMode,
    ControlResizeMode,
    ControlThresholdA,
    ControlThresholdB,
}

/// One axis: what it varies and its values as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub kind: AxisKind,
    pub values: Vec<String>,
}

impl AxisKind {
    fn parse(name: &str) -> Result<Self> {
        let lower = name.trim().to_lowercase();
        if let Some(l) = lower.strip_prefix("lora:").or_else(|| lower.strip_prefix("lora weight:")) {
            // Names keep their case (files and library names are case-sensitive).
            let n = name.trim()[name.trim().len() - l.len()..].trim();
            return Ok(Self::LoraWeight(n.to_string()));
        }
        if let Some(l) = lower.strip_prefix("lbw:") {
            let n = name.trim()[name.trim().len() - l.len()..].trim();
            return Ok(Self::Lbw(Some(n.to_string())));
        }
        Ok(match lower.as_str() {
            "seed" => Self::Seed,
            "subseed" | "var. seed" | "variation seed" => Self::VarSeed,
            "subseed_strength" | "var. strength" | "variation seed strength" => Self::VarStrength,
            "steps" => Self::Steps,
            "cfg" | "cfg scale" | "cfg_scale" => Self::Cfg,
            "sampler" => Self::Sampler,
            "schedule" | "schedule type" | "scheduler" => Self::Schedule,
            "size" => Self::Size,
            "width" => Self::Width,
            "height" => Self::Height,
            "clip_skip" | "clip skip" => Self::ClipSkip,
            "prompt_sr" | "prompt s/r" | "sr" => Self::PromptSr,
            "mix" | "lora mix" | "strategy" => Self::Mix,
            "lbw" | "lbw preset" => Self::Lbw(None),
            "checkpoint" | "checkpoint name" | "model" => Self::Checkpoint,
            "vae" => Self::Vae,
            "denoise" | "denoising" | "denoising strength" => Self::Denoise,
            "controlnet_weight" | "[controlnet] weight" | "control weight" => Self::ControlWeight,
            "controlnet_start" | "[controlnet] guidance start" | "guidance start" => Self::ControlStart,
            "controlnet_end" | "[controlnet] guidance end" | "guidance end" => Self::ControlEnd,
            "controlnet_model" | "[controlnet] model" => Self::ControlModel,
            "controlnet_module" | "[controlnet] preprocessor" | "[controlnet] module" => Self::ControlModule,
            "controlnet_control_mode" | "[controlnet] control mode" => Self::ControlMode,
            "controlnet_resize_mode" | "[controlnet] resize mode" => Self::ControlResizeMode,
            "controlnet_threshold_a" | "[controlnet] pre threshold a" => Self::ControlThresholdA,
            "controlnet_threshold_b" | "[controlnet] pre threshold b" => Self::ControlThresholdB,
            _ => {
                return Err(Error::Argument(format!(
                    "grid axis {name:?}: expected seed, subseed, subseed_strength, steps, cfg, sampler, schedule, size, width, height, clip_skip, prompt_sr, lora:NAME, mix, lbw, lbw:NAME, checkpoint, vae, denoise, controlnet_weight, controlnet_start, controlnet_end, controlnet_model, controlnet_module, controlnet_control_mode, controlnet_resize_mode, controlnet_threshold_a or controlnet_threshold_b"
                )))
            }
        })
    }

    /// A1111's label for the axis.
    pub fn label(&self) -> String {
        match self {
            Self::Seed => "Seed".into(),
            Self::VarSeed => "Var. seed".into(),
            Self::VarStrength => "Var. strength".into(),
            Self::Steps => "Steps".into(),
            Self::Cfg => "CFG Scale".into(),
            Self::Sampler => "Sampler".into(),
            Self::Schedule => "Schedule type".into(),
            Self::Size => "Size".into(),
            Self::Width => "Width".into(),
            Self::Height => "Height".into(),
            Self::ClipSkip => "Clip skip".into(),
            Self::PromptSr => "Prompt S/R".into(),
            Self::LoraWeight(n) => format!("LoRA {n}"),
            Self::Mix => "LoRA mix".into(),
            Self::Lbw(None) => "LBW".into(),
            Self::Lbw(Some(n)) => format!("LBW {n}"),
            Self::Checkpoint => "Checkpoint".into(),
            Self::Vae => "VAE".into(),
            Self::Denoise => "Denoising strength".into(),
            Self::ControlWeight => "[ControlNet] Weight".into(),
            Self::ControlStart => "[ControlNet] Guidance Start".into(),
            Self::ControlEnd => "[ControlNet] Guidance End".into(),
            Self::ControlModel => "[ControlNet] Model".into(),
            Self::ControlModule => "[ControlNet] Preprocessor".into(),
            Self::ControlMode => "[ControlNet] Control Mode".into(),
            Self::ControlResizeMode => "[ControlNet] Resize Mode".into(),
            Self::ControlThresholdA => "[ControlNet] Pre Threshold A".into(),
            Self::ControlThresholdB => "[ControlNet] Pre Threshold B".into(),
        }
    }

    /// A cell's label as A1111 draws it: `format_value_add_label` (`Steps: 20`, a float rounded
    /// to 8 places and written as Python writes it, `CFG Scale: 7.0`), the bare value for its
    /// `format_value` axes (Sampler, Prompt S/R), the file name for a checkpoint.
    pub fn cell_label(&self, value: &str) -> String {
        let value = match (self, self.numeric()) {
            (Self::Sampler | Self::PromptSr, _) => return value.to_string(),
            (Self::Checkpoint, _) => return Path::new(value.trim_end_matches(['/', '\\'])).file_name().map_or(value.to_string(), |n| n.to_string_lossy().into_owned()),
            (_, Some(true)) => value.trim().parse::<i64>().map_or(value.to_string(), |n| n.to_string()),
            (_, Some(false)) => value.trim().parse::<f64>().map_or(value.to_string(), |x| {
                let rounded: f64 = format!("{x:.8}").parse().unwrap_or(x);
                super::image_info::python_float_repr(rounded)
            }),
            _ => value.to_string(),
        };
        let label = match self {
            Self::Denoise => "Denoising".to_string(),
            Self::Checkpoint => "Checkpoint name".to_string(),
            other => other.label(),
        };
        format!("{label}: {value}")
    }

    fn numeric(&self) -> Option<bool> {
        match self {
            Self::Seed | Self::VarSeed | Self::Steps | Self::Width | Self::Height | Self::ClipSkip => Some(true),
            Self::Cfg | Self::LoraWeight(_) | Self::Denoise | Self::VarStrength | Self::ControlWeight | Self::ControlStart | Self::ControlEnd | Self::ControlThresholdA | Self::ControlThresholdB => Some(false),
            _ => None,
        }
    }
}

/// CSV split of a value list (the `csv` crate: A1111 reads axis values with Python's csv too).
fn csv_values(text: &str) -> Result<Vec<String>> {
    let mut r = csv::ReaderBuilder::new().has_headers(false).trim(csv::Trim::All).from_reader(text.as_bytes());
    let mut out = vec![];
    for rec in r.records() {
        let rec = rec.map_err(|e| Error::Argument(format!("grid values {text:?}: {e}")))?;
        out.extend(rec.iter().map(str::to_string));
    }
    Ok(out)
}

/// A1111's ranges (`xyz_grid.py`), value for value. Integers: `1-5` and `1-9 (+2)` are Python's
/// `range(start, end + 1, step)` (so `5-1` is empty and `10-1 (-3)` is 10, 7, 4), `1-10 [4]` is
/// `int()` of `np.linspace`. Numbers: `1-2` and `0.5-1 (+0.25)` are `np.arange(start, end + step,
/// step)`, `0.2-1 [5]` is `np.linspace`. Anything else is a single value.
fn expand_range(v: &str, integer: bool) -> Result<Option<Vec<String>>> {
    static INT: std::sync::OnceLock<[regex::Regex; 2]> = std::sync::OnceLock::new();
    static FLOAT: std::sync::OnceLock<[regex::Regex; 2]> = std::sync::OnceLock::new();
    let compile = |r: &str| regex::Regex::new(r).expect("a valid regex");
    // `re_range`, `re_range_count`, `re_range_float`, `re_range_count_float` (their `.` is any
    // character, as in A1111's patterns), anchored as `fullmatch`.
    let [by_step, by_count] = if integer {
        INT.get_or_init(|| [compile(r"\A\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*\z"), compile(r"\A\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])?\s*\z")])
    } else {
        FLOAT.get_or_init(|| {
            [
                compile(r"\A\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*\z"),
                compile(r"\A\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*\])?\s*\z"),
            ]
        })
    };
    let not_a_number = |s: &str| Error::Argument(format!("grid range {v:?}: {s:?} is not a number (as Python's int() or float() reads it)"));
    // Python's `int()` for whole numbers (a count is one too: `[5.5]` is refused, as A1111's
    // `int("5.5")` raises), `float()` for the rest.
    let whole = |s: &str| super::generation_parameters::python_int(&serde_json::Value::String(s.to_string())).map(|i| i as f64).map_err(|_| not_a_number(s));
    let number = |s: &str| if integer { whole(s) } else { super::generation_parameters::python_strip(s).parse::<f64>().map_err(|_| not_a_number(s)) };
    let too_many = || Error::Argument(format!("grid range {v:?}: more than 1000 values"));
    let values: Vec<f64> = if let Some(c) = by_step.captures(v) {
        let (start, end) = (number(&c[1])?, number(&c[2])?);
        let step = c.get(3).map(|s| number(s.as_str())).transpose()?.unwrap_or(1.0);
        if step == 0.0 {
            return Err(Error::Argument(format!("grid range {v:?}: a step of 0")));
        }
        // range(start, end + 1, step) / np.arange(start, end + step, step): the count is
        // ⌈(stop − start) / step⌉, np.arange's values are start + i·((start + step) − start).
        let stop = if integer { end + 1.0 } else { end + step };
        let count = ((stop - start) / step).ceil();
        if count > 1000.0 {
            return Err(too_many());
        }
        let delta = if integer { step } else { (start + step) - start };
        (0..count.max(0.0) as usize).map(|i| if i == 0 { start } else { start + i as f64 * delta }).collect()
    } else if let Some(c) = by_count.captures(v) {
        let (start, end) = (number(&c[1])?, number(&c[2])?);
        let count = c.get(3).map(|s| whole(s.as_str())).transpose()?.unwrap_or(1.0).max(0.0) as usize;
        if count > 1000 {
            return Err(too_many());
        }
        // np.linspace: i · ((end − start) / (count − 1)) + start, the last value `end` itself.
        let step = (end - start) / (count as f64 - 1.0);
        (0..count).map(|i| if count > 1 && i == count - 1 { end } else if count == 1 { start } else { i as f64 * step + start }).collect()
    } else {
        return Ok(None);
    };
    // `int(x)` truncates; a float value is written so that it reads back exactly.
    Ok(Some(values.into_iter().map(|x| if integer { format!("{}", x.trunc() as i64) } else { format!("{x}") }).collect()))
}

impl std::str::FromStr for Axis {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let (name, values) = spec.split_once('=').ok_or_else(|| Error::Argument(format!("grid axis {spec:?}: expected AXIS=V1,V2,...")))?;
        let kind = AxisKind::parse(name)?;
        let mut out = vec![];
        for v in csv_values(values)? {
            match kind.numeric().map(|int| expand_range(&v, int)).transpose()?.flatten() {
                Some(r) => out.extend(r),
                None => out.push(v),
            }
        }
        if out.is_empty() {
            return Err(Error::Argument(format!("grid axis {spec:?}: no values")));
        }
        if out.len() > 1000 {
            return Err(Error::Argument(format!("grid axis {spec:?}: more than 1000 values")));
        }
        Ok(Self { kind, values: out })
    }
}

/// `settings` with one axis value applied. `original` is the job before any axis (Prompt S/R
/// searches it).
pub fn apply(settings: &mut Settings, kind: &AxisKind, value: &str, search: &str) -> Result<()> {
    let bad = |want: &str| Error::Argument(format!("grid axis {}: {value:?}: expected {want}", kind.label()));
    let int = || value.trim().parse::<i64>().map_err(|_| bad("a whole number"));
    let float = || value.trim().parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(|| bad("a number"));
    // A1111's `fix_axis_seeds`: -1 draws a seed; other values are seeds as given.
    let seed_value = || match value.trim() {
        "-1" => Ok(super::jobs::random_seed()),
        v => v.parse::<u64>().map_err(|_| bad("a whole number from 0, or -1 for a random seed")),
    };
    match kind {
        AxisKind::Seed => settings.seed = Some(seed_value()?),
        AxisKind::VarSeed => settings.subseed = Some(seed_value()?),
        AxisKind::VarStrength => settings.subseed_strength = Some(float()?).filter(|v| (0.0..=1.0).contains(v)).ok_or_else(|| bad("a number from 0 to 1"))?,
        AxisKind::Steps => settings.steps = usize::try_from(int()?).ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| bad("1 to 1000"))?,
        AxisKind::Cfg => settings.cfg = float()?,
        AxisKind::Sampler => {
            let k: crate::sdxl::schedulers::SamplerKind = value.parse()?;
            settings.sampler = k.name().to_string();
        }
        AxisKind::Schedule => {
            let s: crate::sdxl::schedulers::Schedule = value.parse()?;
            settings.schedule = if s == crate::sdxl::schedulers::Schedule::Default { String::new() } else { s.name().to_string() };
        }
        AxisKind::Size => {
            let (w, h) = value.trim().split_once(['x', 'X']).ok_or_else(|| bad("WxH"))?;
            settings.width = side(w.trim().parse().map_err(|_| bad("WxH"))?).ok_or_else(|| bad(SIDE))?;
            settings.height = side(h.trim().parse().map_err(|_| bad("WxH"))?).ok_or_else(|| bad(SIDE))?;
        }
        AxisKind::Width => settings.width = usize::try_from(int()?).ok().and_then(side).ok_or_else(|| bad(SIDE))?,
        AxisKind::Height => settings.height = usize::try_from(int()?).ok().and_then(side).ok_or_else(|| bad(SIDE))?,
        AxisKind::ClipSkip => {
            // A1111's "Clip skip" counts from 1; ours (diffusers') from 0.
            settings.clip_skip = usize::try_from(int()? - 1).map_err(|_| bad("1 or more"))?;
        }
        AxisKind::PromptSr => {
            if search.is_empty() {
                return Err(bad("a first value to search for"));
            }
            if !settings.prompt.contains(search) && !settings.negative_prompt.contains(search) {
                return Err(Error::Argument(format!("grid axis Prompt S/R: {search:?} is in neither prompt")));
            }
            settings.prompt = settings.prompt.replace(search, value);
            settings.negative_prompt = settings.negative_prompt.replace(search, value);
        }
        AxisKind::LoraWeight(name) => {
            let w = float()?;
            let mut found = false;
            for l in settings.loras.iter_mut().filter(|l| lora_named(l, name)) {
                l.weight = w;
                if let Some(s) = &l.schedule {
                    // `1:lbw=…`: the weight is the first field.
                    let rest = s.split_once(':').map(|(_, r)| format!(":{r}")).unwrap_or_default();
                    l.schedule = Some(format!("{w}{rest}"));
                }
                found = true;
            }
            let (p, n) = set_tag_weight(&settings.prompt, name, w);
            settings.prompt = p;
            if !(found || n > 0) {
                return Err(Error::Argument(format!("grid axis LoRA {name}: this job has no LoRA {name} (give it with --lora or a <lora:{name}:w> tag)")));
            }
        }
        AxisKind::Mix => {
            crate::mix::build(&crate::mix::MixOptions { strategy: value.trim().to_string(), ..Default::default() })?;
            settings.mix = value.trim().to_string();
        }
        AxisKind::Lbw(name) => {
            crate::lora::schedule::parse_block_weights(value.trim(), 1.0)?;
            let mut found = false;
            for l in settings.loras.iter_mut().filter(|l| name.as_ref().is_none_or(|n| lora_named(l, n))) {
                l.schedule = Some(format!("{}:lbw={}", l.weight, value.trim()));
                found = true;
            }
            if !found {
                return Err(Error::Argument(format!("grid axis {}: this job has no such LoRA (give it with --lora)", kind.label())));
            }
        }
        AxisKind::Checkpoint => {
            crate::sdxl::model::ModelSource::parse(value.trim()).map_err(|e| Error::Argument(format!("grid axis Checkpoint: {e}")))?;
            settings.model = value.trim().to_string();
        }
        AxisKind::Vae => {
            settings.vae = if matches!(value.trim(), "" | "None" | "Automatic") { String::new() } else { value.trim().to_string() };
            if !settings.vae.is_empty() && !Path::new(&settings.vae).exists() {
                return Err(bad("a VAE file or folder, or None"));
            }
        }
        AxisKind::Denoise => {
            let d = float()?;
            if !(0.0..=1.0).contains(&d) {
                return Err(bad("a number in [0, 1]"));
            }
            match (&mut settings.init, &mut settings.hires) {
                (Some(i), _) => i.strength = d,
                (None, Some(h)) => h.denoise = d,
                _ => return Err(Error::Argument("grid axis Denoising strength: the job has neither an init image nor hires fix".into())),
            }
        }
        AxisKind::ControlWeight
        | AxisKind::ControlStart
        | AxisKind::ControlEnd
        | AxisKind::ControlModel
        | AxisKind::ControlModule
        | AxisKind::ControlMode
        | AxisKind::ControlResizeMode
        | AxisKind::ControlThresholdA
        | AxisKind::ControlThresholdB => {
            if settings.controlnet.is_empty() {
                return Err(Error::Argument(format!("grid axis {}: the job has no ControlNet unit (give one with --controlnet)", kind.label())));
            }
            let fraction = || float().ok().filter(|v| (0.0..=1.0).contains(v)).ok_or_else(|| bad("a number from 0 to 1"));
            let v = value.trim();
            for u in &mut settings.controlnet {
                match kind {
                    AxisKind::ControlWeight => u.weight = float()?,
                    AxisKind::ControlStart => u.guidance_start = fraction()?,
                    AxisKind::ControlEnd => u.guidance_end = fraction()?,
                    AxisKind::ControlModel => u.model = v.to_string(),
                    AxisKind::ControlMode => u.control_mode = v.parse().map_err(|_| bad("Balanced, My prompt is more important or ControlNet is more important"))?,
                    AxisKind::ControlResizeMode => {
                        u.resize_mode = crate::sdxl::img2img::ResizeMode::parse_control(v).map_err(|_| bad("Just Resize, Crop and Resize or Resize and Fill"))?
                    }
                    AxisKind::ControlThresholdA | AxisKind::ControlThresholdB => {
                        let x = float()?;
                        let t = if matches!(kind, AxisKind::ControlThresholdA) { &mut u.threshold_a } else { &mut u.threshold_b };
                        *t = Some(x);
                        match crate::sdxl::preprocessor::Preprocessor::parse(&u.module, u.threshold_a, u.threshold_b) {
                            Ok(crate::sdxl::preprocessor::Preprocessor::Canny { .. }) => {}
                            // Only canny has thresholds: on another module the cells would all be one.
                            Ok(_) => return Err(bad(&format!("a unit with thresholds (canny); the unit's preprocessor is {}", u.module))),
                            Err(e) => return Err(bad(&format!("a threshold the preprocessor takes ({e})"))),
                        }
                    }
                    _ => {
                        crate::sdxl::preprocessor::Preprocessor::parse(v, u.threshold_a, u.threshold_b)?;
                        u.module = v.to_string();
                    }
                }
                if u.guess_mode && !u.control_mode.is_balanced() {
                    return Err(bad("Balanced with guess mode (the unit has guess mode on)"));
                }
                if u.guidance_start > u.guidance_end {
                    return Err(bad(&format!("a step range with start ≤ end (the unit has {} to {})", u.guidance_start, u.guidance_end)));
                }
            }
        }
    }
    Ok(())
}

const SIDE: &str = "a size in pixels, a multiple of the model's VAE factor (8 for SDXL)";

fn side(v: usize) -> Option<usize> {
    (v > 0 && super::settings::side_fits_any_model(v)).then_some(v)
}

fn lora_named(l: &LoraSetting, name: &str) -> bool {
    l.name == name || Path::new(&l.name).file_stem().and_then(|s| s.to_str()) == Some(name)
}

/// Sets the weight of every `<lora:NAME:w>` tag of `prompt` (keeping extra fields); returns
/// the prompt and how many tags it changed.
fn set_tag_weight(prompt: &str, name: &str, w: f64) -> (String, usize) {
    let tag = format!("<lora:{name}:");
    let mut out = String::new();
    let mut rest = prompt;
    let mut n = 0;
    while let Some(i) = rest.find(&tag) {
        let after = &rest[i + tag.len()..];
        let Some(end) = after.find('>') else { break };
        let fields = &after[..end];
        let tail = fields.split_once(':').map(|(_, r)| format!(":{r}")).unwrap_or_default();
        out.push_str(&rest[..i]);
        out.push_str(&format!("{tag}{w}{tail}>"));
        rest = &after[end + 1..];
        n += 1;
    }
    out.push_str(rest);
    (out, n)
}

/// One cell's images.
#[derive(Debug, Clone, Serialize)]
pub struct GridCell {
    pub x: usize,
    pub y: usize,
    pub z: usize,
    pub images: Vec<PathBuf>,
}

/// What a grid run wrote.
#[derive(Debug, Clone, Serialize)]
pub struct GridOutput {
    pub grids: Vec<PathBuf>,
    pub cells: Vec<GridCell>,
    /// Axis labels in x, y, z order (absent axes are not listed).
    pub axes: Vec<(String, Vec<String>)>,
}

/// Holds a grid's tag in its folder: the tag of its file names, none for the first grid there,
/// then `-0001`, `-0002`, …, so that a second grid in the same folder keeps the first's files
/// (A1111 numbers its grids and images rather than overwrite them). The tag is reserved by a
/// marker file made with `create_new`, so grids started together take different tags; the
/// marker goes when the grid is drawn (a run stopped part-way leaves it, and its tag is skipped).
struct GridTag {
    tag: String,
    marker: PathBuf,
}

impl GridTag {
    fn reserve(out: &Path) -> Result<Self> {
        for n in 0u32.. {
            let tag = if n == 0 { String::new() } else { format!("-{n:04}") };
            if out.join(format!("grid{tag}.png")).exists() || out.join(format!("grid{tag}-z00.png")).exists() {
                continue;
            }
            let marker = out.join(format!(".grid{tag}.reserved"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&marker) {
                Ok(_) => return Ok(Self { tag, marker }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&marker, e)),
            }
        }
        Err(Error::Argument(format!("{}: no free grid number", out.display())))
    }
}

/// Runs every cell (Z outermost, then Y, then X, as A1111 orders them) and draws the grids.
/// Each cell's images are `xyz-zZZ-yYY-xXX-KK.png`; the grids `grid.png` (no Z) or `grid-zZZ.png`.
/// A folder that already holds a grid gets the next one as `xyz-NNNN-…` and `grid-NNNN….png`.
#[allow(clippy::too_many_arguments)]
pub fn run_grid(
    studio: &Studio,
    base: &Settings,
    axes: [Option<&Axis>; 3],
    out: &Path,
    library: Option<&Path>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(StudioEvent),
) -> Result<GridOutput> {
    let mut base = base.clone();
    // One seed for every cell unless an axis varies it (A1111 fixes -1 before the grid).
    if base.seed.is_none() {
        base.seed = Some(super::jobs::random_seed());
    }
    // The same for the variation seed, when some cell has a variation strength.
    if base.subseed.is_none() && (base.subseed_strength != 0.0 || axes.iter().flatten().any(|a| a.kind == AxisKind::VarStrength)) {
        base.subseed = Some(super::jobs::random_seed());
    }
    // A1111's `fix_axis_seeds`: a -1 on a seed axis is drawn once, so its column is one seed
    // and its label says which.
    let drawn: Vec<Option<Axis>> = axes
        .iter()
        .map(|a| {
            a.map(|a| {
                let mut a = a.clone();
                if matches!(a.kind, AxisKind::Seed | AxisKind::VarSeed) {
                    for v in a.values.iter_mut().filter(|v| v.trim() == "-1") {
                        *v = super::jobs::random_seed().to_string();
                    }
                }
                a
            })
        })
        .collect();
    let axes: [Option<&Axis>; 3] = [drawn[0].as_ref(), drawn[1].as_ref(), drawn[2].as_ref()];
    let values = |a: Option<&Axis>| a.map_or_else(|| vec![String::new()], |a| a.values.clone());
    let (xs, ys, zs) = (values(axes[0]), values(axes[1]), values(axes[2]));
    // Two axes on one setting would draw one axis's values under the other's labels. Prompt S/R
    // is the exception: each axis searches for its own first value.
    let kinds: Vec<&AxisKind> = axes.iter().flatten().map(|a| &a.kind).collect();
    for (i, k) in kinds.iter().enumerate() {
        if **k != AxisKind::PromptSr && kinds[..i].contains(k) {
            return Err(Error::Argument(format!("grid: two axes vary {}; give each setting one axis", k.label())));
        }
    }
    // Every cell's settings first, so a bad value fails before anything runs.
    let mut cells = vec![];
    for (zi, zv) in zs.iter().enumerate() {
        for (yi, yv) in ys.iter().enumerate() {
            for (xi, xv) in xs.iter().enumerate() {
                let mut s = base.clone();
                for (axis, v) in [(axes[2], zv), (axes[1], yv), (axes[0], xv)] {
                    if let Some(a) = axis {
                        apply(&mut s, &a.kind, v, &a.values[0])?;
                    }
                }
                cells.push(((xi, yi, zi), s));
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let reserved = GridTag::reserve(out)?;
    let tag = reserved.tag.as_str();
    let mut done = vec![];
    for ((xi, yi, zi), s) in &cells {
        let prefix = format!("xyz{tag}-z{zi:02}-y{yi:02}-x{xi:02}");
        let names = |k: usize| format!("{prefix}-{k:02}.png");
        let o = studio.run(s, library, &ImageOutputs { dir: out, names: Some(&names), images: None, keep_interrupted: false, skip: None, format: Default::default() }, cancel, on_event, &mut |_| {})?;
        let mut images = o.kept;
        images.extend(o.written);
        images.sort();
        done.push(GridCell { x: *xi, y: *yi, z: *zi, images });
    }
    let label = |a: Option<&Axis>, v: &str| a.map(|a| a.kind.cell_label(v)).unwrap_or_default();
    let mut grids = vec![];
    for (zi, zv) in zs.iter().enumerate() {
        let mut tiles = vec![];
        for yi in 0..ys.len() {
            for xi in 0..xs.len() {
                let cell = done.iter().find(|c| (c.x, c.y, c.z) == (xi, yi, zi)).ok_or_else(|| Error::Argument("grid: a cell is missing".into()))?;
                let first = cell.images.first().ok_or_else(|| Error::Argument("grid: a cell made no image".into()))?;
                tiles.push(image::open(first).map_err(|e| Error::BadFile { path: first.clone(), message: e.to_string() })?.to_rgb8());
            }
        }
        let col_labels: Vec<String> = xs.iter().map(|v| label(axes[0], v)).collect();
        let row_labels: Vec<String> = ys.iter().map(|v| label(axes[1], v)).collect();
        let title = label(axes[2], zv);
        let mut legend: Vec<String> = ["X", "Y", "Z"]
            .iter()
            .zip(axes.iter())
            .filter_map(|(n, a)| a.map(|a| format!("{n}: {} ({} values)", a.kind.label(), a.values.len())))
            .collect();
        legend.push(format!("Prompt: {}", base.prompt));
        // What the cells share: the fields no axis varies.
        let varies = |k: &dyn Fn(&AxisKind) -> bool| axes.iter().flatten().any(|a| k(&a.kind));
        let mut shared = vec![];
        if !varies(&|k| *k == AxisKind::Steps) {
            shared.push(format!("Steps: {}", base.steps));
        }
        if !varies(&|k| *k == AxisKind::Cfg) {
            shared.push(format!("CFG scale: {}", base.cfg));
        }
        if !varies(&|k| *k == AxisKind::Seed) {
            shared.push(format!("Seed: {}", base.seed.unwrap_or(0)));
        }
        if !varies(&|k| *k == AxisKind::Mix) && !base.loras.is_empty() {
            shared.push(format!("LoRA mix: {}", base.mix));
        }
        let fixed_loras: Vec<String> = base
            .loras
            .iter()
            .filter(|l| !varies(&|k| matches!(k, AxisKind::LoraWeight(n) if lora_named(l, n))))
            .map(|l| format!("{} {}", l.name, l.weight))
            .collect();
        if !fixed_loras.is_empty() {
            shared.push(format!("LoRAs: {}", fixed_loras.join(", ")));
        }
        legend.push(shared.join(", "));
        let img = draw_grid(&tiles, xs.len(), &col_labels, &row_labels, &title, &legend);
        let path = out.join(if axes[2].is_some() { format!("grid{tag}-z{zi:02}.png") } else { format!("grid{tag}.png") });
        let meta = serde_json::json!({
            "x": axes[0].map(|a| (a.kind.label(), a.values.clone())),
            "y": axes[1].map(|a| (a.kind.label(), a.values.clone())),
            "z": axes[2].map(|a| (a.kind.label(), a.values.clone())),
            "z_value": zv,
            "settings": base,
            "cells": done.iter().filter(|c| c.z == zi).map(|c| serde_json::json!({"x": c.x, "y": c.y, "images": c.images.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        });
        // A1111 gives a grid its first image's parameters; the JSON names every cell.
        let first = &done.iter().find(|c| c.z == zi).and_then(|c| c.images.first()).cloned().unwrap_or_default();
        let params = super::metadata::png_text_chunks(&std::fs::read(first).map_err(|e| Error::io(first, e))?)?.remove("parameters").unwrap_or_default();
        output::write_atomic(&path, &output::encode_png(&img, &[("parameters", params), ("loramix-grid", meta.to_string())])?)?;
        grids.push(path);
    }
    let _ = std::fs::remove_file(&reserved.marker);
    let axes_out = axes.iter().flatten().map(|a| (a.kind.label(), a.values.clone())).collect();
    Ok(GridOutput { grids, cells: done, axes: axes_out })
}

/// DejaVu Sans, as A1111 ships it for grid labels (embedded: a grid must draw the same on every machine).
fn font() -> Result<FontRef<'static>> {
    FontRef::try_from_slice(dejavu::sans::regular()).map_err(|e| Error::Argument(format!("grid font: {e}")))
}

/// Words wrapped to `width` pixels.
fn wrap(font: &FontRef, scale: PxScale, text: &str, width: f32) -> Vec<String> {
    let sf = font.as_scaled(scale);
    let measure = |s: &str| s.chars().map(|c| sf.h_advance(font.glyph_id(c))).sum::<f32>();
    let mut lines = vec![];
    let mut line = String::new();
    for word in text.split(' ') {
        let candidate = if line.is_empty() { word.to_string() } else { format!("{line} {word}") };
        if measure(&candidate) <= width || line.is_empty() {
            line = candidate;
        } else {
            lines.push(std::mem::take(&mut line));
            line = word.to_string();
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn text_width(font: &FontRef, scale: PxScale, s: &str) -> f32 {
    let sf = font.as_scaled(scale);
    s.chars().map(|c| sf.h_advance(font.glyph_id(c))).sum()
}

/// Draws `text` with its top-left corner at (x, y), blending black over the background.
fn draw_text(img: &mut RgbImage, font: &FontRef, scale: PxScale, x: f32, y: f32, text: &str) {
    let sf = font.as_scaled(scale);
    let mut caret = ab_glyph::point(x, y + sf.ascent());
    for c in text.chars() {
        let id = font.glyph_id(c);
        let g = id.with_scale_and_position(scale, caret);
        caret.x += sf.h_advance(id);
        if let Some(o) = font.outline_glyph(g) {
            let b = o.px_bounds();
            o.draw(|gx, gy, cov| {
                let (px, py) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    let p = img.get_pixel_mut(px as u32, py as u32);
                    for ch in p.0.iter_mut() {
                        *ch = (*ch as f32 * (1.0 - cov.min(1.0))).round() as u8;
                    }
                }
            });
        }
    }
}

/// The grid: tiles in rows of `cols`, column labels above, row labels at the left (A1111's
/// layout), an optional title above and the legend below. Tiles smaller than 256 px are scaled
/// up (nearest neighbour) so the labels stay readable beside them.
pub fn draw_grid(tiles: &[RgbImage], cols: usize, col_labels: &[String], row_labels: &[String], title: &str, legend: &[String]) -> RgbImage {
    let font = match font() {
        Ok(f) => f,
        Err(_) => return RgbImage::new(1, 1),
    };
    let rows = tiles.len().div_ceil(cols.max(1));
    let (tw0, th0) = tiles.first().map_or((64, 64), |t| (t.width(), t.height()));
    let up = (256 / tw0.min(th0).max(1)).max(1);
    let (tw, th) = (tw0 * up, th0 * up);
    // A1111: font size from the image size.
    let fs = ((tw + th) as f32 / 25.0).clamp(14.0, 48.0);
    let scale = PxScale::from(fs);
    let line_h = fs * 1.25;
    let has_cols = col_labels.iter().any(|l| !l.is_empty());
    let has_rows = row_labels.iter().any(|l| !l.is_empty());
    let pad_left = if has_rows { (tw as f32 * 0.75).max(row_labels.iter().map(|l| text_width(&font, scale, l)).fold(0.0, f32::max).min(tw as f32 * 1.5) + fs) } else { 0.0 };
    let col_lines: Vec<Vec<String>> = col_labels.iter().map(|l| wrap(&font, scale, l, tw as f32 - fs * 0.5)).collect();
    let pad_top_cols = if has_cols { col_lines.iter().map(Vec::len).max().unwrap_or(1) as f32 * line_h + fs * 0.5 } else { 0.0 };
    let title_lines = if title.is_empty() { vec![] } else { wrap(&font, PxScale::from(fs * 1.2), title, (pad_left + (tw * cols as u32) as f32) - fs) };
    let pad_title = title_lines.len() as f32 * line_h * 1.2 + if title_lines.is_empty() { 0.0 } else { fs * 0.5 };
    let small = PxScale::from((fs * 0.7).max(12.0));
    let total_w = pad_left + (tw * cols as u32) as f32;
    let legend_lines: Vec<String> = legend.iter().flat_map(|l| wrap(&font, small, l, total_w - fs)).collect();
    let pad_bottom = if legend_lines.is_empty() { 0.0 } else { legend_lines.len() as f32 * fs * 0.7 * 1.3 + fs };
    let (w, h) = (total_w.ceil() as u32, (pad_title + pad_top_cols + (th * rows as u32) as f32 + pad_bottom).ceil() as u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut y = fs * 0.25;
    for l in &title_lines {
        let tw_ = text_width(&font, PxScale::from(fs * 1.2), l);
        draw_text(&mut img, &font, PxScale::from(fs * 1.2), (w as f32 - tw_) / 2.0, y, l);
        y += line_h * 1.2;
    }
    let grid_top = pad_title + pad_top_cols;
    for (c, lines) in col_lines.iter().enumerate() {
        let mut ly = pad_title + pad_top_cols - fs * 0.25 - lines.len() as f32 * line_h;
        for l in lines {
            let lw = text_width(&font, scale, l);
            draw_text(&mut img, &font, scale, pad_left + (c as u32 * tw) as f32 + (tw as f32 - lw) / 2.0, ly, l);
            ly += line_h;
        }
    }
    for (r, label) in row_labels.iter().enumerate().take(rows) {
        let lines = wrap(&font, scale, label, pad_left - fs * 0.5);
        let mut ly = grid_top + (r as u32 * th) as f32 + (th as f32 - lines.len() as f32 * line_h) / 2.0;
        for l in &lines {
            let lw = text_width(&font, scale, l);
            draw_text(&mut img, &font, scale, (pad_left - lw) / 2.0, ly, l);
            ly += line_h;
        }
    }
    for (i, t) in tiles.iter().enumerate() {
        let (c, r) = ((i % cols) as u32, (i / cols) as u32);
        let (ox, oy) = (pad_left as u32 + c * tw, grid_top as u32 + r * th);
        for y in 0..th.min(t.height() * up) {
            for x in 0..tw.min(t.width() * up) {
                if ox + x < w && oy + y < h {
                    img.put_pixel(ox + x, oy + y, *t.get_pixel(x / up, y / up));
                }
            }
        }
    }
    let mut ly = grid_top + (th * rows as u32) as f32 + fs * 0.5;
    for l in &legend_lines {
        draw_text(&mut img, &font, small, fs * 0.5, ly, l);
        ly += fs * 0.7 * 1.3;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ControlNet axes set every unit, check their ranges, and need a unit.
    #[test]
    fn controlnet_axes() {
        let unit = super::super::ControlNetSetting { model: "cn".into(), image: "a.png".into(), ..Default::default() };
        let mut s = Settings { controlnet: vec![unit.clone(), unit], ..Default::default() };
        let axis: Axis = "[ControlNet] Weight=0.5,1.5".parse().unwrap();
        assert_eq!(axis.kind, AxisKind::ControlWeight);
        apply(&mut s, &axis.kind, "0.5", "").unwrap();
        apply(&mut s, &AxisKind::ControlEnd, "0.6", "").unwrap();
        apply(&mut s, &AxisKind::ControlModule, "canny", "").unwrap();
        assert!(s.controlnet.iter().all(|u| u.weight == 0.5 && u.guidance_end == 0.6 && u.module == "canny"));
        assert!(apply(&mut s, &AxisKind::ControlStart, "0.8", "").unwrap_err().to_string().contains("start ≤ end"));
        assert!(apply(&mut s.clone(), &AxisKind::ControlEnd, "1.5", "").is_err());
        assert!(apply(&mut s.clone(), &AxisKind::ControlModule, "depth", "").is_err());
        // (The failed start above left the units with start 0.8.)
        s.controlnet.iter_mut().for_each(|u| u.guidance_start = 0.0);
        for (axis, value) in [("[ControlNet] Control Mode", "My prompt is more important"), ("[ControlNet] Resize Mode", "Resize and Fill"), ("[ControlNet] Pre Threshold A", "50"), ("[ControlNet] Pre Threshold B", "90.5")] {
            let a: Axis = format!("{axis}={value}").parse().unwrap();
            apply(&mut s, &a.kind, value, "").unwrap();
        }
        assert!(s.controlnet.iter().all(|u| u.control_mode == crate::sdxl::controlnet::ControlMode::Prompt
            && u.resize_mode == crate::sdxl::img2img::ResizeMode::ResizeAndFill
            && (u.threshold_a, u.threshold_b) == (Some(50.0), Some(90.5))));
        assert!(apply(&mut s.clone(), &AxisKind::ControlMode, "louder", "").is_err());
        assert!(apply(&mut s.clone(), &AxisKind::ControlThresholdA, "-3", "").is_err());
        let mut plain = s.clone();
        plain.controlnet.iter_mut().for_each(|u| u.module = "none".into());
        let e = apply(&mut plain, &AxisKind::ControlThresholdA, "50", "").unwrap_err().to_string();
        assert!(e.contains("Pre Threshold A") && e.contains("canny"), "{e}");
        let e = apply(&mut Settings::default(), &AxisKind::ControlWeight, "1", "").unwrap_err().to_string();
        assert!(e.contains("no ControlNet unit"), "{e}");
    }

    #[test]
    fn axes_parse_with_ranges_and_quotes() {
        let a: Axis = "seed=1-3".parse().unwrap();
        assert_eq!((a.kind.clone(), a.values.clone()), (AxisKind::Seed, vec!["1".into(), "2".into(), "3".into()]));
        assert_eq!("steps=10-20 (+5)".parse::<Axis>().unwrap().values, ["10", "15", "20"]);
        assert_eq!("CFG Scale=1-2 [3]".parse::<Axis>().unwrap().values, ["1", "1.5", "2"]);
        // A1111's int(x) over np.linspace truncates.
        assert_eq!("seed=1-10 [3]".parse::<Axis>().unwrap().values, ["1", "5", "10"]);
        assert_eq!("steps=10-1 [4]".parse::<Axis>().unwrap().values, ["10", "7", "4", "1"]);
        // Python's range(start, end + 1, step), np.arange(start, end + step, step) (values from
        // numpy: np.arange(0.1, 0.3 + 0.1, 0.1).tolist() has 0.4 too, np.linspace(0, 1, 4).tolist()).
        assert_eq!("steps=10-1 (-3)".parse::<Axis>().unwrap().values, ["10", "7", "4"]);
        assert!("steps=5-1".parse::<Axis>().unwrap_err().to_string().contains("no values"));
        assert_eq!("cfg=5-7".parse::<Axis>().unwrap().values, ["5", "6", "7"]);
        assert_eq!("cfg=0.1-0.3 (+0.1)".parse::<Axis>().unwrap().values, ["0.1", "0.2", "0.30000000000000004", "0.4"]);
        assert_eq!("cfg=0-1 [4]".parse::<Axis>().unwrap().values, ["0", "0.3333333333333333", "0.6666666666666666", "1"]);
        assert!("cfg=0-1 [2.5]".parse::<Axis>().unwrap_err().to_string().contains("not a number"));
        assert_eq!("seed=\u{661}-\u{663}".parse::<Axis>().unwrap().values, ["1", "2", "3"]);
        assert_eq!(AxisKind::Cfg.cell_label("7"), "CFG Scale: 7.0");
        assert_eq!(AxisKind::Cfg.cell_label("0.30000000000000004"), "CFG Scale: 0.3");
        assert_eq!(AxisKind::Steps.cell_label("020"), "Steps: 20");
        assert_eq!(AxisKind::Sampler.cell_label("Euler a"), "Euler a");
        assert_eq!(AxisKind::Checkpoint.cell_label("/m/sdxl.safetensors"), "sdxl.safetensors");
        assert_eq!(AxisKind::Denoise.cell_label("0.5"), "Denoising: 0.5");
        assert_eq!("lora:Vlox=0,0.5,1".parse::<Axis>().unwrap().kind, AxisKind::LoraWeight("Vlox".into()));
        assert_eq!("prompt_sr=\"red, circle\",blue".parse::<Axis>().unwrap().values, ["red, circle", "blue"]);
        assert!("colour=1,2".parse::<Axis>().unwrap_err().to_string().contains("expected seed"));
        assert!("steps=1-5 (-1)".parse::<Axis>().is_err());
    }

    #[test]
    fn values_apply_to_settings() {
        let base = Settings {
            prompt: "a red circle <lora:vlox:1>".into(),
            loras: vec![LoraSetting { name: "checkered".into(), weight: 1.0, role: None, schedule: None }],
            ..Settings::default()
        };
        let mut s = base.clone();
        for bad in ["63x64", "0x64"] {
            assert!(apply(&mut s.clone(), &AxisKind::Size, bad, "").unwrap_err().to_string().contains("multiple"), "{bad}");
        }
        assert!(apply(&mut s.clone(), &AxisKind::Checkpoint, "/no/such/model", "").is_err());
        assert!(apply(&mut s.clone(), &AxisKind::Vae, "/no/such/vae.safetensors", "").is_err());
        apply(&mut s, &AxisKind::PromptSr, "blue", "red").unwrap();
        assert_eq!(s.prompt, "a blue circle <lora:vlox:1>");
        apply(&mut s, &AxisKind::LoraWeight("vlox".into()), "0.5", "").unwrap();
        assert_eq!(s.prompt, "a blue circle <lora:vlox:0.5>");
        apply(&mut s, &AxisKind::LoraWeight("checkered".into()), "0.25", "").unwrap();
        assert_eq!(s.loras[0].weight, 0.25);
        apply(&mut s, &AxisKind::Lbw(None), "SDXL-OUTALL", "").unwrap();
        assert_eq!(s.loras[0].schedule.as_deref(), Some("0.25:lbw=SDXL-OUTALL"));
        apply(&mut s, &AxisKind::Size, "128x96", "").unwrap();
        assert_eq!((s.width, s.height), (128, 96));
        apply(&mut s, &AxisKind::ClipSkip, "2", "").unwrap();
        assert_eq!(s.clip_skip, 1);
        apply(&mut s, &AxisKind::Sampler, "DPM++ 2M", "").unwrap();
        assert_eq!(s.sampler, "dpmpp_2m");
        assert!(apply(&mut s, &AxisKind::Mix, "blend", "").is_err());
        assert!(apply(&mut s, &AxisKind::LoraWeight("nope".into()), "1", "").unwrap_err().to_string().contains("no LoRA nope"));
        assert!(apply(&mut s, &AxisKind::PromptSr, "x", "zebra").is_err());
        // Seeds: -1 draws one (A1111's fix_axis_seeds); other negatives are no seeds.
        apply(&mut s, &AxisKind::VarSeed, "18446744073709551615", "").unwrap();
        assert_eq!(s.subseed, Some(u64::MAX));
        apply(&mut s, &AxisKind::VarStrength, "0.3", "").unwrap();
        assert_eq!(s.subseed_strength, 0.3);
        assert!(apply(&mut s, &AxisKind::VarStrength, "1.5", "").is_err());
        apply(&mut s, &AxisKind::Seed, "-1", "").unwrap();
        for kind in [AxisKind::Seed, AxisKind::VarSeed] {
            assert!(apply(&mut s, &kind, "-5", "").unwrap_err().to_string().contains("-1 for a random seed"));
        }
    }

    #[test]
    fn the_grid_has_room_for_labels_and_tiles() {
        let tiles: Vec<RgbImage> = (0..4).map(|i| RgbImage::from_pixel(64, 64, Rgb([i * 60, 0, 0]))).collect();
        let g = draw_grid(&tiles, 2, &["Seed: 1".into(), "Seed: 2".into()], &["LoRA mix: merge".into(), "LoRA mix: auto".into()], "CFG Scale: 5", &["X: Seed".into()]);
        assert!(g.width() >= 2 * 256 && g.height() >= 2 * 256);
        // Some label pixels are dark, and the tiles are in place.
        let dark = g.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 0);
    }
}
