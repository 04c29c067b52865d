//! A job's ControlNet units (ControlNets and T2I-Adapters): models loaded once and kept, control
//! images read and preprocessed, and the names A1111's infotext gives them.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use super::settings::ControlNetSetting;
use crate::error::{Error, Result};
use crate::sdxl::controlnet::{self, ControlModel, ControlUnit};
use crate::sdxl::preprocessor::Preprocessor;
use crate::SdxlPipeline;

/// Control models loaded for the last job, by what was asked for and the model they serve: the
/// next job with the same units reuses them, and one with others lets them go (a ControlNet is
/// the size of half a UNet).
#[derive(Default)]
pub struct ControlNets {
    loaded: Mutex<Vec<(String, ControlModel)>>,
}

impl ControlNets {
    fn key(spec: &str, pipe: &SdxlPipeline) -> String {
        format!("{spec}\u{0}{:?}\u{0}{:?}\u{0}{:?}", pipe.unet_config().block_out_channels, pipe.dtype, pipe.device.location())
    }

    fn get(&self, spec: &str, pipe: &SdxlPipeline) -> Result<ControlModel> {
        let key = Self::key(spec, pipe);
        if let Some((_, m)) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let m = controlnet::load(spec, pipe.unet_config(), &pipe.device, pipe.dtype)?;
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).push((key, m.clone()));
        Ok(m)
    }

    /// Lets go of every model but those `keys` name.
    fn keep_only(&self, keys: &[String]) {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, _)| keys.contains(k));
    }
}

/// The units of `settings` for `pipe`: every error names the unit and the file.
pub fn control_units(settings: &[ControlNetSetting], pipe: &SdxlPipeline, cache: &ControlNets) -> Result<Vec<ControlUnit>> {
    cache.keep_only(&settings.iter().map(|s| ControlNets::key(&s.model, pipe)).collect::<Vec<_>>());
    settings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let named = |e: Error| in_unit(i, e);
            if s.model.is_empty() {
                return Err(named(Error::Argument("no model: give a ControlNet or T2I-Adapter folder, file or hub repo".into())));
            }
            if s.image.is_empty() {
                return Err(named(Error::Argument("no control image".into())));
            }
            let pre = Preprocessor::parse(&s.module, s.threshold_a, s.threshold_b).map_err(named)?;
            // Transparency flattened onto white, as the extension's HWC3 and our init images.
            let img = crate::sdxl::img2img::load_image(Path::new(&s.image)).map_err(named)?;
            let unit = ControlUnit {
                model: cache.get(&s.model, pipe).map_err(named)?,
                image: pre.apply(&img),
                weight: s.weight,
                start: s.guidance_start,
                end: s.guidance_end,
                resize_mode: s.resize_mode,
                guess_mode: s.guess_mode,
                control_mode: s.control_mode,
                // The extension forces its soft weights in the hires pass for canny maps.
                soft_injection: false,
                // (Not under diffusers' guess mode, which has its own scales.)
                soft_in_hires: matches!(pre, Preprocessor::Canny { .. }) && !s.guess_mode,
            };
            unit.validate().map_err(named)?;
            Ok(unit)
        })
        .collect()
}

/// Checks that every pass's size (`(w, h)`, and the hires pass's) suits the units' adapters,
/// before the first pass runs, saying where the size came from.
pub fn check_pass_sizes(control: &[ControlUnit], (w, h): (usize, usize), from_init: bool, hires: Option<&super::HiresSettings>, vae_factor: usize) -> Result<()> {
    let mut sizes = vec![((w, h), if from_init { " (the size made from the init image, its outpainting and any width/height given)" } else { "" })];
    if let Some(hr) = hires {
        sizes.push((super::hires_size(hr, (w, h), vae_factor)?, " in the hires pass"));
    }
    for (size, from) in sizes {
        for (k, u) in control.iter().enumerate() {
            u.check_size(size, vae_factor).map_err(|e| Error::Argument(format!("controlnet unit {k}{from}: {e}")))?;
        }
    }
    Ok(())
}

/// `e` with the unit named, keeping its kind (a user's mistake, a bad file, the hub, the device).
fn in_unit(i: usize, e: Error) -> Error {
    let unit = format!("controlnet unit {i}");
    match e {
        Error::Argument(m) => Error::Argument(format!("{unit}: {m}")),
        Error::Model { path, message } => Error::Model { path, message: format!("{message} ({unit})") },
        Error::BadFile { path, message } => Error::BadFile { path, message: format!("{message} ({unit})") },
        Error::Hub(m) => Error::Hub(format!("{unit}: {m}")),
        other => other,
    }
}

/// How sd-webui-controlnet names a model in infotext: the file's stem (a folder's name) and
/// A1111's legacy model hash (sha256 of the 64 KiB at 1 MiB, 8 hex digits) of its weights.
pub fn a1111_model_name(spec: &str) -> String {
    let p = Path::new(spec);
    // A file loses its extension; a folder or a repo id keeps its whole last part
    // (`controlnet-canny-sdxl-1.0`).
    let last = if p.is_file() { p.file_stem() } else { p.file_name() };
    let name = last.and_then(|n| n.to_str()).unwrap_or(spec).to_string();
    let weights = if p.is_dir() { crate::sdxl::model::component_weights(p).ok().and_then(|w| w.into_iter().next()) } else { Some(p.to_path_buf()) };
    match weights.and_then(|w| legacy_hash(&w)) {
        Some(h) => format!("{name} [{h}]"),
        None => name,
    }
}

fn legacy_hash(path: &Path) -> Option<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(0x100000)).ok()?;
    let mut buf = Vec::with_capacity(0x10000);
    f.take(0x10000).read_to_end(&mut buf).ok()?;
    let h = sha2::Sha256::digest(&buf);
    Some(crate::lora::network::hex(&h)[..8].to_string())
}
