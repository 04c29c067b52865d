//! SDXL text conditioning: both CLIP encoders, A1111 chunking and emphasis, and diffusers'
//! rules for the negative prompt.
//!
//! Context = concat(penultimate hidden state of CLIP-L, penultimate of OpenCLIP-G) per chunk,
//! chunks concatenated along the sequence. Pooled = OpenCLIP-G's projected EOS embedding of
//! the first chunk. Emphasis scales each position's hidden state and then restores the chunk's
//! mean (A1111's "Original" emphasis), separately per encoder.

use candle_core::{DType, Device, Tensor};
use loramix_models::clip::ClipTextModel;

use crate::error::{Error, Result};
use crate::sdxl::embedding::Embeddings;
use crate::sdxl::prompt::{chunk_prompt_with, EmbeddingTokens, PromptChunk};
use crate::sdxl::tokenizer::ClipTokenizer;

/// Encoded text for one prompt (batch of one).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[1, 77·chunks, width]`.
    pub context: Tensor,
    /// `[1, projection_dim]`, or `None` for models without a second encoder.
    pub pooled: Option<Tensor>,
}

pub struct TextEncoders {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub encoder_2: Option<ClipTextModel>,
    /// 1 = penultimate layer, as SDXL is trained (diffusers `clip_skip=None`).
    pub layer_from_end: usize,
    pub device: Device,
    pub dtype: DType,
}

fn weighted(hidden: &Tensor, chunk: &PromptChunk) -> Result<Tensor> {
    if chunk.is_unweighted() {
        return Ok(hidden.clone());
    }
    let dtype = hidden.dtype();
    let h = hidden.to_dtype(DType::F32)?;
    let original_mean = h.mean_all()?.to_scalar::<f32>()? as f64;
    let w: Vec<f32> = chunk.weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::from_vec(w, (1, chunk.weights.len(), 1), h.device())?;
    let z = h.broadcast_mul(&w)?;
    let new_mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let z = if new_mean != 0.0 { (z * (original_mean / new_mean))? } else { z };
    Ok(z.to_dtype(dtype)?)
}

impl TextEncoders {
    /// The chunker's view of `embeddings` for encoder `which` (0: CLIP-L, 1: OpenCLIP-G), and
    /// the vectors for ids past its vocabulary, in order. An embedding of the wrong width gets
    /// zero rows here and is an error only if a prompt uses it.
    fn embedding_tables(
        tok: &ClipTokenizer,
        enc: &ClipTextModel,
        which: usize,
        embeddings: &Embeddings,
    ) -> Result<(Vec<EmbeddingTokens>, Option<Tensor>, Vec<Option<String>>)> {
        if embeddings.is_empty() {
            return Ok((Vec::new(), None, Vec::new()));
        }
        let (vocab, width) = (enc.config().vocab_size, enc.hidden_size());
        let (mut lookup, mut rows, mut misfits) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = vocab as u32;
        for e in embeddings.items() {
            let v = &e.vectors[which];
            let n = v.dim(0)?;
            let w = v.dim(1)?;
            lookup.push(EmbeddingTokens { name_ids: tok.encode_raw(&e.name)?, first_id: next, vectors: n });
            next += n as u32;
            if w == width {
                rows.push(v.clone());
                misfits.push(None);
            } else {
                rows.push(Tensor::zeros((n, width), DType::F32, v.device())?);
                let (key, which_enc) = if which == 0 { ("clip_l", "first") } else { ("clip_g", "second") };
                misfits.push(Some(format!(
                    "textual-inversion embedding {} ({}): its `{key}` vectors are {w} wide, and this model's {which_enc} text encoder takes {width}",
                    e.name,
                    e.path.display()
                )));
            }
        }
        Ok((lookup, Some(Tensor::cat(&rows, 0)?), misfits))
    }

