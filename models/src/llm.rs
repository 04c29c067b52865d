//! Decoder-only LLMs of the Llama family (Llama, Mistral, Qwen2, Granite 3.x): GQA attention with
//! RoPE, RMSNorm, SwiGLU MLP. Module paths mirror transformers (`model.layers.{i}.self_attn.q_proj`),
//! so PEFT adapter keys resolve without tables.
//!
//! Two things differ from a plain port, both for activated LoRA:
//! - every linear can carry several LoRA branches, and each forward says per adapter from which
//!   position of the chunk its branch applies (`ActiveAdapter::from`), which is exactly PEFT's
//!   aLoRA mask (the last `offset` positions of a chunk);
//! - the KV cache is a list of immutable blocks, so a cache can be forked at any position by
//!   sharing the blocks before it (a narrowed view at the boundary): invoking an adapter on a
//!   conversation reuses the conversation's keys and values without copying them. Attention runs
//!   block by block over the keys and merges the scores, so the prefix is never concatenated.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, Linear, RmsNorm, VarBuilder};
use serde_json::Value;

/// The architectures we implement; they differ only in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmArch {
    Llama,
    Mistral,
    Qwen2,
    Granite,
}

/// RoPE frequency scaling as transformers' `rope_scaling` / `rope_parameters` describe it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The fields of a transformers `config.json` the forward pass uses.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub arch: LlmArch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2: always; Llama/Granite: `attention_bias`).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    /// Granite's multipliers (1.0 elsewhere); `attention_multiplier` replaces 1/√head_dim.
    pub embedding_multiplier: f64,
    pub residual_multiplier: f64,
    pub attention_scale: f64,
    pub logits_scaling: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Token ids given as one number or a list (config.json / generation_config.json).
pub fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl LlmConfig {
    /// Reads a transformers `config.json` (transformers 4 `rope_theta`/`rope_scaling` or
    /// transformers 5 `rope_parameters`). Errors name the field.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" => LlmArch::Llama,
            "mistral" => LlmArch::Mistral,
            "qwen2" => LlmArch::Qwen2,
            "granite" => LlmArch::Granite,
            other => {
                return Err(format!(
                    "model_type {other:?} is not supported (expected llama, mistral, qwen2 or granite)"
                ))
            }
        };
        let usize_of = |k: &str| -> std::result::Result<usize, String> {
            v.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| format!("field '{k}': expected a non-negative integer"))
        };
        let f64_or = |k: &str, d: f64| v.get(k).and_then(Value::as_f64).unwrap_or(d);
        let bool_or = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let hidden_size = usize_of("hidden_size")?;
        let num_attention_heads = usize_of("num_attention_heads")?;
        let num_key_value_heads = v.get("num_key_value_heads").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(num_attention_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size / num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads.max(1) != 0 {
            return Err(format!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"));
        }
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).unwrap_or_else(|| f64_or("rope_theta", 10_000.0));
        let scaling = rope.or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                let f = |k: &str| s.get(k).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling field '{k}' missing"));
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: f("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    },
                    other => return Err(format!("rope type {other:?} is not supported (expected default, linear or llama3)")),
                }
            }
        };
        let attention_bias = bool_or("attention_bias", false);
        let (qkv_bias, o_bias) = match arch {
            LlmArch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let granite = arch == LlmArch::Granite;
        let attention_scale = if granite {
            f64_or("attention_multiplier", 1.0 / (head_dim as f64).sqrt())
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        Ok(Self {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers: usize_of("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f64_or("rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: bool_or("tie_word_embeddings", false),
            qkv_bias,
            o_bias,
            mlp_bias: bool_or("mlp_bias", false),
            hidden_act: v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu").to_string(),
            embedding_multiplier: if granite { f64_or("embedding_multiplier", 1.0) } else { 1.0 },
            residual_multiplier: if granite { f64_or("residual_multiplier", 1.0) } else { 1.0 },
            attention_scale,
            logits_scaling: if granite { f64_or("logits_scaling", 1.0) } else { 1.0 },
            bos_token_id: ids_of(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids_of(v.get("eos_token_id")),
            pad_token_id: ids_of(v.get("pad_token_id")).first().copied(),
        })
    }
}

/// One LoRA branch on a linear: `Δy = scale · B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    /// Index of the adapter in the model's adapter list.
    pub adapter: usize,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

/// An adapter switched on for one forward: its branches apply to chunk positions `from..`
/// (0: the whole chunk, as a standard LoRA; ≥ chunk length: nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveAdapter {
    pub adapter: usize,
    pub from: usize,
}

/// The adapter index that stands for a LoRA-Mixer in an activation list: `ActiveAdapter { adapter:
/// MIXER, from }` switches every router on from `from` (the mixer is one adapter to the caller,
/// whatever the number of experts it routes between).
pub const MIXER: usize = usize::MAX;

/// A LoRA-Mixer router on one linear (arXiv 2507.00029): a linear map from the token's input to
/// one score per expert, softmax; soft fusion (all experts, weighted) or sparse top-k renormalised.
///
/// The experts' factors are stacked once (`a: [Σr, in]`, `b: [out, Σr]` with each expert's scale
/// folded in), so a routed forward is two matmuls whatever the number of experts: the gates are
/// spread over each expert's rank rows by `expand: [E, Σr]` (ones), then `Δy = ((x Aᵀ) ⊙ (g P)) Bᵀ`.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[E, in]`; a training run installs a variable here.
    pub weight: Tensor,
    /// Adapter index of each expert.
    pub experts: Vec<usize>,
    /// `None`: soft fusion over all experts.
    pub top_k: Option<usize>,
    a: Tensor,
    b: Tensor,
    expand: Tensor,
    /// When set, each forward pushes its routing probabilities `[n, E]` (training's balance loss,
    /// routing statistics).
    pub trace: Option<RouterTrace>,
    pub input: RouterInput,
    /// This router's slot in a KV cache's pooled-input state.
    pub slot: usize,
}

