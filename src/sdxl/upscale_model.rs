//! ESRGAN-family upscaler models (RRDBNet: ESRGAN, Real-ESRGAN x4plus / x2plus, and community
//! models such as 4x-UltraSharp) from `.safetensors`, used as A1111 uses them: hires fix's
//! "Hires upscaler" and `images.resize_image`.
//!
//! Following A1111 (`modules/upscaler_utils.py` `upscale_pil_patch` and `upscale_with_model`,
//! `modules/images.py` `split_grid` / `combine_grid`, `modules/upscaler.py` `Upscaler.upscale`):
//! the image goes in as RGB in [0, 1], the output is clamped and truncated to 8 bits
//! (torchvision's `ToPILImage`), the model runs on overlapping tiles blended with PIL's 8-bit
//! paste masks, and the model is applied until the image reaches the target, then Lanczos makes
//! the exact size. Pickled `.pth` models are refused like every pickle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use loramix_models::esrgan::{RrdbNet, RrdbNetConfig};

use crate::error::{Error, Result};
use crate::sdxl::img2img;
use crate::sdxl::tile_grid::{combine_grid, split_grid};
use crate::weights::SafetensorsFile;

/// A1111's defaults for these models: `ESRGAN_tile` and `ESRGAN_tile_overlap`.
pub const TILE: usize = 192;
pub const TILE_OVERLAP: usize = 8;

pub struct UpscaleModel {
    net: RrdbNet,
    /// The file stem: what A1111 lists the model as and writes in `Hires upscaler`.
    pub name: String,
    pub path: PathBuf,
    device: Device,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile { path: path.to_path_buf(), message: message.into() }
}

/// basicsr names for the original ESRGAN layout's `model.N…` keys.
fn from_original_names(keys: &[String], path: &Path) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    // The trunk convolution is the one `model.1.sub.N` entry that is not a dense block.
    let mut tail: Vec<usize> = Vec::new();
    for k in keys {
        let Some(rest) = k.strip_prefix("model.") else { continue };
        let (idx, param) = rest.split_once('.').ok_or_else(|| bad(path, format!("tensor {k}: unexpected name")))?;
        if idx == "0" {
            map.insert(k.clone(), format!("conv_first.{param}"));
        } else if idx == "1" {
            let sub = param.strip_prefix("sub.").ok_or_else(|| bad(path, format!("tensor {k}: unexpected name")))?;
            let (block, inner) = sub.split_once('.').ok_or_else(|| bad(path, format!("tensor {k}: unexpected name")))?;
            match inner.strip_prefix("RDB") {
                // RDB{r}.conv{c}.0.{weight,bias}
                Some(r) => {
                    let parts: Vec<&str> = r.split('.').collect();
                    if parts.len() != 4 || parts[2] != "0" {
                        return Err(bad(path, format!("tensor {k}: unexpected name")));
                    }
                    map.insert(k.clone(), format!("body.{block}.rdb{}.{}.{}", parts[0], parts[1], parts[3]));
                }
                None => {
                    map.insert(k.clone(), format!("conv_body.{inner}"));
                }
            }
        } else if let Ok(n) = idx.parse::<usize>() {
            if !tail.contains(&n) {
                tail.push(n);
            }
        }
    }
    tail.sort_unstable();
    if tail.len() < 2 {
        return Err(bad(path, "original-layout ESRGAN without its HR and last convolutions (model.N after the trunk)"));
    }
    let names: Vec<String> = (0..tail.len() - 2)
        .map(|i| format!("conv_up{}", i + 1))
        .chain(["conv_hr".to_string(), "conv_last".to_string()])
        .collect();
    for k in keys {
        if let Some((idx, param)) = k.strip_prefix("model.").and_then(|r| r.split_once('.')) {
            if let Some(pos) = idx.parse::<usize>().ok().and_then(|n| tail.iter().position(|&t| t == n)) {
                map.insert(k.clone(), format!("{}.{param}", names[pos]));
            }
        }
    }
    Ok(map)
}

