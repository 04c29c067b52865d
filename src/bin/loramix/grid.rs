//! `loramix grid --x AXIS=V1,... [--y ...] [--z ...] <generate options>`: an X/Y/Z plot, every
//! cell's images with full metadata and a labelled grid PNG per Z value.

use anyhow::Result;
use loramix::studio::{self, Axis};

use crate::generate::{self, GenerateArgs};

/// The generate flags a grid refuses (`generate::studio_settings` says why) are hidden from its
/// help.
#[derive(clap::Args)]
#[command(
    mut_arg("mix_trace", |a| a.hide(true)),
    mut_arg("save_latents", |a| a.hide(true)),
    mut_arg("init_noise", |a| a.hide(true)),
    mut_arg("low_memory", |a| a.hide(true)),
    mut_arg("vae_tiling", |a| a.hide(true))
)]
pub struct GridArgs {
    /// Columns: seed | subseed | subseed_strength | steps | cfg | sampler | schedule | size | width | height | clip_skip |
    /// prompt_sr | lora:NAME | mix | lbw | lbw:NAME | checkpoint | vae | denoise | controlnet_weight |
    /// controlnet_start | controlnet_end | controlnet_model | controlnet_module | controlnet_control_mode |
    /// controlnet_resize_mode | controlnet_threshold_a | controlnet_threshold_b, then = and
    /// comma-separated values (CSV quoting; ranges 1-5, 1-9 (+2), 0.2-1 [5] on numeric axes).
    #[arg(long, value_name = "AXIS=V1,V2,...")]
    x: String,
    /// Rows.
    #[arg(long, value_name = "AXIS=V1,V2,...")]
    y: Option<String>,
    /// One grid per value.
    #[arg(long, value_name = "AXIS=V1,V2,...")]
    z: Option<String>,
    #[command(flatten)]
    job: GenerateArgs,
}

pub fn run(a: GridArgs) -> Result<()> {
    let parse = |s: &Option<String>| s.as_deref().map(str::parse::<Axis>).transpose();
    let (x, y, z) = (Some(a.x.parse::<Axis>()?), parse(&a.y)?, parse(&a.z)?);
    if a.job.format()? != studio::SamplesFormat::Png {
        anyhow::bail!("--samples-format: a grid writes PNGs (each cell keeps the record that restores it)");
    }
    let parts = generate::job_parts(&a.job)?;
    let settings = generate::studio_settings(&a.job, parts.init, parts.hires, "grid")?;
    let cells = [&x, &y, &z].iter().map(|a| a.as_ref().map_or(1, |a| a.values.len())).product::<usize>();
    if cells > 10_000 {
        anyhow::bail!("the grid has {cells} cells: at most 10000");
    }
    let studio = studio::Studio::with_load_options(parts.load);
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut n = 0usize;
    let out = studio::run_grid(&studio, &settings, [x.as_ref(), y.as_ref(), z.as_ref()], &a.job.out, a.job.library.as_deref(), &cancel, &mut |e| {
        match &e {
            studio::StudioEvent::Image { path, .. } | studio::StudioEvent::Kept { path } => {
                n += 1;
                eprintln!("[{n}] {}", path.display());
            }
            other => generate::log_event(other),
        }
    })?;
    for g in &out.grids {
        println!("{}", g.display());
    }
    Ok(())
}
