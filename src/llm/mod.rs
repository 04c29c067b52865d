//! The LLM pane's engine: a Llama-family model with PEFT LoRA and activated-LoRA adapters, and
//! conversations whose base-model KV cache is shared by every adapter invoked on them.
//!
//! An aLoRA's branches apply only from its invocation sequence on (PEFT's semantics, see
//! [`adapter::alora_offset`]), so every position before it is a pure base-model position: its
//! keys and values are the ones the conversation's base cache already holds. A reply therefore
//! forks the conversation's cache at the first adapted position (sharing, not copying, the
//! blocks before it) and runs the model over the invocation and the generated tokens only.
//!
//! Owns the LLM pane. Uses the model code, the shared weights readers, the hub and the RNG; no
//! other room (the LLM has its own adapter format handling in [`adapter`]).

pub mod adapter;
pub mod data;
pub mod chameleon;
pub mod mixer;
pub mod sampling;
pub mod template;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use loramix_models::llm::{ActiveAdapter, KvCache, LlmConfig, LlmModel};
pub use loramix_models::llm::{RouterInput, MIXER};
use serde_json::Value;
use tokenizers::Tokenizer;

pub use adapter::{alora_offset, AdapterKind, LlmAdapter};
pub use mixer::{MixerSpec, MixerState, MixerTrainOptions};
pub use sampling::{Sampler, SamplingOptions};
pub use template::{ChatTemplate, Message};

use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// Longest run of positions computed in one forward.
pub const PREFILL_CHUNK: usize = 512;

/// Generation settings of one reply.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    /// Extra stop tokens besides the model's end-of-sequence ids.
    pub stop_tokens: Vec<u32>,
    /// Set from another thread to stop after the current token.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 128, sampling: SamplingOptions::default(), stop_tokens: vec![], cancel: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    MaxTokens,
    Cancelled,
}

/// The result of one reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The conversation's tokens plus what the reply appended first (an invocation).
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens, including a final stop token (as transformers' `generate` returns them).
    pub tokens: Vec<u32>,
    pub text: String,
    /// Positions the model ran over for this reply.
    pub computed_positions: usize,
    /// Positions whose keys and values came from the conversation's cache as it was before
    /// this reply.
    pub reused_positions: usize,
    pub stop: StopReason,
}

/// A conversation: its tokens and the base model's KV cache over a prefix of them.
#[derive(Debug, Clone)]
pub struct Conversation {
    tokens: Vec<u32>,
    cache: KvCache,
    /// Base-model logits at the last cached position (so a reply with no adapter active can
    /// start generating without recomputing anything).
    last_logits: Option<Vec<f32>>,
}

impl Conversation {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Positions whose base keys and values are cached.
    pub fn cached_positions(&self) -> usize {
        self.cache.len()
    }

