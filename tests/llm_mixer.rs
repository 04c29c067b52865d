//! LoRA-Mixer routing and ChameleonLLM pieces against their torch / scikit-learn references
//! (goldens: tools/parity/make_llm_mixer_fixtures.py), and the mixer's file checks.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use loramix::llm::chameleon::{kmeans, HyperNetwork};
use loramix::llm::{LlmSession, RouterInput, MIXER};

const DIR: &str = "tests/fixtures/llm/mixer";

fn load(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(Path::new(DIR).join(file), &Device::Cpu).unwrap()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / n.max(1e-12)
}

#[test]
fn routed_logits_equal_torch_reimplementation() {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(DIR).join("routing.json")).unwrap()).unwrap();
    let mut s = LlmSession::load("tests/fixtures/llm/llama", &Device::Cpu).unwrap();
    let mut experts = vec![];
    for e in meta["experts"].as_array().unwrap() {
        s.add_adapter(&Path::new("tests/fixtures/llm/llama/adapters").join(e.as_str().unwrap()), None).unwrap();
        experts.push(s.adapters().len() - 1);
    }
    let routers: HashMap<String, Tensor> =
        load("routers.safetensors").into_iter().map(|(k, v)| (k.trim_end_matches(".router.weight").to_string(), v)).collect();
    let goldens = load("routing_goldens.safetensors");
    let ids: Vec<u32> = meta["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let causal: HashMap<String, Tensor> =
        load("routers_causal_mean.safetensors").into_iter().map(|(k, v)| (k.trim_end_matches(".router.weight").to_string(), v)).collect();
    for (weights, tag) in [(&routers, ""), (&causal, "causal_mean_")] {
        for k in [0usize, 1, 2] {
            s.set_mixer(&experts, weights, k).unwrap();
            let ours = Tensor::new(s.logits_all(&ids, &[MIXER]).unwrap(), &Device::Cpu).unwrap();
            let err = rel_l2(&ours, &goldens[&format!("logits_{tag}top{k}")]);
            assert!(err < 1e-4, "{tag}top-{k}: rel L2 {err}");
        }
    }
    // Token-by-token decoding carries the causal mean in the KV cache: greedy tokens of the
    // cached path equal the argmax of full recomputes.
    s.set_mixer(&experts, &causal, 2).unwrap();
    let mut conv = s.conversation(&ids);
    let opts = loramix::llm::GenerateOptions { max_new_tokens: 4, stop_tokens: vec![], ..Default::default() };
    let r = s.reply(&mut conv, &[], &[MIXER], &opts, &mut |_, _| true).unwrap();
    let mut seq = ids.clone();
    for &tok in &r.tokens {
        let l = s.logits_all(&seq, &[MIXER]).unwrap();
        assert_eq!(loramix_models::llm::argmax(l.last().unwrap()), tok);
        seq.push(tok);
    }
    // The prompt-mean router: a prefill pools the whole prompt; a prompt of 7 tokens followed by
    // its answer pools the prompt whole and the answer causally, as torch computes it.
    for k in [0usize, 1, 2] {
        s.set_mixer_as(&experts, &causal, k, Some(RouterInput::PromptMean)).unwrap();
        let ours = Tensor::new(s.logits_all(&ids, &[MIXER]).unwrap(), &Device::Cpu).unwrap();
        let err = rel_l2(&ours, &goldens[&format!("logits_prompt_mean_top{k}")]);
        assert!(err < 1e-4, "prompt-mean top-{k}: rel L2 {err}");
    }
    let split = Tensor::new(s.logits_answer(&ids, &[MIXER], 7).unwrap(), &Device::Cpu).unwrap();
    let err = rel_l2(&split, &goldens["logits_prompt_mean_split7_top2"]);
    assert!(err < 1e-4, "prompt-mean, prompt of 7: rel L2 {err}");
    let whole = &goldens["logits_prompt_mean_top2"];
    assert!(rel_l2(&split, whole) > 1e-3, "the split must differ from pooling everything");
    // Training's one-chunk forward and inference's prefill + decoding agree: each greedy token of
    // a reply to the 7-token prompt is the argmax of the training-style logits of the sequence.
    let mut conv = s.conversation(&ids[..7]);
    let r = s.reply(&mut conv, &[], &[MIXER], &opts, &mut |_, _| true).unwrap();
    let mut seq = ids[..7].to_vec();
    for &tok in &r.tokens {
        let l = s.logits_answer(&seq, &[MIXER], 7).unwrap();
        assert_eq!(loramix_models::llm::argmax(l.last().unwrap()), tok);
        seq.push(tok);
    }
    // A router missing for a module an expert adapts is refused.
    let mut partial = routers.clone();
    partial.remove("model.layers.0.mlp.down_proj");
    assert!(s.set_mixer(&experts, &partial, 1).unwrap_err().to_string().contains("model.layers.0.mlp.down_proj"));
}

#[test]
fn hypernetwork_forward_equals_torch() {
    let t = load("hypernet.safetensors");
    let layers = (0..3).map(|l| (t[&format!("layers.{l}.weight")].clone(), t[&format!("layers.{l}.bias")].clone())).collect();
    let (v, d) = t["head"].dims2().unwrap();
    let r = t["a"].dim(0).unwrap();
    let net = HyperNetwork { layers, rank: r, embed_dim: d, vocab_size: v, scale: 1.5 };
    let (a, b) = net.forward(&t["feature"]).unwrap();
    assert!(rel_l2(&a, &t["a"]) < 1e-5 && rel_l2(&b, &t["b"]) < 1e-5);
    let h = &t["hidden"];
    let logits = (h.matmul(&t["head"].t().unwrap()).unwrap() + (h.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 1.5).unwrap()).unwrap();
    assert!(rel_l2(&logits, &t["logits"]) < 1e-5);
}

#[test]
fn kmeans_equals_scikit_learn_lloyd() {
    let t = load("kmeans.safetensors");
    let pts = t["points"].to_vec2::<f32>().unwrap();
    let init = t["init"].to_vec2::<f32>().unwrap();
    let (labels, centres) = kmeans(&pts, &init, 10);
    let want: Vec<usize> = t["labels"].to_vec1::<i64>().unwrap().into_iter().map(|l| l as usize).collect();
    assert_eq!(labels, want);
    let c = Tensor::new(centres, &Device::Cpu).unwrap();
    assert!(rel_l2(&c, &t["centres"]) < 1e-5);
}
