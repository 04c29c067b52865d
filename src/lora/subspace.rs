//! EigenLoRAx subspaces (arXiv 2502.04700): the LoRAs of one base model share a low-dimensional
//! subspace per layer, so a few principal directions per module, kept once, turn each LoRA into
//! a few loadings.
//!
//! The maths, per module (one adaptable layer) and per side (up B: `out × r`, down Aᵀ: `in × r`,
//! conv kernels flattened to `in·kh·kw`):
//! 1. Fold the module's scale (alpha / rank, PEFT's config) into the factors, so that
//!    ΔW = B A exactly as our loader applies it.
//! 2. Canonicalise: B·A is not unique ((B M, M⁻¹ A) is the same update), so a basis built from
//!    raw factors would depend on how each LoRA happened to be trained. We take the thin SVD of
//!    ΔW = U Σ Vᵀ (through QR of each factor and an `r × r` SVD, never forming ΔW) and use
//!    B = U √Σ, Aᵀ = V √Σ, each column's sign fixed so its largest entry is positive.
//! 3. Stack the N members' columns side by side (`dim × Σ rᵢ`), optionally subtract the mean
//!    column, and keep the K leading left singular vectors as the components C.
//! 4. A member's loadings are `L = Cᵀ (B − μ 1ᵀ)` (`K × r`); its reconstruction is
//!    `B̂ = C L + μ 1ᵀ`.
//!
//! Where the reference code (toshi2k2/EigenLoRA, read, not ported: it has no licence) differs:
//! it stacks raw factors (no canonical form, alphas dropped) and subtracts the mean but never
//! adds it back, which costs ~3 % of ΔW even for members at K = N·r. Here the mean is added back
//! (`Centering::Centred`) or never subtracted (`Uncentred`), and K is fixed or chosen per module
//! by explained energy. All decompositions are faer's (QR, SVD): not ours to write.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use loramix_models::{BranchWeights, LayerKind};
use serde::{Deserialize, Serialize};

use super::network::{LoadReport, LoadedLora, LoraModule, SharedModule};
use super::targets::AdapterTargets;
use super::LoraInfo;
use crate::error::{Error, Result};
use crate::weights::{safetensors_bytes, RawTensor, SafetensorsFile};

/// Whether the mean column is subtracted before the SVD (and added back on reconstruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    Centred,
    Uncentred,
}

impl Centering {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "centred" | "centered" => Ok(Self::Centred),
            "uncentred" | "uncentered" => Ok(Self::Uncentred),
            o => Err(Error::Argument(format!("--centering {o}: expected centred or uncentred"))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Centred => "centred",
            Self::Uncentred => "uncentred",
        }
    }
}

/// The precision components and loadings are stored in. Errors are measured after rounding,
/// so what `show` reports is what `generate` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    F16,
    F32,
}

impl Storage {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            o => Err(Error::Argument(format!("--dtype {o}: expected f16 or f32"))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
    /// `v` as it reads back after storage.
    pub fn round(self, v: &mut [f64]) {
        for x in v {
            *x = match self {
                Self::F16 => half::f16::from_f64(*x).to_f64(),
                Self::F32 => *x as f32 as f64,
            };
        }
    }
    fn bytes(self, v: &[f64]) -> Vec<u8> {
        match self {
            Self::F16 => v.iter().flat_map(|x| half::f16::from_f64(*x).to_le_bytes()).collect(),
            Self::F32 => v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        }
    }
    fn dtype(self) -> safetensors::tensor::Dtype {
        match self {
            Self::F16 => safetensors::tensor::Dtype::F16,
            Self::F32 => safetensors::tensor::Dtype::F32,
        }
    }
}

/// How many components each module keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentRule {
    /// K per module side, capped by what the stack holds.
    Fixed(usize),
    /// The fewest components whose squared singular values reach this share of the total.
    Energy(f64),
}

impl ComponentRule {
    pub fn validate(self) -> Result<Self> {
        match self {
            Self::Fixed(0) => Err(Error::Argument("--components 0: expected at least 1".into())),
            Self::Energy(e) if !(e > 0.0 && e <= 1.0) => Err(Error::Argument(format!("--energy {e}: expected a share in (0, 1]"))),
            r => Ok(r),
        }
    }
    pub fn describe(self) -> String {
        match self {
            Self::Fixed(k) => format!("K = {k}"),
            Self::Energy(e) => format!("energy {e}"),
        }
    }
}

/// One module of one LoRA in factor form: ΔW = up · downᵀ, scale folded in.
#[derive(Debug, Clone)]
pub struct ModuleFactors {
    /// `out × r`, column-major (`up[j * out + i]` is row i of column j).
    pub up: Vec<f64>,
    /// `in × r` (the down matrix transposed; conv kernels flattened to `in·kh·kw`), column-major.
    pub down_t: Vec<f64>,
    pub out_dim: usize,
    pub in_dim: usize,
    pub rank: usize,
}

