//! The tiny autoencoder's decoder (diffusers `AutoencoderTiny`, TAESD / TAESDXL): a stack of plain
//! 3×3 convolutions, residual blocks and nearest upsampling that turns UNet-space latents into an
//! approximate image for a tiny fraction of the real VAE's cost — used for per-step previews.
//! Weight names mirror diffusers (`decoder.layers.{i}...`, indices as in its `nn.Sequential`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, conv2d_no_bias, Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

fn d_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn d_channels() -> Vec<usize> {
    vec![64, 64, 64, 64]
}
fn d_four() -> usize {
    4
}
fn d_three() -> usize {
    3
}
fn d_two() -> usize {
    2
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}

/// The fields of diffusers' `AutoencoderTiny` config the decoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct TinyDecoderConfig {
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default = "d_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "d_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "d_relu")]
    pub act_fn: String,
    #[serde(default = "d_nearest")]
    pub upsample_fn: String,
}

struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl TinyBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        let s = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        (h + s)?.relu()
    }
}

enum Layer {
    Conv(Conv2d),
    Relu,
    Block(TinyBlock),
    Upsample(usize),
}

pub struct TinyDecoder {
    layers: Vec<Layer>,
}

impl TinyDecoder {
    /// `vb` at the model root (the decoder lives under `decoder.`).
    pub fn new(vb: VarBuilder, cfg: &TinyDecoderConfig) -> Result<Self> {
        if cfg.act_fn != "relu" || cfg.upsample_fn != "nearest" {
            candle_core::bail!("tiny autoencoder with act_fn {:?} / upsample_fn {:?}: only relu / nearest are supported", cfg.act_fn, cfg.upsample_fn);
        }
        if cfg.num_decoder_blocks.len() != cfg.decoder_block_out_channels.len() || cfg.num_decoder_blocks.is_empty() {
            candle_core::bail!("num_decoder_blocks and decoder_block_out_channels must be non-empty and of equal length");
        }
        let vb = vb.pp("decoder.layers");
        let pad = Conv2dConfig { padding: 1, ..Default::default() };
        let mut layers = vec![];
        let mut idx = 0;
        let mut next = || {
            idx += 1;
            idx - 1
        };
        let ch0 = cfg.decoder_block_out_channels[0];
        layers.push(Layer::Conv(conv2d(cfg.latent_channels, ch0, 3, pad, vb.pp(next()))?));
        layers.push(Layer::Relu);
        next();
        let last = cfg.num_decoder_blocks.len() - 1;
        for (i, (&n, &ch)) in cfg.num_decoder_blocks.iter().zip(&cfg.decoder_block_out_channels).enumerate() {
            for _ in 0..n {
                let b = vb.pp(next());
                let c = b.pp("conv");
                layers.push(Layer::Block(TinyBlock {
                    convs: [conv2d(ch, ch, 3, pad, c.pp(0))?, conv2d(ch, ch, 3, pad, c.pp(2))?, conv2d(ch, ch, 3, pad, c.pp(4))?],
                    skip: None,
                }));
            }
            if i != last {
                next();
                layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
            }
            let out = if i == last { cfg.out_channels } else { ch };
            let conv = if i == last { conv2d(ch, out, 3, pad, vb.pp(next()))? } else { conv2d_no_bias(ch, out, 3, pad, vb.pp(next()))? };
            layers.push(Layer::Conv(conv));
        }
        Ok(Self { layers })
    }

    /// UNet-space latents `[b, c, h, w]` → image in [-1, 1] (approximately) at 8× the size.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = ((z / 3.0)?.tanh()? * 3.0)?;
        for l in &self.layers {
            x = match l {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Relu => x.relu()?,
                Layer::Block(b) => b.forward(&x)?,
                Layer::Upsample(f) => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(h * f, w * f)?
                }
            };
        }
        (x * 2.0)? - 1.0
    }
}
