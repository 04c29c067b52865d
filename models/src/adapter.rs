//! The LoRA-capable layer types.
//!
//! Every linear and convolution that a LoRA can target is built as one of these types. Each
//! carries a shared, lockable state so that code outside the model — the LoRA loader, the
//! per-step mixing engine — can attach low-rank branches, change their weights between steps,
//! or swap in a fused weight, without the model code knowing anything about LoRA formats.
//!
//! Forward: `y = W x + b + Σ_i weight_i · scale_i · ΔW_i x`, with ΔW_i kept factored (`up_i(down_i(x))`)
//! where it is low-rank.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{Module, Result, Tensor, TensorId};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

/// The weights of one update attached to a layer.
///
/// For a linear layer a low-rank `down` is `[rank, in]` and `up` is `[out, rank]`. For a
/// convolution `down` is a kernel `[rank, in, kh, kw]` applied with the base layer's stride and
/// padding, and `up` is `[out, rank, 1, 1]`. LoHa factors become a low-rank pair at load time
/// (a Hadamard product of two rank-r products is exactly a rank-r² product). Updates with no
/// useful low-rank form (LoKr's Kronecker products, LyCORIS full diffs) are `Dense`: a ΔW with
/// the base weight's shape.
#[derive(Debug, Clone)]
pub enum BranchWeights {
    LowRank { down: Tensor, up: Tensor },
    Dense(Tensor),
}

impl BranchWeights {
    /// ΔW (without scale) in the base weight's shape.
    pub fn delta(&self) -> Result<Tensor> {
        match self {
            Self::Dense(d) => Ok(d.clone()),
            Self::LowRank { down, up } if down.rank() == 2 => up.matmul(down),
            Self::LowRank { down, up } => {
                let (r, i, kh, kw) = down.dims4()?;
                let o = up.dim(0)?;
                up.reshape((o, r))?.matmul(&down.reshape((r, i * kh * kw))?)?.reshape((o, i, kh, kw))
            }
        }
    }
}

/// One update attached to a layer: `weight · scale · ΔW`.
#[derive(Debug, Clone)]
pub struct LowRankBranch {
    /// Caller-chosen name (usually the adapter's name) so weights can be set by name.
    pub name: String,
    pub weights: BranchWeights,
    /// The format's own scale (alpha / rank for LoRA).
    pub scale: f64,
    /// The user's strength times whatever the mixing strategy sets for this step; 0 disables.
    pub weight: f64,
    /// This branch's part in per-token routing ([`LayerState::routing`]).
    pub route: Route,
    /// The same update as loadings on a basis the layer shares with other branches (an
    /// EigenLoRAx subspace); `weights` still holds the expanded factors for everything that
    /// reads ΔW.
    pub shared: Option<SharedLoadings>,
}

impl LowRankBranch {
    pub fn low_rank(name: impl Into<String>, down: Tensor, up: Tensor, scale: f64, weight: f64) -> Self {
        Self { name: name.into(), weights: BranchWeights::LowRank { down, up }, scale, weight, route: Route::Free, shared: None }
    }
}

/// Principal directions that several branches of a layer share (an uncentred EigenLoRAx
/// subspace): `ΔW_i = up · L_B,i · L_A,iᵀ · down`.
#[derive(Debug, Clone)]
pub struct SharedBasis {
    /// Names the subspace, so branches from one subspace find one basis.
    pub key: String,
    /// C_Aᵀ: `[K_d, in]`, or `[K_d, in, k, k]` on a convolution (applied with its stride and padding).
    pub down: Tensor,
    /// C_B: `[out, K_u]`, or `[out, K_u, 1, 1]` on a convolution.
    pub up: Tensor,
}

/// A branch's loadings on [`LayerState::bases`]`[basis]`.
#[derive(Debug, Clone)]
pub struct SharedLoadings {
    pub basis: usize,
    /// L_A,iᵀ: `[r, K_d]`.
    pub down: Tensor,
    /// L_B,i: `[K_u, r]`.
    pub up: Tensor,
}

/// A branch's part in per-token routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// Applied at its weight on every token.
    #[default]
    Free,
    /// Applied on every token; its salience decides where `Yield` branches step back.
    Lead,
    /// Scaled per token by min(1, (z_self / z_lead)^p).
    Yield,
}

/// Per-token soft routing between a layer's branches, read from the branches' own outputs at
/// this call: the salience of a branch at a token is the norm of its output there over the
/// mean of that norm across the sample's tokens, z(t) = ‖h(t)‖ / mean_t ‖h(t)‖. Where the leading
/// branches (summed) are relatively more salient than a yielding branch, the yielding branch is
/// scaled down by (z_yield / z_lead)^sharpness (at most 1). Two updates that act everywhere alike
/// both apply fully (z ≈ 1); where one draws something local (a subject's emblem), the other
/// steps back there and only there. Applies to spatial inputs only: `[B, T, C]` tokens of a
/// linear or `[B, C, H, W]` positions of a convolution (a `[N, C]` input has no tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenRouting {
    pub sharpness: f64,
    /// The leading branches also step back where the yielding ones are relatively more salient.
    pub symmetric: bool,
}

