//! Direct merge (diffusers `set_adapters(names, adapter_weights)`): every LoRA at its strength
//! on every layer at every step. Static, so the mixer fuses it once: no per-step cost.

use super::{MixPlan, MixStrategy};

pub struct Merge;

impl MixStrategy for Merge {
    fn name(&self) -> &'static str {
        "merge"
    }
    fn is_static(&self) -> bool {
        true
    }
    fn weights(&self, plan: &MixPlan, _step: usize, _steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        plan.full_strengths()
    }
}
