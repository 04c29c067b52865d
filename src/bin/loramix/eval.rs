//! `loramix eval`: miniworld scores for images, the prompt read from each PNG's parameters.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Pictures, PNG, JPEG or WebP (their prompt is read from their parameters unless --prompt is given).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value = "models/miniworld/evaluator", value_parser = crate::path_arg)]
    evaluator: PathBuf,
    /// One JSON object per image.
    #[arg(long)]
    json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let ev = loramix::eval::MiniworldEvaluator::load(&a.evaluator, &candle_core::Device::Cpu)?;
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    if !a.json {
        println!("| image | subject | style | alignment | predicted |\n|---|---|---|---|---|");
    }
    // An image that cannot be scored is reported and the others still are; the exit status says so.
    let mut failed = 0;
    for path in &a.images {
        let scored = (|| -> Result<_> {
            let prompt = match &a.prompt {
                Some(p) => p.clone(),
                None => loramix::eval::prompt_from_image(path)?,
            };
            let img = image::open(path).with_context(|| format!("reading {}", path.display()))?.to_rgb8();
            let s = ev.score(&img, &prompt)?;
            Ok((prompt, s))
        })();
        let (prompt, s) = match scored {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {}", crate::error_text(&e));
                failed += 1;
                continue;
            }
        };
        if a.json {
            println!("{}", serde_json::json!({"image": path, "prompt": prompt, "subject": s.subject, "style": s.style, "alignment": s.alignment, "predicted": s.predicted}));
        } else {
            let pred: Vec<String> = s.predicted.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("| {} | {} | {} | {} | {} |", path.display(), fmt(s.subject), fmt(s.style), fmt(s.alignment), pred.join(" "));
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be scored", a.images.len());
    }
    Ok(())
}
