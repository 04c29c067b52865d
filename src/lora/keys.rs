//! Tensor-name grammar of every LoRA family we read, reduced to (module, parameter).
//!
//! Two naming schemes exist in the wild:
//! - kohya / LyCORIS: `lora_unet_down_blocks_1_attentions_0_..._to_q.lora_down.weight` — the
//!   module path flattened with `_` (so it cannot be split back unambiguously; we look it up in a
//!   table built from the loaded model instead), with SGM (`input_blocks_4_1_...`) or diffusers
//!   block names, and `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders;
//! - diffusers / PEFT: `unet.down_blocks.1....to_q.lora_A.weight`, the older `.lora.down.weight`,
//!   `.lora_linear_layer.down.weight` and attention-processor names (`attn1.processor.to_q_lora`).

/// The model component a key addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One tensor's role inside a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    Down,
    Up,
    /// kohya LoCon's Tucker core (`lora_mid`).
    Mid,
    Alpha,
    /// DoRA magnitude (`dora_scale`, PEFT `lora_magnitude_vector`).
    Magnitude,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    /// LyCORIS "full" module: a dense ΔW.
    Diff,
    /// LyCORIS full module's bias ΔW.
    DiffBias,
}

/// How the module part of a key names its layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleName {
    /// kohya / LyCORIS flat name including its prefix, e.g. `lora_unet_input_blocks_4_1_proj_in`.
    Flat(String),
    /// A dotted module path under a component.
    Dotted(Component, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// The key's module part as written in the file (groups a module's tensors).
    pub module: String,
    pub name: ModuleName,
    pub param: Param,
}

/// Suffixes after a kohya/LyCORIS flat module name (which contains no dots).
const FLAT_PARAMS: &[(&str, Param)] = &[
    ("lora_down.weight", Param::Down),
    ("lora_up.weight", Param::Up),
    ("lora_mid.weight", Param::Mid),
    ("alpha", Param::Alpha),
    ("dora_scale", Param::Magnitude),
    ("hada_w1_a", Param::HadaW1A),
    ("hada_w1_b", Param::HadaW1B),
    ("hada_w2_a", Param::HadaW2A),
    ("hada_w2_b", Param::HadaW2B),
    ("hada_t1", Param::HadaT1),
    ("hada_t2", Param::HadaT2),
    ("lokr_w1", Param::LokrW1),
    ("lokr_w1_a", Param::LokrW1A),
    ("lokr_w1_b", Param::LokrW1B),
    ("lokr_w2", Param::LokrW2),
    ("lokr_w2_a", Param::LokrW2A),
    ("lokr_w2_b", Param::LokrW2B),
    ("lokr_t2", Param::LokrT2),
    ("diff", Param::Diff),
    ("diff_b", Param::DiffBias),
];

/// Suffixes after a dotted module path, longest first where one ends another.
const DOTTED_PARAMS: &[(&str, Param)] = &[
    (".lora_linear_layer.down.weight", Param::Down),
    (".lora_linear_layer.up.weight", Param::Up),
    ("_lora.down.weight", Param::Down),
    ("_lora.up.weight", Param::Up),
    (".lora.down.weight", Param::Down),
    (".lora.up.weight", Param::Up),
    (".lora_A.weight", Param::Down),
    (".lora_B.weight", Param::Up),
    (".lora_down.weight", Param::Down),
    (".lora_up.weight", Param::Up),
    (".lora_magnitude_vector.weight", Param::Magnitude),
    (".lora_magnitude_vector", Param::Magnitude),
    (".dora_scale", Param::Magnitude),
    (".alpha", Param::Alpha),
    (".hada_w1_a", Param::HadaW1A),
    (".hada_w1_b", Param::HadaW1B),
    (".hada_w2_a", Param::HadaW2A),
    (".hada_w2_b", Param::HadaW2B),
    (".hada_t1", Param::HadaT1),
    (".hada_t2", Param::HadaT2),
    (".lokr_w1_a", Param::LokrW1A),
    (".lokr_w1_b", Param::LokrW1B),
    (".lokr_w1", Param::LokrW1),
    (".lokr_w2_a", Param::LokrW2A),
    (".lokr_w2_b", Param::LokrW2B),
    (".lokr_w2", Param::LokrW2),
    (".lokr_t2", Param::LokrT2),
];

