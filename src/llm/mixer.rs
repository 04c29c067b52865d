//! LoRA-Mixer (arXiv 2507.00029) in plug-and-play mode: the user's LoRAs stay frozen and only a
//! router per adapted linear is trained, which scores the experts for each token from the
//! linear's own input. Training fuses softly (every expert, weighted by the router); inference
//! keeps the top-k experts, renormalised.
//!
//! With activated LoRAs as experts (all sharing one invocation sequence), the mixer itself is
//! activated: routing starts at the last occurrence of the invocation, every earlier position is
//! a base-model position, and the conversation's base KV cache is reused exactly as a single
//! aLoRA reuses it. Routing is per token and depends only on that token's input, so it never
//! changes an earlier position's keys and values; positions from the invocation on carry routed
//! keys and values and are computed per reply.
//!
//! A router folder holds `mixer.json` (the model's fingerprint, the experts with their content
//! hashes, top-k, the invocation, how it was trained) and `routers-<hash>.safetensors`
//! (`<module>.router.weight: [E, in]`). The weights file is named by its content and written
//! before `mixer.json` points to it, so a crash mid-save leaves the previous router intact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loramix_models::llm::{ActiveAdapter, RouterInput, RouterTrace, MIXER};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{Example, Line};
use super::{alora_offset, AdapterKind, LlmSession};
use crate::error::{Error, Result};
use crate::rng::shuffle;

pub const MIXER_FILE: &str = "mixer.json";
const FORMAT: &str = "loramix-lora-mixer/1";

/// What identifies a base model cheaply: its shape and hashes of its config and of each weight
/// file's size and first and last MiB (hashing a multi-GB file on every load would be slow; a
/// fine-tune with an unchanged config still differs there).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelFingerprint {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExpertSpec {
    pub name: String,
    /// The adapter folder when the router was trained (absolute).
    pub path: String,
    /// sha256 of adapter_config.json and adapter_model.safetensors.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixerSpec {
    pub format: String,
    pub model: ModelFingerprint,
    pub experts: Vec<ExpertSpec>,
    /// Experts kept per token at inference; 0: soft fusion.
    pub top_k: usize,
    /// Routing starts at the last occurrence of these tokens (activated experts); none: everywhere.
    pub invocation_tokens: Option<Vec<u32>>,
    pub modules: Vec<String>,
    /// What each router scores from (older files: the token's own input).
    #[serde(default = "token_input")]
    pub router_input: RouterInput,
    pub weights: String,
    #[serde(default)]
    pub training: Value,
}

fn token_input() -> RouterInput {
    RouterInput::Token
}

/// The mixer installed in a session.
#[derive(Debug, Clone)]
pub struct MixerState {
    pub spec: MixerSpec,
    /// Adapter index of each expert.
    pub experts: Vec<usize>,
    pub trace: RouterTrace,
}

/// sha256 of length-prefixed parts (so that moving bytes between parts changes the hash).
pub(super) fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn model_fingerprint(session: &LlmSession) -> Result<ModelFingerprint> {
    let dir = session.model_dir();
    let cfg = std::fs::read(dir.join("config.json")).map_err(|e| Error::io(dir.join("config.json"), e))?;
    let mut parts: Vec<Vec<u8>> = vec![cfg];
    for f in super::weight_files(dir)? {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        let len = file.metadata().map_err(|e| Error::io(&f, e))?.len();
        let mib = 1u64 << 20;
        let mut head = vec![0u8; len.min(mib) as usize];
        file.read_exact(&mut head).map_err(|e| Error::io(&f, e))?;
        let mut tail = vec![0u8; len.min(mib) as usize];
        file.seek(SeekFrom::Start(len - tail.len() as u64)).map_err(|e| Error::io(&f, e))?;
        file.read_exact(&mut tail).map_err(|e| Error::io(&f, e))?;
        parts.push(len.to_le_bytes().to_vec());
        parts.push(head);
        parts.push(tail);
    }
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let c = session.config();
    Ok(ModelFingerprint {
        hidden_size: c.hidden_size,
        num_hidden_layers: c.num_hidden_layers,
        vocab_size: c.vocab_size,
        sha256: sha256_hex(&refs),
    })
}

pub fn adapter_hash(dir: &Path) -> Result<String> {
    let c = dir.join("adapter_config.json");
    let w = dir.join("adapter_model.safetensors");
    let c = std::fs::read(&c).map_err(|e| Error::io(&c, e))?;
    let w = std::fs::read(&w).map_err(|e| Error::io(&w, e))?;
    Ok(sha256_hex(&[&c, &w]))
}

