//! Memory-mapped safetensors files as a candle `VarBuilder` backend.
//!
//! Why our own backend rather than candle's `MmapedSafetensors`: we need errors that name the
//! file and tensor with what was expected, a NaN/Inf check at load time, refusal of pickles
//! with an explanation, and a key map so that a single-file (SGM/LDM layout) checkpoint can be
//! read by the same model code as a diffusers folder, converting names and layouts on the fly.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use loramix_kernels::{count_non_finite, RawDType};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};

use crate::error::{Error, Result};

/// Extensions of formats that are Python pickles. Unpickling runs arbitrary code, so we never
/// open them.
pub const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

pub fn pickle_refusal(path: &Path) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message: "this is a Python pickle (.ckpt/.pt/.pth/.bin). Loading a pickle can run arbitrary code, so LoRAMix \
                  never unpickles. Use the .safetensors version of this file (most model pages offer one), or convert it \
                  once in a trusted environment, e.g. with `safetensors.torch.save_file(torch.load(f, weights_only=True), \"out.safetensors\")`."
            .into(),
    }
}

/// Why bytes are not a usable safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Pickle,
    Invalid(String),
}

/// safetensors' own limit; a bigger header means a corrupt or hostile file.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Parses and validates a whole safetensors buffer's header: every tensor's offsets lie inside
/// the data section, do not overlap, cover it exactly, and match dtype × shape. Never reads
/// tensor data. Public for the fuzz target.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<(usize, Metadata), HeaderError> {
    use safetensors::SafeTensorError as E;
    let bad = |m: String| Err(HeaderError::Invalid(m));
    if bytes.is_empty() {
        return bad("the file is empty (expected a safetensors file)".into());
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return bad("this is a zip archive (a PyTorch .pt/.ckpt pickle or an archive), not safetensors; LoRAMix never unpickles — use a .safetensors file".into());
    }
    // A pickle starts with PROTO (0x80, protocol 2–5). A safetensors header length can start
    // with the same bytes (640 = 0x0280), so only call it a pickle when the bytes after the
    // length are not the header's opening brace.
    if bytes[0] == 0x80 && bytes.get(1).is_some_and(|p| (2..=5).contains(p)) && bytes.get(8) != Some(&b'{') {
        return Err(HeaderError::Pickle);
    }
    if bytes.len() < 8 {
        return bad(format!("the file is {} bytes, too short for a safetensors header", bytes.len()));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if header_len > MAX_HEADER_BYTES {
        return bad(format!(
            "the header claims {header_len} bytes ({} MB); safetensors headers are at most 100 MB — corrupt or not a safetensors file",
            header_len / 1_000_000
        ));
    }
    if header_len > (bytes.len() as u64).saturating_sub(8) {
        return bad(format!(
            "not a safetensors file: header length {header_len} runs past the end of the file ({} bytes) — truncated or another format",
            bytes.len()
        ));
    }
    let header = &bytes[8..8 + header_len as usize];
    let data_len = bytes.len() as u64 - 8 - header_len;
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        // Offsets that overlap and offsets past the end are one error to the crate; a second,
        // error-path-only parse names the tensor and which it is.
        if matches!(e, E::InvalidOffset(_) | E::MetadataIncompleteBuffer) {
            if let Err(specific) = precheck_offsets(header, data_len) {
                return specific;
            }
        }
        HeaderError::Invalid(match e {
            E::InvalidOffset(name) => format!(
                "tensor '{name}': its data offsets are out of order, overlap another tensor, or leave a gap"
            ),
            E::TensorInvalidInfo => match misfit_tensor(header) {
                Some(which) => which,
                None => "a tensor's byte length does not match its dtype and shape".into(),
            },
            E::MetadataIncompleteBuffer => format!(
                "the data section ({} bytes) does not match the header's offsets — the file is truncated or has trailing bytes",
                bytes.len() as u64 - 8 - header_len
            ),
            E::ValidationOverflow => "a tensor's shape is so large that its size overflows".into(),
            E::InvalidHeader(_) | E::InvalidHeaderStart => "the header is not UTF-8 JSON".into(),
            E::InvalidHeaderDeserialization(e) | E::JsonError(e) => format!("the header is not valid safetensors JSON: {e}"),
            other => format!("invalid safetensors header: {other}"),
        })
    })
}

