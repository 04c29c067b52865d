//! Training-free per-step LoRA mixing.
//!
//! A [`MixStrategy`] decides, for every UNet layer and every step (and pass), the weight each
//! LoRA has there. The [`Mixer`] attaches all LoRAs to the UNet as unfused branches once and,
//! as the sampler's [`StepMixer`], writes those weights into the layers before every UNet pass,
//! recording a [`MixTrace`]. Weight statistics are computed once per mix (see [`stats`]), never
//! per step. Text-encoder modules are not mixed per step (the prompt is encoded once): they are
//! fused at the LoRAs' strengths, or left off where the reference does so.

pub mod auto;
pub mod composite;
pub mod est;
pub mod klora;
pub mod merge;
pub mod stats;
pub mod switch;

use std::path::Path;

use loramix_models::LayerKind;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lora::{keys::Component, AdapterTargets, LoadedLora, Role};
use crate::output::write_atomic;
use crate::pipeline::StepMixer;

/// One LoRA taking part in a mix.
#[derive(Debug, Clone)]
pub struct MixLora {
    pub lora: LoadedLora,
    pub role: Role,
    /// The user's strength m.
    pub strength: f64,
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
            layers.push(MixLayer { path: t.layer.path.clone(), target: ti, is_linear: t.layer.kind == LayerKind::Linear, modules });
        }
        Ok(Self { loras, layers })
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

/// A per-step mixing rule. One file per strategy.
pub trait MixStrategy: Send {
    fn name(&self) -> &'static str;
    /// Weight statistics, computed once per mix.
    fn prepare(&mut self, _plan: &MixPlan) -> Result<()> {
        Ok(())
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
}

impl Default for MixOptions {
    fn default() -> Self {
        Self { strategy: "merge".into(), klora_pattern: None, klora_mode: "corrected".into(), switch_every: 5, est_previews: None }
    }
}

pub const STRATEGIES: &[&str] = &["merge", "switch", "composite", "klora", "est", "auto"];

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
    Ok(match opts.strategy.as_str() {
        "merge" => Box::new(merge::Merge),
        "switch" => Box::new(switch::Switch::new(opts.switch_every)?),
        "composite" => Box::new(composite::Composite),
        "klora" => Box::new(klora::KLora::new(pattern()?, mode()?)),
        "auto" => Box::new(auto::Auto::new(pattern()?)),
        "est" => match &opts.est_previews {
            Some(p) => Box::new(est::Est::new(pattern()?, mode()?, p.clone())),
            None => return Err(Error::Argument("--mix est: the style discrepancy of the previews is computed first (est::style_discrepancy)".into())),
        },
        o => return Err(Error::Argument(format!("--mix {o}: expected one of {}", STRATEGIES.join(", ")))),
    })
}

/// What each LoRA weighed in each UNet linear at each step.
#[derive(Debug, Clone, Serialize)]
pub struct MixTrace {
    pub strategy: String,
    pub steps: usize,
    pub layers: Vec<String>,
    pub loras: Vec<String>,
    /// `[step][layer][lora]`.
    pub weights: Vec<Vec<Vec<f64>>>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
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
    trace: MixTrace,
    linear_rows: Vec<usize>,
    /// The step `passes` last decided, with its `[pass][layer][lora]` weights.
    current: (usize, Vec<Vec<Vec<f64>>>),
}

impl<'a> Mixer<'a> {
    /// Attaches every LoRA: UNet modules as branches (weight 0 until a step sets them; fused
    /// once for static strategies), text-encoder modules fused at their strengths.
    pub fn new(targets: &'a AdapterTargets, plan: MixPlan, mut strategy: Box<dyn MixStrategy>) -> Result<Self> {
        targets.clear();
        strategy.prepare(&plan)?;
        let te_strengths = strategy.text_encoder_strengths(&plan);
        let te_only: Vec<LoadedLora> = plan.loras.iter().map(|l| only_component(&l.lora, targets, false)).collect();
        let te_refs: Vec<(&LoadedLora, f64)> = te_only.iter().zip(te_strengths).filter(|(_, w)| *w != 0.0).collect();
        crate::lora::fuse(targets, &te_refs)?;
        let unet_only: Vec<LoadedLora> = plan.loras.iter().map(|l| only_component(&l.lora, targets, true)).collect();
        if strategy.is_static() {
            let refs: Vec<(&LoadedLora, f64)> = unet_only.iter().zip(&plan.loras).map(|(l, m)| (l, m.strength)).collect();
            crate::lora::fuse(targets, &refs)?;
        } else {
            let refs: Vec<(&LoadedLora, f64)> = unet_only.iter().map(|l| (l, 0.0)).collect();
            crate::lora::attach(targets, &refs)?;
        }
        let linear_rows: Vec<usize> = plan.layers.iter().enumerate().filter(|(_, l)| l.is_linear).map(|(i, _)| i).collect();
        let trace = MixTrace {
            strategy: strategy.name().to_string(),
            steps: 0,
            layers: linear_rows.iter().map(|&i| plan.layers[i].path.clone()).collect(),
            loras: plan.loras.iter().map(|l| l.lora.name.clone()).collect(),
            weights: Vec::new(),
            details: strategy.describe(),
        };
        Ok(Self { targets, plan, strategy, trace, linear_rows, current: (usize::MAX, Vec::new()) })
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
        (0..passes).map(|p| self.strategy.weights(&self.plan, step, steps, p)).collect()
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

    pub fn finish(self) -> MixTrace {
        self.targets.clear();
        self.trace
    }
}

/// A copy of `l` with only its UNet (or only its text-encoder) modules.
fn only_component(l: &LoadedLora, targets: &AdapterTargets, unet: bool) -> LoadedLora {
    let mut c = l.clone();
    c.modules.retain(|m| (targets.targets[m.target].component == Component::Unet) == unet);
    c
}

impl StepMixer for Mixer<'_> {
    fn passes(&mut self, step: usize, steps: usize, _timestep: f64) -> Result<usize> {
        // The step's weights are decided once here: the trace row and every pass's apply use them.
        let per_pass = self.pass_weights(step, steps);
        if self.trace.weights.len() == step {
            let row = self.trace_row(&per_pass);
            self.trace.weights.push(row);
            self.trace.steps = steps;
        }
        let n = per_pass.len();
        self.current = (step, per_pass);
        Ok(n)
    }

    fn apply(&mut self, step: usize, pass: usize) -> Result<()> {
        if self.strategy.is_static() {
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
