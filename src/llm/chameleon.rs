//! ChameleonLLM (arXiv 2502.04315): batch-aware adaptation at inference time. The inputs of a
//! batch are clustered by their mean input-token embedding (L2-normalised, k-means), each
//! cluster becomes a batch, and a small hypernetwork turns the batch's mean embedding into a
//! low-rank update of the LM head, `logits = W h + s · B (A h)`.
//!
//! Unlike the reference code, the feature averages non-pad positions only (our prompts are
//! unpadded; a pad id, if any, is still excluded), training losses cover real tokens only, and
//! training batches are formed by clusters of the training set, as inference forms them.
//!
//! A hypernetwork folder holds `chameleon.json` (shapes, the model it adapts, how it was trained)
//! and `hypernet-<hash>.safetensors`, written in that order of safety (weights first, named by
//! content; the JSON that points to them last).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loramix_models::llm::LoraBranch;
use serde::{Deserialize, Serialize};

use super::data::{Example, Line};
use super::mixer::{model_fingerprint, ModelFingerprint};
use super::LlmSession;
use crate::error::{Error, Result};
use crate::rng::shuffle;

pub const CHAMELEON_FILE: &str = "chameleon.json";
const FORMAT: &str = "loramix-chameleon/1";

/// Hidden widths of the hypernetwork (the reference's 64 and 32).
pub const HIDDEN: [usize; 2] = [64, 32];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChameleonSpec {
    pub format: String,
    pub model: ModelFingerprint,
    /// Input width (the model's hidden size) and LM-head output width (vocabulary).
    pub embed_dim: usize,
    pub vocab_size: usize,
    pub rank: usize,
    pub scale: f64,
    pub hidden: Vec<usize>,
    /// Clusters per inference batch (capped by the batch's size).
    pub clusters: usize,
    pub weights: String,
    #[serde(default)]
    pub training: serde_json::Value,
}

/// The hypernetwork: feature → 64 → ReLU → 32 → ReLU → (A `[r, d]`, B `[V, r]`).
#[derive(Debug, Clone)]
pub struct HyperNetwork {
    /// `(weight [out, in], bias [out])` per layer.
    pub layers: Vec<(Tensor, Tensor)>,
    pub rank: usize,
    pub embed_dim: usize,
    pub vocab_size: usize,
    pub scale: f64,
}

impl HyperNetwork {
    /// Random initialisation (PyTorch's Linear default: U(±1/√in)); the last layer is scaled
    /// down so that the first updates are small.
    pub fn init(embed_dim: usize, vocab_size: usize, rank: usize, scale: f64, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = crate::rng::TorchCpuRng::new(seed);
        let out = rank * (embed_dim + vocab_size);
        let dims = [embed_dim, HIDDEN[0], HIDDEN[1], out];
        let mut layers = vec![];
        for l in 0..3 {
            let (i, o) = (dims[l], dims[l + 1]);
            let bound = 1.0 / (i as f32).sqrt() * if l == 2 { 0.1 } else { 1.0 };
            let w: Vec<f32> = (0..o * i).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
            let b: Vec<f32> = (0..o).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
            layers.push((Tensor::from_vec(w, (o, i), device)?, Tensor::from_vec(b, o, device)?));
        }
        Ok(Self { layers, rank, embed_dim, vocab_size, scale })
    }

    pub fn parameter_count(&self) -> usize {
        self.layers.iter().map(|(w, b)| w.elem_count() + b.elem_count()).sum()
    }

    /// (A `[r, d]`, B `[V, r]`) for a batch feature `[d]`.
    pub fn forward(&self, feature: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = feature.unsqueeze(0)?;
        for (l, (w, b)) in self.layers.iter().enumerate() {
            x = x.matmul(&w.t()?)?.broadcast_add(b)?;
            if l + 1 < self.layers.len() {
                x = x.relu()?;
            }
        }
        let x = x.squeeze(0)?;
        let (r, d, v) = (self.rank, self.embed_dim, self.vocab_size);
        let a = x.narrow(0, 0, r * d)?.reshape((r, d))?;
        let b = x.narrow(0, r * d, v * r)?.reshape((v, r))?;
        Ok((a, b))
    }
}