/// What a router scores a token from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterInput {
    /// The token's own projection input (the paper's router): `[E, in]`.
    Token,
    /// The token's input beside the mean of the inputs of every routed position up to it
    /// (causal, so a cached prefix never changes): `[E, 2·in]`. In a small model a token's own
    /// hidden state rarely says which task the conversation is; the running mean does.
    CausalMean,
    /// As [`RouterInput::CausalMean`], except that every position of a prompt (a prefill) sees
    /// the mean over the whole prompt, up to its last position, and only generated positions see
    /// the causal mean. Under the causal mean the first positions of a request are routed before
    /// the request has said which task it is, so their keys and values (e.g. "light" in "light
    /// dotted") are computed by the wrong expert and the answer reads them wrong; a prompt is
    /// known whole before its prefill, so nothing is lost by pooling it whole. The price: a
    /// routed prompt's keys and values depend on the whole prompt, so a routed cache is reused
    /// at prompt boundaries (turns, an activated mixer's base prefix), never cut mid-prompt.
    PromptMean,
}

impl RouterInput {
    pub fn width(self, in_features: usize) -> usize {
        match self {
            RouterInput::Token => in_features,
            RouterInput::CausalMean | RouterInput::PromptMean => 2 * in_features,
        }
    }

    /// Whether the router reads pooled inputs from the cache.
    pub fn pools(self) -> bool {
        self != RouterInput::Token
    }
}

