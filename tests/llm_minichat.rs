//! The shipped LLM (models/minichat) and its adapters: the same greedy tokens as transformers +
//! PEFT (goldens: tools/parity/make_llm_mixer_fixtures.py), and the mixer / ChameleonLLM files
//! round-tripping and refusing what does not fit.

use std::path::{Path, PathBuf};

use candle_core::Device;
use loramix::llm::chameleon::{answer_batch, train_hypernetwork_folder, ChameleonTrainOptions};
use loramix::llm::data::{read_examples, read_prompts};
use loramix::llm::mixer::{train_router_folder, MixerTrainOptions};
use loramix::llm::{GenerateOptions, LlmSession, MIXER};

const MODEL: &str = "models/minichat";

fn session() -> LlmSession {
    LlmSession::load(MODEL, &Device::Cpu).unwrap()
}

#[test]
fn shipped_model_and_adapters_match_transformers_peft_greedy() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/llm/mixer/minichat_greedy.json").unwrap()).unwrap();
    let opts = GenerateOptions { max_new_tokens: 40, ..Default::default() };
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap() {
        let mut s = session();
        let mut enabled = vec![];
        if let Some(a) = case["adapter"].as_str() {
            s.add_adapter(&Path::new(MODEL).join(a), None).unwrap();
            enabled.push(0);
        }
        let ids = s.encode_prompt(case["prompt"].as_str().unwrap(), true).unwrap();
        let want_ids: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want_ids, "prompt tokens of {case}");
        let mut conv = s.conversation(&ids);
        let r = s.reply(&mut conv, &[], &enabled, &opts, &mut |_, _| true).unwrap();
        let want: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(r.tokens, want, "greedy tokens with {:?} on {:?}", case["adapter"], case["prompt"]);
        checked += 1;
    }
    assert!(checked >= 20);
}

fn tiny_data(dir: &Path) -> PathBuf {
    let p = dir.join("mixed.jsonl");
    let rows: Vec<String> = std::fs::read_to_string(Path::new(MODEL).join("data/mixed_train.jsonl")).unwrap().lines().take(24).map(String::from).collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

#[test]
fn mixer_trains_saves_loads_and_refuses_what_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_data(tmp.path());
    let out = tmp.path().join("router");
    let experts: Vec<PathBuf> = ["name", "negative"].iter().map(|t| Path::new(MODEL).join("adapters").join(t)).collect();
    let mut s = session();
    let opts = MixerTrainOptions { samples: 16, epochs: 1, batch: 8, top_k: 1, ..Default::default() };
    let r = train_router_folder(&mut s, &experts, &data, &out, &opts, &mut |_| true).unwrap();
    assert_eq!((r.steps, r.experts.len(), r.activated), (2, 2, false));
    let ids = s.encode_prompt("negative prompt for: a krin emblem on a pink background, painted style", true).unwrap();
    let before = s.logits_all(&ids, &[MIXER]).unwrap();
    // A fresh session loads the router and its experts from the folder: same logits.
    let mut t = session();
    t.load_mixer(&out).unwrap();
    assert_eq!(t.adapters().len(), 2);
    let after = t.logits_all(&ids, &[MIXER]).unwrap();
    let diff = before.iter().flatten().zip(after.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
    // Another model.
    let mut other = LlmSession::load("tests/fixtures/llm/llama", &Device::Cpu).unwrap();
    let e = other.load_mixer(&out).unwrap_err().to_string();
    assert!(e.contains("mixer.json") && e.contains("another model"), "{e}");
    // Another set of adapters: an expert of the same name with other weights.
    let mut u = session();
    u.add_adapter(&Path::new(MODEL).join("adapters/prompt"), Some("name")).unwrap();
    let e = u.load_mixer(&out).unwrap_err().to_string();
    assert!(e.contains("another set of adapters") && e.contains("\"name\""), "{e}");
    // Activated experts make an activated mixer that reuses the prefix's cache.
    let aloras: Vec<PathBuf> = ["name", "negative"].iter().map(|t| Path::new(MODEL).join("aloras").join(t)).collect();
    let mut a = session();
    let out2 = tmp.path().join("router2");
    let r = train_router_folder(&mut a, &aloras, &data, &out2, &opts, &mut |_| true).unwrap();
    assert!(r.activated);
    let mut conv = a.conversation(&ids);
    a.prefill(&mut conv).unwrap();
    let rep = a.reply(&mut conv, &[], &[MIXER], &GenerateOptions { max_new_tokens: 4, ..Default::default() }, &mut |_, _| true).unwrap();
    // Everything before the invocation ("<|assistant|>\n", the last two prompt tokens) is reused.
    assert_eq!(rep.reused_positions, ids.len() - 2);
}

#[test]
fn chameleon_trains_answers_batches_and_refuses_what_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_data(tmp.path());
    let out = tmp.path().join("hyper");
    let mut s = session();
    let opts = ChameleonTrainOptions { epochs: 1, batch: 8, ..Default::default() };
    let r = train_hypernetwork_folder(&s, &data, &out, &opts, &mut |_| true).unwrap();
    assert_eq!(r.examples, 24);
    let prompts_path = tmp.path().join("p.jsonl");
    std::fs::write(&prompts_path, "{\"prompt\": \"negative prompt for: a krin emblem on a pink background, painted style\"}\n\"what are the trigger words of vlox?\"\n{\"prompt\": \"hello\"}\n").unwrap();
    let prompts = read_prompts(&prompts_path).unwrap();
    let (spec, net) = s.load_chameleon(&out).unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let answers = answer_batch(&mut s, &prompts, Some((&spec, &net)), Some(2), &opts, &mut |_, _| true).unwrap();
    assert_eq!(answers.iter().map(|a| a.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(answers.iter().all(|a| a.cluster < 2));
    assert_eq!(s.adapters().len(), 0, "the per-cluster head adapters are removed");
    // A hypernetwork for another model's shapes.
    let other = LlmSession::load("tests/fixtures/llm/llama", &Device::Cpu).unwrap();
    let e = other.load_chameleon(&out).unwrap_err().to_string();
    assert!(e.contains("chameleon.json") && e.contains("do not fit"), "{e}");
    // Empty batch, malformed line.
    std::fs::write(&prompts_path, "\n").unwrap();
    assert!(read_prompts(&prompts_path).unwrap_err().to_string().contains("empty batch"));
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\" \"completion\": \"b\"}\n").unwrap();
    let e = read_examples(&data).unwrap_err().to_string();
    assert!(e.contains("mixed.jsonl") && e.contains("line 2"), "{e}");
}
