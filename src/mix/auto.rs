//! `auto` (ours): every LoRA on every layer and step, with the subject and the style kept apart
//! in space by the step's own cross-attention, and guidance that keeps both at full strength.
//!
//! Design, from the measurements in BENCHMARKS.md "Mixing quality" (miniworld, 16 pairs):
//! - What fails. A merge lets the style's update act on the subject too (the emblem is
//!   re-rendered and loses its identity) and the subject's update act on the background (it
//!   flattens the style): both fidelities drop. Hard one-LoRA-per-layer choices (K-LoRA) halve
//!   both. Step windows (subject early, style late) lose the subject, whose details are still
//!   drawn in the late steps; per-layer splits (style only at full resolution) and weaker
//!   styles only trade one LoRA for the other (harmonic mean ≤ 0.53 for every setting tried).
//! - Where each LoRA acts. Subject LoRAs are invoked by trigger words ("vlox emblem"). At every
//!   step the UNet's cross-attention says where the image attends to those words: the probe on
//!   every `attn2` records the attention mass on the subjects' trigger tokens (averaged over
//!   heads and layers, conditional rows), which becomes a soft mask for the next step: measured
//!   from the map's own background level to its peak, then ramped (below). On every layer with
//!   spatial inputs subject LoRAs are multiplied by the mask and style LoRAs by its complement,
//!   so the style renders everything but the subject and the subject draws only itself. The first step,
//!   with no map yet, runs both in full. LoRAs of other roles run everywhere.
//! - The region follows the map, not a fixed share of its range. The background's attention to
//!   the trigger words is not zero, and its level depends on the model and the LoRAs: ramped
//!   from the map's minimum (a few cold cells) at [0.25, 0.5] of the range, the region fitted
//!   the emblem on miniworld (8×8 attention) but covered up to half the image with LoCon LoRAs on
//!   miniworld-attn16 (16×16 attention, background at ~0.4 of the peak), and the style lost its
//!   texture around the subject (0.77× of solo held out). So the span starts at the map's
//!   [`MAP_FLOOR`] quantile, the background's level wherever the subject covers less than 60 %
//!   of the image, and the ramp runs over the first quarter of the span above it. Of the rules
//!   swept on the tuning seeds, two met every goal on all three LoRA sets (both shapes on
//!   miniworld-attn16, LoCon on miniworld); this one had the higher harmonic mean on each, every
//!   one above the old rule's (BENCHMARKS.md, "auto: where the region starts").
//!   A subject that fills more than 60 % of the image loses its coolest part to the style.
//! - Cross-attention keys and values read the prompt, not the image, so the mask cannot scale
//!   their tokens. Instead it splits the attention's queries: the subject's region attends to
//!   keys and values made with the subject LoRAs, the rest to those made with the style LoRAs
//!   (both with the other roles), blended by the mask — one more attention over the prompt's
//!   few tokens per cross-attention. Before, both LoRAs' keys and values reached every query:
//!   with attention-only LoRAs the subject's then pulled the whole background towards its own
//!   flat rendering (style 0.664 → 0.753 of a solo 0.937 on the tuning set, subject 0.757 →
//!   0.719); with LoCon LoRAs, which draw mostly through their convolutions, it costs some
//!   subject (0.819 → 0.683 of a solo 0.742, harmonic 0.829 → 0.762). Only this rule met every
//!   goal on both shapes; softer ones (the subject's keys and values kept near the emblem, or
//!   the style's kept on it) fell short on the attention-only style (BENCHMARKS.md, "auto:
//!   cross-attention keys and values").
//! - Guidance. With the LoRAs confined to their regions, each covers only part of the image, and
//!   under ordinary CFG the unconditional pass (which also carries them) cancels much of what
//!   they add. So `auto`'s unconditional pass keeps only [`UNCOND_FRACTION`] of each LoRA (with
//!   the same masks): the guidance carries more of each LoRA's effect. CRAFT-LoRA's fully
//!   asymmetric CFG (base weights unconditional) over-drives: alone it pushes the style into the
//!   subject, and even with the masks it loses the prompt's colours (alignment 0.51); 0.7 keeps
//!   both LoRAs and the prompt.
//! - Cost: one batched CFG pass as in plain unfused sampling (the unconditional rows' share comes
//!   from per-row factors on the masked branches), plus one attention-probability product on the
//!   trigger tokens and one more attention over the prompt per cross-attention, and a few
//!   elementwise products per layer: no extra UNet pass.
//! - Without a subject trigger in the prompt there is nothing to locate: `auto` then routes per
//!   token from the branch outputs' own salience (a subject leads where its update stands out,
//!   see [`loramix_models::TokenRouting`]) under ordinary CFG; with only one role it is a merge.

