//! The app's commands: thin, async, and testable without a window. Each `#[tauri::command]` wraps
//! a plain function over [`AppState`]; progress goes through `tauri::ipc::Channel`.
//!
//! Paths from the UI are never trusted: [`user_path`] requires absolute paths without `..`, reads
//! are limited to what a command needs (PNG settings, LoRA files to import, model folders), and
//! the only places written are the library (imports, the gallery of generated images) and the
//! export folder the user names.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use base64::Engine as _;
use loramix::lora::library::{EmbeddingEntry, ImportOutcome, LoraEntry, LoraLibrary, LoraQuery, SubspaceMember, SubspaceSummary};
use loramix::llm::chameleon::{train_hypernetwork_folder, ChameleonStep, ChameleonTrainOptions, ChameleonTrainReport};
use loramix::llm::mixer::{train_router_folder, MixerTrainOptions, MixerTrainReport, MixerTrainStep};
use loramix::llm::{AdapterKind, GenerateOptions, LlmSession, Message, SamplingOptions};
use loramix::lora::Role;
use loramix::studio::{self, Settings, Studio, StudioEvent, TrainEvent, TrainReport, TrainRequest};
use serde::{Deserialize, Serialize};
use tauri::ipc::Channel;

/// The command layer's error: a message for the UI that names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Engine(#[from] loramix::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Serialize for AppError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

pub type AppResult<T> = Result<T, AppError>;

/// A path from the UI: non-empty, absolute, no `..`, no NUL.
pub fn user_path(s: &str, what: &str) -> AppResult<PathBuf> {
    if s.trim().is_empty() || s.contains('\0') {
        return Err(AppError::Invalid(format!("{what}: empty path")));
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(AppError::Invalid(format!("{what} {s:?}: expected an absolute path")));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(AppError::Invalid(format!("{what} {s:?}: '..' is not allowed")));
    }
    Ok(p)
}

/// True when `p` (existing) lies inside `dir`.
fn inside(p: &Path, dir: &Path) -> bool {
    match (p.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// One queued or running generation.
struct Job {
    id: u64,
    settings: Settings,
    /// An X/Y/Z plot of `settings` (x, y, z axes) instead of one job.
    grid: Option<[Option<studio::Axis>; 3]>,
    events: Box<dyn Fn(JobEvent) + Send>,
    cancel: Arc<AtomicBool>,
    /// An API request (the local API switch): it runs here, in queue order, instead of `settings`.
    external: Option<Box<dyn FnOnce() + Send>>,
}

/// What a job reports to the UI.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEvent {
    Queued { job: u64, position: usize },
    Started { job: u64 },
    Progress { job: u64, event: StudioEvent },
    Preview { job: u64, data_url: String },
    Done { job: u64, images: Vec<PathBuf> },
    Cancelled { job: u64 },
    Failed { job: u64, message: String },
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    running: Option<(u64, Arc<AtomicBool>)>,
}

/// The LLM pane's session and conversation.
pub struct ChatState {
    session: LlmSession,
    messages: Vec<Message>,
    conversation: Option<loramix::llm::Conversation>,
}

pub struct AppState {
    pub library_root: PathBuf,
    pub gallery_dir: PathBuf,
    /// The shipped models folder (miniworld), found beside the executable or in the repo.
    pub models_dir: PathBuf,
    studio: Arc<Studio>,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    next_job: AtomicU64,
    library: Mutex<()>,
    chat: Mutex<Option<ChatState>>,
    /// The running training job's stop flag (one at a time).
    training: Mutex<Option<Arc<AtomicBool>>>,
    /// The local A1111-compatible API, when switched on.
    api: Mutex<Option<ApiServer>>,
}

/// The API server the app runs: its settings and the sender that stops it.
struct ApiServer {
    settings: ApiSettings,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// The app's API switch, kept in `<library>/app_settings.json` so it survives a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ApiSettings {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// `USER:PASS` for HTTP Basic; empty: none (then only loopback is sensible).
    pub auth: String,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self { enabled: false, host: "127.0.0.1".into(), port: 7860, auth: String::new() }
    }
}

/// What the UI shows of the API.
#[derive(Debug, Clone, Serialize)]
pub struct ApiStatus {
    pub running: bool,
    pub settings: ApiSettings,
    pub url: Option<String>,
}

