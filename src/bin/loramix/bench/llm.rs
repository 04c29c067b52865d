//! `loramix bench --suite llm`: time to first token when an adapter is invoked after a 256, 1k
//! and 4k-token conversation — an activated LoRA on the conversation's cached base KV (only the
//! invocation is computed) beside the same weights as a standard LoRA (the whole prefix is
//! re-prefilled with the adapter, as a LoRA requires). A random mid-size Llama-architecture model
//! is written to a temporary folder first (speed does not depend on weight values).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use loramix::error::{Error, Result};
use loramix::llm::{GenerateOptions, LlmSession};

pub struct LlmRow {
    pub prefix: usize,
    pub alora_s: f64,
    pub lora_s: f64,
    pub alora_computed: usize,
    pub lora_computed: usize,
    pub prefill_s: f64,
}

/// The benchmark model: Llama architecture, ~110M parameters (GQA 12/4 heads, 8 layers).
pub const HIDDEN: usize = 768;
pub const LAYERS: usize = 8;
pub const VOCAB: usize = 32_000;
const HEADS: usize = 12;
const KV_HEADS: usize = 4;
const INTERMEDIATE: usize = 2048;
const RANK: usize = 32;
const INVOCATION: [u32; 3] = [7, 8, 9];

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn randn(shape: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
    Ok((Tensor::randn(0f32, 1f32, shape, dev)? * std)?)
}

/// Writes the random model and two adapters with the same weights: `alora` (with an invocation
/// sequence) and `lora` (without).
pub fn write_model(dir: &Path, tokenizer_json: &Path) -> Result<()> {
    let dev = Device::Cpu;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let head_dim = HIDDEN / HEADS;
    let config = json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu"
    });
    let p = dir.join("config.json");
    std::fs::write(&p, config.to_string()).map_err(io(&p))?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), randn(&[VOCAB, HIDDEN], 0.02, &dev)?);
    t.insert("lm_head.weight".into(), randn(&[VOCAB, HIDDEN], 0.02, &dev)?);
    t.insert("model.norm.weight".into(), Tensor::ones(HIDDEN, DType::F32, &dev)?);
    let mut lora: HashMap<String, Tensor> = HashMap::new();
    for i in 0..LAYERS {
        let l = format!("model.layers.{i}");
        for (name, o, inp) in [
            ("self_attn.q_proj", HEADS * head_dim, HIDDEN),
            ("self_attn.k_proj", KV_HEADS * head_dim, HIDDEN),
            ("self_attn.v_proj", KV_HEADS * head_dim, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * head_dim),
            ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
            ("mlp.up_proj", INTERMEDIATE, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTERMEDIATE),
        ] {
            t.insert(format!("{l}.{name}.weight"), randn(&[o, inp], 0.02, &dev)?);
            if name.starts_with("self_attn") {
                lora.insert(format!("base_model.model.{l}.{name}.lora_A.weight"), randn(&[RANK, inp], 0.02, &dev)?);
                lora.insert(format!("base_model.model.{l}.{name}.lora_B.weight"), randn(&[o, RANK], 0.02, &dev)?);
            }
        }
        t.insert(format!("{l}.input_layernorm.weight"), Tensor::ones(HIDDEN, DType::F32, &dev)?);
        t.insert(format!("{l}.post_attention_layernorm.weight"), Tensor::ones(HIDDEN, DType::F32, &dev)?);
    }
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &p)?;
    let p = dir.join("tokenizer.json");
    std::fs::copy(tokenizer_json, &p).map_err(io(&p))?;
    for (name, invocation) in [("alora", Some(INVOCATION.to_vec())), ("lora", None)] {
        let a = dir.join("adapters").join(name);
        std::fs::create_dir_all(&a).map_err(io(&a))?;
        let mut cfg = json!({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "task_type": "CAUSAL_LM",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]});
        if let Some(inv) = invocation {
            cfg["alora_invocation_tokens"] = json!(inv);
        }
        let p = a.join("adapter_config.json");
        std::fs::write(&p, cfg.to_string()).map_err(io(&p))?;
        candle_core::safetensors::save(&lora, a.join("adapter_model.safetensors"))?;
    }
    Ok(())
}

fn prefix_tokens(n: usize) -> Vec<u32> {
    let mut x = 42u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            10 + ((x >> 33) % (VOCAB as u64 - 10)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark for each prefix length; `iters` timings per figure (median).
pub fn run(repo: &Path, prefixes: &[usize], iters: usize) -> Result<Vec<LlmRow>> {
    let dir = repo.join("target/bench/llm-mid");
    if !dir.join("adapters/lora/adapter_model.safetensors").exists() {
        write_model(&dir, &repo.join("tests/fixtures/llm/llama/tokenizer.json"))?;
    }
    let mut s = LlmSession::load_dir(&dir, &Device::Cpu)?;
    let alora = s.add_adapter(&dir.join("adapters/alora"), None)?.name.clone();
    let lora = s.add_adapter(&dir.join("adapters/lora"), None)?.name.clone();
    let (ia, il) = (s.adapter_index(&alora).unwrap_or(0), s.adapter_index(&lora).unwrap_or(1));
    let opts = GenerateOptions { max_new_tokens: 1, ..Default::default() };
    let mut rows = vec![];
    for &n in prefixes {
        let prefix = prefix_tokens(n);
        let mut conv = s.conversation(&prefix);
        let t0 = Instant::now();
        s.prefill(&mut conv)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let (mut ta, mut tl) = (vec![], vec![]);
        let (mut ca, mut cl) = (0, 0);
        for _ in 0..iters {
            let t0 = Instant::now();
            let r = s.reply(&mut conv, &INVOCATION, &[ia], &opts, &mut |_, _| true)?;
            ta.push(t0.elapsed().as_secs_f64());
            ca = r.computed_positions;
            // A standard LoRA cannot use the base cache: a fresh conversation is re-prefilled.
            let mut fresh = s.conversation(&prefix);
            let t0 = Instant::now();
            let r = s.reply(&mut fresh, &INVOCATION, &[il], &opts, &mut |_, _| true)?;
            tl.push(t0.elapsed().as_secs_f64());
            cl = r.computed_positions;
        }
        rows.push(LlmRow { prefix: n, alora_s: median(ta), lora_s: median(tl), alora_computed: ca, lora_computed: cl, prefill_s });
    }
    Ok(rows)
}

pub fn table(rows: &[LlmRow], threads: usize) -> String {
    let mut s = format!(
        "| prefix tokens (Llama arch, {HIDDEN} hidden, {LAYERS} layers, f32, CPU, {threads} threads) | aLoRA TTFT (cache reuse) | LoRA TTFT (re-prefill) | LoRA / aLoRA | positions computed aLoRA / LoRA | base prefill of the conversation |\n|---|---|---|---|---|---|\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.4} s | {:.3} s | {:.0}x | {} / {} | {:.3} s |\n",
            r.prefix,
            r.alora_s,
            r.lora_s,
            r.lora_s / r.alora_s,
            r.alora_computed,
            r.lora_computed,
            r.prefill_s
        ));
    }
    s
}
