//! A1111's request and response bodies (`modules/api/models.py`), and how a request becomes one
//! of our jobs. Fields other tools send that we do not use (`eta`, `s_churn`, extension
//! blocks) are accepted and ignored, as A1111 does for extensions it lacks; `null` reads as the
//! field's default, as pydantic's optional fields do.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::sdxl::img2img::MaskedContent;
use crate::sdxl::schedulers::{SamplerKind, Schedule};
use crate::studio::{HiresSettings, InitSettings, InpaintArea, SdUpscaleSettings, Settings};

fn or_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A value as A1111's pydantic (v1) models take it for a number or a flag: an integer field
/// takes a float (cut to an integer, as Python's `int()`), a numeric string (`"20"`) or a
/// boolean; a float field a numeric string; a flag `0`/`1` and `"true"`/`"no"`/`"on"`/….
pub(crate) trait Lenient: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

fn lenient_int(v: &Value) -> Result<i64, String> {
    let bad = || format!("value is not a valid integer (got {v})");
    match v {
        Value::Bool(b) => Ok(*b as i64),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(i),
            (None, Some(f)) if f.is_finite() && f.abs() < 9.2e18 => Ok(f.trunc() as i64),
            _ => Err(bad()),
        },
        Value::String(_) => crate::studio::python_int(v).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

macro_rules! lenient_ints {
    ($($t:ty),*) => {$(
        impl Lenient for $t {
            fn from_value(v: &Value) -> Result<Self, String> {
                let i = lenient_int(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i}: out of range for this field (expected {} to {})", <$t>::MIN, <$t>::MAX))
            }
        }
    )*};
}
lenient_ints!(i64, u64, usize, u32, u8);

impl Lenient for f64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Bool(b) => Ok(*b as u8 as f64),
            Value::Number(n) => n.as_f64().ok_or_else(|| format!("value is not a valid float (got {v})")),
            Value::String(s) => crate::studio::python_strip(s).parse::<f64>().map_err(|_| format!("value is not a valid float (got {v})")),
            _ => Err(format!("value is not a valid float (got {v})")),
        }
    }
}

