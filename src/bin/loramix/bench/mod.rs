//! `loramix bench`: the benchmark suites behind BENCHMARKS.md, each timed side by side with its
//! reference in one run. They live in the binary, not the engine: nothing else calls them.

mod chameleon;
mod library;
mod llm;
mod mix;
mod mixer;
mod sdxl_memory;
mod unet;

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A Python with diffusers (tools/parity/requirements.txt) to time the reference in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// unet: repeat each config's pair of measurements (diffusers, then ours) this many times;
    /// each side's figure is the median over rounds, and the table adds the rounds' ratio range.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// unet: load both sides at once and time --iters step pairs in alternation (ABBA), so both see
    /// the same moment of a noisy machine; each side's figure is the median of its steps, the ratio
    /// the median of the pairs' ratios, and the table adds their range and middle half. Needs --python.
    #[arg(long)]
    alternate: bool,
    /// unet: UNet step time; library: importing --count generated SDXL LoRAs; mix: per-step cost of each mixing strategy;
    /// llm: time to first token invoking an aLoRA (cache reuse) vs a LoRA (re-prefill) after 256, 1k, 4k tokens;
    /// mixer: LoRA-Mixer accuracy and routing on the shipped LLM; mixer-speed: its decode speed alone;
    /// chameleon: ChameleonLLM perplexities.
    #[arg(long, default_value = "unet")]
    suite: String,
    /// Same as --suite mix.
    #[arg(long)]
    mix: bool,
    /// mixer: a small run (60 test prompts, 200 training samples) to check the suite works.
    #[arg(long)]
    quick: bool,
    /// unet: only these configs (tiny2, tiny3, mid, mid2, conv); repeat or comma-separate. Default: all.
    #[arg(long, value_delimiter = ',')]
    config: Vec<String>,
    /// unet: also a per-op table for each config (ours from kernels/src/profile.rs spans, diffusers' from torch.profiler).
    #[arg(long)]
    profile: bool,
    /// unet: also the peak resident memory of ours (a fresh process per config) beside diffusers'.
    #[arg(long)]
    memory: bool,
    /// sdxl-memory: a single-file SDXL checkpoint (tools/bench/make_full_sdxl.py makes a random one).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// sdxl-memory: the diffusers folder with the checkpoint's configs and tokenizers.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// sdxl-memory: image side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// sdxl-memory: denoising steps per run.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// sdxl-memory: the dtype both sides load the checkpoint in.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// sdxl-memory: the dtype diffusers runs in (torch has no fast f16 convolution on the CPU).
    #[arg(long, default_value = "f32")]
    reference_dtype: String,
    /// Files for the library suite.
    #[arg(long, default_value_t = 1000)]
    count: usize,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let repo = std::env::current_dir()?;
    match a.suite.as_str() {
        "library" => {
            let work = library::default_work_dir(&repo);
            let b = library::run(&repo, a.python.as_deref(), a.count.max(1), &work)?;
            print!("{}", library::table(&b));
            Ok(())
        }
        _ if a.mix => run_mix(&repo, a.iters, threads),
        "mix" => run_mix(&repo, a.iters, threads),
        "llm" => {
            let rows = llm::run(&repo, &[256, 1024, 4096], a.iters.max(1))?;
            print!("{}", llm::table(&rows, threads));
            Ok(())
        }
        "chameleon" => {
            let r = chameleon::run(&repo, a.quick)?;
            print!("{}", chameleon::table(&r, threads));
            Ok(())
        }
        "mixer-speed" => {
            let (one, mixed) = mixer::speed(&repo, a.iters.max(1))?;
            println!(
                "decode speed on models/minichat ({threads} threads, median of {} alternating runs): one unmerged LoRA {one:.1} tokens/s, top-2 causal-mean mixer over 4 experts {mixed:.1} tokens/s → {:.2}× slower (goal ≤ 1.5×)",
                a.iters.max(1),
                one / mixed.max(1e-9)
            );
            Ok(())
        }
        "mixer" => {
            let r = mixer::run(&repo, a.quick)?;
            print!("{}", mixer::table(&r, threads));
            Ok(())
        }
        "unet" => {
            let options = unet::RunOptions {
                python: a.python.as_deref(),
                iters: a.iters.max(1),
                rounds: a.rounds.max(1),
                alternate: a.alternate,
                threads,
                only: &a.config,
                profile: a.profile,
                memory: a.memory,
            };
            let rows = unet::run(&repo, &options)?;
            print!("{}", unet::table(&rows, threads));
            Ok(())
        }
        "sdxl-memory" => {
            let (Some(checkpoint), Some(config)) = (&a.checkpoint, &a.model_config) else {
                anyhow::bail!("--suite sdxl-memory needs --checkpoint FILE and --model-config DIR (tools/bench/make_full_sdxl.py writes both)");
            };
            let setup = sdxl_memory::Setup { checkpoint, config, python: a.python.as_deref(), size: a.size, steps: a.steps, dtype: &a.dtype, reference_dtype: &a.reference_dtype };
            let runs = sdxl_memory::run(&repo, &setup)?;
            print!("{}", sdxl_memory::table(&runs, &setup));
            Ok(())
        }
        // The child process of `--memory` (one config, one step, prints its peak RSS).
        "unet-rss" => {
            let name = a.config.first().map(String::as_str).unwrap_or("");
            unet::rss_child(&repo, name)?;
            Ok(())
        }
        other => {
            anyhow::bail!("--suite {other}: expected unet, sdxl-memory, library, mix, llm, mixer or chameleon")
        }
    }
}

fn run_mix(repo: &std::path::Path, iters: usize, threads: usize) -> Result<()> {
    let (rows, note) = mix::run(repo, iters.max(1))?;
    print!("{}", mix::table(&rows, &note, threads));
    Ok(())
}
