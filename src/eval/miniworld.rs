//! The miniworld evaluator: how well an image keeps the requested subject, the requested style,
//! and the rest of the prompt (object colour and shape, background). It runs the small CNN that
//! `tools/miniworld/train_evaluator.py` trains on world renders (one softmax head per attribute)
//! and reads scores as the probability of the requested class. Style fidelity comes from texture
//! and palette statistics instead (`texture.rs`), where the evaluator ships them. Deterministic.

use super::texture::{StyleStatistics, StyleStatisticsConfig};

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

#[derive(Debug, Clone, Deserialize)]
struct EvaluatorConfig {
    heads: BTreeMap<String, Vec<String>>,
    input_size: usize,
    #[serde(default)]
    style_statistics: Option<StyleStatisticsConfig>,
}

pub struct MiniworldEvaluator {
    convs: Vec<Conv2d>,
    heads: BTreeMap<String, (Linear, Vec<String>)>,
    input_size: usize,
    style: Option<StyleStatistics>,
    device: Device,
}

/// Scores of one image against its prompt, each in [0, 1]; `None` where the prompt does not ask.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Scores {
    /// P(the requested subject's emblem).
    pub subject: Option<f64>,
    /// P(the requested rendering style), from texture and palette statistics when the evaluator
    /// ships them (else from the CNN's style head).
    pub style: Option<f64>,
    /// Mean P of the requested object colour, shape and background.
    pub alignment: Option<f64>,
    /// The most likely class of every head, for reports.
    pub predicted: BTreeMap<String, String>,
}