    /// Appends tokens (a user turn, an accepted reply); they are computed lazily.
    pub fn push(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// The cache itself (tests check that replies share its storage).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

/// A loaded model with its tokenizer, chat template and adapters.
pub struct LlmSession {
    model: LlmModel,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    adapters: Vec<LlmAdapter>,
    eos_tokens: Vec<u32>,
    dir: PathBuf,
    /// The LoRA-Mixer routing between some of the adapters, enabled by passing [`MIXER`].
    mixer: Option<MixerState>,
}

fn read_json(path: &Path) -> Result<Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// The safetensors files of a transformers model folder (single file or sharded).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::model(&index, "field 'weight_map': expected an object"))?;
        let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    for pickle in ["pytorch_model.bin", "model.pt", "model.ckpt"] {
        if dir.join(pickle).exists() {
            return Err(crate::weights::pickle_refusal(&dir.join(pickle)));
        }
    }
    Err(Error::model(dir, "no model.safetensors or model.safetensors.index.json"))
}

/// Downloads (or finds in the HF cache) the files of an LLM repo; returns its snapshot folder.
pub fn fetch_llm_repo(repo: &str) -> Result<PathBuf> {
    let crate::hub::HubRepo { cache, cached: crepo, offline, api, listing } = crate::hub::HubRepo::open(repo);
    let mut want: Vec<String> = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]
        .map(String::from)
        .to_vec();
    match &listing {
        Some(files) => want.extend(files.iter().filter(|f| f.ends_with(".safetensors") || f.ends_with(".safetensors.index.json")).cloned()),
        None => want.extend(["model.safetensors".to_string(), "model.safetensors.index.json".to_string()]),
    }
    let mut snapshot = None;
    for f in &want {
        if listing.as_ref().is_some_and(|l| !l.contains(f)) {
            continue;
        }
        let got = match crepo.get(f) {
            Some(p) => Some(p),
            None => match &api {
                Some(a) if listing.is_some() => {
                    Some(a.model(repo.to_string()).get(f).map_err(|e| Error::Hub(format!("{repo}: downloading {f}: {e}")))?)
                }
                _ => None,
            },
        };
        if f == "config.json" {
            snapshot = got.as_ref().and_then(|p| p.parent().map(Path::to_path_buf));
        }
    }
    snapshot.ok_or_else(|| {
        Error::Hub(format!(
            "model {repo:?} is not in the HF cache ({}) and {}",
            cache.path().display(),
            if offline { "HF_HUB_OFFLINE is set" } else { "the hub could not be reached" }
        ))
    })
}

