//! `AutoencoderKL` (diffusers `models/autoencoders/autoencoder_kl.py`, `vae.py`): encoder to a
//! diagonal Gaussian over latents, decoder back to pixels. Resnets use eps 1e-6 and the mid
//! block has one single-head self-attention, as in the original LDM VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use loramix_kernels::{group_norm as norm, GroupNormParams};

use super::config::AutoencoderKlConfig;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::adapter::{group_norm, AdaptableConv2d, AdaptableLinear};

const EPS: f64 = 1e-6;

/// The mid block's attention: group norm, single-head attention over pixels, residual.
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNormParams,
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            to_q: AdaptableLinear::new(vb.pp("to_q"), c, c, true)?,
            to_k: AdaptableLinear::new(vb.pp("to_k"), c, c, true)?,
            to_v: AdaptableLinear::new(vb.pp("to_v"), c, c, true)?,
            to_out: AdaptableLinear::new(vb.pp("to_out.0"), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = norm(x, &self.group_norm, false)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let heads = |y: Tensor| y.unsqueeze(1);
        let o = loramix_kernels::scaled_dot_product_attention(
            &heads(self.to_q.forward(&t)?)?,
            &heads(self.to_k.forward(&t)?)?,
            &heads(self.to_v.forward(&t)?)?,
            (c as f64).powf(-0.5),
        )?
        .squeeze(1)?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            resnet_0: ResnetBlock2D::new(vb.pp("resnets.0"), c, c, None, groups, EPS)?,
            attention: if attention { Some(SpatialSelfAttention::new(vb.pp("attentions.0"), c, groups)?) } else { None },
            resnet_1: ResnetBlock2D::new(vb.pp("resnets.1"), c, c, None, groups, EPS)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet_1.forward(&h, None)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: AdaptableConv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNormParams,
    conv_out: AdaptableConv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &AutoencoderKlConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut blocks = Vec::new();
        let mut out_ch = boc[0];
        for i in 0..boc.len() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), if j == 0 { in_ch } else { out_ch }, out_ch, None, g, EPS))
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < boc.len() { Some(Downsample2D::new(vbb.pp("downsamplers.0"), out_ch, 0)?) } else { None };
            blocks.push((resnets, down));
        }
        let top = boc[boc.len() - 1];
        Ok(Self {
            conv_in: AdaptableConv2d::new(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), top, g, c.mid_block_add_attention)?,
            norm_out: group_norm(g, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: AdaptableConv2d::new(vb.pp("conv_out"), top, 2 * c.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&norm(&h, &self.norm_out, true)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: AdaptableConv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNormParams,
    conv_out: AdaptableConv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &AutoencoderKlConfig) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let mut blocks = Vec::new();
        let mut out_ch = rev[0];
        for i in 0..rev.len() {
            let prev = out_ch;
            out_ch = rev[i];
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), if j == 0 { prev } else { out_ch }, out_ch, None, g, EPS))
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < rev.len() { Some(Upsample2D::new(vbb.pp("upsamplers.0"), out_ch)?) } else { None };
            blocks.push((resnets, up));
        }
        let base = c.block_out_channels[0];
        Ok(Self {
            conv_in: AdaptableConv2d::new(vb.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), rev[0], g, c.mid_block_add_attention)?,
            blocks,
            norm_out: group_norm(g, base, EPS, vb.pp("conv_norm_out"))?,
            conv_out: AdaptableConv2d::new(vb.pp("conv_out"), base, c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&norm(&h, &self.norm_out, true)?)
    }
}

/// The encoder's output distribution over latents.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }
    /// `mean + std · noise` with caller-provided standard-normal noise (so sampling is
    /// reproducible and device-independent).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<AdaptableConv2d>,
    post_quant_conv: Option<AdaptableConv2d>,
    config: AutoencoderKlConfig,
}

impl AutoencoderKl {
    pub fn new(vb: VarBuilder, config: &AutoencoderKlConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv { Some(AdaptableConv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?) } else { None },
            post_quant_conv: if config.use_post_quant_conv { Some(AdaptableConv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?) } else { None },
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    /// Pixels in [-1, 1], `[b, 3, H, W]` → distribution over (unscaled) latents.
    pub fn encode(&self, x: &Tensor) -> Result<LatentDistribution> {
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let l = self.config.latent_channels;
        Ok(LatentDistribution { mean: h.narrow(1, 0, l)?, logvar: h.narrow(1, l, l)?.clamp(-30f32, 20f32)? })
    }

    /// Unscaled latents → pixels in (about) [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