/// Lloyd's k-means with squared Euclidean distance from the given centres, `iters` rounds
/// (stopping early once no label changes, which cannot change the result). Ties go to the lower
/// centre index; an empty cluster keeps its centre. Returns (labels, centres).
pub fn kmeans(points: &[Vec<f32>], init: &[Vec<f32>], iters: usize) -> (Vec<usize>, Vec<Vec<f32>>) {
    let mut centres: Vec<Vec<f64>> = init.iter().map(|c| c.iter().map(|&x| x as f64).collect()).collect();
    let d = points.first().map_or(0, |p| p.len());
    let mut labels = vec![usize::MAX; points.len()];
    let assign = |centres: &[Vec<f64>], labels: &mut [usize]| -> bool {
        let mut changed = false;
        for (p, l) in points.iter().zip(labels.iter_mut()) {
            let mut best = (f64::INFINITY, 0);
            for (k, c) in centres.iter().enumerate() {
                let dist: f64 = p.iter().zip(c).map(|(&x, &y)| (x as f64 - y) * (x as f64 - y)).sum();
                if dist < best.0 {
                    best = (dist, k);
                }
            }
            if *l != best.1 {
                *l = best.1;
                changed = true;
            }
        }
        changed
    };
    for _ in 0..iters {
        if !assign(&centres, &mut labels) {
            break;
        }
        let mut sums = vec![vec![0f64; d]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for (p, &l) in points.iter().zip(&labels) {
            counts[l] += 1;
            for (s, &x) in sums[l].iter_mut().zip(p) {
                *s += x as f64;
            }
        }
        for k in 0..centres.len() {
            if counts[k] > 0 {
                centres[k] = sums[k].iter().map(|s| s / counts[k] as f64).collect();
            }
        }
    }
    // The labels of the final centres (sklearn reports these too).
    assign(&centres, &mut labels);
    (labels, centres.into_iter().map(|c| c.into_iter().map(|x| x as f32).collect()).collect())
}

/// k-means++ seeding (the first centre uniformly, then each with probability ∝ squared distance
/// to the nearest chosen one), deterministic for a seed.
pub fn kmeans_plus_plus(points: &[Vec<f32>], k: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = crate::rng::TorchCpuRng::new(seed);
    let n = points.len();
    if n == 0 || k == 0 {
        return vec![];
    }
    let dist = |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum() };
    let mut centres = vec![points[((rng.uniform() as f64 * n as f64) as usize).min(n - 1)].clone()];
    let mut nearest: Vec<f64> = points.iter().map(|p| dist(p, &centres[0])).collect();
    while centres.len() < k.min(n) {
        let total: f64 = nearest.iter().sum();
        let pick = if total <= 0.0 {
            centres.len()
        } else {
            let mut r = rng.uniform() as f64 * total;
            let mut i = 0;
            while i + 1 < n && r >= nearest[i] {
                r -= nearest[i];
                i += 1;
            }
            i
        };
        centres.push(points[pick.min(n - 1)].clone());
        for (d, p) in nearest.iter_mut().zip(points) {
            *d = d.min(dist(p, centres.last().unwrap_or_else(|| unreachable!())));
        }
    }
    centres
}

/// Settings of a hypernetwork training run.
#[derive(Debug, Clone, Serialize)]
pub struct ChameleonTrainOptions {
    pub rank: usize,
    pub scale: f64,
    pub clusters: usize,
    pub batch: usize,
    pub epochs: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for ChameleonTrainOptions {
    fn default() -> Self {
        Self { rank: 4, scale: 1.0, clusters: 4, batch: 16, epochs: 8, lr: 1e-3, seed: 0 }
    }
}

impl ChameleonTrainOptions {
    /// Each option in its range, named as the command line names it.
    pub fn check(&self) -> Result<()> {
        for (flag, v) in [("--rank", self.rank), ("--clusters", self.clusters), ("--batch", self.batch), ("--epochs", self.epochs)] {
            if v == 0 {
                return Err(Error::Argument(format!("{flag} 0: expected at least 1")));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Argument(format!("--lr {}: expected a positive number", self.lr)));
        }
        if !self.scale.is_finite() {
            return Err(Error::Argument(format!("scale {}: expected a finite number", self.scale)));
        }
        Ok(())
    }
}

/// A sequence prepared for LM-head training: the frozen model's final hidden states and the
/// next-token targets of every real position, and its clustering feature.
#[derive(Debug, Clone)]
pub struct HeadExample {
    /// `[n, d]`: hidden states of positions 0..t-1.
    pub hidden: Tensor,
    /// `[n]`: tokens 1..t.
    pub targets: Tensor,
    pub feature: Vec<f32>,
    pub line: usize,
}

/// Per-step training report.
#[derive(Debug, Clone, Serialize)]
pub struct ChameleonStep {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

impl LlmSession {
    /// The clustering feature of a token sequence: the mean input embedding over non-pad
    /// positions, L2-normalised.
    pub fn mean_embedding(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let pad = self.model.config.pad_token_id;
        let real: Vec<u32> = ids.iter().copied().filter(|&t| Some(t) != pad).collect();
        if real.is_empty() {
            return Err(Error::Argument("no non-pad tokens to embed".into()));
        }
        let m = self.model.embed(&real)?.to_dtype(DType::F32)?.mean(0)?;
        let v = m.to_vec1::<f32>()?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        Ok(v.into_iter().map(|x| x / norm).collect())
    }

