//! The `loramix` command line: a thin layer over the engine.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loramix::device::{parse_device, parse_dtype};
use loramix::library::{ImportOutcome, LoraEntry, LoraLibrary, LoraQuery};
use loramix::lora::{self, Role};
use loramix::mix;
use loramix::output;
use loramix::studio;
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
    /// The LoRA library: import, list, show, remove, rename, set role and tags.
    Lora(LoraArgs),
    /// Score miniworld images: subject fidelity, style fidelity, prompt alignment.
    Eval(EvalArgs),
    /// Chat with an LLM, with LoRA and activated-LoRA adapters that reuse the KV cache.
    Chat(ChatArgs),
}

#[derive(clap::Args)]
struct ChatArgs {
    /// A transformers model folder (config.json, tokenizer.json, *.safetensors) or an HF repo id.
    #[arg(long)]
    model: String,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), named after the
    /// folder; enabled as PEFT enables it. Repeatable.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The user's message (raw text when the model has no chat template).
    #[arg(long)]
    prompt: String,
    /// Append this adapter's invocation sequence to the conversation first.
    #[arg(long)]
    invoke: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line: prompt_tokens, tokens, text, computed_positions, reused_positions.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// PNG files (their prompt is read from the `parameters` chunk unless --prompt is given).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value = "models/miniworld/evaluator")]
    evaluator: PathBuf,
    /// One JSON object per image.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LoraArgs {
    /// Library folder (default: $LORAMIX_HOME, else the platform data dir).
    #[arg(long, global = true)]
    library: Option<PathBuf>,
    #[command(subcommand)]
    command: LoraCommand,
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Import LoRA files and folders (recursively); the same bytes twice are one entry.
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object per file, as it is processed.
        #[arg(long)]
        json: bool,
    },
    /// List entries, optionally filtered.
    List {
        /// subject | style | unknown
        #[arg(long)]
        role: Option<String>,
        /// Base model id: sdxl, sd1, sd2, sdxl_refiner, ...
        #[arg(long)]
        base: Option<String>,
        /// A user tag or trigger word.
        #[arg(long)]
        tag: Option<String>,
        /// Text to find in names, titles, trigger words and tags.
        #[arg(long)]
        query: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one entry (by name, file name or sha256 prefix).
    Show {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an entry and its stored file.
    Rm { key: String },
    /// Change the name used in <lora:NAME:weight>.
    Rename { key: String, new_name: String },
    /// Set the role and/or the user tags of an entry.
    Set {
        key: String,
        /// subject | style | unknown
        #[arg(long)]
        role: Option<String>,
        /// Comma-separated; replaces the current tags.
        #[arg(long)]
        tags: Option<String>,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A Python with diffusers (tools/parity/requirements.txt) to time the reference in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// unet: UNet step time; library: importing --count generated SDXL LoRAs; mix: per-step cost of each mixing strategy;
    /// llm: time to first token invoking an aLoRA (cache reuse) vs a LoRA (re-prefill) after 256, 1k, 4k tokens.
    #[arg(long, default_value = "unet")]
    suite: String,
    /// Same as --suite mix.
    #[arg(long)]
    mix: bool,
    /// Files for the library suite.
    #[arg(long, default_value_t = 1000)]
    count: usize,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers folder, a single-file SDXL .safetensors checkpoint, or a Hugging Face repo id
    /// (default: the shipped miniworld model).
    #[arg(long, default_value = "models/miniworld")]
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
    /// Batches run one after another (A1111's batch count); batch i starts at seed + i·batch-size.
    #[arg(long, default_value_t = 1)]
    batch_count: usize,
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
    /// A LoRA file, or a library name, with an optional strength (default 1). Repeatable.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Library for <lora:NAME:w> prompt tags and --lora names (default: $LORAMIX_HOME or the data dir).
    #[arg(long)]
    library: Option<PathBuf>,
    /// How several LoRAs combine: merge | switch | composite | klora | est | np | windows | auto.
    #[arg(long, default_value = "merge")]
    mix: String,
    /// --mix windows: step windows per role as fractions of the steps (default subject=0:0.7,style=0.3:1).
    #[arg(long)]
    windows: Option<String>,
    /// Run the unconditional half of CFG on the base weights (any per-step --mix).
    #[arg(long)]
    asymmetric_cfg: bool,
    /// --mix np: the soft projection's strength mu (default 0.5; large = hard projection).
    #[arg(long)]
    np_mu: Option<f64>,
    /// --mix klora / est, corrected mode: the layers they do not select on: follow (default) | merge.
    #[arg(long)]
    klora_others: Option<String>,
    /// `library`: add the library's LoRAs that the prompt calls for (trigger words, names, tags,
    /// text-encoder similarity), the best per role; the trace and the PNG say which and why.
    #[arg(long)]
    candidates: Option<String>,
    /// K-LoRA / auto time-scale pattern: s | s* (default s*).
    #[arg(long)]
    klora_pattern: Option<String>,
    /// corrected (progress = step/steps, alpha/rank scale) | reference (the reference's call counter, no alpha).
    #[arg(long, default_value = "corrected")]
    klora_mode: String,
    /// LoRA Switch period in steps.
    #[arg(long, default_value_t = 5)]
    switch_every: usize,
    /// Write the per-step, per-layer LoRA weights as JSON.
    #[arg(long)]
    mix_trace: Option<PathBuf>,
    /// DINO ViT-S/16 folder for --mix est (default: <library>/models/dino-vits16).
    #[arg(long)]
    est_embedder: Option<PathBuf>,
    /// Steps of EST's two preview generations (default: --steps).
    #[arg(long)]
    est_preview_steps: Option<usize>,
    /// Size of EST's previews, WxH (default: the output size).
    #[arg(long)]
    est_preview_size: Option<String>,
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose()?;
    let opts = LoadOptions { device: parse_device(&a.device)?, dtype: parse_dtype(&a.dtype)?, config_dir: a.config.clone() };
    let init_noise = a.init_noise.as_deref().map(output::load_latents).transpose()?;
    let lora_args = a.loras.iter().map(|s| lora::parse_lora_arg_with_role(s)).collect::<loramix::Result<Vec<_>>>()?;
    let mut mix_opts = mix::MixOptions {
        strategy: a.mix.clone(),
        klora_pattern: a.klora_pattern.clone(),
        klora_mode: a.klora_mode.clone(),
        switch_every: a.switch_every,
        est_previews: None,
        windows: a.windows.clone(),
        asymmetric_cfg: a.asymmetric_cfg,
        np_mu: a.np_mu,
        klora_others: a.klora_others.clone(),
    };
    if a.mix != "est" {
        mix::build(&mix_opts)?; // flag errors before the model loads
    }
    let (clean_prompt, prompt_tags) = lora::extract_prompt_loras(&a.prompt)?;
    let model_loras = std::path::Path::new(&a.model).join("loras");
    // Resolve names before the model loads, so a typo fails fast.
    lora::resolve_choices(&lora_args, &prompt_tags, a.library.as_deref(), Some(&model_loras))?;
    let t0 = Instant::now();
    let pipe = SdxlPipeline::load(&a.model, &opts).with_context(|| format!("loading model {}", a.model))?;
    eprintln!("loaded {} in {:.1}s", a.model, t0.elapsed().as_secs_f64());
    let targets = lora::AdapterTargets::of_pipeline(&pipe);
    let mut lora_args = lora_args;
    let picked_candidates = match a.candidates.as_deref() {
        None => Vec::new(),
        Some("library") => {
            let picks = studio::library_candidates(&pipe, a.library.as_deref(), &clean_prompt, &mut lora_args)?;
            for c in &picks {
                eprintln!("candidate {} ({}): score {:.2}, {}{}", c.name, c.role.as_str(), c.score, if c.picked { "picked: " } else { "" }, c.reason);
            }
            picks
        }
        Some(o) => anyhow::bail!("--candidates {o}: expected library"),
    };
    let ll = studio::load_loras(&lora_args, &prompt_tags, a.library.as_deref(), &model_loras, &targets)?;
    for r in &ll.reports {
        eprintln!("lora {} ({}, {}, {}): {} layers matched", r.name, r.format, r.base, r.role, r.layers);
        for w in &r.warnings {
            eprintln!("warning: lora {}: {w}", r.name);
        }
    }
    let mix_loras = ll.mix.clone();
    let loaded: Vec<(lora::LoadedLora, f64)> = ll.mix.iter().map(|m| (m.lora.clone(), m.strength)).collect();
    let seed = a.seed.unwrap_or_else(studio::random_seed);
    let (dw, dh) = pipe.default_size();
    let req = GenerateRequest {
        prompt: clean_prompt,
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
    if a.batch_count == 0 {
        anyhow::bail!("--batch-count must be at least 1");
    }
    if a.batch_count > 1 && (a.mix_trace.is_some() || a.save_latents.is_some() || req.init_noise.is_some()) {
        anyhow::bail!("--mix-trace, --save-latents and --init-noise describe one batch: use them with --batch-count 1");
    }
    let plan = if mix_loras.is_empty() {
        if a.mix_trace.is_some() {
            anyhow::bail!("--mix-trace needs at least one --lora");
        }
        None
    } else {
        let plan = studio::plan_mix(&pipe, &targets, mix_loras, &req.prompt, &a.mix, picked_candidates)?;
        if a.mix == "est" {
            let dir = match &a.est_embedder {
                Some(d) => d.clone(),
                None => LoraLibrary::default_root()?.join("models/dino-vits16"),
            };
            if !dir.join("model.safetensors").exists() {
                anyhow::bail!(
                    "--mix est needs the DINO ViT-S/16 embedder: put facebook/dino-vits16's config.json, model.safetensors and \
                     preprocessor_config.json in {} or pass --est-embedder DIR",
                    dir.display()
                );
            }
            let embedder = loramix::embed::ImageEmbedder::load(&dir, &opts.device)?;
            let mut preview = req.clone();
            preview.init_noise = None;
            preview.batch_size = 1;
            if let Some(n) = a.est_preview_steps {
                preview.steps = n;
            }
            if let Some((w, h)) = a.est_preview_size.as_deref().map(parse_size).transpose()? {
                preview.width = Some(w);
                preview.height = Some(h);
            }
            let t = Instant::now();
            let previews = mix::est::style_discrepancy(&pipe, &targets, &plan, &preview, &embedder)?;
            eprintln!(
                "est: previews {} steps at {}x{}: style discrepancy d = {:.4} ({:.1}s)",
                previews.steps, previews.width, previews.height, previews.discrepancy, t.elapsed().as_secs_f64()
            );
            mix_opts.est_previews = Some(previews);
        }
        Some(plan)
    };
    let hashes = ll.hashes.clone();
    let mut idx = output::first_free_index(&a.out);
    let mut written = Vec::with_capacity(a.batch_count * a.batch_size);
    for batch in 0..a.batch_count {
        let t_batch = Instant::now();
        let mut req = req.clone();
        req.seed = seed + (batch * a.batch_size) as u64;
        let mixer = plan.clone().map(|p| mix::Mixer::new(&targets, p, mix::build(&mix_opts)?)).transpose()?;
        written.extend(generate_batch(&a, &pipe, &req, mixer, (batch, seed), &loaded, &prompt_tags, &hashes, &mut idx)?);
        eprintln!("batch {}/{}: {:.2}s", batch + 1, a.batch_count, t_batch.elapsed().as_secs_f64());
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

/// One batch of `generate`: denoise (with the mixer, if any), decode, write the PNGs with their
/// A1111 `parameters` and our JSON chunk; returns the paths written.
#[allow(clippy::too_many_arguments)]
fn generate_batch(
    a: &GenerateArgs,
    pipe: &SdxlPipeline,
    req: &GenerateRequest,
    mut mixer: Option<mix::Mixer>,
    (batch_index, seed): (usize, u64),
    loaded: &[(lora::LoadedLora, f64)],
    prompt_tags: &[lora::PromptLora],
    hashes: &[(String, String)],
    idx: &mut usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let bar = ProgressBar::new(a.steps as u64);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tty = std::io::stderr().is_terminal();
    let latents = pipe.generate_latents_mixed(req, mixer.as_mut().map(|m| m as &mut dyn loramix::pipeline::StepMixer), &mut |p| {
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
    let mut summary = None;
    if let Some(m) = mixer.take() {
        let trace = m.finish();
        summary = Some(studio::MixSummary::of(&trace));
        if let Some(path) = &a.mix_trace {
            trace.write(path)?;
            eprintln!("wrote mix trace {}", path.display());
        }
    }
    if let Some(path) = &a.save_latents {
        output::save_latents(path, &latents)?;
        eprintln!("wrote {}", path.display());
    }
    let images = pipe.decode(&latents)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let sampler = match req.sampler {
        Some(s) => s,
        None => pipe.default_sampler()?,
    };
    let (dw, dh) = pipe.default_size();
    let (w, h) = (req.width.unwrap_or(dw), req.height.unwrap_or(dh));
    // The same record the app writes: A1111 `parameters` (with <lora:..> tags and Lora hashes,
    // so A1111 and our drop-to-restore re-apply them) and our JSON chunk with the full settings.
    let settings = studio::Settings {
        model: a.model.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone().unwrap_or_default(),
        steps: a.steps,
        cfg: a.cfg,
        sampler: sampler.name().to_string(),
        seed: Some(seed),
        width: w,
        height: h,
        batch_count: a.batch_count,
        batch_size: a.batch_size,
        loras: loaded
            .iter()
            .filter(|(l, _)| !prompt_tags.iter().any(|t| t.name == l.name))
            .map(|(l, w)| studio::LoraSetting { name: l.name.clone(), weight: *w, role: None, schedule: None })
            .collect(),
        mix: a.mix.clone(),
        klora_pattern: a.klora_pattern.clone(),
        switch_every: a.switch_every,
        windows: a.windows.clone(),
        asymmetric_cfg: a.asymmetric_cfg,
        klora_others: a.klora_others.clone(),
        candidates: a.candidates.is_some(),
    };
    let mut written = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let rec = studio::ImageRecord {
            settings: settings.clone(),
            seed: req.seed,
            batch_index,
            index_in_batch: i,
            width: w,
            height: h,
            sampler: sampler.a1111_name().to_string(),
            lora_hashes: hashes.to_vec(),
            mix_trace: summary.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let path = output::next_image_path(&a.out, req.seed, idx);
        output::write_atomic(&path, &studio::encode_image(img, &rec)?)?;
        written.push(path);
    }
    Ok(written)
}

fn eval_command(a: EvalArgs) -> Result<()> {
    let ev = loramix::evaluator::MiniworldEvaluator::load(&a.evaluator, &candle_core::Device::Cpu)?;
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    if !a.json {
        println!("| image | subject | style | alignment | predicted |\n|---|---|---|---|---|");
    }
    for path in &a.images {
        let prompt = match &a.prompt {
            Some(p) => p.clone(),
            None => loramix::evaluator::prompt_from_png(path)?,
        };
        let img = image::open(path).with_context(|| format!("reading {}", path.display()))?.to_rgb8();
        let s = ev.score(&img, &prompt)?;
        if a.json {
            println!("{}", serde_json::json!({"image": path, "prompt": prompt, "subject": s.subject, "style": s.style, "alignment": s.alignment, "predicted": s.predicted}));
        } else {
            let pred: Vec<String> = s.predicted.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("| {} | {} | {} | {} | {} |", path.display(), fmt(s.subject), fmt(s.style), fmt(s.alignment), pred.join(" "));
        }
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| anyhow::anyhow!("size '{s}': expected WxH, e.g. 512x512"))?;
    Ok((w.trim().parse()?, h.trim().parse()?))
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| anyhow::anyhow!("--role {s}: expected subject, style or unknown"))
}

fn print_entry(e: &LoraEntry) {
    let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
    println!("name:          {}", e.display_name);
    println!("file:          {}", e.file_name);
    println!("sha256:        {}", e.sha256);
    println!("addnet hash:   {}", &e.addnet_hash[..12]);
    println!("size:          {} bytes", e.size);
    println!("format:        {}", e.format);
    println!("ranks:         {:?}", e.ranks);
    println!("alphas:        {:?}", e.alphas);
    println!("base model:    {}", e.base_model);
    println!("modules:       {}", e.module_count);
    println!("role:          {}", e.role);
    println!("trigger words: {}", list(&e.trigger_words));
    println!("tags:          {}", list(&e.user_tags));
    if let Some(t) = &e.title {
        println!("title:         {t}");
    }
    println!("thumbnail:     {}", if e.thumbnail.is_some() { "yes" } else { "no" });
    println!("path:          {}", e.path.display());
}

fn lora_command(a: LoraArgs) -> Result<()> {
    let root = match a.library {
        Some(r) => r,
        None => LoraLibrary::default_root()?,
    };
    let mut lib = LoraLibrary::open(&root)?;
    match a.command {
        LoraCommand::Import { paths, json } => {
            let (mut added, mut existing, mut failed) = (0, 0, 0);
            let mut stdout = std::io::stdout().lock();
            lib.import(&paths, &mut |o| {
                let line = match o {
                    ImportOutcome::Added { source, entry } => {
                        added += 1;
                        format!("added    {} ({}, {}, {}) from {}", entry.display_name, entry.format, entry.base_model, &entry.sha256[..12], source.display())
                    }
                    ImportOutcome::Existing { source, entry } => {
                        existing += 1;
                        format!("exists   {} ({}) from {}", entry.display_name, &entry.sha256[..12], source.display())
                    }
                    ImportOutcome::Failed { source, error } => {
                        failed += 1;
                        let _ = source;
                        format!("failed   {error}")
                    }
                };
                let line = if json { serde_json::to_string(o).unwrap_or_default() } else { line };
                let _ = writeln!(stdout, "{line}");
            })?;
            eprintln!("{added} added, {existing} already in the library, {failed} failed ({})", root.display());
            if failed > 0 {
                std::process::exit(1);
            }
        }
        LoraCommand::List { role, base, tag, query, json } => {
            let q = LoraQuery { text: query, role: role.as_deref().map(parse_role).transpose()?, base, tag };
            let entries = lib.list(&q)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!("{:<28} {:<8} {:<10} {:<9} r={:<8} {}", e.display_name, e.role, e.base_model, e.format, format!("{:?}", e.ranks), &e.sha256[..12]);
                }
                eprintln!("{} LoRAs", entries.len());
            }
        }
        LoraCommand::Show { key, json } => {
            let e = lib.resolve(&key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print_entry(&e);
            }
        }
        LoraCommand::Rm { key } => {
            let e = lib.remove(&key)?;
            println!("removed {} ({})", e.display_name, &e.sha256[..12]);
        }
        LoraCommand::Rename { key, new_name } => {
            let e = lib.rename(&key, &new_name)?;
            println!("renamed to {}", e.display_name);
        }
        LoraCommand::Set { key, role, tags } => {
            if role.is_none() && tags.is_none() {
                anyhow::bail!("nothing to set: give --role and/or --tags");
            }
            if let Some(r) = role {
                lib.set_role(&key, parse_role(&r)?)?;
            }
            if let Some(t) = tags {
                let v: Vec<String> = t.split(',').map(str::to_string).collect();
                lib.set_tags(&key, &v)?;
            }
            print_entry(&lib.resolve(&key)?);
        }
    }
    Ok(())
}

fn chat_command(a: ChatArgs) -> Result<()> {
    use loramix::llm::{AdapterKind, GenerateOptions, LlmSession, SamplingOptions};
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p {}: expected a value in (0, 1]", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        anyhow::bail!("--temperature {}: expected a value >= 0", a.temperature);
    }
    let mut session = LlmSession::load(&a.model, &candle_core::Device::Cpu)?;
    for dir in &a.adapter {
        session.add_adapter(dir, None)?;
    }
    let enabled: Vec<usize> = (0..session.adapters().len()).collect();
    let extra: Vec<u32> = match &a.invoke {
        None => vec![],
        Some(name) => {
            let i = session.adapter_index(name).with_context(|| {
                let names: Vec<&str> = session.adapters().iter().map(|a| a.name.as_str()).collect();
                format!("--invoke {name}: no adapter of that name is loaded (loaded: {})", if names.is_empty() { "none".into() } else { names.join(", ") })
            })?;
            match &session.adapters()[i].kind {
                AdapterKind::Activated { invocation } => invocation.clone(),
                AdapterKind::Lora => anyhow::bail!("--invoke {name}: a standard LoRA has no invocation sequence"),
            }
        }
    };
    // An invocation takes the place of the generation prompt (it opens the adapter's turn).
    let prompt_tokens = session.encode_prompt(&a.prompt, a.invoke.is_none())?;
    let mut conv = session.conversation(&prompt_tokens);
    // The conversation's base cache, as the app keeps it warm; a standard LoRA cannot use it.
    if !session.adapters().iter().any(|a| a.kind == AdapterKind::Lora) {
        session.prefill(&mut conv)?;
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingOptions { temperature: a.temperature, top_p: a.top_p, seed: a.seed },
        ..Default::default()
    };
    let stream = !a.json;
    let mut out = std::io::stdout();
    let reply = session.reply(&mut conv, &extra, &enabled, &opts, &mut |_, piece| {
        if stream {
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        }
        true
    })?;
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": reply.prompt_tokens,
            "tokens": reply.tokens,
            "text": reply.text,
            "computed_positions": reply.computed_positions,
            "reused_positions": reply.reused_positions,
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} tokens; computed {} positions, reused {} from the conversation cache]",
            reply.tokens.len(),
            reply.computed_positions,
            reply.reused_positions
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(*a),
        Command::Lora(a) => lora_command(a),
        Command::Eval(a) => eval_command(a),
        Command::Chat(a) => chat_command(a),
        Command::Bench(a) if a.suite == "library" => {
            let repo = std::env::current_dir()?;
            let work = loramix::bench_library::default_work_dir(&repo);
            let b = loramix::bench_library::run(&repo, a.python.as_deref(), a.count.max(1), &work)?;
            print!("{}", loramix::bench_library::table(&b));
            Ok(())
        }
        Command::Bench(a) if a.suite == "mix" || a.mix => {
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let repo = std::env::current_dir()?;
            let (rows, note) = loramix::bench_mix::run(&repo, a.iters.max(1))?;
            print!("{}", loramix::bench_mix::table(&rows, &note, threads));
            Ok(())
        }
        Command::Bench(a) if a.suite == "llm" => {
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let repo = std::env::current_dir()?;
            let rows = loramix::bench_llm::run(&repo, &[256, 1024, 4096], a.iters.max(1))?;
            print!("{}", loramix::bench_llm::table(&rows, threads));
            Ok(())
        }
        Command::Bench(a) if a.suite != "unet" => anyhow::bail!("--suite {}: expected unet, library, mix or llm", a.suite),
        Command::Bench(a) => {
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let repo = std::env::current_dir()?;
            let rows = loramix::bench::run(&repo, a.python.as_deref(), a.iters.max(1), threads)?;
            print!("{}", loramix::bench::table(&rows, threads));
            Ok(())
        }
    }
}