impl ModuleFactors {
    /// From the file's layout: `up` `[out, r]` and `down` `[r, in]`, both row-major, times `scale`.
    pub fn from_up_down(up: &[f32], down: &[f32], out_dim: usize, rank: usize, in_dim: usize, scale: f64) -> Result<Self> {
        if up.len() != out_dim * rank || down.len() != rank * in_dim {
            return Err(Error::Argument(format!(
                "module factors: up has {} values and down {}, expected {out_dim}×{rank} and {rank}×{in_dim}",
                up.len(),
                down.len()
            )));
        }
        let mut u = vec![0.0; out_dim * rank];
        let mut d = vec![0.0; in_dim * rank];
        for j in 0..rank {
            for i in 0..out_dim {
                u[j * out_dim + i] = up[i * rank + j] as f64 * scale;
            }
            for i in 0..in_dim {
                d[j * in_dim + i] = down[j * in_dim + i] as f64;
            }
        }
        Ok(Self { up: u, down_t: d, out_dim, in_dim, rank })
    }

    fn up_mat(&self) -> Mat<f64> {
        Mat::from_fn(self.out_dim, self.rank, |i, j| self.up[j * self.out_dim + i])
    }
    fn down_mat(&self) -> Mat<f64> {
        Mat::from_fn(self.in_dim, self.rank, |i, j| self.down_t[j * self.in_dim + i])
    }

    /// The thin-SVD form B = U√Σ, Aᵀ = V√Σ of the same ΔW, signs fixed; rank-deficient
    /// directions (σ ≤ 1e-12 σ_max) are dropped.
    pub fn canonical(&self) -> Result<Self> {
        let (o, n, r) = (self.out_dim, self.in_dim, self.rank);
        if r == 0 {
            return Ok(self.clone());
        }
        let p = self.up_mat();
        let q = self.down_mat();
        let qr_p = p.qr();
        let qr_q = q.qr();
        let q1 = qr_p.compute_thin_Q();
        let q2 = qr_q.compute_thin_Q();
        let r1 = qr_p.thin_R().to_owned();
        let r2 = qr_q.thin_R().to_owned();
        let m = &r1 * r2.transpose();
        let svd = m.thin_svd().map_err(|e| Error::Internal(format!("SVD did not converge: {e:?}")))?;
        let (x, s, y) = (svd.U(), svd.S().column_vector(), svd.V());
        let b = &q1 * x;
        let a = &q2 * y;
        let smax = (0..s.nrows()).map(|i| s[i]).fold(0.0f64, f64::max);
        let keep: Vec<usize> = (0..s.nrows()).filter(|&i| s[i] > smax * 1e-12 && s[i] > 0.0).collect();
        let k = keep.len();
        let mut up = vec![0.0; o * k];
        let mut down_t = vec![0.0; n * k];
        for (c, &j) in keep.iter().enumerate() {
            let root = s[j].sqrt();
            let (mut best, mut sign) = (0.0f64, 1.0f64);
            for i in 0..o {
                if b[(i, j)].abs() > best {
                    best = b[(i, j)].abs();
                    sign = b[(i, j)].signum();
                }
            }
            for i in 0..o {
                up[c * o + i] = sign * root * b[(i, j)];
            }
            for i in 0..n {
                down_t[c * n + i] = sign * root * a[(i, j)];
            }
        }
        Ok(Self { up, down_t, out_dim: o, in_dim: n, rank: k })
    }

    /// ‖ΔW‖²_F from the factors (Σ of BᵀB ∘ AᵀA), without forming ΔW.
    pub fn norm_sq(&self) -> f64 {
        gram_product(&self.up, &self.down_t, &self.up, &self.down_t, self.out_dim, self.in_dim, self.rank, self.rank)
    }

    /// ‖ΔW_self − ΔW_other‖²_F.
    pub fn distance_sq(&self, other: &Self) -> f64 {
        let a = self.norm_sq();
        let b = other.norm_sq();
        let ab = gram_product(&self.up, &self.down_t, &other.up, &other.down_t, self.out_dim, self.in_dim, self.rank, other.rank);
        (a + b - 2.0 * ab).max(0.0)
    }

    /// `[out, r]` and `[r, in]` row-major f32: the file layout.
    pub fn to_up_down(&self) -> (Vec<f32>, Vec<f32>) {
        let (o, n, r) = (self.out_dim, self.in_dim, self.rank);
        let mut up = vec![0f32; o * r];
        let mut down = vec![0f32; r * n];
        for j in 0..r {
            for i in 0..o {
                up[i * r + j] = self.up[j * o + i] as f32;
            }
            for i in 0..n {
                down[j * n + i] = self.down_t[j * n + i] as f32;
            }
        }
        (up, down)
    }
}

