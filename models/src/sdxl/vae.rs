//! `AutoencoderKL` (diffusers `models/autoencoders/autoencoder_kl.py`, `vae.py`): encoder to a
//! diagonal Gaussian over latents, decoder back to pixels. Resnets use eps 1e-6 and the mid
//! block has one single-head self-attention, as in the original LDM VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use loramix_kernels::{group_norm as norm, GroupNormParams};

use super::config::AutoencoderKlConfig;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::adapter::{group_norm, Adaptable, AdaptableConv2d, AdaptableLayer, AdaptableLinear};

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

// The VAE lists its layers for the conv-border setting ([`crate::adapter::set_seamless`]);
// LoRA loaders only ever walk the UNet, so these layers never take adapters.
impl Adaptable for SpatialSelfAttention {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            l.collect_adaptable(out);
        }
    }
}

impl Adaptable for MidBlock {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.resnet_0.collect_adaptable(out);
        self.attention.collect_adaptable(out);
        self.resnet_1.collect_adaptable(out);
    }
}

impl Adaptable for Encoder {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv_in.collect_adaptable(out);
        for (resnets, down) in &self.blocks {
            resnets.collect_adaptable(out);
            down.collect_adaptable(out);
        }
        self.mid.collect_adaptable(out);
        self.conv_out.collect_adaptable(out);
    }
}

impl Adaptable for Decoder {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv_in.collect_adaptable(out);
        self.mid.collect_adaptable(out);
        for (resnets, up) in &self.blocks {
            resnets.collect_adaptable(out);
            up.collect_adaptable(out);
        }
        self.conv_out.collect_adaptable(out);
    }
}

impl Adaptable for AutoencoderKl {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.encoder.collect_adaptable(out);
        self.quant_conv.collect_adaptable(out);
        self.post_quant_conv.collect_adaptable(out);
        self.decoder.collect_adaptable(out);
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
        self.distribution(&self.moments(x)?)
    }

    /// The encoder's (and quant conv's) output: means and log-variances side by side.
    fn moments(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(x)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }

    fn distribution(&self, h: &Tensor) -> Result<LatentDistribution> {
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

    /// [`Self::encode`] in overlapping tiles when the image is larger than a tile, as diffusers'
    /// `AutoencoderKL` with `enable_tiling()` (`_tiled_encode`).
    pub fn encode_tiled(&self, x: &Tensor, tiling: &VaeTiling) -> Result<LatentDistribution> {
        let (_, _, h, w) = x.dims4()?;
        if w <= tiling.sample_tile && h <= tiling.sample_tile {
            return self.encode(x);
        }
        let plan = tiling.plan(tiling.sample_tile, tiling.latent_tile)?;
        self.distribution(&plan.run(x, |tile| self.moments(tile))?)
    }

    /// [`Self::decode`] in overlapping tiles when the latents are larger than a tile, as
    /// diffusers' `tiled_decode`.
    pub fn decode_tiled(&self, z: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        if w <= tiling.latent_tile && h <= tiling.latent_tile {
            return self.decode(z);
        }
        let plan = tiling.plan(tiling.latent_tile, tiling.sample_tile)?;
        plan.run(z, |tile| self.decode(tile))
    }
}

/// diffusers' `enable_tiling()` settings. Why tiles: the decoder's last blocks hold several
/// full-resolution tensors of 128–256 channels (about 1 GB each at 1024² in f32); a tile bounds
/// that by its own size, at the price of GroupNorm statistics taken per tile (hence the blend).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile side in pixels (diffusers' `tile_sample_min_size`).
    pub sample_tile: usize,
    /// Tile side in latents (`tile_latent_min_size`).
    pub latent_tile: usize,
    /// Share of a tile blended with its neighbours (`tile_overlap_factor`).
    pub overlap: f64,
}

impl VaeTiling {
    /// diffusers' defaults for this VAE: tiles of the config's `sample_size` (32 when absent, as
    /// diffusers' default), a quarter of each blended.
    pub fn for_config(config: &AutoencoderKlConfig) -> Self {
        Self::with_tile_size(config, config.sample_size.unwrap_or(32))
    }

