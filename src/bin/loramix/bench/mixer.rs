//! `loramix bench --suite mixer`: LoRA-Mixer in plug-and-play mode on the shipped LLM
//! (models/minichat). Four task LoRAs are frozen experts; routers are trained on the mixed
//! training file and every configuration answers the same mixed test set (no task labels at
//! inference; the labels only score the answers and the routing). Exact match of the greedy
//! answer is the accuracy.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loramix::error::{Error, Result};
use loramix::llm::data::read_examples;
use loramix::llm::mixer::MixerTrainOptions;
use loramix::llm::{GenerateOptions, LlmSession, RouterInput, MIXER};

pub const TASKS: [&str; 4] = ["prompt", "name", "negative", "trigger"];

pub struct Row {
    pub name: String,
    pub accuracy: f64,
    pub per_task: Vec<f64>,
    pub purity: Option<f64>,
    pub note: String,
}

pub struct Report {
    pub rows: Vec<Row>,
    pub curve: Vec<(usize, f64, f64)>,
    pub ablation: Vec<(String, f64, f64)>,
    pub speed: (f64, f64),
    pub activated: Option<(f64, f64, f64)>,
    pub test_n: usize,
    pub train_seconds: f64,
}

struct TestCase {
    prompt: String,
    answer: String,
    task: usize,
}

fn test_set(path: &Path) -> Result<Vec<TestCase>> {
    let lines = read_examples(path)?;
    lines
        .into_iter()
        .map(|l| {
            let task = l.raw.get("task").and_then(|t| t.as_str()).and_then(|t| TASKS.iter().position(|x| *x == t)).ok_or_else(|| {
                Error::BadFile { path: path.to_path_buf(), message: format!("line {}: a \"task\" field (one of {TASKS:?}) is needed to score", l.line) }
            })?;
            match l.value {
                loramix::llm::data::Example::Chat { prompt, completion } => Ok(TestCase { prompt, answer: completion, task }),
                _ => Err(Error::BadFile { path: path.to_path_buf(), message: format!("line {}: expected prompt + completion", l.line) }),
            }
        })
        .collect()
}

/// Accuracy (overall, per task) and, with a mixer, the share of top-1 routing decisions that
/// pick the example's own task expert.
fn evaluate(s: &LlmSession, tests: &[TestCase], enabled: &dyn Fn(usize) -> Vec<usize>, expert_of_task: Option<&[usize]>) -> Result<Row> {
    let opts = GenerateOptions { max_new_tokens: 48, ..Default::default() };
    let (mut ok, mut per_ok, mut per_n) = (0usize, [0usize; 4], [0usize; 4]);
    let (mut pure, mut decisions) = (0f64, 0f64);
    for t in tests {
        let ids = s.encode_prompt(&t.prompt, true)?;
        let mut conv = s.conversation(&ids);
        let _ = s.take_routing_trace();
        let r = s.reply(&mut conv, &[], &enabled(t.task), &opts, &mut |_, _| true)?;
        let right = r.text.trim() == t.answer;
        ok += right as usize;
        per_ok[t.task] += right as usize;
        per_n[t.task] += 1;
        if let Some(map) = expert_of_task {
            let want = map[t.task];
            for p in s.take_routing_trace() {
                for row in p.to_dtype(DType::F32)?.to_vec2::<f32>()? {
                    pure += (loramix_models::llm::argmax(&row) as usize == want) as usize as f64;
                    decisions += 1.0;
                }
            }
        }
    }
    Ok(Row {
        name: String::new(),
        accuracy: ok as f64 / tests.len().max(1) as f64,
        per_task: (0..4).map(|k| per_ok[k] as f64 / per_n[k].max(1) as f64).collect(),
        purity: (decisions > 0.0).then_some(pure / decisions),
        note: String::new(),
    })
}

fn named(mut r: Row, name: &str, note: &str) -> Row {
    r.name = name.into();
    r.note = note.into();
    r
}

#[derive(Clone, Copy)]
struct Variant {
    input: RouterInput,
    supervision: f64,
    lambda: f64,
}

const OURS: Variant = Variant { input: RouterInput::PromptMean, supervision: 1.0, lambda: 0.01 };