/// ⟨B₁A₁ᵀ, B₂A₂ᵀ⟩_F = Σ_jk (B₁ᵀB₂)_jk (A₁ᵀA₂)_jk for column-major factors.
#[allow(clippy::too_many_arguments)]
fn gram_product(b1: &[f64], a1: &[f64], b2: &[f64], a2: &[f64], o: usize, n: usize, r1: usize, r2: usize) -> f64 {
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    let mut s = 0.0;
    for j in 0..r1 {
        for k in 0..r2 {
            s += dot(&b1[j * o..(j + 1) * o], &b2[k * o..(k + 1) * o]) * dot(&a1[j * n..(j + 1) * n], &a2[k * n..(k + 1) * n]);
        }
    }
    s
}

/// One side (up or down) of a module's basis: `dim × k` components (column-major) and the mean
/// column (zeros when uncentred).
#[derive(Debug, Clone, PartialEq)]
pub struct SideBasis {
    pub dim: usize,
    pub k: usize,
    pub components: Vec<f64>,
    pub mean: Vec<f64>,
}

impl SideBasis {
    /// Principal directions of the columns `cols` (each of length `dim`).
    fn fit(cols: &[&[f64]], dim: usize, centering: Centering, rule: ComponentRule) -> Result<Self> {
        let n = cols.len();
        let mut mean = vec![0.0; dim];
        if centering == Centering::Centred && n > 0 {
            for c in cols {
                for (m, v) in mean.iter_mut().zip(c.iter()) {
                    *m += v / n as f64;
                }
            }
        }
        let stack = Mat::<f64>::from_fn(dim, n, |i, j| cols[j][i] - mean[i]);
        let svd = stack.thin_svd().map_err(|e| Error::Internal(format!("SVD did not converge: {e:?}")))?;
        let (u, s) = (svd.U(), svd.S().column_vector());
        // Directions with σ ≤ 1e-9 σ_max are rank deficiency (a centred stack always loses one):
        // their vectors are arbitrary and carry nothing, so they are never kept.
        let smax = if s.nrows() > 0 { s[0] } else { 0.0 };
        let avail = (0..s.nrows()).filter(|&i| s[i] > smax * 1e-9).count();
        let total: f64 = (0..avail).map(|i| s[i] * s[i]).sum();
        let k = match rule {
            ComponentRule::Fixed(k) => k.min(avail),
            ComponentRule::Energy(e) => {
                let mut acc = 0.0;
                let mut k = 0;
                while k < avail && (total == 0.0 || acc < e * total * (1.0 - 1e-12)) {
                    acc += s[k] * s[k];
                    k += 1;
                }
                k.max(1).min(avail)
            }
        };
        // A component's sign is arbitrary in any SVD; fix it (largest entry positive) so that
        // stored bases and loadings are reproducible across libraries.
        let mut components = vec![0.0; dim * k];
        for j in 0..k {
            let col: Vec<f64> = (0..dim).map(|i| u[(i, j)]).collect();
            let sign = col.iter().copied().fold((0.0f64, 1.0f64), |(b, s), v| if v.abs() > b { (v.abs(), v.signum()) } else { (b, s) }).1;
            for (i, v) in col.iter().enumerate() {
                components[j * dim + i] = sign * v;
            }
        }
        Ok(Self { dim, k, components, mean })
    }

    fn components_ref(&self) -> faer::MatRef<'_, f64> {
        faer::MatRef::from_column_major_slice(&self.components, self.dim, self.k)
    }

    /// `Cᵀ (X − μ 1ᵀ)` for the column-major `dim × r` matrix `x`: `k × r`, column-major.
    pub fn project(&self, x: &[f64], r: usize) -> Vec<f64> {
        let centred = Mat::<f64>::from_fn(self.dim, r, |i, j| x[j * self.dim + i] - self.mean[i]);
        let l = self.components_ref().transpose() * &centred;
        (0..r).flat_map(|j| (0..self.k).map(move |c| (c, j))).map(|(c, j)| l[(c, j)]).collect()
    }

    /// `C L + μ 1ᵀ`: `dim × r`, column-major.
    pub fn reconstruct(&self, loadings: &[f64], r: usize) -> Vec<f64> {
        let l = faer::MatRef::from_column_major_slice(loadings, self.k, r);
        let x = self.components_ref() * l;
        (0..r).flat_map(|j| (0..self.dim).map(move |i| (i, j))).map(|(i, j)| x[(i, j)] + self.mean[i]).collect()
    }
}

/// The basis of one module: both sides.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleBasis {
    pub up: SideBasis,
    pub down: SideBasis,
}

