//! `UNet2DConditionModel` as diffusers builds it for SDXL (and SD 1.x/2.x-shaped configs):
//! timestep embedding plus the `text_time` added embedding (pooled text + micro-conditioning
//! time ids), down blocks with skip connections, a cross-attention mid block, up blocks.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use loramix_kernels::GroupNormParams;

use super::config::UNet2DConditionConfig;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer::{Transformer2DModel, Transformer2DSpec};
use crate::adapter::{group_norm, Adaptable, AdaptableConv2d, AdaptableLayer, AdaptableLinear};

/// Sinusoidal embedding exactly as diffusers' `get_timestep_embedding`, computed in f32.
pub fn timestep_embedding(t: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f64, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f32).ln();
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / denom).exp()).collect();
    let mut data = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f32> = freqs.iter().map(|f| tv * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (t.len(), dim), device)
}

/// `linear_1 → SiLU → linear_2`.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: AdaptableLinear,
    linear_2: AdaptableLinear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: AdaptableLinear::new(vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: AdaptableLinear::new(vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

impl Adaptable for TimestepEmbedding {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.linear_1.collect_adaptable(out);
        self.linear_2.collect_adaptable(out);
    }
}

/// A down or up block: resnets, optional transformers after each resnet, optional resampler.
#[derive(Debug, Clone)]
pub(crate) struct UNetBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl Adaptable for UNetBlock {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        // Execution order: resnet j, then attention j, then the resampler.
        for (j, r) in self.resnets.iter().enumerate() {
            r.collect_adaptable(out);
            if let Some(a) = self.attentions.get(j) {
                a.collect_adaptable(out);
            }
        }
        self.downsampler.collect_adaptable(out);
        self.upsampler.collect_adaptable(out);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

/// The extra conditioning SDXL's UNet takes beside the text context.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// Pooled, projected text embedding of the second encoder, `[batch, 1280]`.
    pub text_embeds: Tensor,
    /// `[batch, 6]`: original (h, w), crop (top, left), target (h, w).
    pub time_ids: Tensor,
}

/// What control models add to the UNet, already scaled by each control's weight.
///
/// A ControlNet gives one residual per skip connection (in the order the down blocks make them)
/// and one for the mid block's output; a T2I-Adapter gives feature maps that are added inside
/// the down blocks and, where the shape fits, to the mid block's output (diffusers'
/// `down_intrablock_additional_residuals`). Either list is empty when no such model runs.
#[derive(Debug, Clone, Default)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Option<Tensor>,
    pub intrablock: Vec<Tensor>,
}

fn add_lists(what: &str, a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => Ok(a.to_vec()),
        (true, false) => Ok(b.to_vec()),
        _ if a.len() != b.len() => Err(candle_core::Error::Msg(format!("{what} disagree on the number of residuals ({} and {})", a.len(), b.len()))),
        _ => a.iter().zip(b).map(|(x, y)| x + y).collect(),
    }
}

impl ControlResiduals {
    /// The sum of two control models' residuals (diffusers' `MultiControlNetModel` and
    /// `MultiAdapter`).
    pub fn add(&self, other: &Self) -> Result<Self> {
        let mid = match (&self.mid, &other.mid) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Ok(Self {
            down: add_lists("controlnets", &self.down, &other.down)?,
            mid,
            intrablock: add_lists("t2i-adapters", &self.intrablock, &other.intrablock)?,
        })
    }

    /// Rows `[start, start + len)` of the batch.
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        let narrow = |v: &[Tensor]| v.iter().map(|d| d.narrow(0, start, len)).collect::<Result<Vec<_>>>();
        Ok(Self { down: narrow(&self.down)?, mid: self.mid.as_ref().map(|m| m.narrow(0, start, len)).transpose()?, intrablock: narrow(&self.intrablock)? })
    }
}

/// `h + r` where a T2I-Adapter feature must fit exactly (diffusers adds in place, so a
/// mismatch is an error there too); named so a wrong adapter says what it is.
fn add_feature(h: &Tensor, r: &Tensor, k: usize) -> Result<Tensor> {
    if h.dims() != r.dims() {
        return Err(candle_core::Error::Msg(format!(
            "t2i-adapter feature {k} is {:?}; the UNet's block gives {:?} (an adapter for another architecture, or an image size it cannot divide)",
            r.dims(),
            h.dims()
        )));
    }
    h + r.to_dtype(h.dtype())?
}

/// The half of the UNet that a ControlNet copies: the embeddings, the input convolution, the down
/// blocks and the mid block, built and run by the same code for both.
#[derive(Debug, Clone)]
pub(crate) struct UNetEncoder {
    pub(crate) conv_in: AdaptableConv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<UNetBlock>,
    mid_block: MidBlock,
}

pub(crate) fn transformer_for(c: &UNet2DConditionConfig, vb: VarBuilder, ch: usize, heads: usize, layers: usize) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        vb,
        &Transformer2DSpec {
            channels: ch,
            heads,
            layers,
            context_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
        },
    )
}