/// Cumulative sums of the router inputs of every cached position, per router slot, kept in the KV
/// cache beside the keys and values ([`RouterInput::CausalMean`]). Every position is pooled,
/// routed or not, so an activated mixer's running mean includes the conversation before its
/// invocation (whose base keys and values are reused). Blocks, like the KV blocks: appending never
/// copies, and a fork shares the blocks before it.
#[derive(Debug, Clone, Default)]
pub struct RouterPools {
    /// Cache position of the chunk being computed.
    start: usize,
    /// Where the prompt of the chunk being computed ends ([`RouterInput::PromptMean`]): positions
    /// before it pool up to it, later ones causally. `None`: the whole chunk is prompt (a prefill;
    /// decoding runs one position at a time, where both agree). Set for one forward by training,
    /// which runs prompt and answer in one chunk.
    pub prompt_end: Option<usize>,
    /// Per slot: blocks of cumulative sums `[m, in]`, consecutive positions from 0.
    sums: Vec<Vec<Tensor>>,
}

impl RouterPools {
    fn rows(&self, slot: usize) -> usize {
        self.sums.get(slot).map_or(0, |b| b.iter().map(|t| t.dim(0).unwrap_or(0)).sum())
    }

    fn fork(&self, len: usize) -> Result<Self> {
        let mut sums = Vec::with_capacity(self.sums.len());
        for blocks in &self.sums {
            let (mut out, mut n) = (vec![], 0);
            for b in blocks {
                if n >= len {
                    break;
                }
                let take = b.dim(0)?.min(len - n);
                out.push(if take == b.dim(0)? { b.clone() } else { b.narrow(0, 0, take)? });
                n += take;
            }
            sums.push(out);
        }
        Ok(Self { start: len, sums, prompt_end: None })
    }
}

/// Routing probabilities recorded by the routers of a model, in forward order.
pub type RouterTrace = std::sync::Arc<std::sync::Mutex<Vec<Tensor>>>;

impl Router {
    /// The running mean of the inputs up to each position of the chunk `x: [1, t, in]`
    /// (`[1, t, in]`), pooling the chunk into the cache's sums.
    fn pool(&self, x: &Tensor, pools: &mut RouterPools) -> Result<Tensor> {
        let (_, t, d) = x.dims3()?;
        let m = pools.rows(self.slot);
        if m != pools.start {
            candle_core::bail!(
                "the router's pooled inputs cover {m} positions but this chunk starts at {}: the KV cache was filled before the mixer was installed (start a new conversation)",
                pools.start
            );
        }
        if pools.sums.len() <= self.slot {
            pools.sums.resize(self.slot + 1, vec![]);
        }
        let blocks = &mut pools.sums[self.slot];
        let last = match blocks.last() {
            Some(b) => b.narrow(0, b.dim(0)? - 1, 1)?,
            None => Tensor::zeros((1, d), x.dtype(), x.device())?,
        };
        let cum = x.squeeze(0)?.cumsum(0)?.broadcast_add(&last)?;
        blocks.push(cum.detach());
        // Positions [0, e) of the chunk are prompt positions pooled up to e (PromptMean).
        let e = match self.input {
            RouterInput::PromptMean => pools.prompt_end.map_or(t, |p| p.saturating_sub(m).min(t)),
            _ => 0,
        };
        let inv: Vec<f32> = (1..=t).map(|i| 1.0 / (m + i.max(e)) as f32).collect();
        let inv = Tensor::from_vec(inv, (t, 1), x.device())?.to_dtype(x.dtype())?;
        let pooled = if e > 1 {
            let whole = cum.narrow(0, e - 1, 1)?.broadcast_as((e, d))?;
            if e == t {
                whole
            } else {
                Tensor::cat(&[&whole, &cum.narrow(0, e, t - e)?], 0)?
            }
        } else {
            cum
        };
        pooled.broadcast_mul(&inv)?.unsqueeze(0)
    }

