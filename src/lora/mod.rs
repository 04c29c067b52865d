//! LoRA files of every common family (kohya, diffusers/PEFT, LyCORIS LoHa/LoKr/full), read from
//! safetensors only and applied exactly as diffusers does, through the model's LoRA-capable
//! layers — unfused (per-layer, per-step weights) or fused into a fresh copy of the weights.
//! Also the LoRA prompt syntax A1111 users write (`<lora:name:w>`, lbw block weights and
//! loractl schedules, [`schedule`]) and the [`library`].
//!
//! Owns everything about a LoRA file. Uses `sdxl` (the UNet's layer names and SGM paths, to map
//! a file's modules to layers) and the weights readers; `library` builds on the rest of this
//! room, never the other way round.

pub mod info;
pub mod keys;
pub mod library;
pub mod network;
pub mod schedule;
pub mod subspace;
pub mod train;
pub mod targets;

pub use info::{inspect, BaseModel, LoraFormat, LoraInfo, Role};
pub use network::{addnet_hash_of, attach, fuse, LoadReport, LoadedLora, LoraModule, SharedModule};
pub use targets::{AdapterTargets, Target};

use crate::error::{Error, Result};
use crate::lora::schedule::{LoraSchedule, Weight};

/// A `--lora PATH[:WEIGHT][:ROLE]` argument (ROLE: subject | style). A suffix counts only
/// when it parses (a number, a role), so Windows paths (`C:\loras\x.safetensors`) work unchanged.
pub fn parse_lora_arg(arg: &str) -> Result<(String, f64)> {
    parse_lora_arg_with_role(arg).map(|(p, w, _)| (p, w))
}

pub fn parse_lora_arg_with_role(arg: &str) -> Result<(String, f64, Option<Role>)> {
    let bad = || Error::Argument(format!("--lora {arg}: expected PATH[:WEIGHT][:subject|style]"));
    let mut head = arg;
    let mut role = None;
    if let Some((h, tail)) = head.rsplit_once(':') {
        if let Some(r) = Role::parse(tail.trim()).filter(|_| !tail.trim().is_empty() && tail.trim().parse::<f64>().is_err()) {
            role = Some(r);
            head = h;
        }
    }
    let mut weight = 1.0;
    if let Some((h, tail)) = head.rsplit_once(':') {
        if let Ok(w) = tail.trim().parse::<f64>() {
            if !w.is_finite() {
                return Err(Error::Argument(format!("--lora {arg}: the weight must be a finite number")));
            }
            weight = w;
            head = h;
        }
    }
    if head.is_empty() {
        return Err(bad());
    }
    // A colon left over is a weight or role that did not parse, unless it is part of a path
    // (`C:\\loras\\x.safetensors`, or a file whose name has one).
    if let Some((_, tail)) = head.rsplit_once(':') {
        if !tail.contains(['/', '\\']) && !std::path::Path::new(head).exists() {
            return Err(Error::Argument(format!(
                "--lora {arg}: {tail:?} is neither a weight nor a role (expected NAME[:WEIGHT][:subject|style|concept])"
            )));
        }
    }
    Ok((head.to_string(), weight, role))
}

/// One `<lora:NAME:...>` tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLora {
    pub name: String,
    /// The constant weight; 1 when a [`LoraSchedule`] gives the weights.
    pub weight: f64,
    /// te/unet weights that differ, loractl keyframes, lbw block weights or step windows.
    pub schedule: Option<LoraSchedule>,
    /// The tag as written.
    pub text: String,
}

/// A1111's `<lora:NAME:...>` prompt tags: returns the prompt with the tags removed and the tags
/// in order. The fields after the name are read as A1111 with the lbw and loractl extensions
/// reads them ([`LoraSchedule::parse`]): `<lora:x:0.8>`, `<lora:x:1:0.5>` (te, unet),
/// `<lora:x:0.2@0,1@0.5>`, `<lora:x:1:lbw=SDXL-OUTALL:start=5>`.
pub fn extract_prompt_loras(prompt: &str) -> Result<(String, Vec<PromptLora>)> {
    extract_extra_networks(prompt).map(|(p, loras, _)| (p, loras))
}