pub const FLAT_PREFIXES: &[(&str, Component)] = &[
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
];

/// Splits a tensor name into module and parameter; `None` for names that are not adapter
/// tensors (e.g. a full checkpoint's `model.diffusion_model.*`).
pub fn parse_key(key: &str) -> Option<ParsedKey> {
    if FLAT_PREFIXES.iter().any(|(p, _)| key.starts_with(p)) {
        let (module, param) = key.split_once('.')?;
        let param = FLAT_PARAMS.iter().find(|(s, _)| *s == param)?.1;
        return Some(ParsedKey { module: module.to_string(), name: ModuleName::Flat(module.to_string()), param });
    }
    let (suffix, param) = DOTTED_PARAMS.iter().find(|(s, _)| key.ends_with(s))?;
    let module = &key[..key.len() - suffix.len()];
    if module.is_empty() {
        return None;
    }
    let (component, path) = split_component(module);
    let path = normalize_dotted(component, path, suffix.starts_with('_'));
    Some(ParsedKey { module: module.to_string(), name: ModuleName::Dotted(component, path), param: *param })
}

fn split_component(module: &str) -> (Component, &str) {
    for (prefix, c) in [
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder),
        ("te2.", Component::TextEncoder2),
        ("te1.", Component::TextEncoder),
        ("unet.", Component::Unet),
    ] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return (c, rest.strip_prefix("base_model.model.").unwrap_or(rest));
        }
    }
    let rest = module.strip_prefix("base_model.model.").unwrap_or(module);
    // Bare PEFT keys: a CLIP path starts with `text_model.`; anything else is the UNet.
    if rest.starts_with("text_model.") {
        (Component::TextEncoder, rest)
    } else {
        (Component::Unet, rest)
    }
}

/// Old diffusers attention-processor names → module paths: `attn1.processor.to_q(_lora)` →
/// `attn1.to_q`, `to_out_lora` → `to_out.0`; text encoder `self_attn.to_q_lora` → `q_proj`.
fn normalize_dotted(component: Component, path: &str, processor_style: bool) -> String {
    let mut p = path.replace(".processor.", ".");
    if processor_style || p.ends_with(".to_out") {
        if component == Component::Unet {
            if let Some(head) = p.strip_suffix(".to_out") {
                p = format!("{head}.to_out.0");
            }
        } else {
            for (from, to) in [("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")] {
                if let Some(head) = p.strip_suffix(&format!(".{from}")) {
                    p = format!("{head}.{to}");
                    break;
                }
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_and_lycoris_keys() {
        let k = parse_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight").unwrap();
        assert_eq!(k.param, Param::Down);
        assert_eq!(k.name, ModuleName::Flat("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q".into()));
        assert_eq!(parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap().param, Param::Alpha);
        assert_eq!(parse_key("lora_unet_mid_block_resnets_0_conv1.hada_w2_b").unwrap().param, Param::HadaW2B);
        assert_eq!(parse_key("lora_unet_conv_in.lokr_w1").unwrap().param, Param::LokrW1);
        assert!(parse_key("lora_unet_x.unknown").is_none());
        assert!(parse_key("model.diffusion_model.input_blocks.0.0.weight").is_none());
    }

    #[test]
    fn diffusers_and_peft_keys() {
        let k = parse_key("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::Unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k".into()));
        assert_eq!(k.param, Param::Down);
        let k = parse_key("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::TextEncoder2, "text_model.encoder.layers.1.self_attn.q_proj".into()));
        let k = parse_key("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::Unet, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0".into()));
        assert_eq!(k.param, Param::Up);
        let k = parse_key("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.k_proj".into()));
        let k = parse_key("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1".into()));
        let k = parse_key("unet.up_blocks.0.resnets.0.conv1.lora.down.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::Unet, "up_blocks.0.resnets.0.conv1".into()));
        assert_eq!(parse_key("unet.conv_in.lora_magnitude_vector").unwrap().param, Param::Magnitude);
        let k = parse_key("base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight").unwrap();
        assert_eq!(k.name, ModuleName::Dotted(Component::Unet, "down_blocks.0.resnets.0.conv1".into()));
    }
}
