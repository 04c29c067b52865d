//! Subspaces in the library: the components of each subspace in one safetensors file under
//! `subspaces/` (named by its sha256), and every member's loadings, error and original size in
//! the index.
//!
//! Crash safety follows the library's rule: the components file is written atomically before
//! the rows that name it are committed (in one transaction), so a crash leaves either the old
//! state or the whole new subspace; a file no row names is swept on open. Each read checks the
//! file's size and hash against the index, so a deleted or truncated file is reported as such.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{db_err, now, LoraEntry, LoraLibrary};
use crate::error::{Error, Result};
use crate::lora::network::{sha256_hex, LoadedLora};
use loramix_models::BranchWeights;
use crate::lora::subspace::{self, Centering, ComponentRule, MemberFactors, ModuleBasis, Storage, SubspaceHeader};
use crate::lora::targets::AdapterTargets;
use crate::lora::LoraInfo;
use crate::weights::SafetensorsFile;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS subspaces (
    name        TEXT PRIMARY KEY,
    base_model  TEXT NOT NULL,
    centering   TEXT NOT NULL,
    rule        TEXT NOT NULL,
    storage     TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    file_size   INTEGER NOT NULL,
    modules     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subspace_members (
    subspace      TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    addnet_hash   TEXT NOT NULL,
    info          TEXT NOT NULL,
    original_size INTEGER NOT NULL,
    loadings      BLOB NOT NULL,
    error         REAL NOT NULL,
    module_errors TEXT NOT NULL,
    in_basis      INTEGER NOT NULL,
    PRIMARY KEY (subspace, sha256)
);
CREATE TABLE IF NOT EXISTS replaced (
    sha256       TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    subspace     TEXT NOT NULL
);
";

/// One member as `lora subspace show` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SubspaceMember {
    pub display_name: String,
    pub sha256: String,
    /// Relative ΔW error of the reconstruction over all modules (‖ΔŴ − ΔW‖ / ‖ΔW‖).
    pub error: f64,
    pub module_errors: BTreeMap<String, f64>,
    /// The member's original file, in bytes.
    pub original_bytes: u64,
    /// Its loadings in the index, in bytes.
    pub loadings_bytes: u64,
    /// Built from it (true) or projected in afterwards with `add` (false).
    pub in_basis: bool,
    /// Whether the original file is still in the library.
    pub original_present: bool,
    /// Served from the subspace in place of the original ("Replace originals").
    pub replaced: bool,
}

/// A subspace with its members and storage.
#[derive(Debug, Clone, Serialize)]
pub struct SubspaceSummary {
    pub name: String,
    pub base_model: String,
    pub centering: Centering,
    pub rule: ComponentRule,
    pub storage: Storage,
    pub modules: usize,
    pub file: PathBuf,
    /// The components file, in bytes.
    pub components_bytes: u64,
    pub members: Vec<SubspaceMember>,
    /// Σ original files.
    pub bytes_before: u64,
    /// Components + Σ loadings.
    pub bytes_after: u64,
    pub ratio: f64,
}

/// What `lora subspace build` is asked for.
pub struct SubspaceRequest<'a> {
    pub name: &'a str,
    /// Library names or hashes; empty with `all`.
    pub members: &'a [String],
    pub all: bool,
    /// With `all`: only entries of this base model id.
    pub base: Option<&'a str>,
    pub centering: Centering,
    pub rule: ComponentRule,
    pub storage: Storage,
    /// A control: random orthonormal components of the same K instead of the principal ones
    /// (seeded), to test whether the subspace is what helps.
    pub random_basis: Option<u64>,
}

impl LoraLibrary {
    fn subspaces_dir(&self) -> PathBuf {
        self.root.join("subspaces")
    }

    /// Removes components files no subspace row names (a build that crashed before its commit).
    pub(super) fn sweep_subspaces(&self) -> Result<()> {
        self.sweep_dir(&self.subspaces_dir(), "SELECT file_sha256 FROM subspaces")
    }

