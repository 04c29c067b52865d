//! `loramix extras`: A1111's Extras tab (its upscale) on pictures or folders of pictures, as
//! "Single Image" and "Batch from Directory" run it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loramix::device::parse_device;
use loramix::studio::{self, ExtrasResize, ExtrasSettings};

#[derive(clap::Args)]
pub struct ExtrasArgs {
    /// Pictures, or folders whose PNG, JPEG, WebP and BMP pictures are all taken (A1111's
    /// "Batch from Directory"; not recursive; one that cannot be read is skipped, as there).
    #[arg(required = true, value_name = "IMAGE|FOLDER")]
    inputs: Vec<PathBuf>,
    /// "Scale by": the factor, 1 to 8 (the default, 2, unless --scale-to is given).
    #[arg(long, value_name = "FACTOR", conflicts_with = "scale_to")]
    scale_by: Option<f64>,
    /// "Max side length" of --scale-by: a longer result is shrunk to fit (0: no limit).
    #[arg(long, default_value_t = 0, value_name = "PIXELS", conflicts_with = "scale_to")]
    max_side_length: u32,
    /// "Scale to" WxH: enlarged by the larger of the two ratios, then cropped to the size
    /// around the centre.
    #[arg(long, value_name = "WxH")]
    scale_to: Option<String>,
    /// With --scale-to: keep the whole enlarged picture ("Crop to fit" off).
    #[arg(long, requires = "scale_to")]
    no_crop: bool,
    /// "Upscaler 1": None, Lanczos, Nearest, or an ESRGAN-family .safetensors model (a path or
    /// a name in the library's models/ESRGAN).
    #[arg(long = "upscaler-1", default_value = "Lanczos", value_name = "NAME")]
    upscaler_1: String,
    /// "Upscaler 2", blended in by --upscaler-2-visibility.
    #[arg(long = "upscaler-2", default_value = "None", value_name = "NAME")]
    upscaler_2: String,
    /// "Upscaler 2 visibility", 0 to 1.
    #[arg(long = "upscaler-2-visibility", default_value_t = 0.0, value_name = "F")]
    upscaler_2_visibility: f64,
    /// Output folder. Each picture keeps its name (as a .png); a name taken gets -1, -2, ….
    #[arg(long, default_value = "out/extras")]
    out: PathBuf,
    /// Library for upscaler model names (default: $LORAMIX_HOME or the data dir).
    #[arg(long)]
    library: Option<PathBuf>,
    /// cpu | cuda | cuda:N | metal (for model upscalers).
    #[arg(long, default_value = "cpu")]
    device: String,
}

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// The pictures `inputs` name, folders listed in name order (hidden files left out).
fn pictures(inputs: &[PathBuf]) -> Result<Vec<studio::ExtrasSource>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list the folder", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && !f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .filter(|f| f.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())))
                .collect();
            if found.is_empty() {
                anyhow::bail!("{}: no pictures in the folder (expected {})", p.display(), EXTENSIONS.join(", "));
            }
            found.sort();
            out.extend(found.into_iter().map(|path| studio::ExtrasSource { path, listed: false }));
        } else if p.is_file() {
            out.push(studio::ExtrasSource { path: p.clone(), listed: true });
        } else {
            anyhow::bail!("{}: no such picture or folder", p.display());
        }
    }
    Ok(out)
}

pub fn run(a: ExtrasArgs) -> Result<()> {
    let resize = match &a.scale_to {
        Some(s) => {
            let (w, h) = s.split_once(['x', 'X']).and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?))).with_context(|| format!("--scale-to {s:?}: expected WxH in pixels, e.g. 1024x1024"))?;
            ExtrasResize::ScaleTo { width: w, height: h, crop: !a.no_crop }
        }
        None => ExtrasResize::ScaleBy { factor: a.scale_by.unwrap_or(2.0), max_side_length: a.max_side_length },
    };
    // The tab's slider hands A1111 a whole factor as an int: `by: 2`.
    let settings = ExtrasSettings { resize, upscaler_1: a.upscaler_1.clone(), upscaler_2: a.upscaler_2.clone(), upscaler_2_visibility: a.upscaler_2_visibility, factor_as_int: true };
    // Every check that needs no picture runs before any is read or written.
    settings.check(a.library.as_deref())?;
    let device = parse_device(&a.device)?;
    let files = pictures(&a.inputs)?;
    let mut skipped = 0;
    let written = studio::extras_to_folder(&files, &settings, a.library.as_deref(), &device, &a.out, &mut |e| match e {
        studio::ExtrasEvent::Written { from, to, size: (w, h), done } => {
            let text = done.infotext();
            let (ow, oh) = done.image.dimensions();
            println!("{}", to.display());
            eprintln!("{} ({w}x{h}) -> {} ({ow}x{oh}): {}", from.display(), to.display(), if text.is_empty() { "unchanged (upscaler 1 is None)" } else { &text });
        }
        studio::ExtrasEvent::Skipped { path, reason } => {
            skipped += 1;
            eprintln!("skipped {}: {reason}", path.display());
        }
    })?;
    if skipped > 0 {
        eprintln!("{} of {} pictures written, {skipped} skipped", written.len(), files.len());
    }
    Ok(())
}