use loramix_models::{Route, TokenRouting};

use super::{MaskRamp, MixPlan, MixStrategy};
use crate::error::Result;
use crate::lora::Role;

/// How sharply a style steps back where a subject leads (salience routing, no trigger found).
pub const DEFAULT_SHARPNESS: f64 = 2.0;
/// The quantile of each step's map taken as the background's level.
pub const MAP_FLOOR: f64 = 0.4;
/// The mask ramp: attention mass measured from the [`MAP_FLOOR`] quantile (0) to the peak (1);
/// below `low` is background, above `high` the subject. Chosen by measurement (BENCHMARKS.md,
/// "auto: where the region starts").
pub const DEFAULT_RAMP: MaskRamp = MaskRamp { floor: MAP_FLOOR, low: 0.0, high: 0.25 };
/// The share of each LoRA the unconditional pass keeps: the guidance scale then multiplies the
/// LoRAs' effect by 0.7 + cfg·0.3 instead of 1 (ordinary CFG) or cfg (base-weight unconditional).
/// Chosen by measurement (BENCHMARKS.md, "auto: design measurements").
pub const UNCOND_FRACTION: f64 = 0.7;

pub struct Auto {
    sharpness: f64,
    ramp: MaskRamp,
    /// Both roles are present.
    routed: bool,
    /// ... and a subject trigger is in the prompt.
    masked: bool,
}

impl Auto {
    pub fn new(ramp: MaskRamp) -> Self {
        Self { sharpness: DEFAULT_SHARPNESS, ramp, routed: false, masked: false }
    }
}

/// Layers whose input is the prompt's tokens, not the image's.
fn reads_prompt(path: &str) -> bool {
    path.contains(".attn2.to_k") || path.contains(".attn2.to_v")
}

impl MixStrategy for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        let has = |r: Role| plan.loras.iter().any(|l| l.role == r && l.strength != 0.0);
        self.routed = has(Role::Subject) && has(Role::Style);
        self.masked = self.routed && !plan.subject_tokens.is_empty();
        Ok(())
    }


    fn uncond_fraction(&self) -> f64 {
        UNCOND_FRACTION
    }

    fn weights(&self, plan: &MixPlan, _step: usize, _steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        plan.full_strengths()
    }

    fn attention_masks(&self, _plan: &MixPlan) -> Option<MaskRamp> {
        self.masked.then_some(self.ramp)
    }

    fn routing(&self, plan: &MixPlan, layer: usize) -> Option<(TokenRouting, Vec<Route>)> {
        if !self.routed || self.masked || reads_prompt(&plan.layers[layer].path) {
            return None;
        }
        let routes = plan
            .loras
            .iter()
            .map(|l| match l.role {
                Role::Subject => Route::Lead,
                Role::Style => Route::Yield,
                _ => Route::Free,
            })
            .collect();
        Some((TokenRouting { sharpness: self.sharpness, symmetric: true }, routes))
    }

    fn describe(&self) -> serde_json::Value {
        if self.masked {
            serde_json::json!({ "regions": "cross-attention on the subject triggers", "mask_floor_quantile": self.ramp.floor, "mask_low": self.ramp.low, "mask_high": self.ramp.high, "uncond_fraction": UNCOND_FRACTION, "cross_attention_kv": "per region: the subject's in its region, the style's elsewhere" })
        } else if self.routed {
            serde_json::json!({ "regions": "branch-output salience (no subject trigger in the prompt)", "sharpness": self.sharpness })
        } else {
            serde_json::json!({ "regions": "none: one role only, merged" })
        }
    }
}
