//! `auto` (ours): K-LoRA generalised to any number of subject and style LoRAs.
//!
//! Design. On every attention projection (K-LoRA's selector layers):
//! 1. Within each group (subjects, styles) pick the candidate whose update is most salient at
//!    this layer *relative to its own other layers*: z_i(l) = T_i(l) / mean_l' T_i(l'), with
//!    T_i the sum of the r_i² largest |ΔW_i| entries. Dividing by the LoRA's own mean makes
//!    LoRAs of different ranks, alphas and training lengths comparable (raw sums would let the
//!    "loudest" file win everywhere), and a group of one has its only member as candidate.
//! 2. Between the subject candidate c and the style candidate s apply K-LoRA's rule with that
//!    pair's statistics: K = r_c·r_s, gamma of the pair, the time scale of the chosen pattern,
//!    p = step / steps.
//!
//! With one subject and one style step 1 is trivial and step 2 is exactly corrected-mode
//! K-LoRA, so `auto` reduces to K-LoRA (tests/mix.rs checks the traces are equal).
//! Everything is computed in `prepare`; a step is a lookup.

use std::collections::HashMap;

use super::klora::{content_wins, pair_gamma, time_scale, Pattern};
use super::stats::{module_rank, module_stats, Stat};
use super::{MixPlan, MixStrategy};
use crate::error::{Error, Result};
use crate::lora::Role;

struct LayerChoice {
    layer: usize,
    subject: Option<usize>,
    style: Option<usize>,
    s_c: f64,
    s_s: f64,
    gamma: f64,
}

pub struct Auto {
    pattern: Pattern,
    choices: Vec<LayerChoice>,
}

impl Auto {
    pub fn new(pattern: Pattern) -> Self {
        Self { pattern, choices: Vec::new() }
    }
}

impl MixStrategy for Auto {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        let (subjects, styles): (Vec<usize>, Vec<usize>) = if plan.loras.len() == 2 && plan.loras.iter().any(|l| l.role == Role::Unknown) {
            let (c, s) = plan.content_and_style()?;
            (vec![c], vec![s])
        } else {
            let pick = |r: Role| plan.loras.iter().enumerate().filter(|(_, l)| l.role == r).map(|(i, _)| i).collect::<Vec<_>>();
            (pick(Role::Subject), pick(Role::Style))
        };
        if subjects.is_empty() || styles.is_empty() || subjects.len() + styles.len() != plan.loras.len() {
            return Err(Error::Argument(format!(
                "--mix auto needs every LoRA marked subject or style, at least one of each; got {}",
                plan.loras.iter().map(|l| format!("{}: {}", l.lora.name, l.role.as_str())).collect::<Vec<_>>().join(", ")
            )));
        }
        let selectors: Vec<usize> = plan.layers.iter().enumerate().filter(|(_, l)| l.is_attention_projection()).map(|(i, _)| i).collect();
        // Salience of each LoRA at each selector layer, relative to its own mean.
        let mut z: HashMap<(usize, usize), f64> = HashMap::new();
        for j in 0..plan.loras.len() {
            let lora = &plan.loras[j].lora;
            let mut vals = Vec::new();
            for &li in &selectors {
                if let Some(m) = plan.layers[li].modules[j] {
                    let r = module_rank(lora, m);
                    vals.push((li, module_stats(lora, m, true, &[Stat::TopK(r * r)])?[0]));
                }
            }
            let mean = vals.iter().map(|v| v.1).sum::<f64>() / vals.len().max(1) as f64;
            for (li, v) in vals {
                z.insert((li, j), if mean > 0.0 { v / mean } else { 0.0 });
            }
        }
        let best = |li: usize, group: &[usize]| -> Option<usize> {
            group
                .iter()
                .copied()
                .filter(|j| z.contains_key(&(li, *j)))
                .max_by(|a, b| z[&(li, *a)].total_cmp(&z[&(li, *b)]).then(b.cmp(a)))
        };
        let mut gammas: HashMap<(usize, usize), f64> = HashMap::new();
        self.choices.clear();
        for &li in &selectors {
            let (c, s) = (best(li, &subjects), best(li, &styles));
            let (mut s_c, mut s_s, mut g) = (0.0, 0.0, 1.0);
            if let (Some(c), Some(s)) = (c, s) {
                let (mc, ms) = (plan.layers[li].modules[c].unwrap_or(0), plan.layers[li].modules[s].unwrap_or(0));
                let k = module_rank(&plan.loras[c].lora, mc) * module_rank(&plan.loras[s].lora, ms);
                s_c = module_stats(&plan.loras[c].lora, mc, true, &[Stat::TopK(k)])?[0];
                s_s = module_stats(&plan.loras[s].lora, ms, true, &[Stat::TopK(k)])?[0];
                g = match gammas.get(&(c, s)) {
                    Some(g) => *g,
                    None => {
                        let g = pair_gamma(plan, c, s, true)?;
                        gammas.insert((c, s), g);
                        g
                    }
                };
            }
            self.choices.push(LayerChoice { layer: li, subject: c, style: s, s_c, s_s, gamma: g });
        }
        Ok(())
    }

    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        let mut w = vec![vec![0.0; plan.loras.len()]; plan.layers.len()];
        let p = step as f64 / steps.max(1) as f64;
        let scale = time_scale(self.pattern, p);
        for ch in &self.choices {
            let j = match (ch.subject, ch.style) {
                (Some(c), Some(s)) => {
                    if content_wins(ch.s_c, ch.s_s, ch.gamma, scale) {
                        c
                    } else {
                        s
                    }
                }
                (Some(c), None) => c,
                (None, Some(s)) => s,
                (None, None) => continue,
            };
            w[ch.layer][j] = plan.loras[j].strength;
        }
        w
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "pattern": match self.pattern { Pattern::S => "s", Pattern::SStar => "s*" }, "selector_layers": self.choices.len() })
    }
}