    /// The expert terms for `x: [1, n, in]` (`mean`: the running means of the same positions,
    /// for a causal-mean router): `[1, n, out]`.
    fn delta(&self, x: &Tensor, mean: Option<&Tensor>) -> Result<Tensor> {
        let u = match (self.input, mean) {
            (RouterInput::Token, _) => x.clone(),
            (RouterInput::CausalMean | RouterInput::PromptMean, Some(m)) => Tensor::cat(&[x, m], 2)?,
            (_, None) => candle_core::bail!("a pooling router needs its running means"),
        };
        let logits = u.broadcast_matmul(&self.weight.t()?)?;
        let probs = if loramix_kernels::differentiable() {
            candle_nn::ops::softmax(&logits, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&logits)?
        };
        if let Some(t) = &self.trace {
            t.lock().unwrap_or_else(|e| e.into_inner()).push(probs.squeeze(0)?);
        }
        let e = self.experts.len();
        let gates = match self.top_k {
            Some(k) if k < e => top_k_renormalised(&probs, k)?,
            _ => probs,
        };
        let h = x.broadcast_matmul(&self.a.t()?)?;
        let g = gates.broadcast_matmul(&self.expand)?;
        (h * g)?.broadcast_matmul(&self.b.t()?)
    }
}

/// Keeps the `k` largest gates of each row (ties: the lower expert index first) and renormalises
/// them to sum to one. Not differentiable: inference only (training routes softly).
pub fn top_k_renormalised(probs: &Tensor, k: usize) -> Result<Tensor> {
    let dims = probs.dims().to_vec();
    let e = *dims.last().unwrap_or(&0);
    let v = probs.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; v.len()];
    for (row, o) in v.chunks(e.max(1)).zip(out.chunks_mut(e.max(1))) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let keep = &idx[..k.min(row.len())];
        let sum: f32 = keep.iter().map(|&i| row[i]).sum();
        for &i in keep {
            o[i] = if sum > 0.0 { row[i] / sum } else { 1.0 / keep.len() as f32 };
        }
    }
    Tensor::from_vec(out, dims, probs.device())?.to_dtype(probs.dtype())
}

/// A linear layer that LoRA adapters can target.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    base: Linear,
    branches: Vec<LoraBranch>,
    router: Option<Router>,
    in_features: usize,
    out_features: usize,
}

