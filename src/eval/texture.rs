//! Style fidelity from texture and palette statistics, measured against each style's references.
//!
//! The CNN's style head, trained on clean renders, did not carry over to generated textures, so
//! the style score is a multinomial logistic regression over statistics that a rendering style
//! fixes and an object does not: per pixel offset, the 50 % and 90 % quantiles of the luminance
//! difference |Y(p) − Y(p + d)| (a period-p pattern is near 0 at multiples of p, large at half
//! periods; block noise is large everywhere), and quantiles of luminance and saturation. Quantiles
//! pool over area, so an object's outline (a thin minority of pixels) barely moves them.
//! `tools/miniworld/train_style_stats.py` fits it on world renders in every style, raw and passed
//! through the model's VAE, and defines the features by the parameters in `config.json`; this file
//! computes the same features from the same parameters (checked against a golden).

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// The `style_statistics` section of the evaluator's `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct StyleStatisticsConfig {
    /// Weights file next to `config.json` (`mean`, `std`, `weight`, `bias`).
    pub file: String,
    pub classes: Vec<String>,
    /// Images are resized to `size × size` first, the resolution the references were made at.
    pub size: usize,
    pub blur_sigma: f64,
    /// Pixel offsets `[dy, dx]`; each is taken along both diagonals (`(dy, dx)` and `(dy, −dx)`).
    pub offsets: Vec<[usize; 2]>,
    pub difference_quantiles: Vec<f64>,
    pub log_eps: f64,
    /// Also each offset's log quantile less its mean over offsets (contrast-free shape).
    #[serde(default)]
    pub shape: bool,
    pub luminance_quantiles: Vec<f64>,
    pub saturation_quantiles: Vec<f64>,
}

impl StyleStatisticsConfig {
    pub fn feature_count(&self) -> usize {
        let diff = self.offsets.len() * self.difference_quantiles.len();
        diff * if self.shape { 2 } else { 1 } + self.luminance_quantiles.len() + self.saturation_quantiles.len()
    }
}

/// The fitted classifier: standardised features → logits over the style classes.
pub struct StyleStatistics {
    config: StyleStatisticsConfig,
    mean: Vec<f64>,
    std: Vec<f64>,
    /// `[classes][features]`.
    weight: Vec<Vec<f64>>,
    bias: Vec<f64>,
}

impl StyleStatistics {
    pub fn load(dir: &Path, config: StyleStatisticsConfig) -> Result<Self> {
        let path = dir.join(&config.file);
        let file = SafetensorsFile::open(&path)?;
        let read = |name: &str| -> Result<candle_core::Tensor> { file.load(name)?.to_dtype(DType::F64).map_err(Into::into) };
        let d = config.feature_count();
        let c = config.classes.len();
        let mean = read("mean")?.to_vec1::<f64>()?;
        let std = read("std")?.to_vec1::<f64>()?;
        let weight = read("weight")?;
        let bias = read("bias")?.to_vec1::<f64>()?;
        if mean.len() != d || std.len() != d || weight.dims() != [c, d] || bias.len() != c {
            return Err(Error::model(
                &path,
                format!(
                    "expected mean/std of {d} features, weight [{c}, {d}] and bias [{c}] for {} offsets, got mean {}, std {}, weight {:?}, bias {}",
                    config.offsets.len(),
                    mean.len(),
                    std.len(),
                    weight.dims(),
                    bias.len()
                ),
            ));
        }
        if let Some(i) = std.iter().position(|s| s.is_nan() || *s <= 0.0) {
            return Err(Error::model(&path, format!("std[{i}] must be positive")));
        }
        Ok(Self { weight: weight.to_vec2::<f64>()?, config, mean, std, bias })
    }

    pub fn classes(&self) -> &[String] {
        &self.config.classes
    }