impl Lenient for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        let bad = || format!("value could not be parsed to a boolean (got {v})");
        match v {
            Value::Bool(b) => Ok(*b),
            Value::Number(n) => match n.as_f64() {
                Some(x) if x == 0.0 => Ok(false),
                Some(x) if x == 1.0 => Ok(true),
                _ => Err(bad()),
            },
            Value::String(s) => match s.to_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
                "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// An optional number or flag, read as [`Lenient`] (`null` is none).
fn lenient<'de, D: Deserializer<'de>, T: Lenient>(d: D) -> Result<Option<T>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::from_value(&v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A number or flag with a default, read as [`Lenient`] (`null` is the default).
fn lenient_or_default<'de, D: Deserializer<'de>, T: Lenient + Default>(d: D) -> Result<T, D::Error> {
    Ok(lenient(d)?.unwrap_or_default())
}

/// `/sdapi/v1/txt2img` and the shared part of `/sdapi/v1/img2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct GenerationRequest {
    #[serde(deserialize_with = "or_default")]
    pub prompt: String,
    #[serde(deserialize_with = "or_default")]
    pub negative_prompt: String,
    #[serde(deserialize_with = "or_default")]
    pub styles: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub seed: Option<i64>,
    /// The variation seed and its strength (A1111's "Variation seed").
    #[serde(deserialize_with = "lenient")]
    pub subseed: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub subseed_strength: Option<f64>,
    /// "Resize seed from width / height" (pixels; -1 or 0: off).
    #[serde(deserialize_with = "lenient")]
    pub seed_resize_from_w: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub seed_resize_from_h: Option<i64>,
    /// A1111's "Tiling" (seamless images): `true` / `false`, or our axes `"x"`, `"y"`, `"xy"`.
    pub tiling: Option<Value>,
    #[serde(deserialize_with = "or_default")]
    pub sampler_name: String,
    #[serde(deserialize_with = "or_default")]
    pub sampler_index: String,
    #[serde(deserialize_with = "or_default")]
    pub scheduler: String,
    #[serde(deserialize_with = "lenient")]
    pub batch_size: Option<usize>,
    #[serde(deserialize_with = "lenient")]
    pub n_iter: Option<usize>,
    #[serde(deserialize_with = "lenient")]
    pub steps: Option<usize>,
    #[serde(deserialize_with = "lenient")]
    pub cfg_scale: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub width: Option<usize>,
    #[serde(deserialize_with = "lenient")]
    pub height: Option<usize>,
    #[serde(deserialize_with = "lenient")]
    pub denoising_strength: Option<f64>,
    #[serde(deserialize_with = "lenient_or_default")]
    pub enable_hr: bool,
    #[serde(deserialize_with = "lenient")]
    pub hr_scale: Option<f64>,
    /// A1111's "Resize width to" / "height to" (0: by `hr_scale`; one of them: the other by the
    /// first pass's aspect ratio).
    #[serde(deserialize_with = "lenient_or_default")]
    pub hr_resize_x: usize,
    #[serde(deserialize_with = "lenient_or_default")]
    pub hr_resize_y: usize,
    #[serde(deserialize_with = "or_default")]
    pub hr_upscaler: String,
    #[serde(deserialize_with = "lenient_or_default")]
    pub hr_second_pass_steps: usize,
    #[serde(deserialize_with = "or_default")]
    pub override_settings: Map<String, Value>,
    #[serde(deserialize_with = "or_default")]
    pub alwayson_scripts: Map<String, Value>,
    #[serde(deserialize_with = "lenient")]
    pub send_images: Option<bool>,
    #[serde(deserialize_with = "lenient_or_default")]
    pub save_images: bool,
    // img2img
    #[serde(deserialize_with = "or_default")]
    pub init_images: Vec<String>,
    pub mask: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub mask_blur: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub inpainting_fill: Option<u8>,
    #[serde(deserialize_with = "lenient")]
    pub inpaint_full_res: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub inpaint_full_res_padding: Option<u32>,
    #[serde(deserialize_with = "lenient_or_default")]
    pub inpainting_mask_invert: u8,
    /// 0 just resize, 1 crop and resize, 2 resize and fill.
    #[serde(deserialize_with = "lenient")]
    pub resize_mode: Option<u64>,
    /// A1111's scripts: "SD upscale" in img2img is the one run here ([`script`]).
    pub script_name: Option<String>,
    #[serde(deserialize_with = "or_default")]
    pub script_args: Vec<Value>,
}

/// A request that cannot be a job: the field and what was expected (a 422, as FastAPI's).
#[derive(Debug, Clone)]
pub struct FieldError {
    pub loc: Vec<String>,
    pub msg: String,
}

impl FieldError {
    pub fn new(field: &str, msg: impl Into<String>) -> Self {
        Self { loc: vec!["body".into(), field.into()], msg: msg.into() }
    }
}

/// Our mixing settings in a request: `alwayson_scripts: {"LoRAMix": {"args": [{…}]}}` (an
/// object with `mix`, `klora_pattern`, `switch_every`, `windows`, `asymmetric_cfg`,
/// `klora_others`, `candidates`), or the shorthand `override_settings: {"loramix_mix": "auto"}`.
fn apply_mix_settings(req: &GenerationRequest, s: &mut Settings) -> Result<(), FieldError> {
    if let Some(v) = req.override_settings.get("loramix_mix") {
        s.mix = v.as_str().ok_or_else(|| FieldError { loc: vec!["body".into(), "override_settings".into(), "loramix_mix".into()], msg: "expected a strategy name".into() })?.to_string();
    }
    let script = req.alwayson_scripts.iter().find(|(k, _)| k.eq_ignore_ascii_case("loramix")).map(|(_, v)| v);
    if let Some(script) = script {
        let loc = |f: &str| vec!["body".to_string(), "alwayson_scripts".into(), "LoRAMix".into(), "args".into(), "0".into(), f.to_string()];
        let args = script.get("args").and_then(|a| a.get(0)).and_then(Value::as_object).ok_or_else(|| FieldError {
            loc: vec!["body".into(), "alwayson_scripts".into(), "LoRAMix".into(), "args".into()],
            msg: "expected [ {\"mix\": ..., ...} ]".into(),
        })?;
        for (k, v) in args {
            let bad = |want: &str| FieldError { loc: loc(k), msg: format!("expected {want}") };
            match k.as_str() {
                "mix" => s.mix = v.as_str().ok_or_else(|| bad("a strategy name"))?.to_string(),
                "klora_pattern" => s.klora_pattern = Some(v.as_str().ok_or_else(|| bad("s or s*"))?.to_string()),
                "switch_every" => s.switch_every = v.as_u64().ok_or_else(|| bad("a whole number"))? as usize,
                "windows" => s.windows = Some(v.as_str().ok_or_else(|| bad("role windows"))?.to_string()),
                "asymmetric_cfg" => s.asymmetric_cfg = v.as_bool().ok_or_else(|| bad("true or false"))?,
                "klora_others" => s.klora_others = Some(v.as_str().ok_or_else(|| bad("follow or merge"))?.to_string()),
                "candidates" => s.candidates = v.as_bool().ok_or_else(|| bad("true or false"))?,
                _ => return Err(FieldError { loc: loc(k), msg: "unknown LoRAMix setting (mix, klora_pattern, switch_every, windows, asymmetric_cfg, klora_others, candidates)".into() }),
            }
        }
    }
    crate::mix::build(&crate::mix::MixOptions { strategy: s.mix.clone(), ..Default::default() }).map_err(|e| FieldError::new("alwayson_scripts", e.to_string()))?;
    Ok(())
}

/// The job a request asks for. `model` is the current checkpoint (`options`); init images and
/// masks arrive as files the server wrote (`init_paths`).
/// `library` is where upscaler models named by `hr_upscaler` are looked up.
pub fn to_settings(req: &GenerationRequest, model: &str, library: Option<&std::path::Path>, init_paths: Option<(String, Option<String>)>) -> Result<Settings, FieldError> {
    let mut s = Settings { model: model.to_string(), prompt: req.prompt.clone(), negative_prompt: req.negative_prompt.clone(), styles: req.styles.clone(), ..Settings::default() };
    if let Some(m) = req.override_settings.get("sd_model_checkpoint").and_then(Value::as_str) {
        s.model = m.to_string();
    }
    if let Some(v) = req.override_settings.get("sd_vae").and_then(Value::as_str) {
        if !matches!(v, "Automatic" | "None" | "") {
            s.vae = v.to_string();
        }
    }
    if let Some(v) = req.override_settings.get("eta_noise_seed_delta") {
        s.eta_noise_seed_delta = v.as_i64().ok_or_else(|| FieldError {
            loc: vec!["body".into(), "override_settings".into(), "eta_noise_seed_delta".into()],
            msg: format!("{v}: expected a whole number"),
        })?;
    }
    if let Some(n) = req.override_settings.get("CLIP_stop_at_last_layers").and_then(Value::as_u64) {
        s.clip_skip = (n as usize).saturating_sub(1);
    }
    // Any seed the CLI or a PNG may hold (A1111 draws below 2³², but takes what it is given).
    let seed = |field: &str, v: Option<i64>| match v {
        None | Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        Some(n) => Err(FieldError::new(field, format!("{n}: expected -1 or a whole number from 0"))),
    };
    s.seed = seed("seed", req.seed)?;
    s.subseed = seed("subseed", req.subseed)?;
    s.subseed_strength = match req.subseed_strength.unwrap_or(0.0) {
        v if (0.0..=1.0).contains(&v) => v,
        v => return Err(FieldError::new("subseed_strength", format!("{v}: expected 0 to 1"))),
    };
    if s.subseed_strength == 0.0 {
        s.subseed = None;
    }
    let resize = |field: &str, v: Option<i64>| match v {
        None => Ok(0),
        Some(n) if n <= 0 => Ok(0),
        Some(n) if (8..=crate::sdxl::pipeline::MAX_SIDE as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(FieldError::new(field, format!("{n}: expected -1, 0 or a size from 8 to {} pixels", crate::sdxl::pipeline::MAX_SIDE))),
    };
    s.seed_resize_from_w = resize("seed_resize_from_w", req.seed_resize_from_w)?;
    s.seed_resize_from_h = resize("seed_resize_from_h", req.seed_resize_from_h)?;
    // The request's own field wins over the `tiling` option, as A1111's `p.tiling` over `opts.tiling`.
    let tiling = match (&req.tiling, req.override_settings.get("tiling")) {
        (Some(v), _) if !v.is_null() => Some(("tiling", v)),
        (_, Some(v)) => Some(("override_settings", v)),
        _ => None,
    };
    if let Some((field, v)) = tiling {
        let t = match v {
            Value::Bool(b) => Some(crate::Seamless { x: *b, y: *b }),
            Value::String(n) => crate::studio::parse_tiling(n),
            _ => None,
        }
        .ok_or_else(|| FieldError::new(field, format!("tiling {v}: expected true, false, \"x\", \"y\" or \"xy\"")))?;
        s.tiling = crate::studio::tiling_name(t).to_string();
    }
    let sampler = if req.sampler_name.is_empty() { req.sampler_index.as_str() } else { req.sampler_name.as_str() };
    if !sampler.is_empty() {
        let k: SamplerKind = sampler.parse().map_err(|e: crate::Error| FieldError::new("sampler_name", e.to_string()))?;
        s.sampler = k.name().to_string();
    }
    if !req.scheduler.is_empty() {
        let k: Schedule = req.scheduler.parse().map_err(|e: crate::Error| FieldError::new("scheduler", e.to_string()))?;
        s.schedule = if k == Schedule::Default { String::new() } else { k.name().to_string() };
        if !s.sampler.is_empty() {
            let sampler: SamplerKind = s.sampler.parse().map_err(|e: crate::Error| FieldError::new("sampler_name", e.to_string()))?;
            crate::sdxl::schedulers::resolve(sampler, k).map_err(|e| FieldError::new("scheduler", e.to_string()))?;
        }
    }
    s.batch_size = req.batch_size.unwrap_or(1);
    s.batch_count = req.n_iter.unwrap_or(1);
    // A1111's `all_seeds`: image k of every batch has the seed seed + k.
    s.batch_seeds = crate::rng::BatchSeeds::PerImage;
    if s.batch_size == 0 || s.batch_size > 64 {
        return Err(FieldError::new("batch_size", format!("{}: expected 1 to 64", s.batch_size)));
    }
    if s.batch_count == 0 || s.batch_count > 1000 {
        return Err(FieldError::new("n_iter", format!("{}: expected 1 to 1000", s.batch_count)));
    }
    s.steps = req.steps.unwrap_or(20);
    if s.steps == 0 || s.steps > 1000 {
        return Err(FieldError::new("steps", format!("{}: expected 1 to 1000", s.steps)));
    }
    s.cfg = req.cfg_scale.unwrap_or(7.0);
    if !s.cfg.is_finite() {
        return Err(FieldError::new("cfg_scale", "expected a number"));
    }
    for (f, v) in [("width", req.width), ("height", req.height)] {
        let v = v.unwrap_or(512);
        if v == 0 || v % 8 != 0 || v > crate::sdxl::pipeline::MAX_SIDE {
            return Err(FieldError::new(f, format!("{v}: expected a multiple of 8 up to {}", crate::sdxl::pipeline::MAX_SIDE)));
        }
    }
    s.width = req.width.unwrap_or(512);
    s.height = req.height.unwrap_or(512);
    if req.enable_hr && init_paths.is_none() {
        let upscaler = if req.hr_upscaler.is_empty() { "Latent".to_string() } else { crate::sdxl::upscale::Upscaler::canonical(&req.hr_upscaler) };
        // Built-in names, or an ESRGAN-family model by its name in the library's folders.
        check_upscaler_name("hr_upscaler", &upscaler)?;
        crate::studio::upscaler_model_by_name(&upscaler, library, false, "hires upscaler").map_err(|e| FieldError::new("hr_upscaler", e.to_string()))?;
        let scale = match (req.hr_resize_x, req.hr_resize_y) {
            (0, 0) => req.hr_scale.unwrap_or(2.0),
            (x, y) => {
                // A size the first pass's aspect ratio reaches.
                let (sx, sy) = (crate::studio::factor_reaching(x, s.width), crate::studio::factor_reaching(y, s.height));
                match (x, y) {
                    (_, 0) => sx,
                    (0, _) => sy,
                    _ if (x * s.height).abs_diff(y * s.width) <= s.width.max(s.height) => sx,
                    _ => {
                        return Err(FieldError::new(
                            "hr_resize_y",
                            format!("{x}x{y}: expected the first pass's aspect ratio ({}x{}); give one side, or hr_scale (cropping to another ratio is not supported)", s.width, s.height),
                        ))
                    }
                }
            }
        };
        if !(1.0..=8.0).contains(&scale) {
            return Err(FieldError::new(if req.hr_resize_x + req.hr_resize_y > 0 { "hr_resize_x" } else { "hr_scale" }, format!("upscale {scale:.3}: expected 1 to 8 times the first pass")));
        }
        s.hires = Some(HiresSettings { scale, upscaler, steps: req.hr_second_pass_steps, denoise: req.denoising_strength.unwrap_or(0.7) });
    }
    if let Some((image, mask)) = init_paths {
        let strength = req.denoising_strength.unwrap_or(0.75);
        if !(0.0..=1.0).contains(&strength) {
            return Err(FieldError::new("denoising_strength", format!("{strength}: expected a number in [0, 1]")));
        }
        // A1111 runs at least one step whatever the strength (its t_enc + 1 steps). The engine
        // keeps diffusers' ⌊steps × strength⌋, which is none for a small strength: the smallest
        // strength that runs the schedule's last step stands in.
        let strength = if ((s.steps as f64 * strength) as usize) == 0 { crate::studio::factor_reaching(1, s.steps) } else { strength };
        // A1111's API defaults (its processing class's, not its UI's): fill, only masked, no padding.
        let masked_content = match req.inpainting_fill.unwrap_or(0) {
            0 => MaskedContent::Fill,
            1 => MaskedContent::Original,
            2 => MaskedContent::LatentNoise,
            3 => MaskedContent::LatentNothing,
            n => return Err(FieldError::new("inpainting_fill", format!("{n}: expected 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)"))),
        };
        s.init = Some(InitSettings {
            image,
            strength,
            mask,
            mask_blur: req.mask_blur.unwrap_or(4.0),
            masked_content,
            inpaint_area: if req.inpaint_full_res.unwrap_or(true) { InpaintArea::OnlyMasked } else { InpaintArea::WholePicture },
            padding: req.inpaint_full_res_padding.unwrap_or(0),
            outpaint: None,
            resize_mode: {
                let n = req.resize_mode.unwrap_or(0);
                crate::sdxl::img2img::ResizeMode::from_a1111_index(n).ok_or_else(|| {
                    FieldError::new("resize_mode", format!("{n}: expected 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 (just resize, latent upscale)"))
                })?
            },
        });
    }
    apply_mix_settings(req, &mut s)?;
    s.sd_upscale = script(req, library, s.init.is_some())?;
    if s.sd_upscale.is_some() {
        crate::studio::check_sd_upscale(&s, library).map_err(|e| FieldError::new("script_args", e.to_string()))?;
    }
    Ok(s)
}

/// An upscaler as a client names one: by the name `/sdapi/v1/upscalers` lists (A1111's
/// `sd_upscalers`), never by a file path, which would let a client load or probe any file of
/// the server.
pub fn check_upscaler_name(field: &str, name: &str) -> Result<(), FieldError> {
    let p = std::path::Path::new(name);
    let model_ext = p.extension().is_some_and(|e| ["safetensors", "pth", "pt", "ckpt", "bin"].contains(&e.to_string_lossy().to_ascii_lowercase().as_str()));
    if name.contains(['/', '\\']) || model_ext {
        return Err(FieldError::new(field, format!("{name:?}: expected an upscaler's name as /sdapi/v1/upscalers lists it, not a file")));
    }
    Ok(())
}

/// `/sdapi/v1/upscalers`' names in order, which the "SD upscale" script's upscaler index counts
/// in: A1111's built-in pixel upscalers, then the library's ESRGAN-family models.
pub fn upscaler_names(library: Option<&std::path::Path>) -> Vec<String> {
    let mut names: Vec<String> = ["None", "Lanczos", "Nearest"].map(String::from).to_vec();
    let root = library.map(std::path::Path::to_path_buf).or_else(|| crate::lora::library::LoraLibrary::default_root().ok());
    if let Some(root) = root {
        names.extend(crate::studio::upscaler_models(&root));
    }
    names
}

/// A1111's `script_name` and `script_args`. The one script run here is img2img's "SD upscale"
/// (`scripts/sd_upscale.py`, arguments `[info, overlap, upscaler_index, scale_factor]`, the
/// index counting in [`upscaler_names`]; a name is taken too). Any other script is refused, as
/// A1111 refuses one it does not have.
fn script(req: &GenerationRequest, library: Option<&std::path::Path>, img2img: bool) -> Result<Option<SdUpscaleSettings>, FieldError> {
    let name = req.script_name.as_deref().map(str::trim).unwrap_or("");
    if name.is_empty() || name.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if !name.eq_ignore_ascii_case("sd upscale") || !img2img {
        let runs = if img2img { "\"SD upscale\"" } else { "no script in txt2img (\"SD upscale\" is img2img's)" };
        return Err(FieldError::new("script_name", format!("Script '{name}' not found: the API runs {runs}")));
    }
    let arg = |i: usize| req.script_args.get(i).filter(|v| !v.is_null());
    let bad = |what: &str, v: &Value, want: &str| FieldError::new("script_args", format!("SD upscale {what} {v}: expected {want}"));
    let defaults = SdUpscaleSettings::default();
    let overlap = match arg(1) {
        None => defaults.overlap,
        Some(v) => v.as_u64().ok_or_else(|| bad("tile overlap", v, "whole pixels"))? as usize,
    };
    let upscaler = match arg(2) {
        None => defaults.upscaler,
        Some(Value::String(n)) => {
            check_upscaler_name("script_args", n)?;
            crate::studio::upscaler_model_by_name(n, library, true, "SD upscale upscaler").map_err(|e| FieldError::new("script_args", e.to_string()))?;
            crate::sdxl::upscale::Upscaler::canonical(n)
        }
        Some(v) => {
            let names = upscaler_names(library);
            v.as_u64().and_then(|i| names.get(i as usize).cloned()).ok_or_else(|| bad("upscaler", v, &format!("an index into {names:?} or a name")))?
        }
    };
    let scale = match arg(3) {
        None => defaults.scale,
        Some(v) => v.as_f64().ok_or_else(|| bad("scale factor", v, "a number"))?,
    };
    Ok(Some(SdUpscaleSettings { scale, overlap, upscaler }))
}

/// One `alwayson_scripts.controlnet.args` entry as sd-webui-controlnet's API takes it: the unit
/// (its model as named, not yet a file) and its base64 image (`None`: img2img's init image).
#[derive(Debug, Clone)]
pub struct ApiControlUnit {
    /// Its place in `args` (disabled units count), for error locations.
    pub index: usize,
    pub setting: crate::studio::ControlNetSetting,
    pub image: Option<String>,
}

/// The enabled ControlNet units of a request.
pub fn controlnet_units(req: &GenerationRequest) -> Result<Vec<ApiControlUnit>, FieldError> {
    let Some((key, script)) = req.alwayson_scripts.iter().find(|(k, _)| k.eq_ignore_ascii_case("controlnet")) else {
        return Ok(vec![]);
    };
    let at = |i: Option<usize>, field: &str| {
        let mut loc = vec!["body".to_string(), "alwayson_scripts".into(), key.clone(), "args".into()];
        if let Some(i) = i {
            loc.push(i.to_string());
        }
        if !field.is_empty() {
            loc.push(field.into());
        }
        loc
    };
    let args = match script.get("args") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(FieldError { loc: at(None, ""), msg: "expected a list of ControlNet units".into() }),
    };
    let mut out = vec![];
    for (i, u) in args.iter().enumerate() {
        let err = |field: &str, msg: String| FieldError { loc: at(Some(i), field), msg };
        let Some(o) = u.as_object() else {
            return Err(err("", "expected a ControlNet unit (an object)".into()));
        };
        if o.get("enabled").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let num = |field: &str| -> Result<Option<f64>, FieldError> {
            match o.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| err(field, format!("{v}: expected a number"))),
            }
        };
        let text = |field: &str| o.get(field).and_then(Value::as_str).map(str::to_string);
        let model = text("model").filter(|m| !m.is_empty() && m != "None").ok_or_else(|| err("model", "expected a ControlNet model name (see /controlnet/model_list)".into()))?;
        let module = text("module").or_else(|| text("preprocessor")).unwrap_or_else(|| "none".into());
        // Negative thresholds are the extension's "the module's default".
        let threshold = |field: &str| num(field).map(|v| v.filter(|&x| x >= 0.0));
        let (threshold_a, threshold_b) = (threshold("threshold_a")?, threshold("threshold_b")?);
        crate::sdxl::preprocessor::Preprocessor::parse(&module, threshold_a, threshold_b).map_err(|e| err("module", e.to_string()))?;
        let resize_mode = match o.get("resize_mode") {
            None | Some(Value::Null) => crate::sdxl::img2img::ResizeMode::CropAndResize,
            // The extension's `resize_mode_from_value`: 3 (img2img's latent upscale) and larger
            // numbers are Just Resize.
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| crate::sdxl::img2img::ResizeMode::parse_control(&n.to_string()))
                .and_then(|r| r.ok())
                .ok_or_else(|| err("resize_mode", format!("{n}: expected 0, 1 or 2")))?,
            // The extension's names and its older aliases, which `ResizeMode` reads everywhere.
            Some(Value::String(m)) => m
                .parse()
                .ok()
                .filter(|m: &crate::sdxl::img2img::ResizeMode| m.fits_pixels())
                .ok_or_else(|| err("resize_mode", format!("{m:?}: expected Just Resize, Crop and Resize or Resize and Fill")))?,
            Some(v) => return Err(err("resize_mode", format!("{v}: expected a resize mode"))),
        };
        let control_mode = match o.get("control_mode") {
            None | Some(Value::Null) => Default::default(),
            Some(v @ (Value::Number(_) | Value::String(_))) => {
                let t = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                t.parse::<crate::sdxl::controlnet::ControlMode>().map_err(|_| err("control_mode", format!("{v}: expected Balanced, My prompt is more important or ControlNet is more important (0, 1, 2)")))?
            }
            Some(v) => return Err(err("control_mode", format!("{v}: expected a control mode"))),
        };

        let image = match o.get("image").or_else(|| o.get("input_image")) {
            None | Some(Value::Null) => None,
            Some(Value::String(b)) if b.is_empty() => None,
            Some(Value::String(b)) => Some(b.clone()),
            Some(Value::Object(m)) => m.get("image").and_then(Value::as_str).map(str::to_string),
            Some(v) => return Err(err("image", format!("{}: expected a base64 image", v.to_string().chars().take(40).collect::<String>()))),
        };
        // A bool, or the strings pydantic reads as one.
        let guess_mode = match o.get("guessmode").or_else(|| o.get("guess_mode")) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => n.as_u64() == Some(1),
            Some(Value::String(t)) if ["true", "yes", "on", "1", "y", "t"].contains(&t.to_ascii_lowercase().as_str()) => true,
            Some(Value::String(t)) if ["false", "no", "off", "0", "n", "f"].contains(&t.to_ascii_lowercase().as_str()) => false,
            Some(v) => return Err(err("guessmode", format!("{v}: expected true or false"))),
        };
        let setting = crate::studio::ControlNetSetting {
            model,
            image: String::new(),
            module,
            weight: num("weight")?.unwrap_or(1.0),
            guidance_start: num("guidance_start")?.unwrap_or(0.0),
            guidance_end: num("guidance_end")?.unwrap_or(1.0),
            resize_mode,
            threshold_a,
            threshold_b,
            guess_mode,
            control_mode,
        };
        if setting.guess_mode && !setting.control_mode.is_balanced() {
            return Err(err("control_mode", "guessmode and a control mode other than Balanced are two ways to favour the control: choose one".into()));
        }
        for (field, v) in [("guidance_start", setting.guidance_start), ("guidance_end", setting.guidance_end)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(err(field, format!("{v}: expected 0 to 1")));
            }
        }
        if setting.guidance_start > setting.guidance_end {
            return Err(err("guidance_end", format!("{}: expected at least guidance_start ({})", setting.guidance_end, setting.guidance_start)));
        }
        out.push(ApiControlUnit { index: i, setting, image });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webuiapi_defaults_and_nulls_read() {
        let body = serde_json::json!({
            "prompt": "a vlox <lora:vlox:0.8>", "seed": -1, "sampler_name": "Euler a", "scheduler": "automatic",
            "hr_checkpoint_name": null, "script_name": null, "styles": [], "override_settings": {}, "alwayson_scripts": {},
            "steps": 12, "width": 64, "height": 64, "batch_size": 2, "n_iter": 3, "eta": 1.0, "mask": null,
        });
        let req: GenerationRequest = serde_json::from_value(body).unwrap();
        let s = to_settings(&req, "models/miniworld", None, None).unwrap();
        assert_eq!((s.steps, s.width, s.batch_size, s.batch_count, s.seed), (12, 64, 2, 3, None));
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("euler_a", ""));
        assert_eq!((s.subseed, s.subseed_strength), (None, 0.0));
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "subseed": 9, "subseed_strength": 0.4})).unwrap();
        let s = to_settings(&req, "m", None, None).unwrap();
        assert_eq!((s.subseed, s.subseed_strength), (Some(9), 0.4));
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "subseed": 9, "subseed_strength": 1.5})).unwrap();
        assert_eq!(to_settings(&req, "m", None, None).unwrap_err().loc, ["body", "subseed_strength"]);
    }

    /// sd-webui-controlnet's unit fields: disabled units skipped but counted, guess mode as a
    /// bool or pydantic's strings, the extension's resize-mode aliases.
    #[test]
    fn controlnet_unit_fields() {
        let req = |units: serde_json::Value| -> GenerationRequest {
            serde_json::from_value(serde_json::json!({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": units}}})).unwrap()
        };
        let u = controlnet_units(&req(serde_json::json!([
            {"enabled": false, "model": "absent"},
            {"model": "cn", "guessmode": "yes", "resize_mode": "Envelope (Outer Fit)", "threshold_a": -1},
        ])))
        .unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].index, 1);
        assert!(u[0].setting.guess_mode);
        assert_eq!(u[0].setting.resize_mode, crate::sdxl::img2img::ResizeMode::ResizeAndFill);
        assert_eq!(u[0].setting.threshold_a, None);
        let e = controlnet_units(&req(serde_json::json!([{"model": "cn", "guessmode": "maybe"}]))).unwrap_err();
        assert_eq!(e.loc, ["body", "alwayson_scripts", "controlnet", "args", "0", "guessmode"]);
        let e = controlnet_units(&req(serde_json::json!([{"model": "cn", "guidance_start": 0.6, "guidance_end": 0.5}]))).unwrap_err();
        assert_eq!(e.loc.last().unwrap(), "guidance_end");
        // img2img's latent upscale is not a way to fit a control map: by name it is refused, as
        // 3 the extension reads it as Just Resize.
        let e = controlnet_units(&req(serde_json::json!([{"model": "cn", "resize_mode": "Just resize (latent upscale)"}]))).unwrap_err();
        assert_eq!(e.loc.last().unwrap(), "resize_mode");
        let u = controlnet_units(&req(serde_json::json!([{"model": "cn", "resize_mode": 3}]))).unwrap();
        assert_eq!(u[0].setting.resize_mode, crate::sdxl::img2img::ResizeMode::JustResize);
    }

    /// img2img's `resize_mode` takes A1111's four numbers.
    #[test]
    fn img2img_resize_modes() {
        let init = Some(("init.png".to_string(), None));
        for (n, mode) in [(0, "just_resize"), (2, "resize_and_fill"), (3, "just_resize_latent_upscale")] {
            let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "init_images": ["x"], "resize_mode": n})).unwrap();
            let s = to_settings(&req, "m", None, init.clone()).unwrap();
            assert_eq!(s.init.unwrap().resize_mode.name(), mode);
        }
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "init_images": ["x"], "resize_mode": 4})).unwrap();
        assert_eq!(to_settings(&req, "m", None, init).unwrap_err().loc, ["body", "resize_mode"]);
    }

    #[test]
    fn mix_settings_and_field_errors() {
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({
            "prompt": "x", "alwayson_scripts": {"LoRAMix": {"args": [{"mix": "auto", "asymmetric_cfg": true}]}}
        }))
        .unwrap();
        let s = to_settings(&req, "m", None, None).unwrap();
        assert_eq!((s.mix.as_str(), s.asymmetric_cfg), ("auto", true));
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "override_settings": {"loramix_mix": "blend"}})).unwrap();
        assert!(to_settings(&req, "m", None, None).is_err());
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "width": 65})).unwrap();
        let e = to_settings(&req, "m", None, None).unwrap_err();
        assert_eq!(e.loc, ["body", "width"]);
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "sampler_name": "Nope"})).unwrap();
        assert_eq!(to_settings(&req, "m", None, None).unwrap_err().loc, ["body", "sampler_name"]);
        let req: GenerationRequest = serde_json::from_value(serde_json::json!({"prompt": "x", "sampler_name": "DDIM", "scheduler": "Karras"})).unwrap();
        assert_eq!(to_settings(&req, "m", None, None).unwrap_err().loc, ["body", "scheduler"]);
    }

    /// A1111's "Resize width to / height to", and img2img's at-least-one-step.
    #[test]
    fn hires_resize_and_small_strengths() {
        let read = |v: serde_json::Value| to_settings(&serde_json::from_value(v).unwrap(), "m", None, None);
        for (x, y, want) in [(128, 0, (128, 96)), (0, 144, (192, 144)), (100, 75, (96, 72))] {
            let s = read(serde_json::json!({"prompt": "x", "width": 64, "height": 48, "enable_hr": true, "hr_resize_x": x, "hr_resize_y": y})).unwrap();
            let hr = s.hires.unwrap();
            assert_eq!(crate::studio::hires_size(&hr, (64, 48), 8).unwrap(), want, "{x}x{y}");
        }
        let e = read(serde_json::json!({"prompt": "x", "width": 64, "height": 64, "enable_hr": true, "hr_resize_x": 128, "hr_resize_y": 96})).unwrap_err();
        assert_eq!(e.loc, ["body", "hr_resize_y"]);
        for (steps, strength) in [(4, 0.05), (3, 0.0), (7, 0.1), (1, 0.5)] {
            let s = to_settings(&serde_json::from_value(serde_json::json!({"prompt": "x", "steps": steps, "denoising_strength": strength})).unwrap(), "m", None, Some(("i.png".into(), None))).unwrap();
            let run = (steps as f64 * s.init.unwrap().strength) as usize;
            assert_eq!(run, 1, "{steps} steps at strength {strength}");
        }
    }
}