/// One member's loadings on one module: `k_up × r` and `k_down × r`, column-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleLoadings {
    pub rank: usize,
    pub up: Vec<f64>,
    pub down: Vec<f64>,
}

impl ModuleBasis {
    /// Rounds the stored parts (components, mean) to `storage`.
    pub fn round(&mut self, storage: Storage) {
        for side in [&mut self.up, &mut self.down] {
            storage.round(&mut side.components);
            storage.round(&mut side.mean);
        }
    }

    pub fn project(&self, f: &ModuleFactors) -> ModuleLoadings {
        ModuleLoadings { rank: f.rank, up: self.up.project(&f.up, f.rank), down: self.down.project(&f.down_t, f.rank) }
    }

    pub fn reconstruct(&self, l: &ModuleLoadings) -> ModuleFactors {
        ModuleFactors {
            up: self.up.reconstruct(&l.up, l.rank),
            down_t: self.down.reconstruct(&l.down, l.rank),
            out_dim: self.up.dim,
            in_dim: self.down.dim,
            rank: l.rank,
        }
    }
}

/// A member's modules, keyed by the layer's qualified path (`unet.down_blocks.1...to_q`), so
/// that LoRAs written in kohya, SGM or diffusers/PEFT naming share one basis per layer.
pub type MemberFactors = BTreeMap<String, ModuleFactors>;

/// Relative ΔW error of a reconstruction, per module and overall (‖ΔŴ − ΔW‖ / ‖ΔW‖).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReconstructionError {
    pub overall: f64,
    pub per_module: BTreeMap<String, f64>,
}

/// Builds one basis per module from canonical members (see [`ModuleFactors::canonical`]).
/// Every member must cover the same layers with the same shapes: a layer only some members
/// adapt gets a basis from those, and the others simply have no loadings there.
pub fn build(members: &[MemberFactors], centering: Centering, rule: ComponentRule) -> Result<BTreeMap<String, ModuleBasis>> {
    let rule = rule.validate()?;
    let mut paths: Vec<&String> = members.iter().flat_map(|m| m.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut out = BTreeMap::new();
    for path in paths {
        let fs: Vec<&ModuleFactors> = members.iter().filter_map(|m| m.get(path)).collect();
        let (o, n) = (fs[0].out_dim, fs[0].in_dim);
        if let Some(bad) = fs.iter().find(|f| f.out_dim != o || f.in_dim != n) {
            return Err(Error::Argument(format!(
                "module {path}: members disagree on its shape ({o}×{n} and {}×{}); they are not LoRAs of one base model",
                bad.out_dim, bad.in_dim
            )));
        }
        let up_cols: Vec<&[f64]> = fs.iter().flat_map(|f| f.up.chunks(o)).collect();
        let down_cols: Vec<&[f64]> = fs.iter().flat_map(|f| f.down_t.chunks(n)).collect();
        if up_cols.is_empty() {
            continue;
        }
        let up = SideBasis::fit(&up_cols, o, centering, rule)?;
        let down = SideBasis::fit(&down_cols, n, centering, rule)?;
        out.insert(path.clone(), ModuleBasis { up, down });
    }
    Ok(out)
}

/// A control for experiments: the same modules and K per side, but random orthonormal
/// components (QR of a seeded Gaussian matrix) and no mean. If loadings trained on this do as
/// well as on the real basis, the subspace is not what helps.
pub fn random_like(basis: &BTreeMap<String, ModuleBasis>, seed: u64) -> Result<BTreeMap<String, ModuleBasis>> {
    let mut rng = crate::rng::TorchCpuRng::new(seed);
    let mut side = |sb: &SideBasis| -> Result<SideBasis> {
        let g = rng.randn(sb.dim * sb.k);
        let m = Mat::<f64>::from_fn(sb.dim, sb.k, |i, j| g[j * sb.dim + i] as f64);
        let q = m.qr().compute_thin_Q();
        let components = (0..sb.k).flat_map(|j| (0..sb.dim).map(move |i| (i, j))).map(|(i, j)| q[(i, j)]).collect();
        Ok(SideBasis { dim: sb.dim, k: sb.k, components, mean: vec![0.0; sb.dim] })
    };
    basis.iter().map(|(p, b)| Ok((p.clone(), ModuleBasis { up: side(&b.up)?, down: side(&b.down)? }))).collect()
}

/// A member's loadings on every module of `basis` it has, and its reconstruction error.
/// Loadings are rounded to `storage` before the error is measured.
pub fn project(
    basis: &BTreeMap<String, ModuleBasis>,
    member: &MemberFactors,
    storage: Storage,
) -> Result<(BTreeMap<String, ModuleLoadings>, ReconstructionError)> {
    let mut loadings = BTreeMap::new();
    let mut err = ErrorSum::default();
    for (path, f) in member {
        let b = basis_for(basis, path, f.out_dim, f.in_dim)?;
        let mut l = b.project(f);
        storage.round(&mut l.up);
        storage.round(&mut l.down);
        let rec = b.reconstruct(&l);
        err.add(path, f.distance_sq(&rec), f.norm_sq());
        loadings.insert(path.clone(), l);
    }
    Ok((loadings, err.finish()))
}

/// The basis of layer `path`, checked against a member's `out × in` shape there.
fn basis_for<'a>(basis: &'a BTreeMap<String, ModuleBasis>, path: &str, out_dim: usize, in_dim: usize) -> Result<&'a ModuleBasis> {
    let b = basis
        .get(path)
        .ok_or_else(|| Error::Argument(format!("module {path}: the subspace has no basis for this layer (its members never adapt it)")))?;
    if b.up.dim != out_dim || b.down.dim != in_dim {
        return Err(Error::Argument(format!(
            "module {path}: this LoRA's shape {out_dim}×{in_dim} does not match the subspace's {}×{}; it is for another base model",
            b.up.dim, b.down.dim
        )));
    }
    Ok(b)
}

