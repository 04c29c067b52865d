//! K-LoRA (arXiv 2502.18461, HVision-NKU/K-LoRA): at each step every attention projection
//! (q, k, v, out of self- and cross-attention) applies exactly one of the two LoRAs — content
//! or style — by comparing the sums of their K = r_c·r_s largest |ΔW| entries, the content sum
//! divided by gamma (the pair's mean L1 ratio) and the style sum multiplied by a time scale.
//!
//! All three statistics depend on weights only, so each layer's decision sequence is fixed
//! before sampling: we compute the sums once (cached by LoRA hash) and each step is a lookup.
//!
//! Modes. `Reference` reproduces the reference decision for decision: ΔW = B A without alpha /
//! rank (in the statistics and in what is applied), no text-encoder LoRA, and its global call
//! counter c = L·step + (layer index) + 1 with period 50·L (L = selector layers; 28000 on SDXL),
//! which is only right for 50-step sampling. `Corrected` (default) uses p = step / steps for
//! every layer of a step and the standard alpha / rank scale, so it works at any step count.
//!
//! Layers K-LoRA does not select on (feed-forward, proj_in/proj_out, resnet convs: 28 of the 60
//! layers a miniworld LoCon LoRA adapts, and most of a kohya "all linear" file) are off in
//! reference mode, as in the reference. Corrected mode covers them with an [`Others`] rule:
//! `follow` (the default: each LoRA weighted by the share of its attention block's selectors that
//! chose it at this step; layers outside an attention block are merged) or `merge` (both LoRAs at
//! full strength). Measured on miniworld's LoCon LoRAs (BENCHMARKS.md "Mixing quality"): follow
//! 0.558 harmonic mean of subject and style fidelity, merge 0.501, off (reference) 0.012.

use super::stats::{module_rank, module_stats, Stat};
use super::{MixPlan, MixStrategy};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// scale = 1.5 p + 0.5.
    S,
    /// scale = (1.5 p + 1.275) mod 1.5 (the reference default).
    SStar,
}

/// What corrected mode does on the layers K-LoRA does not select on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Others {
    Merge,
    Follow,
}

