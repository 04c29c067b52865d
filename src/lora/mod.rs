//! LoRA files of every common family (kohya, diffusers/PEFT, LyCORIS LoHa/LoKr/full), read from
//! safetensors only and applied exactly as diffusers does, through the model's LoRA-capable
//! layers — unfused (per-layer, per-step weights) or fused into a fresh copy of the weights.

pub mod info;
pub mod keys;
pub mod network;
pub mod targets;

pub use info::{inspect, BaseModel, LoraFormat, LoraInfo, Role};
pub use network::{attach, fuse, LoadReport, LoadedLora, LoraModule};
pub use targets::{AdapterTargets, Target};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::library::LoraLibrary;
use crate::mix::schedule::{LoraSchedule, Weight};

/// A LoRA the user asked for, resolved to a file.
#[derive(Debug, Clone)]
pub struct LoraChoice {
    /// The name used for branches, traces and `<lora:NAME>` in saved parameters.
    pub name: String,
    pub path: PathBuf,
    pub weight: f64,
    /// From `PATH:WEIGHT:ROLE` or the library entry; `None`: guess from the file's metadata.
    pub role: Option<Role>,
    /// A prompt tag's block weights and per-step weights.
    pub schedule: Option<LoraSchedule>,
}

/// Resolves `--lora` arguments (a file path; else a LoRA shipped with the model in
/// `<model>/loras/NAME.safetensors`; else a library name) and `<lora:NAME:w>` prompt tags (the
/// model's own LoRAs, then the library). The library is opened only when needed.
pub fn resolve_choices(
    args: &[(String, f64, Option<Role>)],
    prompt_tags: &[PromptLora],
    library_root: Option<&Path>,
    model_loras: Option<&Path>,
) -> Result<Vec<LoraChoice>> {
    let mut library: Option<LoraLibrary> = None;
    let open_library = |lib: &mut Option<LoraLibrary>| -> Result<()> {
        if lib.is_none() {
            let root = match library_root {
                Some(r) => r.to_path_buf(),
                None => LoraLibrary::default_root()?,
            };
            *lib = Some(LoraLibrary::open(&root)?);
        }
        Ok(())
    };
    let mut out: Vec<LoraChoice> = Vec::new();
    let from_library = |lib: &LoraLibrary, key: &str, weight: f64, role: Option<Role>| -> Result<LoraChoice> {
        let e = lib.resolve(key)?;
        let role = role.or_else(|| Role::parse(&e.role).filter(|r| *r != Role::Unknown));
        Ok(LoraChoice { name: e.display_name, path: e.path, weight, role, schedule: None })
    };
    let shipped = |name: &str, weight: f64, role: Option<Role>| -> Option<LoraChoice> {
        let f = model_loras?.join(format!("{name}.safetensors"));
        f.is_file().then(|| LoraChoice { name: name.to_string(), path: f, weight, role, schedule: None })
    };
    for (src, weight, role) in args {
        let p = Path::new(src);
        let choice = if p.is_file() {
            let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| src.clone());
            LoraChoice { name, path: p.to_path_buf(), weight: *weight, role: *role, schedule: None }
        } else if p.extension().is_some() || src.contains(['/', '\\']) {
            return Err(Error::Argument(format!("--lora {src}: no such file")));
        } else if let Some(c) = shipped(src, *weight, *role) {
            c
        } else {
            open_library(&mut library)?;
            from_library(library.as_ref().ok_or_else(|| Error::Argument("library".into()))?, src, *weight, *role)?
        };
        out.push(choice);
    }
    for tag in prompt_tags {
        let mut c = match shipped(&tag.name, tag.weight, None) {
            Some(c) => c,
            None => {
                open_library(&mut library)?;
                from_library(library.as_ref().ok_or_else(|| Error::Argument("library".into()))?, &tag.name, tag.weight, None)?
            }
        };
        c.schedule = tag.schedule.clone();
        out.push(c);
    }
    // Branch names must be unique per layer; the same LoRA twice adds its weights, as A1111 does.
    let mut merged: Vec<LoraChoice> = Vec::new();
    for c in out {
        match merged.iter_mut().find(|m| m.path == c.path) {
            Some(m) if m.schedule.is_none() && c.schedule.is_none() => m.weight += c.weight,
            Some(m) => {
                return Err(Error::Argument(format!(
                    "LoRA {} is given twice and one of them has block weights or a schedule: give it once",
                    m.name
                )))
            }
            None => {
                let mut c = c;
                let base = c.name.clone();
                let mut k = 2;
                while merged.iter().any(|m| m.name == c.name) {
                    c.name = format!("{base}-{k}");
                    k += 1;
                }
                merged.push(c);
            }
        }
    }
    Ok(merged)
}

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
    let mut out = String::with_capacity(prompt.len());
    let mut found = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let Some(end) = after.find('>') else {
            return Err(Error::Argument(format!("prompt: unclosed <lora:...> tag at \"{}\"", &rest[start..])));
        };
        let body = &after[..end];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() {
            return Err(Error::Argument(format!("prompt: <lora:{body}> has no name")));
        }
        let fields: Vec<&str> = parts.collect();
        let schedule = LoraSchedule::parse(&fields).map_err(|e| Error::Argument(format!("prompt: <lora:{body}>: {e}")))?;
        let (weight, schedule) = match (&schedule.te, schedule.is_plain()) {
            (Weight::Constant(w), true) => (*w, None),
            _ => (1.0, Some(schedule)),
        };
        found.push(PromptLora { name: name.to_string(), weight, schedule, text: format!("<lora:{body}>") });
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, found))
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
    }

    #[test]
    fn prompt_tags() {
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
