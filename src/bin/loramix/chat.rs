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
