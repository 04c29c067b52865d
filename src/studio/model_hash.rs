//! A1111's `Model hash`: the first ten hex digits of a single-file checkpoint's sha256, which
//! Civitai and the A1111 family read to name the checkpoint an image came from.
//!
//! Hashing a 7 GB checkpoint takes seconds, so each file's sha256 is kept, as A1111 keeps its
//! `cache.json`: in `model-hashes.json` beside the LoRA library (`LORAMIX_HOME` or the platform
//! data folder), keyed by absolute path and valid while the file's size and modification time
//! stay the same. A hash is metadata: when the file cannot be read or the cache cannot be written,
//! the image is still made, without the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// The in-process copy, so a batch reads the cache file once.
static MEMO: Mutex<BTreeMap<PathBuf, Entry>> = Mutex::new(BTreeMap::new());

fn cache_file() -> Option<PathBuf> {
    crate::lora::library::LoraLibrary::default_root().ok().map(|r| r.join("model-hashes.json"))
}

fn stamp(path: &Path) -> Option<(u64, u128)> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    Some((m.len(), mtime))
}

/// Only single files are hashed: A1111 has no hash for a diffusers folder or a hub repo id.
fn checkpoint_file(model: &str) -> Option<PathBuf> {
    let p = Path::new(model);
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    (ext == "safetensors" && p.is_file()).then(|| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// The cache's entries; a hand-edited or damaged entry (not 64 hex digits) is left out.
fn read_cache(file: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut all: BTreeMap<PathBuf, Entry> = std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    all.retain(|_, e| e.sha256.len() == 64 && e.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
    all
}

fn lookup(path: &Path, (size, mtime_ns): (u64, u128), cache: Option<&Path>) -> Option<String> {
    let valid = |e: &Entry| e.size == size && e.mtime_ns == mtime_ns;
    let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = memo.get(path).filter(|e| valid(e)) {
        return Some(e.sha256.clone());
    }
    let e = read_cache(cache?).remove(path).filter(valid)?;
    memo.insert(path.to_path_buf(), e.clone());
    Some(e.sha256)
}

/// The checkpoint's sha256 if it was hashed before (the API lists models with it without
/// reading them).
pub fn cached_model_sha256(model: &str) -> Option<String> {
    cached_in(model, cache_file().as_deref())
}

/// The checkpoint's sha256, hashed now if the cache has none for this version of the file.
pub fn model_sha256(model: &str) -> Option<String> {
    hash_in(model, cache_file().as_deref())
}

fn cached_in(model: &str, cache: Option<&Path>) -> Option<String> {
    let path = checkpoint_file(model)?;
    lookup(&path, stamp(&path)?, cache)
}

/// `cache: None` keeps the hash in this process only (tests).
pub(crate) fn hash_in(model: &str, cache: Option<&Path>) -> Option<String> {
    let path = checkpoint_file(model)?;
    let before = stamp(&path)?;
    if let Some(h) = lookup(&path, before, cache) {
        return Some(h);
    }
    let sha256 = crate::weights::file_sha256(&path).ok()?;
    // A file rewritten while it was read has no hash worth keeping.
    if stamp(&path)? != before {
        return None;
    }
    let entry = Entry { size: before.0, mtime_ns: before.1, sha256: sha256.clone() };
    MEMO.lock().unwrap_or_else(|e| e.into_inner()).insert(path.clone(), entry.clone());
    if let Some(file) = cache {
        // Re-read just before writing: another process may have added its own entries.
        let mut all = read_cache(file);
        all.insert(path, entry);
        if let (Some(dir), Ok(bytes)) = (file.parent(), serde_json::to_vec_pretty(&all)) {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = crate::output::write_atomic(file, &bytes);
            }
        }
    }
    Some(sha256)
}

/// A1111's short form of a sha256 (`sd_models.CheckpointInfo.shorthash`).
pub fn shorthash(sha256: &str) -> &str {
    sha256.get(..10).unwrap_or(sha256)
}

/// The checkpoint's short hash, hashed now if need be.
pub fn model_shorthash(model: &str) -> Option<String> {
    model_sha256(model).map(|h| shorthash(&h).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_single_files_only_and_notices_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("home/model-hashes.json");
        let cache = Some(cache.as_path());
        let f = dir.path().join("ckpt.safetensors");
        std::fs::write(&f, b"abc").unwrap();
        let s = f.to_str().unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; // sha256("abc")
        assert_eq!(cached_in(s, cache), None);
        assert_eq!(hash_in(s, cache).as_deref(), Some(abc));
        // Served from the file, not only from this process's memo.
        MEMO.lock().unwrap().clear();
        assert_eq!(cached_in(s, cache).as_deref(), Some(abc));
        std::fs::write(&f, b"abcd").unwrap();
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(t).unwrap();
        assert_eq!(cached_in(s, cache), None, "a changed file's old hash is not served");
        assert_eq!(hash_in(s, cache).as_deref().map(|h| &h[..10]), Some("88d4266fd4"));
        assert_eq!(hash_in(dir.path().to_str().unwrap(), cache), None, "a folder has no A1111 hash");
        assert_eq!(hash_in("stabilityai/stable-diffusion-xl-base-1.0", cache), None);
    }
}