/// The first tensor whose byte length is not its dtype's size times its shape's product, named
/// with both (the crate's error says only that one is).
fn misfit_tensor(header: &[u8]) -> Option<String> {
    let serde_json::Value::Object(map) = serde_json::from_slice::<serde_json::Value>(header).ok()? else { return None };
    map.iter().filter(|(name, _)| *name != "__metadata__").find_map(|(name, v)| {
        let dtype = v.get("dtype")?.as_str()?;
        let bits: u64 = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 8,
            "I16" | "U16" | "F16" | "BF16" => 16,
            "I32" | "U32" | "F32" => 32,
            "I64" | "U64" | "F64" => 64,
            _ => return None,
        };
        let shape: Vec<u64> = v.get("shape")?.as_array()?.iter().map(|d| d.as_u64()).collect::<Option<_>>()?;
        let o = v.get("data_offsets")?.as_array()?;
        let (a, b) = (o.first()?.as_u64()?, o.get(1)?.as_u64()?);
        let want = shape.iter().try_fold(bits / 8, |n, &d| n.checked_mul(d))?;
        (b.checked_sub(a)? != want).then(|| format!("tensor '{name}': its byte length does not match its dtype and shape ({} bytes of data where a {dtype} tensor of shape {shape:?} takes {want})", b - a))
    })
}

/// Names the tensor at fault for offsets that run past the data or overlap, which the
/// safetensors crate reports alike.
fn precheck_offsets(header: &[u8], data_len: u64) -> std::result::Result<(), HeaderError> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(()); // the crate's own parse gives the precise JSON error
    };
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, v) in &map {
        if name == "__metadata__" {
            continue;
        }
        let Some(o) = v.get("data_offsets").and_then(|o| o.as_array()) else { continue };
        let (Some(a), Some(b)) = (o.first().and_then(|x| x.as_u64()), o.get(1).and_then(|x| x.as_u64())) else { continue };
        if a > b {
            return Err(HeaderError::Invalid(format!("tensor '{name}': data offsets [{a}, {b}] end before they start")));
        }
        spans.push((a, b, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(HeaderError::Invalid(format!(
                "tensor '{}': its data offsets overlap those of tensor '{}'",
                w[1].2, w[0].2
            )));
        }
    }
    let contiguous = spans.first().is_none_or(|s| s.0 == 0) && spans.windows(2).all(|w| w[1].0 == w[0].1);
    if let Some(&(a, b, name)) = spans.iter().find(|s| s.1 > data_len) {
        let expected = spans.last().map(|s| s.1).unwrap_or(0);
        return Err(HeaderError::Invalid(if contiguous {
            format!("the file is truncated: its header describes {expected} bytes of tensor data, the file holds {data_len}")
        } else {
            format!("tensor '{name}': data offsets [{a}, {b}] lie outside the data section ({data_len} bytes)")
        }));
    }
    Ok(())
}

/// A file's bytes: memory-mapped from disk, or owned.
enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// One mapped safetensors file with its parsed, validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: FileBytes,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetensorsFile({})", self.path.display())
    }
}

