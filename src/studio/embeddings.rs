//! Which textual-inversion embeddings a job can call by name, as A1111 gathers them: those
//! shipped with the model (`<model>/embeddings/`), the library's, then the files and folders
//! the job names (later ones win on a shared name).

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::lora::library::LoraLibrary;
use crate::sdxl::embedding::{is_diffusers_embedding, Embeddings, TextualInversion};
use crate::sdxl::pipeline::{GenerateRequest, SdxlPipeline};

/// The embeddings for a job on `model`. The library is read only when it exists (a job never
/// creates one); a named file or folder that cannot be used is an error naming it, while
/// unusable files inside scanned folders are left out (A1111's "skipped" embeddings).
pub fn job_embeddings(model: &str, library: Option<&Path>, named: &[String]) -> Result<Embeddings> {
    let mut skipped = Vec::new();
    let mut items = Embeddings::scan_dir(&Path::new(model).join("embeddings"), &mut skipped)?;
    let root = match library {
        Some(r) => Some(r.to_path_buf()),
        None => LoraLibrary::default_root().ok(),
    };
    if let Some(root) = root.filter(|r| r.join("library.sqlite").is_file()) {
        let lib = LoraLibrary::open(&root)?;
        for e in lib.embeddings()? {
            items.push(Arc::new(e.load()?));
        }
    }
    for n in named {
        let p = Path::new(n);
        if p.is_dir() && !is_diffusers_embedding(p) {
            items.extend(Embeddings::scan_dir(p, &mut skipped)?);
        } else {
            items.push(Arc::new(TextualInversion::load(p, None)?));
        }
    }
    Ok(Embeddings::new(items))
}

/// A1111's `TI hashes`: each embedding the prompts call, `name: shorthash`, in order of use.
pub fn embedding_hashes(pipe: &SdxlPipeline, req: &GenerateRequest) -> Result<Vec<(String, String)>> {
    if req.embeddings.is_empty() {
        return Ok(Vec::new());
    }
    let text = pipe.text()?;
    let mut out: Vec<(String, String)> = Vec::new();
    for p in std::iter::once(req.prompt.as_str()).chain(req.negative_prompt.as_deref()) {
        for k in text.used_embeddings(p, &req.embeddings)? {
            let e = &req.embeddings.items()[k];
            // A1111 drops ':' and ',' from the name, which would break the list's syntax.
            let name = e.name.replace([':', ','], "");
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, e.shorthash().to_string()));
            }
        }
    }
    Ok(out)
}