    /// The feature vector, in the order `train_style_stats.py` writes it.
    pub fn features(&self, img: &image::RgbImage) -> Vec<f64> {
        let cfg = &self.config;
        let s = cfg.size;
        let img = if img.width() as usize != s || img.height() as usize != s { crate::eval::embed::resize_bilinear_pil(img, s, s) } else { img.clone() };
        let n = s * s;
        let (mut lum, mut sat) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for p in img.pixels() {
            let [r, g, b] = p.0.map(|v| v as f64 / 255.0);
            lum.push(0.299 * r + 0.587 * g + 0.114 * b);
            let (mx, mn) = (r.max(g).max(b), r.min(g).min(b));
            sat.push((mx - mn) / (mx + 1e-3));
        }
        let y = gaussian_blur(&lum, s, s, cfg.blur_sigma);
        let mut out = Vec::with_capacity(cfg.feature_count());
        let mut diffs = Vec::with_capacity(2 * n);
        for &[dy, dx] in &cfg.offsets {
            diffs.clear();
            if dy < s && dx < s {
                for i in dy..s {
                    for j in dx..s {
                        diffs.push((y[i * s + j] - y[(i - dy) * s + j - dx]).abs());
                    }
                }
                for i in dy..s {
                    for j in 0..s - dx {
                        diffs.push((y[i * s + j] - y[(i - dy) * s + j + dx]).abs());
                    }
                }
            }
            sort(&mut diffs);
            for &q in &cfg.difference_quantiles {
                out.push((quantile_sorted(&diffs, q) + cfg.log_eps).ln());
            }
        }
        if cfg.shape {
            let nq = cfg.difference_quantiles.len();
            let no = cfg.offsets.len();
            // Column means in the order numpy's mean(0) sums them (offset by offset).
            let means: Vec<f64> = (0..nq).map(|q| (0..no).map(|o| out[o * nq + q]).sum::<f64>() / no as f64).collect();
            for o in 0..no {
                for q in 0..nq {
                    out.push(out[o * nq + q] - means[q]);
                }
            }
        }
        sort(&mut lum);
        out.extend(cfg.luminance_quantiles.iter().map(|&q| quantile_sorted(&lum, q)));
        sort(&mut sat);
        out.extend(cfg.saturation_quantiles.iter().map(|&q| quantile_sorted(&sat, q)));
        out
    }

    /// P(style) for every class, in `classes()` order.
    pub fn probabilities(&self, img: &image::RgbImage) -> Vec<f64> {
        let f = self.features(img);
        let z: Vec<f64> = f.iter().zip(&self.mean).zip(&self.std).map(|((x, m), s)| (x - m) / s).collect();
        let logits: Vec<f64> = self.weight.iter().zip(&self.bias).map(|(w, b)| w.iter().zip(&z).map(|(w, z)| w * z).sum::<f64>() + b).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }
}

fn sort(v: &mut [f64]) {
    v.sort_unstable_by(|a, b| a.total_cmp(b));
}

/// numpy's default ("linear") quantile of sorted data; NaN for no data.
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let h = (v.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let t = h - lo as f64;
    // numpy's lerp: the form it uses on each side of t = 0.5, for bit-equal results.
    if t >= 0.5 {
        v[hi] - (v[hi] - v[lo]) * (1.0 - t)
    } else {
        v[lo] + (v[hi] - v[lo]) * t
    }
}

/// Separable Gaussian of radius round(3σ) with mirrored edges (numpy's "reflect" padding),
/// summed in the order the Python reference sums.
fn gaussian_blur(src: &[f64], h: usize, w: usize, sigma: f64) -> Vec<f64> {
    if sigma <= 0.0 {
        return src.to_vec();
    }
    let r = (3.0 * sigma + 0.5) as i64;
    let mut k: Vec<f64> = (-r..=r).map(|t| (-((t * t) as f64) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= total);
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        let mut i = i;
        // A radius wider than the image mirrors more than once.
        loop {
            if i < 0 {
                i = -i;
            } else if i >= n {
                i = 2 * (n - 1) - i;
            } else {
                return i as usize;
            }
        }
    };
    let mut mid = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                acc += kv * src[reflect(y as i64 + i as i64 - r, h) * w + x];
            }
            mid[y * w + x] = acc;
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (i, kv) in k.iter().enumerate() {
                acc += kv * mid[y * w + reflect(x as i64 + i as i64 - r, w)];
            }
            out[y * w + x] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_follow_numpy_linear() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 8.0);
        // numpy.quantile([1, 2, 4, 8], 0.5) == 3.0; 0.9 -> 6.8
        assert!((quantile_sorted(&v, 0.5) - 3.0).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.9) - 6.8).abs() < 1e-12);
        assert!(quantile_sorted(&[], 0.5).is_nan());
    }

    #[test]
    fn blur_keeps_constants_and_mirrors_edges() {
        let flat = vec![0.5; 16];
        assert!(gaussian_blur(&flat, 4, 4, 0.7).iter().all(|v| (v - 0.5).abs() < 1e-12));
        // A single bright column at the left edge spreads right only by the mirrored kernel.
        let mut img = vec![0.0; 16];
        for y in 0..4 {
            img[y * 4] = 1.0;
        }
        let b = gaussian_blur(&img, 4, 4, 0.7);
        assert!(b[0] > b[1] && b[1] > b[2] && b[2] >= b[3]);
        assert!((b[0] - b[4]).abs() < 1e-12, "columns are constant down the image");
    }
}
