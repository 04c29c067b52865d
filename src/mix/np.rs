//! NP-LoRA (arXiv 2511.11051): a soft null-space projection of the subject update away from the
//! style's input subspace, per layer, fused once.
//!
//! ΔW = ΔW_s + ΔW_c (I − μ/(1+μ) V Vᵀ), μ = 0.5 by default, where V spans the right singular
//! vectors of ΔW_s, i.e. the row space of the style's down matrix A_s (all of its directions: the
//! paper keeps k = the style's rank). The projection acts on the input side: the paper's hard
//! form, its Proposition 2 and its implementation section all right-multiply, and a left
//! multiplication would not even have matching shapes on cross-attention's k/v. Why it helps: the
//! inputs the style reads are exactly where the subject's update would otherwise add to the
//! style's, so the subject is kept off those directions and acts freely everywhere else.
//!
//! Generalised beyond the paper's one pair: V spans the union of every style LoRA's down rows on
//! the layer; every subject LoRA is projected; LoRAs of other roles are added unchanged. Each
//! LoRA's alpha/rank scale and strength are folded in first (a scalar changes no subspace). Conv
//! layers project the flattened kernel (`in·kh·kw` inputs), the same maths. Because ΔW_c V Vᵀ =
//! B_c (A_c V) Vᵀ, only the subject's down matrix changes. The singular vectors come from faer's
//! SVD (a decomposition we should not write by hand); directions below 1e-9 of the largest
//! singular value are rank deficiency, not style.

use candle_core::Tensor;
use faer::Mat;
use loramix_models::BranchWeights;

use super::{MixPlan, MixStrategy};
use crate::error::{Error, Result};
use crate::lora::Role;

pub const DEFAULT_MU: f64 = 0.5;

pub struct NpLora {
    mu: f64,
}

impl NpLora {
    pub fn new(mu: f64) -> Result<Self> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(Error::Argument(format!("--np-mu {mu}: expected a finite number >= 0")));
        }
        Ok(Self { mu })
    }
}

/// An orthonormal basis (`k × n`, rows) of the row space of the `r × n` matrix `rows`.
pub fn row_space_basis(rows: &[f64], r: usize, n: usize) -> Result<Vec<Vec<f64>>> {
    if r == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let m = Mat::<f64>::from_fn(r, n, |i, j| rows[i * n + j]);
    let svd = m.thin_svd().map_err(|e| Error::Internal(format!("SVD did not converge: {e:?}")))?;
    let s = svd.S().column_vector();
    let v = svd.V();
    let smax = (0..s.nrows()).map(|i| s[i]).fold(0.0f64, f64::max);
    Ok((0..s.nrows()).filter(|&i| s[i] > smax * 1e-9 && s[i] > 0.0).map(|i| (0..n).map(|j| v[(j, i)]).collect()).collect())
}