impl UNetEncoder {
    pub(crate) fn new(vb: VarBuilder, c: &UNet2DConditionConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let heads = c.heads().map_err(candle_core::Error::Msg)?;
        let depth = c.transformer_layers().map_err(candle_core::Error::Msg)?;
        let temb = boc[0] * 4;
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);

        let add_embedding = match c.addition_embed_type.as_deref() {
            Some("text_time") => {
                let in_dim = c.projection_class_embeddings_input_dim.unwrap_or_default();
                Some(TimestepEmbedding::new(vb.pp("add_embedding"), in_dim, temb)?)
            }
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let cross = UNet2DConditionConfig::has_cross_attention(ty);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), rin, out_ch, Some(temb), groups, eps)?);
                if cross {
                    attentions.push(transformer_for(c, vbb.pp(format!("attentions.{j}")), out_ch, heads[i], depth[i])?);
                }
            }
            let downsampler =
                if i + 1 < n { Some(Downsample2D::new(vbb.pp("downsamplers.0"), out_ch, 1)?) } else { None };
            down_blocks.push(UNetBlock { resnets, attentions, downsampler, upsampler: None });
        }

        let top = boc[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(vbm.pp("resnets.0"), top, top, Some(temb), groups, eps)?,
                ResnetBlock2D::new(vbm.pp("resnets.1"), top, top, Some(temb), groups, eps)?,
            ],
            attentions: vec![transformer_for(c, vbm.pp("attentions.0"), top, heads[n - 1], depth[n - 1])?],
        };
        Ok(Self {
            conv_in: AdaptableConv2d::new(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], temb)?,
            add_embedding,
            down_blocks,
            mid_block,
        })
    }

    /// The timestep embedding plus, for SDXL, the added text/time embedding.
    pub(crate) fn embed(&self, c: &UNet2DConditionConfig, b: usize, t: f32, dtype: DType, dev: &Device, added: Option<&AddedConditions>) -> Result<Tensor> {
        let t_emb = timestep_embedding(&vec![t; b], c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, dev)?;
        let mut emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg("this UNet uses text_time conditioning: pooled text embeddings and time ids are required".into())
            })?;
            let dim = c.addition_time_embed_dim.unwrap_or_default();
            let ids: Vec<f32> = added.time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let time_embeds = timestep_embedding(&ids, dim, c.flip_sin_to_cos, c.freq_shift, dev)?.reshape((b, ()))?;
            let add_in = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?.to_dtype(dtype)?;
            emb = (emb + add.forward(&add_in)?)?;
        }
        Ok(emb)
    }

    /// The down blocks from `h` (the input convolution's output): the last hidden state, every
    /// skip connection (`h` itself first) and how many of `intrablock` were used.
    ///
    /// T2I-Adapter features go in as diffusers puts them: a block with cross-attention adds
    /// its feature after its last resnet/attention pair, before that skip is kept and before
    /// the downsampler; a block without adds it to its output (after the downsampler), in
    /// place, so its last skip has it too.
    pub(crate) fn down(&self, mut h: Tensor, emb: &Tensor, context: &Tensor, intrablock: &[Tensor]) -> Result<(Tensor, Vec<Tensor>, usize)> {
        let mut skips = vec![h.clone()];
        let mut used = 0;
        for block in &self.down_blocks {
            let cross = !block.attentions.is_empty();
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, Some(emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context)?;
                }
                if cross && j + 1 == block.resnets.len() {
                    if let Some(r) = intrablock.get(used) {
                        h = add_feature(&h, r, used)?;
                        used += 1;
                    }
                }
                skips.push(h.clone());
            }
            if let Some(d) = &block.downsampler {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
            if !cross {
                if let Some(r) = intrablock.get(used) {
                    h = add_feature(&h, r, used)?;
                    used += 1;
                    if let Some(last) = skips.last_mut() {
                        *last = h.clone();
                    }
                }
            }
        }
        Ok((h, skips, used))
    }

    pub(crate) fn mid(&self, h: &Tensor, emb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.resnets[0].forward(h, Some(emb))?;
        for (attn, resnet) in self.mid_block.attentions.iter().zip(&self.mid_block.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(emb))?;
        }
        Ok(h)
    }
}

