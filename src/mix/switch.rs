//! LoRA Switch (Multi-LoRA-Composition): one LoRA active at a time, in the order given,
//! moving to the next every `every` steps.
//!
//! The reference switches in `callback_on_step_end` when `step_index > 0 and step_index % k == 0`,
//! so the new LoRA takes effect from the following step: the first LoRA runs steps 0..=k, each
//! later one k steps. We keep that timing so our images match the reference's. Its prompt is
//! encoded before the loop with only the first LoRA active, so only the first LoRA's
//! text-encoder modules apply.

use super::{MixPlan, MixStrategy};
use crate::error::{Error, Result};

pub struct Switch {
    every: usize,
}

impl Switch {
    pub fn new(every: usize) -> Result<Self> {
        if every == 0 {
            return Err(Error::Argument("--switch-every must be at least 1".into()));
        }
        Ok(Self { every })
    }

    /// Index of the LoRA active at `step` among `n`.
    pub fn active(&self, step: usize, n: usize) -> usize {
        if step == 0 {
            0
        } else {
            ((step - 1) / self.every) % n
        }
    }
}

impl MixStrategy for Switch {
    fn name(&self) -> &'static str {
        "switch"
    }
    fn text_encoder_strengths(&self, plan: &MixPlan) -> Vec<f64> {
        plan.loras.iter().enumerate().map(|(j, l)| if j == 0 { l.strength } else { 0.0 }).collect()
    }
    fn weights(&self, plan: &MixPlan, step: usize, _steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        let a = self.active(step, plan.loras.len());
        plan.layers
            .iter()
            .map(|l| plan.loras.iter().enumerate().map(|(j, m)| if j == a && l.modules[j].is_some() { m.strength } else { 0.0 }).collect())
            .collect()
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "switch_every": self.every })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reference_timing() {
        let s = super::Switch::new(5).unwrap();
        let seq: Vec<usize> = (0..17).map(|i| s.active(i, 2)).collect();
        assert_eq!(seq, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1]);
    }
}
