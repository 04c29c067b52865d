//! `T2IAdapter` as diffusers builds it (`full_adapter`, `full_adapter_xl`, `light_adapter`): a
//! small convolutional network that turns a control image into one feature map per UNet level,
//! which the UNet adds inside its down blocks (`down_intrablock_additional_residuals`). Unlike a
//! ControlNet it does not see the latent or the timestep, so a generation runs it once.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::adapter::{Adaptable, AdaptableConv2d, AdaptableLayer};

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn eight() -> usize {
    8
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn full() -> String {
    "full_adapter".into()
}

/// A T2I-Adapter's `config.json`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct T2IAdapterConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
    #[serde(default = "two")]
    pub num_res_blocks: usize,
    #[serde(default = "eight")]
    pub downscale_factor: usize,
    #[serde(default = "full")]
    pub adapter_type: String,
}

impl T2IAdapterConfig {
    pub fn from_json(v: serde_json::Value) -> std::result::Result<Self, String> {
        let c: Self = serde_json::from_value(v).map_err(|e| format!("t2i-adapter config: {e}"))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let ch = &self.channels;
        if ch.is_empty() || ch.contains(&0) {
            return Err(format!("t2i-adapter config: channels {ch:?} must be a non-empty list of positive widths"));
        }
        if self.in_channels != 1 && self.in_channels != 3 {
            return Err(format!("t2i-adapter config: in_channels {} is not supported (1: a grey map, 3: an RGB map)", self.in_channels));
        }
        if self.downscale_factor == 0 || self.num_res_blocks == 0 {
            return Err("t2i-adapter config: downscale_factor and num_res_blocks must be positive".into());
        }
        match self.adapter_type.as_str() {
            "full_adapter" | "light_adapter" => Ok(()),
            // diffusers' `FullAdapterXL` feeds block i ≥ 3 its own width: a wider one cannot run.
            "full_adapter_xl" => match ch.iter().enumerate().skip(3).find(|&(i, &c)| c != ch[i - 1]) {
                Some((i, _)) => Err(format!("t2i-adapter config: full_adapter_xl needs channels[{i}] equal to channels[{}], got {ch:?}", i - 1)),
                None => Ok(()),
            },
            other => Err(format!("t2i-adapter config: adapter_type {other:?} is not full_adapter, full_adapter_xl or light_adapter")),
        }
    }

    /// How many pixels of the control image make one pixel of the smallest feature map
    /// (diffusers' `total_downscale_factor`; its pipelines round a size they pick to it). Sides
    /// need only be multiples of `downscale_factor`: the 2× pools round up, as the UNet's
    /// downsamplers do.
    pub fn total_downscale(&self) -> usize {
        let n = self.channels.len() as u32;
        match self.adapter_type.as_str() {
            "full_adapter_xl" => self.downscale_factor * 2,
            "light_adapter" => self.downscale_factor << n,
            _ => self.downscale_factor << (n - 1),
        }
    }
}

/// `nn.AvgPool2d(2, 2, ceil_mode=True)`: an odd side's last window averages the pixels it has,
/// which is a 2×2 mean after repeating the last row or column.
fn half(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = if h % 2 == 1 { Tensor::cat(&[x, &x.narrow(2, h - 1, 1)?], 2)? } else { x.clone() };
    let x = if w % 2 == 1 { Tensor::cat(&[&x, &x.narrow(3, w - 1, 1)?], 3)? } else { x };
    x.avg_pool2d(2)
}

/// `nn.PixelUnshuffle(f)`: output channel `c·f² + i·f + j` is input channel `c` at row offset
/// `i`, column offset `j` of each `f×f` cell.
fn pixel_unshuffle(x: &Tensor, f: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % f != 0 || w % f != 0 {
        return Err(candle_core::Error::Msg(format!("t2i-adapter: the control image is {w}x{h}; its sides must be multiples of {f}")));
    }
    x.reshape((b, c, h / f, f, w / f, f))?.permute((0, 1, 3, 5, 2, 4))?.reshape((b, c * f * f, h / f, w / f))
}