/// A1111's `extra_networks.parse_prompt`: every `<TYPE:…>` tag (`<(\w+):([^>]+)>`) leaves the
/// prompt. `lora` and `lyco` (A1111's other name for it: LyCORIS files load as LoRAs) are
/// returned as [`PromptLora`]s; the others (`hypernet`, an extension's, a mistyped `LORA`) are
/// networks this app does not have, returned by type name as A1111 skips them. An unclosed or
/// nameless `<lora:` is an error, where A1111 would leave it in the prompt as text.
pub fn extract_extra_networks(prompt: &str) -> Result<(String, Vec<PromptLora>, Vec<String>)> {
    static TAG: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let tag = TAG.get_or_init(|| regex::Regex::new(r"<(\w+):([^>]+)>").expect("a valid regex"));
    let (mut out, mut found, mut skipped) = (String::with_capacity(prompt.len()), Vec::new(), Vec::new());
    let mut last = 0;
    for c in tag.captures_iter(prompt) {
        let (whole, kind, body) = (c.get(0).expect("match"), &c[1], &c[2]);
        out.push_str(&prompt[last..whole.start()]);
        last = whole.end();
        if kind != "lora" && kind != "lyco" {
            skipped.push(kind.to_string());
            continue;
        }
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() {
            return Err(Error::Argument(format!("prompt: <{kind}:{body}> has no name")));
        }
        let fields: Vec<&str> = parts.collect();
        let schedule = LoraSchedule::parse(&fields).map_err(|e| Error::Argument(format!("prompt: <{kind}:{body}>: {e}")))?;
        let (weight, schedule) = match (&schedule.te, schedule.is_plain()) {
            (Weight::Constant(w), true) => (*w, None),
            _ => (1.0, Some(schedule)),
        };
        found.push(PromptLora { name: name.to_string(), weight, schedule, text: format!("<{kind}:{body}>") });
    }
    out.push_str(&prompt[last..]);
    if let Some(start) = [out.find("<lora:"), out.find("<lyco:")].into_iter().flatten().min() {
        let rest = &out[start..];
        return Err(Error::Argument(match rest[6..].starts_with('>') {
            true => format!("prompt: {} has no name", &rest[..7]),
            false => format!("prompt: unclosed <lora:...> tag at \"{rest}\""),
        }));
    }
    Ok((out, found, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_args() {
        assert_eq!(parse_lora_arg("a.safetensors:0.7").unwrap(), ("a.safetensors".into(), 0.7));
        assert_eq!(parse_lora_arg("a.safetensors").unwrap(), ("a.safetensors".into(), 1.0));
        assert_eq!(parse_lora_arg(r"C:\l\a.safetensors").unwrap(), (r"C:\l\a.safetensors".into(), 1.0));
        assert_eq!(parse_lora_arg(r"C:\l\a.safetensors:-0.5").unwrap(), (r"C:\l\a.safetensors".into(), -0.5));
        assert!(parse_lora_arg(":1").is_err());
        assert_eq!(parse_lora_arg_with_role("a.safetensors:0.5:style").unwrap(), ("a.safetensors".into(), 0.5, Some(Role::Style)));
        assert_eq!(parse_lora_arg_with_role("a.safetensors:subject").unwrap(), ("a.safetensors".into(), 1.0, Some(Role::Subject)));
        assert_eq!(parse_lora_arg_with_role(r"C:\x.safetensors:2").unwrap(), (r"C:\x.safetensors".into(), 2.0, None));
        // A suffix that is neither weight nor role is named, not read as part of the name.
        for bad in ["vlox:abc", "vlox:1:badrole", "vlox:", "vlox::subject"] {
            let e = parse_lora_arg_with_role(bad).unwrap_err().to_string();
            assert!(e.contains("neither a weight nor a role"), "{bad}: {e}");
        }
        assert_eq!(parse_lora_arg_with_role("vlox:0.5:concept").unwrap(), ("vlox".into(), 0.5, Some(Role::Concept)));
    }

    #[test]
    fn prompt_tags() {
        let (p, l) = extract_prompt_loras("a cat <lyco:tebo:0.8>, flat style <lora:striped>").unwrap();
        assert_eq!((p.as_str(), l[0].text.as_str(), l.len()), ("a cat , flat style ", "<lyco:tebo:0.8>", 2));
        // Every other extra network leaves the prompt too, as A1111 skips it.
        let (p, l, skipped) = extract_extra_networks("a <hypernet:anime:1> cat <LORA:vlox:1>, <lora:x:0.5> <3 <:)> <foo:bar>").unwrap();
        assert_eq!((p.as_str(), l.len(), skipped), ("a  cat ,  <3 <:)> ", 1, vec!["hypernet".to_string(), "LORA".into(), "foo".into()]));
        assert!(extract_prompt_loras("a <lora:x").unwrap_err().to_string().contains("unclosed"));
        assert!(extract_prompt_loras("a <lora:>").unwrap_err().to_string().contains("no name"));
        assert!(extract_prompt_loras("a <lora: :1>").unwrap_err().to_string().contains("no name"));
        let (p, l) = extract_prompt_loras("a cat <lora:tebo:0.8>, flat style <lora:striped>").unwrap();
        assert_eq!(p, "a cat , flat style ");
        let pairs: Vec<(String, f64)> = l.iter().map(|t| (t.name.clone(), t.weight)).collect();
        assert_eq!(pairs, vec![("tebo".to_string(), 0.8), ("striped".to_string(), 1.0)]);
        assert!(l.iter().all(|t| t.schedule.is_none()));
        let (_, l) = extract_prompt_loras("x <lora:a:0.2@0,1@0.5> <lora:b:1:lbw=SDXL-OUTALL:stop=10> <lora:c:1:0.5>").unwrap();
        assert!(l.iter().all(|t| t.schedule.is_some() && t.weight == 1.0));
        assert_eq!(l[1].text, "<lora:b:1:lbw=SDXL-OUTALL:stop=10>");
        assert!(extract_prompt_loras("x <lora:a:1:lbw=1,2>").is_err());
        assert!(extract_prompt_loras("x <lora:a:zz>").is_err());
        assert!(extract_prompt_loras("x <lora:a").is_err());
    }
}
