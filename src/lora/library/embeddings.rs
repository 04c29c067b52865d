//! Textual-inversion embeddings in the library: their own kind beside the LoRAs, with the same
//! content-addressed files (`embeddings/<sha256>.safetensors`), the same crash-safety rule (file
//! in place before its row, row deleted before its file) and the same dedupe by content.
//!
//! A diffusers embedding (a folder with `learned_embeds.safetensors` and
//! `learned_embeds_2.safetensors`) is stored in A1111's one-file layout (`clip_l`, `clip_g`),
//! which every SDXL app reads; its name is its token. A1111 files keep their bytes and go by
//! their stem. A preview image beside the file (`NAME.preview.png`, A1111's convention, or
//! `NAME.png` / `.jpg` / `.webp`) becomes the thumbnail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{db_err, free_display_name, now, LoraLibrary};
use crate::error::{Error, Result};
use crate::lora::network::sha256_hex;
use crate::sdxl::embedding::{EmbeddingInfo, TextualInversion};
use crate::weights::{f32_le_bytes, safetensors_bytes};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS embeddings (
    sha256        TEXT PRIMARY KEY,
    file_name     TEXT NOT NULL,
    display_name  TEXT NOT NULL UNIQUE,
    size          INTEGER NOT NULL,
    format        TEXT NOT NULL,
    vectors       INTEGER NOT NULL,
    widths        TEXT NOT NULL,
    thumbnail     TEXT,
    added_at      INTEGER NOT NULL
);
";

/// One embedding of the library, as `loramix embedding list --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingEntry {
    pub sha256: String,
    /// The imported file's (or folder's) name.
    pub file_name: String,
    /// The word that calls it in a prompt (A1111: the file stem).
    pub display_name: String,
    pub size: u64,
    /// `a1111` or `diffusers` (as imported; the library keeps A1111's layout).
    pub format: String,
    pub vectors: usize,
    /// Widths for the first and second text encoder (768 and 1280 on SDXL).
    pub widths: Vec<usize>,
    /// A `data:image/...;base64,` URI of the preview found beside the file.
    pub thumbnail: Option<String>,
    pub added_at: i64,
    pub path: PathBuf,
}

impl EmbeddingEntry {
    /// Loads the vectors, called by the entry's display name.
    pub fn load(&self) -> Result<TextualInversion> {
        TextualInversion::load(&self.path, Some(&self.display_name))
    }
}