fn data_url(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

impl AppState {
    /// Opens (creating) the library and starts the generation worker.
    pub fn new(library_root: PathBuf, models_dir: PathBuf) -> AppResult<Self> {
        LoraLibrary::open(&library_root)?;
        let gallery_dir = library_root.join("gallery");
        std::fs::create_dir_all(&gallery_dir).map_err(|e| loramix::Error::io(&gallery_dir, e))?;
        let state = Self {
            library_root,
            gallery_dir,
            models_dir,
            studio: Arc::new(Studio::new()),
            queue: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            next_job: AtomicU64::new(1),
            library: Mutex::new(()),
            chat: Mutex::new(None),
            training: Mutex::new(None),
            api: Mutex::new(None),
        };
        state.start_worker();
        Ok(state)
    }

    fn start_worker(&self) {
        let queue = self.queue.clone();
        let studio = self.studio.clone();
        let library = self.library_root.clone();
        let gallery = self.gallery_dir.clone();
        std::thread::Builder::new()
            .name("loramix-jobs".into())
            .spawn(move || loop {
                let job = {
                    let (lock, cv) = &*queue;
                    let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while q.jobs.is_empty() {
                        q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                    let job = q.jobs.pop_front();
                    if let Some(j) = &job {
                        q.running = Some((j.id, j.cancel.clone()));
                    }
                    job
                };
                let Some(mut job) = job else { continue };
                match job.external.take() {
                    Some(request) => request(),
                    None => run_job(&studio, &library, &gallery, &job),
                }
                let (lock, _) = &*queue;
                lock.lock().unwrap_or_else(|e| e.into_inner()).running = None;
            })
            .ok();
    }

    fn open_library(&self) -> AppResult<(std::sync::MutexGuard<'_, ()>, LoraLibrary)> {
        let g = self.library.lock().unwrap_or_else(|e| e.into_inner());
        Ok((g, LoraLibrary::open(&self.library_root)?))
    }

    // ---- library -------------------------------------------------------------------------

    pub fn library_list(&self, q: LibraryQuery) -> AppResult<Vec<LoraEntry>> {
        let (_g, lib) = self.open_library()?;
        let role = match q.role.as_deref().filter(|r| !r.is_empty()) {
            Some(r) => Some(Role::parse(r).ok_or_else(|| AppError::Invalid(format!("role {r:?}: expected subject, style or unknown")))?),
            None => None,
        };
        Ok(lib.list(&LoraQuery {
            text: q.text.filter(|t| !t.is_empty()),
            role,
            base: q.base.filter(|b| !b.is_empty()),
            tag: q.tag.filter(|t| !t.is_empty()),
        })?)
    }

    /// Imports files and folders (recursively), reporting each file as it is done.
    pub fn library_import(&self, paths: &[String], on_event: &dyn Fn(ImportEvent)) -> AppResult<ImportSummary> {
        let paths = paths.iter().map(|p| user_path(p, "import")).collect::<AppResult<Vec<_>>>()?;
        let (_g, mut lib) = self.open_library()?;
        let mut n = 0;
        let outcomes = lib.import(&paths, &mut |o| {
            n += 1;
            on_event(ImportEvent::of(o, n));
        })?;
        let mut s = ImportSummary::default();
        for o in &outcomes {
            match o {
                ImportOutcome::Added { .. } => s.added += 1,
                ImportOutcome::Existing { .. } | ImportOutcome::Embedding { existing: true, .. } => s.existing += 1,
                ImportOutcome::Embedding { .. } => s.added += 1,
                ImportOutcome::Failed { .. } => s.failed += 1,
            }
        }
        Ok(s)
    }

    pub fn library_update(&self, key: &str, u: LibraryUpdate) -> AppResult<LoraEntry> {
        let (_g, mut lib) = self.open_library()?;
        let mut e = lib.resolve(key)?;
        if let Some(r) = u.role {
            let role = Role::parse(&r).ok_or_else(|| AppError::Invalid(format!("role {r:?}: expected subject, style or unknown")))?;
            e = lib.set_role(&e.sha256, role)?;
        }
        if let Some(t) = u.tags {
            e = lib.set_tags(&e.sha256, &t)?;
        }
        if let Some(n) = u.name {
            e = lib.rename(&e.sha256, &n)?;
        }
        Ok(e)
    }

    pub fn library_remove(&self, key: &str) -> AppResult<LoraEntry> {
        let (_g, mut lib) = self.open_library()?;
        Ok(lib.remove(key)?)
    }

    pub fn embedding_list(&self) -> AppResult<Vec<EmbeddingEntry>> {
        let (_g, lib) = self.open_library()?;
        Ok(lib.embeddings()?)
    }

    pub fn embedding_remove(&self, key: &str) -> AppResult<EmbeddingEntry> {
        let (_g, mut lib) = self.open_library()?;
        Ok(lib.remove_embedding(key)?)
    }

    /// Checks a training request from the UI (absolute paths, the model by name) and registers
    /// its stop flag; one job at a time.
    pub fn start_training(&self, mut req: TrainRequest) -> AppResult<(TrainRequest, Arc<AtomicBool>)> {
        req.images = user_path(&req.images.to_string_lossy(), "training images")?;
        if let Some(e) = &req.export {
            req.export = Some(user_path(&e.to_string_lossy(), "export")?);
        }
        req.model = self.resolve_model(&req.model)?;
        let mut t = self.training.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() {
            return Err(AppError::Invalid("a training job is running already".into()));
        }
        let flag = Arc::new(AtomicBool::new(false));
        *t = Some(flag.clone());
        Ok((req, flag))
    }

    /// Runs a registered job on its own connection to the library (SQLite in WAL mode), so the
    /// library stays usable while it trains; the stop flag ends it after a checkpoint.
    pub fn run_training(&self, req: &TrainRequest, stop: &AtomicBool, on_event: &dyn Fn(TrainEvent)) -> AppResult<TrainReport> {
        let r = LoraLibrary::open(&self.library_root).and_then(|mut lib| {
            loramix::studio::train_lora(&mut lib, req, &mut |e| {
                on_event(e);
                !stop.load(Ordering::Relaxed)
            })
        });
        *self.training.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(r?)
    }

    pub fn stop_training(&self) -> bool {
        match &*self.training.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => {
                f.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Every subspace with its members' errors and the bytes before and after.
    pub fn subspace_list(&self) -> AppResult<Vec<SubspaceSummary>> {
        let (_g, lib) = self.open_library()?;
        Ok(lib.subspaces()?)
    }

    /// "Replace originals" for members at or under `max_error`; the original files stay.
    pub fn subspace_replace(&self, name: &str, max_error: f64) -> AppResult<Vec<SubspaceMember>> {
        let (_g, mut lib) = self.open_library()?;
        Ok(lib.replace_originals(name, max_error)?)
    }

    pub fn subspace_restore(&self, name: &str) -> AppResult<usize> {
        let (_g, mut lib) = self.open_library()?;
        Ok(lib.restore_originals(name)?)
    }

    // ---- local API -------------------------------------------------------------------------

    fn app_settings_path(&self) -> PathBuf {
        self.library_root.join("app_settings.json")
    }

    /// The saved API switch (defaults when there is no file; a broken file is an error naming it).
    pub fn api_settings(&self) -> AppResult<ApiSettings> {
        let p = self.app_settings_path();
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(ApiSettings::default()) };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| AppError::Invalid(format!("{}: {e}", p.display())))?;
        Ok(serde_json::from_value(v.get("api").cloned().unwrap_or_default()).map_err(|e| AppError::Invalid(format!("{}: api: {e}", p.display())))?)
    }

    fn save_api_settings(&self, a: &ApiSettings) -> AppResult<()> {
        let p = self.app_settings_path();
        let mut v: serde_json::Value = std::fs::read_to_string(&p).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| serde_json::json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert("api".into(), serde_json::to_value(a).unwrap_or_default());
        }
        loramix::output::write_atomic(&p, serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes())?;
        Ok(())
    }

    pub fn api_status(&self) -> ApiStatus {
        let g = self.api.lock().unwrap_or_else(|e| e.into_inner());
        match &*g {
            Some(s) => ApiStatus { running: true, settings: s.settings.clone(), url: Some(format!("http://{}:{}", s.settings.host, s.settings.port)) },
            None => ApiStatus { running: false, settings: self.api_settings().unwrap_or_default(), url: None },
        }
    }

    /// Starts (or restarts) the API with `settings` and saves the switch. Its requests run on
    /// this app's job queue, after the jobs already queued, on the app's loaded model.
    pub async fn api_start(&self, settings: ApiSettings) -> AppResult<ApiStatus> {
        self.api_stop_running();
        let auth = match settings.auth.split_once(':') {
            Some((u, p)) if !u.is_empty() => Some((u.to_string(), p.to_string())),
            None if settings.auth.is_empty() => None,
            _ => return Err(AppError::Invalid(format!("API credentials {:?}: expected USER:PASS", settings.auth))),
        };
        let config = loramix::api::ApiConfig {
            host: settings.host.clone(),
            port: settings.port,
            auth,
            library: Some(self.library_root.clone()),
            model: self.models_dir.join("miniworld").to_string_lossy().into_owned(),
            models_dir: Some(self.models_dir.clone()),
            out: self.gallery_dir.join("api"),
            ..Default::default()
        };
        let listener = loramix::api::bind(&config).await?;
        let queue = self.queue.clone();
        let ids = Arc::new(AtomicU64::new(1 << 48));
        let dispatch: loramix::api::Dispatch = Arc::new(move |request| {
            let (lock, cv) = &*queue;
            let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
            let id = ids.fetch_add(1, Ordering::Relaxed);
            q.jobs.push_back(Job { id, settings: Settings::default(), grid: None, events: Box::new(|_| {}), cancel: Arc::new(AtomicBool::new(false)), external: Some(request) });
            cv.notify_one();
            true
        });
        let worker = Arc::new(loramix::api::Worker::start_on(self.studio.clone(), Some(self.library_root.clone()), config.out.clone(), dispatch));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tauri::async_runtime::spawn(async move {
            let _ = loramix::api::serve_on(listener, config, worker, async move {
                let _ = stopped.await;
            })
            .await;
        });
        let saved = ApiSettings { enabled: true, ..settings };
        self.save_api_settings(&saved)?;
        *self.api.lock().unwrap_or_else(|e| e.into_inner()) = Some(ApiServer { settings: saved, stop });
        Ok(self.api_status())
    }

    fn api_stop_running(&self) {
        if let Some(s) = self.api.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = s.stop.send(());
        }
    }

    /// Stops the API and saves the switch off.
    pub fn api_stop(&self) -> AppResult<ApiStatus> {
        let settings = match self.api.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(s) => s.settings.clone(),
            None => self.api_settings()?,
        };
        self.api_stop_running();
        self.save_api_settings(&ApiSettings { enabled: false, ..settings })?;
        Ok(self.api_status())
    }

    // ---- studio --------------------------------------------------------------------------

    /// Queues a job; events go to `events` until it is done, cancelled or failed.
    pub fn enqueue(&self, mut settings: Settings, events: Box<dyn Fn(JobEvent) + Send>) -> AppResult<u64> {
        settings.model = self.resolve_model(&settings.model)?;
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        let position = q.jobs.len() + usize::from(q.running.is_some());
        events(JobEvent::Queued { job: id, position });
        q.jobs.push_back(Job { id, settings, grid: None, events, cancel: Arc::new(AtomicBool::new(false)), external: None });
        cv.notify_one();
        Ok(id)
    }

    /// Queues an X/Y/Z plot (`AXIS=V1,V2,...` per axis, as `loramix grid`); its images and
    /// grids go to `gallery/grid-NNNNN/`.
    pub fn enqueue_grid(&self, mut settings: Settings, axes: [Option<String>; 3], events: Box<dyn Fn(JobEvent) + Send>) -> AppResult<u64> {
        settings.model = self.resolve_model(&settings.model)?;
        let mut parsed: [Option<studio::Axis>; 3] = [None, None, None];
        for (slot, (spec, name)) in parsed.iter_mut().zip(axes.iter().zip(["X", "Y", "Z"])) {
            if let Some(spec) = spec.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                *slot = Some(spec.parse().map_err(|e: loramix::Error| AppError::Invalid(format!("{name} axis: {e}")))?);
            }
        }
        if parsed[0].is_none() {
            return Err(AppError::Invalid("X axis: expected AXIS=V1,V2,... (e.g. mix=merge,auto)".into()));
        }
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (lock, cv) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        let position = q.jobs.len() + usize::from(q.running.is_some());
        events(JobEvent::Queued { job: id, position });
        q.jobs.push_back(Job { id, settings, grid: Some(parsed), events, cancel: Arc::new(AtomicBool::new(false)), external: None });
        cv.notify_one();
        Ok(id)
    }

    /// Cancels a queued job, or stops the running one within a step.
    pub fn cancel(&self, job: u64) -> bool {
        let (lock, _) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, flag)) = &q.running {
            if *id == job {
                flag.store(true, Ordering::Relaxed);
                return true;
            }
        }
        if let Some(i) = q.jobs.iter().position(|j| j.id == job) {
            if let Some(j) = q.jobs.remove(i) {
                (j.events)(JobEvent::Cancelled { job });
            }
            return true;
        }
        false
    }

    /// A model spec from the UI: the shipped model's name, an absolute folder or file, or an HF
    /// repo id (`owner/name`).
    pub fn resolve_model(&self, spec: &str) -> AppResult<String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "miniworld" || spec == "models/miniworld" {
            return Ok(self.models_dir.join("miniworld").to_string_lossy().into_owned());
        }
        if Path::new(spec).is_absolute() {
            let p = user_path(spec, "model")?;
            if !p.exists() {
                return Err(AppError::Invalid(format!("model {spec:?}: no such file or folder")));
            }
            return Ok(spec.to_string());
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let ok = |s: &str| !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if parts.len() == 2 && parts.iter().all(|p| ok(p)) {
            return Ok(spec.to_string());
        }
        Err(AppError::Invalid(format!("model {spec:?}: expected miniworld, an absolute path, or an HF repo id owner/name")))
    }

    pub fn model_list(&self) -> Vec<ModelEntry> {
        let mut out = vec![ModelEntry { name: "miniworld (shipped)".into(), spec: "miniworld".into(), kind: "shipped".into() }];
        let user = self.library_root.join("models");
        if let Ok(rd) = std::fs::read_dir(&user) {
            let mut found: Vec<ModelEntry> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("model_index.json").exists() || p.extension().is_some_and(|e| e == "safetensors"))
                .map(|p| ModelEntry {
                    name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    spec: p.to_string_lossy().into_owned(),
                    kind: if p.is_dir() { "folder".into() } else { "file".into() },
                })
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            out.extend(found);
        }
        out
    }

    // ---- gallery -------------------------------------------------------------------------

    pub fn gallery_list(&self) -> AppResult<Vec<GalleryItem>> {
        let mut items = vec![];
        let rd = std::fs::read_dir(&self.gallery_dir).map_err(|e| loramix::Error::io(&self.gallery_dir, e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "png") {
                continue;
            }
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            let settings = studio::settings_from_image(&p).ok().map(|(s, _)| s);
            items.push((modified, GalleryItem { path: p.clone(), name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), settings }));
        }
        items.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.name.cmp(&a.1.name)));
        Ok(items.into_iter().map(|(_, i)| i).collect())
    }

    /// A gallery image as a data URL (the CSP allows no other image source).
    pub fn gallery_image(&self, path: &str) -> AppResult<String> {
        let p = user_path(path, "image")?;
        if !inside(&p, &self.gallery_dir) {
            return Err(AppError::Invalid(format!("{path}: not an image of the gallery")));
        }
        let bytes = std::fs::read(&p).map_err(|e| loramix::Error::io(&p, e))?;
        Ok(data_url(&bytes))
    }

    /// An init image picked by the user, as a PNG data URL with its size (for the mask canvas).
    pub fn studio_image(&self, path: &str) -> AppResult<InitImageView> {
        let p = user_path(path, "init image")?;
        let img = loramix::sdxl::img2img::load_image(&p)?;
        let png = loramix::output::encode_png(&img, &[])?;
        Ok(InitImageView { data_url: data_url(&png), width: img.width(), height: img.height() })
    }

    /// Saves a painted mask (PNG data URL) under the gallery's `masks/`, named by its content,
    /// atomically; returns its path for `Settings.init.mask`.
    pub fn studio_save_mask(&self, png_data_url: &str) -> AppResult<PathBuf> {
        use base64::Engine;
        use sha2::Digest;
        let b64 = png_data_url
            .strip_prefix("data:image/png;base64,")
            .ok_or_else(|| AppError::Invalid("mask: expected a PNG data URL".into()))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| AppError::Invalid(format!("mask: bad base64: {e}")))?;
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).map_err(|e| AppError::Invalid(format!("mask: not a PNG: {e}")))?;
        let dir = self.gallery_dir.join("masks");
        std::fs::create_dir_all(&dir).map_err(|e| loramix::Error::io(&dir, e))?;
        let name = format!("mask-{}.png", &hex(&sha2::Sha256::digest(&bytes))[..16]);
        let path = dir.join(name);
        loramix::output::write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Settings from a picture dropped on the window (ours, or A1111's PNG, JPEG or WebP). Only
    /// reads the file.
    pub fn png_settings(&self, path: &str) -> AppResult<Settings> {
        let p = user_path(path, "picture")?;
        if p.extension().and_then(|e| e.to_str()).is_none_or(|e| !["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str())) {
            return Err(AppError::Invalid(format!("{path}: expected a .png, .jpg, .jpeg or .webp picture")));
        }
        let meta = std::fs::metadata(&p).map_err(|e| loramix::Error::io(&p, e))?;
        if !meta.is_file() || meta.len() > 256 << 20 {
            return Err(AppError::Invalid(format!("{path}: expected a picture file under 256 MB")));
        }
        let (mut s, _) = studio::settings_from_image(&p)?;
        // A model named by file name only (A1111's "Model: x") may not exist here; keep ours then.
        if self.resolve_model(&s.model).is_err() {
            s.model = "miniworld".into();
        }
        Ok(s)
    }

    pub fn gallery_export(&self, req: ExportRequest) -> AppResult<Vec<PathBuf>> {
        let dest = user_path(&req.dest, "export folder")?;
        let mut images = vec![];
        for p in &req.images {
            let p = user_path(p, "image")?;
            if !inside(&p, &self.gallery_dir) {
                return Err(AppError::Invalid(format!("{}: only gallery images can be exported", p.display())));
            }
            images.push(p);
        }
        if req.manifest {
            return Ok(vec![studio::export_manifest(&images, &dest)?]);
        }
        let template = if req.template.trim().is_empty() { "{index}-{seed}-{prompt}" } else { req.template.as_str() };
        Ok(studio::export(&images, &dest, template, req.zip)?)
    }

    /// A1111's Extras upscale on pictures the user chose (gallery images, or any picture by
    /// path), written into the gallery beside them, metadata kept.
    pub fn gallery_extras(&self, paths: &[String], settings: &studio::ExtrasSettings) -> AppResult<Vec<PathBuf>> {
        let files = paths.iter().map(|p| Ok(studio::ExtrasSource { path: user_path(p, "image")?, listed: true })).collect::<AppResult<Vec<_>>>()?;
        if files.is_empty() {
            return Err(AppError::Invalid("Extras: no pictures chosen".into()));
        }
        Ok(studio::extras_to_folder(&files, settings, Some(&self.library_root), self.studio.device(), &self.gallery_dir, &mut |_| {})?)
    }

    // ---- LLM -----------------------------------------------------------------------------

    pub fn llm_load(&self, model: &str) -> AppResult<ChatInfo> {
        // "minichat" (or nothing) is the small LLM we ship, so the pane works offline.
        let m = if model.trim().is_empty() || model.trim() == "minichat" || model.trim() == "models/minichat" {
            self.models_dir.join("minichat").to_string_lossy().into_owned()
        } else if Path::new(model).is_absolute() {
            user_path(model, "LLM model")?.to_string_lossy().into_owned()
        } else {
            self.resolve_model(model)?
        };
        let session = LlmSession::load(&m, &candle_core::Device::Cpu)?;
        let info = ChatInfo { model: m, has_chat_template: session.has_chat_template(), adapters: vec![] };
        *self.chat.lock().unwrap_or_else(|e| e.into_inner()) = Some(ChatState { session, messages: vec![], conversation: None });
        Ok(info)
    }

    pub fn llm_add_adapter(&self, dir: &str) -> AppResult<AdapterView> {
        let d = user_path(dir, "adapter")?;
        let mut g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_mut().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        let a = chat.session.add_adapter(&d, None)?;
        Ok(AdapterView::of(a))
    }

    /// Trains LoRA-Mixer routers over loaded or given adapter folders and keeps the mixer on.
    pub fn llm_mixer_train(&self, req: &MixerTrainRequest, on: &dyn Fn(MixerTrainStep)) -> AppResult<MixerTrainReport> {
        let adapters = req.adapters.iter().map(|a| user_path(a, "adapter")).collect::<AppResult<Vec<_>>>()?;
        let data = user_path(&req.data, "training data")?;
        let out = user_path(&req.out, "router folder")?;
        let mut g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_mut().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        let opts = MixerTrainOptions {
            top_k: req.top_k.unwrap_or(2),
            samples: req.samples.unwrap_or(2000),
            // Only lines that name their expert are supervised; unlabelled data trains as before.
            supervision: 1.0,
            ..Default::default()
        };
        chat.conversation = None;
        Ok(train_router_folder(&mut chat.session, &adapters, &data, &out, &opts, &mut |s| {
            on(s.clone());
            true
        })?)
    }

    /// Loads a router folder (its experts too) and routes every reply through it.
    pub fn llm_mixer_load(&self, dir: &str) -> AppResult<MixerView> {
        let d = user_path(dir, "router folder")?;
        let mut g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_mut().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        chat.conversation = None;
        let m = chat.session.load_mixer(&d)?;
        Ok(MixerView::of(m))
    }

    pub fn llm_mixer_off(&self) {
        if let Some(c) = self.chat.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            c.session.remove_mixer();
            c.conversation = None;
        }
    }

    /// Answers a JSONL file of prompts as one batch (clustered, with a ChameleonLLM hypernetwork
    /// when given) and writes the answers as JSONL.
    pub fn llm_batch(&self, req: &BatchRequest, on: &dyn Fn(BatchProgress)) -> AppResult<BatchSummary> {
        let prompts_path = user_path(&req.prompts, "prompts file")?;
        let out = user_path(&req.out, "answers file")?;
        let mut g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_mut().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        let prompts = loramix::llm::data::read_prompts(&prompts_path)?;
        let hyper = match req.chameleon.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(dir) => Some(chat.session.load_chameleon(&user_path(dir, "hypernetwork folder")?)?),
            None => None,
        };
        let opts = GenerateOptions { max_new_tokens: req.max_new_tokens.unwrap_or(64).clamp(1, 4096), ..Default::default() };
        let answers = loramix::llm::chameleon::answer_batch(&mut chat.session, &prompts, hyper.as_ref().map(|(s, n)| (s, n)), req.clusters, &opts, &mut |done, total| {
            on(BatchProgress { done, total });
            true
        })?;
        let mut text = String::new();
        for a in &answers {
            text.push_str(&serde_json::to_string(a).map_err(|e| AppError::Invalid(e.to_string()))?);
            text.push('\n');
        }
        loramix::output::write_atomic(&out, text.as_bytes())?;
        let clusters = answers.iter().map(|a| a.cluster).max().map_or(0, |m| m + 1);
        Ok(BatchSummary { out, clusters, answers: answers.into_iter().take(200).collect() })
    }

    /// Trains a ChameleonLLM hypernetwork for the loaded LLM.
    pub fn llm_chameleon_train(&self, data: &str, out: &str, on: &dyn Fn(ChameleonStep)) -> AppResult<ChameleonTrainReport> {
        let data = user_path(data, "training data")?;
        let out = user_path(out, "hypernetwork folder")?;
        let g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_ref().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        Ok(train_hypernetwork_folder(&chat.session, &data, &out, &ChameleonTrainOptions::default(), &mut |s| {
            on(s.clone());
            true
        })?)
    }

    pub fn llm_reset(&self) {
        if let Some(c) = self.chat.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            c.messages.clear();
            c.conversation = None;
        }
    }

    /// Adds the user's message (if any) and replies: with the base model, or with the invoked
    /// aLoRA on the conversation's cached prefix.
    pub fn llm_send(&self, text: &str, invoke: Option<&str>, max_new_tokens: usize, on: &dyn Fn(ChatEvent)) -> AppResult<ChatStats> {
        let mut g = self.chat.lock().unwrap_or_else(|e| e.into_inner());
        let chat = g.as_mut().ok_or_else(|| AppError::Invalid("load an LLM first".into()))?;
        if !text.trim().is_empty() {
            chat.messages.push(Message::user(text));
        }
        if chat.messages.is_empty() {
            return Err(AppError::Invalid("write a message first".into()));
        }
        let extra = match invoke {
            None => vec![],
            Some(name) => {
                let i = chat.session.adapter_index(name).ok_or_else(|| AppError::Invalid(format!("no adapter named {name:?} is loaded")))?;
                match &chat.session.adapters()[i].kind {
                    AdapterKind::Activated { invocation } => invocation.clone(),
                    AdapterKind::Lora => return Err(AppError::Invalid(format!("{name} is a standard LoRA: it has no invocation"))),
                }
            }
        };
        let tokens = chat.session.encode_messages(&chat.messages, invoke.is_none())?;
        // Reuse the cached conversation when the new tokens extend it.
        let mut conv = match chat.conversation.take() {
            Some(mut c) if tokens.starts_with(c.tokens()) => {
                let rest = tokens[c.tokens().len()..].to_vec();
                c.push(&rest);
                c
            }
            _ => chat.session.conversation(&tokens),
        };
        let prefilled = chat.session.prefill(&mut conv)?;
        // aLoRAs are enabled as PEFT enables them; a standard LoRA only when it is the one invoked.
        // With a mixer loaded, its experts run through the mixer only (and the mixer itself
        // is one more adapter: routed from the experts' invocation, or everywhere).
        let experts: Vec<usize> = chat.session.mixer().map(|m| m.experts.clone()).unwrap_or_default();
        let mut enabled: Vec<usize> = chat
            .session
            .adapters()
            .iter()
            .enumerate()
            .filter(|(i, a)| matches!(a.kind, AdapterKind::Activated { .. }) && !experts.contains(i))
            .map(|(i, _)| i)
            .collect();
        if chat.session.mixer().is_some() && invoke.is_none() {
            enabled.push(loramix::llm::MIXER);
        }
        let opts = GenerateOptions { max_new_tokens: max_new_tokens.clamp(1, 4096), sampling: SamplingOptions::default(), ..Default::default() };
        let reply = chat.session.reply(&mut conv, &extra, &enabled, &opts, &mut |_, piece| {
            on(ChatEvent::Token { text: piece.to_string() });
            true
        })?;
        if invoke.is_none() {
            chat.messages.push(Message::assistant(reply.text.trim()));
        }
        chat.conversation = Some(conv);
        Ok(ChatStats {
            text: reply.text,
            tokens: reply.tokens.len(),
            computed_positions: reply.computed_positions,
            reused_positions: reply.reused_positions,
            prefilled_positions: prefilled,
            invoked: invoke.map(str::to_string),
        })
    }
}

