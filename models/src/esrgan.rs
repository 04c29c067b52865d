//! RRDBNet, the network of ESRGAN and Real-ESRGAN (x4plus, x2plus) and of most community
//! upscalers (4x-UltraSharp, NMKD, Remacri, …), with basicsr's weight names (`conv_first`,
//! `body.N.rdbK.convJ`, `conv_body`, `conv_upK`, `conv_hr`, `conv_last`). The original ESRGAN
//! names (`model.N…`) are mapped to these by the loader.
//!
//! Real-ESRGAN's 2x and 1x models see their input pixel-unshuffled by 2 or 4 (so the same
//! ×4 body gives ×2 or ×1), which `unshuffle` records.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, PartialEq)]
pub struct RrdbNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Feature width (`nf`, 64 in the published models).
    pub features: usize,
    /// RRDB blocks (`nb`, 23 in the published models).
    pub blocks: usize,
    /// Growth channels of the dense blocks (`gc`, 32).
    pub growth: usize,
    /// ×2 nearest upsampling stages, each followed by a convolution.
    pub upsamples: usize,
    /// Pixel-unshuffle factor of the input (1, 2 or 4).
    pub unshuffle: usize,
}

impl RrdbNetConfig {
    /// Output size over input size.
    pub fn scale(&self) -> f64 {
        (1usize << self.upsamples) as f64 / self.unshuffle as f64
    }
}

/// A 3×3 convolution with bias, through the shared CPU/GPU kernels.
#[derive(Debug, Clone)]
struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((cout, cin, 3, 3), "weight")?, bias: vb.get(cout, "bias")? })
    }
}

impl Module for Conv3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        loramix_kernels::conv2d(x, &self.weight, Some(&self.bias), 1, 1)
    }
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::leaky_relu(x, 0.2)
}

/// Five convolutions, each seeing the input and every earlier output (dense connections).
#[derive(Debug, Clone)]
struct ResidualDenseBlock {
    convs: Vec<Conv3>,
}

impl ResidualDenseBlock {
    fn new(vb: VarBuilder, nf: usize, gc: usize) -> Result<Self> {
        let convs = (0..5).map(|k| Conv3::new(vb.pp(format!("conv{}", k + 1)), nf + k * gc, if k < 4 { gc } else { nf })).collect::<Result<_>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&feats, 1)?)?)?;
            feats.push(y);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&feats, 1)?)?;
        (x5 * 0.2)? + x
    }
}

#[derive(Debug, Clone)]
struct Rrdb {
    rdbs: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn new(vb: VarBuilder, nf: usize, gc: usize) -> Result<Self> {
        Ok(Self {
            rdbs: [
                ResidualDenseBlock::new(vb.pp("rdb1"), nf, gc)?,
                ResidualDenseBlock::new(vb.pp("rdb2"), nf, gc)?,
                ResidualDenseBlock::new(vb.pp("rdb3"), nf, gc)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.rdbs {
            h = r.forward(&h)?;
        }
        (h * 0.2)? + x
    }
}

#[derive(Debug, Clone)]
pub struct RrdbNet {
    conv_first: Conv3,
    body: Vec<Rrdb>,
    conv_body: Conv3,
    ups: Vec<Conv3>,
    conv_hr: Conv3,
    conv_last: Conv3,
    config: RrdbNetConfig,
}

impl RrdbNet {
    pub fn new(vb: VarBuilder, config: &RrdbNetConfig) -> Result<Self> {
        let c = config;
        let nf = c.features;
        Ok(Self {
            conv_first: Conv3::new(vb.pp("conv_first"), c.in_channels * c.unshuffle * c.unshuffle, nf)?,
            body: (0..c.blocks).map(|i| Rrdb::new(vb.pp(format!("body.{i}")), nf, c.growth)).collect::<Result<_>>()?,
            conv_body: Conv3::new(vb.pp("conv_body"), nf, nf)?,
            ups: (0..c.upsamples).map(|i| Conv3::new(vb.pp(format!("conv_up{}", i + 1)), nf, nf)).collect::<Result<_>>()?,
            conv_hr: Conv3::new(vb.pp("conv_hr"), nf, nf)?,
            conv_last: Conv3::new(vb.pp("conv_last"), nf, c.out_channels)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &RrdbNetConfig {
        &self.config
    }

    /// `x`: `[batch, in_channels, h, w]` in [0, 1]. With unshuffle, a side that does not divide
    /// by it is reflect-padded first and the output cropped back, as Real-ESRGAN does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.config.unshuffle;
        if u > 1 {
            let (_, _, h, w) = x.dims4()?;
            let (ph, pw) = ((u - h % u) % u, (u - w % u) % u);
            if ph > 0 || pw > 0 {
                let padded = reflect_pad(&reflect_pad(x, 2, ph)?, 3, pw)?;
                let y = self.forward(&padded)?;
                let s = self.config.scale();
                return y.narrow(2, 0, (h as f64 * s) as usize)?.narrow(3, 0, (w as f64 * s) as usize);
            }
        }
        let x = if u > 1 { candle_nn::ops::pixel_unshuffle(x, u)? } else { x.clone() };
        let feat = self.conv_first.forward(&x)?;
        let mut h = feat.clone();
        for b in &self.body {
            h = b.forward(&h)?;
        }
        let mut feat = (feat + self.conv_body.forward(&h)?)?;
        for up in &self.ups {
            let (_, _, hh, ww) = feat.dims4()?;
            feat = lrelu(&up.forward(&feat.upsample_nearest2d(hh * 2, ww * 2)?)?)?;
        }
        self.conv_last.forward(&lrelu(&self.conv_hr.forward(&feat)?)?)
    }
}

/// Pads `extra` entries after the end of `dim` by reflection (torch's `reflect`: the edge
/// itself is not repeated).
fn reflect_pad(x: &Tensor, dim: usize, extra: usize) -> Result<Tensor> {
    if extra == 0 {
        return Ok(x.clone());
    }
    let n = x.dim(dim)?;
    if extra >= n {
        candle_core::bail!("reflect padding of {extra} needs more than {n} entries");
    }
    let idx: Vec<u32> = (0..n as u32).chain((0..extra as u32).map(|k| n as u32 - 2 - k)).collect();
    x.index_select(&Tensor::new(idx.as_slice(), x.device())?, dim)
}