impl Others {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s {
            Some("merge") => Ok(Self::Merge),
            None | Some("follow") => Ok(Self::Follow),
            Some(o) => Err(Error::Argument(format!("--klora-others {o}: expected merge or follow"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Corrected,
    Reference,
}

const ALPHA: f64 = 1.5;

/// The reference's time scale at progress `p` ∈ [0, 1).
pub fn time_scale(pattern: Pattern, p: f64) -> f64 {
    time_scale_with_beta(pattern, p, default_beta(pattern))
}

/// K-LoRA's offsets: 0.5 for `s`, 1.5 × 0.85 for `s*` (EST-LoRA replaces it by its discrepancy).
pub fn default_beta(pattern: Pattern) -> f64 {
    match pattern {
        Pattern::S => 0.5,
        Pattern::SStar => ALPHA * 0.85,
    }
}

pub fn time_scale_with_beta(pattern: Pattern, p: f64, beta: f64) -> f64 {
    match pattern {
        Pattern::S => ALPHA * p + beta,
        Pattern::SStar => (ALPHA * p + beta) % ALPHA,
    }
}

/// How a layer's LoRA update is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// K-LoRA: sum of the r_c·r_s largest |ΔW| entries.
    TopK,
    /// EST-LoRA: ‖ΔW‖²_F (the sum of squared singular values).
    Energy,
}

/// gamma: the mean of per-module L1 ratios content / style after dropping ratios ≥ 3× the mean
/// (the reference's outlier filter); infinite when every ratio was dropped.
pub fn gamma(ratios: &[f64]) -> f64 {
    if ratios.is_empty() {
        return 1.0;
    }
    let g0 = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let kept: Vec<f64> = ratios.iter().copied().filter(|r| *r < 3.0 * g0).collect();
    if kept.is_empty() {
        f64::INFINITY
    } else {
        kept.iter().sum::<f64>() / kept.len() as f64
    }
}

/// True when content wins: (S_c / gamma) / (S_s · scale) > 1, with IEEE semantics as torch
/// (x / 0 = ∞ → content; 0 / 0 = NaN → style).
pub fn content_wins(s_c: f64, s_s: f64, gamma: f64, scale: f64) -> bool {
    (s_c / gamma) / (s_s * scale) > 1.0
}

/// One selector layer's statistics.
#[derive(Debug, Clone)]
struct Selector {
    layer: usize,
    s_c: f64,
    s_s: f64,
}

/// A selector layer only one of the two LoRAs adapts: corrected mode applies that one there
/// (the reference requires identical key sets and has no such layers).
#[derive(Debug, Clone)]
struct Lone {
    layer: usize,
    lora: usize,
}

/// A layer outside the selectors: merged, or following the selectors `group` (indices into
/// `selectors`) of its attention block.
#[derive(Debug, Clone)]
struct Other {
    layer: usize,
    group: Vec<usize>,
}

#[derive(Clone)]
pub struct KLora {
    pattern: Pattern,
    mode: Mode,
    others_rule: Others,
    others: Vec<Other>,
    score: Score,
    beta: f64,
    pair: (usize, usize),
    selectors: Vec<Selector>,
    lone: Vec<Lone>,
    gamma: f64,
}

impl KLora {
    pub fn new(pattern: Pattern, mode: Mode) -> Self {
        Self::with_score(pattern, mode, Score::TopK, default_beta(pattern))
    }

    /// The K-LoRA machinery with another score and offset (EST-LoRA).
    pub fn with_score(pattern: Pattern, mode: Mode, score: Score, beta: f64) -> Self {
        Self { pattern, mode, others_rule: Others::Merge, others: Vec::new(), score, beta, pair: (0, 1), selectors: Vec::new(), lone: Vec::new(), gamma: 1.0 }
    }

    pub fn with_others(mut self, rule: Others) -> Self {
        self.others_rule = rule;
        self
    }

    fn scaled(&self) -> bool {
        self.mode == Mode::Corrected
    }

    /// Progress p of selector `idx` at `step`.
    fn progress(&self, idx: usize, step: usize, steps: usize) -> f64 {
        match self.mode {
            Mode::Corrected => step as f64 / steps.max(1) as f64,
            Mode::Reference => {
                let l = self.selectors.len().max(1);
                let period = 50 * l;
                let c = l * step + idx + 1;
                (c % period) as f64 / period as f64
            }
        }
    }

    /// Whether selector `idx` applies the content LoRA at `step`.
    pub fn decide(&self, idx: usize, step: usize, steps: usize) -> bool {
        let s = &self.selectors[idx];
        content_wins(s.s_c, s.s_s, self.gamma, time_scale_with_beta(self.pattern, self.progress(idx, step, steps), self.beta))
    }

    pub fn gamma_value(&self) -> f64 {
        self.gamma
    }
}

/// The attention block a layer belongs to (`down_blocks.1.attentions.0` of
/// `down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2`), if any.
pub(crate) fn attention_block(path: &str) -> Option<&str> {
    let i = path.find(".attentions.")?;
    let rest = &path[i + ".attentions.".len()..];
    let end = rest.find('.').map_or(path.len(), |k| i + ".attentions.".len() + k);
    Some(&path[..end])
}

/// gamma over every module both LoRAs have (UNet and text encoders), L1 of ΔW.
pub(crate) fn pair_gamma(plan: &MixPlan, c: usize, s: usize, scaled: bool) -> Result<f64> {
    let (lc, ls) = (&plan.loras[c].lora, &plan.loras[s].lora);
    let mut ratios = Vec::new();
    for (mi, m) in lc.modules.iter().enumerate() {
        if let Some(mj) = ls.modules.iter().position(|x| x.target == m.target) {
            let a = module_stats(lc, mi, scaled, &[Stat::L1])?[0];
            let b = module_stats(ls, mj, scaled, &[Stat::L1])?[0];
            ratios.push(a / b);
        }
    }
    Ok(gamma(&ratios))
}

impl MixStrategy for KLora {
    fn name(&self) -> &'static str {
        "klora"
    }

    fn share(&self) -> Option<Box<dyn MixStrategy>> {
        Some(Box::new(self.clone()))
    }

    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        let (c, s) = plan.content_and_style()?;
        self.pair = (c, s);
        let scaled = self.scaled();
        self.gamma = pair_gamma(plan, c, s, scaled)?;
        self.selectors.clear();
        self.lone.clear();
        for (li, layer) in plan.layers.iter().enumerate() {
            if !layer.is_attention_projection() {
                continue;
            }
            let (mc, ms) = match (layer.modules[c], layer.modules[s]) {
                (Some(mc), Some(ms)) => (mc, ms),
                (Some(_), None) if self.mode == Mode::Corrected => {
                    self.lone.push(Lone { layer: li, lora: c });
                    continue;
                }
                (None, Some(_)) if self.mode == Mode::Corrected => {
                    self.lone.push(Lone { layer: li, lora: s });
                    continue;
                }
                _ => continue,
            };
            let stat = match self.score {
                Score::TopK => Stat::TopK(module_rank(&plan.loras[c].lora, mc) * module_rank(&plan.loras[s].lora, ms)),
                Score::Energy => Stat::Energy,
            };
            let s_c = module_stats(&plan.loras[c].lora, mc, scaled, &[stat])?[0];
            let s_s = module_stats(&plan.loras[s].lora, ms, scaled, &[stat])?[0];
            self.selectors.push(Selector { layer: li, s_c, s_s });
        }
        if self.selectors.is_empty() {
            return Err(Error::Argument(
                "K-LoRA found no attention projection (to_q/to_k/to_v/to_out.0) that both LoRAs adapt".into(),
            ));
        }
        self.others.clear();
        if self.mode == Mode::Corrected {
            for (li, layer) in plan.layers.iter().enumerate() {
                if layer.is_attention_projection() || (layer.modules[c].is_none() && layer.modules[s].is_none()) {
                    continue;
                }
                let group = match (self.others_rule, attention_block(&layer.path)) {
                    (Others::Follow, Some(block)) => self
                        .selectors
                        .iter()
                        .enumerate()
                        .filter(|(_, sel)| attention_block(&plan.layers[sel.layer].path) == Some(block))
                        .map(|(i, _)| i)
                        .collect(),
                    _ => Vec::new(),
                };
                self.others.push(Other { layer: li, group });
            }
        }
        Ok(())
    }

