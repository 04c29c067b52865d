//! Training-free per-step LoRA mixing.
//!
//! A [`MixStrategy`] decides, for every UNet layer and every step (and pass), the weight each
//! LoRA has there. The [`Mixer`] attaches all LoRAs to the UNet as unfused branches once and,
//! as the sampler's [`StepMixer`], writes those weights into the layers before every UNet pass,
//! recording a [`MixTrace`]. Weight statistics are computed once per mix (see [`stats`]), never
//! per step. Text-encoder modules are not mixed per step (the prompt is encoded once): they are
//! fused at the LoRAs' strengths, or left off where the reference does so.
//!
//! Owns the per-layer, per-step weights. Uses `sdxl` (the pipeline's `StepMixer` hook and its
//! layers), `lora` (loaded LoRAs, prompt schedules, the library for `--candidates`) and `eval`'s
//! embedder (EST-LoRA); each strategy is one file behind [`MixStrategy`].

pub mod auto;
pub mod candidates;
pub mod composite;
pub mod est;
pub mod klora;
pub mod merge;
pub mod np;
use crate::lora::schedule;
pub mod stats;
pub mod switch;
pub mod windows;

use std::path::Path;

use loramix_models::LayerKind;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lora::{keys::Component, AdapterTargets, LoadedLora, Role};
use loramix_models::Route;
use crate::output::write_atomic;
use crate::sdxl::pipeline::StepMixer;

/// One LoRA taking part in a mix.
#[derive(Debug, Clone)]
pub struct MixLora {
    pub lora: LoadedLora,
    pub role: Role,
    /// The user's strength m (1 when `schedule` gives the weights).
    pub strength: f64,
    /// Block weights and per-step weights written in the prompt tag (lbw, loractl); the mixer
    /// multiplies whatever the strategy decides by them.
    pub schedule: Option<schedule::LoraSchedule>,
}

/// One UNet layer as the strategies see it.
#[derive(Debug, Clone)]
pub struct MixLayer {
    /// diffusers module path, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    pub target: usize,
    pub is_linear: bool,
    /// Per LoRA, the index of its module on this layer.
    pub modules: Vec<Option<usize>>,
    /// lbw's block (see [`schedule::block_of_sgm_path`]).
    pub block: Option<usize>,
}

impl MixLayer {
    /// K-LoRA's selector layers: q, k, v and out of every self- and cross-attention.
    pub fn is_attention_projection(&self) -> bool {
        (self.path.contains(".attn1.") || self.path.contains(".attn2."))
            && [".to_q", ".to_k", ".to_v", ".to_out.0"].iter().any(|s| self.path.ends_with(s))
    }
}

/// The LoRAs of a mix and the UNet layers they can act on, in execution order.
#[derive(Debug, Clone)]
pub struct MixPlan {
    pub loras: Vec<MixLora>,
    pub layers: Vec<MixLayer>,
    /// Positions in the prompt's token sequence of the subject LoRAs' trigger words (see
    /// [`MixPlan::locate_subjects`]).
    pub subject_tokens: Vec<usize>,
    /// How the LoRAs of the mix were chosen, for the trace.
    pub candidates: Vec<candidates::Candidate>,
}

impl MixPlan {
    pub fn new(targets: &AdapterTargets, loras: Vec<MixLora>) -> Result<Self> {
        if loras.is_empty() {
            return Err(Error::Argument("a mix needs at least one LoRA".into()));
        }
        let mut layers = Vec::new();
        for (ti, t) in targets.targets.iter().enumerate() {
            if t.component != Component::Unet {
                continue;
            }
            let modules = loras.iter().map(|l| l.lora.modules.iter().position(|m| m.target == ti)).collect();
            layers.push(MixLayer { path: t.layer.path.clone(), target: ti, is_linear: t.layer.kind == LayerKind::Linear, modules, block: t.lbw_block });
        }
        Ok(Self { loras, layers, subject_tokens: Vec::new(), candidates: Vec::new() })
    }