/// Mutable state of one adaptable layer.
#[derive(Debug, Default)]
pub struct LayerState {
    /// A replacement for the base weight (a fused static mix), kept beside the original so
    /// that "unfusing" is dropping it, never subtracting (which drifts).
    pub fused_weight: Option<Tensor>,
    pub branches: Vec<LowRankBranch>,
    /// Per-token routing between the branches (None: every branch at its weight everywhere).
    pub routing: Option<TokenRouting>,
    /// A spatial mask `[batch, 1, h, w]` in [0, 1] over the latent: leading branches are
    /// multiplied by it and yielding ones by its complement, resized to this layer's tokens.
    pub mask: Option<Tensor>,
    /// Per-row factors `[batch]` on every branch where the mask applies (the unconditional rows
    /// of a CFG batch keep only part of each LoRA).
    pub mask_rows: Option<Tensor>,
    /// On a cross-attention's `to_k` / `to_v`, whose input is the prompt and not the image: the
    /// spatial mask `[batch, 1, h, w]`, applied over the attention's queries instead of this
    /// layer's tokens. The queries it covers attend to keys and values made with the leading
    /// (and free) branches, the rest to those made with the yielding (and free) ones (see
    /// `sdxl::transformer::Attention::forward`).
    pub query_mask: Option<Tensor>,
    /// Cross-attention probe (set on an attention's `to_q`): the prompt token positions whose
    /// attention mass to record, and the last recorded map `[batch, query tokens]`.
    pub probe_tokens: Option<Vec<usize>>,
    pub probe_map: Option<Tensor>,
    /// Bases shared by branches ([`LowRankBranch::shared`]).
    pub bases: Vec<SharedBasis>,
}

impl LayerState {
    /// The basis every active branch is a member of, when there is one: then the layer runs
    /// one rank-K adapter (down once, the members' small loadings, up once) instead of one
    /// adapter per branch, whatever their number. Masks and routing act in the basis's
    /// K_u-dimensional space, which is exact: they scale whole tokens, and C_B has orthonormal
    /// columns, so token norms (routing's salience) are the same there as in the output.
    fn shared_basis(&self) -> Option<usize> {
        let mut active = self.branches.iter().filter(|b| b.weight != 0.0);
        let first = active.next()?.shared.as_ref()?.basis;
        active.all(|b| b.shared.as_ref().is_some_and(|s| s.basis == first)).then_some(first)
    }

    /// `Σᵢ wᵢ sᵢ L_B,i L_A,iᵀ` (`[K_u, K_d]`) over the active members: without masks or routing
    /// the members need no outputs of their own, so the layer runs down, this core and up — three
    /// products per token whatever the number of members.
    fn shared_core(&self) -> Result<Option<Tensor>> {
        let mut core: Option<Tensor> = None;
        for b in self.branches.iter().filter(|b| b.weight != 0.0) {
            let Some(s) = &b.shared else { return Ok(None) };
            let m = (s.up.matmul(&s.down)? * (b.weight * b.scale))?;
            core = Some(match core {
                None => m,
                Some(c) => (c + m)?,
            });
        }
        Ok(core)
    }

    /// Routing applies now: it is on, and a leading and a yielding branch are both active.
    fn routes(&self) -> Option<TokenRouting> {
        let active = |r: Route| self.branches.iter().any(|b| b.weight != 0.0 && b.route == r);
        self.routing.filter(|_| active(Route::Lead) && active(Route::Yield))
    }
}

/// The mask resized to a layer's `[B, C, H, W]` (`tokens = None`) or `[B, T, C]` tokens
/// (`Some(T)`, on the latent's grid); `None` when the layer's grid does not match the mask's.
pub fn resize_mask(mask: &Tensor, batch: usize, tokens: Option<usize>, hw: Option<(usize, usize)>) -> Result<Option<Tensor>> {
    let (mb, _, h, w) = mask.dims4()?;
    if mb != batch {
        return Ok(None);
    }
    let (th, tw) = match (tokens, hw) {
        (_, Some(hw)) => hw,
        (Some(t), None) => {
            // h/w keeps the latent's aspect: th = sqrt(t·h/w).
            let th = ((t * h) as f64 / w as f64).sqrt().round() as usize;
            if th == 0 || t % th != 0 {
                return Ok(None);
            }
            (th, t / th)
        }
        (None, None) => return Ok(None),
    };
    let m = if (th, tw) == (h, w) {
        mask.clone()
    } else if th > h && th % h == 0 && tw % w == 0 {
        mask.upsample_nearest2d(th, tw)?
    } else if h % th == 0 && w % tw == 0 && h / th == w / tw {
        mask.avg_pool2d(h / th)?
    } else {
        return Ok(None);
    };
    Ok(Some(match tokens {
        Some(t) => m.reshape((batch, t, 1))?,
        None => m,
    }))
}

/// Applies the layer's mask (and per-row factors, shaped to broadcast over `mask`) to already
/// scaled branch outputs `(route, h)`.
fn mask_outputs(outs: Vec<(Route, Tensor)>, mask: &Tensor, rows: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (r, h) in outs {
        let gate = match r {
            Route::Lead => Some(mask.clone()),
            Route::Yield => Some((1.0 - mask)?),
            Route::Free => None,
        };
        let gate = match (gate, rows) {
            (Some(g), Some(r)) => Some(g.broadcast_mul(r)?),
            (Some(g), None) => Some(g),
            (None, r) => r.cloned(),
        };
        let h = match gate {
            Some(g) => h.broadcast_mul(&g.to_dtype(h.dtype())?)?,
            None => h,
        };
        acc = Some(match acc {
            None => h,
            Some(a) => (a + h)?,
        });
    }
    Ok(acc)
}

