//! LLM engine and activated LoRA against transformers + PEFT goldens
//! (tools/parity/make_llm_fixtures.py): tiny random Llama (llama3 RoPE scaling, GQA, no chat
//! template), Granite (multipliers, tied head, q/k/v/o bias, one kv head) and Qwen2 (q/k/v bias)
//! with random LoRA and aLoRA adapters.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::assert_close;
use loramix::llm::{AdapterKind, GenerateOptions, LlmSession};
use serde_json::Value;

const MODELS: [&str; 3] = ["llama", "granite", "qwen2"];

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm").join(model)
}

fn goldens(model: &str) -> (Value, std::collections::HashMap<String, Tensor>) {
    let d = dir(model);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(d.join("goldens.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(d.join("goldens.safetensors"), &Device::Cpu).unwrap();
    (json, t)
}

/// The model with every adapter of its fixture loaded (in folder-name order).
fn session(model: &str) -> LlmSession {
    let d = dir(model);
    let mut s = LlmSession::load_dir(&d, &Device::Cpu).unwrap();
    let mut names: Vec<PathBuf> = std::fs::read_dir(d.join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    names.sort();
    for p in names {
        s.add_adapter(&p, None).unwrap();
    }
    s
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn enabled(s: &LlmSession, adapter: &Value) -> Vec<usize> {
    adapter.as_str().map(|n| vec![s.adapter_index(n).unwrap()]).unwrap_or_default()
}

/// Logits at every position, invocation at the end / in the middle / twice / absent, equal PEFT.
#[test]
fn logits_equal_peft() {
    for model in MODELS {
        let s = session(model);
        let (json, t) = goldens(model);
        for case in json["cases"].as_array().unwrap() {
            let input = ids(&case["ids"]);
            let ours = s.logits_all(&input, &enabled(&s, &case["adapter"])).unwrap();
            let ours = Tensor::new(ours, &Device::Cpu).unwrap();
            let key = case["logits"].as_str().unwrap();
            assert_close(&format!("{model} {key}"), &ours, &t[key], 1e-4);
        }
    }
}

/// Greedy generation through the cached path (base prefill of the conversation, fork at the
/// invocation, then one token at a time) equals PEFT's generate token for token.
#[test]
fn greedy_generation_equals_peft() {
    for model in MODELS {
        let s = session(model);
        let (json, _) = goldens(model);
        for g in json["generations"].as_array().unwrap() {
            let input = ids(&g["ids"]);
            let want = ids(&g["tokens"]);
            let en = enabled(&s, &g["adapter"]);
            // Once with a warm conversation cache (what the app does), once cold.
            for warm in [true, false] {
                let mut conv = s.conversation(&input);
                if warm {
                    s.prefill(&mut conv).unwrap();
                }
                let opts = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
                let r = s.reply(&mut conv, &[], &en, &opts, &mut |_, _| true).unwrap();
                // transformers stops at EOS; we include it too.
                assert_eq!(r.tokens, want, "{model} adapter {} ids {input:?} warm={warm}", g["adapter"]);
            }
        }
    }
}

/// The legacy `invocation_string` is tokenized to the ids PEFT needs.
#[test]
fn legacy_invocation_string_is_tokenized() {
    let s = session("llama");
    let legacy = &s.adapters()[s.adapter_index("legacy").unwrap()];
    let rewrite = &s.adapters()[s.adapter_index("rewrite").unwrap()];
    assert!(matches!(legacy.kind, AdapterKind::Activated { .. }));
    assert_eq!(legacy.invocation(), rewrite.invocation());
    assert_eq!(s.adapters()[s.adapter_index("lora").unwrap()].kind, AdapterKind::Lora);
}

fn loramix() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loramix"))
}

/// `loramix chat --json`: the prompt tokens (chat template or raw text, plus the invocation)
/// and greedy tokens equal transformers + PEFT.
#[test]
fn chat_cli_equals_peft() {
    for model in MODELS {
        let (json, _) = goldens(model);
        for c in json["cli"].as_array().unwrap() {
            let mut cmd = loramix();
            cmd.args(["chat", "--model"]).arg(dir(model)).args(["--prompt", c["prompt"].as_str().unwrap()]);
            cmd.args(["--max-new-tokens", "10", "--temperature", "0", "--json"]);
            for a in c["adapters"].as_array().unwrap() {
                cmd.arg("--adapter").arg(dir(model).join("adapters").join(a.as_str().unwrap()));
            }
            if let Some(n) = c["invoke"].as_str() {
                cmd.args(["--invoke", n]);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(ids(&v["prompt_tokens"]), ids(&c["prompt_tokens"]), "{model} invoke {}", c["invoke"]);
            assert_eq!(ids(&v["tokens"]), ids(&c["tokens"]), "{model} invoke {}", c["invoke"]);
            assert_eq!(v["text"], c["text"], "{model} invoke {}", c["invoke"]);
            let plen = c["prompt_tokens"].as_array().unwrap().len();
            let glen = c["tokens"].as_array().unwrap().len();
            let computed = v["computed_positions"].as_u64().unwrap() as usize;
            let reused = v["reused_positions"].as_u64().unwrap() as usize;
            if c["invoke"].is_string() {
                // Only the invocation and the generated tokens (the last one is never fed back) ran.
                let inv = plen - reused;
                assert!(inv > 0 && inv <= 10, "{model}: reused {reused} of {plen}");
                assert_eq!(computed, inv + glen - 1, "{model}");
            }
        }
    }
}

/// After a 512-token conversation, invoking two aLoRAs in turn runs the model over only the
/// new positions, shares the conversation's cache, and gives exactly what a full recompute gives.
#[test]
fn invoking_two_aloras_reuses_the_conversation_cache() {
    let s = session("granite");
    let vocab = s.config().vocab_size as u32;
    let eos = s.eos_tokens().to_vec();
    // A deterministic 512-token conversation that avoids the stop token.
    let mut x = 12345u32;
    let convo: Vec<u32> = (0..512)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let mut t = (x >> 8) % vocab;
            if eos.contains(&t) {
                t = (t + 1) % vocab;
            }
            t
        })
        .collect();
    let mut conv = s.conversation(&convo);
    assert_eq!(s.prefill(&mut conv).unwrap(), 512);
    let blocks_before = conv.cache().block_count();
    for name in ["certainty", "rewrite"] {
        let i = s.adapter_index(name).unwrap();
        let inv = s.adapters()[i].invocation().unwrap().to_vec();
        let opts = GenerateOptions { max_new_tokens: 6, stop_tokens: vec![], ..Default::default() };
        let mut seen = 0;
        let r = s.reply(&mut conv, &inv, &[i], &opts, &mut |_, _| {
            seen += 1;
            true
        })
        .unwrap();
        assert_eq!(seen, r.tokens.len());
        assert_eq!(r.reused_positions, 512, "{name}");
        let fed = r.tokens.len() - 1;
        assert_eq!(r.computed_positions, inv.len() + fed, "{name}: only the invocation and generated tokens run");
        // The conversation cache is untouched by the reply.
        assert_eq!(conv.cached_positions(), 512);
        assert_eq!(conv.cache().block_count(), blocks_before);
        // Same tokens as recomputing everything with the adapter (PEFT's single forward).
        let mut full = convo.clone();
        full.extend_from_slice(&inv);
        let mut want = vec![];
        for _ in 0..r.tokens.len() {
            let logits = s.logits_all(&full, &[i]).unwrap();
            let t = loramix_models::llm::argmax(logits.last().unwrap());
            want.push(t);
            full.push(t);
        }
        assert_eq!(r.tokens, want, "{name}");
    }
}

/// Forks share storage: the fork's first block is the parent's.
#[test]
fn fork_shares_the_prefix() {
    let s = session("qwen2");
    let mut conv = s.conversation(&(0..300).map(|i| (i % 200) as u32 + 10).collect::<Vec<_>>());
    s.prefill(&mut conv).unwrap();
    let fork = conv.cache().fork(290).unwrap();
    assert!(fork.shares_prefix_with(conv.cache()));
    assert_eq!(fork.len(), 290);
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn chat_error(model: &str, adapter: &Path, extra: &[&str]) -> String {
    let out = loramix()
        .args(["chat", "--model"])
        .arg(dir(model))
        .arg("--adapter")
        .arg(adapter)
        .args(["--prompt", "hello", "--max-new-tokens", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bad adapters are refused with a message that names the file and what was expected.
#[test]
fn bad_adapters_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir("llama").join("adapters/certainty");
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        common::copy_dir(&src, &d);
        d
    };
    // No config.
    let d = tmp.path().join("empty");
    std::fs::create_dir_all(&d).unwrap();
    assert!(chat_error("llama", &d, &[]).contains("adapter_config.json is missing"));
    // A pickle instead of safetensors.
    let d = copy("pickle");
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = chat_error("llama", &d, &[]);
    assert!(e.contains("adapter_model.bin") && e.contains("pickle"), "{e}");
    // DoRA.
    let d = copy("dora");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    write(&d.join("adapter_config.json"), &cfg);
    assert!(chat_error("llama", &d, &[]).contains("DoRA"));
    // For a bigger model: shapes do not fit.
    let e = chat_error("granite", &dir("llama").join("adapters/lora"), &[]);
    assert!(e.contains("do not fit") || e.contains("not a linear"), "{e}");
    // Unknown adapter name for --invoke.
    let e = chat_error("llama", &src, &["--invoke", "nope"]);
    assert!(e.contains("--invoke nope") && e.contains("certainty"), "{e}");
    // --invoke a standard LoRA.
    let e = chat_error("llama", &dir("llama").join("adapters/lora"), &["--invoke", "lora"]);
    assert!(e.contains("no invocation sequence"), "{e}");
}