    /// `auto` with more LoRAs of a role than the prompt calls for: keeps, per role, the ones the
    /// prompt names (all of them where it names none) and records every decision.
    pub fn narrow_to_prompt(&mut self, prompt: &str, similarity: Option<candidates::Similarity>) -> Result<()> {
        let offered: Vec<candidates::Offered> = self
            .loras
            .iter()
            .map(|l| {
                let mut phrases = l.lora.info.trigger_words.clone();
                phrases.push(l.lora.name.clone());
                candidates::Offered { name: l.lora.name.clone(), role: l.role, phrases }
            })
            .collect();
        let mut picks = candidates::select(prompt, &offered, similarity)?;
        let mut keep = vec![true; self.loras.len()];
        for role in [Role::Subject, Role::Style] {
            let idx: Vec<usize> = (0..self.loras.len()).filter(|&i| self.loras[i].role == role).collect();
            if idx.len() < 2 {
                continue;
            }
            // Every one the prompt names (`select` keeps one per role, for library candidates);
            // failing that, the one it comes closest to.
            let named: Vec<usize> = idx.iter().copied().filter(|&i| picks[i].score >= 1.0).collect();
            if named.len() > 1 {
                for &i in &idx {
                    keep[i] = named.contains(&i);
                    if keep[i] {
                        picks[i].picked = true;
                        picks[i].reason = format!("'{}' is in the prompt", picks[i].matched.clone().unwrap_or_default());
                    }
                }
            } else if idx.iter().any(|&i| picks[i].picked) {
                for &i in &idx {
                    keep[i] = picks[i].picked;
                }
            }
        }
        if keep.iter().any(|k| !k) {
            let mut k = keep.iter();
            self.loras.retain(|_| *k.next().unwrap_or(&true));
            for l in &mut self.layers {
                let mut k = keep.iter();
                l.modules.retain(|_| *k.next().unwrap_or(&true));
            }
            for (c, kept) in picks.iter_mut().zip(&keep) {
                c.picked = *kept;
            }
            self.candidates.extend(picks);
        }
        Ok(())
    }