/// z(t): the norm of `h` over `feature_dim` at every token, over its mean across the tokens
/// (`token_dims`) of each sample.
fn salience(h: &Tensor, feature_dim: usize, token_dims: &[usize]) -> Result<Tensor> {
    let n = h.to_dtype(candle_core::DType::F32)?.sqr()?.sum_keepdim(feature_dim)?.sqrt()?;
    let mut mean = n.clone();
    for &d in token_dims {
        mean = mean.mean_keepdim(d)?;
    }
    n.broadcast_div(&(mean + 1e-12)?)
}

/// Sums already scaled branch outputs `(route, h)` with per-token routing.
fn route_outputs(outs: Vec<(Route, Tensor)>, routing: TokenRouting, feature_dim: usize, token_dims: &[usize]) -> Result<Option<Tensor>> {
    let group_sum = |r: Route| -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (_, h) in outs.iter().filter(|(x, _)| *x == r) {
            acc = Some(match acc {
                None => h.clone(),
                Some(a) => (a + h)?,
            });
        }
        Ok(acc)
    };
    let (Some(lead), Some(yielding)) = (group_sum(Route::Lead)?, group_sum(Route::Yield)?) else {
        return group_sum(Route::Free);
    };
    let (z_lead, z_yield) = (salience(&lead, feature_dim, token_dims)?, salience(&yielding, feature_dim, token_dims)?);
    let gate = |num: &Tensor, den: &Tensor, h: Tensor| -> Result<Tensor> {
        let g = (num / (den + 1e-12)?)?.powf(routing.sharpness)?.clamp(0f32, 1f32)?;
        h.broadcast_mul(&g.to_dtype(h.dtype())?)
    };
    let mut acc = gate(&z_yield, &z_lead, yielding)?;
    acc = (acc + if routing.symmetric { gate(&z_lead, &z_yield, lead)? } else { lead })?;
    if let Some(free) = group_sum(Route::Free)? {
        acc = (acc + free)?;
    }
    Ok(Some(acc))
}

/// Shared handle to a layer's [`LayerState`].
#[derive(Debug, Clone, Default)]
pub struct AdapterSlot(Arc<RwLock<LayerState>>);

impl AdapterSlot {
    pub fn read(&self) -> RwLockReadGuard<'_, LayerState> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, LayerState> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    Conv2d { kernel: usize, stride: usize, padding: usize },
}

/// A cheap handle describing one adaptable layer, as listed by [`Adaptable`].
#[derive(Debug, Clone)]
pub struct AdaptableLayer {
    /// The diffusers / transformers module path, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    pub kind: LayerKind,
    pub in_features: usize,
    pub out_features: usize,
    pub base_weight: Tensor,
    pub slot: AdapterSlot,
    /// The layer's remembered base products, where it keeps them ([`AdaptableLinear::remembering_inputs`]).
    pub memo: Option<ProductMemo>,
    /// How a convolution pads its borders; `None` for linear layers.
    pub borders: Option<ConvBorders>,
}

/// Which image borders wrap around: seamless, tileable images (A1111's "Tiling" wraps both, as
/// `padding_mode = "circular"` on every Conv2d; InvokeAI's "Seamless X/Y" wraps one axis and
/// zero-pads the other).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seamless {
    pub x: bool,
    pub y: bool,
}

impl Seamless {
    pub const OFF: Self = Self { x: false, y: false };
    pub const BOTH: Self = Self { x: true, y: true };

    pub fn is_off(self) -> bool {
        !self.x && !self.y
    }

    /// Pads `x` (`[B, C, H, W]`) by `p` on every side: wrapped on the seamless axes, zeros on
    /// the others. The wrapped axis goes first, so corners wrap only where both axes do, as
    /// torch's circular mode and InvokeAI's pad order give.
    pub fn pad(self, x: &Tensor, p: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if (self.x && p > w) || (self.y && p > h) {
            candle_core::bail!("seamless tiling: a border of {p} cannot wrap a {h}x{w} feature map");
        }
        let wrap = |t: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
            Tensor::cat(&[&t.narrow(dim, n - p, p)?, t, &t.narrow(dim, 0, p)?], dim)
        };
        match (self.x, self.y) {
            (true, true) => wrap(&wrap(x, 3, w)?, 2, h),
            (true, false) => wrap(x, 3, w)?.pad_with_zeros(2, p, p),
            (false, true) => wrap(x, 2, h)?.pad_with_zeros(3, p, p),
            (false, false) => x.pad_with_zeros(3, p, p)?.pad_with_zeros(2, p, p),
        }
    }
}

/// Shared handle to a convolution's [`Seamless`] setting. Kept apart from [`LayerState`]
/// because it belongs to the job, not to the adapters: clearing LoRAs must not clear it.
#[derive(Debug, Clone, Default)]
pub struct ConvBorders(Arc<AtomicU8>);