/// Squared ΔW distances and norms summed over modules into [`ReconstructionError`].
#[derive(Default)]
struct ErrorSum {
    err: ReconstructionError,
    num: f64,
    den: f64,
}

impl ErrorSum {
    fn add(&mut self, path: &str, d2: f64, n2: f64) {
        self.err.per_module.insert(path.to_string(), if n2 > 0.0 { (d2 / n2).sqrt() } else { 0.0 });
        self.num += d2;
        self.den += n2;
    }

    fn finish(mut self) -> ReconstructionError {
        self.err.overall = if self.den > 0.0 { (self.num / self.den).sqrt() } else { 0.0 };
        self.err
    }
}

/// Projects a LoRA whose modules hold a dense ΔW (LoHa, LoKr, LyCORIS full; low-rank modules
/// of the same file go through their ΔW too) onto an uncentred `basis`: the loadings of each
/// module are the best rank-K form of its orthogonal projection `C_B (C_Bᵀ ΔW C_A) C_Aᵀ`, from
/// the SVD of the small `K_u × K_d` core, so no rank limit applies. Errors are measured against
/// the true ΔW, after the loadings are rounded to `storage`.
///
/// Why not through [`ModuleFactors`]: a dense ΔW has no rank-r factors, and its exact SVD would
/// cost a full decomposition per layer where the core needs two products.
pub fn project_dense(
    basis: &BTreeMap<String, ModuleBasis>,
    lora: &LoadedLora,
    targets: &AdapterTargets,
    storage: Storage,
) -> Result<(BTreeMap<String, ModuleLoadings>, ReconstructionError)> {
    let mut loadings = BTreeMap::new();
    let mut err = ErrorSum::default();
    for m in &lora.modules {
        let t = &targets.targets[m.target];
        let path = t.qualified_path();
        let delta = lora.delta(m)?.to_dtype(DType::F32)?;
        let out_dim = delta.dim(0)?;
        let w: Vec<f32> = delta.reshape((out_dim, ()))?.flatten_all()?.to_vec1()?;
        let in_dim = w.len() / out_dim.max(1);
        let b = basis_for(basis, &path, out_dim, in_dim)?;
        if b.up.mean.iter().chain(&b.down.mean).any(|v| *v != 0.0) {
            return Err(Error::Argument(format!(
                "{} has dense modules (ΔW, not up·down factors), which join uncentred subspaces only; build one with --centering uncentred",
                lora.name
            )));
        }
        let dw = faer::MatRef::from_row_major_slice(&w, out_dim, in_dim);
        let dw = Mat::<f64>::from_fn(out_dim, in_dim, |i, j| dw[(i, j)] as f64);
        let (cb, ca) = (b.up.components_ref(), b.down.components_ref());
        let core = cb.transpose() * &dw * ca;
        let svd = core.thin_svd().map_err(|e| Error::Argument(format!("module {path}: SVD of the projected core failed: {e:?}")))?;
        let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let top = sv.iter().copied().fold(0.0f64, f64::max);
        let rank = sv.iter().filter(|s| **s > top * 1e-12).count().max(1);
        let mut l = ModuleLoadings {
            rank,
            up: (0..rank).flat_map(|j| (0..b.up.k).map(move |c| (c, j))).map(|(c, j)| u[(c, j)] * sv[j].sqrt()).collect(),
            down: (0..rank).flat_map(|j| (0..b.down.k).map(move |c| (c, j))).map(|(c, j)| v[(c, j)] * sv[j].sqrt()).collect(),
        };
        storage.round(&mut l.up);
        storage.round(&mut l.down);
        // ‖ΔW − C_B L_B L_Aᵀ C_Aᵀ‖² = ‖ΔW‖² − 2⟨core, L_B L_Aᵀ⟩ + ‖L_B L_Aᵀ‖², the components being orthonormal.
        let lb = faer::MatRef::from_column_major_slice(&l.up, b.up.k, rank);
        let la = faer::MatRef::from_column_major_slice(&l.down, b.down.k, rank);
        let kept = lb * la.transpose();
        let (mut inner, mut kept2) = (0.0, 0.0);
        for j in 0..b.down.k {
            for i in 0..b.up.k {
                inner += core[(i, j)] * kept[(i, j)];
                kept2 += kept[(i, j)] * kept[(i, j)];
            }
        }
        let n2: f64 = w.iter().map(|x| (*x as f64) * (*x as f64)).sum();
        err.add(&path, (n2 - 2.0 * inner + kept2).max(0.0), n2);
        loadings.insert(path, l);
    }
    Ok((loadings, err.finish()))
}