fn run_job(studio: &Studio, library: &Path, gallery: &Path, job: &Job) {
    (job.events)(JobEvent::Started { job: job.id });
    let id = job.id;
    let ev = &job.events;
    if let Some(axes) = &job.grid {
        let out = gallery.join(format!("grid-{id:05}"));
        let r = studio::run_grid(studio, &job.settings, [axes[0].as_ref(), axes[1].as_ref(), axes[2].as_ref()], &out, Some(library), &job.cancel, &mut |e| {
            ev(JobEvent::Progress { job: id, event: e })
        });
        match r {
            Ok(g) => ev(JobEvent::Done { job: id, images: g.grids }),
            Err(loramix::Error::Cancelled) => ev(JobEvent::Cancelled { job: id }),
            Err(e) => ev(JobEvent::Failed { job: id, message: e.to_string() }),
        }
        return;
    }
    let r = studio.generate(
        &job.settings,
        Some(library),
        gallery,
        &job.cancel,
        &mut |e| ev(JobEvent::Progress { job: id, event: e }),
        &mut |img| {
            if let Ok(png) = loramix::output::encode_png(img, &[]) {
                ev(JobEvent::Preview { job: id, data_url: data_url(&png) });
            }
        },
    );
    match r {
        Ok(images) => ev(JobEvent::Done { job: id, images }),
        Err(loramix::Error::Cancelled) => ev(JobEvent::Cancelled { job: id }),
        Err(e) => ev(JobEvent::Failed { job: id, message: e.to_string() }),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct LibraryQuery {
    pub text: Option<String>,
    pub role: Option<String>,
    pub base: Option<String>,
    pub tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct LibraryUpdate {
    pub role: Option<String>,
    pub tags: Option<Vec<String>>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportEvent {
    pub index: usize,
    pub path: PathBuf,
    /// added | existing | failed
    pub status: String,
    pub message: Option<String>,
    pub entry: Option<LoraEntry>,
}

impl ImportEvent {
    fn of(o: &ImportOutcome, index: usize) -> Self {
        match o {
            ImportOutcome::Added { source, entry } => {
                Self { index, path: source.clone(), status: "added".into(), message: None, entry: Some((**entry).clone()) }
            }
            ImportOutcome::Existing { source, entry } => Self {
                index,
                path: source.clone(),
                status: "existing".into(),
                message: Some("already in the library".into()),
                entry: Some((**entry).clone()),
            },
            ImportOutcome::Embedding { source, entry, existing } => Self {
                index,
                path: source.clone(),
                status: if *existing { "existing" } else { "added" }.into(),
                message: Some(format!("textual-inversion embedding {} ({} vectors)", entry.display_name, entry.vectors)),
                entry: None,
            },
            ImportOutcome::Failed { source, error } => {
                Self { index, path: source.clone(), status: "failed".into(), message: Some(error.clone()), entry: None }
            }
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ImportSummary {
    pub added: usize,
    pub existing: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub spec: String,
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GalleryItem {
    pub path: PathBuf,
    pub name: String,
    pub settings: Option<Settings>,
}

#[derive(Debug, Deserialize)]
pub struct ExportRequest {
    pub images: Vec<String>,
    pub dest: String,
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub zip: bool,
    /// Save the images' settings as a `loramix batch run` manifest (`dest`: a .jsonl file).
    #[serde(default)]
    pub manifest: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatInfo {
    pub model: String,
    pub has_chat_template: bool,
    pub adapters: Vec<AdapterView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterView {
    pub name: String,
    /// lora | alora
    pub kind: String,
    pub invocation_string: Option<String>,
    pub invocation_tokens: Vec<u32>,
    pub modules: usize,
    /// The folder it was loaded from (what the mixer trains over).
    pub path: PathBuf,
}

impl AdapterView {
    fn of(a: &loramix::llm::LlmAdapter) -> Self {
        Self {
            name: a.name.clone(),
            path: a.path.clone(),
            kind: if a.invocation().is_some() { "alora".into() } else { "lora".into() },
            invocation_string: a.invocation_string.clone(),
            invocation_tokens: a.invocation().map(<[u32]>::to_vec).unwrap_or_default(),
            modules: a.modules.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatEvent {
    Token { text: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatStats {
    pub text: String,
    pub tokens: usize,
    pub computed_positions: usize,
    pub reused_positions: usize,
    pub prefilled_positions: usize,
    pub invoked: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct InitImageView {
    pub data_url: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    pub version: String,
    pub library_dir: PathBuf,
    pub gallery_dir: PathBuf,
    pub samplers: Vec<(String, String)>,
    /// Schedule types (ours, A1111's label).
    pub schedules: Vec<(String, String)>,
    pub strategies: Vec<String>,
    pub size_presets: Vec<(usize, usize)>,
    /// ESRGAN-family models in the library's upscaler folders, for the hires fix picker.
    pub upscaler_models: Vec<String>,
}

// ---- the Tauri commands ------------------------------------------------------------------

type State<'a> = tauri::State<'a, AppState>;

#[tauri::command]
pub async fn app_info(state: State<'_>) -> AppResult<AppInfo> {
    Ok(AppInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        library_dir: state.library_root.clone(),
        gallery_dir: state.gallery_dir.clone(),
        samplers: loramix::SamplerKind::ALL.iter().map(|s| (s.name().to_string(), s.a1111_name().to_string())).collect(),
        schedules: loramix::sdxl::schedulers::Schedule::ALL.iter().map(|s| (s.name().to_string(), s.a1111_name().to_string())).collect(),
        // Every strategy but EST, which needs its DINO embedder (the CLI's --mix est).
        strategies: loramix::mix::STRATEGIES.iter().filter(|s| **s != "est").map(|s| s.to_string()).collect(),
        // SDXL's trained aspect buckets (width x height).
        size_presets: vec![(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640), (640, 1536)],
        upscaler_models: studio::upscaler_models(&state.library_root),
    })
}

#[tauri::command]
pub async fn library_list(state: State<'_>, query: Option<LibraryQuery>) -> AppResult<Vec<LoraEntry>> {
    state.library_list(query.unwrap_or_default())
}

#[tauri::command]
pub async fn library_import(state: State<'_>, paths: Vec<String>, on_event: Channel<ImportEvent>) -> AppResult<ImportSummary> {
    state.library_import(&paths, &|e| {
        let _ = on_event.send(e);
    })
}

#[tauri::command]
pub async fn library_update(state: State<'_>, key: String, update: LibraryUpdate) -> AppResult<LoraEntry> {
    state.library_update(&key, update)
}

#[tauri::command]
pub async fn library_remove(state: State<'_>, key: String) -> AppResult<LoraEntry> {
    state.library_remove(&key)
}

#[tauri::command]
pub async fn api_status(state: State<'_>) -> AppResult<ApiStatus> {
    Ok(state.api_status())
}

#[tauri::command]
pub async fn api_start(state: State<'_>, settings: ApiSettings) -> AppResult<ApiStatus> {
    state.api_start(settings).await
}

#[tauri::command]
pub async fn api_stop(state: State<'_>) -> AppResult<ApiStatus> {
    state.api_stop()
}

#[tauri::command]
pub async fn embedding_list(state: State<'_>) -> AppResult<Vec<EmbeddingEntry>> {
    state.embedding_list()
}

#[tauri::command]
pub async fn embedding_remove(state: State<'_>, key: String) -> AppResult<EmbeddingEntry> {
    state.embedding_remove(&key)
}

#[tauri::command]
pub async fn library_train(app: tauri::AppHandle, state: State<'_>, request: TrainRequest, on_event: Channel<TrainEvent>) -> AppResult<TrainReport> {
    use tauri::Manager;
    let (req, stop) = state.start_training(request)?;
    tauri::async_runtime::spawn_blocking(move || {
        let state = app.state::<AppState>();
        state.run_training(&req, &stop, &|e| {
            let _ = on_event.send(e);
        })
    })
    .await
    .map_err(|e| AppError::Invalid(e.to_string()))?
}

#[tauri::command]
pub async fn library_train_stop(state: State<'_>) -> AppResult<bool> {
    Ok(state.stop_training())
}

#[tauri::command]
pub async fn subspace_list(state: State<'_>) -> AppResult<Vec<SubspaceSummary>> {
    state.subspace_list()
}

#[tauri::command]
pub async fn subspace_replace(state: State<'_>, name: String, max_error: f64) -> AppResult<Vec<SubspaceMember>> {
    state.subspace_replace(&name, max_error)
}

#[tauri::command]
pub async fn subspace_restore(state: State<'_>, name: String) -> AppResult<usize> {
    state.subspace_restore(&name)
}

#[tauri::command]
pub async fn studio_generate(state: State<'_>, settings: Settings, on_event: Channel<JobEvent>) -> AppResult<u64> {
    state.enqueue(settings, Box::new(move |e| {
        let _ = on_event.send(e);
    }))
}

#[tauri::command]
pub async fn studio_grid(state: State<'_>, settings: Settings, x: String, y: Option<String>, z: Option<String>, on_event: Channel<JobEvent>) -> AppResult<u64> {
    state.enqueue_grid(settings, [Some(x), y, z], Box::new(move |e| {
        let _ = on_event.send(e);
    }))
}

#[tauri::command]
pub async fn studio_cancel(state: State<'_>, job: u64) -> AppResult<bool> {
    Ok(state.cancel(job))
}

#[tauri::command]
pub async fn gallery_list(state: State<'_>) -> AppResult<Vec<GalleryItem>> {
    state.gallery_list()
}

#[tauri::command]
pub async fn studio_image(state: State<'_>, path: String) -> AppResult<InitImageView> {
    state.studio_image(&path)
}

#[tauri::command]
pub async fn studio_save_mask(state: State<'_>, data_url: String) -> AppResult<PathBuf> {
    state.studio_save_mask(&data_url)
}

#[tauri::command]
pub async fn gallery_image(state: State<'_>, path: String) -> AppResult<String> {
    state.gallery_image(&path)
}

#[tauri::command]
pub async fn gallery_settings(state: State<'_>, path: String) -> AppResult<Settings> {
    state.png_settings(&path)
}

#[tauri::command]
pub async fn gallery_export(state: State<'_>, request: ExportRequest) -> AppResult<Vec<PathBuf>> {
    state.gallery_export(request)
}

/// Extras can take a while (an ESRGAN model on big pictures): off the async threads.
#[tauri::command]
pub async fn gallery_extras(app: tauri::AppHandle, paths: Vec<String>, settings: studio::ExtrasSettings) -> AppResult<Vec<PathBuf>> {
    use tauri::Manager;
    tauri::async_runtime::spawn_blocking(move || app.state::<AppState>().gallery_extras(&paths, &settings))
        .await
        .map_err(|e| AppError::Invalid(e.to_string()))?
}

#[tauri::command]
pub async fn model_list(state: State<'_>) -> AppResult<Vec<ModelEntry>> {
    Ok(state.model_list())
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DownloadEvent {
    Started { repo: String },
    Done { repo: String, path: PathBuf },
    Failed { repo: String, message: String },
}

#[tauri::command]
pub async fn model_download(state: State<'_>, repo: String, on_event: Channel<DownloadEvent>) -> AppResult<String> {
    let spec = state.resolve_model(&repo)?;
    if Path::new(&spec).is_absolute() {
        return Err(AppError::Invalid(format!("{repo}: expected an HF repo id (owner/name)")));
    }
    let _ = on_event.send(DownloadEvent::Started { repo: repo.clone() });
    let r = tauri::async_runtime::spawn_blocking(move || loramix::sdxl::model::fetch_hub_repo(&spec, false))
        .await
        .map_err(|e| AppError::Invalid(e.to_string()))?;
    match r {
        Ok(p) => {
            let _ = on_event.send(DownloadEvent::Done { repo: repo.clone(), path: p.clone() });
            Ok(p.to_string_lossy().into_owned())
        }
        Err(e) => {
            let _ = on_event.send(DownloadEvent::Failed { repo, message: e.to_string() });
            Err(e.into())
        }
    }
}

#[tauri::command]
pub async fn llm_load(state: State<'_>, model: String) -> AppResult<ChatInfo> {
    state.llm_load(&model)
}

#[tauri::command]
pub async fn llm_add_adapter(state: State<'_>, dir: String) -> AppResult<AdapterView> {
    state.llm_add_adapter(&dir)
}

#[tauri::command]
pub async fn llm_send(
    state: State<'_>,
    text: String,
    invoke: Option<String>,
    max_new_tokens: Option<usize>,
    on_event: Channel<ChatEvent>,
) -> AppResult<ChatStats> {
    state.llm_send(&text, invoke.as_deref(), max_new_tokens.unwrap_or(256), &|e| {
        let _ = on_event.send(e);
    })
}

#[derive(Debug, Clone, Deserialize)]
pub struct MixerTrainRequest {
    pub adapters: Vec<String>,
    pub data: String,
    pub out: String,
    pub top_k: Option<usize>,
    pub samples: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MixerView {
    pub experts: Vec<String>,
    pub top_k: usize,
    pub activated: bool,
    pub routers: usize,
}

impl MixerView {
    fn of(m: &loramix::llm::MixerState) -> Self {
        Self {
            experts: m.spec.experts.iter().map(|e| e.name.clone()).collect(),
            top_k: m.spec.top_k,
            activated: m.spec.invocation_tokens.is_some(),
            routers: m.spec.modules.len(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchRequest {
    pub prompts: String,
    pub out: String,
    pub chameleon: Option<String>,
    pub clusters: Option<usize>,
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchProgress {
    pub done: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    pub out: PathBuf,
    pub clusters: usize,
    /// The first answers, for the pane (the file has them all).
    pub answers: Vec<loramix::llm::chameleon::BatchAnswer>,
}

#[tauri::command]
pub async fn llm_mixer_train(app: tauri::AppHandle, request: MixerTrainRequest, on_event: Channel<MixerTrainStep>) -> AppResult<MixerTrainReport> {
    use tauri::Manager;
    tauri::async_runtime::spawn_blocking(move || {
        app.state::<AppState>().llm_mixer_train(&request, &|s| {
            let _ = on_event.send(s);
        })
    })
    .await
    .map_err(|e| AppError::Invalid(e.to_string()))?
}

#[tauri::command]
pub async fn llm_mixer_load(state: State<'_>, dir: String) -> AppResult<MixerView> {
    state.llm_mixer_load(&dir)
}

#[tauri::command]
pub async fn llm_mixer_off(state: State<'_>) -> AppResult<()> {
    state.llm_mixer_off();
    Ok(())
}

#[tauri::command]
pub async fn llm_batch(app: tauri::AppHandle, request: BatchRequest, on_event: Channel<BatchProgress>) -> AppResult<BatchSummary> {
    use tauri::Manager;
    tauri::async_runtime::spawn_blocking(move || {
        app.state::<AppState>().llm_batch(&request, &|p| {
            let _ = on_event.send(p);
        })
    })
    .await
    .map_err(|e| AppError::Invalid(e.to_string()))?
}

#[tauri::command]
pub async fn llm_chameleon_train(app: tauri::AppHandle, data: String, out: String, on_event: Channel<ChameleonStep>) -> AppResult<ChameleonTrainReport> {
    use tauri::Manager;
    tauri::async_runtime::spawn_blocking(move || {
        app.state::<AppState>().llm_chameleon_train(&data, &out, &|s| {
            let _ = on_event.send(s);
        })
    })
    .await
    .map_err(|e| AppError::Invalid(e.to_string()))?
}

#[tauri::command]
pub async fn llm_reset(state: State<'_>) -> AppResult<()> {
    state.llm_reset();
    Ok(())
}