impl SafetensorsFile {
    /// Drops the mapped pages of bytes `[start, end)` of the file from this process's resident
    /// set once a tensor has been copied out of them. Without it, loading a model held every
    /// page of the file it had read beside the copies — twice the weights at peak (measured:
    /// 810 MB for mid2's 420 MB of weights). The mapping is read-only and backed by the file, so a
    /// later read of the range faults the same bytes back in from the page cache. Whole pages
    /// inside the range only; Unix only (elsewhere the pages stay until the file is closed).
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let FileBytes::Mapped(m) = &self.mmap {
            const PAGE: usize = 4096;
            let (a, z) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
            if z > a {
                // SAFETY: DONTNEED on a read-only, file-backed private mapping discards no data:
                // the pages are re-read from the file if touched again. Failure only means the
                // pages stay resident, so it is ignored.
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, z - a) };
            }
        }
        let _ = (start, end);
    }

    pub fn open(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
        if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
            return Err(pickle_refusal(path));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent writer could change bytes under us, which
        // at worst yields wrong weights (caught by shape/NaN checks), never memory unsafety in
        // our code since every access is bounds-checked against the validated header.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, metadata) = parse_header(&mmap).map_err(|e| match e {
            HeaderError::Pickle => pickle_refusal(path),
            HeaderError::Invalid(message) => Error::BadFile { path: path.to_path_buf(), message },
        })?;
        Ok(Self { path: path.to_path_buf(), mmap: FileBytes::Mapped(mmap), data_start: 8 + n, metadata })
    }

    /// A file held in memory (the fuzz target; files received over IPC). `label` names it in errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self> {
        let (n, metadata) = parse_header(&bytes).map_err(|e| match e {
            HeaderError::Pickle => pickle_refusal(label),
            HeaderError::Invalid(message) => Error::BadFile { path: label.to_path_buf(), message },
        })?;
        Ok(Self { path: label.to_path_buf(), mmap: FileBytes::Owned(bytes), data_start: 8 + n, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The free-form `__metadata__` map (kohya `ss_*`, `modelspec.*`, diffusers' adapter config).
    pub fn user_metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    /// A one-element float tensor (a LoRA `alpha`) straight from its bytes, without building a
    /// tensor: header-only inspection reads ~1000 of these per SDXL LoRA.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        let info = self.metadata.info(name)?;
        if info.shape.iter().product::<usize>() != 1 {
            return None;
        }
        let (start, end) = info.data_offsets;
        let b = self.mmap.get(self.data_start + start..self.data_start + end)?;
        let v = match info.dtype {
            StDtype::F16 => half::f16::from_le_bytes(b.try_into().ok()?).to_f64(),
            StDtype::BF16 => half::bf16::from_le_bytes(b.try_into().ok()?).to_f64(),
            StDtype::F32 => f32::from_le_bytes(b.try_into().ok()?) as f64,
            StDtype::F64 => f64::from_le_bytes(b.try_into().ok()?),
            StDtype::I64 => i64::from_le_bytes(b.try_into().ok()?) as f64,
            StDtype::I32 => i32::from_le_bytes(b.try_into().ok()?) as f64,
            _ => return None,
        };
        v.is_finite().then_some(v)
    }

    pub fn dtype_of(&self, name: &str) -> Option<StDtype> {
        self.metadata.info(name).map(|i| i.dtype)
    }

    /// Bytes of the data section (everything after the header), for the A1111-style "addnet"
    /// hash that ignores metadata edits.
    pub fn data_bytes(&self) -> &[u8] {
        &self.mmap[self.data_start..]
    }

    pub fn file_bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    /// Checks every float tensor for NaN/Inf without building tensors (a library import
    /// validates files it does not otherwise load).
    pub fn check_finite(&self) -> Result<()> {
        let mut names = self.names();
        names.sort();
        for name in names {
            let Some(info) = self.metadata.info(&name) else { continue };
            let raw = match info.dtype {
                StDtype::F16 => RawDType::F16,
                StDtype::BF16 => RawDType::BF16,
                StDtype::F32 => RawDType::F32,
                StDtype::F64 => RawDType::F64,
                _ => continue,
            };
            let (start, end) = info.data_offsets;
            let Some(bytes) = self.mmap.get(self.data_start + start..self.data_start + end) else { continue };
            let bad = count_non_finite(bytes, raw);
            self.release(self.data_start + start, self.data_start + end);
            if bad > 0 {
                return Err(Error::Tensor {
                    file: self.path.display().to_string(),
                    tensor: name.clone(),
                    message: format!("{bad} of {} values are NaN or infinite; the file is corrupt", info.shape.iter().product::<usize>()),
                });
            }
        }
        Ok(())
    }

    /// Loads one tensor on the CPU in its stored dtype, checking it is finite.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let terr = |message: String| Error::Tensor { file: self.path.display().to_string(), tensor: name.to_string(), message };
        let info = self.metadata.info(name).ok_or_else(|| terr("not in this file".into()))?;
        let (dtype, raw) = match info.dtype {
            StDtype::F16 => (DType::F16, Some(RawDType::F16)),
            StDtype::BF16 => (DType::BF16, Some(RawDType::BF16)),
            StDtype::F32 => (DType::F32, Some(RawDType::F32)),
            StDtype::F64 => (DType::F64, Some(RawDType::F64)),
            StDtype::U8 => (DType::U8, None),
            StDtype::U32 => (DType::U32, None),
            StDtype::I64 => (DType::I64, None),
            other => return Err(terr(format!("unsupported dtype {other:?} (expected F16, BF16 or F32)"))),
        };
        let (start, end) = info.data_offsets;
        let bytes = self
            .mmap
            .get(self.data_start + start..self.data_start + end)
            .ok_or_else(|| terr("data offsets run past the end of the file".into()))?;
        if let Some(raw) = raw {
            let bad = count_non_finite(bytes, raw);
            if bad > 0 {
                return Err(terr(format!("{bad} of {} values are NaN or infinite; the checkpoint is corrupt", info.shape.iter().product::<usize>())));
            }
        }
        let t = Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu).map_err(|e| terr(e.to_string()))?;
        self.release(self.data_start + start, self.data_start + end);
        Ok(t)
    }
}

