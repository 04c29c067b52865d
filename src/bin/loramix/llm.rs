//! `loramix llm`: training for the LLM pane's techniques. `mixer train` (LoRA-Mixer routers over
//! frozen adapters) and `chameleon train` (ChameleonLLM's hypernetwork).

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use loramix::llm::chameleon::{train_hypernetwork_folder, ChameleonTrainOptions};
use loramix::llm::mixer::{train_router_folder, MixerTrainOptions};
use loramix::llm::{LlmSession, RouterInput};

#[derive(clap::Args)]
pub struct LlmArgs {
    #[command(subcommand)]
    command: LlmCommand,
}

#[derive(clap::Subcommand)]
enum LlmCommand {
    /// LoRA-Mixer: routers that pick among frozen LoRA experts per token.
    Mixer {
        #[command(subcommand)]
        command: MixerCommand,
    },
    /// ChameleonLLM: a hypernetwork that adapts the LM head to each cluster of a batch.
    Chameleon {
        #[command(subcommand)]
        command: ChameleonCommand,
    },
}

#[derive(clap::Subcommand)]
enum MixerCommand {
    /// Train only the routers (the adapters stay frozen) on a mixed JSONL file of
    /// {"prompt", "completion"} lines.
    Train(MixerTrainArgs),
}

#[derive(clap::Subcommand)]
enum ChameleonCommand {
    /// Train the hypernetwork on a JSONL file of {"prompt", "completion"} or {"text"} lines.
    Train(ChameleonTrainArgs),
}

#[derive(clap::Args)]
struct MixerTrainArgs {
    /// A transformers model folder or an HF repo id.
    #[arg(long)]
    model: String,
    /// The experts: PEFT LoRA or activated-LoRA folders (at least 2).
    #[arg(long, num_args = 1.., required = true)]
    adapter: Vec<PathBuf>,
    #[arg(long)]
    data: PathBuf,
    /// Experts kept per token at inference (0: soft fusion over all).
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Examples used (a seeded sample of the file).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// What each router scores a token from: `prompt-mean` (the token's input beside the mean of
    /// the inputs over the whole prompt, for prompt positions, and the running mean for generated
    /// ones; ours), `causal-mean` (beside the running mean everywhere) or `token` (the token's
    /// input alone, the paper's).
    #[arg(long, default_value = "prompt-mean", value_parser = ["prompt-mean", "causal-mean", "token"])]
    router_input: String,
    /// Weight of routing supervision on lines that name their expert (an "expert" field, or a
    /// "task" field equal to an expert's folder name); 0: plain plug-and-play training.
    #[arg(long, default_value_t = 0.0)]
    supervision: f64,
    /// Weight α of the balance term α·Σ p̄ᵢ f̄ᵢ (LoRA-Mixer's routing specialization loss).
    #[arg(long, default_value_t = 0.01)]
    alpha: f64,
    /// Weight λ of the mean per-token routing entropy, subtracted as in the paper's Eq. 5 (0: off).
    #[arg(long, default_value_t = 0.01)]
    lambda: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The router folder to write (mixer.json + routers-*.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON line with the report.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ChameleonTrainArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    data: PathBuf,
    /// The hypernetwork folder to write (chameleon.json + hypernet-*.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Rank of the generated LM-head update.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// k-means clusters per batch (training and, by default, inference).
    #[arg(long, default_value_t = 4)]
    clusters: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

/// Moves the bar to `step` of `steps` with `msg`.
fn tick(pb: &ProgressBar, step: usize, steps: usize, msg: String) -> bool {
    pb.set_length(steps as u64);
    pb.set_position(step as u64);
    pb.set_message(msg);
    true
}

fn bar(len: u64) -> Result<ProgressBar> {
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  {elapsed} (ETA {eta})").map_err(|e| anyhow::anyhow!("{e}"))?);
    Ok(b)
}

pub fn run(a: LlmArgs) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    match a.command {
        LlmCommand::Mixer { command: MixerCommand::Train(a) } => {
            let mut session = LlmSession::load(&a.model, &dev)?;
            let opts = MixerTrainOptions {
                top_k: a.top_k,
                samples: a.samples,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                alpha: a.alpha,
                lambda: a.lambda,
                supervision: a.supervision,
                input: match a.router_input.as_str() {
                    "token" => RouterInput::Token,
                    "prompt-mean" => RouterInput::PromptMean,
                    _ => RouterInput::CausalMean,
                },
                seed: a.seed,
            };
            let pb = bar(0)?;
            let r = train_router_folder(&mut session, &a.adapter, &a.data, &a.out, &opts, &mut |s| {
                tick(&pb, s.step, s.steps, format!("{:.4} (task {:.4})", s.loss, s.task_loss))
            })?;
            pb.finish_and_clear();
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: {} routers over {} ({} trainable numbers{}), {} samples, {} steps in {:.0} s, final loss {:.4}",
                    r.out.display(),
                    r.routers,
                    r.experts.join(", "),
                    r.trainable,
                    if r.activated { "; activated by the experts' invocation" } else { "" },
                    r.samples,
                    r.steps,
                    r.seconds,
                    r.final_loss
                );
            }
        }
        LlmCommand::Chameleon { command: ChameleonCommand::Train(a) } => {
            let session = LlmSession::load(&a.model, &dev)?;
            let opts = ChameleonTrainOptions {
                rank: a.rank,
                scale: 1.0,
                clusters: a.clusters,
                batch: a.batch,
                epochs: a.epochs,
                lr: a.lr,
                seed: a.seed,
            };
            let pb = bar(0)?;
            let r = train_hypernetwork_folder(&session, &a.data, &a.out, &opts, &mut |s| tick(&pb, s.step, s.steps, format!("{:.4}", s.loss)))?;
            pb.finish_and_clear();
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: hypernetwork with {} trainable numbers, {} examples, {} steps in {:.0} s, final loss {:.4}",
                    r.out.display(),
                    r.trainable,
                    r.examples,
                    r.steps,
                    r.seconds,
                    r.final_loss
                );
            }
        }
    }
    Ok(())
}
