//! Image embeddings for EST-LoRA's style discrepancy: DINO ViT-S/16 (transformers `ViTModel`)
//! with the reference's preprocessing — transformers' PIL image processor: bilinear resize to
//! 224×224 exactly as Pillow computes it (separable, antialiased when shrinking, 8-bit rounding
//! after each pass), scale to [0, 1], normalise with the ImageNet mean and std.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use loramix_models::vit::{ViTConfig, ViTModel};

use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

pub struct ImageEmbedder {
    model: ViTModel,
    mean: [f32; 3],
    std: [f32; 3],
    device: Device,
}

/// transformers 4 names (hub checkpoints such as facebook/dino-vits16) → transformers 5 names.
fn modern_name(k: &str) -> String {
    let k = k.strip_prefix("vit.").unwrap_or(k);
    let Some(rest) = k.strip_prefix("encoder.layer.") else { return k.to_string() };
    let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let tail = tail
        .replace("attention.attention.query", "attention.q_proj")
        .replace("attention.attention.key", "attention.k_proj")
        .replace("attention.attention.value", "attention.v_proj")
        .replace("attention.output.dense", "attention.o_proj")
        .replace("intermediate.dense", "mlp.fc1")
        .replace("output.dense", "mlp.fc2");
    format!("layers.{i}.{tail}")
}

impl ImageEmbedder {
    /// A folder with `config.json` (optional: DINO ViT-S/16 by default), `model.safetensors`
    /// and optionally `preprocessor_config.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config: ViTConfig = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::model(&cfg_path, format!("not a ViT config: {e}")))?
        } else {
            ViTConfig::dino_vits16()
        };
        let weights = dir.join("model.safetensors");
        let file = SafetensorsFile::open(&weights)?;
        let mut tensors = HashMap::new();
        for name in file.names() {
            tensors.insert(modern_name(&name), file.load(&name)?.to_dtype(DType::F32)?.to_device(device)?);
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = ViTModel::new(vb, &config).map_err(|e| Error::model(&weights, e.to_string()))?;
        let (mut mean, mut std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let pp = dir.join("preprocessor_config.json");
        if let Ok(text) = std::fs::read_to_string(&pp) {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::model(&pp, e.to_string()))?;
            let three = |k: &str| -> Option<[f32; 3]> {
                let a = v.get(k)?.as_array()?;
                Some([a.first()?.as_f64()? as f32, a.get(1)?.as_f64()? as f32, a.get(2)?.as_f64()? as f32])
            };
            mean = three("image_mean").unwrap_or(mean);
            std = three("image_std").unwrap_or(std);
        }
        Ok(Self { model, mean, std, device: device.clone() })
    }

    /// `[1, 3, S, S]` normalised pixels of `img` as the reference processor makes them.
    pub fn pixel_values(&self, img: &image::RgbImage) -> Result<Tensor> {
        let s = self.model.config().image_size;
        let resized = resize_bilinear_pil(img, s, s);
        let mut data = vec![0f32; 3 * s * s];
        for (x, y, p) in resized.enumerate_pixels() {
            for c in 0..3 {
                let v = p.0[c] as f32 * (1.0 / 255.0);
                data[c * s * s + y as usize * s + x as usize] = (v - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, s, s), &self.device)?)
    }

    /// The CLS embedding of the last hidden state.
    pub fn embed(&self, img: &image::RgbImage) -> Result<Vec<f32>> {
        let px = self.pixel_values(img)?;
        Ok(self.model.cls_embedding(&px)?.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn model(&self) -> &ViTModel {
        &self.model
    }
}

/// 1 − cos(a, b).
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb).max(1e-30)
}

/// `PIL.Image.resize((w, h), Image.BILINEAR)`, bit for bit, as the reference embedders'
/// preprocessing does.
pub fn resize_bilinear_pil(img: &image::RgbImage, out_w: usize, out_h: usize) -> image::RgbImage {
    crate::resample::resize(img, out_w as u32, out_h as u32, crate::resample::Filter::Bilinear)
}
