//! The `loramix` command line: a thin layer over the engine.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loramix::device::{parse_device, parse_dtype};
use loramix::output;
use loramix::{GenerateRequest, LoadOptions, SamplerKind, SdxlPipeline};

#[derive(Parser)]
#[command(name = "loramix", version, about = "SDXL image generation with training-free LoRA mixing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Generate(Box<GenerateArgs>),
    /// Seconds per SDXL UNet step on the CPU, beside diffusers (see BENCHMARKS.md).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A Python with diffusers (tools/parity/requirements.txt) to time the reference in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers folder, a single-file SDXL .safetensors checkpoint, or a Hugging Face repo id.
    #[arg(long)]
    model: String,
    /// Configs and tokenizers for a single-file checkpoint (a diffusers folder).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Omitted: no negative prompt (zero embeddings on SDXL). An explicit "" encodes the empty string.
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    cfg: f64,
    /// euler | euler_a | dpmpp_2m | dpmpp_2m_karras | ddim (default: the model's scheduler).
    #[arg(long)]
    sampler: Option<String>,
    /// Default: a random seed, printed.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value = "out")]
    out: PathBuf,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Unscaled standard-normal starting noise: safetensors with key `latents`, [batch, 4, H/f, W/f].
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Write the final latents (before VAE decode) to this safetensors file, key `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64 ^ (std::process::id() as u64).rotate_left(32)) % 4_294_967_296
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose()?;
    let opts = LoadOptions { device: parse_device(&a.device)?, dtype: parse_dtype(&a.dtype)?, config_dir: a.config.clone() };
    let init_noise = a.init_noise.as_deref().map(output::load_latents).transpose()?;
    let t0 = Instant::now();
    let pipe = SdxlPipeline::load(&a.model, &opts).with_context(|| format!("loading model {}", a.model))?;
    eprintln!("loaded {} in {:.1}s", a.model, t0.elapsed().as_secs_f64());
    let seed = a.seed.unwrap_or_else(random_seed);
    let (dw, dh) = pipe.default_size();
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler,
        seed,
        width: Some(a.width.unwrap_or(dw)),
        height: Some(a.height.unwrap_or(dh)),
        batch_size: a.batch_size,
        init_noise,
    };
    let bar = ProgressBar::new(a.steps as u64);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tty = std::io::stderr().is_terminal();
    let latents = pipe.generate_latents(&req, &mut |p| {
        let its = p.step as f64 / p.elapsed.as_secs_f64().max(1e-9);
        if tty {
            bar.set_length(p.steps as u64);
            bar.set_position(p.step as u64);
            bar.set_message(format!("{its:.2} it/s"));
        } else {
            // Logs and pipes get one plain line per step.
            let eta = (p.steps - p.step) as f64 / its;
            eprintln!("step {}/{} {its:.2} it/s ETA {eta:.1}s", p.step, p.steps);
        }
        true
    })?;
    bar.finish();
    if let Some(path) = &a.save_latents {
        output::save_latents(path, &latents)?;
        eprintln!("wrote {}", path.display());
    }
    let images = pipe.decode(&latents)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let sampler = match sampler {
        Some(s) => s,
        None => pipe.default_sampler()?,
    };
    let (w, h) = (req.width.unwrap_or(dw), req.height.unwrap_or(dh));
    let mut params = a.prompt.clone();
    if let Some(n) = &a.negative_prompt {
        params.push_str(&format!("\nNegative prompt: {n}"));
    }
    params.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {w}x{h}, Model: {}, Version: loramix {}",
        a.steps,
        sampler.a1111_name(),
        a.cfg,
        std::path::Path::new(&a.model).file_name().and_then(|n| n.to_str()).unwrap_or(&a.model),
        env!("CARGO_PKG_VERSION")
    ));
    let mut idx = output::first_free_index(&a.out);
    let mut written = Vec::with_capacity(images.len());
    for img in &images {
        let path = output::next_image_path(&a.out, seed, &mut idx);
        let png = output::encode_png(img, &[("parameters", params.clone())])?;
        output::write_atomic(&path, &png)?;
        written.push(path);
    }
    // Paths go to stdout for scripts; a closed pipe (`| head`) must not abort the run.
    let mut stdout = std::io::stdout().lock();
    for path in &written {
        if writeln!(stdout, "{}", path.display()).is_err() {
            break;
        }
    }
    eprintln!("seed {seed}, {:.1}s total", t0.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(*a),
        Command::Bench(a) => {
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let repo = std::env::current_dir()?;
            let rows = loramix::bench::run(&repo, a.python.as_deref(), a.iters.max(1), threads)?;
            print!("{}", loramix::bench::table(&rows, threads));
            Ok(())
        }
    }
}