    /// Tiles of `pixels` a side (diffusers with `tile_sample_min_size` set; ComfyUI's tile size),
    /// rounded down to the VAE's factor: a tile holds whole latents, and a pixel tile that is not
    /// its latent tile times the factor would make the picture a few pixels too large.
    pub fn with_tile_size(config: &AutoencoderKlConfig, pixels: usize) -> Self {
        let f = config.downscale().max(1);
        Self { sample_tile: pixels / f * f, latent_tile: pixels / f, overlap: 0.25 }
    }

    /// Strides and blends for tiles of `input_tile` on the input side and `output_tile` on the
    /// output side, with diffusers' integer truncations.
    fn plan(&self, input_tile: usize, output_tile: usize) -> Result<TilePlan> {
        if !(0.0..1.0).contains(&self.overlap) {
            candle_core::bail!("VAE tiling: overlap must be in [0, 1), got {}", self.overlap);
        }
        let stride = (input_tile as f64 * (1.0 - self.overlap)) as usize;
        if stride == 0 || self.latent_tile == 0 {
            candle_core::bail!("VAE tiling: tiles of {} pixels / {} latents are too small", self.sample_tile, self.latent_tile);
        }
        let blend = (output_tile as f64 * self.overlap) as usize;
        Ok(TilePlan { stride, input_tile, blend, keep: output_tile - blend, min_tile: (input_tile / output_tile.max(1)).max(1) })
    }
}

/// One tiled pass: tiles of `input_tile` every `stride`, outputs blended over `blend` rows and
/// columns with the tile above and to the left, then cropped to `keep`.
struct TilePlan {
    stride: usize,
    input_tile: usize,
    blend: usize,
    keep: usize,
    /// Input pixels per output pixel. A last tile narrower than this (an encoded picture whose
    /// side is not a multiple of the VAE's factor) makes no output pixel and would underflow the
    /// convolutions; the tile before it already covers it, so it is left out, which gives the
    /// untiled size.
    min_tile: usize,
}

impl TilePlan {
    /// Raster order, as diffusers: each output is blended, in place, first with the (already
    /// blended) output above it and then with the one to its left. Only the previous row of
    /// outputs is kept, where diffusers keeps every tile.
    fn run(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for i in (0..h).step_by(self.stride).take_while(|&i| i == 0 || h - i >= self.min_tile) {
            let mut row: Vec<Tensor> = Vec::new();
            let mut kept = Vec::new();
            for (col, j) in (0..w).step_by(self.stride).take_while(|&j| j == 0 || w - j >= self.min_tile).enumerate() {
                let tile = x.narrow(2, i, self.input_tile.min(h - i))?.narrow(3, j, self.input_tile.min(w - j))?;
                let mut out = f(&tile.contiguous()?)?;
                if let Some(a) = above.get(col) {
                    out = blend(a, &out, self.blend, 2)?;
                }
                if let Some(l) = row.last() {
                    out = blend(l, &out, self.blend, 3)?;
                }
                let (oh, ow) = (out.dim(2)?, out.dim(3)?);
                kept.push(out.narrow(2, 0, self.keep.min(oh))?.narrow(3, 0, self.keep.min(ow))?);
                row.push(out);
            }
            rows.push(Tensor::cat(&kept, 3)?);
            above = row;
        }
        Tensor::cat(&rows, 2)
    }
}

/// diffusers' `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows (columns) of `b`
/// fade from `a`'s last ones, with weights `1 − y/extent` and `y/extent`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = e;
    let ramp = |f: &dyn Fn(f64) -> f64| Tensor::from_vec((0..e).map(|y| f(y as f64 / e as f64) as f32).collect::<Vec<_>>(), shape.as_slice(), b.device())?.to_dtype(b.dtype());
    let (wa, wb) = (ramp(&|r| 1.0 - r)?, ramp(&|r| r)?);
    let head = (a.narrow(dim, na - e, e)?.broadcast_mul(&wa)? + b.narrow(dim, 0, e)?.broadcast_mul(&wb)?)?;
    if e == nb {
        return Ok(head);
    }
    Tensor::cat(&[&head, &b.narrow(dim, e, nb - e)?], dim)
}