/// A loaded LoRA's modules in canonical factor form (scale folded in), keyed by layer path.
/// Only low-rank modules (LoRA, LoCon, Tucker LoCon) have factors; a dense module (LoHa, LoKr,
/// LyCORIS full) is refused by name, since it has no rank-r factors to share a basis.
pub fn member_factors(lora: &LoadedLora, targets: &AdapterTargets) -> Result<MemberFactors> {
    let mut out = BTreeMap::new();
    for m in &lora.modules {
        let t = &targets.targets[m.target];
        let BranchWeights::LowRank { down, up } = &m.weights else {
            return Err(Error::BadFile {
                path: lora.path.clone(),
                message: format!(
                    "module {} is {} (a dense ΔW, not up·down factors); a subspace holds low-rank LoRA/LoCon modules only",
                    m.key, lora.info.format.as_str()
                ),
            });
        };
        let r = down.dim(0)?;
        let down = down.to_dtype(DType::F32)?.reshape((r, ()))?;
        let in_dim = down.dim(1)?;
        let up = up.to_dtype(DType::F32)?.reshape((t.layer.out_features, r))?;
        let f = ModuleFactors::from_up_down(
            &up.flatten_all()?.to_vec1::<f32>()?,
            &down.flatten_all()?.to_vec1::<f32>()?,
            t.layer.out_features,
            r,
            in_dim,
            m.scale,
        )?;
        out.insert(t.qualified_path(), f.canonical()?);
    }
    Ok(out)
}

/// The shared-basis form of a member (uncentred subspaces only: a mean column would add a
/// per-member rank-one term outside the basis).
pub struct SharedForm<'a> {
    pub key: &'a str,
    /// From [`basis_tensors`], once per subspace: switching members then swaps loadings only.
    pub bases: &'a BTreeMap<String, std::sync::Arc<(Tensor, Tensor)>>,
    pub loadings: &'a BTreeMap<String, ModuleLoadings>,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

/// Each module's basis as the layer applies it: C_Aᵀ `[K_d, in]` (`[K_d, in, k, k]` on a conv)
/// and C_B `[out, K_u]` (`[out, K_u, 1, 1]`), f32 on the CPU.
pub fn basis_tensors(basis: &BTreeMap<String, ModuleBasis>, targets: &AdapterTargets) -> Result<BTreeMap<String, std::sync::Arc<(Tensor, Tensor)>>> {
    let kinds: std::collections::HashMap<String, (LayerKind, usize)> =
        targets.targets.iter().map(|t| (t.qualified_path(), (t.layer.kind, t.layer.in_features))).collect();
    let mut out = BTreeMap::new();
    for (path, b) in basis {
        let Some(&(kind, in_features)) = kinds.get(path) else { continue };
        let (kd, ku) = (b.down.k, b.up.k);
        // Column-major [dim × k] components are row-major [k, dim]: C_Aᵀ as it is, C_B transposed.
        let down = Tensor::from_vec(f32s(&b.down.components), (kd, b.down.dim), &Device::Cpu)?;
        let up = Tensor::from_vec(f32s(&b.up.components), (ku, b.up.dim), &Device::Cpu)?.t()?.contiguous()?;
        let pair = match kind {
            LayerKind::Linear => (down, up),
            LayerKind::Conv2d { kernel, .. } => (down.reshape((kd, in_features, kernel, kernel))?, up.reshape((b.up.dim, ku, 1, 1))?),
        };
        out.insert(path.clone(), std::sync::Arc::new(pair));
    }
    Ok(out)
}

fn shared_module(form: &SharedForm, path: &str) -> Result<Option<SharedModule>> {
    let (Some(b), Some(l)) = (form.bases.get(path), form.loadings.get(path)) else { return Ok(None) };
    let r = l.rank;
    let (kd, ku) = (l.down.len() / r.max(1), l.up.len() / r.max(1));
    Ok(Some(SharedModule {
        key: form.key.to_string(),
        basis: b.clone(),
        down: Tensor::from_vec(f32s(&l.down), (r, kd), &Device::Cpu)?,
        up: Tensor::from_vec(f32s(&l.up), (r, ku), &Device::Cpu)?.t()?.contiguous()?,
    }))
}

