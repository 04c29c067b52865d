//! Next-token choice: greedy, or temperature + top-p (nucleus) sampling from a seeded stream.

use crate::rng::TorchCpuRng;

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Keep the most probable tokens whose cumulative probability reaches `top_p` (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: TorchCpuRng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        let rng = TorchCpuRng::new(opts.seed);
        Self { opts, rng }
    }

    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature <= 0.0 {
            return loramix_models::llm::argmax(logits);
        }
        let t = self.opts.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.opts.top_p < 1.0 {
            // Keep tokens until the mass before them reaches top_p (always at least one).
            let mut acc = 0.0f32;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p.1;
                    acc >= self.opts.top_p as f32
                })
                .map(|i| i + 1)
                .unwrap_or(probs.len());
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let u = self.rng.uniform() * total;
        let mut acc = 0.0;
        for (id, p) in &probs {
            acc += p;
            if u < acc {
                return *id;
            }
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}