impl LlmSession {
    /// Loads a model from a folder, or from an HF repo id when no such folder exists.
    pub fn load(model: &str, device: &Device) -> Result<Self> {
        let p = Path::new(model);
        if p.is_dir() {
            return Self::load_dir(p, device);
        }
        if p.exists() {
            return Err(Error::model(p, "expected a model folder (config.json, tokenizer.json, *.safetensors)"));
        }
        if let Some(p) = crate::hub::shipped(model) {
            return Self::load_dir(&p, device);
        }
        if crate::hub::is_repo_id(model) {
            return Self::load_dir(&fetch_llm_repo(model)?, device);
        }
        Err(Error::model(p, "no such folder, and not an HF repo id (owner/name)"))
    }

    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::model(dir, "config.json is missing (expected a transformers model folder)"));
        }
        let cfg_json = read_json(&cfg_path)?;
        let cfg = LlmConfig::from_json(&cfg_json).map_err(|m| Error::model(&cfg_path, m))?;
        let files = weight_files(dir)?;
        let vb = WeightSource::from_files(&files)?.into_var_builder(DType::F32, device);
        let model = LlmModel::new(vb, &cfg).map_err(|e| Error::model(dir, e.to_string()))?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::Tokenizer { path: tok_path, message: "missing (LLMs are loaded with their tokenizer.json)".into() });
        }
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer { path: tok_path.clone(), message: e.to_string() })?;
        let template = ChatTemplate::from_dir(dir)?;
        // generation_config.json's eos ids win over config.json's, as in transformers' generate.
        let gen_path = dir.join("generation_config.json");
        let mut eos_tokens = cfg.eos_token_ids.clone();
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            let ids = loramix_models::llm::ids_of(g.get("eos_token_id"));
            if !ids.is_empty() {
                eos_tokens = ids;
            }
        }
        Ok(Self { model, tokenizer, template, adapters: vec![], eos_tokens, dir: dir.to_path_buf(), mixer: None })
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LlmConfig {
        &self.model.config
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    pub fn eos_tokens(&self) -> &[u32] {
        &self.eos_tokens
    }

    /// Loads a PEFT adapter folder; its name is `name` or the folder's name.
    pub fn add_adapter(&mut self, dir: &Path, name: Option<&str>) -> Result<&LlmAdapter> {
        let name = match name {
            Some(n) => n.to_string(),
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::model(dir, "cannot name an adapter after this path"))?,
        };
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(Error::Argument(format!("an adapter named {name:?} is already loaded")));
        }
        let index = self.adapters.len();
        let tokenizer = &self.tokenizer;
        let tokenize = |s: &str| -> Result<Vec<u32>> {
            tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer { path: dir.to_path_buf(), message: e.to_string() })
        };
        let vocab = self.config().vocab_size;
        let a = adapter::load_adapter(&mut self.model, dir, &name, index, vocab, &tokenize)?;
        self.adapters.push(a);
        Ok(&self.adapters[index])
    }

    pub fn adapters(&self) -> &[LlmAdapter] {
        &self.adapters
    }

    pub fn adapter_index(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name == name)
    }

    /// Tokens of a user prompt: the chat template applied when the model has one (opening the
    /// assistant turn unless the caller appends an invocation instead), raw text otherwise.
    pub fn encode_prompt(&self, prompt: &str, add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode_messages(&[Message::user(prompt)], add_generation_prompt)
    }

    pub fn encode_messages(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let terr = |e: tokenizers::Error| Error::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() };
        match &self.template {
            Some(t) => {
                let text = t.render(messages, add_generation_prompt)?;
                Ok(self.tokenizer.encode(text, false).map_err(terr)?.get_ids().to_vec())
            }
            None => {
                let text: String = messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
                Ok(self.tokenizer.encode(text, true).map_err(terr)?.get_ids().to_vec())
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() })
    }

    pub fn conversation(&self, tokens: &[u32]) -> Conversation {
        Conversation { tokens: tokens.to_vec(), cache: self.model.new_cache(), last_logits: None }
    }

    /// Computes the base model over the conversation's uncached tokens. Returns how many.
    pub fn prefill(&self, conv: &mut Conversation) -> Result<usize> {
        let n = conv.tokens.len();
        self.extend_base(conv, n)
    }

    fn extend_base(&self, conv: &mut Conversation, upto: usize) -> Result<usize> {
        let have = conv.cache.len();
        if upto <= have {
            return Ok(0);
        }
        let tokens = conv.tokens[have..upto].to_vec();
        conv.last_logits = Some(self.forward_chunked(&tokens, &mut conv.cache, &[])?);
        Ok(upto - have)
    }

    /// Runs `ids` in chunks of [`PREFILL_CHUNK`] (bounded attention-score memory on long
    /// prefixes); `active` positions are relative to the start of `ids`. Returns the last logits.
    fn forward_chunked(&self, ids: &[u32], cache: &mut KvCache, active: &[(usize, usize)]) -> Result<Vec<f32>> {
        let mut logits = None;
        for (c, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
            let at = c * PREFILL_CHUNK;
            let acts: Vec<ActiveAdapter> =
                active.iter().map(|&(adapter, from)| ActiveAdapter { adapter, from: from.saturating_sub(at) }).collect();
            logits = Some(self.model.forward(chunk, cache, &acts, false)?);
        }
        let logits = logits.ok_or_else(|| Error::Argument("forward over zero tokens".into()))?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Logits at every position of `ids` run from scratch with `enabled` adapters applied as PEFT
    /// applies them in one forward (for parity tests against PEFT).
    pub fn logits_all(&self, ids: &[u32], enabled: &[usize]) -> Result<Vec<Vec<f32>>> {
        // The whole sequence is prompt.
        self.logits_answer(ids, enabled, ids.len())
    }

    /// As [`Self::logits_all`] for a prompt of `answer_from` tokens followed by its answer in one
    /// forward, as mixer training runs it: a prompt-mean router pools the prompt whole and the
    /// answer causally (what a prefill followed by decoding gives).
    pub fn logits_answer(&self, ids: &[u32], enabled: &[usize], answer_from: usize) -> Result<Vec<Vec<f32>>> {
        let active = self.active_for(&ids[..answer_from.min(ids.len())], enabled)?;
        let mut cache = self.model.new_cache();
        cache.pools.prompt_end = Some(answer_from);
        let acts: Vec<ActiveAdapter> = active.iter().map(|&(adapter, from)| ActiveAdapter { adapter, from }).collect();
        Ok(self.model.forward(ids, &mut cache, &acts, true)?.to_vec2::<f32>()?)
    }

    /// (adapter, first adapted position) for each enabled adapter active on `ids`.
    fn active_for(&self, ids: &[u32], enabled: &[usize]) -> Result<Vec<(usize, usize)>> {
        let mut out = vec![];
        for &i in enabled {
            if i == MIXER {
                if self.mixer.is_none() {
                    return Err(Error::Argument("the mixer is enabled but none is loaded".into()));
                }
                if let Some(from) = self.mixer_start(ids) {
                    out.push((MIXER, from));
                }
                continue;
            }
            let a = self.adapters.get(i).ok_or_else(|| Error::Argument(format!("no adapter number {i}")))?;
            match &a.kind {
                AdapterKind::Lora => out.push((i, 0)),
                AdapterKind::Activated { invocation } => {
                    if let Some(off) = alora_offset(ids, invocation) {
                        out.push((i, ids.len() - off));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Generates a reply to the conversation plus `extra` tokens (an invocation sequence), with
    /// the `enabled` adapters (indices into [`Self::adapters`]) applied as PEFT applies them.
    /// `on_token` receives each token and the text it adds; returning false cancels.
    pub fn reply(
        &self,
        conv: &mut Conversation,
        extra: &[u32],
        enabled: &[usize],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<Reply> {
        let mut full = conv.tokens.clone();
        full.extend_from_slice(extra);
        let len = full.len();
        if len == 0 {
            return Err(Error::Argument("empty prompt: nothing to continue".into()));
        }
        let active = self.active_for(&full, enabled)?;
        // Positions before the first adapted one are base positions: take them from the cache.
        let base_len = active.iter().map(|a| a.1).min().unwrap_or(len);
        let reused_before = conv.cache.len().min(base_len);
        let mut computed = self.extend_base(conv, base_len.min(conv.tokens.len()))?;
        let logits_ready = base_len == len && conv.cache.len() == len && conv.last_logits.is_some();
        // The working cache starts at the last base position we keep; at least one position is
        // computed unless the conversation's last logits are exactly what we need.
        let fork_at = if logits_ready { len } else { base_len.min(conv.cache.len()).min(len - 1) };
        let mut cache = conv.cache.fork(fork_at)?;
        let reused = reused_before.min(fork_at);
        let mut logits = if logits_ready {
            conv.last_logits.clone().unwrap_or_default()
        } else {
            let seg = &full[fork_at..];
            let acts: Vec<(usize, usize)> = active.iter().map(|&(adapter, start)| (adapter, start.saturating_sub(fork_at))).collect();
            computed += seg.len();
            self.forward_chunked(seg, &mut cache, &acts)?
        };
        // Every generated token is adapted by each adapter active on the prompt.
        let gen_acts: Vec<ActiveAdapter> = active.iter().map(|&(adapter, _)| ActiveAdapter { adapter, from: 0 }).collect();
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut tokens = vec![];
        let mut text = String::new();
        let mut stop = StopReason::MaxTokens;
        while tokens.len() < opts.max_new_tokens {
            let tok = sampler.next(&logits);
            tokens.push(tok);
            let now = self.decode(&tokens)?;
            let piece = now.get(text.len()..).unwrap_or("").to_string();
            text = now;
            let go_on = on_token(tok, &piece);
            if self.eos_tokens.contains(&tok) || opts.stop_tokens.contains(&tok) {
                stop = StopReason::StopToken;
                break;
            }
            if !go_on || opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                stop = StopReason::Cancelled;
                break;
            }
            if tokens.len() == opts.max_new_tokens {
                break;
            }
            logits = self.model.forward(&[tok], &mut cache, &gen_acts, false)?.flatten_all()?.to_vec1::<f32>()?;
            computed += 1;
        }
        Ok(Reply { prompt_tokens: full, tokens, text, computed_positions: computed, reused_positions: reused, stop })
    }
}