/// `AdapterResnetBlock` (3×3 then 1×1) or `LightAdapterResnetBlock` (3×3 then 3×3), with a skip.
#[derive(Debug, Clone)]
struct ResnetBlock {
    block1: AdaptableConv2d,
    block2: AdaptableConv2d,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, ch: usize, second_kernel: usize) -> Result<Self> {
        Ok(Self {
            block1: AdaptableConv2d::new(vb.pp("block1"), ch, ch, 3, 1, 1)?,
            block2: AdaptableConv2d::new(vb.pp("block2"), ch, ch, second_kernel, 1, second_kernel / 2)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block2.forward(&self.block1.forward(x)?.relu()?)?;
        h + x
    }
}

/// `AdapterBlock` (an optional 1×1 width change) or `LightAdapterBlock` (1×1 down to a quarter
/// of the width, resnets, 1×1 back up), after an optional 2× average pool.
#[derive(Debug, Clone)]
struct AdapterBlock {
    down: bool,
    in_conv: Option<AdaptableConv2d>,
    resnets: Vec<ResnetBlock>,
    out_conv: Option<AdaptableConv2d>,
}

impl AdapterBlock {
    fn full(vb: VarBuilder, in_ch: usize, out_ch: usize, res: usize, down: bool) -> Result<Self> {
        let in_conv = if in_ch != out_ch { Some(AdaptableConv2d::new(vb.pp("in_conv"), in_ch, out_ch, 1, 1, 0)?) } else { None };
        let resnets = (0..res).map(|j| ResnetBlock::new(vb.pp(format!("resnets.{j}")), out_ch, 1)).collect::<Result<Vec<_>>>()?;
        Ok(Self { down, in_conv, resnets, out_conv: None })
    }

    fn light(vb: VarBuilder, in_ch: usize, out_ch: usize, res: usize, down: bool) -> Result<Self> {
        let mid = out_ch / 4;
        let in_conv = Some(AdaptableConv2d::new(vb.pp("in_conv"), in_ch, mid, 1, 1, 0)?);
        let resnets = (0..res).map(|j| ResnetBlock::new(vb.pp(format!("resnets.{j}")), mid, 3)).collect::<Result<Vec<_>>>()?;
        let out_conv = Some(AdaptableConv2d::new(vb.pp("out_conv"), mid, out_ch, 1, 1, 0)?);
        Ok(Self { down, in_conv, resnets, out_conv })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = if self.down { half(x)? } else { x.clone() };
        if let Some(c) = &self.in_conv {
            x = c.forward(&x)?;
        }
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.out_conv {
            Some(c) => c.forward(&x),
            None => Ok(x),
        }
    }
}

#[derive(Debug, Clone)]
pub struct T2IAdapter {
    conv_in: Option<AdaptableConv2d>,
    body: Vec<AdapterBlock>,
    config: T2IAdapterConfig,
}

impl T2IAdapter {
    /// `vb` at the adapter's root (its tensors are `adapter.*`).
    pub fn new(vb: VarBuilder, config: &T2IAdapterConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let vb = vb.pp("adapter");
        let ch = &config.channels;
        let res = config.num_res_blocks;
        let unshuffled = config.in_channels * config.downscale_factor * config.downscale_factor;
        let block = |i: usize| vb.pp(format!("body.{i}"));
        let (conv_in, body) = match config.adapter_type.as_str() {
            "light_adapter" => {
                let mut body = vec![AdapterBlock::light(block(0), unshuffled, ch[0], res, false)?];
                for i in 1..ch.len() {
                    body.push(AdapterBlock::light(block(i), ch[i - 1], ch[i], res, true)?);
                }
                body.push(AdapterBlock::light(block(ch.len()), ch[ch.len() - 1], ch[ch.len() - 1], res, true)?);
                (None, body)
            }
            ty => {
                let conv_in = AdaptableConv2d::new(vb.pp("conv_in"), unshuffled, ch[0], 3, 1, 1)?;
                let xl = ty == "full_adapter_xl";
                let mut body = Vec::with_capacity(ch.len());
                for i in 0..ch.len() {
                    // XL: one downsampling block (the third), so two features per UNet
                    // resolution; the plain adapter halves at every block after the first.
                    body.push(match (xl, i) {
                        (_, 0) => AdapterBlock::full(block(0), ch[0], ch[0], res, false)?,
                        (true, 1) => AdapterBlock::full(block(1), ch[0], ch[1], res, false)?,
                        (true, 2) => AdapterBlock::full(block(2), ch[1], ch[2], res, true)?,
                        (true, _) => AdapterBlock::full(block(i), ch[i], ch[i], res, false)?,
                        (false, _) => AdapterBlock::full(block(i), ch[i - 1], ch[i], res, true)?,
                    });
                }
                (Some(conv_in), body)
            }
        };
        Ok(Self { conv_in, body, config: config.clone() })
    }

    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// One feature map per block for `image` (`[b, in_channels, H, W]` in [0, 1]), unscaled.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        loramix_kernels::on_pool(|| {
            let (_, c, _, _) = image.dims4()?;
            if c != self.config.in_channels {
                return Err(candle_core::Error::Msg(format!("t2i-adapter: the control image has {c} channels; this adapter takes {}", self.config.in_channels)));
            }
            let mut x = pixel_unshuffle(image, self.config.downscale_factor)?;
            if let Some(c) = &self.conv_in {
                x = c.forward(&x)?;
            }
            let mut features = Vec::with_capacity(self.body.len());
            for b in &self.body {
                x = b.forward(&x)?;
                features.push(x.clone());
            }
            Ok(features)
        })
    }
}