/// A [`LoadedLora`] whose modules are `factors` (a reconstruction), attached like any file's
/// LoRA, so every mixing strategy works on subspace members unchanged; with `shared`, the
/// unfused forward runs through the subspace's basis (see `loramix_models::SharedBasis`).
pub fn lora_from_factors(
    name: &str,
    label: &std::path::Path,
    info: LoraInfo,
    addnet_hash: String,
    factors: &MemberFactors,
    targets: &AdapterTargets,
    shared: Option<SharedForm>,
) -> Result<LoadedLora> {
    let index: std::collections::HashMap<String, usize> = targets.targets.iter().enumerate().map(|(i, t)| (t.qualified_path(), i)).collect();
    let mut modules = Vec::new();
    let mut report = LoadReport::default();
    for (path, f) in factors {
        let Some(&ti) = index.get(path) else {
            report.unmatched_keys.push(path.clone());
            continue;
        };
        let t = &targets.targets[ti];
        let (up, down) = f.to_up_down();
        let (up, down) = match t.layer.kind {
            LayerKind::Linear => (
                Tensor::from_vec(up, (f.out_dim, f.rank), &Device::Cpu)?,
                Tensor::from_vec(down, (f.rank, f.in_dim), &Device::Cpu)?,
            ),
            LayerKind::Conv2d { kernel, .. } => (
                Tensor::from_vec(up, (f.out_dim, f.rank, 1, 1), &Device::Cpu)?,
                Tensor::from_vec(down, (f.rank, t.layer.in_features, kernel, kernel), &Device::Cpu)?,
            ),
        };
        report.matched.push(path.clone());
        let shared = match &shared {
            Some(form) => shared_module(form, path)?,
            None => None,
        };
        modules.push(LoraModule { target: ti, key: path.clone(), weights: BranchWeights::LowRank { down, up }, scale: 1.0, shared });
    }
    if modules.is_empty() {
        return Err(Error::Argument(format!("{name}: none of its subspace modules names a layer of {}", targets.describe_model())));
    }
    Ok(LoadedLora { name: name.to_string(), path: label.to_path_buf(), info, addnet_hash, modules, report })
}

/// The components file's metadata key.
const META_KEY: &str = "loramix.subspace";

/// What a components file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubspaceHeader {
    pub name: String,
    pub base_model: String,
    pub centering: Centering,
    pub rule: ComponentRule,
    pub storage: Storage,
}

fn serialize(storage: Storage, tensors: Vec<RawTensor>, meta: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>> {
    safetensors_bytes(storage.dtype(), &tensors, meta, "subspace tensors")
}

fn read_f64(file: &SafetensorsFile, name: &str, len: usize) -> Result<Vec<f64>> {
    let v = file.load(name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.len() != len {
        return Err(Error::BadFile { path: file.path().to_path_buf(), message: format!("{name}: {} values, expected {len}", v.len()) });
    }
    Ok(v.into_iter().map(f64::from).collect())
}

/// The components file: per module and side, `{path}.{up|down}.components` `[k, dim]` (each
/// row a component) and, when centred, `{path}.{up|down}.mean` `[dim]`, in the header's storage dtype.
pub fn components_bytes(header: &SubspaceHeader, basis: &BTreeMap<String, ModuleBasis>) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (path, b) in basis {
        for (side, sb) in [("up", &b.up), ("down", &b.down)] {
            tensors.push((format!("{path}.{side}.components"), vec![sb.k, sb.dim], header.storage.bytes(&sb.components)));
            if header.centering == Centering::Centred {
                tensors.push((format!("{path}.{side}.mean"), vec![sb.dim], header.storage.bytes(&sb.mean)));
            }
        }
    }
    let meta = serde_json::to_string(header).map_err(|e| Error::Argument(e.to_string()))?;
    serialize(header.storage, tensors, Some([(META_KEY.to_string(), meta)].into()))
}

/// Reads a components file written by [`components_bytes`].
pub fn read_components(file: &SafetensorsFile) -> Result<(SubspaceHeader, BTreeMap<String, ModuleBasis>)> {
    let bad = |m: String| Error::BadFile { path: file.path().to_path_buf(), message: m };
    let raw = file.user_metadata().remove(META_KEY).ok_or_else(|| bad(format!("not a LoRAMix subspace file (no {META_KEY} metadata)")))?;
    let header: SubspaceHeader = serde_json::from_str(&raw).map_err(|e| bad(format!("{META_KEY}: {e}")))?;
    let mut basis = BTreeMap::new();
    for name in file.names() {
        let Some(path) = name.strip_suffix(".up.components") else { continue };
        let side = |s: &str| -> Result<SideBasis> {
            let cname = format!("{path}.{s}.components");
            let shape = file.shape_of(&cname).ok_or_else(|| bad(format!("{cname} is missing")))?;
            let [k, dim] = shape[..] else { return Err(bad(format!("{cname}: shape {shape:?}, expected [k, dim]"))) };
            let components = read_f64(file, &cname, k * dim)?;
            let mean = match header.centering {
                Centering::Centred => read_f64(file, &format!("{path}.{s}.mean"), dim)?,
                Centering::Uncentred => vec![0.0; dim],
            };
            Ok(SideBasis { dim, k, components, mean })
        };
        basis.insert(path.to_string(), ModuleBasis { up: side("up")?, down: side("down")? });
    }
    Ok((header, basis))
}

/// A member's loadings as safetensors bytes: `{path}.up` `[r, k_up]`, `{path}.down` `[r, k_down]`.
pub fn loadings_bytes(loadings: &BTreeMap<String, ModuleLoadings>, storage: Storage) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (path, l) in loadings {
        let ku = l.up.len() / l.rank.max(1);
        let kd = l.down.len() / l.rank.max(1);
        tensors.push((format!("{path}.up"), vec![l.rank, ku], storage.bytes(&l.up)));
        tensors.push((format!("{path}.down"), vec![l.rank, kd], storage.bytes(&l.down)));
    }
    serialize(storage, tensors, None)
}