    /// Tokens of a training line: a chat turn through the template plus answer and end token,
    /// or plain text.
    pub fn example_tokens(&self, ex: &Example) -> Result<Vec<u32>> {
        match ex {
            Example::Chat { prompt, completion } => {
                let mut ids = self.encode_prompt(prompt, true)?;
                ids.extend(self.encode_raw(completion)?);
                ids.extend(self.eos_tokens.first());
                Ok(ids)
            }
            Example::Text(t) => {
                let mut ids = self.encode_raw(t)?;
                ids.extend(self.eos_tokens.first());
                Ok(ids)
            }
        }
    }

    /// Runs the frozen model once over each example (the head is all that trains).
    pub fn head_examples(&self, lines: &[Line<Example>], path: &Path) -> Result<Vec<HeadExample>> {
        let mut out = vec![];
        for l in lines {
            let ids = self.example_tokens(&l.value)?;
            if ids.len() < 2 {
                return Err(Error::BadFile { path: path.to_path_buf(), message: format!("line {}: fewer than 2 tokens", l.line) });
            }
            let ids = &ids[..ids.len().min(self.model.config.max_position_embeddings)];
            let mut cache = self.model.new_cache();
            let h = self.model.forward_hidden(&ids[..ids.len() - 1], &mut cache, &[])?.squeeze(0)?.to_dtype(DType::F32)?;
            out.push(HeadExample {
                hidden: h,
                targets: Tensor::new(&ids[1..], self.model.device())?,
                feature: self.mean_embedding(ids)?,
                line: l.line,
            });
        }
        Ok(out)
    }

    /// The LM head's weight `[V, d]` as f32.
    pub fn head_weight(&self) -> Result<Tensor> {
        Ok(self.model.lm_head().weight().to_dtype(DType::F32)?)
    }

    /// Attaches `(a, b)` to the LM head as a temporary adapter; returns its index for
    /// [`Self::reply`]'s `enabled` list. Undo with [`Self::detach_head_adapter`].
    pub fn attach_head_adapter(&mut self, name: &str, a: Tensor, b: Tensor, scale: f64) -> Result<usize> {
        let index = self.adapters.len();
        let dt = self.model.lm_head().weight().dtype();
        self.model
            .lm_head_mut()
            .attach(LoraBranch { adapter: index, a: a.to_dtype(dt)?, b: b.to_dtype(dt)?, scale })
            .map_err(|e| Error::Argument(format!("head adapter: {e}")))?;
        self.adapters.push(super::LlmAdapter {
            name: name.to_string(),
            path: PathBuf::new(),
            kind: super::AdapterKind::Lora,
            invocation_string: None,
            rank: 0,
            alpha: 0.0,
            modules: vec!["lm_head".into()],
        });
        Ok(index)
    }

    pub fn detach_head_adapter(&mut self, index: usize) {
        self.model.lm_head_mut().detach(index);
        if index + 1 == self.adapters.len() {
            self.adapters.pop();
        }
    }

