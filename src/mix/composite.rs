//! LoRA Composite (Multi-LoRA-Composition): every step runs the UNet once per LoRA, with only
//! that LoRA active; the unconditional and the conditional predictions are each averaged over
//! the LoRAs, then CFG is applied (the pipeline averages batched passes, which is the same).
//! The prompt is encoded with all LoRAs active, as the reference does.

use super::{MixPlan, MixStrategy};

pub struct Composite;

impl MixStrategy for Composite {
    fn name(&self) -> &'static str {
        "composite"
    }
    fn passes(&self, plan: &MixPlan) -> usize {
        plan.loras.len()
    }
    fn weights(&self, plan: &MixPlan, _step: usize, _steps: usize, pass: usize) -> Vec<Vec<f64>> {
        plan.layers
            .iter()
            .map(|l| plan.loras.iter().enumerate().map(|(j, m)| if j == pass && l.modules[j].is_some() { m.strength } else { 0.0 }).collect())
            .collect()
    }
}
