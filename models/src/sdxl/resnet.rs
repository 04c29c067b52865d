//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (diffusers `models/resnet.py`,
//! `models/downsampling.py`, `models/upsampling.py`), shared by the UNet and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use loramix_kernels::{group_norm as norm, GroupNormParams};

use crate::adapter::{group_norm, Adaptable, AdaptableConv2d, AdaptableLayer, AdaptableLinear};

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNormParams,
    conv1: AdaptableConv2d,
    time_emb_proj: Option<AdaptableLinear>,
    norm2: GroupNormParams,
    conv2: AdaptableConv2d,
    conv_shortcut: Option<AdaptableConv2d>,
}

impl ResnetBlock2D {
    /// `temb_channels = None` for the VAE's blocks, which have no timestep input.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(AdaptableConv2d::new(vb.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: AdaptableConv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(AdaptableLinear::new(vb.pp("time_emb_proj"), t, out_channels, true)?),
                None => None,
            },
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: AdaptableConv2d::new(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&norm(x, &self.norm1, true)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&norm(&h, &self.norm2, true)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

impl Adaptable for ResnetBlock2D {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv1.collect_adaptable(out);
        self.time_emb_proj.collect_adaptable(out);
        self.conv2.collect_adaptable(out);
        self.conv_shortcut.collect_adaptable(out);
    }
}

/// Stride-2 convolution. The VAE's variant has `padding = 0` and pads right/bottom by one
/// first (an asymmetric pad inherited from the original LDM code).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: AdaptableConv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: AdaptableConv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?, asymmetric_pad: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

impl Adaptable for Downsample2D {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv.collect_adaptable(out)
    }
}

/// Nearest-neighbour upsampling then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: AdaptableConv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: AdaptableConv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// `size`: the output spatial size; the UNet passes the next skip connection's size so
    /// that odd latent sizes line up (diffusers' `upsample_size`).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(oh, ow)?)
    }
}

impl Adaptable for Upsample2D {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.conv.collect_adaptable(out)
    }
}