    /// Loads a hypernetwork folder, checking it fits this model.
    pub fn load_chameleon(&self, dir: &Path) -> Result<(ChameleonSpec, HyperNetwork)> {
        let spec_path = dir.join(CHAMELEON_FILE);
        let text = std::fs::read_to_string(&spec_path).map_err(|e| Error::io(&spec_path, e))?;
        let spec: ChameleonSpec = serde_json::from_str(&text).map_err(|e| Error::BadFile { path: spec_path.clone(), message: e.to_string() })?;
        if spec.format != FORMAT {
            return Err(Error::BadFile { path: spec_path, message: format!("format {:?}: expected {FORMAT:?}", spec.format) });
        }
        let c = self.config();
        if spec.embed_dim != c.hidden_size || spec.vocab_size != c.vocab_size {
            return Err(Error::BadFile {
                path: spec_path,
                message: format!(
                    "the hypernetwork's shapes do not fit this model: it adapts a head {} -> {}, the model's is {} -> {}",
                    spec.embed_dim, spec.vocab_size, c.hidden_size, c.vocab_size
                ),
            });
        }
        let wpath = dir.join(&spec.weights);
        let file = crate::weights::SafetensorsFile::open(&wpath)?;
        let dims = [spec.embed_dim, HIDDEN[0], HIDDEN[1], spec.rank * (spec.embed_dim + spec.vocab_size)];
        let mut layers = vec![];
        for l in 0..3 {
            let load = |k: &str, want: &[usize]| -> Result<Tensor> {
                let t = file.load(k).map_err(|_| Error::BadFile { path: wpath.clone(), message: format!("missing tensor {k}") })?;
                if t.dims() != want {
                    return Err(Error::BadFile {
                        path: wpath.clone(),
                        message: format!("{k}: shape {:?}, expected {want:?} (rank {}, head {} -> {}): the hypernetwork's shapes do not fit", t.dims(), spec.rank, spec.embed_dim, spec.vocab_size),
                    });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(self.model.device())?)
            };
            layers.push((load(&format!("layers.{l}.weight"), &[dims[l + 1], dims[l]])?, load(&format!("layers.{l}.bias"), &[dims[l + 1]])?));
        }
        let net = HyperNetwork { layers, rank: spec.rank, embed_dim: spec.embed_dim, vocab_size: spec.vocab_size, scale: spec.scale };
        Ok((spec, net))
    }