impl Adaptable for UNetEncoder {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.time_embedding.collect_adaptable(out);
        self.add_embedding.collect_adaptable(out);
        self.conv_in.collect_adaptable(out);
        self.down_blocks.collect_adaptable(out);
        self.mid_block.resnets[0].collect_adaptable(out);
        for (a, r) in self.mid_block.attentions.iter().zip(&self.mid_block.resnets[1..]) {
            a.collect_adaptable(out);
            r.collect_adaptable(out);
        }
    }
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    encoder: UNetEncoder,
    up_blocks: Vec<UNetBlock>,
    conv_norm_out: GroupNormParams,
    conv_out: AdaptableConv2d,
    config: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> Result<Self> {
        let c = config;
        c.validate().map_err(candle_core::Error::Msg)?;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let heads = c.heads().map_err(candle_core::Error::Msg)?;
        let rev_depth = c.reverse_transformer_layers().map_err(candle_core::Error::Msg)?;
        let temb = boc[0] * 4;
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let encoder = UNetEncoder::new(vb.clone(), c)?;

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev_boc[0];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev_boc[i];
            let in_ch = rev_boc[(i + 1).min(n - 1)];
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let cross = UNet2DConditionConfig::has_cross_attention(ty);
            let layers = c.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), rin + skip, out_ch, Some(temb), groups, eps)?);
                if cross {
                    attentions.push(transformer_for(c, vbb.pp(format!("attentions.{j}")), out_ch, rev_heads[i], rev_depth[i])?);
                }
            }
            let upsampler = if i + 1 < n { Some(Upsample2D::new(vbb.pp("upsamplers.0"), out_ch)?) } else { None };
            up_blocks.push(UNetBlock { resnets, attentions, downsampler: None, upsampler });
        }

        Ok(Self {
            encoder,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: AdaptableConv2d::new(vb.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Whether the model needs pooled text embeddings and time ids (SDXL) or not (SD 1.x/2.x).
    pub fn uses_added_conditions(&self) -> bool {
        self.encoder.add_embedding.is_some()
    }

    /// Predicts the model output (noise or v) for `sample: [b, c, h, w]` at timestep `t`
    /// (one value for the whole batch, as the pipelines call it), with text `context`
    /// `[b, l, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, t: f32, context: &Tensor, added: Option<&AddedConditions>) -> Result<Tensor> {
        self.forward_controlled(sample, t, context, added, None)
    }

    /// [`Self::forward`] with ControlNet residuals added to the skip connections and the mid
    /// block's output (diffusers' `down_block_additional_residuals` and
    /// `mid_block_additional_residual`).
    pub fn forward_controlled(
        &self,
        sample: &Tensor,
        t: f32,
        context: &Tensor,
        added: Option<&AddedConditions>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        // On the kernels' thread pool: `loramix_kernels::on_pool` says why.
        loramix_kernels::on_pool(|| self.forward_on_pool(sample, t, context, added, control))
    }

    fn forward_on_pool(
        &self,
        sample: &Tensor,
        t: f32,
        context: &Tensor,
        added: Option<&AddedConditions>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let b = sample.dim(0)?;
        let dtype = sample.dtype();
        let dev = sample.device();
        let emb = self.encoder.embed(c, b, t, dtype, dev, added)?;
        let context = context.to_dtype(dtype)?;

        let h = self.encoder.conv_in.forward(sample)?;
        let intrablock = control.map(|c| c.intrablock.as_slice()).unwrap_or_default();
        let (h, mut skips, used) = self.encoder.down(h, &emb, &context, intrablock)?;
        let mut h = self.encoder.mid(&h, &emb, &context)?;
        // SDXL adapters have one more feature, for the mid block; diffusers adds it only where
        // its shape is the mid block's (and ignores a feature left over).
        if let Some(r) = intrablock.get(used).filter(|r| r.dims() == h.dims()) {
            h = (h + r.to_dtype(dtype)?)?;
        }
        if let Some(control) = control.filter(|c| !c.down.is_empty() || c.mid.is_some()) {
            if control.down.len() != skips.len() {
                return Err(candle_core::Error::Msg(format!(
                    "the ControlNet gives {} residuals; this UNet has {} skip connections (a ControlNet for another model?)",
                    control.down.len(),
                    skips.len()
                )));
            }
            // Broadcast: a ControlNet with `global_pool_conditions` gives `[b, c, 1, 1]`.
            for (s, r) in skips.iter_mut().zip(&control.down) {
                *s = s.broadcast_add(&r.to_dtype(dtype)?)?;
            }
            if let Some(mid) = &control.mid {
                h = h.broadcast_add(&mid.to_dtype(dtype)?)?;
            }
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("unet: skip connections exhausted".into()))?;
                h = Tensor::cat(&[&h, &skip], 1)?;
                h = resnet.forward(&h, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, &context)?;
                }
            }
            if let Some(u) = &block.upsampler {
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                };
                h = u.forward(&h, size)?;
            }
        }

        let h = loramix_kernels::group_norm(&h, &self.conv_norm_out, true)?;
        self.conv_out.forward(&h)
    }

    /// Drops every product its cross-attentions keep between calls ([`crate::adapter::ProductMemo`]).
    pub fn forget_kept_products(&self) {
        crate::adapter::forget_kept_products(self);
    }
}

impl Adaptable for UNet2DConditionModel {
    fn collect_adaptable(&self, out: &mut Vec<AdaptableLayer>) {
        self.encoder.collect_adaptable(out);
        self.up_blocks.collect_adaptable(out);
        self.conv_out.collect_adaptable(out);
    }
}
