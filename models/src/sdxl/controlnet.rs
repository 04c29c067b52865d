//! `ControlNetModel` as diffusers builds it: a trainable copy of the UNet's encoder half (same
//! embeddings, down blocks and mid block, built by the same code) that also sees a control image
//! through a small convolutional embedding, and hands the UNet one zero-convolution residual per
//! skip connection plus one for the mid block.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::config::UNet2DConditionConfig;
use super::unet::{AddedConditions, ControlResiduals, UNetEncoder};
use crate::adapter::{Adaptable, AdaptableConv2d, AdaptableLayer};

fn three() -> usize {
    3
}
fn rgb() -> String {
    "rgb".into()
}
fn embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// The fields of a ControlNet's `config.json` beyond the UNet's own.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetExtras {
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    #[serde(default = "embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default)]
    pub global_pool_conditions: bool,
}

#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    /// The encoder's shape, in the UNet's terms (its up blocks are never built).
    pub unet: UNet2DConditionConfig,
    pub extras: ControlNetExtras,
}

impl ControlNetConfig {
    /// Reads a diffusers ControlNet `config.json`. It has the UNet's keys but no up blocks; the
    /// mirror of the down blocks is filled in so the UNet's validation applies unchanged.
    pub fn from_json(mut v: serde_json::Value) -> std::result::Result<Self, String> {
        let obj = v.as_object_mut().ok_or("controlnet config: expected a JSON object")?;
        if !obj.contains_key("up_block_types") {
            let down: Vec<String> = obj
                .get("down_block_types")
                .and_then(|d| serde_json::from_value(d.clone()).ok())
                .ok_or("controlnet config: down_block_types is missing or not a list of names")?;
            let up: Vec<String> = down.iter().rev().map(|t| t.replace("Down", "Up")).collect();
            obj.insert("up_block_types".into(), serde_json::json!(up));
        }
        let unet: UNet2DConditionConfig = serde_json::from_value(v.clone()).map_err(|e| format!("controlnet config: {e}"))?;
        let extras: ControlNetExtras = serde_json::from_value(v).map_err(|e| format!("controlnet config: {e}"))?;
        let cfg = Self { unet, extras };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.unet.validate().map_err(|e| e.replacen("unet config", "controlnet config", 1))?;
        let e = &self.extras;
        if e.conditioning_channels != 3 {
            return Err(format!("controlnet config: conditioning_channels {} is not supported (3: an RGB control image)", e.conditioning_channels));
        }
        if e.conditioning_embedding_out_channels.is_empty() {
            return Err("controlnet config: conditioning_embedding_out_channels is empty".into());
        }
        if e.controlnet_conditioning_channel_order != "rgb" && e.controlnet_conditioning_channel_order != "bgr" {
            return Err(format!(
                "controlnet config: controlnet_conditioning_channel_order {:?} is not \"rgb\" or \"bgr\"",
                e.controlnet_conditioning_channel_order
            ));
        }
        Ok(())
    }

    /// Pixels of the control image per latent along each side: the embedding's stride-2 steps.
    pub fn downscale(&self) -> usize {
        1 << (self.extras.conditioning_embedding_out_channels.len() - 1)
    }
}

/// `controlnet_cond_embedding`: the control image down to the latent's size and the first
/// block's width.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: AdaptableConv2d,
    blocks: Vec<AdaptableConv2d>,
    conv_out: AdaptableConv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, in_ch: usize, channels: &[usize], out_ch: usize) -> Result<Self> {
        let conv_in = AdaptableConv2d::new(vb.pp("conv_in"), in_ch, channels[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, w) in channels.windows(2).enumerate() {
            blocks.push(AdaptableConv2d::new(vb.pp(format!("blocks.{}", 2 * i)), w[0], w[0], 3, 1, 1)?);
            blocks.push(AdaptableConv2d::new(vb.pp(format!("blocks.{}", 2 * i + 1)), w[0], w[1], 3, 2, 1)?);
        }
        let conv_out = AdaptableConv2d::new(vb.pp("conv_out"), channels[channels.len() - 1], out_ch, 3, 1, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?.silu()?;
        for b in &self.blocks {
            h = b.forward(&h)?.silu()?;
        }
        self.conv_out.forward(&h)
    }
}

/// What the ControlNet is asked to follow at a step: the control image `[b, 3, H, W]` in
/// [0, 1] at the latent's size times [`ControlNetConfig::downscale`], its weight (diffusers'
/// `conditioning_scale`, A1111's "Control Weight") and diffusers' `guess_mode`.
#[derive(Debug, Clone, Copy)]
pub struct ControlInput<'a> {
    pub image: &'a Tensor,
    pub scale: f64,
    /// The residuals scaled from 0.1 at the first skip to 1 at the mid block
    /// (`torch.logspace(-1, 0, n + 1)`), unless the model pools them.
    pub guess: bool,
    /// sd-webui-controlnet's soft injection: residual k (the mid block's last) scaled by
    /// `0.825^(12 - k)`, as the extension computes it for SD 1.5's 13 and SDXL's first 10.
    pub soft: bool,
}