/// Settings of a router training run.
#[derive(Debug, Clone, Serialize)]
pub struct MixerTrainOptions {
    /// Experts kept per token at inference (and in the balance loss's dispatch fraction); 0: soft.
    pub top_k: usize,
    /// Examples used (the first `samples` after a seeded shuffle).
    pub samples: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Weight of the balance term `Σᵢ p̄ᵢ f̄ᵢ`.
    pub alpha: f64,
    /// Weight of the routing-entropy term.
    pub lambda: f64,
    /// What the routers score from.
    pub input: RouterInput,
    /// Weight of routing supervision: for lines that name their expert, the cross-entropy of
    /// every routed token's routing distribution against that expert (LoRA-Mixer's first stage
    /// routes by domain id; 0: off, the plain plug-and-play objective).
    pub supervision: f64,
    pub seed: u64,
}

impl Default for MixerTrainOptions {
    fn default() -> Self {
        Self { top_k: 2, samples: 2000, epochs: 2, batch: 8, lr: 1e-2, alpha: 0.01, lambda: 0.01, input: RouterInput::PromptMean, supervision: 0.0, seed: 0 }
    }
}

/// What a training run reports per step and at the end.
#[derive(Debug, Clone, Serialize)]
pub struct MixerTrainStep {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub task_loss: f64,
    pub balance_loss: f64,
}

/// A tokenized chat example: ids and where its answer starts.
#[derive(Debug, Clone)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub answer_from: usize,
    pub line: usize,
    /// The expert (index into the mixer's expert list) the line names in an `expert` field (or a
    /// `task` field equal to an expert's name), for routing supervision.
    pub expert: Option<usize>,
}