/// How a stored tensor becomes the tensor the model asks for.
#[derive(Debug, Clone)]
pub enum Transform {
    /// Used as stored (a trailing-1 reshape such as `[c, c, 1, 1]` → `[c, c]` is allowed).
    Identity,
    /// Rows `[start, start + len)` of a fused tensor (OpenCLIP's `in_proj_weight` holds q, k, v).
    Rows { start: usize, len: usize },
    /// Stored transposed (OpenCLIP's `text_projection` is `[hidden, proj]`).
    Transpose,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub file: usize,
    pub key: String,
    pub transform: Transform,
}

/// Weights of one model component, possibly spread over several files, under the names the
/// model code asks for.
/// Where tensor bytes come from.
#[derive(Debug, Clone)]
enum Storage {
    Files(Arc<Vec<SafetensorsFile>>),
    /// Shapes only (a key/shape manifest): tensors are zero-cost broadcast zeros. Lets us
    /// check that a full-size checkpoint layout is accepted without having its weights.
    Manifest(Arc<HashMap<String, Vec<usize>>>),
}

#[derive(Debug, Clone)]
pub struct WeightSource {
    storage: Storage,
    index: HashMap<String, Source>,
    label: String,
}

impl WeightSource {
    /// Every tensor of the files under its own name (a diffusers component folder).
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.insert(name.clone(), Source { file: i, key: name, transform: Transform::Identity });
            }
        }
        let label = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(Self { storage: Storage::Files(Arc::new(files)), index, label })
    }

    /// A view with a new name map: `(model name, source)` pairs over already opened files.
    pub fn remapped(files: Arc<Vec<SafetensorsFile>>, index: HashMap<String, Source>, label: String) -> Self {
        Self { storage: Storage::Files(files), index, label }
    }

    /// A shape-only source over a key → shape manifest, optionally through a name map.
    pub fn from_manifest(shapes: HashMap<String, Vec<usize>>, index: Option<HashMap<String, Source>>, label: &str) -> Self {
        let index = index.unwrap_or_else(|| {
            shapes.keys().map(|k| (k.clone(), Source { file: 0, key: k.clone(), transform: Transform::Identity })).collect()
        });
        Self { storage: Storage::Manifest(Arc::new(shapes)), index, label: label.to_string() }
    }

    fn stored(&self, src: &Source, name: &str) -> candle_core::Result<(Tensor, String)> {
        match &self.storage {
            Storage::Files(files) => {
                let file = &files[src.file];
                let t = file.load(&src.key).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Ok((t, file.path().display().to_string()))
            }
            Storage::Manifest(shapes) => {
                let shape = shapes.get(&src.key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: missing tensor '{}' (for '{name}')", self.label, src.key))
                })?;
                let t = Tensor::zeros(1, DType::F32, &Device::Cpu)?.reshape(vec![1; shape.len().max(1)])?.broadcast_as(shape.clone())?;
                Ok((t, self.label.clone()))
            }
        }
    }

    /// Serves keys stored without `prefix` under `prefix + key` (except keys starting with one
    /// of `keep`). transformers ≥ 5 saves `CLIPTextModel` without its `text_model.` prefix;
    /// normalising keeps module paths (and so LoRA key matching) the same for both layouts.
    pub fn with_prefix(mut self, prefix: &str, keep: &[&str]) -> Self {
        if self.index.keys().any(|k| k.starts_with(prefix)) {
            return self;
        }
        self.index = self
            .index
            .into_iter()
            .map(|(k, v)| if keep.iter().any(|p| k.starts_with(p)) { (k, v) } else { (format!("{prefix}{k}"), v) })
            .collect();
        self
    }

    /// The same weights under another name in error messages.
    pub fn relabel(mut self, label: String) -> Self {
        self.label = label;
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn fetch(&self, name: &str, expected: Option<&Shape>) -> candle_core::Result<Tensor> {
        let src = self.index.get(name).ok_or_else(|| {
            let want = expected.map(|s| format!(" (expected shape {:?})", s.dims())).unwrap_or_default();
            candle_core::Error::Msg(format!("{}: missing tensor '{name}'{want}", self.label))
        })?;
        let (t, origin) = self.stored(src, name)?;
        let t = match &src.transform {
            Transform::Identity => t,
            // A compact copy: a view (or candle's `copy`, which clones the whole storage) would
            // keep the fused tensor (open_clip's q/k/v `in_proj`) alive once per slice: +700 MB
            // for SDXL's second text encoder in f16.
            Transform::Rows { start, len } => t.narrow(0, *start, *len)?.force_contiguous()?,
            Transform::Transpose => t.t()?.contiguous()?,
        };
        match expected {
            Some(shape) if t.shape() != shape => {
                let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
                if t.elem_count() == shape.elem_count() && squeeze(t.dims()) == squeeze(shape.dims()) {
                    t.reshape(shape)
                } else {
                    let stored = if src.key == name { String::new() } else { format!(" (stored as '{}')", src.key) };
                    Err(candle_core::Error::Msg(format!(
                        "{origin}: tensor '{name}'{stored} has shape {:?}, expected {:?}",
                        t.dims(),
                        shape.dims()
                    )))
                }
            }
            _ => Ok(t),
        }
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl candle_nn::var_builder::SimpleBackend for WeightSource {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s))?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// One tensor to write: name, shape, little-endian bytes of `dtype`.
pub type RawTensor = (String, Vec<usize>, Vec<u8>);

/// A safetensors file's bytes from raw tensors of one dtype (the subspace components and
/// loadings, training checkpoints and exported LoRAs are all written this way). `what` names the
/// file in errors.
pub fn safetensors_bytes(dtype: StDtype, tensors: &[RawTensor], meta: Option<HashMap<String, String>>, what: &str) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(k, shape, b)| safetensors::tensor::TensorView::new(dtype, shape.clone(), b).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Argument(format!("{what}: {e}")))?;
    safetensors::serialize(views, meta).map_err(|e| Error::Argument(format!("{what}: {e}")))
}