impl AdaptedLinear {
    fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let base = if bias {
            candle_nn::linear(in_features, out_features, vb)?
        } else {
            candle_nn::linear_no_bias(in_features, out_features, vb)?
        };
        Ok(Self { base, branches: vec![], router: None, in_features, out_features })
    }

    fn from_weight(weight: Tensor) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self { base: Linear::new(weight, None), branches: vec![], router: None, in_features, out_features })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn attach(&mut self, branch: LoraBranch) -> Result<()> {
        let (r, i) = branch.a.dims2()?;
        let (o, r2) = branch.b.dims2()?;
        if i != self.in_features || o != self.out_features || r != r2 {
            candle_core::bail!(
                "LoRA shapes A {:?} / B {:?} do not fit a linear {} -> {}",
                branch.a.dims(),
                branch.b.dims(),
                self.in_features,
                self.out_features
            );
        }
        self.branches.push(branch);
        Ok(())
    }

    /// The base weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// Adapter indices with a branch on this linear.
    pub fn adapters(&self) -> Vec<usize> {
        self.branches.iter().map(|b| b.adapter).collect()
    }

    pub fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }

    /// Routes between `experts` (adapter indices, each with at most one branch here; an expert
    /// without a branch on this linear adds nothing) with `weight: [E, in]`.
    #[allow(clippy::too_many_arguments)]
    pub fn set_router(
        &mut self,
        weight: Tensor,
        experts: &[usize],
        top_k: Option<usize>,
        trace: Option<RouterTrace>,
        input: RouterInput,
        slot: usize,
    ) -> Result<()> {
        let (e, i) = weight.dims2()?;
        if e != experts.len() || i != input.width(self.in_features) {
            candle_core::bail!(
                "router weight {:?} does not fit {} experts on a linear with {} inputs ({:?} routing)",
                weight.dims(),
                experts.len(),
                self.in_features,
                input
            );
        }
        let (mut a, mut b, mut ranks) = (vec![], vec![], vec![]);
        for &ad in experts {
            let mine: Vec<&LoraBranch> = self.branches.iter().filter(|br| br.adapter == ad).collect();
            if mine.len() > 1 {
                candle_core::bail!("adapter {ad} has {} branches on one linear; a mixer expert needs at most one", mine.len());
            }
            match mine.first() {
                Some(br) => {
                    a.push(br.a.clone());
                    b.push((&br.b * br.scale)?);
                    ranks.push(br.a.dim(0)?);
                }
                None => ranks.push(0),
            }
        }
        let total: usize = ranks.iter().sum();
        if total == 0 {
            candle_core::bail!("no expert has a branch on this linear");
        }
        let mut p = vec![0f32; e * total];
        let mut col = 0;
        for (k, r) in ranks.iter().enumerate() {
            for c in col..col + r {
                p[k * total + c] = 1.0;
            }
            col += r;
        }
        let dt = weight.dtype();
        self.router = Some(Router {
            weight,
            experts: experts.to_vec(),
            top_k,
            a: Tensor::cat(&a, 0)?.to_dtype(dt)?,
            b: Tensor::cat(&b, 1)?.to_dtype(dt)?,
            expand: Tensor::from_vec(p, (e, total), self.base.weight().device())?.to_dtype(dt)?,
            trace,
            input,
            slot,
        });
        Ok(())
    }

    /// Removes every branch of `adapter` (a temporary adaptation, e.g. ChameleonLLM's per-batch head).
    pub fn detach(&mut self, adapter: usize) {
        self.branches.retain(|b| b.adapter != adapter);
    }

    pub fn clear_router(&mut self) {
        self.router = None;
    }

    /// `x`: `[1, t, in]`.
    fn forward(&self, x: &Tensor, active: &[ActiveAdapter], pools: &mut RouterPools) -> Result<Tensor> {
        let mut y = self.base.forward(x)?;
        let t = x.dim(1)?;
        // Every position is pooled, routed or not (see RouterPools).
        let mean = match &self.router {
            Some(r) if r.input.pools() => Some(r.pool(x, pools)?),
            _ => None,
        };
        for act in active {
            if act.from >= t {
                continue;
            }
            if act.adapter == MIXER {
                if let Some(r) = &self.router {
                    let n = t - act.from;
                    let xs = if act.from == 0 { x.clone() } else { x.narrow(1, act.from, n)? };
                    let ms = match &mean {
                        Some(m) if act.from > 0 => Some(m.narrow(1, act.from, n)?),
                        other => other.clone(),
                    };
                    let delta = r.delta(&xs, ms.as_ref())?;
                    y = if act.from == 0 {
                        (y + delta)?
                    } else {
                        Tensor::cat(&[y.narrow(1, 0, act.from)?, (y.narrow(1, act.from, n)? + delta)?], 1)?
                    };
                }
                continue;
            }
            for br in self.branches.iter().filter(|b| b.adapter == act.adapter) {
                let n = t - act.from;
                let xs = if act.from == 0 { x.clone() } else { x.narrow(1, act.from, n)? };
                let delta = (xs.broadcast_matmul(&br.a.t()?)?.broadcast_matmul(&br.b.t()?)? * br.scale)?;
                y = if act.from == 0 {
                    (y + delta)?
                } else {
                    Tensor::cat(&[y.narrow(1, 0, act.from)?, (y.narrow(1, act.from, n)? + delta)?], 1)?
                };
            }
        }
        Ok(y)
    }
}

/// Keys and values of a run of consecutive positions, for one layer: `[1, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
struct KvBlock {
    k: Tensor,
    v: Tensor,
}

impl KvBlock {
    fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }
}

/// Blocks of fewer positions than this are extended by copying (bounded cost); longer ones stay
/// as they are and a new block starts. Forks share every block they inherit.
const BLOCK_MERGE_LIMIT: usize = 256;