/// What a miniworld prompt asks for: head → class, from the words of the prompt.
pub fn requested(prompt: &str, heads: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, String> {
    let clean = crate::lora::extract_prompt_loras(prompt).map(|(p, _)| p).unwrap_or_else(|_| prompt.to_string());
    let words: Vec<String> = clean.to_lowercase().split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect();
    let mut out = BTreeMap::new();
    for (head, classes) in heads {
        let found = match head.as_str() {
            // "<word> style" / "on a <word> background" disambiguate words that could be either.
            "style" => words.windows(2).find(|w| w[1] == "style" && classes.contains(&w[0])).map(|w| w[0].clone()),
            "background" => words.windows(2).find(|w| w[1] == "background" && classes.contains(&w[0])).map(|w| w[0].clone()),
            "subject" => words.iter().find(|w| classes.contains(w) && *w != "none").cloned(),
            _ => {
                let bg: Option<&String> = words.windows(2).find(|w| w[1] == "background").map(|w| &w[0]);
                words.iter().find(|w| classes.contains(w) && Some(*w) != bg).cloned()
            }
        };
        if let Some(f) = found {
            out.insert(head.clone(), f);
        }
    }
    out
}

impl MiniworldEvaluator {
    /// A folder with `model.safetensors` and `config.json` (`models/miniworld/evaluator`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: EvaluatorConfig = serde_json::from_str(&text).map_err(|e| Error::model(&cfg_path, format!("not an evaluator config: {e}")))?;
        let weights = dir.join("model.safetensors");
        let file = SafetensorsFile::open(&weights)?;
        let mut tensors = std::collections::HashMap::new();
        for n in file.names() {
            tensors.insert(n.clone(), file.load(&n)?.to_dtype(DType::F32)?.to_device(device)?);
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let wrap = |e: candle_core::Error| Error::model(&weights, e.to_string());
        let chans = [(3, 32), (32, 64), (64, 64), (64, 128)];
        let convs = chans
            .iter()
            .enumerate()
            .map(|(i, (ci, co))| candle_nn::conv2d(*ci, *co, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb.pp(format!("conv{}", i + 1))))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(wrap)?;
        let mut heads = BTreeMap::new();
        for (name, classes) in &cfg.heads {
            let l = candle_nn::linear(128, classes.len(), vb.pp(format!("heads.{name}"))).map_err(wrap)?;
            heads.insert(name.clone(), (l, classes.clone()));
        }
        let style = cfg.style_statistics.map(|c| StyleStatistics::load(dir, c)).transpose()?;
        Ok(Self { convs, heads, input_size: cfg.input_size, style, device: device.clone() })
    }

    pub fn heads(&self) -> BTreeMap<String, Vec<String>> {
        self.heads.iter().map(|(k, (_, c))| (k.clone(), c.clone())).collect()
    }

    /// The texture/palette style classifier, where the evaluator ships one.
    pub fn style_statistics(&self) -> Option<&StyleStatistics> {
        self.style.as_ref()
    }

    /// Logits per head for `[B, 3, S, S]` pixels in [0, 255].
    pub fn logits(&self, pixels: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let mut x = ((pixels.to_dtype(DType::F32)? / 127.5)? - 1.0)?;
        for (i, c) in self.convs.iter().enumerate() {
            x = c.forward(&x)?.relu()?;
            x = if i + 1 < self.convs.len() { x.max_pool2d(2)? } else { x.mean(D::Minus1)?.mean(D::Minus1)? };
        }
        let mut out = BTreeMap::new();
        for (k, (l, _)) in &self.heads {
            out.insert(k.clone(), l.forward(&x)?);
        }
        Ok(out)
    }

    /// Scores one image against the prompt it was made from.
    pub fn score(&self, img: &image::RgbImage, prompt: &str) -> Result<Scores> {
        let s = self.input_size;
        let img = if img.width() as usize != s || img.height() as usize != s {
            crate::eval::embed::resize_bilinear_pil(img, s, s)
        } else {
            img.clone()
        };
        let mut data = vec![0f32; 3 * s * s];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                data[c * s * s + y as usize * s + x as usize] = p.0[c] as f32;
            }
        }
        let px = Tensor::from_vec(data, (1, 3, s, s), &self.device)?;
        let logits = self.logits(&px)?;
        let want = requested(prompt, &self.heads());
        let mut probs: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut predicted = BTreeMap::new();
        for (k, l) in &logits {
            let p = candle_nn::ops::softmax(&l.squeeze(0)?, 0)?.to_vec1::<f32>()?;
            predicted.insert(k.clone(), most_likely(&p, &self.heads[k].1));
            probs.insert(k.clone(), p);
        }
        let prob = |head: &str| -> Option<f64> {
            let class = want.get(head)?;
            let i = self.heads.get(head)?.1.iter().position(|c| c == class)?;
            Some(probs.get(head)?[i] as f64)
        };
        // Style from the texture statistics where they ship; their classes are their own.
        let style = match &self.style {
            Some(st) => {
                let p = st.probabilities(&img);
                predicted.insert("style".to_string(), most_likely(&p, st.classes()));
                want.get("style").and_then(|class| st.classes().iter().position(|c| c == class)).map(|i| p[i])
            }
            None => prob("style"),
        };
        let parts: Vec<f64> = ["color", "shape", "background"].iter().filter_map(|h| prob(h)).collect();
        Ok(Scores {
            subject: prob("subject"),
            style,
            alignment: (!parts.is_empty()).then(|| parts.iter().sum::<f64>() / parts.len() as f64),
            predicted,
        })
    }
}

/// The class with the highest probability ("" for no classes).
fn most_likely<P: PartialOrd>(p: &[P], classes: &[String]) -> String {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.partial_cmp(b.1).unwrap_or(std::cmp::Ordering::Equal))
        .and_then(|(i, _)| classes.get(i).cloned())
        .unwrap_or_default()
}

/// The prompt stored in one of our (or A1111's) pictures, PNG, JPEG or WebP: the first line of
/// its parameters.
pub fn prompt_from_image(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let info = crate::studio::read_image_info(&bytes).map_err(|e| Error::BadFile { path: path.to_path_buf(), message: e.to_string() })?;
    let text = info.parameters.filter(|p| !p.is_empty()).ok_or_else(|| Error::BadFile { path: path.to_path_buf(), message: "no generation parameters (a PNG's `parameters` chunk, a JPEG's or WebP's EXIF comment; pass --prompt)".into() })?;
    Ok(text.lines().next().unwrap_or("").to_string())
}