/// f32 values as little-endian bytes.
pub fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Sets glibc's allocator up for inference: at most 64 MB of freed memory is kept at the top of a
/// heap, and blocks up to 32 MB come from the heaps. Call once at startup.
///
/// Why: a UNet step allocates and frees outputs of 10–30 MB hundreds of times. glibc's defaults
/// adapt (the mmap threshold rises to the largest freed block, the trim threshold to twice that),
/// yet still trimmed and regrew the heap inside every step: each regrown page is a page fault on
/// first write. With these settings the bias fill of a 2048×2560 linear output went from 3.1 to
/// 2.1 ms, the GEMMs in a step ran 5–15 % faster, and mid, mid2 and conv steps 2–5 % faster
/// (BENCHMARKS.md). The 64 MB bound caps what the
/// process holds beyond its live data, and `return_freed_memory` still trims on demand.
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` in the environment win.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"].iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; it has no preconditions.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

/// Hands memory freed by dropped weights back to the OS. Why: glibc keeps freed blocks below its
/// mmap threshold (up to 32 MB, i.e. most weight tensors) in its heaps, so releasing a model would
/// not lower the process's resident memory without a trim. Elsewhere the allocator decides.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// sha256 of a whole file, streamed (A1111's model and embedding hashes).
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(crate::lora::network::hex(&h.finalize()))
}
