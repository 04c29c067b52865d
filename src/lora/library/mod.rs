//! The LoRA library: a content-addressed folder of LoRA files plus a SQLite index.
//!
//! Layout under the library root (the platform data dir, or `LORAMIX_HOME`):
//! `loras/<sha256>.safetensors` and `library.sqlite`. Files are named by content so that two
//! imports of the same bytes are one entry, and renaming an entry never touches the file.
//!
//! Crash safety. A file is copied to a temporary name, synced, and renamed into place *before*
//! its index row is committed, and a row is deleted *before* its file. So at every instant each
//! row points at a complete, verified file; the only possible leftovers are temporary files and
//! files without a row, which [`LoraLibrary::open`] sweeps away.
//!
//! Other processes. Every open library holds a shared lock on `library.lock`, and the sweep runs
//! only when its opener gets the lock alone: a file another process is still copying in, or has
//! renamed into place but not yet committed, looks like a leftover, so no sweep runs beside it.
//! The sweep removes only names this library writes (temporary files, `<sha256>.safetensors`),
//! never another file a user keeps in the folder, and keeps unindexed files while the index
//! has no rows at all (a new or lost index, not a crash's leftovers).
//!
//! Uses the LoRA core (`lora::{info, network}`: inspection, roles, hashes) and the weights
//! readers; the core never uses the library, so the arrow runs one way.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod choices;
mod embeddings;
mod subspaces;

pub use choices::{resolve_choices, LoraChoice};
pub use embeddings::EmbeddingEntry;
pub use subspaces::{split_member, SubspaceMember, SubspaceRequest, SubspaceSummary};

use crate::error::{Error, Result};
use crate::lora::network::{hex, sha256_hex};
use crate::lora::{inspect, Role};
use crate::weights::{SafetensorsFile, PICKLE_EXTENSIONS};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS loras (
    sha256        TEXT PRIMARY KEY,
    addnet_hash   TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    display_name  TEXT NOT NULL UNIQUE,
    size          INTEGER NOT NULL,
    format        TEXT NOT NULL,
    ranks         TEXT NOT NULL,
    alphas        TEXT NOT NULL,
    base_model    TEXT NOT NULL,
    module_count  INTEGER NOT NULL,
    trigger_words TEXT NOT NULL,
    role          TEXT NOT NULL,
    user_tags     TEXT NOT NULL,
    title         TEXT,
    thumbnail     TEXT,
    added_at      INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

/// One library entry, as listed by `loramix lora list --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraEntry {
    pub sha256: String,
    /// A1111 / Civitai "AutoV3" hash: sha256 of the tensor data after the header, so metadata
    /// edits do not change it. Its first 12 characters go in PNG `Lora hashes`.
    pub addnet_hash: String,
    pub file_name: String,
    /// The name used by `<lora:NAME:w>`; the file stem unless renamed.
    pub display_name: String,
    pub size: u64,
    pub format: String,
    pub ranks: Vec<usize>,
    pub alphas: Vec<f64>,
    pub base_model: String,
    pub module_count: usize,
    pub trigger_words: Vec<String>,
    pub role: String,
    pub user_tags: Vec<String>,
    pub title: Option<String>,
    pub thumbnail: Option<String>,
    /// Seconds since the Unix epoch.
    pub added_at: i64,
    /// Where the library keeps the file.
    pub path: PathBuf,
}

/// What happened to one file of an import.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ImportOutcome {
    Added { source: PathBuf, entry: Box<LoraEntry> },
    /// The same bytes were already in the library.
    Existing { source: PathBuf, entry: Box<LoraEntry> },
    /// A textual-inversion embedding; `existing`: its bytes were already in the library.
    Embedding { source: PathBuf, entry: Box<EmbeddingEntry>, existing: bool },
    Failed { source: PathBuf, error: String },
}

/// Filters for [`LoraLibrary::list`]; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct LoraQuery {
    /// Case-insensitive substring of name, file name, title, trigger words or tags.
    pub text: Option<String>,
    pub role: Option<Role>,
    /// Base model id (`sdxl`, `sd1`, ...).
    pub base: Option<String>,
    /// A user tag or trigger word, exact (case-insensitive).
    pub tag: Option<String>,
}

pub struct LoraLibrary {
    root: PathBuf,
    db: Connection,
    /// Held (shared) while open; see the module note.
    _lock: File,
}