    fn encode_one(
        &self,
        (tok, enc, which): (&ClipTokenizer, &ClipTextModel, usize),
        prompt: &str,
        want_pooled: bool,
        clip_skip: usize,
        embeddings: &Embeddings,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let layer_from_end = self.layer_from_end + clip_skip;
        let (lookup, extra, misfits) = Self::embedding_tables(tok, enc, which, embeddings)?;
        let (chunks, used) = chunk_prompt_with(tok, prompt, &lookup)?;
        if let Some(m) = used.iter().find_map(|&k| misfits[k].clone()) {
            return Err(Error::Argument(m));
        }
        let extra = if used.is_empty() { None } else { extra.map(|e| e.to_device(&self.device)).transpose()? };
        let mut hidden = Vec::with_capacity(chunks.len());
        let mut pooled = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let out = enc.forward_with_extra(std::slice::from_ref(&chunk.ids), extra.as_ref(), &self.device)?;
            let idx = out.hidden_states.len().checked_sub(1 + layer_from_end).ok_or_else(|| {
                Error::Argument(format!("clip skip {clip_skip} leaves no layer of the text encoder's {}", out.hidden_states.len() - 1))
            })?;
            hidden.push(weighted(&out.hidden_states[idx], chunk)?);
            if i == 0 && want_pooled {
                pooled = out.text_embeds.or(Some(out.pooled));
            }
        }
        Ok((hidden, pooled))
    }

    /// Encodes one prompt with A1111 chunking/emphasis.
    pub fn encode(&self, prompt: &str) -> Result<Conditioning> {
        self.encode_with_skip(prompt, 0)
    }

    /// [`Self::encode`] from `clip_skip` layers further from the end (diffusers' `clip_skip`:
    /// hidden state `-(clip_skip + 2)` of both encoders; the pooled output is unchanged).
    pub fn encode_with_skip(&self, prompt: &str, clip_skip: usize) -> Result<Conditioning> {
        self.encode_with(prompt, clip_skip, &Embeddings::default())
    }

    /// Which of `embeddings` (indices) `prompt` calls by name.
    pub fn used_embeddings(&self, prompt: &str, embeddings: &Embeddings) -> Result<Vec<usize>> {
        let (lookup, _, _) = Self::embedding_tables(&self.tokenizer, &self.encoder, 0, embeddings)?;
        Ok(chunk_prompt_with(&self.tokenizer, prompt, &lookup)?.1)
    }

    /// [`Self::encode_with_skip`] with textual-inversion embeddings callable by name.
    pub fn encode_with(&self, prompt: &str, clip_skip: usize, embeddings: &Embeddings) -> Result<Conditioning> {
        let (mut h1, _) = self.encode_one((&self.tokenizer, &self.encoder, 0), prompt, false, clip_skip, embeddings)?;
        let (context, pooled) = match (&self.tokenizer_2, &self.encoder_2) {
            (Some(t2), Some(e2)) => {
                let (mut h2, pooled2) = self.encode_one((t2, e2, 1), prompt, true, clip_skip, embeddings)?;
                // The two tokenizers share a vocabulary, so chunk counts agree; if a custom
                // model's do not, pad the shorter with empty-prompt chunks as A1111 does.
                let n = h1.len().max(h2.len());
                let none = Embeddings::default();
                if h1.len() < n {
                    let empty = self.encode_one((&self.tokenizer, &self.encoder, 0), "", false, clip_skip, &none)?.0.remove(0);
                    h1.resize(n, empty);
                }
                if h2.len() < n {
                    let empty = self.encode_one((t2, e2, 1), "", false, clip_skip, &none)?.0.remove(0);
                    h2.resize(n, empty);
                }
                let per_chunk = h1
                    .iter()
                    .zip(&h2)
                    .map(|(a, b)| Tensor::cat(&[a, b], 2))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (Tensor::cat(&per_chunk, 1)?, pooled2)
            }
            _ => (Tensor::cat(&h1, 1)?, None),
        };
        Ok(Conditioning { context: context.to_dtype(self.dtype)?, pooled: pooled.map(|p| p.to_dtype(self.dtype)).transpose()? })
    }

    /// Zeros shaped like `like` (diffusers' `force_zeros_for_empty_prompt` negative).
    pub fn zeros_like(like: &Conditioning) -> Result<Conditioning> {
        Ok(Conditioning { context: like.context.zeros_like()?, pooled: like.pooled.as_ref().map(|p| p.zeros_like()).transpose()? })
    }

    /// Pads the shorter context with empty-prompt chunks so cond and uncond can be batched
    /// (A1111's `pad_cond_uncond`); zero conditioning is padded with zeros.
    pub fn match_lengths(&self, a: Conditioning, b: Conditioning, b_is_zero: bool) -> Result<(Conditioning, Conditioning)> {
        let (la, lb) = (a.context.dim(1)?, b.context.dim(1)?);
        if la == lb {
            return Ok((a, b));
        }
        let pad = |c: Conditioning, to: usize, zero: bool| -> Result<Conditioning> {
            let have = c.context.dim(1)?;
            let filler = if zero {
                Tensor::zeros((1, to - have, c.context.dim(2)?), c.context.dtype(), c.context.device())?
            } else {
                let empty = self.encode("")?.context;
                let reps = (to - have) / empty.dim(1)?;
                Tensor::cat(&vec![empty; reps], 1)?
            };
            Ok(Conditioning { context: Tensor::cat(&[&c.context, &filler], 1)?, pooled: c.pooled })
        };
        if la < lb {
            Ok((pad(a, lb, false)?, b))
        } else {
            Ok((a, pad(b, la, b_is_zero)?))
        }
    }
}