    /// Finds the subject LoRAs' trigger words (or names) in the prompt as the UNet sees it:
    /// positions in the first tokenizer's framed ids (start token first), one entry per token of
    /// every phrase found. Attention weights like `(vlox:1.2)` are read through.
    pub fn locate_subjects(&mut self, tokenizer: &crate::sdxl::tokenizer::ClipTokenizer, prompt: &str) -> Result<()> {
        let plain: String = crate::sdxl::prompt::parse_attention(prompt)
            .into_iter()
            .map(|f| match f {
                crate::sdxl::prompt::Fragment::Text(t, _) => t,
                crate::sdxl::prompt::Fragment::Break => " ".to_string(),
            })
            .collect();
        let ids = tokenizer.frame(&tokenizer.encode_raw(&plain)?);
        let mut found = Vec::new();
        for l in self.loras.iter().filter(|l| l.role == Role::Subject) {
            // Trigger phrases (short: long ones are training captions, whose background and
            // colour words are not the subject) and the LoRA's own name.
            let short = l.lora.info.trigger_words.iter().filter(|p| p.split_whitespace().count() <= 3);
            for phrase in short.chain(std::iter::once(&l.lora.name)) {
                let t = tokenizer.encode_raw(phrase)?;
                if t.is_empty() || t.len() > ids.len() {
                    continue;
                }
                for start in 0..=ids.len() - t.len() {
                    if ids[start..start + t.len()] == t[..] {
                        found.extend(start..start + t.len());
                    }
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        self.subject_tokens = found;
        Ok(())
    }

    /// Every LoRA at its strength on every layer it adapts (`[layer][lora]`, 0 where it has no
    /// module): a merge's weights, and the starting point of several strategies.
    pub fn full_strengths(&self) -> Vec<Vec<f64>> {
        self.layers
            .iter()
            .map(|l| self.loras.iter().enumerate().map(|(j, m)| if l.modules[j].is_some() { m.strength } else { 0.0 }).collect())
            .collect()
    }

    /// The multiplier a LoRA's prompt schedule puts on layer `layer` at `step` (1 without one).
    pub fn schedule_factor(&self, layer: usize, lora: usize, step: usize, steps: usize) -> f64 {
        self.loras[lora].schedule.as_ref().map_or(1.0, |s| s.unet_weight(self.layers[layer].block, step, steps))
    }

    /// The step-independent part of it (block weights), for fused mixes.
    pub fn block_factor(&self, layer: usize, lora: usize) -> f64 {
        self.loras[lora].schedule.as_ref().map_or(1.0, |s| s.block_ratio(self.layers[layer].block))
    }

    /// Some LoRA's weight changes from step to step (loractl keyframes, lbw start/stop).
    pub fn has_step_schedules(&self) -> bool {
        self.loras.iter().any(|l| l.schedule.as_ref().is_some_and(|s| s.varies_per_step()))
    }

    /// Indices of the LoRAs with a role; the first `Unknown`s fill missing roles in order
    /// (first content, then style), so two LoRAs without roles still pair up.
    pub fn content_and_style(&self) -> Result<(usize, usize)> {
        let find = |r: Role| self.loras.iter().position(|l| l.role == r);
        let mut unknown = self.loras.iter().enumerate().filter(|(_, l)| l.role == Role::Unknown).map(|(i, _)| i);
        let c = find(Role::Subject).or_else(|| unknown.next());
        let s = find(Role::Style).or_else(|| unknown.next());
        match (c, s) {
            (Some(c), Some(s)) if self.loras.len() == 2 && c != s => Ok((c, s)),
            _ => Err(Error::Argument(format!(
                "this strategy mixes exactly one subject and one style LoRA; got {} ({}) — mark roles with --lora PATH:WEIGHT:subject|style or in the library",
                self.loras.len(),
                self.loras.iter().map(|l| format!("{}: {}", l.lora.name, l.role.as_str())).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// How a cross-attention map becomes a mask. Each image's map is measured from its `floor`
/// quantile (0: its minimum) to its maximum; values below `low` of that span give 0, above
/// `high` 1, linear between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskRamp {
    pub floor: f64,
    pub low: f64,
    pub high: f64,
}

impl MaskRamp {
    /// The mask of one image's map (any layout; values in place).
    fn apply(&self, map: &mut [f32]) {
        if map.is_empty() {
            return;
        }
        let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut sorted = map.to_vec();
        let k = ((sorted.len() - 1) as f64 * self.floor.clamp(0.0, 1.0)).round() as usize;
        let floor = *sorted.select_nth_unstable_by(k, f32::total_cmp).1 as f64;
        let span = (max - floor).max(1e-12);
        let width = (self.high - self.low).max(1e-6);
        for v in map.iter_mut() {
            let x = (*v as f64 - floor) / span;
            *v = ((x - self.low) / width).clamp(0.0, 1.0) as f32;
        }
    }
}

/// A per-step mixing rule. One file per strategy.
pub trait MixStrategy: Send {
    fn name(&self) -> &'static str;
    /// Weight statistics, computed once per mix.
    fn prepare(&mut self, _plan: &MixPlan) -> Result<()> {
        Ok(())
    }
    /// A copy of this prepared strategy for another mix of the same LoRAs at the same strengths
    /// (a batch shares its weight statistics), where `prepare` reads nothing but the LoRAs;
    /// `None`: prepare again.
    fn share(&self) -> Option<Box<dyn MixStrategy>> {
        None
    }
    /// UNet passes per step (Composite: one per LoRA).
    fn passes(&self, _plan: &MixPlan) -> usize {
        1
    }
    /// Weights never change: the mixer fuses once instead of running branches.
    fn is_static(&self) -> bool {
        false
    }
    /// The reference applies `B A` without alpha / rank (K-LoRA reference mode).
    fn ignores_alpha(&self) -> bool {
        false
    }
    /// Asymmetric CFG: the unconditional pass runs on the base weights (see [`windows`]).
    fn asymmetric_cfg(&self) -> bool {
        false
    }
    /// The fraction of each LoRA's weight the unconditional pass keeps: with asymmetric CFG (0:
    /// the base weights, CRAFT-LoRA's rule), or, with attention masks, through per-row factors in
    /// one batched pass (1: ordinary CFG).
    fn uncond_fraction(&self) -> f64 {
        if self.asymmetric_cfg() {
            0.0
        } else {
            1.0
        }
    }
    /// A static strategy that fuses its own per-layer updates (NP-LoRA's projection): returns
    /// `Some(ΔW)` (with every scale and strength applied) for the layers it decides; `None` =
    /// fuse the LoRAs at their weights from [`Self::weights`].
    fn fused_delta(&self, _plan: &MixPlan, _layer: usize) -> Result<Option<candle_core::Tensor>> {
        Ok(None)
    }
    /// Per-token routing on a layer: the sharpness and each LoRA's route there (see
    /// [`loramix_models::TokenRouting`]). Set once when the mix starts.
    fn routing(&self, _plan: &MixPlan, _layer: usize) -> Option<(loramix_models::TokenRouting, Vec<loramix_models::Route>)> {
        None
    }
    /// Spatial masks from cross-attention: at every step, where the subjects' trigger tokens
    /// draw attention (the previous step's cross-attention maps) subjects lead and styles yield
    /// (see [`auto`]). Needs [`MixPlan::subject_tokens`].
    fn attention_masks(&self, _plan: &MixPlan) -> Option<MaskRamp> {
        None
    }
    /// The strength of each LoRA's text-encoder modules (fused once; the prompt is encoded once).
    fn text_encoder_strengths(&self, plan: &MixPlan) -> Vec<f64> {
        plan.loras.iter().map(|l| l.strength).collect()
    }
    /// `[layer][lora]` weights (including the user's strength; 0 = off) for one pass of a step.
    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, pass: usize) -> Vec<Vec<f64>>;
    /// A line for the trace and logs (e.g. gamma, the pattern, preview settings).
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Options that select and configure a strategy.
#[derive(Debug, Clone)]
pub struct MixOptions {
    pub strategy: String,
    /// `s` or `s*`.
    pub klora_pattern: Option<String>,
    /// `corrected` (default) or `reference`.
    pub klora_mode: String,
    /// LoRA Switch period in steps.
    pub switch_every: usize,
    /// EST-LoRA's previews and their discrepancy (from [`est::style_discrepancy`]).
    pub est_previews: Option<est::Previews>,
    /// Step windows per role for `windows` (see [`windows::RoleWindows::parse`]).
    pub windows: Option<String>,
    /// Run the unconditional half of CFG on the base weights (any per-step strategy).
    pub asymmetric_cfg: bool,
    /// NP-LoRA's projection strength μ.
    pub np_mu: Option<f64>,
    /// What K-LoRA / EST do on the layers they do not select on (corrected mode): `follow` (the
    /// default: the layer follows its attention block's selectors) or `merge`.
    pub klora_others: Option<String>,
}

impl Default for MixOptions {
    fn default() -> Self {
        Self {
            strategy: "merge".into(),
            klora_pattern: None,
            klora_mode: "corrected".into(),
            switch_every: 5,
            est_previews: None,
            windows: None,
            asymmetric_cfg: false,
            np_mu: None,
            klora_others: None,
        }
    }
}

pub const STRATEGIES: &[&str] = &["merge", "switch", "composite", "klora", "est", "np", "windows", "auto"];

pub fn build(opts: &MixOptions) -> Result<Box<dyn MixStrategy>> {
    let default_pattern = if opts.strategy == "est" { klora::Pattern::S } else { klora::Pattern::SStar };
    let pattern = || -> Result<klora::Pattern> {
        match opts.klora_pattern.as_deref() {
            None => Ok(default_pattern),
            Some("s*") => Ok(klora::Pattern::SStar),
            Some("s") => Ok(klora::Pattern::S),
            Some(o) => Err(Error::Argument(format!("--klora-pattern {o}: expected s or s*"))),
        }
    };
    let mode = || -> Result<klora::Mode> {
        match opts.klora_mode.as_str() {
            "corrected" => Ok(klora::Mode::Corrected),
            "reference" => Ok(klora::Mode::Reference),
            o => Err(Error::Argument(format!("--klora-mode {o}: expected corrected or reference"))),
        }
    };
    let strategy: Box<dyn MixStrategy> = match opts.strategy.as_str() {
        "merge" => Box::new(merge::Merge),
        "np" => Box::new(np::NpLora::new(opts.np_mu.unwrap_or(np::DEFAULT_MU))?),
        "windows" => Box::new(windows::Windows::new(match &opts.windows {
            Some(spec) => windows::RoleWindows::parse(spec)?,
            None => windows::RoleWindows::default(),
        })),
        "switch" => Box::new(switch::Switch::new(opts.switch_every)?),
        "composite" => Box::new(composite::Composite),
        "klora" => Box::new(klora::KLora::new(pattern()?, mode()?).with_others(klora::Others::parse(opts.klora_others.as_deref())?)),
        "auto" => Box::new(auto::Auto::new(auto::DEFAULT_RAMP)),
        "est" => match &opts.est_previews {
            Some(p) => Box::new(est::Est::new(pattern()?, mode()?, p.clone(), klora::Others::parse(opts.klora_others.as_deref())?)),
            None => return Err(Error::Argument("--mix est: the style discrepancy of the previews is computed first (est::style_discrepancy)".into())),
        },
        o => return Err(Error::Argument(format!("--mix {o}: expected one of {}", STRATEGIES.join(", ")))),
    };
    if opts.windows.is_some() && opts.strategy != "windows" {
        return Err(Error::Argument(format!("--windows is an option of --mix windows, not of --mix {}", opts.strategy)));
    }
    Ok(if opts.asymmetric_cfg { Box::new(AsymmetricCfg(strategy)) } else { strategy })
}

/// The options set for another strategy than the chosen one, which it ignores: a user who asks
/// for `--np-mu` under `--mix klora` is told, rather than left to wonder why nothing changed.
/// (`--windows` elsewhere is refused by [`build`].) `switch_every` is not listed: its default
/// cannot be told from a given value.
pub fn ignored_options(opts: &MixOptions) -> Vec<String> {
    let s = opts.strategy.as_str();
    let klora_like = matches!(s, "klora" | "est");
    let mut out = vec![];
    let mut note = |set: bool, flag: &str, of: &str| {
        if set {
            out.push(format!("{flag} is an option of {of}; --mix {s} ignores it"));
        }
    };
    note(opts.klora_pattern.is_some() && !klora_like, "--klora-pattern", "--mix klora and est");
    note(opts.klora_mode != "corrected" && !klora_like, "--klora-mode", "--mix klora and est");
    note(opts.klora_others.is_some() && !klora_like, "--klora-others", "--mix klora and est");
    note(opts.np_mu.is_some() && s != "np", "--np-mu", "--mix np");
    out
}

/// Any strategy with asymmetric CFG: the same weights, never fused (the unconditional pass
/// needs the base weights, the conditional one the LoRAs).
struct AsymmetricCfg(Box<dyn MixStrategy>);

impl MixStrategy for AsymmetricCfg {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        self.0.prepare(plan)
    }
    fn share(&self) -> Option<Box<dyn MixStrategy>> {
        self.0.share().map(|s| Box::new(AsymmetricCfg(s)) as Box<dyn MixStrategy>)
    }
    fn passes(&self, plan: &MixPlan) -> usize {
        self.0.passes(plan)
    }
    fn ignores_alpha(&self) -> bool {
        self.0.ignores_alpha()
    }
    fn asymmetric_cfg(&self) -> bool {
        true
    }
    fn uncond_fraction(&self) -> f64 {
        0.0
    }
    fn routing(&self, plan: &MixPlan, layer: usize) -> Option<(loramix_models::TokenRouting, Vec<loramix_models::Route>)> {
        self.0.routing(plan, layer)
    }
    fn attention_masks(&self, plan: &MixPlan) -> Option<MaskRamp> {
        self.0.attention_masks(plan)
    }
    fn text_encoder_strengths(&self, plan: &MixPlan) -> Vec<f64> {
        self.0.text_encoder_strengths(plan)
    }
    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, pass: usize) -> Vec<Vec<f64>> {
        self.0.weights(plan, step, steps, pass)
    }
    fn describe(&self) -> serde_json::Value {
        let mut d = self.0.describe();
        match d.as_object_mut() {
            Some(o) => {
                o.insert("asymmetric_cfg".into(), true.into());
            }
            None => d = serde_json::json!({ "asymmetric_cfg": true }),
        }
        d
    }
}

/// What each LoRA weighed in each UNet linear at each step.
#[derive(Debug, Clone, Serialize)]
pub struct MixTrace {
    pub strategy: String,
    pub steps: usize,
    /// The first step that ran: img2img and hires passes enter the schedule at
    /// ⌊steps × (1 − strength)⌋, and the steps before it never run.
    #[serde(skip_serializing_if = "is_zero")]
    pub first_step: usize,
    pub layers: Vec<String>,
    pub loras: Vec<String>,
    /// `[step − first_step][layer][lora]`: one row per step that ran.
    pub weights: Vec<Vec<Vec<f64>>>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// LoRAs considered for the prompt (`--candidates library`, or more offered than asked
    /// for), picked or not, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<candidates::Candidate>,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl MixTrace {
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| Error::Argument(format!("trace: {e}")))?;
        write_atomic(path, &json)
    }
}

/// Drives a strategy during sampling (the pipeline's [`StepMixer`]).
pub struct Mixer<'a> {
    targets: &'a AdapterTargets,
    plan: MixPlan,
    strategy: Box<dyn MixStrategy>,
    /// The mix was fused into the weights once (no per-step work).
    fused: bool,
    /// Cross-attention masks are on; `latent` = ((h, w), UNet rows, CFG batch) once sampling begins.
    masks: Option<MaskRamp>,
    latent: Option<((usize, usize), usize, bool)>,
    trace: MixTrace,
    linear_rows: Vec<usize>,
    /// The step `passes` last decided, with its `[pass][layer][lora]` weights.
    current: (usize, Vec<Vec<Vec<f64>>>),
}

impl<'a> Mixer<'a> {
    /// Attaches every LoRA: UNet modules as branches (weight 0 until a step sets them; fused
    /// once for static strategies), text-encoder modules fused at their strengths.
    pub fn new(targets: &'a AdapterTargets, plan: MixPlan, mut strategy: Box<dyn MixStrategy>) -> Result<Self> {
        strategy.prepare(&plan)?;
        Self::prepared(targets, plan, strategy)
    }

    /// A mixer over a strategy already prepared for these LoRAs ([`MixStrategy::share`]).
    pub fn prepared(targets: &'a AdapterTargets, plan: MixPlan, strategy: Box<dyn MixStrategy>) -> Result<Self> {
        targets.clear();
        let te_strengths: Vec<f64> = strategy
            .text_encoder_strengths(&plan)
            .into_iter()
            .zip(&plan.loras)
            .map(|(w, l)| w * l.schedule.as_ref().map_or(1.0, |s| s.te_weight()))
            .collect();
        // A static mix is fused once, unless a prompt schedule changes weights from step to step.
        let fused = strategy.is_static() && !plan.has_step_schedules();
        if strategy.is_static() && !fused && (0..plan.layers.len()).any(|li| strategy.fused_delta(&plan, li).is_ok_and(|d| d.is_some())) {
            return Err(Error::Argument(format!("--mix {} fuses its own updates once and cannot follow per-step LoRA weights (keyframes, start/stop)", strategy.name())));
        }
        let te_only: Vec<LoadedLora> = plan.loras.iter().map(|l| only_component(&l.lora, targets, false)).collect();
        let te_refs: Vec<(&LoadedLora, f64)> = te_only.iter().zip(te_strengths).filter(|(_, w)| *w != 0.0).collect();
        crate::lora::fuse(targets, &te_refs)?;
        let unet_only: Vec<LoadedLora> = plan.loras.iter().map(|l| only_component(&l.lora, targets, true)).collect();
        if fused {
            fuse_static(targets, &plan, strategy.as_ref())?;
        } else {
            let refs: Vec<(&LoadedLora, f64)> = unet_only.iter().map(|l| (l, 0.0)).collect();
            crate::lora::attach(targets, &refs)?;
            if strategy.attention_masks(&plan).is_some() {
                for layer in &plan.layers {
                    let mut state = targets.targets[layer.target].layer.slot.write();
                    if layer.path.ends_with("attn2.to_q") {
                        state.probe_tokens = Some(plan.subject_tokens.clone());
                    }
                    for l in &plan.loras {
                        if let Some(b) = state.branches.iter_mut().find(|b| b.name == l.lora.name) {
                            b.route = match l.role {
                                Role::Subject => Route::Lead,
                                Role::Style => Route::Yield,
                                _ => Route::Free,
                            };
                        }
                    }
                }
            }
            for (li, layer) in plan.layers.iter().enumerate() {
                if let Some((routing, routes)) = strategy.routing(&plan, li) {
                    let mut state = targets.targets[layer.target].layer.slot.write();
                    state.routing = Some(routing);
                    for (j, l) in plan.loras.iter().enumerate() {
                        if let Some(b) = state.branches.iter_mut().find(|b| b.name == l.lora.name) {
                            b.route = routes[j];
                        }
                    }
                }
            }
        }
        let linear_rows: Vec<usize> = plan.layers.iter().enumerate().filter(|(_, l)| l.is_linear).map(|(i, _)| i).collect();
        let trace = MixTrace {
            strategy: strategy.name().to_string(),
            steps: 0,
            first_step: 0,
            layers: linear_rows.iter().map(|&i| plan.layers[i].path.clone()).collect(),
            loras: plan.loras.iter().map(|l| l.lora.name.clone()).collect(),
            weights: Vec::new(),
            details: strategy.describe(),
            candidates: plan.candidates.clone(),
        };
        let masks = if fused { None } else { strategy.attention_masks(&plan) };
        Ok(Self { targets, plan, strategy, fused, masks, latent: None, trace, linear_rows, current: (usize::MAX, Vec::new()) })
    }

    pub fn plan(&self) -> &MixPlan {
        &self.plan
    }

    /// The full `[step][layer][lora]` table for `steps` steps without sampling (for tests and
    /// the app's preview of a mix).
    pub fn plan_weights(&self, steps: usize) -> Vec<Vec<Vec<f64>>> {
        (0..steps).map(|s| self.step_row(s, steps)).collect()
    }

    /// A step's trace row: each LoRA's weight in the pass where it was active.
    fn step_row(&self, step: usize, steps: usize) -> Vec<Vec<f64>> {
        self.trace_row(&self.pass_weights(step, steps))
    }

    /// `[pass][layer][lora]` for one step.
    fn pass_weights(&self, step: usize, steps: usize) -> Vec<Vec<Vec<f64>>> {
        let passes = self.strategy.passes(&self.plan).max(1);
        let scheduled = self.plan.loras.iter().any(|l| l.schedule.is_some());
        (0..passes)
            .map(|p| {
                let mut w = self.strategy.weights(&self.plan, step, steps, p);
                if scheduled {
                    for (li, row) in w.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v *= self.plan.schedule_factor(li, j, step, steps);
                        }
                    }
                }
                w
            })
            .collect()
    }

    fn trace_row(&self, per_pass: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
        let mut row: Vec<Vec<f64>> = vec![vec![0.0; self.plan.loras.len()]; self.linear_rows.len()];
        for w in per_pass {
            for (r, &li) in self.linear_rows.iter().enumerate() {
                for (j, v) in w[li].iter().enumerate() {
                    if v.abs() > row[r][j].abs() {
                        row[r][j] = *v;
                    }
                }
            }
        }
        row
    }

    /// The prepared strategy for the next mix of the same LoRAs, when it can be shared.
    pub fn share_strategy(&self) -> Option<Box<dyn MixStrategy>> {
        self.strategy.share()
    }

    pub fn finish(self) -> MixTrace {
        self.targets.clear();
        self.trace
    }
}

/// Fuses a static strategy once: per layer, the strategy's own ΔW where it has one, else the
/// LoRAs at the layer's weights (`W' = W + Σ w_j s_j ΔW_j`, in f32 on the layer's device).
fn fuse_static(targets: &AdapterTargets, plan: &MixPlan, strategy: &dyn MixStrategy) -> Result<()> {
    let w = strategy.weights(plan, 0, 1, 0);
    for (li, layer) in plan.layers.iter().enumerate() {
        let base = &targets.targets[layer.target].layer.base_weight;
        let delta = match strategy.fused_delta(plan, li)? {
            Some(d) => Some(d.to_device(base.device())?.to_dtype(candle_core::DType::F32)?),
            None => {
                let mut acc: Option<candle_core::Tensor> = None;
                for (j, m) in plan.loras.iter().enumerate() {
                    let wj = w[li][j] * plan.block_factor(li, j);
                    let (Some(mi), true) = (layer.modules[j], wj != 0.0) else { continue };
                    let d = (m.lora.delta_on(&m.lora.modules[mi], base.device())? * wj)?;
                    acc = Some(match acc {
                        Some(a) => (a + d)?,
                        None => d,
                    });
                }
                acc
            }
        };
        if let Some(d) = delta {
            let fused = (base.to_dtype(candle_core::DType::F32)? + d.reshape(base.dims())?)?;
            targets.targets[layer.target].layer.slot.write().fused_weight = Some(fused.to_dtype(base.dtype())?);
        }
    }
    Ok(())
}

/// A copy of `l` with only its UNet (or only its text-encoder) modules.
fn only_component(l: &LoadedLora, targets: &AdapterTargets, unet: bool) -> LoadedLora {
    let mut c = l.clone();
    c.modules.retain(|m| (targets.targets[m.target].component == Component::Unet) == unet);
    c
}

impl Mixer<'_> {
    /// The spatial mask for the next step from the last step's cross-attention maps: the
    /// attention mass on the subjects' trigger tokens, averaged over the probed layers at the
    /// finest of their resolutions, ramped per image ([`MaskRamp`]), from the conditional rows
    /// (the unconditional rows see no prompt) for every row.
    fn update_mask(&mut self, ramp: MaskRamp) -> Result<()> {
        let Some(((h, w), rows, cfg)) = self.latent else { return Ok(()) };
        let mut maps = Vec::new();
        for layer in &self.plan.layers {
            if layer.path.ends_with("attn2.to_q") {
                if let Some(m) = self.targets.targets[layer.target].layer.slot.write().probe_map.take() {
                    maps.push(m);
                }
            }
        }
        let mut acc: Option<candle_core::Tensor> = None;
        let mut finest = 0;
        let mut grids = Vec::new();
        for m in maps {
            let (b, t) = m.dims2()?;
            let th = ((t * h) as f64 / w as f64).sqrt().round() as usize;
            if th == 0 || t % th != 0 || (b != rows && b != rows / 2) {
                continue;
            }
            finest = finest.max(th);
            grids.push(m.reshape((b, 1, th, t / th))?);
        }
        for g in grids {
            let (_, _, gh, gw) = g.dims4()?;
            let g = if gh < finest { g.upsample_nearest2d(finest, gw * finest / gh)? } else { g };
            acc = Some(match acc {
                None => g,
                Some(a) => (a + g)?,
            });
        }
        let Some(acc) = acc else { return Ok(()) };
        // The conditional rows: the second half of a CFG batch, or all rows of a conditional-only pass.
        let n = acc.dim(0)?;
        let half = if cfg && n == rows { rows / 2 } else { 0 };
        let cond = acc.narrow(0, half, n - half)?;
        // A few maps of a few thousand cells: the quantile is taken on the host.
        let (b, _, mh, mw) = cond.dims4()?;
        let mut cells: Vec<f32> = cond.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        for map in cells.chunks_mut(mh * mw) {
            ramp.apply(map);
        }
        let m = candle_core::Tensor::from_vec(cells, (b, 1, mh, mw), &candle_core::Device::Cpu)?.to_device(cond.device())?.to_dtype(cond.dtype())?;
        // With asymmetric CFG the LoRAs run on the conditional rows only. Otherwise one batched
        // pass: the unconditional rows keep `uncond_fraction` of each LoRA through per-row factors.
        let asymmetric = self.strategy.asymmetric_cfg();
        let mask = if cfg && !asymmetric { candle_core::Tensor::cat(&[&m, &m], 0)? } else { m };
        let fraction = self.strategy.uncond_fraction();
        let row_factors = if cfg && !asymmetric && fraction != 1.0 {
            let b = mask.dim(0)? / 2;
            let f: Vec<f32> = (0..2 * b).map(|i| if i < b { fraction as f32 } else { 1.0 }).collect();
            Some(candle_core::Tensor::from_vec(f, 2 * b, mask.device())?)
        } else {
            None
        };
        for layer in &self.plan.layers {
            if layer.path.ends_with("attn2.to_k") || layer.path.ends_with("attn2.to_v") {
                // These read the prompt: the mask splits their attention's queries instead.
                self.targets.targets[layer.target].layer.slot.write().query_mask = Some(mask.clone());
                continue;
            }
            let mut state = self.targets.targets[layer.target].layer.slot.write();
            state.mask = Some(mask.clone());
            state.mask_rows = row_factors.clone();
        }
        Ok(())
    }
}