    /// Saves a trained hypernetwork.
    pub fn save_chameleon(&self, dir: &Path, net: &HyperNetwork, clusters: usize, training: serde_json::Value) -> Result<PathBuf> {
        let mut tensors = vec![];
        for (l, (w, b)) in net.layers.iter().enumerate() {
            for (k, t) in [("weight", w), ("bias", b)] {
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                tensors.push((format!("layers.{l}.{k}"), t.dims().to_vec(), crate::weights::f32_le_bytes(&v)));
            }
        }
        let bytes = crate::weights::safetensors_bytes(safetensors::Dtype::F32, &tensors, None, "hypernetwork")?;
        let file = format!("hypernet-{}.safetensors", &super::mixer::sha256_hex(&[&bytes])[..12]);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::output::write_atomic(&dir.join(&file), &bytes)?;
        let spec = ChameleonSpec {
            format: FORMAT.into(),
            model: model_fingerprint(self)?,
            embed_dim: net.embed_dim,
            vocab_size: net.vocab_size,
            rank: net.rank,
            scale: net.scale,
            hidden: HIDDEN.to_vec(),
            clusters,
            weights: file.clone(),
            training,
        };
        let path = dir.join(CHAMELEON_FILE);
        crate::output::write_atomic(&path, &serde_json::to_vec_pretty(&spec).map_err(|e| Error::Argument(e.to_string()))?)?;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for ent in rd.flatten() {
                let n = ent.file_name().to_string_lossy().into_owned();
                if n.starts_with("hypernet-") && n != file {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        Ok(path)
    }
}

/// Batches of indices: each cluster split into runs of `batch`, shuffled as a whole.
pub fn cluster_batches(labels: &[usize], batch: usize, rng: &mut crate::rng::TorchCpuRng) -> Vec<Vec<usize>> {
    let k = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut out = vec![];
    for c in 0..k {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        shuffle(&mut members, rng);
        for ch in members.chunks(batch.max(1)) {
            out.push(ch.to_vec());
        }
    }
    shuffle(&mut out, rng);
    out
}


/// The mean of some features, L2-normalised (a batch's feature).
pub fn batch_feature(features: &[&[f32]], device: &Device) -> Result<Tensor> {
    let d = features.first().map_or(0, |f| f.len());
    let mut m = vec![0f32; d];
    for f in features {
        for (a, b) in m.iter_mut().zip(f.iter()) {
            *a += b / features.len() as f32;
        }
    }
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    Ok(Tensor::from_vec(m.into_iter().map(|x| x / norm).collect::<Vec<_>>(), d, device)?)
}

/// Summed next-token NLL (and token count) of a batch under `W h + s · B (A h)`.
pub fn head_nll(w: &Tensor, ab: Option<(&Tensor, &Tensor, f64)>, batch: &[&HeadExample]) -> Result<(Tensor, usize)> {
    let h = Tensor::cat(&batch.iter().map(|e| e.hidden.clone()).collect::<Vec<_>>(), 0)?;
    let t = Tensor::cat(&batch.iter().map(|e| e.targets.clone()).collect::<Vec<_>>(), 0)?;
    let mut logits = h.matmul(&w.t()?)?;
    if let Some((a, b, s)) = ab {
        logits = (logits + (h.matmul(&a.t()?)?.matmul(&b.t()?)? * s)?)?;
    }
    let n = t.dim(0)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = lsm.gather(&t.unsqueeze(1)?, 1)?.sum_all()?.neg()?;
    Ok((nll, n))
}

/// Trains the hypernetwork on cluster-formed batches of `examples`.
pub fn train_hypernetwork(
    w: &Tensor,
    examples: &[HeadExample],
    opts: &ChameleonTrainOptions,
    mut net: HyperNetwork,
    on_step: &mut dyn FnMut(&ChameleonStep) -> bool,
) -> Result<HyperNetwork> {
    opts.check()?;
    if examples.is_empty() {
        return Err(Error::Argument("no training examples".into()));
    }
    let dev = w.device().clone();
    let vars: Vec<(Var, Var)> =
        net.layers.iter().map(|(a, b)| Ok((Var::from_tensor(a)?, Var::from_tensor(b)?))).collect::<Result<_>>()?;
    net.layers = vars.iter().map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone())).collect();
    let mut opt = AdamW::new(
        vars.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect(),
        ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let feats: Vec<Vec<f32>> = examples.iter().map(|e| e.feature.clone()).collect();
    let init = kmeans_plus_plus(&feats, opts.clusters.min(feats.len()), opts.seed);
    let (labels, _) = kmeans(&feats, &init, 10);
    let mut rng = crate::rng::TorchCpuRng::new(opts.seed ^ 0x5eed);
    let steps_per = cluster_batches(&labels, opts.batch, &mut crate::rng::TorchCpuRng::new(0)).len();
    let steps = steps_per * opts.epochs;
    let mut step = 0;
    for _ in 0..opts.epochs {
        for b in cluster_batches(&labels, opts.batch, &mut rng) {
            let members: Vec<&HeadExample> = b.iter().map(|&i| &examples[i]).collect();
            let f = batch_feature(&members.iter().map(|e| e.feature.as_slice()).collect::<Vec<_>>(), &dev)?;
            let (a, bm) = net.forward(&f)?;
            let (nll, n) = head_nll(w, Some((&a, &bm, net.scale)), &members)?;
            let loss = (nll / n as f64)?;
            opt.backward_step(&loss)?;
            step += 1;
            let s = ChameleonStep { step, steps, loss: loss.to_scalar::<f32>()? as f64 };
            if !on_step(&s) {
                return Err(Error::Cancelled);
            }
        }
    }
    net.layers = vars.iter().map(|(a, b)| Ok((a.as_tensor().detach().copy()?, b.as_tensor().detach().copy()?))).collect::<Result<_>>()?;
    Ok(net)
}

/// Perplexity-style totals of `examples` adapted by `ab` (None: the base head).
pub fn total_nll(w: &Tensor, ab: Option<(&Tensor, &Tensor, f64)>, examples: &[&HeadExample]) -> Result<(f64, usize)> {
    let (nll, n) = head_nll(w, ab, examples)?;
    Ok((nll.to_scalar::<f32>()? as f64, n))
}

/// The outcome of [`train_hypernetwork_folder`].
#[derive(Debug, Clone, Serialize)]
pub struct ChameleonTrainReport {
    pub out: PathBuf,
    pub examples: usize,
    pub trainable: usize,
    pub steps: usize,
    pub seconds: f64,
    pub final_loss: f64,
}

/// The run the CLI and the app share: read `data`, run the frozen model once per example, train
/// the hypernetwork on cluster batches, save it to `out`.
pub fn train_hypernetwork_folder(
    session: &LlmSession,
    data: &Path,
    out: &Path,
    opts: &ChameleonTrainOptions,
    on_step: &mut dyn FnMut(&ChameleonStep) -> bool,
) -> Result<ChameleonTrainReport> {
    opts.check()?;
    let lines = super::data::read_examples(data)?;
    let t0 = std::time::Instant::now();
    let examples = session.head_examples(&lines, data)?;
    let w = session.head_weight()?;
    let c = session.config();
    let net = HyperNetwork::init(c.hidden_size, c.vocab_size, opts.rank, opts.scale, opts.seed, w.device())?;
    let trainable = net.parameter_count();
    let mut last = f64::NAN;
    let mut steps = 0;
    let net = train_hypernetwork(&w, &examples, opts, net, &mut |s| {
        last = s.loss;
        steps = s.step;
        on_step(s)
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let training = serde_json::json!({"data": data.to_string_lossy(), "options": opts, "examples": examples.len(),
        "seconds": seconds, "final_loss": last});
    session.save_chameleon(out, &net, opts.clusters, training)?;
    Ok(ChameleonTrainReport { out: out.to_path_buf(), examples: examples.len(), trainable, steps, seconds, final_loss: last })
}

/// One answered prompt of a batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchAnswer {
    pub index: usize,
    pub line: usize,
    pub prompt: String,
    pub cluster: usize,
    pub answer: String,
    pub tokens: usize,
}

/// Answers a batch of prompts the ChameleonLLM way: cluster the prompts by their mean token
/// embedding, generate one head adaptation per cluster from the cluster's mean feature, and
/// answer each prompt with its cluster's adaptation. Answers come back in input order.
/// `on_done` gets (answered, total) and may cancel.
pub fn answer_batch(
    session: &mut LlmSession,
    prompts: &[Line<String>],
    hyper: Option<(&ChameleonSpec, &HyperNetwork)>,
    clusters: Option<usize>,
    opts: &super::GenerateOptions,
    on_done: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<BatchAnswer>> {
    if prompts.is_empty() {
        return Err(Error::Argument("empty batch: no prompts".into()));
    }
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| session.encode_prompt(&p.value, true)).collect::<Result<_>>()?;
    let feats: Vec<Vec<f32>> = tokens.iter().map(|t| session.mean_embedding(t)).collect::<Result<_>>()?;
    let k = clusters.or(hyper.map(|h| h.0.clusters)).unwrap_or(1).clamp(1, prompts.len());
    let seed = hyper.and_then(|h| h.0.training.get("options").and_then(|o| o.get("seed")).and_then(|s| s.as_u64())).unwrap_or(0);
    let (labels, _) = kmeans(&feats, &kmeans_plus_plus(&feats, k, seed), 10);
    let mut answers: Vec<Option<BatchAnswer>> = vec![None; prompts.len()];
    let mut done = 0;
    for c in 0..k {
        let members: Vec<usize> = (0..prompts.len()).filter(|&i| labels[i] == c).collect();
        if members.is_empty() {
            continue;
        }
        let adapter = match hyper {
            Some((_, net)) => {
                let f = batch_feature(&members.iter().map(|&i| feats[i].as_slice()).collect::<Vec<_>>(), session.model.device())?;
                let (a, b) = net.forward(&f)?;
                Some(session.attach_head_adapter(&format!("chameleon-cluster-{c}"), a, b, net.scale)?)
            }
            None => None,
        };
        let enabled: Vec<usize> = adapter.into_iter().collect();
        let result = (|| -> Result<()> {
            for &i in &members {
                let mut conv = session.conversation(&tokens[i]);
                let r = session.reply(&mut conv, &[], &enabled, opts, &mut |_, _| true)?;
                answers[i] = Some(BatchAnswer {
                    index: i,
                    line: prompts[i].line,
                    prompt: prompts[i].value.clone(),
                    cluster: c,
                    answer: r.text.trim().to_string(),
                    tokens: r.tokens.len(),
                });
                done += 1;
                if !on_done(done, prompts.len()) {
                    return Err(Error::Cancelled);
                }
            }
            Ok(())
        })();
        if let Some(i) = adapter {
            session.detach_head_adapter(i);
        }
        result?;
    }
    answers.into_iter().map(|a| a.ok_or_else(|| Error::Argument("a prompt was left unanswered".into()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_out_of_range_are_named() {
        assert!(ChameleonTrainOptions::default().check().is_ok());
        for (opts, flag) in [
            (ChameleonTrainOptions { clusters: 0, ..Default::default() }, "--clusters"),
            (ChameleonTrainOptions { rank: 0, ..Default::default() }, "--rank"),
            (ChameleonTrainOptions { batch: 0, ..Default::default() }, "--batch"),
            (ChameleonTrainOptions { lr: f64::NAN, ..Default::default() }, "--lr"),
        ] {
            assert!(opts.check().unwrap_err().to_string().contains(flag), "{flag}");
        }
    }
}