/// A1111's preview beside an embedding, as a data URI.
fn preview_of(src: &Path) -> Option<String> {
    let stem = src.file_stem()?.to_string_lossy().to_string();
    let dir = src.parent()?;
    let name = if src.is_dir() { src.file_name()?.to_string_lossy().to_string() } else { stem };
    for (suffix, mime) in [(".preview.png", "png"), (".png", "png"), (".jpg", "jpeg"), (".jpeg", "jpeg"), (".webp", "webp")] {
        let p = dir.join(format!("{name}{suffix}"));
        if let Ok(bytes) = std::fs::read(&p) {
            // Only images that decode, and not huge ones (a thumbnail lives in the index).
            if bytes.len() <= 4 << 20 && image::load_from_memory(&bytes).is_ok() {
                return Some(format!("data:image/{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes)));
            }
        }
    }
    None
}

/// The bytes the library stores for `src`: an A1111 file as it is; a diffusers folder in
/// A1111's layout (f32).
fn stored_bytes(src: &Path, info: &EmbeddingInfo) -> Result<Vec<u8>> {
    if !src.is_dir() {
        return std::fs::read(src).map_err(|e| Error::io(src, e));
    }
    let ti = TextualInversion::load(src, None)?;
    let mut tensors = Vec::new();
    for (key, v) in ["clip_l", "clip_g"].iter().zip(&ti.vectors) {
        let vals: Vec<f32> = v.flatten_all()?.to_vec1()?;
        tensors.push((key.to_string(), v.dims().to_vec(), f32_le_bytes(&vals)));
    }
    let meta = HashMap::from([("diffusers_token".to_string(), info.token.clone().unwrap_or_default())]);
    safetensors_bytes(safetensors::Dtype::F32, &tensors, Some(meta), &src.display().to_string())
}

impl LoraLibrary {
    fn embeddings_dir(&self) -> PathBuf {
        self.root.join("embeddings")
    }

    fn embedding_path(&self, sha: &str) -> PathBuf {
        self.embeddings_dir().join(format!("{sha}.safetensors"))
    }

    pub(super) fn sweep_embeddings(&self) -> Result<()> {
        self.sweep_dir(&self.embeddings_dir(), "SELECT sha256 FROM embeddings")
    }

    fn row_to_embedding(&self, r: &rusqlite::Row) -> rusqlite::Result<EmbeddingEntry> {
        let sha: String = r.get("sha256")?;
        Ok(EmbeddingEntry {
            path: self.embedding_path(&sha),
            sha256: sha,
            file_name: r.get("file_name")?,
            display_name: r.get("display_name")?,
            size: r.get::<_, i64>("size")? as u64,
            format: r.get("format")?,
            vectors: r.get::<_, i64>("vectors")? as usize,
            widths: serde_json::from_str(&r.get::<_, String>("widths")?).unwrap_or_default(),
            thumbnail: r.get("thumbnail")?,
            added_at: r.get("added_at")?,
        })
    }

    /// Every embedding, by name.
    pub fn embeddings(&self) -> Result<Vec<EmbeddingEntry>> {
        let mut st = self.db.prepare("SELECT * FROM embeddings ORDER BY display_name COLLATE NOCASE").map_err(db_err(&self.root))?;
        let rows = st.query_map([], |r| self.row_to_embedding(r)).map_err(db_err(&self.root))?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err(&self.root))
    }

    /// An embedding by name (exact, then case-insensitive) or a sha256 prefix of 6+ characters.
    pub fn resolve_embedding(&self, key: &str) -> Result<EmbeddingEntry> {
        let all = self.embeddings()?;
        let found = all
            .iter()
            .find(|e| e.display_name == key)
            .or_else(|| all.iter().find(|e| e.display_name.eq_ignore_ascii_case(key)))
            .or_else(|| all.iter().find(|e| key.len() >= 6 && e.sha256.starts_with(&key.to_ascii_lowercase())));
        found.cloned().ok_or_else(|| {
            Error::Argument(format!("no embedding named '{key}' in the library at {} ({} embeddings)", self.root.display(), all.len()))
        })
    }

    fn embedding_by_sha(&self, sha: &str) -> Result<Option<EmbeddingEntry>> {
        self.db
            .query_row("SELECT * FROM embeddings WHERE sha256 = ?1", [sha], |r| self.row_to_embedding(r))
            .optional()
            .map_err(db_err(&self.root))
    }

    /// Imports one embedding (a file or a diffusers folder); the bool says it was new.
    pub(super) fn import_embedding(&mut self, src: &Path, info: &EmbeddingInfo) -> Result<(EmbeddingEntry, bool)> {
        // Validate the tensors (finite, loadable) before anything is written.
        let ti = TextualInversion::load(src, None)?;
        let bytes = stored_bytes(src, info)?;
        let sha = sha256_hex(&bytes);
        if let Some(existing) = self.embedding_by_sha(&sha)? {
            return Ok((existing, false));
        }
        let dir = self.embeddings_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::output::write_atomic(&self.embedding_path(&sha), &bytes)?;
        let file_name = src.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| format!("{sha}.safetensors"));
        // IMMEDIATE, and the same bytes looked for again inside: see `import_one`.
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err(&self.root))?;
        if tx.query_row("SELECT EXISTS(SELECT 1 FROM embeddings WHERE sha256 = ?1)", [&sha], |r| r.get::<_, bool>(0)).map_err(db_err(&self.root))? {
            drop(tx);
            let existing = self.embedding_by_sha(&sha)?.ok_or_else(|| Error::Argument("library embedding vanished".into()))?;
            return Ok((existing, false));
        }
        let display_name = free_display_name(&tx, &self.root, "embeddings", &ti.name, &sha)?;
        tx.execute(
            "INSERT INTO embeddings (sha256, file_name, display_name, size, format, vectors, widths, thumbnail, added_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                sha,
                file_name,
                display_name,
                bytes.len() as i64,
                info.format,
                info.vectors as i64,
                serde_json::to_string(&info.widths).unwrap_or_default(),
                preview_of(src),
                now()
            ],
        )
        .map_err(db_err(&self.root))?;
        tx.commit().map_err(db_err(&self.root))?;
        let entry = self.embedding_by_sha(&sha)?.ok_or_else(|| Error::Argument("library embedding vanished after insert".into()))?;
        Ok((entry, true))
    }

    /// Removes an embedding: the row first, then the file.
    pub fn remove_embedding(&mut self, key: &str) -> Result<EmbeddingEntry> {
        let e = self.resolve_embedding(key)?;
        self.delete_row_then_file("embeddings", &e.sha256, &e.path)?;
        Ok(e)
    }

    /// Renames an embedding: the new name is the word that calls it.
    pub fn rename_embedding(&mut self, key: &str, new_name: &str) -> Result<EmbeddingEntry> {
        let new_name = new_name.trim();
        if new_name.is_empty() || new_name.contains(['<', '>', ':', '(', ')', '[', ']', ',']) {
            return Err(Error::Argument(format!(
                "'{new_name}': an embedding name must be non-empty and contain none of < > : ( ) [ ] , (it is written in prompts)"
            )));
        }
        let e = self.resolve_embedding(key)?;
        self.set_display_name("embeddings", &e.sha256, new_name, "embedding")?;
        self.resolve_embedding(&e.sha256)
    }
}