    fn member_entries(&self, req: &SubspaceRequest) -> Result<Vec<LoraEntry>> {
        let entries = if req.all {
            if !req.members.is_empty() {
                return Err(Error::Argument("give member names or --all, not both".into()));
            }
            let q = super::LoraQuery { base: req.base.map(str::to_string), ..Default::default() };
            self.list(&q)?
        } else {
            // A LoRA named twice is one member.
            let mut out: Vec<LoraEntry> = vec![];
            for e in req.members.iter().map(|k| self.resolve(k)) {
                let e = e?;
                if !out.iter().any(|o| o.sha256 == e.sha256) {
                    out.push(e);
                }
            }
            out
        };
        if entries.len() < 2 {
            return Err(Error::Argument(format!(
                "a subspace needs at least 2 LoRAs; {} matched{}",
                entries.len(),
                req.base.map(|b| format!(" base model {b}")).unwrap_or_default()
            )));
        }
        let base = &entries[0].base_model;
        if let Some(other) = entries.iter().find(|e| &e.base_model != base) {
            return Err(Error::Argument(format!(
                "{} is a LoRA for {} but {} is for {}: a subspace holds LoRAs of one base model (pass --base to pick one)",
                entries[0].display_name, base, other.display_name, other.base_model
            )));
        }
        let mut seen = std::collections::HashSet::new();
        Ok(entries.into_iter().filter(|e| seen.insert(e.sha256.clone())).collect())
    }