impl ConvBorders {
    pub fn get(&self) -> Seamless {
        let v = self.0.load(Ordering::Relaxed);
        Seamless { x: v & 1 != 0, y: v & 2 != 0 }
    }
    pub fn set(&self, s: Seamless) {
        self.0.store(u8::from(s.x) | (u8::from(s.y) << 1), Ordering::Relaxed);
    }
}

/// Sets how every convolution of `model` pads its borders.
pub fn set_seamless(model: &dyn Adaptable, s: Seamless) {
    for l in model.adaptable_layers() {
        if let Some(b) = &l.borders {
            b.set(s);
        }
    }
}

/// Drops every product a model's cross-attentions keep between calls ([`ProductMemo`]), as at
/// the end of a generation.
pub fn forget_kept_products(model: &dyn Adaptable) {
    for layer in model.adaptable_layers() {
        if let Some(memo) = &layer.memo {
            memo.clear();
        }
    }
}

/// Models and blocks list their adaptable layers in execution order.
pub trait Adaptable {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>);

    fn adaptable_layers(&self) -> Vec<AdaptableLayer> {
        let mut v = Vec::new();
        self.collect_adaptable(&mut v);
        v
    }
}

impl<T: Adaptable> Adaptable for Vec<T> {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.iter().for_each(|x| x.collect_adaptable(out));
    }
}

impl<T: Adaptable> Adaptable for Option<T> {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        if let Some(x) = self {
            x.collect_adaptable(out)
        }
    }
}

/// The last base products `W x + b` of a layer whose input repeats from call to call: a
/// cross-attention's keys and values are a function of the prompt and the weights only, and the
/// sampler feeds the same prompt tensor at every step (diffusers recomputes them each time; at
/// 512² they were about 5 % of a mid-size UNet's step on the CPU). Keyed by the ids of the input
/// and of the weight in use: candle never reuses a tensor id, a fused or swapped weight is a new
/// tensor, and neither our sampler nor our mixers write into a tensor in place, so a hit is the
/// same product, bit for bit. LoRA branches are not kept: they are added to the base product at
/// every call, exactly as without the memo. Two entries, so that a step that runs the CFG halves
/// as separate calls (asymmetric CFG) keeps both.
#[derive(Debug, Clone, Default)]
pub struct ProductMemo(Arc<Mutex<Vec<MemoEntry>>>);

#[derive(Debug)]
struct MemoEntry {
    input: TensorId,
    weight: TensorId,
    output: Tensor,
}

impl ProductMemo {
    const ENTRIES: usize = 2;

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<MemoEntry>> {
        // A poisoned lock only means another thread panicked mid-update; entries are whole or absent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `product()` for this input and weight, computed once while they stay the same. Inputs or
    /// weights that carry a gradient graph are never kept (their products must join that graph).
    fn get_or(&self, x: &Tensor, weight: &Tensor, product: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        if x.track_op() || weight.track_op() {
            return product();
        }
        let (input, weight) = (x.id(), weight.id());
        if let Some(e) = self.entries().iter().find(|e| e.input == input && e.weight == weight) {
            return Ok(e.output.clone());
        }
        let output = product()?;
        let mut entries = self.entries();
        if entries.len() >= Self::ENTRIES {
            entries.remove(0);
        }
        entries.push(MemoEntry { input, weight, output: output.clone() });
        Ok(output)
    }

    /// Drops the kept products (their memory), as at the end of a generation.
    pub fn clear(&self) {
        self.entries().clear();
    }

    /// How many products are kept (for tests).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A linear layer that LoRA can target.
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    base: Linear,
    path: String,
    in_features: usize,
    out_features: usize,
    slot: AdapterSlot,
    memo: Option<ProductMemo>,
}

impl AdaptableLinear {
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        Ok(Self {
            base: Linear::new(weight, bias),
            path: vb.prefix(),
            in_features,
            out_features,
            slot: AdapterSlot::default(),
            memo: None,
        })
    }

