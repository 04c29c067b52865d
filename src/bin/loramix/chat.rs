//! `loramix chat`: one reply from an LLM with PEFT and activated-LoRA adapters, reusing the
//! conversation's KV cache where an aLoRA allows it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// A transformers model folder (config.json, tokenizer.json, *.safetensors) or an HF repo id.
    #[arg(long)]
    model: String,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), named after the
    /// folder; enabled as PEFT enables it. Repeatable.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The user's message (raw text when the model has no chat template).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    prompt: Option<String>,
    /// A LoRA-Mixer router folder (from `loramix llm mixer train`): its experts are loaded
    /// (or taken from --adapter under the same names) and routed per token.
    #[arg(long)]
    mixer: Option<PathBuf>,
    /// Experts kept per token with --mixer (0: soft fusion); default: the router's own.
    #[arg(long, requires = "mixer")]
    top_k: Option<usize>,
    /// A JSONL file of prompts ({"prompt": ...} per line) to answer as one batch.
    #[arg(long, requires = "out")]
    batch: Option<PathBuf>,
    /// A ChameleonLLM hypernetwork folder (from `loramix llm chameleon train`) for --batch.
    #[arg(long, requires = "batch")]
    chameleon: Option<PathBuf>,
    /// k-means clusters for --batch (default: the hypernetwork's, or 1 without one).
    #[arg(long, requires = "batch")]
    clusters: Option<usize>,
    /// Where --batch writes its answers (JSONL, one line per prompt, in input order).
    #[arg(long, requires = "batch")]
    out: Option<PathBuf>,
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

pub fn run(a: ChatArgs) -> Result<()> {
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
    if let Some(batch) = &a.batch {
        return run_batch(&mut session, &a, batch);
    }
    let prompt = a.prompt.clone().unwrap_or_default();
    let mut enabled: Vec<usize> = (0..session.adapters().len()).collect();
    let mut routed_experts = vec![];
    if let Some(dir) = &a.mixer {
        let m = session.load_mixer(dir)?;
        routed_experts = m.experts.clone();
        if let Some(k) = a.top_k {
            session.set_mixer_top_k(k)?;
        }
        // The experts run through the mixer only; other adapters keep their usual switch.
        enabled.retain(|i| !routed_experts.contains(i));
        enabled.push(loramix::llm::MIXER);
    }
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
    let prompt_tokens = session.encode_prompt(&prompt, a.invoke.is_none())?;
    let mut conv = session.conversation(&prompt_tokens);
    // The conversation's base cache, as the app keeps it warm; a standard LoRA (or a mixer of
    // standard LoRAs, which routes from the first position) cannot use it.
    let standard = session.adapters().iter().enumerate().any(|(i, a)| a.kind == AdapterKind::Lora && enabled.contains(&i));
    let mixer_everywhere = session.mixer().is_some_and(|m| m.spec.invocation_tokens.is_none());
    if !standard && !mixer_everywhere {
        session.prefill(&mut conv)?;
    }
    let _ = session.take_routing_trace();
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
    let routing = match session.mixer() {
        None => serde_json::Value::Null,
        Some(m) => {
            let trace = session.take_routing_trace();
            let names: Vec<String> = m.spec.experts.iter().map(|e| e.name.clone()).collect();
            let share = loramix::llm::mixer::top1_share(&trace)?;
            serde_json::json!({
                "experts": names,
                "top_k": m.spec.top_k,
                "activated": m.spec.invocation_tokens.is_some(),
                "routed_from": session.mixer_start(&reply.prompt_tokens),
                "top1_share": share,
            })
        }
    };
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": reply.prompt_tokens,
            "tokens": reply.tokens,
            "text": reply.text,
            "computed_positions": reply.computed_positions,
            "reused_positions": reply.reused_positions,
            "routing": routing,
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

fn run_batch(session: &mut loramix::llm::LlmSession, a: &ChatArgs, batch: &std::path::Path) -> Result<()> {
    use loramix::llm::chameleon::answer_batch;
    use loramix::llm::{GenerateOptions, SamplingOptions};
    if a.mixer.is_some() || a.invoke.is_some() || !a.adapter.is_empty() {
        anyhow::bail!("--batch answers plain prompts (with --chameleon's adapters): --adapter, --mixer and --invoke are for single prompts");
    }
    if a.clusters == Some(0) {
        anyhow::bail!("--clusters 0: expected at least 1");
    }
    let out = a.out.as_ref().context("--batch needs --out")?;
    let prompts = loramix::llm::data::read_prompts(batch)?;
    let hyper = match &a.chameleon {
        Some(dir) => Some(session.load_chameleon(dir)?),
        None => None,
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingOptions { temperature: a.temperature, top_p: a.top_p, seed: a.seed },
        ..Default::default()
    };
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    let answers = answer_batch(session, &prompts, hyper.as_ref().map(|(s, n)| (s, n)), a.clusters, &opts, &mut |d, _| {
        pb.set_position(d as u64);
        true
    })?;
    pb.finish_and_clear();
    let mut text = String::new();
    for ans in &answers {
        text.push_str(&serde_json::to_string(ans)?);
        text.push('\n');
    }
    loramix::output::write_atomic(out, text.as_bytes())?;
    let k = answers.iter().map(|x| x.cluster).max().map_or(0, |m| m + 1);
    eprintln!("{} answers in {} clusters -> {}", answers.len(), k, out.display());
    Ok(())
}
