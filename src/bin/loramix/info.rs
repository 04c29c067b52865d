//! `loramix info`: A1111's PNG Info tab on the command line. A picture's generation parameters
//! (a PNG's text, a JPEG's or WebP's EXIF comment, a NovelAI PNG's comment) and its other text.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use loramix::studio;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Pictures: PNG, JPEG or WebP (ours, A1111's, Forge's, Civitai's, NovelAI's).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// One JSON object per picture and line, as the API's /sdapi/v1/png-info answers (`info`,
    /// `items`, `parameters`), with the picture's `file`.
    #[arg(long)]
    json: bool,
    /// The LoRA library whose `styles.csv` and LoRAs the parsed `parameters` consult, as A1111
    /// consults its own (default: the usual library).
    #[arg(long, value_name = "DIR")]
    library: Option<PathBuf>,
}

/// Each picture in turn; one that cannot be read is reported and the rest still shown (the
/// exit status is then 1).
pub fn run(a: InfoArgs) -> Result<()> {
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    for (i, path) in a.images.iter().enumerate() {
        let found = std::fs::read(path).map_err(|e| loramix::Error::io(path, e).to_string()).and_then(|b| studio::read_image_info(&b).map_err(|e| format!("{}: {e}", path.display())));
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                eprintln!("Error: {e}");
                failed += 1;
                continue;
            }
        };
        let written = if a.json {
            #[derive(serde::Serialize)]
            struct Line<'a> {
                #[serde(flatten)]
                info: &'a studio::PngInfo,
                file: String,
            }
            let library = match &a.library {
                Some(l) => Some(l.clone()),
                None => loramix::lora::library::LoraLibrary::default_root().ok(),
            };
            let infotext = found.parameters.as_deref().unwrap_or_default();
            let ctx = studio::PasteContext::load(library.as_deref(), None, infotext);
            for w in &ctx.warnings {
                eprintln!("warning: {w}");
            }
            let parsed = found.png_info(&ctx);
            let info = match parsed {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("Error: {}: {e}", path.display());
                    failed += 1;
                    continue;
                }
            };
            writeln!(out, "{}", serde_json::to_string(&Line { info: &info, file: path.display().to_string() })?)
        } else {
            // As the tab shows it: `parameters`, then each other item, each under its name.
            let mut text = String::new();
            if a.images.len() > 1 {
                text.push_str(&format!("{}{}\n", if i > 0 { "\n" } else { "" }, path.display()));
            }
            let blocks: Vec<(&str, &str)> = found.parameters.as_deref().map(|p| ("parameters", p)).into_iter().chain(found.items.iter().map(|(k, v)| (k.as_str(), v.as_str()))).collect();
            if blocks.is_empty() {
                text.push_str("Nothing found in the image.\n");
            }
            for (k, v) in blocks {
                text.push_str(&format!("[{k}]\n{v}\n"));
            }
            write!(out, "{text}")
        };
        if written.is_err() {
            break; // stdout closed (`| head`)
        }
    }
    if failed > 0 {
        bail!("{failed} of {} pictures could not be read", a.images.len());
    }
    Ok(())
}