#[derive(Debug, Clone)]
pub struct ControlNetModel {
    encoder: UNetEncoder,
    cond_embedding: ConditioningEmbedding,
    down_zero_convs: Vec<AdaptableConv2d>,
    mid_zero_conv: AdaptableConv2d,
    config: ControlNetConfig,
}

impl ControlNetModel {
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let c = &config.unet;
        let boc = &c.block_out_channels;
        let encoder = UNetEncoder::new(vb.clone(), c)?;
        let e = &config.extras;
        let cond_embedding =
            ConditioningEmbedding::new(vb.pp("controlnet_cond_embedding"), e.conditioning_channels, &e.conditioning_embedding_out_channels, boc[0])?;
        // One residual per skip connection, with that skip's width.
        let mut widths = vec![boc[0]];
        for (i, &ch) in boc.iter().enumerate() {
            widths.extend(std::iter::repeat_n(ch, c.layers_per_block));
            if i + 1 < boc.len() {
                widths.push(ch);
            }
        }
        let down_zero_convs = widths
            .iter()
            .enumerate()
            .map(|(i, &ch)| AdaptableConv2d::new(vb.pp(format!("controlnet_down_blocks.{i}")), ch, ch, 1, 1, 0))
            .collect::<Result<Vec<_>>>()?;
        let top = boc[boc.len() - 1];
        let mid_zero_conv = AdaptableConv2d::new(vb.pp("controlnet_mid_block"), top, top, 1, 1, 0)?;
        Ok(Self { encoder, cond_embedding, down_zero_convs, mid_zero_conv, config: config.clone() })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// Whether the pipeline must run this model in guess mode (diffusers:
    /// `guess_mode or controlnet.config.global_pool_conditions`).
    pub fn needs_guess_mode(&self) -> bool {
        self.config.extras.global_pool_conditions
    }

    /// The residuals for `sample` (the UNet's scaled input, `[b, 4, h, w]`) under `control`.
    pub fn forward(&self, sample: &Tensor, t: f32, context: &Tensor, added: Option<&AddedConditions>, control: ControlInput) -> Result<ControlResiduals> {
        loramix_kernels::on_pool(|| self.forward_on_pool(sample, t, context, added, control))
    }

    fn forward_on_pool(&self, sample: &Tensor, t: f32, context: &Tensor, added: Option<&AddedConditions>, control: ControlInput) -> Result<ControlResiduals> {
        let ControlInput { image: cond, scale, guess, soft } = control;
        let c = &self.config.unet;
        let (b, _, h, w) = sample.dims4()?;
        let (dtype, dev) = (sample.dtype(), sample.device());
        let f = self.config.downscale();
        let (_, _, ch, cw) = cond.dims4()?;
        if (ch, cw) != (h * f, w * f) {
            return Err(candle_core::Error::Msg(format!(
                "controlnet: the control image is {cw}x{ch}; this latent needs {}x{} (the ControlNet embeds 1/{f} of it)",
                w * f,
                h * f
            )));
        }
        let cond = if self.config.extras.controlnet_conditioning_channel_order == "bgr" {
            Tensor::cat(&[cond.narrow(1, 2, 1)?, cond.narrow(1, 1, 1)?, cond.narrow(1, 0, 1)?], 1)?
        } else {
            cond.clone()
        };
        let emb = self.encoder.embed(c, b, t, dtype, dev, added)?;
        let context = context.to_dtype(dtype)?;
        let x = (self.encoder.conv_in.forward(sample)? + self.cond_embedding.forward(&cond.to_dtype(dtype)?)?)?;
        let (x, skips, _) = self.encoder.down(x, &emb, &context, &[])?;
        let x = self.encoder.mid(&x, &emb, &context)?;
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.config.extras.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let n = skips.len();
        let scales: Vec<f64> = if soft {
            (0..=n).map(|k| scale * 0.825f64.powf(12.0 - k as f64)).collect()
        } else if guess && !self.config.extras.global_pool_conditions {
            // torch.logspace in f32, as diffusers computes it.
            (0..=n).map(|k| (10f32.powf(-1.0 + k as f32 / n as f32)) as f64 * scale).collect()
        } else {
            vec![scale; n + 1]
        };
        let down = skips
            .iter()
            .zip(&self.down_zero_convs)
            .zip(&scales)
            .map(|((s, z), &k)| pool((z.forward(s)? * k)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool((self.mid_zero_conv.forward(&x)? * scales[n])?)?;
        Ok(ControlResiduals { down, mid: Some(mid), intrablock: Vec::new() })
    }
}

impl Adaptable for ControlNetModel {
    /// Listed so seamless tiling reaches its convolutions too; no LoRA targets a ControlNet.
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.encoder.collect_adaptable(out);
        self.cond_embedding.conv_in.collect_adaptable(out);
        for b in &self.cond_embedding.blocks {
            b.collect_adaptable(out);
        }
        self.cond_embedding.conv_out.collect_adaptable(out);
        for z in &self.down_zero_convs {
            z.collect_adaptable(out);
        }
        self.mid_zero_conv.collect_adaptable(out);
    }
}