    /// This layer keeps its last base products ([`ProductMemo`]): for layers whose input is the
    /// same tensor across calls, such as a cross-attention's `to_k` / `to_v`.
    pub fn remembering_inputs(mut self) -> Self {
        self.memo = Some(ProductMemo::default());
        self
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// `W x + b` with the weight in use (the fused one where there is one).
    fn base_product(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let product = || loramix_kernels::linear(x, weight, self.base.bias());
        match &self.memo {
            Some(memo) => memo.get_or(x, weight, product),
            None => product(),
        }
    }

    pub(crate) fn slot(&self) -> &AdapterSlot {
        &self.slot
    }
}

/// One active branch's scaled output on `x`; `z` is `x` in the layer's shared basis (its
/// members' outputs stay in that space until the basis's up-projection).
fn linear_branch(x: &Tensor, z: Option<&Tensor>, b: &LowRankBranch) -> Result<Tensor> {
    let h = match (z, &b.shared, &b.weights) {
        (Some(z), Some(s), _) => z.broadcast_matmul(&s.down.t()?)?.broadcast_matmul(&s.up.t()?)?,
        (_, _, BranchWeights::LowRank { down, up }) => x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?,
        (_, _, BranchWeights::Dense(delta)) => x.broadcast_matmul(&delta.t()?)?,
    };
    h * (b.weight * b.scale)
}

/// `x @ down^T @ up^T` summed over active branches, in x's dtype.
fn linear_branches(x: &Tensor, state: &LayerState) -> Result<Option<Tensor>> {
    let mask = match (&state.mask, x.rank()) {
        (Some(m), 3) => resize_mask(m, x.dim(0)?, Some(x.dim(1)?), None)?,
        _ => None,
    };
    let routing = state.routes().filter(|_| x.rank() == 3 && mask.is_none());
    let shared = state.shared_basis();
    // Through a shared basis: z = x C_A once, each member's loadings in K space, C_B once.
    let z = match shared {
        Some(g) => Some(x.broadcast_matmul(&state.bases[g].down.t()?)?),
        None => None,
    };
    if let (Some(z), Some(g), None, None) = (&z, shared, &mask, routing) {
        if let Some(core) = state.shared_core()? {
            return Ok(Some(z.broadcast_matmul(&core.t()?)?.broadcast_matmul(&state.bases[g].up.t()?)?));
        }
    }
    let mut acc: Option<Tensor> = None;
    let mut outs = Vec::new();
    for b in state.branches.iter().filter(|b| b.weight != 0.0) {
        let h = linear_branch(x, z.as_ref(), b)?;
        if routing.is_some() || mask.is_some() {
            outs.push((b.route, h));
            continue;
        }
        acc = Some(match acc {
            None => h,
            Some(a) => (a + h)?,
        });
    }
    let rows = match (&state.mask_rows, &mask) {
        (Some(r), Some(_)) if r.dim(0)? == x.dim(0)? => Some(r.reshape(((), 1, 1))?),
        _ => None,
    };
    let d = match (routing, &mask) {
        (_, Some(m)) => mask_outputs(outs, m, rows.as_ref())?,
        (Some(r), None) => route_outputs(outs, r, 2, &[1])?,
        (None, None) => acc,
    };
    match (d, shared) {
        (Some(d), Some(g)) => Ok(Some(d.broadcast_matmul(&state.bases[g].up.t()?)?)),
        (d, _) => Ok(d),
    }
}

/// On CUDA, every active low-rank branch of the layer at once: the LoRAs' down matrices stacked,
/// their up matrices side by side, one scale per rank row, as two cuBLAS GEMMs (`(x Aᵀ ⊙ s) Bᵀ`)
/// instead of two per LoRA plus their adds. Our one-launch kernel for the same sum
/// (`loramix_kernels::lora_branch`, tested against the reference) measured slower than these two
/// tensor-core GEMMs at every size on an H100 — 0.76× at 8192 rows down to 0.24× for one row
/// (BENCHMARKS.md) — so it is not dispatched here. `None` where a branch has no low-rank form
/// (the caller then runs the branches one by one) or with `LORAMIX_FUSED_KERNELS=0`. Stacking per
/// call copies only the small factor matrices.
#[cfg(feature = "cuda")]
fn stacked_linear_branches(x: &Tensor, y: &Tensor, state: &LayerState) -> Result<Option<Tensor>> {
    let active: Vec<&LowRankBranch> = state.branches.iter().filter(|b| b.weight != 0.0).collect();
    if active.is_empty()
        || state.routes().is_some()
        || state.mask.is_some()
        || state.shared_basis().is_some()
        || !x.device().is_cuda()
        || !loramix_kernels::fused::fused_kernels_enabled()
    {
        return Ok(None);
    }
    let (mut downs, mut ups, mut scales) = (vec![], vec![], vec![]);
    for b in &active {
        match &b.weights {
            BranchWeights::LowRank { down, up } if down.rank() == 2 => {
                scales.extend(std::iter::repeat_n((b.weight * b.scale) as f32, down.dim(0)?));
                downs.push(down.to_dtype(x.dtype())?);
                ups.push(up.to_dtype(x.dtype())?);
            }
            _ => return Ok(None),
        }
    }
    let a = Tensor::cat(&downs, 0)?;
    let bm = Tensor::cat(&ups, 1)?;
    let in_f = x.dim(candle_core::D::Minus1)?;
    let out_dims = y.dims().to_vec();
    let out_f = *out_dims.last().unwrap_or(&0);
    let x2 = x.reshape(((), in_f))?;
    let y2 = y.reshape(((), out_f))?;
    let s = Tensor::from_slice(&scales, (1, scales.len()), x.device())?.to_dtype(x.dtype())?;
    let low = x2.matmul(&a.t()?)?.broadcast_mul(&s)?;
    Ok(Some((y2 + low.matmul(&bm.t()?)?)?.reshape(out_dims)?))
}

impl AdaptableLinear {
    /// Under a [`LayerState::query_mask`]: the layer's output with the leading and free branches,
    /// the output with the yielding and free ones, and the mask. `None` without a query mask or
    /// without an active leading or yielding branch, and then [`Module::forward`] applies every
    /// branch as usual.
    pub(crate) fn forward_by_route(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let state = self.slot.read();
        let Some(mask) = state.query_mask.clone() else { return Ok(None) };
        if !state.branches.iter().any(|b| b.weight != 0.0 && b.route != Route::Free) {
            return Ok(None);
        }
        let weight = state.fused_weight.as_ref().unwrap_or(self.base.weight());
        let y = self.base_product(x, weight)?;
        let shared = state.shared_basis();
        let z = match shared {
            Some(g) => Some(x.broadcast_matmul(&state.bases[g].down.t()?)?),
            None => None,
        };
        // Through a shared basis the sums stay in its space until one up-projection each.
        let (mut lead, mut yielding): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |acc: &mut Option<Tensor>, h: &Tensor| -> Result<()> {
            *acc = Some(match acc.take() {
                None => h.clone(),
                Some(a) => (a + h)?,
            });
            Ok(())
        };
        for b in state.branches.iter().filter(|b| b.weight != 0.0) {
            let h = linear_branch(x, z.as_ref(), b)?;
            if b.route != Route::Yield {
                add(&mut lead, &h)?;
            }
            if b.route != Route::Lead {
                add(&mut yielding, &h)?;
            }
        }
        let with = |d: Option<Tensor>| -> Result<Tensor> {
            match (d, shared) {
                (Some(d), Some(g)) => &y + d.broadcast_matmul(&state.bases[g].up.t()?)?,
                (Some(d), None) => &y + d,
                (None, _) => Ok(y.clone()),
            }
        };
        Ok(Some((with(lead)?, with(yielding)?, mask)))
    }
}

impl Module for AdaptableLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = loramix_kernels::profile::span("linear");
        let state = self.slot.read();
        // Our linear kernel on the CPU (bias inside the GEMM); elsewhere candle's, with the bias
        // through `bias_add` (our one-pass kernel on CUDA).
        let weight = state.fused_weight.as_ref().unwrap_or(self.base.weight());
        let y = self.base_product(x, weight)?;
        #[cfg(feature = "cuda")]
        if let Some(out) = stacked_linear_branches(x, &y, &state)? {
            return Ok(out);
        }
        match linear_branches(x, &state)? {
            Some(delta) => y + delta,
            None => Ok(y),
        }
    }
}