fn db_err(root: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::BadFile { path: root.join("library.sqlite"), message: format!("library index: {e}") }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl LoraLibrary {
    /// `LORAMIX_HOME` if set, else the platform data dir (`~/.local/share/loramix`,
    /// `~/Library/Application Support/LoRAMix`, `%APPDATA%\LoRAMix\data`).
    pub fn default_root() -> Result<PathBuf> {
        if let Some(h) = std::env::var_os("LORAMIX_HOME").filter(|h| !h.is_empty()) {
            return Ok(PathBuf::from(h));
        }
        directories::ProjectDirs::from("", "", "LoRAMix")
            .map(|d| d.data_dir().to_path_buf())
            .ok_or_else(|| Error::Argument("cannot find a home directory for the LoRA library; set LORAMIX_HOME".into()))
    }

    /// Opens (creating if needed) the library at `root` and sweeps leftovers of interrupted
    /// imports and removals.
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("loras");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let db = Connection::open(root.join("library.sqlite")).map_err(db_err(root))?;
        db.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err(root))?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(db_err(root))?;
        db.pragma_update(None, "synchronous", "NORMAL").map_err(db_err(root))?;
        db.execute_batch(SCHEMA).map_err(db_err(root))?;
        db.execute_batch(subspaces::SCHEMA).map_err(db_err(root))?;
        db.execute_batch(embeddings::SCHEMA).map_err(db_err(root))?;
        let lock_path = root.join("library.lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // A file system without locks (some network mounts) opens the library all the same, and
        // then never sweeps: a leftover costs disk, a wrong sweep would cost a file.
        let alone = matches!(lock.try_lock(), Ok(()));
        let lib = Self { root: root.to_path_buf(), db, _lock: lock };
        if alone {
            let swept = lib.sweep().and_then(|_| lib.sweep_embeddings()).and_then(|_| lib.sweep_subspaces());
            lib._lock.unlock().map_err(|e| Error::io(&lock_path, e))?;
            swept?;
        }
        // Waits only while another opener sweeps.
        let _ = lib._lock.lock_shared();
        Ok(lib)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn files_dir(&self) -> PathBuf {
        self.root.join("loras")
    }

    fn stored_path(&self, sha: &str) -> PathBuf {
        self.files_dir().join(format!("{sha}.safetensors"))
    }

    /// Removes temporary files and files no row refers to.
    fn sweep(&self) -> Result<()> {
        self.sweep_dir(&self.files_dir(), "SELECT sha256 FROM loras")
    }

    /// Removes this library's temporary files from `dir`, and each `<sha256>.safetensors` whose
    /// hash `query` does not return (its row never committed, or deleted), unless `query`
    /// returns nothing at all. Other files are left alone.
    fn sweep_dir(&self, dir: &Path, query: &str) -> Result<()> {
        if !dir.is_dir() {
            return Ok(());
        }
        let known: std::collections::HashSet<String> = {
            let mut st = self.db.prepare(query).map_err(db_err(&self.root))?;
            let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err(&self.root))?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err(&self.root))?
        };
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            // `.import-<pid>-<t>.tmp` (imports) and `.<name>.tmp-<pid>-<n>` (`write_atomic`).
            let temporary = name.starts_with('.') && (name.ends_with(".tmp") || name.contains(".tmp-"));
            let stored = name.strip_suffix(".safetensors").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            let unindexed = stored.is_some_and(|h| !known.is_empty() && !known.contains(h));
            if (temporary || unindexed) && e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    fn row_to_entry(&self, r: &rusqlite::Row) -> rusqlite::Result<LoraEntry> {
        fn json_vec<T: serde::de::DeserializeOwned>(s: String) -> Vec<T> {
            serde_json::from_str(&s).unwrap_or_default()
        }
        let sha: String = r.get("sha256")?;
        Ok(LoraEntry {
            path: self.stored_path(&sha),
            sha256: sha,
            addnet_hash: r.get("addnet_hash")?,
            file_name: r.get("file_name")?,
            display_name: r.get("display_name")?,
            size: r.get::<_, i64>("size")? as u64,
            format: r.get("format")?,
            ranks: json_vec(r.get("ranks")?),
            alphas: json_vec(r.get("alphas")?),
            base_model: r.get("base_model")?,
            module_count: r.get::<_, i64>("module_count")? as usize,
            trigger_words: json_vec(r.get("trigger_words")?),
            role: r.get("role")?,
            user_tags: json_vec(r.get("user_tags")?),
            title: r.get("title")?,
            thumbnail: r.get("thumbnail")?,
            added_at: r.get("added_at")?,
        })
    }

    fn by_sha(&self, sha: &str) -> Result<Option<LoraEntry>> {
        self.db
            .query_row("SELECT * FROM loras WHERE sha256 = ?1", [sha], |r| self.row_to_entry(r))
            .optional()
            .map_err(db_err(&self.root))
    }

    /// All entries matching `q`, by display name.
    pub fn list(&self, q: &LoraQuery) -> Result<Vec<LoraEntry>> {
        let mut st = self.db.prepare("SELECT * FROM loras ORDER BY display_name COLLATE NOCASE").map_err(db_err(&self.root))?;
        let rows = st.query_map([], |r| self.row_to_entry(r)).map_err(db_err(&self.root))?;
        let all: Vec<LoraEntry> = rows.collect::<rusqlite::Result<_>>().map_err(db_err(&self.root))?;
        let lc = |s: &str| s.to_lowercase();
        Ok(all
            .into_iter()
            .filter(|e| q.role.is_none_or(|r| e.role == r.as_str()))
            .filter(|e| q.base.as_ref().is_none_or(|b| lc(&e.base_model) == lc(b)))
            .filter(|e| {
                q.tag.as_ref().is_none_or(|t| e.user_tags.iter().chain(&e.trigger_words).any(|x| lc(x) == lc(t)))
            })
            .filter(|e| {
                q.text.as_ref().is_none_or(|t| {
                    let t = lc(t);
                    let mut hay = vec![e.display_name.clone(), e.file_name.clone(), e.title.clone().unwrap_or_default()];
                    hay.extend(e.trigger_words.iter().cloned());
                    hay.extend(e.user_tags.iter().cloned());
                    hay.iter().any(|h| lc(h).contains(&t))
                })
            })
            .collect())
    }

    /// An entry by display name (exact, then case-insensitive), file name or stem, or a sha256
    /// prefix of at least 6 characters. Ambiguity is an error that lists the candidates.
    pub fn resolve(&self, key: &str) -> Result<LoraEntry> {
        let all = self.list(&LoraQuery::default())?;
        let pick = |v: Vec<&LoraEntry>| -> Option<Result<LoraEntry>> {
            match v.len() {
                0 => None,
                1 => Some(Ok(v[0].clone())),
                _ => Some(Err(Error::Argument(format!(
                    "'{key}' matches several LoRAs: {}",
                    v.iter().map(|e| format!("{} ({})", e.display_name, &e.sha256[..12])).collect::<Vec<_>>().join(", ")
                )))),
            }
        };
        let stem = |f: &str| Path::new(f).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        type Matcher<'a> = Box<dyn Fn(&LoraEntry) -> bool + 'a>;
        let hex = key.len() >= 6 && key.chars().all(|c| c.is_ascii_hexdigit());
        let tries: [Matcher; 5] = [
            Box::new(|e| e.display_name == key),
            Box::new(|e| e.display_name.eq_ignore_ascii_case(key)),
            Box::new(|e| e.file_name == key || stem(&e.file_name) == key),
            Box::new(|e| hex && e.sha256.starts_with(&key.to_ascii_lowercase())),
            // The hash PNGs record (`Lora hashes: "name: 392c0170f755"`, A1111's addnet hash).
            Box::new(|e| hex && e.addnet_hash.starts_with(&key.to_ascii_lowercase())),
        ];
        for t in tries.iter() {
            if let Some(r) = pick(all.iter().filter(|e| t(e)).collect()) {
                return r;
            }
        }
        Err(Error::Argument(format!(
            "no LoRA named '{key}' in the library at {} ({} entries; `loramix lora list` shows them)",
            self.root.display(),
            all.len()
        )))
    }

    /// Imports files and folders (recursively). Each file is validated as a LoRA from its
    /// header, hashed, deduplicated and copied in atomically; one file's failure does not stop
    /// the others. `on_file` sees each outcome as it happens.
    pub fn import(&mut self, paths: &[PathBuf], on_file: &mut dyn FnMut(&ImportOutcome)) -> Result<Vec<ImportOutcome>> {
        let mut files = Vec::new();
        let mut out = Vec::new();
        // A path that cannot be read fails alone; the other paths are still imported.
        for p in paths {
            if let Err(e) = collect_files(p, true, &mut files) {
                let outcome = ImportOutcome::Failed { source: p.clone(), error: e.to_string() };
                on_file(&outcome);
                out.push(outcome);
            }
        }
        for f in files {
            // Textual-inversion embeddings go to their own kind; anything else is read as a LoRA.
            if let Some(info) = crate::sdxl::embedding::EmbeddingInfo::recognise(&f) {
                let outcome = match info.and_then(|info| self.import_embedding(&f, &info)) {
                    Ok((entry, added)) => ImportOutcome::Embedding { source: f, entry: Box::new(entry), existing: !added },
                    Err(e) => ImportOutcome::Failed { source: f, error: e.to_string() },
                };
                on_file(&outcome);
                out.push(outcome);
                continue;
            }
            let outcome = match self.import_one(&f) {
                Ok((entry, true)) => ImportOutcome::Added { source: f, entry: Box::new(entry) },
                Ok((entry, false)) => ImportOutcome::Existing { source: f, entry: Box::new(entry) },
                Err(e) => ImportOutcome::Failed { source: f, error: e.to_string() },
            };
            on_file(&outcome);
            out.push(outcome);
        }
        Ok(out)
    }

    fn import_one(&mut self, src: &Path) -> Result<(LoraEntry, bool)> {
        let file = SafetensorsFile::open(src)?;
        let info = inspect(&file)?;
        file.check_finite()?;
        let addnet_hash = sha256_hex(file.data_bytes());
        drop(file);
        // Copy while hashing: one read of the source.
        let tmp = self.files_dir().join(format!(".import-{}-{}.tmp", std::process::id(), rand_suffix()));
        let (sha, size) = match copy_hashing(src, &tmp) {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Some(existing) = self.by_sha(&sha)? {
            // An entry whose file went missing (deleted by hand) gets it back.
            if !existing.path.exists() && std::fs::rename(&tmp, &existing.path).is_ok() {
                return Ok((existing, false));
            }
            let _ = std::fs::remove_file(&tmp);
            return Ok((existing, false));
        }
        let dest = self.stored_path(&sha);
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&dest, e)
        })?;
        let file_name = src.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| format!("{sha}.safetensors"));
        // A name is written in `<lora:NAME:weight>` and in a picture's one-line settings, so the
        // characters that tag cannot hold, and control characters (a newline), become `_`.
        let stem: String = Path::new(&file_name).file_stem().map(|s| s.to_string_lossy().replace(|c: char| matches!(c, '<' | '>' | ':') || c.is_control(), "_").trim().to_string()).unwrap_or_default();
        let stem = if stem.is_empty() { sha[..12].to_string() } else { stem };
        // IMMEDIATE: another process importing now waits here, so its row (the same bytes, or
        // the same name) is seen before this one picks a name or inserts.
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err(&self.root))?;
        if tx.query_row("SELECT EXISTS(SELECT 1 FROM loras WHERE sha256 = ?1)", [&sha], |r| r.get::<_, bool>(0)).map_err(db_err(&self.root))? {
            drop(tx);
            let existing = self.by_sha(&sha)?.ok_or_else(|| Error::Argument("library entry vanished".into()))?;
            return Ok((existing, false));
        }
        let display_name = free_display_name(&tx, &self.root, "loras", &stem, &sha)?;
        tx.execute(
            "INSERT INTO loras (sha256, addnet_hash, file_name, display_name, size, format, ranks, alphas, base_model,
                                module_count, trigger_words, role, user_tags, title, thumbnail, added_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, '[]', ?13, ?14, ?15)",
            params![
                sha,
                addnet_hash,
                file_name,
                display_name,
                size as i64,
                info.format.as_str(),
                serde_json::to_string(&info.ranks).unwrap_or_default(),
                serde_json::to_string(&info.alphas).unwrap_or_default(),
                info.base_model.id(),
                info.module_count as i64,
                serde_json::to_string(&info.trigger_words).unwrap_or_default(),
                info.role.as_str(),
                info.title,
                info.thumbnail,
                now(),
            ],
        )
        .map_err(db_err(&self.root))?;
        tx.commit().map_err(db_err(&self.root))?;
        let entry = self.by_sha(&sha)?.ok_or_else(|| Error::Argument("library entry vanished after insert".into()))?;
        Ok((entry, true))
    }

    /// Removes an entry: the row first, then the file (see the module note on crash safety).
    pub fn remove(&mut self, key: &str) -> Result<LoraEntry> {
        let e = self.resolve(key)?;
        self.delete_row_then_file("loras", &e.sha256, &e.path)?;
        Ok(e)
    }

    pub fn rename(&mut self, key: &str, new_name: &str) -> Result<LoraEntry> {
        let new_name = new_name.trim();
        if new_name.is_empty() || new_name.contains(['<', '>', ':']) || new_name.contains(char::is_control) {
            return Err(Error::Argument(format!("{new_name:?}: a LoRA name must be non-empty and contain no '<', '>', ':' or control character such as a newline (it is used in <lora:NAME:weight> and in a picture's settings line)")));
        }
        let e = self.resolve(key)?;
        self.set_display_name("loras", &e.sha256, new_name, "LoRA")?;
        self.resolve(&e.sha256)
    }

    pub fn set_role(&mut self, key: &str, role: Role) -> Result<LoraEntry> {
        let e = self.resolve(key)?;
        self.db.execute("UPDATE loras SET role = ?1 WHERE sha256 = ?2", params![role.as_str(), e.sha256]).map_err(db_err(&self.root))?;
        self.resolve(&e.sha256)
    }

    pub fn set_tags(&mut self, key: &str, tags: &[String]) -> Result<LoraEntry> {
        let e = self.resolve(key)?;
        let mut clean: Vec<String> = vec![];
        for t in tags.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            if !clean.iter().any(|c| c == t) {
                clean.push(t.to_string());
            }
        }
        let json = serde_json::to_string(&clean).unwrap_or_else(|_| "[]".into());
        self.db.execute("UPDATE loras SET user_tags = ?1 WHERE sha256 = ?2", params![json, e.sha256]).map_err(db_err(&self.root))?;
        self.resolve(&e.sha256)
    }
}