    /// Builds subspace `req.name` from library LoRAs resolved against `targets` (the model's
    /// layers give each module its path and shape). Nothing is written unless all succeeds.
    pub fn build_subspace(&mut self, req: &SubspaceRequest, targets: &AdapterTargets) -> Result<SubspaceSummary> {
        let name = req.name.trim();
        if name.is_empty() || name.contains(['<', '>', ':', '@', '/', '\\']) {
            return Err(Error::Argument(format!("subspace name {name:?}: expected a non-empty name without < > : @ / \\")));
        }
        if self.subspace_row(name)?.is_some() {
            return Err(Error::Argument(format!("subspace {name} exists already; remove it first (loramix lora subspace rm {name})")));
        }
        let rule = req.rule.validate()?;
        let entries = self.member_entries(req)?;
        let mut loaded: Vec<(LoraEntry, LoadedLora, MemberFactors)> = Vec::new();
        for e in entries {
            let l = LoadedLora::load(&e.path, &e.display_name, targets)?;
            let f = subspace::member_factors(&l, targets)?;
            loaded.push((e, l, f));
        }
        let factors: Vec<MemberFactors> = loaded.iter().map(|(_, _, f)| f.clone()).collect();
        let mut basis = subspace::build(&factors, req.centering, rule)?;
        if let Some(seed) = req.random_basis {
            basis = subspace::random_like(&basis, seed)?;
        }
        basis.values_mut().for_each(|b| b.round(req.storage));
        let header = SubspaceHeader {
            name: name.to_string(),
            base_model: loaded[0].0.base_model.clone(),
            centering: req.centering,
            rule,
            storage: req.storage,
        };
        let bytes = subspace::components_bytes(&header, &basis)?;
        let sha = sha256_hex(&bytes);
        let mut rows = Vec::new();
        for (e, l, f) in &loaded {
            let (loadings, err) = subspace::project(&basis, f, req.storage)?;
            rows.push((e.clone(), l.addnet_hash.clone(), l.info.clone(), subspace::loadings_bytes(&loadings, req.storage)?, err));
        }
        let dir = self.subspaces_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        crate::output::write_atomic(&dir.join(format!("{sha}.safetensors")), &bytes)?;
        // IMMEDIATE: a write after a read in a deferred transaction can meet another process's
        // commit and fail at once (SQLITE_BUSY_SNAPSHOT); this one waits its turn instead.
        let tx = self.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_err(&self.root))?;
        tx.execute(
            "INSERT INTO subspaces (name, base_model, centering, rule, storage, file_sha256, file_size, modules, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![name, header.base_model, req.centering.as_str(), json(&rule)?, req.storage.as_str(), sha, bytes.len() as i64, basis.len() as i64, now()],
        )
        .map_err(db_err(&self.root))?;
        for (e, hash, info, lb, err) in &rows {
            insert_member(&tx, name, e, hash, info, lb, err, true).map_err(db_err(&self.root))?;
        }
        tx.commit().map_err(db_err(&self.root))?;
        self.subspace(name)
    }

    fn subspace_row(&self, name: &str) -> Result<Option<(SubspaceHeader, String, u64)>> {
        self.db
            .query_row("SELECT base_model, centering, rule, storage, file_sha256, file_size FROM subspaces WHERE name = ?1", [name], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, String>(4)?, r.get::<_, i64>(5)?))
            })
            .optional()
            .map_err(db_err(&self.root))?
            .map(|(base, c, rule, storage, sha, size)| {
                let centering = Centering::parse(&c)?;
                let rule: ComponentRule = serde_json::from_str(&rule).map_err(|e| Error::Argument(format!("subspace {name}: rule {rule:?}: {e}")))?;
                let storage = Storage::parse(&storage)?;
                Ok((SubspaceHeader { name: name.to_string(), base_model: base, centering, rule, storage }, sha, size as u64))
            })
            .transpose()
    }

    /// Every subspace, by name.
    pub fn subspaces(&self) -> Result<Vec<SubspaceSummary>> {
        let names: Vec<String> = {
            let mut st = self.db.prepare("SELECT name FROM subspaces ORDER BY name COLLATE NOCASE").map_err(db_err(&self.root))?;
            let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err(&self.root))?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err(&self.root))?
        };
        names.iter().map(|n| self.subspace(n)).collect()
    }

    /// One subspace with its members' errors and the storage before and after.
    pub fn subspace(&self, name: &str) -> Result<SubspaceSummary> {
        let (header, sha, size) = self.subspace_row(name)?.ok_or_else(|| self.unknown_subspace(name))?;
        let mut st = self
            .db
            .prepare(
                "SELECT display_name, sha256, error, module_errors, original_size, length(loadings), in_basis FROM subspace_members \
                 WHERE subspace = ?1 ORDER BY display_name COLLATE NOCASE",
            )
            .map_err(db_err(&self.root))?;
        let rows = st
            .query_map([name], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(db_err(&self.root))?;
        let mut members = Vec::new();
        for row in rows {
            let (display_name, sha256, error, module_errors, original, lb, in_basis) = row.map_err(db_err(&self.root))?;
            let replaced: Option<String> = self
                .db
                .query_row("SELECT subspace FROM replaced WHERE sha256 = ?1", [&sha256], |r| r.get(0))
                .optional()
                .map_err(db_err(&self.root))?;
            members.push(SubspaceMember {
                original_present: self.by_sha(&sha256)?.is_some(),
                replaced: replaced.as_deref() == Some(name),
                display_name,
                sha256,
                error,
                module_errors: serde_json::from_str(&module_errors).unwrap_or_default(),
                original_bytes: original as u64,
                loadings_bytes: lb as u64,
                in_basis: in_basis != 0,
            });
        }
        let modules: i64 = self.db.query_row("SELECT modules FROM subspaces WHERE name = ?1", [name], |r| r.get(0)).map_err(db_err(&self.root))?;
        let before: u64 = members.iter().map(|m| m.original_bytes).sum();
        let after = size + members.iter().map(|m| m.loadings_bytes).sum::<u64>();
        Ok(SubspaceSummary {
            name: name.to_string(),
            base_model: header.base_model,
            centering: header.centering,
            rule: header.rule,
            storage: header.storage,
            modules: modules as usize,
            file: self.subspaces_dir().join(format!("{sha}.safetensors")),
            components_bytes: size,
            members,
            bytes_before: before,
            bytes_after: after,
            ratio: if after > 0 { before as f64 / after as f64 } else { 0.0 },
        })
    }

    fn unknown_subspace(&self, name: &str) -> Error {
        let known: Vec<String> = self.subspaces().map(|v| v.into_iter().map(|s| s.name).collect()).unwrap_or_default();
        Error::Argument(format!(
            "no subspace named {name:?} in the library at {}{}",
            self.root.display(),
            if known.is_empty() { " (it has none; build one with loramix lora subspace build)".to_string() } else { format!(" (it has: {})", known.join(", ")) }
        ))
    }

    /// The subspace's header and bases, after checking its file against the index.
    pub fn load_subspace(&self, name: &str) -> Result<(SubspaceHeader, BTreeMap<String, ModuleBasis>)> {
        let (_, sha, size) = self.subspace_row(name)?.ok_or_else(|| self.unknown_subspace(name))?;
        let path = self.subspaces_dir().join(format!("{sha}.safetensors"));
        let bad = |m: String| Error::BadFile { path: path.clone(), message: m };
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad(format!("the components file of subspace {name} is missing (deleted?); rebuild the subspace")),
            _ => Error::io(&path, e),
        })?;
        if bytes.len() as u64 != size || sha256_hex(&bytes) != sha {
            return Err(bad(format!(
                "the components file of subspace {name} is damaged ({} bytes, the index expects {size} with sha256 {}…); rebuild the subspace",
                bytes.len(),
                &sha[..12]
            )));
        }
        subspace::read_components(&SafetensorsFile::from_bytes(&path, bytes)?)
    }

    /// Projects a library LoRA that is not a member onto subspace `name` and records it as a
    /// member (`in_basis` false). Refused when one of its modules has a rank above what the
    /// basis holds there, or a layer the basis does not cover.
    pub fn add_to_subspace(&mut self, name: &str, key: &str, targets: &AdapterTargets) -> Result<SubspaceMember> {
        let (header, basis) = self.load_subspace(name)?;
        let e = self.resolve(key)?;
        if e.base_model != header.base_model {
            return Err(Error::Argument(format!(
                "{} is a LoRA for {} but subspace {name} holds {} LoRAs",
                e.display_name, e.base_model, header.base_model
            )));
        }
        let member: Option<String> =
            self.db.query_row("SELECT display_name FROM subspace_members WHERE subspace = ?1 AND sha256 = ?2", [name, &e.sha256], |r| r.get(0)).optional().map_err(db_err(&self.root))?;
        if let Some(m) = member {
            return Err(Error::Argument(format!("{} is already a member of subspace {name} (as {m})", e.display_name)));
        }
        let l = LoadedLora::load(&e.path, &e.display_name, targets)?;
        let (loadings, err) = if l.modules.iter().any(|m| matches!(m.weights, BranchWeights::Dense(_))) {
            if header.centering != Centering::Uncentred {
                return Err(Error::Argument(format!(
                    "{} has dense modules (LoHa, LoKr or full ΔW, not up·down factors), which join uncentred subspaces only, and {name} is {}",
                    e.display_name,
                    header.centering.as_str()
                )));
            }
            subspace::project_dense(&basis, &l, targets, header.storage)?
        } else {
            self.project_low_rank(name, &e.display_name, &basis, &l, targets, header.storage)?
        };
        let lb = subspace::loadings_bytes(&loadings, header.storage)?;
        let tx = self.db.transaction().map_err(db_err(&self.root))?;
        insert_member(&tx, name, &e, &l.addnet_hash, &l.info, &lb, &err, false).map_err(db_err(&self.root))?;
        tx.commit().map_err(db_err(&self.root))?;
        self.subspace(name)?
            .members
            .into_iter()
            .find(|m| m.sha256 == e.sha256)
            .ok_or_else(|| Error::Argument("subspace member vanished after insert".into()))
    }

    /// A low-rank LoRA's loadings on `basis`, refused where a module's rank exceeds the
    /// components kept there (its projection would lose directions a member never had).
    #[allow(clippy::too_many_arguments)]
    fn project_low_rank(
        &self,
        name: &str,
        display_name: &str,
        basis: &BTreeMap<String, ModuleBasis>,
        l: &LoadedLora,
        targets: &AdapterTargets,
        storage: Storage,
    ) -> Result<(BTreeMap<String, subspace::ModuleLoadings>, subspace::ReconstructionError)> {
        let f = subspace::member_factors(l, targets)?;
        for (path, m) in &f {
            if let Some(b) = basis.get(path) {
                let k = b.up.k.min(b.down.k);
                if m.rank > k {
                    return Err(Error::Argument(format!(
                        "{display_name}: module {path} has rank {} but subspace {name} keeps only {k} components there, so it cannot hold this LoRA; \
                         rebuild the subspace with more components (--components) or with this LoRA as a member",
                        m.rank
                    )));
                }
            }
        }
        subspace::project(basis, &f, storage)
    }

    /// "Replace originals": members whose ΔW error is at most `max_error` are served from the
    /// subspace wherever their library name is used (`--lora NAME`, `<lora:NAME:w>`). The
    /// original files stay (so [`Self::restore_originals`] is always a way back) until the user
    /// removes them. Returns the members replaced now.
    pub fn replace_originals(&mut self, name: &str, max_error: f64) -> Result<Vec<SubspaceMember>> {
        if !(max_error.is_finite() && max_error >= 0.0) {
            return Err(Error::Argument(format!("--max-error {max_error}: expected a relative ΔW error >= 0, e.g. 0.05")));
        }
        let s = self.subspace(name)?;
        let chosen: Vec<SubspaceMember> = s.members.into_iter().filter(|m| m.error <= max_error && m.original_present).collect();
        let tx = self.db.transaction().map_err(db_err(&self.root))?;
        for m in &chosen {
            tx.execute("INSERT OR REPLACE INTO replaced (sha256, display_name, subspace) VALUES (?1, ?2, ?3)", params![m.sha256, m.display_name, name])
                .map_err(db_err(&self.root))?;
        }
        tx.commit().map_err(db_err(&self.root))?;
        Ok(chosen.into_iter().map(|m| SubspaceMember { replaced: true, ..m }).collect())
    }

    /// Serves subspace `name`'s replaced members from their original files again; refused for a
    /// member whose original was removed (the subspace is then its only copy).
    pub fn restore_originals(&mut self, name: &str) -> Result<usize> {
        let s = self.subspace(name)?;
        if let Some(m) = s.members.iter().find(|m| m.replaced && !m.original_present) {
            return Err(Error::Argument(format!(
                "{}'s original file was removed from the library, so subspace {name} is its only copy; import the original again first",
                m.display_name
            )));
        }
        let n = self.db.execute("DELETE FROM replaced WHERE subspace = ?1", [name]).map_err(db_err(&self.root))?;
        Ok(n)
    }

    /// The (member, subspace) that serves library name `key` in place of its original, if any:
    /// by the entry's hash while the original exists, else by the member's name.
    pub fn replacement(&self, key: &str) -> Result<Option<(String, String)>> {
        let by = |sql: &str, v: &str| -> Result<Option<(String, String)>> {
            self.db.query_row(sql, [v], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(db_err(&self.root))
        };
        match self.resolve(key) {
            Ok(e) => by("SELECT display_name, subspace FROM replaced WHERE sha256 = ?1", &e.sha256),
            Err(_) => by("SELECT display_name, subspace FROM replaced WHERE display_name = ?1 COLLATE NOCASE", key),
        }
    }

    /// Removes a subspace: its rows first, then its file. The original LoRAs stay. Refused while
    /// it is the only copy of a replaced member whose original was removed.
    pub fn remove_subspace(&mut self, name: &str) -> Result<()> {
        let (_, sha, _) = self.subspace_row(name)?.ok_or_else(|| self.unknown_subspace(name))?;
        if let Some(m) = self.subspace(name)?.members.iter().find(|m| m.replaced && !m.original_present) {
            return Err(Error::Argument(format!(
                "subspace {name} is the only copy of {} (its original was removed); import the original again before removing the subspace",
                m.display_name
            )));
        }
        let tx = self.db.transaction().map_err(db_err(&self.root))?;
        tx.execute("DELETE FROM replaced WHERE subspace = ?1", [name]).map_err(db_err(&self.root))?;
        tx.execute("DELETE FROM subspace_members WHERE subspace = ?1", [name]).map_err(db_err(&self.root))?;
        tx.execute("DELETE FROM subspaces WHERE name = ?1", [name]).map_err(db_err(&self.root))?;
        tx.commit().map_err(db_err(&self.root))?;
        let _ = std::fs::remove_file(self.subspaces_dir().join(format!("{sha}.safetensors")));
        Ok(())
    }

    /// Member `key` (display name or sha256 prefix) of subspace `name`, reconstructed as a LoRA
    /// named `branch` on `targets`.
    pub fn subspace_member_lora(&self, name: &str, key: &str, branch: &str, targets: &AdapterTargets) -> Result<LoadedLora> {
        let (header, basis) = self.load_subspace(name)?;
        let row: Option<(String, String, Vec<u8>)> = self
            .db
            .query_row(
                "SELECT addnet_hash, info, loadings FROM subspace_members WHERE subspace = ?1 AND (display_name = ?2 COLLATE NOCASE OR sha256 LIKE ?3)",
                params![name, key, format!("{}%", key.to_ascii_lowercase())],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db_err(&self.root))?;
        let Some((hash, info, lb)) = row else {
            let names: Vec<String> = self.subspace(name)?.members.into_iter().map(|m| m.display_name).collect();
            return Err(Error::Argument(format!("{key}@{name}: {key} is not a member of subspace {name} (members: {})", names.join(", "))));
        };
        let label = PathBuf::from(format!("{key}@{name}"));
        let info: LoraInfo = serde_json::from_str(&info).map_err(|e| Error::Argument(format!("{key}@{name}: stored info: {e}")))?;
        let loadings = subspace::read_loadings(&label, lb)?;
        let mut factors = MemberFactors::new();
        for (path, l) in &loadings {
            let b = basis.get(path).ok_or_else(|| Error::Argument(format!("{key}@{name}: module {path} has loadings but no basis")))?;
            factors.insert(path.clone(), b.reconstruct(l));
        }
        let bases = match header.centering {
            Centering::Uncentred => subspace::basis_tensors(&basis, targets)?,
            Centering::Centred => BTreeMap::new(),
        };
        let shared = (header.centering == Centering::Uncentred).then_some(subspace::SharedForm { key: name, bases: &bases, loadings: &loadings });
        subspace::lora_from_factors(branch, &label, info, hash, &factors, targets, shared)
    }
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Argument(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn insert_member(
    tx: &rusqlite::Transaction,
    subspace_name: &str,
    e: &LoraEntry,
    addnet_hash: &str,
    info: &LoraInfo,
    loadings: &[u8],
    err: &subspace::ReconstructionError,
    in_basis: bool,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO subspace_members (subspace, sha256, display_name, addnet_hash, info, original_size, loadings, error, module_errors, in_basis) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            subspace_name,
            e.sha256,
            e.display_name,
            addnet_hash,
            serde_json::to_string(info).unwrap_or_default(),
            e.size as i64,
            loadings,
            err.overall,
            serde_json::to_string(&err.per_module).unwrap_or_default(),
            in_basis as i64
        ],
    )
}

/// `NAME@SUBSPACE` → (member, subspace), when `spec` has that form and is not a file path.
pub fn split_member(spec: &str) -> Option<(&str, &str)> {
    if Path::new(spec).exists() || spec.contains(['/', '\\']) {
        return None;
    }
    let (m, s) = spec.rsplit_once('@')?;
    (!m.is_empty() && !s.is_empty()).then_some((m, s))
}