impl StepMixer for Mixer<'_> {
    fn begin(&mut self, latent_hw: (usize, usize), rows: usize, cfg: bool) -> Result<()> {
        self.latent = Some((latent_hw, rows, cfg));
        Ok(())
    }

    fn asymmetric_cfg(&self) -> bool {
        self.strategy.asymmetric_cfg()
    }

    fn apply_base(&mut self) -> Result<()> {
        let f = self.strategy.uncond_fraction();
        for layer in &self.plan.layers {
            let mut state = self.targets.targets[layer.target].layer.slot.write();
            for b in state.branches.iter_mut() {
                b.weight *= f;
            }
            // The base pass reads the negative prompt: its attention maps say nothing of the subject.
            if state.probe_tokens.is_some() {
                state.probe_tokens = Some(Vec::new());
            }
        }
        Ok(())
    }

    fn passes(&mut self, step: usize, steps: usize, _timestep: f64) -> Result<usize> {
        if let Some(ramp) = self.masks {
            self.update_mask(ramp)?;
        }
        // The step's weights are decided once here: the trace row and every pass's apply use them.
        let per_pass = self.pass_weights(step, steps);
        if self.trace.weights.is_empty() {
            self.trace.first_step = step;
        }
        if self.trace.first_step + self.trace.weights.len() == step {
            let row = self.trace_row(&per_pass);
            self.trace.weights.push(row);
            self.trace.steps = steps;
        }
        let n = per_pass.len();
        self.current = (step, per_pass);
        Ok(n)
    }

    fn apply(&mut self, step: usize, pass: usize) -> Result<()> {
        if self.fused {
            return Ok(());
        }
        if self.current.0 != step || pass >= self.current.1.len() {
            return Err(Error::Argument(format!("mixer: pass {pass} of step {step} was not announced by passes()")));
        }
        let w = &self.current.1[pass];
        let ignore_alpha = self.strategy.ignores_alpha();
        for (li, layer) in self.plan.layers.iter().enumerate() {
            let slot = &self.targets.targets[layer.target].layer.slot;
            let mut state = slot.write();
            if state.probe_tokens.is_some() {
                state.probe_tokens = Some(self.plan.subject_tokens.clone());
            }
            for (j, lora) in self.plan.loras.iter().enumerate() {
                if layer.modules[j].is_none() {
                    continue;
                }
                if let Some(b) = state.branches.iter_mut().find(|b| b.name == lora.lora.name) {
                    let v = w[li][j];
                    b.weight = if ignore_alpha && b.scale != 0.0 { v / b.scale } else { v };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MaskRamp;

    #[test]
    fn options_of_other_strategies_are_named() {
        let opts = |strategy: &str| super::MixOptions { strategy: strategy.into(), np_mu: Some(5.0), klora_pattern: Some("s".into()), ..Default::default() };
        let w = super::ignored_options(&opts("merge"));
        assert_eq!(w, ["--klora-pattern is an option of --mix klora and est; --mix merge ignores it", "--np-mu is an option of --mix np; --mix merge ignores it"]);
        assert_eq!(super::ignored_options(&opts("klora")), ["--np-mu is an option of --mix np; --mix klora ignores it"]);
        assert_eq!(super::ignored_options(&opts("np")), ["--klora-pattern is an option of --mix klora and est; --mix np ignores it"]);
        assert!(super::ignored_options(&super::MixOptions::default()).is_empty());
    }

    #[test]
    fn mask_ramp_measures_from_the_floor_quantile() {
        // Ten cells: a background at 4–5 (one cold cell at 0) and a subject at 9–10.
        let map = [0.0f32, 4.0, 4.0, 4.5, 5.0, 5.0, 5.0, 5.0, 9.0, 10.0];
        // From the minimum (the old rule) the background is already most of the way up the
        // ramp: (4 − 0) / 10 = 0.4 → (0.4 − 0.25) / 0.25 = 0.6.
        let mut old = map;
        MaskRamp { floor: 0.0, low: 0.25, high: 0.5 }.apply(&mut old);
        assert!((old[1] - 0.6).abs() < 1e-6 && old[6] == 1.0, "{old:?}");
        assert!((old[0] - 0.0).abs() < 1e-6 && old[9] == 1.0);
        // From the 40 % quantile (index round(9·0.4) = 4 of the sorted cells: 5.0) the
        // background is 0 and the subject 1: (9 − 5) / (10 − 5) = 0.8 ≥ 0.25.
        let mut new = map;
        MaskRamp { floor: 0.4, low: 0.0, high: 0.25 }.apply(&mut new);
        assert_eq!(new, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        // Linear inside the ramp: 6.0 is 0.2 of the span above the floor, 0.8 of the ramp.
        let mut mid = [5.0f32, 6.0, 10.0, 0.0, 0.0];
        MaskRamp { floor: 0.5, low: 0.0, high: 0.25 }.apply(&mut mid);
        assert!((mid[1] - 0.8).abs() < 1e-6, "{mid:?}");
        // A flat map gives no region rather than dividing by zero.
        let mut flat = [3.0f32; 4];
        MaskRamp { floor: 0.4, low: 0.0, high: 0.25 }.apply(&mut flat);
        assert_eq!(flat, [0.0; 4]);
    }
}