fn train(s: &mut LlmSession, experts: &[usize], examples: &[loramix::llm::mixer::TokenizedExample], samples: usize, v: Variant) -> Result<f64> {
    let opts = MixerTrainOptions { samples, lambda: v.lambda, input: v.input, supervision: v.supervision, top_k: 2, ..Default::default() };
    let t0 = Instant::now();
    s.train_mixer(experts, examples, &opts, &mut |_| true)?;
    Ok(t0.elapsed().as_secs_f64())
}

fn tokens_per_second(s: &LlmSession, prompts: &[&str], enabled: &[usize]) -> Result<f64> {
    let opts = GenerateOptions { max_new_tokens: 48, stop_tokens: vec![], ..Default::default() };
    let (mut n, t0) = (0usize, Instant::now());
    for p in prompts {
        let ids = s.encode_prompt(p, true)?;
        let mut conv = s.conversation(&ids);
        n += s.reply(&mut conv, &[], enabled, &opts, &mut |_, _| true)?.tokens.len();
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// models/minichat with its four task LoRAs loaded as experts (from `folder`).
fn with_experts(root: &Path, folder: &str) -> Result<(LlmSession, Vec<usize>)> {
    let mut s = LlmSession::load(&root.to_string_lossy(), &Device::Cpu)?;
    let mut experts = vec![];
    for t in TASKS {
        s.add_adapter(&root.join(folder).join(t), None)?;
        experts.push(s.adapters().len() - 1);
    }
    Ok((s, experts))
}

/// Router weights of `width(in)` columns for every routed linear, from `fill`.
fn routers(s: &mut LlmSession, experts: &[usize], width: usize, fill: &dyn Fn(usize, usize) -> Result<Tensor>) -> Result<HashMap<String, Tensor>> {
    s.routed_modules(experts).into_iter().map(|(m, inf)| Ok((m, fill(experts.len(), width * inf)?))).collect()
}

pub fn run(repo: &Path, quick: bool) -> Result<Report> {
    let root = repo.join("models/minichat");
    let dev = Device::Cpu;
    let (mut s, experts) = with_experts(&root, "adapters")?;
    s.add_adapter(&root.join("baselines/union"), None)?;
    let union = s.adapters().len() - 1;
    let train_path = root.join("data/mixed_train.jsonl");
    let lines = read_examples(&train_path)?;
    let examples = lines.iter().map(|l| s.tokenize_example(l, &train_path)).collect::<Result<Vec<_>>>()?;
    let mut tests = test_set(&root.join("data/mixed_test.jsonl"))?;
    tests.truncate(if quick { 60 } else { 200 });
    let mut rows = vec![];
    rows.push(named(evaluate(&s, &tests, &|_| vec![], None)?, "base model", ""));
    rows.push(named(evaluate(&s, &tests, &|t| vec![experts[t]], None)?, "oracle (the task's own LoRA)", "uses the task label"));
    rows.push(named(evaluate(&s, &tests, &|_| vec![union], None)?, "one LoRA trained on the union", "trained on all four tasks"));
    let zeros = routers(&mut s, &experts, 1, &|e, w| Ok(Tensor::zeros((e, w), DType::F32, &dev)?))?;
    s.set_mixer(&experts, &zeros, 0)?;
    rows.push(named(evaluate(&s, &tests, &|_| vec![MIXER], None)?, "uniform average of the 4 experts", "router weights all zero, soft"));
    let full = if quick { 200 } else { 2000 };
    let names: Vec<String> = TASKS.iter().map(|t| t.to_string()).collect();
    let label = |exs: &mut Vec<loramix::llm::mixer::TokenizedExample>| {
        for (e, l) in exs.iter_mut().zip(&lines) {
            e.expert = loramix::llm::mixer::expert_label(&l.raw, &names);
        }
    };
    let mut examples = examples;
    label(&mut examples);
    let all = Some(&[0usize, 1, 2, 3][..]);
    // The paper's router (the token's own input), plain plug-and-play objective.
    train(&mut s, &experts, &examples, full, Variant { input: RouterInput::Token, supervision: 0.0, lambda: 0.01 })?;
    for (k, label) in [(2usize, "paper's router (token input), top-2"), (0, "paper's router (token input), soft")] {
        s.set_mixer_top_k(k)?;
        rows.push(named(evaluate(&s, &tests, &|_| vec![MIXER], all)?, label, &format!("{full} samples, no labels")));
    }
    train(&mut s, &experts, &examples, full, Variant { input: RouterInput::CausalMean, supervision: 0.0, lambda: 0.01 })?;
    for (k, label) in [(2usize, "causal-mean router, top-2"), (0, "causal-mean router, soft")] {
        s.set_mixer_top_k(k)?;
        rows.push(named(evaluate(&s, &tests, &|_| vec![MIXER], all)?, label, &format!("{full} samples, no labels")));
    }
    train(&mut s, &experts, &examples, full, Variant { input: RouterInput::CausalMean, ..OURS })?;
    for (k, label) in [(1usize, "causal-mean + routing supervision, top-1"), (2, "causal-mean + routing supervision, top-2")] {
        s.set_mixer_top_k(k)?;
        rows.push(named(evaluate(&s, &tests, &|_| vec![MIXER], all)?, label, &format!("{full} samples with task labels (training only)")));
    }
    train(&mut s, &experts, &examples, full, Variant { supervision: 0.0, ..OURS })?;
    s.set_mixer_top_k(2)?;
    rows.push(named(evaluate(&s, &tests, &|_| vec![MIXER], all)?, "prompt-mean router, top-2", &format!("{full} samples, no labels")));
    let train_seconds = train(&mut s, &experts, &examples, full, OURS)?;
    let mut at_full = (0.0, 0.0);
    for (k, label) in [(1usize, "prompt-mean + routing supervision, top-1"), (2, "prompt-mean + routing supervision, top-2"), (0, "prompt-mean + routing supervision, soft")] {
        s.set_mixer_top_k(k)?;
        let r = evaluate(&s, &tests, &|_| vec![MIXER], all)?;
        if k == 2 {
            at_full = (r.accuracy, r.purity.unwrap_or(0.0));
        }
        rows.push(named(r, label, &format!("{full} samples with task labels (training only)")));
    }
    // tokens/s: top-2 mixer against one unmerged LoRA, same prompts, 48 new tokens each.
    s.set_mixer_top_k(2)?;
    let prompts: Vec<&str> = tests.iter().take(12).map(|t| t.prompt.as_str()).collect();
    let one = tokens_per_second(&s, &prompts, &[experts[0]])?;
    let mixed = tokens_per_second(&s, &prompts, &[MIXER])?;
    let mut curve = vec![];
    let sizes: &[usize] = if quick { &[100] } else { &[250, 500, 1000] };
    for &n in sizes {
        train(&mut s, &experts, &examples, n, OURS)?;
        let r = evaluate(&s, &tests, &|_| vec![MIXER], all)?;
        curve.push((n, r.accuracy, r.purity.unwrap_or(0.0)));
    }
    curve.push((full, at_full.0, at_full.1));
    let mut ablation = vec![];
    train(&mut s, &experts, &examples, full, Variant { lambda: 0.0, ..OURS })?;
    let r = evaluate(&s, &tests, &|_| vec![MIXER], all)?;
    ablation.push(("λ = 0 (α = 0.01)".to_string(), r.accuracy, r.purity.unwrap_or(0.0)));
    ablation.push(("λ = 0.01 (α = 0.01), as above".to_string(), at_full.0, at_full.1));
    // The activated mixer: aLoRA experts invoked by the assistant turn's opening, in a session
    // of their own (the experts carry the task names, as the labels do).
    let (mut s, aloras) = with_experts(&root, "aloras")?;
    let mut examples = lines.iter().map(|l| s.tokenize_example(l, &train_path)).collect::<Result<Vec<_>>>()?;
    label(&mut examples);
    train(&mut s, &aloras, &examples, full, OURS)?;
    s.set_mixer_top_k(2)?;
    let r = evaluate(&s, &tests, &|_| vec![MIXER], all)?;
    // Cache reuse: the conversation is prefilled by the base model, then the mixer replies.
    let opts = GenerateOptions { max_new_tokens: 48, ..Default::default() };
    let (mut reused, mut total) = (0usize, 0usize);
    for t in tests.iter().take(40) {
        let ids = s.encode_prompt(&t.prompt, true)?;
        let mut conv = s.conversation(&ids);
        s.prefill(&mut conv)?;
        let rep = s.reply(&mut conv, &[], &[MIXER], &opts, &mut |_, _| true)?;
        reused += rep.reused_positions;
        total += ids.len();
    }
    let activated = Some((r.accuracy, r.purity.unwrap_or(0.0), reused as f64 / total.max(1) as f64));
    Ok(Report { rows, curve, ablation, speed: (one, mixed), activated, test_n: tests.len(), train_seconds })
}

pub fn table(r: &Report, threads: usize) -> String {
    let mut out = format!(
        "LoRA-Mixer on models/minichat: {} mixed test prompts (no task labels at inference), greedy exact match; {threads} CPU threads\n\n",
        r.test_n
    );
    out += "| configuration | accuracy | prompt | name | negative | trigger | top-1 purity | note |\n|---|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        out += &format!(
            "| {} | {:.3} | {} | {} |\n",
            row.name,
            row.accuracy,
            row.per_task.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" | "),
            row.purity.map_or("".into(), |p| format!("{p:.3}")) + " | " + &row.note
        );
    }
    let oracle = r.rows.iter().find(|x| x.name.starts_with("oracle")).map_or(0.0, |x| x.accuracy);
    let uniform = r.rows.iter().find(|x| x.name.starts_with("uniform")).map_or(0.0, |x| x.accuracy);
    let top1 = r.rows.iter().find(|x| x.name == "prompt-mean + routing supervision, top-1");
    let best = r.rows.iter().filter(|x| x.name.contains("router") || x.name.contains("supervision")).map(|x| x.accuracy).fold(0.0, f64::max);
    out += &format!(
        "\nbest router / oracle = {:.3} (goal ≥ 0.95); best router − uniform = {:+.1} points (goal ≥ +10); top-1 purity of the supervised prompt-mean router {:.3} (goal ≥ 0.90); its training {:.0} s\n",
        best / oracle.max(1e-9),
        (best - uniform) * 100.0,
        top1.and_then(|t| t.purity).unwrap_or(0.0),
        r.train_seconds
    );
    out += "\ndata efficiency (prompt-mean + routing supervision):\n\n| training samples | top-2 accuracy | top-1 purity of that router |\n|---|---|---|\n";
    for (n, a, p) in &r.curve {
        out += &format!("| {n} | {a:.3} | {p:.3} |\n");
    }
    out += "\nbalance-loss ablation (prompt-mean + routing supervision, top-2):\n\n| balance term | top-2 accuracy | purity |\n|---|---|---|\n";
    for (n, a, p) in &r.ablation {
        out += &format!("| {n} | {a:.3} | {p:.3} |\n");
    }
    out += &format!(
        "\ndecode speed: one unmerged LoRA {:.1} tokens/s, mixer top-2 {:.1} tokens/s → {:.2}× slower (goal ≤ 1.5×)\n",
        r.speed.0,
        r.speed.1,
        r.speed.0 / r.speed.1.max(1e-9)
    );
    if let Some((a, p, reuse)) = r.activated {
        out += &format!(
            "activated mixer (aLoRA experts, routing from the assistant turn's opening): accuracy {a:.3}, purity {p:.3}, {:.0}% of each prompt's positions reused from the base KV cache\n",
            reuse * 100.0
        );
    }
    out
}

/// Decode speed alone (no training: router weights do not change the cost): one unmerged LoRA
/// against a top-2 causal-mean mixer over the four experts, alternating `repeats` times; medians.
pub fn speed(repo: &Path, repeats: usize) -> Result<(f64, f64)> {
    let root = repo.join("models/minichat");
    let dev = Device::Cpu;
    let (mut s, experts) = with_experts(&root, "adapters")?;
    // Causal-mean width, with a little noise so that top-2 picks vary as a trained router's do.
    let w = routers(&mut s, &experts, 2, &|e, w| Ok(Tensor::randn(0f32, 0.05, (e, w), &dev)?))?;
    s.set_mixer(&experts, &w, 2)?;
    let tests = test_set(&root.join("data/mixed_test.jsonl"))?;
    let prompts: Vec<&str> = tests.iter().take(12).map(|t| t.prompt.as_str()).collect();
    let (mut one, mut mixed) = (vec![], vec![]);
    for _ in 0..repeats.max(1) {
        one.push(tokens_per_second(&s, &prompts, &[experts[0]])?);
        mixed.push(tokens_per_second(&s, &prompts, &[MIXER])?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok((median(&mut one), median(&mut mixed)))
}