impl LlmSession {
    /// A chat example as the model sees it: the prompt through the chat template (opening the
    /// assistant turn), then the answer and the end-of-sequence token; the loss covers the answer.
    pub fn tokenize_example(&self, ex: &Line<Example>, path: &Path) -> Result<TokenizedExample> {
        let (prompt, answer) = match &ex.value {
            Example::Chat { prompt, completion } => (prompt.as_str(), completion.as_str()),
            Example::Text(_) => {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    message: format!("line {}: the mixer trains on \"prompt\" + \"completion\" examples, not \"text\"", ex.line),
                })
            }
        };
        let mut ids = self.encode_prompt(prompt, true)?;
        let answer_from = ids.len();
        ids.extend(self.encode_raw(answer)?);
        if let Some(&eos) = self.eos_tokens.first() {
            ids.push(eos);
        }
        if ids.len() == answer_from {
            return Err(Error::BadFile { path: path.to_path_buf(), message: format!("line {}: empty completion", ex.line) });
        }
        Ok(TokenizedExample { ids, answer_from, line: ex.line, expert: None })
    }

    /// Tokens of `text` with no special tokens added.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() })
    }

    pub fn mixer(&self) -> Option<&MixerState> {
        self.mixer.as_ref()
    }

    /// The invocation shared by the experts when every one is an activated LoRA with the same
    /// sequence; then the mixer is activated by it.
    fn shared_invocation(&self, experts: &[usize]) -> Option<Vec<u32>> {
        let mut inv: Option<&Vec<u32>> = None;
        for &e in experts {
            match &self.adapters[e].kind {
                AdapterKind::Activated { invocation } => match inv {
                    None => inv = Some(invocation),
                    Some(i) if i == invocation => {}
                    Some(_) => return None,
                },
                AdapterKind::Lora => return None,
            }
        }
        inv.cloned()
    }

    /// Module paths (with input widths) that get a router: every linear some expert has a branch on.
    pub fn routed_modules(&mut self, experts: &[usize]) -> Vec<(String, usize)> {
        self.model
            .linears_mut()
            .into_iter()
            .filter(|(_, l)| l.adapters().iter().any(|a| experts.contains(a)))
            .map(|(n, l)| (n, l.in_features()))
            .collect()
    }

    /// Installs routers (`module -> [E, in]`) over `experts`.
    fn install_routers(&mut self, experts: &[usize], weights: &HashMap<String, Tensor>, top_k: usize, input: RouterInput, trace: &RouterTrace) -> Result<()> {
        let k = (top_k > 0).then_some(top_k);
        for (slot, (name, lin)) in self.model.linears_mut().into_iter().enumerate() {
            lin.clear_router();
            if !lin.adapters().iter().any(|a| experts.contains(a)) {
                continue;
            }
            if let Some(w) = weights.get(&name) {
                lin.set_router(w.clone(), experts, k, Some(trace.clone()), input, slot).map_err(|e| Error::Argument(format!("router {name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Changes how many experts each token keeps (0: soft fusion) without reloading.
    pub fn set_mixer_top_k(&mut self, top_k: usize) -> Result<()> {
        let Some(m) = self.mixer.as_mut() else { return Err(Error::Argument("no mixer is loaded".into())) };
        if top_k > m.experts.len() {
            return Err(Error::Argument(format!("--top-k {top_k}: the mixer has only {} experts", m.experts.len())));
        }
        m.spec.top_k = top_k;
        let k = (top_k > 0).then_some(top_k);
        for (_, lin) in self.model.linears_mut() {
            if let Some(r) = lin.router() {
                let (w, e, t, input, slot) = (r.weight.clone(), r.experts.clone(), r.trace.clone(), r.input, r.slot);
                lin.set_router(w, &e, k, t, input, slot)?;
            }
        }
        Ok(())
    }

    /// Removes the mixer (its experts stay loaded).
    pub fn remove_mixer(&mut self) {
        for (_, lin) in self.model.linears_mut() {
            lin.clear_router();
        }
        self.mixer = None;
    }

    /// Loads a router folder: checks it was trained for this model, loads its experts (from the
    /// adapters already loaded under their names, or from the recorded folders), checks each
    /// expert's content hash, and installs the routers.
    pub fn load_mixer(&mut self, dir: &Path) -> Result<&MixerState> {
        let spec_path = dir.join(MIXER_FILE);
        let text = std::fs::read_to_string(&spec_path).map_err(|e| Error::io(&spec_path, e))?;
        let spec: MixerSpec = serde_json::from_str(&text).map_err(|e| Error::BadFile { path: spec_path.clone(), message: e.to_string() })?;
        if spec.format != FORMAT {
            return Err(Error::BadFile { path: spec_path, message: format!("format {:?}: expected {FORMAT:?}", spec.format) });
        }
        let mine = model_fingerprint(self)?;
        if spec.model != mine {
            return Err(Error::BadFile {
                path: spec_path,
                message: format!(
                    "this router was trained for another model (hidden {}, {} layers, vocab {}, fingerprint {}…), not {} (hidden {}, {} layers, vocab {}, fingerprint {}…)",
                    spec.model.hidden_size,
                    spec.model.num_hidden_layers,
                    spec.model.vocab_size,
                    &spec.model.sha256[..12.min(spec.model.sha256.len())],
                    self.dir.display(),
                    mine.hidden_size,
                    mine.num_hidden_layers,
                    mine.vocab_size,
                    &mine.sha256[..12]
                ),
            });
        }
        let mut experts = vec![];
        for e in &spec.experts {
            let idx = match self.adapter_index(&e.name) {
                Some(i) => i,
                None => {
                    let p = PathBuf::from(&e.path);
                    if !p.join("adapter_config.json").exists() {
                        return Err(Error::BadFile {
                            path: spec_path.clone(),
                            message: format!("expert {:?}: its adapter folder {} is gone (load it with --adapter under the same name)", e.name, e.path),
                        });
                    }
                    self.add_adapter(&p, Some(&e.name))?;
                    self.adapters.len() - 1
                }
            };
            let have = adapter_hash(&self.adapters[idx].path)?;
            if have != e.sha256 {
                return Err(Error::BadFile {
                    path: spec_path.clone(),
                    message: format!(
                        "expert {:?}: the adapter loaded from {} is not the one this router was trained with (content hash differs): a router for another set of adapters",
                        e.name,
                        self.adapters[idx].path.display()
                    ),
                });
            }
            experts.push(idx);
        }
        let wpath = dir.join(&spec.weights);
        let file = crate::weights::SafetensorsFile::open(&wpath)?;
        let want = self.routed_modules(&experts);
        let mut weights = HashMap::new();
        for (m, inf) in &want {
            let key = format!("{m}.router.weight");
            let t = file.load(&key).map_err(|_| Error::BadFile {
                path: wpath.clone(),
                message: format!("no router for {m} (the experts adapt it): a router for another set of adapters"),
            })?;
            let width = spec.router_input.width(*inf);
            if t.dims() != [experts.len(), width] {
                return Err(Error::BadFile {
                    path: wpath.clone(),
                    message: format!("{key}: shape {:?}, expected [{}, {width}] ({} experts, {:?} routing)", t.dims(), experts.len(), experts.len(), spec.router_input),
                });
            }
            weights.insert(m.clone(), t.to_dtype(DType::F32)?.to_device(self.model.device())?);
        }
        let extra: Vec<String> = file.names().into_iter().filter(|n| !want.iter().any(|(m, _)| format!("{m}.router.weight") == *n)).collect();
        if !extra.is_empty() {
            return Err(Error::BadFile {
                path: wpath,
                message: format!("routers for modules the experts do not adapt ({}): a router for another set of adapters", extra.join(", ")),
            });
        }
        let trace: RouterTrace = Arc::new(Mutex::new(vec![]));
        self.install_routers(&experts, &weights, spec.top_k, spec.router_input, &trace)?;
        self.mixer = Some(MixerState { spec, experts, trace });
        Ok(self.mixer.as_ref().unwrap_or_else(|| unreachable!()))
    }

    /// Where routing starts in `ids` (None: no mixer, or its invocation is absent: it is off).
    pub fn mixer_start(&self, ids: &[u32]) -> Option<usize> {
        let m = self.mixer.as_ref()?;
        match &m.spec.invocation_tokens {
            None => Some(0),
            Some(inv) => alora_offset(ids, inv).map(|off| ids.len() - off),
        }
    }

    /// Trains routers over `experts` (adapter indices, frozen) on `examples` and installs them.
    /// `on_step` gets each optimizer step; returning false cancels.
    pub fn train_mixer(
        &mut self,
        experts: &[usize],
        examples: &[TokenizedExample],
        opts: &MixerTrainOptions,
        on_step: &mut dyn FnMut(&MixerTrainStep) -> bool,
    ) -> Result<Vec<MixerTrainStep>> {
        if experts.len() < 2 {
            return Err(Error::Argument(format!("a mixer needs at least 2 experts, got {}", experts.len())));
        }
        if opts.top_k > experts.len() {
            return Err(Error::Argument(format!("--top-k {}: only {} experts", opts.top_k, experts.len())));
        }
        if examples.is_empty() || opts.batch == 0 || opts.epochs == 0 {
            return Err(Error::Argument("nothing to train on (no examples, batch 0 or 0 epochs)".into()));
        }
        self.remove_mixer();
        let modules = self.routed_modules(experts);
        if modules.is_empty() {
            return Err(Error::Argument("the experts adapt no linear layer".into()));
        }
        let dev = self.model.device().clone();
        let e = experts.len();
        let mut vars = vec![];
        let mut weights = HashMap::new();
        for (m, inf) in &modules {
            // Zero init: every router starts as the uniform average of the experts.
            let v = Var::zeros((e, opts.input.width(*inf)), DType::F32, &dev)?;
            weights.insert(m.clone(), v.as_tensor().clone());
            vars.push(v);
        }
        // Training fuses softly; top-k is for inference.
        self.set_mixer_as(experts, &weights, 0, Some(opts.input))?;
        let trace = {
            let m = self.mixer.as_mut().ok_or_else(|| Error::Argument("no mixer after install".into()))?;
            m.spec.top_k = opts.top_k;
            m.spec.training = serde_json::to_value(opts).unwrap_or(Value::Null);
            m.trace.clone()
        };

        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = crate::rng::TorchCpuRng::new(opts.seed);
        shuffle(&mut order, &mut rng);
        order.truncate(opts.samples.max(1).min(examples.len()));
        let per_epoch = order.len().div_ceil(opts.batch);
        let steps = per_epoch * opts.epochs;
        let mut adamw = AdamW::new(vars.clone(), ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() })?;
        let was = loramix_kernels::differentiable();
        loramix_kernels::set_differentiable(true);
        let result = (|| -> Result<Vec<MixerTrainStep>> {
            let mut log = vec![];
            let mut step = 0;
            for _ in 0..opts.epochs {
                shuffle(&mut order, &mut rng);
                for chunk in order.chunks(opts.batch) {
                    trace.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    let mut task = Tensor::zeros((), DType::F32, &dev)?;
                    let mut probs = vec![];
                    let mut sup = Tensor::zeros((), DType::F32, &dev)?;
                    let mut supervised = 0usize;
                    for &i in chunk {
                        task = (task + self.answer_loss(&examples[i])?)?;
                        let mine = std::mem::take(&mut *trace.lock().unwrap_or_else(|p| p.into_inner()));
                        if let (Some(want), true) = (examples[i].expert, opts.supervision > 0.0) {
                            for p in &mine {
                                let lp = p.clamp(1e-9, 1.0)?.log()?.narrow(1, want, 1)?.mean_all()?;
                                sup = (sup - (lp / mine.len() as f64)?)?;
                            }
                            supervised += 1;
                        }
                        probs.extend(mine);
                    }
                    let task = (task / chunk.len() as f64)?;
                    let bal = balance_loss(&probs, modules.len(), opts.alpha, opts.lambda)?;
                    let mut loss = (&task + &bal)?;
                    if supervised > 0 {
                        loss = (loss + (sup * (opts.supervision / supervised as f64))?)?;
                    }
                    adamw.backward_step(&loss)?;
                    step += 1;
                    let s = MixerTrainStep {
                        step,
                        steps,
                        loss: loss.to_scalar::<f32>()? as f64,
                        task_loss: task.to_scalar::<f32>()? as f64,
                        balance_loss: bal.to_scalar::<f32>()? as f64,
                    };
                    let go = on_step(&s);
                    log.push(s);
                    if !go {
                        return Err(Error::Cancelled);
                    }
                }
            }
            Ok(log)
        })();
        loramix_kernels::set_differentiable(was);
        trace.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let log = result?;
        // Freeze: the trained weights become plain tensors, routed top-k at inference.
        let frozen: HashMap<String, Tensor> =
            modules.iter().zip(&vars).map(|((m, _), v)| Ok((m.clone(), v.as_tensor().detach().copy()?))).collect::<Result<_>>()?;
        self.install_routers(experts, &frozen, opts.top_k, opts.input, &trace)?;
        Ok(log)
    }

    /// Mean cross-entropy of the answer tokens of `ex` with the mixer on.
    fn answer_loss(&self, ex: &TokenizedExample) -> Result<Tensor> {
        let from = self.mixer_start(&ex.ids).unwrap_or(ex.ids.len());
        let mut cache = self.model.new_cache();
        // Prompt and answer run in one chunk: the answer's positions are generated ones.
        cache.pools.prompt_end = Some(ex.answer_from);
        let logits = self.model.forward(&ex.ids, &mut cache, &[ActiveAdapter { adapter: MIXER, from }], true)?;
        let n = ex.ids.len() - ex.answer_from;
        let pred = logits.narrow(0, ex.answer_from - 1, n)?;
        let target = Tensor::new(&ex.ids[ex.answer_from..], logits.device())?;
        Ok(candle_nn::loss::cross_entropy(&pred, &target)?)
    }

    /// Saves the installed mixer to `dir` (created if needed).
    pub fn save_mixer(&self, dir: &Path, extra_training: Value) -> Result<PathBuf> {
        let m = self.mixer.as_ref().ok_or_else(|| Error::Argument("no mixer to save".into()))?;
        let mut tensors = vec![];
        for (name, w) in &self.model.routers() {
            let v = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            tensors.push((format!("{name}.router.weight"), w.dims().to_vec(), crate::weights::f32_le_bytes(&v)));
        }
        let bytes = crate::weights::safetensors_bytes(safetensors::Dtype::F32, &tensors, None, "routers")?;
        let file = format!("routers-{}.safetensors", &sha256_hex(&[&bytes])[..12]);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::output::write_atomic(&dir.join(&file), &bytes)?;
        let mut spec = m.spec.clone();
        spec.weights = file.clone();
        if let (Value::Object(t), Value::Object(x)) = (&mut spec.training, extra_training) {
            t.extend(x);
        }
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| Error::Argument(e.to_string()))?;
        let spec_path = dir.join(MIXER_FILE);
        crate::output::write_atomic(&spec_path, &json)?;
        // Older weights files are no longer referenced.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for ent in rd.flatten() {
                let n = ent.file_name().to_string_lossy().into_owned();
                if n.starts_with("routers-") && n.ends_with(".safetensors") && n != file {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        Ok(spec_path)
    }

    /// Routing statistics of the forwards since the last call: for each router (forward order
    /// within one model pass), the share of routed tokens whose top-1 expert is each expert.
    pub fn take_routing_trace(&self) -> Vec<Tensor> {
        match &self.mixer {
            Some(m) => std::mem::take(&mut *m.trace.lock().unwrap_or_else(|p| p.into_inner())),
            None => vec![],
        }
    }
}

/// LoRA-Mixer's routing specialization loss (its Eq. 5) over one batch, for each router
/// `α · Σᵢ p̄ᵢ f̄ᵢ − λ · H̄`, averaged over routers: `p̄ᵢ` is the mean routing probability of
/// expert i over the routed tokens, `f̄ᵢ` the fraction of tokens whose top-1 expert is i (the
/// paper's Eq. 3; a count, so no gradient flows through it), `H̄` the mean per-token entropy of
/// the routing distribution. The sign is the paper's as printed: a positive λ rewards spread
/// routing (the paper's text and its convergence appendix disagree on this; the ablation in
/// BENCHMARKS.md measures λ = 0 against it).
/// `probs` holds `routers` tensors `[n, E]` per forward, in forward order.
pub fn balance_loss(probs: &[Tensor], routers: usize, alpha: f64, lambda: f64) -> Result<Tensor> {
    let Some(first) = probs.first() else { return Err(Error::Argument("no routing probabilities were recorded".into())) };
    let dev = first.device().clone();
    if (alpha == 0.0 && lambda == 0.0) || routers == 0 {
        return Ok(Tensor::zeros((), DType::F32, &dev)?);
    }
    let mut total = Tensor::zeros((), DType::F32, &dev)?;
    for r in 0..routers {
        let parts: Vec<&Tensor> = probs.iter().skip(r).step_by(routers).collect();
        let p = Tensor::cat(&parts, 0)?;
        let mean_p = p.mean(0)?;
        let f = loramix_models::llm::top_k_renormalised(&p.detach(), 1)?.gt(0.0)?.to_dtype(DType::F32)?.mean(0)?;
        let balance = ((mean_p * f)?.sum_all()? * alpha)?;
        let ent = (p.clamp(1e-9, 1.0)?.log()? * &p)?.sum(D::Minus1)?.neg()?.mean_all()?;
        total = (total + (balance - (ent * lambda)?)?)?;
    }
    Ok((total / routers as f64)?)
}


/// The outcome of [`train_router_folder`].
#[derive(Debug, Clone, Serialize)]
pub struct MixerTrainReport {
    pub out: PathBuf,
    pub experts: Vec<String>,
    pub routers: usize,
    pub trainable: usize,
    pub samples: usize,
    pub steps: usize,
    pub seconds: f64,
    pub final_loss: f64,
    /// Mean loss over each run of 25 steps.
    pub loss_curve: Vec<f64>,
    pub activated: bool,
}

/// The whole plug-and-play run the CLI and the app share: load the experts into `session`
/// (frozen), read and tokenize `data`, train the routers, save them to `out`.
pub fn train_router_folder(
    session: &mut LlmSession,
    adapters: &[PathBuf],
    data: &Path,
    out: &Path,
    opts: &MixerTrainOptions,
    on_step: &mut dyn FnMut(&MixerTrainStep) -> bool,
) -> Result<MixerTrainReport> {
    let mut experts = vec![];
    for dir in adapters {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let idx = match session.adapter_index(&name) {
            Some(i) if session.adapters[i].path == *dir => i,
            _ => {
                session.add_adapter(dir, None)?;
                session.adapters.len() - 1
            }
        };
        experts.push(idx);
    }
    let lines = super::data::read_examples(data)?;
    let names: Vec<String> = experts.iter().map(|&i| session.adapters[i].name.clone()).collect();
    let mut examples = lines.iter().map(|l| session.tokenize_example(l, data)).collect::<Result<Vec<_>>>()?;
    for (ex, l) in examples.iter_mut().zip(&lines) {
        ex.expert = expert_label(&l.raw, &names);
    }
    if opts.supervision > 0.0 && examples.iter().all(|e| e.expert.is_none()) {
        return Err(Error::BadFile {
            path: data.to_path_buf(),
            message: format!("routing supervision needs lines with an \"expert\" (or \"task\") field naming one of {}", names.join(", ")),
        });
    }
    let t0 = std::time::Instant::now();
    let log = session.train_mixer(&experts, &examples, opts, on_step)?;
    let seconds = t0.elapsed().as_secs_f64();
    let samples = opts.samples.min(examples.len());
    let extra = serde_json::json!({"data": data.to_string_lossy(), "samples_used": samples, "seconds": seconds,
        "final_loss": log.last().map(|s| s.loss)});
    session.save_mixer(out, extra)?;
    let m = session.mixer().ok_or_else(|| Error::Argument("no mixer after training".into()))?;
    let routers = m.spec.modules.len();
    let trainable = session.model.routers().iter().map(|(_, w)| w.elem_count()).sum();
    Ok(MixerTrainReport {
        out: out.to_path_buf(),
        experts: m.spec.experts.iter().map(|e| e.name.clone()).collect(),
        routers,
        trainable,
        samples,
        steps: log.len(),
        seconds,
        final_loss: log.last().map_or(f64::NAN, |s| s.loss),
        loss_curve: log.chunks(25).map(|c| c.iter().map(|s| s.loss).sum::<f64>() / c.len() as f64).collect(),
        activated: m.spec.invocation_tokens.is_some(),
    })
}

/// The expert a training line names: its `expert` field, else its `task` field, when equal to
/// an expert's name.
pub fn expert_label(raw: &Value, names: &[String]) -> Option<usize> {
    ["expert", "task"].iter().find_map(|k| raw.get(*k).and_then(Value::as_str).and_then(|v| names.iter().position(|n| n == v)))
}

/// For each expert, the share of top-1 routing decisions (over every router and routed token)
/// in a trace.
pub fn top1_share(trace: &[Tensor]) -> Result<Vec<f64>> {
    let mut counts: Vec<f64> = vec![];
    let mut total = 0f64;
    for p in trace {
        let rows = p.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for r in rows {
            if counts.len() < r.len() {
                counts.resize(r.len(), 0.0);
            }
            counts[loramix_models::llm::argmax(&r) as usize] += 1.0;
            total += 1.0;
        }
    }
    Ok(counts.into_iter().map(|c| if total > 0.0 { c / total } else { 0.0 }).collect())
}

impl LlmSession {
    /// Installs routers given directly (`module -> [E, in]`) over `experts`, e.g. from another
    /// implementation; the mixer is activated when every expert is an aLoRA with one invocation.
    pub fn set_mixer(&mut self, experts: &[usize], weights: &HashMap<String, Tensor>, top_k: usize) -> Result<()> {
        self.set_mixer_as(experts, weights, top_k, None)
    }

    /// [`Self::set_mixer`] with what the routers score from; `None`: read from the weights'
    /// width (`2·in`: the causal mean, `in`: the token alone).
    pub fn set_mixer_as(&mut self, experts: &[usize], weights: &HashMap<String, Tensor>, top_k: usize, input: Option<RouterInput>) -> Result<()> {
        self.remove_mixer();
        let want = self.routed_modules(experts);
        for (m, inf) in &want {
            let w = weights.get(m).ok_or_else(|| Error::Argument(format!("no router for {m}, which an expert adapts")))?;
            if let Some(i) = input {
                if w.dim(1)? != i.width(*inf) {
                    return Err(Error::Argument(format!("router for {m}: {} columns, expected {} for {i:?}", w.dim(1)?, i.width(*inf))));
                }
            }
        }
        let input = match (input, want.first()) {
            (Some(i), _) => i,
            (None, Some((m, inf))) if weights[m].dim(1)? == 2 * inf => RouterInput::CausalMean,
            _ => RouterInput::Token,
        };
        let trace: RouterTrace = Arc::new(Mutex::new(vec![]));
        self.install_routers(experts, weights, top_k, input, &trace)?;
        let spec = MixerSpec {
            format: FORMAT.into(),
            model: model_fingerprint(self)?,
            experts: experts
                .iter()
                .map(|&i| {
                    let a = &self.adapters[i];
                    let path = std::fs::canonicalize(&a.path).unwrap_or_else(|_| a.path.clone());
                    Ok(ExpertSpec { name: a.name.clone(), path: path.to_string_lossy().into_owned(), sha256: adapter_hash(&a.path)? })
                })
                .collect::<Result<Vec<_>>>()?,
            top_k,
            invocation_tokens: self.shared_invocation(experts),
            modules: want.iter().map(|(m, _)| m.clone()).collect(),
            router_input: input,
            weights: String::new(),
            training: Value::Null,
        };
        self.mixer = Some(MixerState { spec, experts: experts.to_vec(), trace });
        Ok(())
    }
}