    fn ignores_alpha(&self) -> bool {
        self.mode == Mode::Reference
    }

    fn text_encoder_strengths(&self, plan: &MixPlan) -> Vec<f64> {
        match self.mode {
            Mode::Reference => vec![0.0; plan.loras.len()],
            Mode::Corrected => plan.loras.iter().map(|l| l.strength).collect(),
        }
    }

    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        let mut w = vec![vec![0.0; plan.loras.len()]; plan.layers.len()];
        let (c, s) = self.pair;
        for (idx, sel) in self.selectors.iter().enumerate() {
            let j = if self.decide(idx, step, steps) { c } else { s };
            w[sel.layer][j] = plan.loras[j].strength;
        }
        for l in &self.lone {
            w[l.layer][l.lora] = plan.loras[l.lora].strength;
        }
        for o in &self.others {
            let share = if o.group.is_empty() {
                None
            } else {
                Some(o.group.iter().filter(|&&i| self.decide(i, step, steps)).count() as f64 / o.group.len() as f64)
            };
            for (j, f) in [(c, share.unwrap_or(1.0)), (s, share.map_or(1.0, |x| 1.0 - x))] {
                if plan.layers[o.layer].modules[j].is_some() {
                    w[o.layer][j] = plan.loras[j].strength * f;
                }
            }
        }
        w
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "pattern": match self.pattern { Pattern::S => "s", Pattern::SStar => "s*" },
            "mode": match self.mode { Mode::Corrected => "corrected", Mode::Reference => "reference" },
            "gamma": self.gamma,
            "beta": self.beta,
            "selector_layers": self.selectors.len(),
            "single_lora_layers": self.lone.len(),
            "other_layers": self.others.len(),
            "others": match self.others_rule { Others::Merge => "merge", Others::Follow => "follow" },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_gamma() {
        assert_eq!(time_scale(Pattern::S, 0.0), 0.5);
        assert!((time_scale(Pattern::SStar, 0.0) - 1.275).abs() < 1e-12);
        // 1.5·0.5 + 1.275 = 2.025 → mod 1.5 = 0.525
        assert!((time_scale(Pattern::SStar, 0.5) - 0.525).abs() < 1e-12);
        assert_eq!(gamma(&[1.0, 1.0, 1.0, 10.0]), 1.0); // 10 ≥ 3 × 3.25 is dropped
        assert!(content_wins(1.0, 0.0, 1.0, 1.0));
        assert!(!content_wins(0.0, 0.0, 1.0, 1.0));
    }
}
