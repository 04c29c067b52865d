//! The loaded model's LoRA-capable layers, addressable by every name a LoRA file may use.

use std::collections::HashMap;

use loramix_models::sdxl::UNet2DConditionConfig;
use loramix_models::{Adaptable, AdaptableLayer};

use super::keys::{Component, ModuleName};
use crate::sdxl::checkpoint::unet_sgm_module_path;
use crate::sdxl::pipeline::SdxlPipeline;

/// One LoRA-capable layer of the loaded pipeline.
#[derive(Debug, Clone)]
pub struct Target {
    pub component: Component,
    pub layer: AdaptableLayer,
    /// lbw's block of the layer (0 = BASE for the text encoders, IN00–OUT11 from the UNet
    /// module's SGM name); `None` outside every block.
    pub lbw_block: Option<usize>,
}

impl Target {
    /// `unet.down_blocks.1...to_q`, `text_encoder_2.text_model....q_proj`.
    pub fn qualified_path(&self) -> String {
        format!("{}.{}", self.component.name(), self.layer.path)
    }
}

/// Every LoRA-capable layer of a pipeline (UNet first, in execution order, then both text
/// encoders) with lookup tables for flat kohya names (diffusers and SGM spellings) and dotted
/// paths.
#[derive(Debug, Clone)]
pub struct AdapterTargets {
    pub targets: Vec<Target>,
    by_flat: HashMap<String, usize>,
    by_path: HashMap<(Component, String), usize>,
    /// The UNet's cross-attention width, to name the base a LoRA was made for.
    pub cross_attention_dim: usize,
    pub has_second_encoder: bool,
    /// What the user loaded, for messages.
    pub model_label: String,
}

fn flat(path: &str) -> String {
    path.replace('.', "_")
}

impl AdapterTargets {
    pub fn of_pipeline(pipe: &SdxlPipeline) -> Self {
        // Released models (low memory) have no layers left to adapt.
        let mut parts = Vec::new();
        if let Some(u) = pipe.loaded_unet() {
            parts.push((Component::Unet, u.adaptable_layers()));
        }
        if let Some(t) = pipe.loaded_text() {
            parts.push((Component::TextEncoder, t.encoder.adaptable_layers()));
            if let Some(e) = &t.encoder_2 {
                parts.push((Component::TextEncoder2, e.adaptable_layers()));
            }
        }
        Self::new(parts, pipe.unet_config(), pipe.loaded_text().is_none_or(|t| t.encoder_2.is_some()), &pipe.source)
    }

    pub fn new(parts: Vec<(Component, Vec<AdaptableLayer>)>, unet: &UNet2DConditionConfig, has_second_encoder: bool, label: &str) -> Self {
        let mut targets = Vec::new();
        let mut by_flat = HashMap::new();
        let mut by_path = HashMap::new();
        for (component, layers) in parts {
            for layer in layers {
                let i = targets.len();
                let mut lbw_block = Some(0);
                match component {
                    Component::Unet => {
                        by_flat.insert(format!("lora_unet_{}", flat(&layer.path)), i);
                        let sgm = unet_sgm_module_path(unet, &layer.path);
                        lbw_block = sgm.as_deref().and_then(crate::lora::schedule::block_of_sgm_path);
                        if let Some(sgm) = sgm {
                            by_flat.entry(format!("lora_unet_{}", flat(&sgm))).or_insert(i);
                        }
                    }
                    Component::TextEncoder => {
                        by_flat.insert(format!("lora_te1_{}", flat(&layer.path)), i);
                        by_flat.insert(format!("lora_te_{}", flat(&layer.path)), i);
                    }
                    Component::TextEncoder2 => {
                        by_flat.insert(format!("lora_te2_{}", flat(&layer.path)), i);
                    }
                }
                by_path.insert((component, layer.path.clone()), i);
                targets.push(Target { component, layer, lbw_block });
            }
        }
        Self {
            targets,
            by_flat,
            by_path,
            cross_attention_dim: unet.cross_attention_dim,
            has_second_encoder,
            model_label: label.to_string(),
        }
    }

    pub fn find(&self, name: &ModuleName) -> Option<usize> {
        match name {
            ModuleName::Flat(f) => self.by_flat.get(f).copied(),
            ModuleName::Dotted(c, p) => self.by_path.get(&(*c, p.clone())).copied(),
        }
    }

    /// Drops every attached branch and fused weight: the model is the base again.
    pub fn clear(&self) {
        for t in &self.targets {
            let mut s = t.layer.slot.write();
            s.branches.clear();
            s.bases.clear();
            s.fused_weight = None;
            s.routing = None;
            s.mask = None;
            s.mask_rows = None;
            s.query_mask = None;
            s.probe_tokens = None;
            s.probe_map = None;
        }
    }

    pub fn describe_model(&self) -> String {
        let family = match (self.cross_attention_dim, self.has_second_encoder) {
            (2048, true) => "SDXL".to_string(),
            (d, true) => format!("SDXL-architecture ({d}-wide cross-attention)"),
            (d, false) => format!("a single-encoder model ({d}-wide cross-attention)"),
        };
        format!("{family} ({})", self.model_label)
    }
}