/// A KV cache made of immutable blocks. Cloning or forking shares the blocks (no copy).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Vec<KvBlock>>,
    len: usize,
    /// Pooled router inputs of the cached positions ([`RouterInput::CausalMean`]).
    pub pools: RouterPools,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![vec![]; num_layers], len: 0, pools: RouterPools::default() }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A cache holding this one's first `len` positions, sharing their storage (the block at the
    /// boundary is a narrowed view). Appending to either cache never changes the other.
    pub fn fork(&self, len: usize) -> Result<Self> {
        if len > self.len {
            candle_core::bail!("cannot fork a KV cache of {} positions at {len}", self.len);
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for blocks in &self.layers {
            let mut out = vec![];
            let mut n = 0;
            for b in blocks {
                if n >= len {
                    break;
                }
                let take = b.len().min(len - n);
                if take == b.len() {
                    out.push(b.clone());
                } else {
                    out.push(KvBlock { k: b.k.narrow(2, 0, take)?, v: b.v.narrow(2, 0, take)? });
                }
                n += take;
            }
            layers.push(out);
        }
        Ok(Self { layers, len, pools: self.pools.fork(len)? })
    }

    /// Number of blocks of the first layer (for tests of sharing).
    pub fn block_count(&self) -> usize {
        self.layers.first().map(Vec::len).unwrap_or(0)
    }

    /// True if position storage of this cache's first block is the same as `other`'s: the
    /// prefix is shared, not copied.
    pub fn shares_prefix_with(&self, other: &KvCache) -> bool {
        match (self.layers.first().and_then(|l| l.first()), other.layers.first().and_then(|l| l.first())) {
            (Some(a), Some(b)) => {
                let (sa, _) = a.k.storage_and_layout();
                let (sb, _) = b.k.storage_and_layout();
                std::ptr::eq(&*sa, &*sb)
            }
            _ => false,
        }
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<()> {
        let blocks = &mut self.layers[layer];
        match blocks.last_mut() {
            Some(last) if last.len() < BLOCK_MERGE_LIMIT => {
                last.k = Tensor::cat(&[&last.k, &k], 2)?;
                last.v = Tensor::cat(&[&last.v, &v], 2)?;
            }
            _ => blocks.push(KvBlock { k: k.contiguous()?, v: v.contiguous()? }),
        }
        Ok(())
    }
}

struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(cfg: &LlmConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f32> =
            (0..d / 2).map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        match cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, lo, hi, old) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    // Between the two wavelengths (inclusive): interpolate.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    /// cos, sin `[t, d/2]` for positions `start..start + t`.
    fn cos_sin(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let h = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(t * h);
        for p in start..start + t {
            for f in &self.inv_freq {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (t, h), device)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

struct Attention {
    q_proj: AdaptedLinear,
    k_proj: AdaptedLinear,
    v_proj: AdaptedLinear,
    o_proj: AdaptedLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        Ok(Self {
            q_proj: AdaptedLinear::new(vb.pp("q_proj"), cfg.hidden_size, h * d, cfg.qkv_bias)?,
            k_proj: AdaptedLinear::new(vb.pp("k_proj"), cfg.hidden_size, kv * d, cfg.qkv_bias)?,
            v_proj: AdaptedLinear::new(vb.pp("v_proj"), cfg.hidden_size, kv * d, cfg.qkv_bias)?,
            o_proj: AdaptedLinear::new(vb.pp("o_proj"), h * d, cfg.hidden_size, cfg.o_bias)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            scale: cfg.attention_scale,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        cache: &mut KvCache,
        layer: usize,
        active: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q_proj.forward(x, active, &mut cache.pools)?.reshape((1, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let k = self.k_proj.forward(x, active, &mut cache.pools)?.reshape((1, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let v = self.v_proj.forward(x, active, &mut cache.pools)?.reshape((1, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        // Training (router, adapters) needs the composed ops: the fused ones have no backward.
        let diff = loramix_kernels::differentiable();
        let rope = if diff { candle_nn::rotary_emb::rope_slow } else { candle_nn::rotary_emb::rope };
        let q = rope(&q, &cos_sin.0, &cos_sin.1)?;
        let k = rope(&k, &cos_sin.0, &cos_sin.1)?;
        let start = cache.len;
        cache.append(layer, k, v)?;
        let total = start + t;
        // GQA without repeating keys: the g query heads that share a kv head become g·t rows.
        let g = h / kvh;
        let q = (q.reshape((kvh, g * t, d))? * self.scale)?;
        let blocks = &cache.layers[layer];
        let mut scores = Vec::with_capacity(blocks.len());
        for b in blocks {
            scores.push(q.matmul(&b.k.squeeze(0)?.t()?)?);
        }
        let mut scores = if scores.len() == 1 { scores.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&scores, 2)? };
        if t > 1 {
            // Query i (position start+i) sees keys ≤ start+i.
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (1, t, total), x.device())?;
            scores = scores.reshape((kvh, g, t, total))?.broadcast_add(&mask.unsqueeze(0)?)?.reshape((kvh, g * t, total))?;
        }
        let probs = if diff { candle_nn::ops::softmax(&scores, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&scores)? };
        let mut out: Option<Tensor> = None;
        let mut off = 0;
        for b in blocks {
            let n = b.len();
            let part = probs.narrow(2, off, n)?.matmul(&b.v.squeeze(0)?)?;
            out = Some(match out {
                None => part,
                Some(o) => (o + part)?,
            });
            off += n;
        }
        let out = out.ok_or_else(|| candle_core::Error::Msg("empty KV cache".into()))?;
        let out = out.reshape((1, h, t, d))?.transpose(1, 2)?.reshape((1, t, h * d))?;
        self.o_proj.forward(&out, active, &mut cache.pools)
    }
}

struct Mlp {
    gate_proj: AdaptedLinear,
    up_proj: AdaptedLinear,
    down_proj: AdaptedLinear,
    act: candle_nn::Activation,
}

impl Mlp {
    fn new(vb: VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let act = match cfg.hidden_act.as_str() {
            "silu" | "swish" => candle_nn::Activation::Silu,
            "gelu" => candle_nn::Activation::GeluPytorchTanh,
            other => candle_core::bail!("hidden_act {other:?} is not supported (expected silu)"),
        };
        let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: AdaptedLinear::new(vb.pp("gate_proj"), hs, is, cfg.mlp_bias)?,
            up_proj: AdaptedLinear::new(vb.pp("up_proj"), hs, is, cfg.mlp_bias)?,
            down_proj: AdaptedLinear::new(vb.pp("down_proj"), is, hs, cfg.mlp_bias)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, active: &[ActiveAdapter], pools: &mut RouterPools) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, active, pools)?.apply(&self.act)?;
        let up = self.up_proj.forward(x, active, pools)?;
        self.down_proj.forward(&(gate * up)?, active, pools)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// A causal LM (`*ForCausalLM`).
pub struct LlmModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: AdaptedLinear,
    rope: Rope,
    pub config: LlmConfig,
    device: Device,
}

impl LlmModel {
    pub fn new(vb: VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            layers.push(DecoderLayer {
                self_attn: Attention::new(l.pp("self_attn"), cfg)?,
                mlp: Mlp::new(l.pp("mlp"), cfg)?,
                input_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                post_attention_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, l.pp("post_attention_layernorm"))?,
            });
        }
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        // Tied models share the embedding matrix (and usually store no head); an untied model
        // without a head is refused rather than given a random one, as transformers would.
        let lm_head = if cfg.tie_word_embeddings {
            AdaptedLinear::from_weight(embed_tokens.embeddings().clone())?
        } else if vb.contains_tensor("lm_head.weight") {
            AdaptedLinear::new(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        } else {
            candle_core::bail!("missing tensor 'lm_head.weight' and tie_word_embeddings is false");
        };
        Ok(Self { embed_tokens, layers, norm, lm_head, rope: Rope::new(cfg), config: cfg.clone(), device: vb.device().clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Every adaptable linear with its module path (read-only).
    pub fn linears(&self) -> Vec<(String, &AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &a.o_proj));
            let m = &l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &m.down_proj));
        }
        out.push(("lm_head".to_string(), &self.lm_head));
        out
    }

    /// The installed LoRA-Mixer routers' weights by module path.
    pub fn routers(&self) -> Vec<(String, Tensor)> {
        self.linears().into_iter().filter_map(|(n, l)| l.router().map(|r| (n, r.weight.clone()))).collect()
    }

    /// Every adaptable linear with its transformers module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// Input embeddings `[t, hidden]` of `ids` (ChameleonLLM's clustering feature).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed_tokens.forward(&Tensor::new(ids, &self.device)?)
    }

    pub fn lm_head(&self) -> &AdaptedLinear {
        &self.lm_head
    }

    pub fn lm_head_mut(&mut self) -> &mut AdaptedLinear {
        &mut self.lm_head
    }

    /// The final (normed) hidden states `[1, t, hidden]` of `ids`, the LM head's input.
    pub fn forward_hidden(&self, ids: &[u32], cache: &mut KvCache, active: &[ActiveAdapter]) -> Result<Tensor> {
        let t = ids.len();
        if t == 0 {
            candle_core::bail!("forward over zero tokens");
        }
        let start = cache.len;
        cache.pools.start = start;
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&input)?;
        if self.config.embedding_multiplier != 1.0 {
            x = (x * self.config.embedding_multiplier)?;
        }
        let cos_sin = self.rope.cos_sin(start, t, &self.device)?;
        let rm = self.config.residual_multiplier;
        for (i, l) in self.layers.iter().enumerate() {
            let h = l.self_attn.forward(&rms_norm(&l.input_layernorm, &x)?, &cos_sin, cache, i, active)?;
            x = if rm != 1.0 { (x + (h * rm)?)? } else { (x + h)? };
            let h = l.mlp.forward(&rms_norm(&l.post_attention_layernorm, &x)?, active, &mut cache.pools)?;
            x = if rm != 1.0 { (x + (h * rm)?)? } else { (x + h)? };
        }
        cache.len += t;
        let x = rms_norm(&self.norm, &x)?;
        Ok(x)
    }

    /// Runs `ids` at positions `cache.len()..`, appending their keys and values to `cache`.
    /// Returns logits `[t, vocab]` for every position when `all_logits`, else `[1, vocab]` for
    /// the last one (the head is the largest matmul of a long prefill).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, active: &[ActiveAdapter], all_logits: bool) -> Result<Tensor> {
        let t = ids.len();
        let x = self.forward_hidden(ids, cache, active)?;
        // A head router that pools its inputs must see every row; it is rare (experts on the
        // head), so the head then runs over the whole chunk and the last row is kept.
        let pooled_head = self.lm_head.router().is_some_and(|r| r.input.pools());
        let keep_all = all_logits || pooled_head;
        let x = if keep_all { x } else { x.narrow(1, t - 1, 1)? };
        // The head's active positions are relative to the chunk; shift them when only the last row is kept.
        let head_active: Vec<ActiveAdapter> = if keep_all {
            active.to_vec()
        } else {
            active.iter().map(|a| ActiveAdapter { adapter: a.adapter, from: if a.from < t { 0 } else { 1 } }).collect()
        };
        let mut logits = self.lm_head.forward(&x, &head_active, &mut cache.pools)?.i(0)?;
        if pooled_head && !all_logits {
            logits = logits.narrow(0, t - 1, 1)?;
        }
        if self.config.logits_scaling != 1.0 {
            logits = (logits / self.config.logits_scaling)?;
        }
        logits.to_dtype(DType::F32)
    }
}

/// RMSNorm; the composed form while training (the fused op has no backward).
fn rms_norm(n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    if loramix_kernels::differentiable() {
        candle_nn::ops::rms_norm_slow(x, n.weight(), n.eps() as f32)
    } else {
        n.forward(x)
    }
}

/// Index of the highest logit (ties: the first, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