/// `name`, or `name-<sha[..6]>` when `table` already has an entry of that display name (the
/// same file name imported from two places).
fn free_display_name(tx: &rusqlite::Transaction, root: &Path, table: &str, name: &str, sha: &str) -> Result<String> {
    let taken: bool = tx
        .query_row(&format!("SELECT EXISTS(SELECT 1 FROM {table} WHERE display_name = ?1)"), [name], |r| r.get(0))
        .map_err(db_err(root))?;
    Ok(if taken { format!("{name}-{}", &sha[..6]) } else { name.to_string() })
}

impl LoraLibrary {
    /// Deletes a row, then its file (the module note's order: a row never points at a missing file).
    fn delete_row_then_file(&self, table: &str, sha: &str, file: &Path) -> Result<()> {
        self.db.execute(&format!("DELETE FROM {table} WHERE sha256 = ?1"), [sha]).map_err(db_err(&self.root))?;
        let _ = std::fs::remove_file(file);
        Ok(())
    }

    /// Sets a row's display name; a name another row has is refused, naming `what` it is.
    fn set_display_name(&self, table: &str, sha: &str, new_name: &str, what: &str) -> Result<()> {
        self.db
            .execute(&format!("UPDATE {table} SET display_name = ?1 WHERE sha256 = ?2"), params![new_name, sha])
            .map_err(|err| match err {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    Error::Argument(format!("another {what} is already named '{new_name}'"))
                }
                other => db_err(&self.root)(other),
            })?;
        Ok(())
    }
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{t:x}")
}

/// Copies `src` to `tmp` (synced) and returns its sha256 and size.
fn copy_hashing(src: &Path, tmp: &Path) -> Result<(String, u64)> {
    let mut input = File::open(src).map_err(|e| Error::io(src, e))?;
    let mut output = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(|e| Error::io(src, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).map_err(|e| Error::io(tmp, e))?;
        size += n as u64;
    }
    output.sync_all().map_err(|e| Error::io(tmp, e))?;
    Ok((hex(&hasher.finalize()), size))
}

/// Files to import under `p`: every file named explicitly; inside folders, `.safetensors` files
/// and pickles (which then fail with the refusal message), skipping images, notes and the like.
fn collect_files(p: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    if meta.is_dir() && crate::sdxl::embedding::is_diffusers_embedding(p) {
        // A diffusers embedding is one folder holding a pair of files.
        out.push(p.to_path_buf());
    } else if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| Error::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            collect_files(&e, false, out)?;
        }
    } else if explicit {
        out.push(p.to_path_buf());
    } else {
        let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
        let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if !hidden && (ext == "safetensors" || PICKLE_EXTENSIONS.contains(&ext.as_str())) {
            out.push(p.to_path_buf());
        }
    }
    Ok(())
}