/// `x (I − c Q Qᵀ)` for the `rows × n` row-major `x` and the orthonormal rows `q` (each of length n).
pub fn project_rows(x: &mut [f64], n: usize, q: &[Vec<f64>], c: f64) {
    for row in x.chunks_mut(n) {
        let coeffs: Vec<f64> = q.iter().map(|qk| qk.iter().zip(row.iter()).map(|(a, b)| a * b).sum()).collect();
        for (qk, ck) in q.iter().zip(coeffs) {
            for (v, qv) in row.iter_mut().zip(qk) {
                *v -= c * ck * qv;
            }
        }
    }
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

impl MixStrategy for NpLora {
    fn name(&self) -> &'static str {
        "np"
    }

    fn is_static(&self) -> bool {
        true
    }

    fn prepare(&mut self, plan: &MixPlan) -> Result<()> {
        let has = |r: Role| plan.loras.iter().any(|l| l.role == r);
        if !has(Role::Subject) || !has(Role::Style) {
            return Err(Error::Argument(format!(
                "--mix np projects subject LoRAs away from style LoRAs: mark at least one of each (--lora PATH:WEIGHT:subject|style); got {}",
                plan.loras.iter().map(|l| format!("{}: {}", l.lora.name, l.role.as_str())).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    fn weights(&self, plan: &MixPlan, _step: usize, _steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        plan.full_strengths()
    }

    fn fused_delta(&self, plan: &MixPlan, layer: usize) -> Result<Option<Tensor>> {
        let l = &plan.layers[layer];
        let present: Vec<usize> =
            (0..plan.loras.len()).filter(|&j| l.modules[j].is_some() && plan.loras[j].strength * plan.block_factor(layer, j) != 0.0).collect();
        let of = |r: Role| present.iter().copied().filter(|&j| plan.loras[j].role == r).collect::<Vec<_>>();
        let (subjects, styles) = (of(Role::Subject), of(Role::Style));
        if subjects.is_empty() || styles.is_empty() {
            return Ok(None);
        }
        // The style input subspace: every style's down rows (or its dense ΔW's rows), flattened.
        let mut rows = Vec::new();
        let mut n = 0;
        let mut shape = Vec::new();
        for &j in &styles {
            let m = &plan.loras[j].lora.modules[l.modules[j].unwrap_or(0)];
            let a = match &m.weights {
                BranchWeights::LowRank { down, .. } => down.clone(),
                BranchWeights::Dense(d) => d.clone(),
            };
            let r = a.dim(0)?;
            n = a.elem_count() / r.max(1);
            rows.extend(values(&a)?);
            shape = m.weights.delta()?.dims().to_vec();
        }
        let q = row_space_basis(&rows, rows.len() / n.max(1), n)?;
        let c = self.mu / (1.0 + self.mu);
        let mut total = vec![0.0f64; shape.iter().product()];
        for &j in &present {
            let ml = &plan.loras[j];
            let m = &ml.lora.modules[l.modules[j].unwrap_or(0)];
            let k = ml.strength * m.scale * plan.block_factor(layer, j);
            let delta = match (&m.weights, ml.role) {
                (BranchWeights::LowRank { down, up }, Role::Subject) => {
                    let r = down.dim(0)?;
                    let mut a = values(down)?;
                    project_rows(&mut a, n, &q, c);
                    let b = values(up)?; // [out, r(, 1, 1)]
                    let out = b.len() / r;
                    let mut d = vec![0.0f64; out * n];
                    for o in 0..out {
                        for t in 0..r {
                            let bv = b[o * r + t];
                            for (dv, av) in d[o * n..(o + 1) * n].iter_mut().zip(&a[t * n..(t + 1) * n]) {
                                *dv += bv * av;
                            }
                        }
                    }
                    d
                }
                (w, Role::Subject) => {
                    let mut d = values(&w.delta()?)?;
                    project_rows(&mut d, n, &q, c);
                    d
                }
                (w, _) => values(&w.delta()?)?,
            };
            if delta.len() != total.len() {
                return Err(Error::Argument(format!("--mix np: {} has a {}-element update on {}, expected {}", ml.lora.name, delta.len(), l.path, total.len())));
            }
            for (t, d) in total.iter_mut().zip(delta) {
                *t += k * d;
            }
        }
        let t = Tensor::from_vec(total.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), shape, &candle_core::Device::Cpu)?;
        Ok(Some(t))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "mu": self.mu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basis_is_orthonormal_and_spans_the_rows() {
        // rows: (1,1,0), (2,2,0), (0,0,3): rank 2.
        let q = row_space_basis(&[1., 1., 0., 2., 2., 0., 0., 0., 3.], 3, 3).unwrap();
        assert_eq!(q.len(), 2);
        for a in &q {
            for b in &q {
                let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                assert!((d - if std::ptr::eq(a, b) { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        // (1,-1,0) is orthogonal to the row space: untouched; (1,1,0) is in it: scaled by 1 − c.
        let mut x = vec![1., -1., 0., 1., 1., 0.];
        project_rows(&mut x, 3, &q, 1.0 / 3.0);
        let want = [1., -1., 0., 2. / 3., 2. / 3., 0.];
        assert!(x.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{x:?}");
    }
}