impl Adaptable for AdaptableLinear {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        out.push(AdaptableLayer {
            path: self.path.clone(),
            kind: LayerKind::Linear,
            in_features: self.in_features,
            out_features: self.out_features,
            base_weight: self.base.weight().clone(),
            slot: self.slot.clone(),
            memo: self.memo.clone(),
            borders: None,
        });
    }
}

/// A 2-D convolution that LoRA can target (kohya "conv LoRA" / LoCon on resnets).
#[derive(Debug, Clone)]
pub struct AdaptableConv2d {
    base: Conv2d,
    path: String,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    slot: AdapterSlot,
    borders: ConvBorders,
}

impl AdaptableConv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let cfg = Conv2dConfig { padding, stride, dilation: 1, groups: 1, cudnn_fwd_algo: None };
        Ok(Self {
            base: Conv2d::new(weight, Some(bias), cfg),
            path: vb.prefix(),
            in_channels,
            out_channels,
            kernel,
            cfg,
            slot: AdapterSlot::default(),
            borders: ConvBorders::default(),
        })
    }
}

impl Module for AdaptableConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let state = self.slot.read();
        let (stride, mut padding) = (self.cfg.stride, self.cfg.padding);
        // Wrapped borders: pad here and convolve unpadded, which equals a circular convolution
        // for the base weight, every branch and a fused ΔW alike.
        let seamless = self.borders.get();
        let padded;
        let x = if padding > 0 && !seamless.is_off() {
            padded = seamless.pad(x, padding)?;
            padding = 0;
            &padded
        } else {
            x
        };
        let weight = state.fused_weight.as_ref().unwrap_or(self.base.weight());
        let mut y = loramix_kernels::conv2d(x, weight, self.base.bias(), stride, padding)?;
        let (b0, _, hh, ww) = x.dims4()?;
        let (oh, ow) = ((hh + 2 * padding - self.kernel) / stride + 1, (ww + 2 * padding - self.kernel) / stride + 1);
        let mask = match &state.mask {
            Some(m) => resize_mask(m, b0, None, Some((oh, ow)))?,
            None => None,
        };
        let routing = state.routes().filter(|_| mask.is_none());
        let shared = state.shared_basis();
        let z = match shared {
            Some(g) => Some(loramix_kernels::conv2d(x, &state.bases[g].down, None, stride, padding)?),
            None => None,
        };
        let mut outs = Vec::new();
        let mut in_basis: Option<Tensor> = None;
        if let (Some(z), Some(g), None, None) = (&z, shared, &mask, routing) {
            if let Some(core) = state.shared_core()? {
                let (ku, kd) = core.dims2()?;
                let h = loramix_kernels::conv2d(z, &core.reshape((ku, kd, 1, 1))?, None, 1, 0)?;
                return y + loramix_kernels::conv2d(&h, &state.bases[g].up, None, 1, 0)?;
            }
        }
        for b in state.branches.iter().filter(|b| b.weight != 0.0) {
            let h = match (&z, &b.shared, &b.weights) {
                (Some(z), Some(s), _) => {
                    let (r, kd) = s.down.dims2()?;
                    let h = loramix_kernels::conv2d(z, &s.down.reshape((r, kd, 1, 1))?, None, 1, 0)?;
                    let (ku, r) = s.up.dims2()?;
                    loramix_kernels::conv2d(&h, &s.up.reshape((ku, r, 1, 1))?, None, 1, 0)?
                }
                (_, _, BranchWeights::LowRank { down, up }) => {
                    let h = loramix_kernels::conv2d(x, down, None, stride, padding)?;
                    loramix_kernels::conv2d(&h, up, None, 1, 0)?
                }
                (_, _, BranchWeights::Dense(delta)) => loramix_kernels::conv2d(x, delta, None, stride, padding)?,
            };
            let h = (h * (b.weight * b.scale))?;
            if routing.is_some() || mask.is_some() {
                outs.push((b.route, h));
            } else if shared.is_some() {
                in_basis = Some(match in_basis {
                    None => h,
                    Some(a) => (a + h)?,
                });
            } else {
                y = (y + h)?;
            }
        }
        let rows = match (&state.mask_rows, &mask) {
            (Some(r), Some(_)) if r.dim(0)? == b0 => Some(r.reshape(((), 1, 1, 1))?),
            _ => None,
        };
        let d = match (routing, &mask) {
            (_, Some(m)) => mask_outputs(outs, m, rows.as_ref())?,
            (Some(r), None) => route_outputs(outs, r, 1, &[2, 3])?,
            (None, None) => in_basis,
        };
        let d = match (d, shared) {
            (Some(d), Some(g)) => Some(loramix_kernels::conv2d(&d, &state.bases[g].up, None, 1, 0)?),
            (d, _) => d,
        };
        if let Some(d) = d {
            y = (y + d)?;
        }
        Ok(y)
    }
}