impl Adaptable for T2IAdapter {
    /// Listed so seamless tiling reaches its convolutions too; no LoRA targets an adapter.
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv_in.collect_adaptable(out);
        for b in &self.body {
            b.in_conv.collect_adaptable(out);
            for r in &b.resnets {
                r.block1.collect_adaptable(out);
                r.block2.collect_adaptable(out);
            }
            b.out_conv.collect_adaptable(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn pixel_unshuffle_orders_channels_as_torch() {
        // One channel, 4x4, f = 2: channel i·2 + j holds the pixels at (2y + i, 2x + j).
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 4, 2, 2]);
        let v: Vec<Vec<Vec<f32>>> = y.squeeze(0).unwrap().to_vec3().unwrap();
        assert_eq!(v[0], vec![vec![0.0, 2.0], vec![8.0, 10.0]]);
        assert_eq!(v[1], vec![vec![1.0, 3.0], vec![9.0, 11.0]]);
        assert_eq!(v[2], vec![vec![4.0, 6.0], vec![12.0, 14.0]]);
        assert_eq!(v[3], vec![vec![5.0, 7.0], vec![13.0, 15.0]]);
        assert!(pixel_unshuffle(&Tensor::zeros((1, 1, 5, 4), DType::F32, &Device::Cpu).unwrap(), 2).is_err());
    }

    #[test]
    fn ceil_mode_pool_averages_what_a_window_has() {
        let x = Tensor::arange(0f32, 9.0, &Device::Cpu).unwrap().reshape((1, 1, 3, 3)).unwrap();
        let v: Vec<Vec<f32>> = half(&x).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        // [[0,1,2],[3,4,5],[6,7,8]]: windows {0,1,3,4}, {2,5}, {6,7}, {8}.
        assert_eq!(v, vec![vec![2.0, 3.5], vec![6.5, 8.0]]);
    }

    #[test]
    fn downscale_factors_follow_diffusers() {
        let c = |ty: &str, n: usize| T2IAdapterConfig { in_channels: 3, channels: vec![320; n], num_res_blocks: 2, downscale_factor: 8, adapter_type: ty.into() };
        assert_eq!(c("full_adapter", 4).total_downscale(), 64);
        assert_eq!(c("full_adapter_xl", 4).total_downscale(), 16);
        assert_eq!(c("light_adapter", 3).total_downscale(), 64);
        assert!(c("other", 4).validate().is_err());
        let wide = T2IAdapterConfig { channels: vec![320, 640, 1280, 2560], ..c("full_adapter_xl", 4) };
        assert!(wide.validate().unwrap_err().contains("channels[3]"));
    }
}