impl UpscaleModel {
    /// Loads an RRDBNet upscaler, its size and scale read from the tensors' shapes.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        // Real-ESRGAN checkpoints nest their weights under `params_ema` (or `params`).
        let strip = |k: &str| -> String {
            let mut k = k;
            for p in ["params_ema.", "params.", "module."] {
                k = k.strip_prefix(p).unwrap_or(k);
            }
            k.to_string()
        };
        let stored = file.names();
        let keys: Vec<String> = stored.iter().map(|k| strip(k)).collect();
        if keys.iter().any(|k| k.contains("conv1x1")) {
            return Err(bad(path, "an ESRGAN+ model (dense blocks with 1×1 convolutions); only plain RRDBNet (ESRGAN, Real-ESRGAN) is supported"));
        }
        let rename: HashMap<String, String> = if keys.iter().any(|k| k == "conv_first.weight") {
            keys.iter().map(|k| (k.clone(), k.clone())).collect()
        } else if keys.iter().any(|k| k == "model.0.weight") && keys.iter().any(|k| k.starts_with("model.1.sub.")) {
            from_original_names(&keys, path)?
        } else {
            let some: Vec<&str> = keys.iter().take(4).map(String::as_str).collect();
            return Err(bad(
                path,
                format!(
                    "not an RRDBNet upscaler (ESRGAN / Real-ESRGAN): expected tensors `conv_first.*` (Real-ESRGAN names) or `model.0.*` (original ESRGAN names), found {}{}",
                    some.join(", "),
                    if keys.len() > 4 { ", …" } else { "" }
                ),
            ));
        };
        let mut tensors = HashMap::new();
        for (orig, k) in stored.iter().zip(&keys) {
            if let Some(new) = rename.get(k) {
                tensors.insert(new.clone(), file.load(orig)?.to_dtype(DType::F32)?);
            }
        }
        let shape = |k: &str| -> Result<Vec<usize>> {
            tensors.get(k).map(|t| t.dims().to_vec()).ok_or_else(|| bad(path, format!("tensor {k} is missing")))
        };
        let first = shape("conv_first.weight")?;
        let last = shape("conv_last.weight")?;
        let (features, in_total, out_channels) = (first[0], first[1], last[0]);
        let unshuffle = [1usize, 2, 4]
            .into_iter()
            .find(|u| in_total == out_channels * u * u)
            .ok_or_else(|| bad(path, format!("conv_first takes {in_total} channels and conv_last gives {out_channels}: not an RRDBNet layout we know")))?;
        let blocks = (0..).take_while(|i| tensors.contains_key(&format!("body.{i}.rdb1.conv1.weight"))).count();
        let upsamples = (1..).take_while(|i| tensors.contains_key(&format!("conv_up{i}.weight"))).count();
        let growth = shape("body.0.rdb1.conv1.weight")?[0];
        let config = RrdbNetConfig { in_channels: in_total / (unshuffle * unshuffle), out_channels, features, blocks, growth, upsamples, unshuffle };
        if config.in_channels != 3 || out_channels != 3 {
            return Err(bad(path, format!("an upscaler for {} → {} channels; hires fix needs RGB (3 → 3)", config.in_channels, out_channels)));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let net = RrdbNet::new(vb, &config).map_err(|e| bad(path, format!("RRDBNet weights: {e}")))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        Ok(Self { net, name, path: path.to_path_buf(), device: device.clone() })
    }

    pub fn scale(&self) -> f64 {
        self.net.config().scale()
    }

    pub fn config(&self) -> &RrdbNetConfig {
        self.net.config()
    }

    /// The model's raw output for an 8-bit image, `[1, 3, h·s, w·s]` (before clamping).
    pub fn forward_image(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        let x = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?.to_device(&self.device)?;
        Ok(self.net.forward(&x)?)
    }

    /// A1111's `upscale_pil_patch`: one pass, clamped to [0, 1], ×255 truncated to 8 bits.
    pub fn upscale_patch(&self, img: &RgbImage) -> Result<RgbImage> {
        let y = self.forward_image(img)?.squeeze(0)?.clamp(0f32, 1f32)?;
        let (_, oh, ow) = y.dims3()?;
        let v: Vec<f32> = y.permute((1, 2, 0))?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().map(|&x| (x * 255.0) as u8).collect();
        RgbImage::from_raw(ow as u32, oh as u32, bytes).ok_or_else(|| Error::Argument("upscaler output has the wrong size".into()))
    }

    /// A1111's `upscale_with_model`: overlapping tiles of `tile` pixels (0: the whole image).
    pub fn upscale_tiled(&self, img: &RgbImage, tile: usize, overlap: usize) -> Result<RgbImage> {
        if tile == 0 {
            return self.upscale_patch(img);
        }
        if overlap >= tile {
            return Err(Error::Argument(format!("upscaler tile overlap {overlap} must be smaller than the tile ({tile})")));
        }
        let grid = split_grid(img, tile, tile, overlap);
        let mut scale = 1usize;
        let mut rows = Vec::with_capacity(grid.len());
        for (y, h, row) in grid {
            let mut out_row = Vec::with_capacity(row.len());
            for (x, w, t) in row {
                let o = self.upscale_patch(&t)?;
                scale = (o.width() / t.width()) as usize;
                out_row.push((x * scale as i64, w * scale, o));
            }
            rows.push((y * scale as i64, h * scale, out_row));
        }
        Ok(combine_grid(&rows, tile * scale, img.width() as usize * scale, img.height() as usize * scale, overlap * scale))
    }

    /// A1111's `Upscaler.upscale` then `resize_image`'s final resize: the model applied (tiled)
    /// until the image is at least `scale ×` its size rounded down to 8 pixels (at most three
    /// times), Lanczos to that size, and Lanczos to exactly `width × height`.
    pub fn upscale_to(&self, img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
        img2img::upscale_with(img, width, height, |im, _| self.upscale_tiled(im, TILE, TILE_OVERLAP))
    }

    /// A1111's `Upscaler.upscale(img, scale)` with this model (the "SD upscale" script's).
    pub fn upscale_by(&self, img: &RgbImage, scale: f64) -> Result<RgbImage> {
        img2img::a1111_upscale(img, scale, |im, _| self.upscale_tiled(im, TILE, TILE_OVERLAP))
    }
}

