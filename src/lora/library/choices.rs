//! Turning what the user named (`--lora` arguments, `<lora:…>` prompt tags) into LoRA files: a
//! path, a LoRA shipped beside the model, or a library entry. It lives with the library because
//! it is the one place that reads the library to resolve names.

use std::path::{Path, PathBuf};

use super::LoraLibrary;
use crate::error::{Error, Result};
use crate::lora::schedule::LoraSchedule;
use crate::lora::{PromptLora, Role};

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
    /// `NAME@SUBSPACE`: (member, subspace), reconstructed from the library's subspace instead of
    /// read from `path`.
    pub subspace: Option<(String, String)>,
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
        Ok(LoraChoice { name: e.display_name, path: e.path, weight, role, schedule: None, subspace: None })
    };
    let shipped = |name: &str, weight: f64, role: Option<Role>| -> Option<LoraChoice> {
        let f = model_loras?.join(format!("{name}.safetensors"));
        f.is_file().then(|| LoraChoice { name: name.to_string(), path: f, weight, role, schedule: None, subspace: None })
    };
    let from_subspace = |lib: &LoraLibrary, spec: &str, member: &str, sub: &str, weight: f64, role: Option<Role>| -> Result<LoraChoice> {
        let s = lib.subspace(sub)?;
        let m = s.members.iter().find(|m| m.display_name.eq_ignore_ascii_case(member) || m.sha256.starts_with(&member.to_ascii_lowercase()));
        let Some(m) = m else {
            let names: Vec<&str> = s.members.iter().map(|m| m.display_name.as_str()).collect();
            return Err(Error::Argument(format!("{spec}: {member} is not a member of subspace {sub} (members: {})", names.join(", "))));
        };
        let role = role.or_else(|| lib.resolve(&m.sha256).ok().and_then(|e| Role::parse(&e.role)).filter(|r| *r != Role::Unknown));
        let name = format!("{}@{sub}", m.display_name);
        Ok(LoraChoice { path: PathBuf::from(&name), name, weight, role, schedule: None, subspace: Some((m.display_name.clone(), sub.to_string())) })
    };
    // A library entry replaced by its subspace (`lora subspace replace`) is served from it
    // wherever its name is used, even where the model ships a LoRA of that name.
    let lib_present = match library_root {
        Some(r) => r.exists(),
        None => LoraLibrary::default_root().map(|r| r.exists()).unwrap_or(false),
    };
    let replaced = |library: &mut Option<LoraLibrary>, name: &str, weight: f64, role: Option<Role>| -> Result<Option<LoraChoice>> {
        if !lib_present || Path::new(name).is_file() || super::split_member(name).is_some() {
            return Ok(None);
        }
        open_library(library)?;
        let lib = library.as_ref().ok_or_else(|| Error::Argument("library".into()))?;
        match lib.replacement(name)? {
            Some((member, sub)) => Ok(Some(from_subspace(lib, name, &member, &sub, weight, role)?)),
            None => Ok(None),
        }
    };
    for (src, weight, role) in args {
        let p = Path::new(src);
        let choice = if let Some(c) = replaced(&mut library, src, *weight, *role)? {
            c
        } else if let Some((member, sub)) = super::split_member(src) {
            open_library(&mut library)?;
            from_subspace(library.as_ref().ok_or_else(|| Error::Argument("library".into()))?, src, member, sub, *weight, *role)?
        } else if p.is_file() {
            let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| src.clone());
            LoraChoice { name, path: p.to_path_buf(), weight: *weight, role: *role, schedule: None, subspace: None }
        } else if p.extension().is_some() || src.contains(['/', '\\']) {
            return Err(Error::Argument(format!("--lora {src}: no such file")));
        } else if let Some(c) = shipped(src, *weight, *role) {
            c
        } else {
            // `replaced` above has served a replaced entry already.
            open_library(&mut library)?;
            from_library(library.as_ref().ok_or_else(|| Error::Argument("library".into()))?, src, *weight, *role)?
        };
        out.push(choice);
    }
    for tag in prompt_tags {
        let mut c = match replaced(&mut library, &tag.name, tag.weight, None)?.or_else(|| shipped(&tag.name, tag.weight, None)) {
            Some(c) => c,
            None if super::split_member(&tag.name).is_some() => {
                let (member, sub) = super::split_member(&tag.name).ok_or_else(|| Error::Argument(tag.name.clone()))?;
                open_library(&mut library)?;
                from_subspace(library.as_ref().ok_or_else(|| Error::Argument("library".into()))?, &tag.name, member, sub, tag.weight, None)?
            }
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
