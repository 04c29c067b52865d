//! EST-LoRA (arXiv 2508.02165, Godz-z/EST-LoRA, a fork of K-LoRA): K-LoRA's per-layer choice
//! with the Frobenius energy ‖ΔW‖²_F as the score and, in the time scale 1.5·p + d, the style
//! discrepancy d = 1 − cos(e_c, e_s) of DINO ViT-S/16 embeddings (CLS token) of two previews:
//! the prompt with only the content LoRA, and with only the style LoRA. Pattern `s` by default.
//!
//! Previews cost two generations. The reference uses the model's full defaults; we default to
//! the request's own settings and offer cheaper ones (fewer steps, a smaller size); the trace
//! records what was used.

use super::klora::{KLora, Mode, Others, Pattern, Score};
use super::{MixPlan, MixStrategy};
use crate::eval::embed::{cosine_distance, ImageEmbedder};
use crate::error::Result;
use crate::lora::{fuse, AdapterTargets, LoadedLora};
use crate::sdxl::pipeline::{GenerateRequest, SdxlPipeline};

/// How the two previews were made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Previews {
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub discrepancy: f64,
}

pub struct Est {
    inner: KLora,
    previews: Previews,
}

impl Est {
    pub fn new(pattern: Pattern, mode: Mode, previews: Previews, others: Others) -> Self {
        Self { inner: KLora::with_score(pattern, mode, Score::Energy, previews.discrepancy).with_others(others), previews }
    }
}

/// Generates the content-only and style-only previews and returns d = 1 − cos of their
/// embeddings. `preview` is the request to use (the user's, or a cheaper copy).
pub fn style_discrepancy(
    pipe: &SdxlPipeline,
    targets: &AdapterTargets,
    plan: &MixPlan,
    preview: &GenerateRequest,
    embedder: &ImageEmbedder,
) -> Result<Previews> {
    let (c, s) = plan.content_and_style()?;
    let mut emb = Vec::new();
    for j in [c, s] {
        targets.clear();
        let l: &LoadedLora = &plan.loras[j].lora;
        fuse(targets, &[(l, plan.loras[j].strength)])?;
        let lat = pipe.generate_latents(preview, &mut |_| true)?;
        let img = pipe.decode(&lat)?.into_iter().next().ok_or_else(|| crate::error::Error::Argument("preview produced no image".into()))?;
        emb.push(embedder.embed(&img)?);
    }
    targets.clear();
    let (dw, dh) = pipe.default_size();
    Ok(Previews {
        steps: preview.steps,
        width: preview.width.unwrap_or(dw),
        height: preview.height.unwrap_or(dh),
        seed: preview.seed,
        discrepancy: cosine_distance(&emb[0], &emb[1]),
    })
}

impl MixStrategy for Est {
    fn name(&self) -> &'static str {
        "est"
    }
    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        self.inner.prepare(plan)
    }
    fn ignores_alpha(&self) -> bool {
        self.inner.ignores_alpha()
    }
    fn text_encoder_strengths(&self, plan: &MixPlan) -> Vec<f64> {
        self.inner.text_encoder_strengths(plan)
    }
    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, pass: usize) -> Vec<Vec<f64>> {
        self.inner.weights(plan, step, steps, pass)
    }
    fn describe(&self) -> serde_json::Value {
        let mut d = self.inner.describe();
        if let Some(o) = d.as_object_mut() {
            o.insert("score".into(), "frobenius_energy".into());
            o.insert("previews".into(), serde_json::to_value(&self.previews).unwrap_or_default());
        }
        d
    }
}
