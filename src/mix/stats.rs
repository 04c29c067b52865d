//! Weight-only statistics of LoRA modules (top-K |ΔW| sums, L1 norms, energies), computed once
//! per mix and cached process-wide by the LoRA's content hash and module, so a second image
//! with the same LoRAs (or the app's next job) costs nothing. The references recompute ΔW and
//! a top-K at every layer call — 28,000 times per SDXL image.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use loramix_models::BranchWeights;

use crate::error::Result;
use crate::lora::LoadedLora;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Sum of the K largest |ΔW| entries.
    TopK(usize),
    /// Σ |ΔW|.
    L1,
    /// ‖ΔW‖²_F.
    Energy,
}

type Key = (String, String, bool, Stat);

fn cache() -> &'static Mutex<HashMap<Key, f64>> {
    static C: OnceLock<Mutex<HashMap<Key, f64>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The rank K-LoRA multiplies: rows of the down matrix (min(out, in) for dense updates).
pub fn module_rank(lora: &LoadedLora, module: usize) -> usize {
    match &lora.modules[module].weights {
        BranchWeights::LowRank { down, .. } => down.dims().first().copied().unwrap_or(1),
        BranchWeights::Dense(d) => d.dims().iter().take(2).copied().min().unwrap_or(1),
    }
}

/// ΔW of one module as f32 values: `B A`, times alpha / rank when `scaled`.
pub fn delta_values(lora: &LoadedLora, module: usize, scaled: bool) -> Result<Vec<f32>> {
    let m = &lora.modules[module];
    let d = m.weights.delta()?;
    let d = if scaled { (d * m.scale)? } else { d };
    Ok(d.flatten_all()?.to_vec1::<f32>()?)
}

fn compute(values: &mut [f32], stat: Stat) -> f64 {
    match stat {
        Stat::L1 => values.iter().map(|v| v.abs() as f64).sum(),
        Stat::Energy => values.iter().map(|v| (*v as f64) * (*v as f64)).sum(),
        Stat::TopK(k) => {
            let k = k.min(values.len());
            if k == 0 {
                return 0.0;
            }
            for v in values.iter_mut() {
                *v = v.abs();
            }
            // Partition so the k largest come first (O(n), no full sort).
            values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            values[..k].iter().map(|v| *v as f64).sum()
        }
    }
}

/// Several statistics of one module, from the cache or computed together from one ΔW.
pub fn module_stats(lora: &LoadedLora, module: usize, scaled: bool, stats: &[Stat]) -> Result<Vec<f64>> {
    let key = |s: Stat| (lora.addnet_hash.clone(), lora.modules[module].key.clone(), scaled, s);
    {
        let c = cache().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = stats.iter().map(|s| c.get(&key(*s)).copied()).collect::<Option<Vec<f64>>>() {
            return Ok(v);
        }
    }
    let values = delta_values(lora, module, scaled)?;
    let out: Vec<f64> = stats.iter().map(|s| compute(&mut values.clone(), *s)).collect();
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    for (s, v) in stats.iter().zip(&out) {
        c.insert(key(*s), *v);
    }
    Ok(out)
}

/// One statistic computed from scratch, bypassing the cache: what the references pay at every
/// layer call (used by `loramix bench --suite mix` to show that cost).
pub fn uncached(lora: &LoadedLora, module: usize, scaled: bool, stat: Stat) -> Result<f64> {
    let mut values = delta_values(lora, module, scaled)?;
    Ok(compute(&mut values, stat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_sum_and_norms() {
        let mut v = vec![0.5f32, -3.0, 2.0, -0.25, 1.0];
        assert_eq!(compute(&mut v.clone(), Stat::TopK(2)), 5.0);
        assert_eq!(compute(&mut v.clone(), Stat::TopK(9)), 6.75);
        assert_eq!(compute(&mut v.clone(), Stat::L1), 6.75);
        assert_eq!(compute(&mut v, Stat::Energy), 0.25 + 9.0 + 4.0 + 0.0625 + 1.0);
    }
}