impl Adaptable for AdaptableConv2d {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        out.push(AdaptableLayer {
            path: self.path.clone(),
            kind: LayerKind::Conv2d { kernel: self.kernel, stride: self.cfg.stride, padding: self.cfg.padding },
            in_features: self.in_channels,
            out_features: self.out_channels,
            base_weight: self.base.weight().clone(),
            slot: self.slot.clone(),
            memo: None,
            borders: Some(self.borders.clone()),
        });
    }
}

/// A GroupNorm layer's parameters (`weight`, `bias` under `vb`) for the fused kernel.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<loramix_kernels::GroupNormParams> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("{}: {channels} channels cannot be split into {groups} groups", vb.prefix());
    }
    loramix_kernels::GroupNormParams::new(groups, eps, vb.get(channels, "weight")?, vb.get(channels, "bias")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    /// The unfused branch equals applying the fused weight W + w·s·B A.
    #[test]
    fn branch_equals_fused_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 6, &dev)?;
        let mut m = HashMap::new();
        m.insert("l.weight".to_string(), w.clone());
        m.insert("l.bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let layer = AdaptableLinear::new(vb.pp("l"), 5, 6, true)?;
        let down = Tensor::randn(0f32, 1., (2, 5), &dev)?;
        let up = Tensor::randn(0f32, 1., (6, 2), &dev)?;
        layer.slot.write().branches.push(LowRankBranch::low_rank("a", down.clone(), up.clone(), 0.5, 0.8));
        let x = Tensor::randn(0f32, 1., (3, 4, 5), &dev)?;
        let y = layer.forward(&x)?;
        let fused = (w + (up.matmul(&down)? * 0.4)?)?;
        let y2 = Linear::new(fused, Some(b)).forward(&x)?;
        let d = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        assert_eq!(layer.adaptable_layers()[0].path, "l");
        Ok(())
    }

    /// A layer that keeps its base products gives what a fresh layer gives at every call: the
    /// same input again is served from the memo, bit for bit; a fused weight, a changed branch
    /// weight, or a new input tensor with the same values are all seen; an input in a gradient
    /// graph is never kept; and clearing forgets.
    #[test]
    fn kept_products_equal_fresh_ones() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 5), &dev)?;
        let mut m = HashMap::new();
        m.insert("l.weight".to_string(), w.clone());
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let kept = AdaptableLinear::new(vb.pp("l"), 5, 6, false)?.remembering_inputs();
        let fresh = AdaptableLinear::new(vb.pp("l"), 5, 6, false)?;
        let memo = kept.adaptable_layers()[0].memo.clone().expect("the layer keeps products");
        let (down, up) = (Tensor::randn(0f32, 1., (2, 5), &dev)?, Tensor::randn(0f32, 1., (6, 2), &dev)?);
        for l in [&kept, &fresh] {
            l.slot.write().branches.push(LowRankBranch::low_rank("a", down.clone(), up.clone(), 0.5, 0.8));
        }
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> { Ok(a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?) };
        let x = Tensor::randn(0f32, 1., (2, 3, 5), &dev)?;
        let y0 = kept.forward(&x)?;
        assert!(same(&y0, &fresh.forward(&x)?)?);
        assert_eq!(memo.len(), 1);
        // A hit: the memo is not grown, and the result is unchanged.
        assert!(same(&kept.forward(&x)?, &y0)?);
        assert_eq!(memo.len(), 1);
        // The branch weight changes between calls (as a mixer does): the branch is not kept.
        for l in [&kept, &fresh] {
            l.slot.write().branches[0].weight = -1.5;
        }
        let y1 = kept.forward(&x)?;
        assert!(same(&y1, &fresh.forward(&x)?)?);
        assert!(!same(&y1, &y0)?);
        // A fused weight is a new tensor: the product is made again with it.
        let fused = (&w * 2.0)?;
        for l in [&kept, &fresh] {
            l.slot.write().fused_weight = Some(fused.clone());
        }
        let y2 = kept.forward(&x)?;
        assert!(same(&y2, &fresh.forward(&x)?)?);
        assert!(!same(&y2, &y1)?);
        assert_eq!(memo.len(), 2);
        // Same values in a new tensor, and a third input: the oldest entry goes (two are kept).
        let x2 = x.copy()?;
        assert!(same(&kept.forward(&x2)?, &y2)?);
        let x3 = Tensor::randn(0f32, 1., (2, 3, 5), &dev)?;
        assert!(same(&kept.forward(&x3)?, &fresh.forward(&x3)?)?);
        assert_eq!(memo.len(), 2);
        // An input that carries a gradient graph is never kept.
        memo.clear();
        assert!(memo.is_empty());
        let v = candle_core::Var::from_tensor(&x)?;
        assert!(same(&kept.forward(v.as_tensor())?, &fresh.forward(v.as_tensor())?)?);
        assert!(memo.is_empty());
        Ok(())
    }

    /// Branches given as loadings on a shared basis give what their expanded factors give,
    /// on a linear and a convolution, plain and under a spatial mask with per-row factors.
    #[test]
    fn shared_basis_equals_expanded_branches() -> Result<()> {
        let dev = Device::Cpu;
        let (kd, ku, r) = (5, 4, 2);
        // C_B with orthonormal columns (QR through Gram–Schmidt), as a subspace's components are.
        let orthonormal = |n: usize, k: usize| -> Result<Tensor> {
            let m = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let mut cols: Vec<Tensor> = vec![];
            for j in 0..k {
                let mut v = m.narrow(1, j, 1)?;
                for c in &cols {
                    let p = c.t()?.matmul(&v)?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
                    v = (v - (c * p)?)?;
                }
                let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                cols.push((v / norm)?);
            }
            Tensor::cat(&cols, 1)
        };
        for conv in [false, true] {
            let (inf, outf, k) = (6, 7, if conv { 3 } else { 1 });
            let w = if conv { Tensor::randn(0f32, 1., (outf, inf, k, k), &dev)? } else { Tensor::randn(0f32, 1., (outf, inf), &dev)? };
            let mut m = HashMap::new();
            m.insert("l.weight".to_string(), w);
            m.insert("l.bias".to_string(), Tensor::randn(0f32, 1., outf, &dev)?);
            let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
            let make = || -> Result<(Box<dyn Module>, AdapterSlot)> {
                Ok(if conv {
                    let l = AdaptableConv2d::new(vb.pp("l"), inf, outf, k, 1, 1)?;
                    let s = l.slot.clone();
                    (Box::new(l), s)
                } else {
                    let l = AdaptableLinear::new(vb.pp("l"), inf, outf, true)?;
                    let s = l.slot.clone();
                    (Box::new(l), s)
                })
            };
            let (shared_layer, shared_slot) = make()?;
            let (plain_layer, plain_slot) = make()?;
            let ca = Tensor::randn(0f32, 1., (kd, inf * k * k), &dev)?; // C_Aᵀ
            let cb = orthonormal(outf, ku)?; // C_B
            let (down_basis, up_basis) = if conv { (ca.reshape((kd, inf, k, k))?, cb.reshape((outf, ku, 1, 1))?) } else { (ca.clone(), cb.clone()) };
            for (i, wgt) in [0.7, -0.4, 1.3].iter().enumerate() {
                let la = Tensor::randn(0f32, 1., (r, kd), &dev)?; // L_Aᵀ
                let lb = Tensor::randn(0f32, 1., (ku, r), &dev)?; // L_B
                let (down, up) = (la.matmul(&ca)?, cb.matmul(&lb)?);
                let (down, up) = if conv { (down.reshape((r, inf, k, k))?, up.reshape((outf, r, 1, 1))?) } else { (down, up) };
                let mut b = LowRankBranch::low_rank(format!("m{i}"), down, up, 0.5, *wgt);
                b.route = if i == 0 { Route::Lead } else { Route::Yield };
                plain_slot.write().branches.push(b.clone());
                b.shared = Some(SharedLoadings { basis: 0, down: la, up: lb });
                shared_slot.write().branches.push(b);
            }
            shared_slot.write().bases = vec![SharedBasis { key: "s".into(), down: down_basis, up: up_basis }];
            let x = if conv { Tensor::randn(0f32, 1., (2, inf, 4, 4), &dev)? } else { Tensor::randn(0f32, 1., (2, 16, inf), &dev)? };
            for masked in [false, true] {
                let mask = masked.then(|| Tensor::rand(0f32, 1., (2, 1, 4, 4), &dev)).transpose()?;
                let rows = masked.then(|| Tensor::new(&[1f32, 0.7], &dev)).transpose()?;
                for slot in [&shared_slot, &plain_slot] {
                    let mut s = slot.write();
                    s.mask = mask.clone();
                    s.mask_rows = rows.clone();
                }
                let (a, b) = (shared_layer.forward(&x)?, plain_layer.forward(&x)?);
                let d = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let n = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4 * n.max(1.0), "conv {conv} masked {masked}: {d}");
            }
        }
        Ok(())
    }
}
