//! A1111 prompt handling (emphasis, BREAK, chunking with comma backtrack) against
//! tools/parity/make_prompt_fixtures.py, a line-by-line re-implementation of A1111 on the
//! tiny2 pipeline's transformers encoders.

mod common;

use candle_core::Device;
use common::*;
use loramix::sdxl::prompt::{chunk_prompt, parse_attention, Fragment};
use loramix::{LoadOptions, SdxlPipeline};
use serde_json::Value;

#[test]
fn a1111_chunks_fragments_and_embeddings() {
    let dir = fixture("tiny2");
    let pipe = SdxlPipeline::load(dir.join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("a1111_prompts.json")).unwrap()).unwrap();
    let g = candle_core::safetensors::load(dir.join("a1111_prompts.safetensors"), &Device::Cpu).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let frags = parse_attention(prompt);
        let want = case["fragments"].as_array().unwrap();
        assert_eq!(frags.len(), want.len(), "fragments of {prompt:?}: {frags:?}");
        for (f, w) in frags.iter().zip(want) {
            match f {
                Fragment::Break => assert_eq!(w[1].as_f64(), Some(-1.0)),
                Fragment::Text(t, x) => {
                    assert_eq!(t, w[0].as_str().unwrap(), "{prompt:?}");
                    assert!((x - w[1].as_f64().unwrap()).abs() < 1e-12, "{prompt:?}: {frags:?}");
                }
            }
        }
        for (tok, key) in [(&pipe.text().unwrap().tokenizer, "chunks_1"), (pipe.text().unwrap().tokenizer_2.as_ref().unwrap(), "chunks_2")] {
            let ours: Vec<Vec<u32>> = chunk_prompt(tok, prompt).unwrap().into_iter().map(|c| c.ids).collect();
            let want: Vec<Vec<u32>> = serde_json::from_value(case[key].clone()).unwrap();
            assert_eq!(ours, want, "{key} of {prompt:?}");
        }
        let c = pipe.text().unwrap().encode(prompt).unwrap();
        assert_close(&format!("a1111 context {prompt:?}"), &c.context.squeeze(0).unwrap(), &g[&format!("p{i}.context")], 1e-4);
        assert_close(&format!("a1111 pooled {prompt:?}"), &c.pooled.unwrap().squeeze(0).unwrap(), &g[&format!("p{i}.pooled")], 1e-4);
    }
}

/// A longer negative than positive prompt: the positive is padded with empty-prompt chunks
/// so both can be batched (A1111's pad_cond_uncond), and a zero negative pads with zeros.
#[test]
fn cond_and_uncond_lengths_are_matched() {
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let long = " ".join_words(90);
    let (pos, neg) = pipe.encode_prompts("a cat", Some(&long), true).unwrap();
    let neg = neg.unwrap();
    let chunks = chunk_prompt(&pipe.text().unwrap().tokenizer, &long).unwrap().len();
    assert!(chunks >= 2);
    assert_eq!(neg.context.dims(), &[1, 77 * chunks, 64]);
    assert_eq!(pos.context.dims(), &[1, 77 * chunks, 64]);
    let empty = pipe.text().unwrap().encode("").unwrap().context;
    let tail = pos.context.narrow(1, 77, 77).unwrap();
    assert!(rel_l2(&tail, &empty) < 1e-7, "padding is the empty-prompt encoding");
    let (pos, neg) = pipe.encode_prompts(&long, None, true).unwrap();
    assert_eq!(neg.unwrap().context.dims(), pos.context.dims());
}

trait JoinWords {
    fn join_words(&self, n: usize) -> String;
}
impl JoinWords for str {
    fn join_words(&self, n: usize) -> String {
        vec!["mountain"; n].join(self)
    }
}

/// Prompt editing changes the conditioning at A1111's step: `[X:Y:0]` is Y throughout, a when
/// past the end is X throughout, a switch half-way is neither, and the negative prompt is
/// scheduled too. An edit left open is a clear error.
#[test]
fn prompt_editing_switches_conditioning_at_the_step() {
    let dir = fixture("tiny2");
    let pipe = SdxlPipeline::load(dir.join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let run = |prompt: &str, negative: Option<&str>| {
        let req = loramix::GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: negative.map(str::to_string),
            steps: 6,
            cfg: 5.0,
            sampler: Some("euler".parse().unwrap()),
            seed: 4,
            width: Some(32),
            height: Some(32),
            ..Default::default()
        };
        pipe.generate_latents(&req, &mut |_| true)
    };
    let x = run("a photo of a cat", None).unwrap();
    let y = run("a red house", None).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| rel_l2(a, b);
    assert_eq!(diff(&run("[a photo of a cat:a red house:0]", None).unwrap(), &y), 0.0);
    assert_eq!(diff(&run("[a photo of a cat:a red house:50]", None).unwrap(), &x), 0.0);
    let mid = run("[a photo of a cat:a red house:0.5]", None).unwrap();
    assert!(diff(&mid, &x) > 1e-3 && diff(&mid, &y) > 1e-3);
    let alt = run("[a photo of a cat|a red house]", None).unwrap();
    assert!(diff(&alt, &x) > 1e-3 && diff(&alt, &y) > 1e-3 && diff(&alt, &mid) > 1e-4);
    // The negative prompt: scheduled to switch at once equals its second text.
    assert_eq!(diff(&run("a cat", Some("[blurry:ugly:0]")).unwrap(), &run("a cat", Some("ugly")).unwrap()), 0.0);
    let e = run("a [cat:dog:3", None).unwrap_err().to_string();
    assert!(e.contains("never closed"), "{e}");
}