/// Reads [`loadings_bytes`]; `label` names the member in errors.
pub fn read_loadings(label: &std::path::Path, bytes: Vec<u8>) -> Result<BTreeMap<String, ModuleLoadings>> {
    let file = SafetensorsFile::from_bytes(label, bytes)?;
    let mut out = BTreeMap::new();
    for name in file.names() {
        let Some(path) = name.strip_suffix(".up") else { continue };
        let su = file.shape_of(&name).unwrap_or_default();
        let dn = format!("{path}.down");
        let sd = file.shape_of(&dn).ok_or_else(|| Error::BadFile { path: label.to_path_buf(), message: format!("{dn} is missing") })?;
        let (r, ku, kd) = (su.first().copied().unwrap_or(0), su.get(1).copied().unwrap_or(0), sd.get(1).copied().unwrap_or(0));
        out.insert(path.to_string(), ModuleLoadings { rank: r, up: read_f64(&file, &name, r * ku)?, down: read_f64(&file, &dn, r * kd)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(o: usize, n: usize, r: usize, seed: u64) -> ModuleFactors {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let up: Vec<f32> = (0..o * r).map(|_| next() as f32).collect();
        let down: Vec<f32> = (0..r * n).map(|_| next() as f32).collect();
        ModuleFactors::from_up_down(&up, &down, o, r, n, 0.5).unwrap()
    }

    #[test]
    fn canonical_form_is_the_same_update() {
        let f = random(7, 5, 3, 1);
        let c = f.canonical().unwrap();
        // (The factor-form distance cancels to ~1e-8 relative, not to machine precision.)
        assert!(f.distance_sq(&c).sqrt() / f.norm_sq().sqrt() < 1e-6);
        // B·A and (B M)(M⁻¹ A) give the same canonical factors.
        let mut g = f.clone();
        for j in 0..3 {
            for i in 0..7 {
                g.up[j * 7 + i] *= 2.0;
            }
            for i in 0..5 {
                g.down_t[j * 5 + i] *= 0.5;
            }
        }
        let cg = g.canonical().unwrap();
        for (a, b) in c.up.iter().zip(&cg.up) {
            assert!((a - b).abs() < 1e-10);
        }
    }

    #[test]
    fn members_are_exact_at_full_k_either_centering() {
        let members: Vec<MemberFactors> =
            (0..3).map(|s| BTreeMap::from([("m".to_string(), random(9, 8, 2, s + 10).canonical().unwrap())])).collect();
        for centering in [Centering::Uncentred, Centering::Centred] {
            let basis = build(&members, centering, ComponentRule::Fixed(6)).unwrap();
            for m in &members {
                let (_, e) = project(&basis, m, Storage::F32).unwrap();
                assert!(e.overall < 1e-6, "{centering:?}: {}", e.overall);
            }
        }
        // Fewer components than the stack holds lose something, and energy 1 keeps everything.
        let basis = build(&members, Centering::Uncentred, ComponentRule::Fixed(2)).unwrap();
        assert!(project(&basis, &members[0], Storage::F32).unwrap().1.overall > 1e-3);
        let basis = build(&members, Centering::Uncentred, ComponentRule::Energy(1.0)).unwrap();
        assert_eq!(basis["m"].up.k, 6);
    }
}
