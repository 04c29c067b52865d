//! An A1111-compatible local HTTP API (`/sdapi/v1/...`), so tools written for A1111 (Open WebUI,
//! SillyTavern, Krita and Photoshop plug-ins, bots, the `webuiapi` package) drive LoRAMix.
//!
//! Requests become studio jobs on one [`Worker`]: a FIFO queue served by one thread, the same
//! studio the app runs its jobs on, so generations never run two at a time and the models load
//! once. Bodies are size-limited; a body that is not the expected JSON gets a 422 naming the
//! field, in FastAPI's shape (`{"detail": [{"loc": ["body", "width"], "msg": …}]}`). With
//! `auth`, every route answers 401 without HTTP Basic credentials. axum on tokio: HTTP is not
//! ours to write.

pub mod a1111;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::studio::{self, ImageOutputs, ImageRecord, Settings, Studio, StudioEvent};
use a1111::{FieldError, GenerationRequest};

/// How `loramix serve` (or the app) runs the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub host: String,
    pub port: u16,
    /// HTTP Basic user and password; `None`: open (loopback only by default).
    pub auth: Option<(String, String)>,
    pub library: Option<PathBuf>,
    /// The checkpoint until `options` sets another.
    pub model: String,
    /// More checkpoints for `sd-models`: diffusers folders and `.safetensors` files in it.
    pub models_dir: Option<PathBuf>,
    /// Where `save_images: true` writes (A1111's numbering).
    pub out: PathBuf,
    /// Requests waiting at most; more get a 503.
    pub queue_limit: usize,
    /// Request bodies at most, bytes.
    pub body_limit: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            auth: None,
            library: None,
            model: "models/miniworld".into(),
            models_dir: None,
            out: PathBuf::from("outputs/api"),
            queue_limit: 256,
            body_limit: 64 << 20,
        }
    }
}

/// What a running job has done so far (`/sdapi/v1/progress`).
#[derive(Debug, Default)]
struct Progress {
    active: bool,
    started: Option<Instant>,
    batches: usize,
    batch: usize,
    step: usize,
    steps: usize,
    interrupted: bool,
    current_image: Option<Vec<u8>>,
    job_timestamp: String,
}

/// A finished job: each image's bytes as written (in `samples_format`) and its record.
#[derive(Debug, Default)]
pub struct JobDone {
    pub images: Vec<(Vec<u8>, ImageRecord)>,
    pub interrupted: bool,
}

/// Where the worker's jobs run: `loramix serve` gives them a thread of their own; the desktop
/// app passes its job queue, so API requests wait behind the app's own jobs and the two never
/// share the model at once. Returns false when the queue has stopped.
pub type Dispatch = Arc<dyn Fn(Box<dyn FnOnce() + Send>) -> bool + Send + Sync>;

/// One queue of studio jobs, run one at a time by its dispatcher.
pub struct Worker {
    dispatch: Dispatch,
    studio: Arc<Studio>,
    library: Option<PathBuf>,
    out: PathBuf,
    /// Jobs queued and not yet started (what `queue_limit` bounds).
    waiting: Arc<AtomicUsize>,
    progress: Arc<Mutex<Progress>>,
    cancel: Arc<AtomicBool>,
    skip: Arc<AtomicBool>,
}

/// A1111's `job_timestamp`: local time as `%Y%m%d%H%M%S`.
fn timestamp() -> String {
    chrono::Local::now().format("%Y%m%d%H%M%S").to_string()
}

/// A job's end: its images, or why not (`true`: the request's settings were at fault).
type Reply = tokio::sync::oneshot::Receiver<std::result::Result<JobDone, (bool, String)>>;

impl Worker {
    /// Starts a worker thread of its own on `studio`; temporary images go under the system temp folder.
    pub fn start(studio: Arc<Studio>, library: Option<PathBuf>, out: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("loramix-api-worker".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .ok();
        let tx = Mutex::new(tx);
        Self::start_on(studio, library, out, Arc::new(move |job| tx.lock().unwrap_or_else(|e| e.into_inner()).send(job).is_ok()))
    }

    /// A worker whose jobs run wherever `dispatch` puts them (the app's queue).
    pub fn start_on(studio: Arc<Studio>, library: Option<PathBuf>, out: PathBuf, dispatch: Dispatch) -> Self {
        Self { dispatch, studio, library, out, waiting: Arc::default(), progress: Arc::default(), cancel: Arc::default(), skip: Arc::default() }
    }

    /// Queues a job; the receiver gets its images. Refused when `limit` jobs already wait (the
    /// running one does not count).
    /// Runs `settings` in turn; its pictures are written in `format` (kept in the output folder
    /// with `save`, as A1111's `save_images`) and answered as written.
    fn submit(&self, settings: Settings, save: bool, format: studio::SamplesFormat, limit: usize) -> std::result::Result<Reply, String> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= limit {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(format!("{limit} requests are already waiting; try again later"));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let (studio, library, out) = (self.studio.clone(), self.library.clone(), self.out.clone());
        let (w, pr, c, sk) = (self.waiting.clone(), self.progress.clone(), self.cancel.clone(), self.skip.clone());
        let job = move || {
            static JOB: AtomicU64 = AtomicU64::new(0);
            w.fetch_sub(1, Ordering::SeqCst);
            c.store(false, Ordering::SeqCst);
            {
                let mut g = pr.lock().unwrap_or_else(|e| e.into_inner());
                *g = Progress { active: true, started: Some(Instant::now()), job_timestamp: timestamp(), ..Default::default() };
            }
            let n = JOB.fetch_add(1, Ordering::SeqCst);
            let dir = if save { out.clone() } else { std::env::temp_dir().join(format!("loramix-api-{}-{n}", std::process::id())) };
            let r = run_job(&studio, library.as_deref(), &settings, &dir, format, (&c, &sk), &pr);
            if !save {
                let _ = std::fs::remove_dir_all(&dir);
            }
            {
                let mut g = pr.lock().unwrap_or_else(|e| e.into_inner());
                g.active = false;
                g.current_image = None;
            }
            // Some argument errors are found only once the model is open (a T2I-Adapter's sizes,
            // say): the request's fault all the same, a 422 rather than a 500. Our own failures
            // (`Error::Internal`, I/O, tensors) stay 500s.
            let _ = reply.send(r.map_err(|e| (matches!(e, Error::Argument(_)), e.to_string())));
        };
        if !(self.dispatch)(Box::new(job)) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err("the generation worker has stopped".into());
        }
        Ok(rx)
    }

    /// Ends the running batch within a step, keeping it as Interrupt does, and goes on with the
    /// job's next batch (A1111's Skip).
    pub fn skip(&self) {
        let g = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if g.active {
            self.skip.store(true, Ordering::SeqCst);
        }
    }

    /// Stops the running job within a step (A1111's Interrupt); queued jobs still run.
    pub fn interrupt(&self) {
        let mut g = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if g.active {
            g.interrupted = true;
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
}

fn run_job(studio: &Studio, library: Option<&Path>, settings: &Settings, dir: &Path, format: studio::SamplesFormat, (cancel, skip): (&AtomicBool, &AtomicBool), progress: &Mutex<Progress>) -> Result<JobDone> {
    let mut written = vec![];
    let outputs = ImageOutputs { dir, names: None, images: None, keep_interrupted: true, skip: Some(skip), format };
    let r = studio.run(
        settings,
        library,
        &outputs,
        cancel,
        &mut |e| match e {
            StudioEvent::Image { path, record, .. } => written.push((path, *record)),
            StudioEvent::Step { batch, batches, step, steps, .. } => {
                let mut g = progress.lock().unwrap_or_else(|e| e.into_inner());
                (g.batch, g.batches, g.step, g.steps) = (batch, batches, step, steps);
            }
            _ => {}
        },
        &mut |img| {
            if let Ok(png) = crate::output::encode_png(img, &[]) {
                progress.lock().unwrap_or_else(|e| e.into_inner()).current_image = Some(png);
            }
        },
    );
    let interrupted = match r {
        Ok(_) => false,
        // A1111 answers an interrupted job with the images it finished and the interrupted
        // batch decoded from its last prediction of the clean latents.
        Err(Error::Cancelled) => true,
        Err(e) => return Err(e),
    };
    let mut images = vec![];
    for (p, rec) in written {
        images.push((std::fs::read(&p).map_err(|e| Error::io(&p, e))?, rec));
    }
    Ok(JobDone { images, interrupted })
}

struct AppState {
    config: ApiConfig,
    worker: Arc<Worker>,
    model: Mutex<String>,
    /// What `POST options` set besides the checkpoint; `CLIP_stop_at_last_layers` and `sd_vae`
    /// are the defaults of requests that do not override them.
    options: Mutex<serde_json::Map<String, Value>>,
}

/// An error answer in A1111's shapes: 422 `detail` for bad fields, else `{error, detail, errors}`.
enum ApiError {
    Field(FieldError),
    Status(StatusCode, String),
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::Field(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Field(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": [{"loc": e.loc, "msg": e.msg, "type": "value_error"}]}))).into_response(),
            Self::Status(code, msg) => {
                (code, Json(json!({"error": code.canonical_reason().unwrap_or("Error"), "detail": "", "body": "", "errors": msg}))).into_response()
            }
        }
    }
}

/// JSON bodies with the failing field named (serde_path_to_error), as FastAPI's 422. Every
/// body is an object: serde would read an array as the fields in order.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> std::result::Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| FieldError { loc: vec!["body".into()], msg: format!("JSON decode error: {e}") })?;
    if !value.is_object() {
        return Err(FieldError { loc: vec!["body".into()], msg: "value is not a valid dict".into() }.into());
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let mut loc = vec!["body".to_string()];
        if path != "." {
            // serde_path_to_error writes `imageList[0].data`; FastAPI's loc is the parts.
            for part in path.split('.') {
                let mut rest = part;
                while let Some(open) = rest.find('[') {
                    if open > 0 {
                        loc.push(rest[..open].to_string());
                    }
                    let close = rest[open..].find(']').map_or(rest.len(), |c| open + c);
                    loc.push(rest[open + 1..close].to_string());
                    rest = rest.get(close + 1..).unwrap_or("");
                }
                if !rest.is_empty() {
                    loc.push(rest.to_string());
                }
            }
        }
        let inner = e.into_inner();
        let mut msg = if inner.is_syntax() || inner.is_eof() { format!("JSON decode error: {inner}") } else { inner.to_string() };
        // serde names a missing field at its parent; FastAPI's loc ends with the field.
        if let Some(field) = msg.strip_prefix("missing field `").and_then(|m| m.split('`').next()).map(str::to_string) {
            loc.push(field);
            msg = "field required".into();
        }
        ApiError::Field(FieldError { loc, msg })
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 image as A1111 accepts it: raw, or a `data:image/...;base64,` URL.
fn decode_image(field: &str, text: &str) -> std::result::Result<Vec<u8>, ApiError> {
    decode_base64(text).map_err(|m| FieldError::new(field, m).into())
}

fn decode_base64(text: &str) -> std::result::Result<Vec<u8>, String> {
    let raw = text.split_once(";base64,").map_or(text, |(_, b)| b);
    python_b64decode(raw.as_bytes()).map_err(|e| format!("expected a base64 image: {e}"))
}

/// Python's `base64.b64decode` as A1111 calls it (not validating): what is not of the alphabet
/// is skipped (line breaks from `base64.encodebytes` or a wrapping `base64` command), padding
/// that completes a group ends the input, stray `=` are ignored, and trailing bits may be set.
/// Ours, because no base64 crate is this lenient; it follows CPython's `binascii.a2b_base64`.
fn python_b64decode(text: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut quad_pos, mut pads, mut left) = (0u8, 0u8, 0u8);
    for &c in text {
        if c == b'=' {
            // CPython: `quad_pos >= 2 && quad_pos + ++pads >= 4` (pads counted from the third
            // character of a group only).
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    return Ok(out);
                }
            }
            continue;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        pads = 0;
        match quad_pos {
            0 => (quad_pos, left) = (1, v),
            1 => {
                out.push((left << 2) | (v >> 4));
                (quad_pos, left) = (2, v & 0x0F);
            }
            2 => {
                out.push((left << 4) | (v >> 2));
                (quad_pos, left) = (3, v & 0x03);
            }
            _ => {
                out.push((left << 6) | v);
                (quad_pos, left) = (0, 0);
            }
        }
    }
    match quad_pos {
        0 => Ok(out),
        1 => Err(format!("invalid base64: the number of data characters ({}) cannot be 1 more than a multiple of 4", out.len() / 3 * 4 + 1)),
        _ => Err("incorrect base64 padding".into()),
    }
}

async fn generate(state: &AppState, req: GenerationRequest, settings: Settings) -> std::result::Result<Json<Value>, ApiError> {
    let rx = state.worker.submit(settings.clone(), req.save_images, samples_format(state), state.config.queue_limit).map_err(|e| ApiError::Status(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let done = rx
        .await
        .map_err(|_| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, "the generation worker stopped".into()))?
        .map_err(|(user, e)| if user { ApiError::Field(FieldError { loc: vec!["body".into()], msg: e }) } else { ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e) })?;
    let infotexts: Vec<String> = done.images.iter().map(|(_, r)| studio::parameters_text(r)).collect();
    let prompts: Vec<String> = done.images.iter().map(|(_, r)| r.drawn.as_ref().map_or(r.settings.prompt.clone(), |d| d.prompt.clone())).collect();
    let negatives: Vec<String> = done.images.iter().map(|(_, r)| r.drawn.as_ref().map_or(r.settings.negative_prompt.clone(), |d| d.negative_prompt.clone())).collect();
    let seeds: Vec<u64> = done.images.iter().map(|(_, r)| r.seed).collect();
    let first = done.images.first().map(|(_, r)| r);
    let info = json!({
        "prompt": prompts.first().cloned().unwrap_or(settings.prompt.clone()),
        "all_prompts": prompts,
        "negative_prompt": negatives.first().cloned().unwrap_or(settings.negative_prompt.clone()),
        "all_negative_prompts": negatives,
        "seed": seeds.first().copied().or(settings.seed),
        "all_seeds": seeds,
        "subseed": first.and_then(|r| r.subseed).map_or(-1, |s| s as i64),
        "all_subseeds": done.images.iter().map(|(_, r)| r.subseed.map_or(-1, |s| s as i64)).collect::<Vec<_>>(),
        "subseed_strength": settings.subseed_strength,
        "width": first.map_or(settings.width, |r| r.width),
        "height": first.map_or(settings.height, |r| r.height),
        "sampler_name": first.map_or(String::new(), |r| r.sampler.clone()),
        "cfg_scale": settings.cfg,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": CheckpointNames::of(&settings.model).model_name,
        "sd_model_hash": first.map(|r| r.model_hash.clone()).filter(|h| !h.is_empty()),
        "sd_vae_name": (!settings.vae.is_empty()).then(|| settings.vae.clone()),
        "sd_vae_hash": null,
        "seed_resize_from_w": settings.seed_resize_from().map_or(-1, |s| s.0 as i64),
        "seed_resize_from_h": settings.seed_resize_from().map_or(-1, |s| s.1 as i64),
        "denoising_strength": settings.init.as_ref().map(|i| i.strength).or(settings.hires.as_ref().map(|h| h.denoise)),
        "extra_generation_params": extra_generation_params(&settings),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": settings.styles,
        "job_timestamp": timestamp(),
        "clip_skip": settings.clip_skip + 1,
        "is_using_inpainting_conditioning": false,
        "interrupted": done.interrupted,
        "version": format!("loramix {}", env!("CARGO_PKG_VERSION")),
    });
    // The pictures as the worker wrote them, in `samples_format` (PNG where it cannot hold one).
    let images: Vec<String> = if req.send_images.unwrap_or(true) { done.images.iter().map(|(bytes, _)| b64(bytes)).collect() } else { vec![] };
    // The request echoed with the defaults it ran with, as A1111's filled-in request model.
    let mut echo = req;
    echo.batch_size.get_or_insert(settings.batch_size);
    echo.n_iter.get_or_insert(settings.batch_count);
    echo.steps.get_or_insert(settings.steps);
    echo.cfg_scale.get_or_insert(settings.cfg);
    echo.send_images.get_or_insert(true);
    echo.hr_scale.get_or_insert(settings.hires.as_ref().map_or(2.0, |h| h.scale));
    if settings.width > 0 {
        echo.width.get_or_insert(settings.width);
        echo.height.get_or_insert(settings.height);
    }
    Ok(Json(json!({"images": images, "parameters": echo, "info": info.to_string()})))
}

fn current_model(state: &AppState) -> String {
    state.model.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn txt2img(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<Value>, ApiError> {
    let req: GenerationRequest = with_options(&state, parse_body(&body)?);
    let mut settings = a1111::to_settings(&req, &current_model(&state), state.config.library.as_deref(), None)?;
    finish_settings(&state, &req, &mut settings)?;
    let dir = JobFiles::new()?;
    settings.controlnet = controlnet_settings(&state, &req, &dir, None)?;
    if req.save_images {
        dir.keep_for(&state.config.out, &mut settings)?;
    }
    generate(&state, req, settings).await
}

/// A1111's `extra_generation_params` of the job: its scripts' fields and ours.
fn extra_generation_params(settings: &Settings) -> Value {
    let mut params = json!({"LoRA mix": settings.mix});
    if let Some(u) = &settings.sd_upscale {
        params["SD upscale overlap"] = json!(u.overlap);
        params["SD upscale upscaler"] = json!(u.upscaler);
        params["SD upscale"] = json!(u.scale);
    }
    params
}

/// A1111's `/sdapi/v1/scripts`: the scripts `script_name` may name, lower-cased as A1111 lists them.
async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": ["sd upscale"]}))
}

/// A folder for the images a request brings (init image, mask, control images), removed when
/// the request is answered.
struct JobFiles(PathBuf);

impl JobFiles {
    fn new() -> std::result::Result<Self, ApiError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("loramix-api-job-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(Self(dir))
    }

    /// A base64 image of field `field`, decoded and saved as `name`.
    fn image(&self, name: &str, field: &str, text: &str) -> std::result::Result<(String, image::RgbImage), ApiError> {
        let bytes = decode_image(field, text)?;
        let img = image::load_from_memory(&bytes).map_err(|e| FieldError::new(field, format!("not an image: {e}")))?.to_rgb8();
        let path = self.0.join(name);
        img.save(&path).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok((path.to_string_lossy().into_owned(), img))
    }
}

impl JobFiles {
    /// With `save_images`, the images a saved PNG's record names must outlive the request: each
    /// is copied once into `<out>/inputs/`, named by its content's hash (the same picture sent
    /// again is not copied again), and the settings point there.
    fn keep_for(&self, out: &Path, settings: &mut Settings) -> std::result::Result<(), ApiError> {
        let keep = |p: &mut String| -> std::result::Result<(), ApiError> {
            if !Path::new(p.as_str()).starts_with(&self.0) {
                return Ok(());
            }
            let fail = |e: String| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e);
            let bytes = std::fs::read(p.as_str()).map_err(|e| fail(format!("{p}: {e}")))?;
            let hash = {
                use sha2::Digest;
                crate::lora::network::hex(&sha2::Sha256::digest(&bytes))
            };
            let dir = out.join("inputs");
            std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
            let dest = dir.join(format!("{}.png", &hash[..16]));
            if !dest.exists() {
                crate::output::write_atomic(&dest, &bytes).map_err(|e| fail(e.to_string()))?;
            }
            *p = std::path::absolute(&dest).unwrap_or(dest).to_string_lossy().into_owned();
            Ok(())
        };
        if let Some(init) = &mut settings.init {
            keep(&mut init.image)?;
            if let Some(m) = &mut init.mask {
                keep(m)?;
            }
        }
        for c in &mut settings.controlnet {
            keep(&mut c.image)?;
        }
        Ok(())
    }
}

impl Drop for JobFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The request's ControlNet units: their images written to `files` (a unit without one takes
/// img2img's init image, as the extension does) and their models found by name.
fn controlnet_settings(state: &AppState, req: &GenerationRequest, files: &JobFiles, init: Option<&str>) -> std::result::Result<Vec<studio::ControlNetSetting>, ApiError> {
    let units = a1111::controlnet_units(req)?;
    let mut out = vec![];
    for u in units {
        let i = u.index;
        let at = |field: &str, msg: String| -> ApiError {
            let loc = ["body", "alwayson_scripts", "controlnet", "args", &i.to_string(), field].map(String::from).to_vec();
            FieldError { loc, msg }.into()
        };
        let mut s = u.setting;
        s.image = match (&u.image, init) {
            (Some(b), _) => match files.image(&format!("control{i}.png"), "image", b) {
                Ok((path, _)) => path,
                Err(ApiError::Field(e)) => return Err(at("image", e.msg)),
                Err(e) => return Err(e),
            },
            (None, Some(init)) => {
                // The extension fits the init image with img2img's resize mode
                // (`resize_mode_from_value`: the latent upscale, 3, is Just Resize there).
                s.resize_mode = crate::sdxl::img2img::ResizeMode::parse_control(&req.resize_mode.unwrap_or(0).to_string()).unwrap_or_default();
                init.to_string()
            }
            (None, None) => return Err(at("image", "expected a base64 control image".into())),
        };
        s.model = find_controlnet(state, &s.model).ok_or_else(|| at("model", format!("{:?}: not a model of /controlnet/model_list", s.model)))?;
        crate::sdxl::controlnet::inspect(&s.model).map_err(|e| at("model", e.to_string()))?;
        out.push(s);
    }
    Ok(out)
}

/// Where ControlNets live: `--models-dir`'s `ControlNet/` (A1111's folder) and the library's
/// `models/ControlNet/`. Each is a diffusers folder or a `.safetensors` file.
fn controlnet_files(state: &AppState) -> Vec<PathBuf> {
    let mut dirs = vec![];
    if let Some(d) = &state.config.models_dir {
        dirs.push(d.join("ControlNet"));
    }
    if let Some(r) = library_root(state) {
        dirs.push(r.join("models").join("ControlNet"));
    }
    let mut out = vec![];
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("config.json").exists() || p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            out.extend(found);
        }
    }
    out
}

/// A unit's `model`: a path, a hub repo id, or a name from `model_list` (with or without its
/// ` [hash]`).
fn find_controlnet(state: &AppState, name: &str) -> Option<String> {
    if Path::new(name).exists() {
        return Some(name.to_string());
    }
    let bare = match name.rsplit_once(" [") {
        Some((n, h)) if h.ends_with(']') => n,
        _ => name,
    };
    let found = controlnet_files(state).into_iter().find(|p| {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let file = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        stem == bare || file == bare
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if crate::hub::is_repo_id(name) => Some(name.to_string()),
        None => None,
    }
}

/// sd-webui-controlnet's `/controlnet/model_list`: `name [hash]` as its infotext writes them.
async fn controlnet_model_list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let names: Vec<String> = controlnet_files(&state).iter().map(|p| studio::a1111_controlnet_name(&p.to_string_lossy())).collect();
    Json(json!({"model_list": names}))
}

/// `/controlnet/module_list`: the preprocessors this build has.
async fn controlnet_module_list() -> Json<Value> {
    Json(json!({"module_list": ["none", "canny", "invert"], "module_detail": {
        "none": {"model_free": false, "sliders": []},
        "canny": {"model_free": false, "sliders": [
            {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
            {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]},
        "invert": {"model_free": false, "sliders": []}
    }}))
}

fn minus_one() -> f64 {
    -1.0
}
fn none_module() -> String {
    "none".into()
}

/// `POST /controlnet/detect`'s body (sd-webui-controlnet's `Body(...)` fields; others ignored).
#[derive(serde::Deserialize)]
struct DetectRequest {
    #[serde(default = "none_module")]
    controlnet_module: String,
    #[serde(default)]
    controlnet_input_images: Vec<String>,
    /// Negative (-1): the module's default, as the extension's `bound_check_params`. (Its
    /// `controlnet_processor_res` is accepted and unused: our preprocessors run at the image's
    /// own size.)
    #[serde(default = "minus_one")]
    controlnet_threshold_a: f64,
    #[serde(default = "minus_one")]
    controlnet_threshold_b: f64,
}

/// sd-webui-controlnet's `POST /controlnet/detect`: each image's control map as a base64 PNG, so
/// a client can see (or reuse) what a unit would follow. The extension answers an unknown module
/// or no image with a 422 whose `detail` is a sentence; so does this.
async fn controlnet_detect(body: Bytes) -> std::result::Result<Json<Value>, Response> {
    let detail = |m: String| (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": m}))).into_response();
    let req: DetectRequest = parse_body(&body).map_err(IntoResponse::into_response)?;
    if !crate::sdxl::preprocessor::Preprocessor::NAMES.iter().any(|n| n.eq_ignore_ascii_case(req.controlnet_module.trim())) {
        return Err(detail("Module not available".into()));
    }
    // Any negative value is the module's default, as the extension's `bound_check_params`.
    let threshold = |v: f64| (v >= 0.0).then_some(v);
    let pre = crate::sdxl::preprocessor::Preprocessor::parse(&req.controlnet_module, threshold(req.controlnet_threshold_a), threshold(req.controlnet_threshold_b))
        .map_err(|e| detail(e.to_string()))?;
    if req.controlnet_input_images.is_empty() {
        return Err(detail("No image selected".into()));
    }
    let mut images = Vec::with_capacity(req.controlnet_input_images.len());
    for (i, text) in req.controlnet_input_images.iter().enumerate() {
        let at = |m: String| ApiError::from(FieldError { loc: ["body", "controlnet_input_images", &i.to_string()].map(String::from).to_vec(), msg: m }).into_response();
        let bytes = decode_base64(text).map_err(at)?;
        let img = crate::sdxl::img2img::decode_image(&bytes).map_err(at)?;
        let internal = |e: String| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e).into_response();
        let map = tokio::task::spawn_blocking(move || pre.apply(&img)).await.map_err(|e| internal(e.to_string()))?;
        images.push(b64(&crate::output::encode_png(&map, &[]).map_err(|e| internal(e.to_string()))?));
    }
    Ok(Json(json!({"info": "Success", "images": images})))
}

/// `/controlnet/version`: clients check it before sending units.
async fn controlnet_version() -> Json<Value> {
    Json(json!({"version": 2}))
}

/// A1111's `samples_format` and `jpeg_quality` options (`POST options`), which its
/// `encode_pil_to_base64` encodes every returned picture by. A request's `override_settings`
/// do not reach them there: A1111 restores the options before it encodes.
fn samples_format(state: &AppState) -> studio::SamplesFormat {
    let options = state.options.lock().unwrap_or_else(|e| e.into_inner());
    parse_samples_format(&options).unwrap_or_default()
}

/// `samples_format` and `jpeg_quality` from options, checked.
fn parse_samples_format(options: &serde_json::Map<String, Value>) -> std::result::Result<studio::SamplesFormat, FieldError> {
    let quality = match options.get("jpeg_quality") {
        None => studio::SamplesFormat::DEFAULT_JPEG_QUALITY,
        Some(v) => v.as_u64().filter(|q| (1..=100).contains(q)).map(|q| q as u8).ok_or_else(|| FieldError::new("jpeg_quality", format!("{v}: expected a whole number from 1 to 100")))?,
    };
    match options.get("samples_format") {
        None => Ok(studio::SamplesFormat::Png),
        Some(v) => {
            let name = v.as_str().ok_or_else(|| FieldError::new("samples_format", format!("{v}: expected png, jpg, jpeg or webp")))?;
            studio::SamplesFormat::parse(name, quality).map_err(|e| FieldError::new("samples_format", e.to_string()))
        }
    }
}

/// A picture we wrote as PNG, as `encode_pil_to_base64` sends it in `format`: a JPEG or WebP
/// carries `parameters` as its EXIF comment, and an RGBA picture loses its alpha. One that
/// format cannot hold (parameters too long for a JPEG's EXIF, where A1111 fails) stays PNG.
fn in_samples_format(png: &[u8], parameters: &str, format: studio::SamplesFormat) -> crate::Result<Vec<u8>> {
    if format == studio::SamplesFormat::Png {
        return Ok(png.to_vec());
    }
    let img = image::load_from_memory_with_format(png, image::ImageFormat::Png).map_err(|e| crate::Error::Internal(format!("re-reading a written picture: {e}")))?;
    let (format, note) = format.or_png(img.width(), img.height(), parameters);
    if let Some(note) = note {
        eprintln!("{note}");
        return Ok(png.to_vec());
    }
    format.encode(&img.to_rgb8(), &[("parameters", parameters.to_string())])
}

/// The server's options (`POST options`) under the request's own `override_settings`.
fn with_options(state: &AppState, mut req: GenerationRequest) -> GenerationRequest {
    let options = state.options.lock().unwrap_or_else(|e| e.into_inner());
    for key in ["CLIP_stop_at_last_layers", "sd_vae", "eta_noise_seed_delta", "tiling"] {
        if let (Some(v), false) = (options.get(key), req.override_settings.contains_key(key)) {
            req.override_settings.insert(key.into(), v.clone());
        }
    }
    req
}

/// What a request names by A1111's titles (checkpoint, VAE) as files, and what A1111 lets
/// pass: styles that `styles.csv` lacks are left out, as A1111 leaves them out.
fn finish_settings(state: &AppState, req: &GenerationRequest, settings: &mut Settings) -> std::result::Result<(), ApiError> {
    let field = |name: &str, msg: String| FieldError { loc: vec!["body".into(), "override_settings".into(), name.into()], msg };
    if let Some(want) = req.override_settings.get("sd_model_checkpoint") {
        let want = want.as_str().ok_or_else(|| field("sd_model_checkpoint", "expected a checkpoint title".into()))?;
        settings.model = find_checkpoint(&state.config, want).ok_or_else(|| field("sd_model_checkpoint", format!("{want:?}: not a checkpoint of /sdapi/v1/sd-models")))?;
    }
    resolve_vae(state, settings);
    if !settings.vae.is_empty() && !Path::new(&settings.vae).exists() {
        return Err(field("sd_vae", format!("{:?}: not a VAE of /sdapi/v1/sd-vae (expected one of its names, Automatic or None)", settings.vae)).into());
    }
    if !settings.styles.is_empty() {
        let known: Vec<String> = match library_root(state).map(|r| r.join("styles.csv")).filter(|p| p.exists()) {
            Some(p) => studio::read_styles(&p).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?.into_iter().map(|s| s.name).collect(),
            None => vec![],
        };
        settings.styles.retain(|s| known.contains(s));
    }
    Ok(())
}

/// The init image (and mask) become files for the job; A1111's img2img API takes the first
/// init image.
async fn img2img(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<Value>, ApiError> {
    let req: GenerationRequest = parse_body(&body)?;
    let first = req.init_images.first().ok_or_else(|| FieldError::new("init_images", "expected at least one base64 image"))?;
    let files = JobFiles::new()?;
    let init = files.image("init.png", "init_images", first)?.0;
    let mask = match req.mask.as_deref() {
        Some(m) => {
            let (path, mut img) = files.image("mask.png", "mask", m)?;
            if req.inpainting_mask_invert == 1 {
                image::imageops::invert(&mut img);
                img.save(&path).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            }
            Some(path)
        }
        None => None,
    };
    // A1111 resizes a mask of another size to the init image's.
    if let Some(m) = &mask {
        let size = |p: &str| image::image_dimensions(p).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        let (want, got) = (size(&init)?, size(m)?);
        if want != got {
            let img = image::open(m).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?.to_rgb8();
            crate::sdxl::img2img::resize(&img, want.0, want.1)
                .save(m)
                .map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        }
    }
    let mut r = req.clone();
    // A1111 sizes img2img output by width/height; an absent size keeps the image's.
    if body_lacks(&body, "width") {
        r.width = None;
    }
    let r = with_options(&state, r);
    let mut settings = a1111::to_settings(&r, &current_model(&state), state.config.library.as_deref(), Some((init.clone(), mask)))?;
    finish_settings(&state, &r, &mut settings)?;
    settings.controlnet = controlnet_settings(&state, &r, &files, Some(&init))?;
    if req.save_images {
        files.keep_for(&state.config.out, &mut settings)?;
    }
    if body_lacks(&body, "width") && body_lacks(&body, "height") {
        (settings.width, settings.height) = (0, 0);
    }
    generate(&state, req, settings).await
}

fn body_lacks(body: &Bytes, field: &str) -> bool {
    serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get(field).cloned()).is_none_or(|v| v.is_null())
}

/// The checkpoints `sd-models` lists: the server's model, then `--models-dir`'s.
fn model_files(config: &ApiConfig) -> Vec<String> {
    let mut models = vec![config.model.clone()];
    if let Some(d) = &config.models_dir {
        if let Ok(rd) = std::fs::read_dir(d) {
            let mut found: Vec<String> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("model_index.json").exists() || p.extension().is_some_and(|e| e == "safetensors"))
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            found.sort();
            models.extend(found);
        }
    }
    models.dedup();
    models
}

/// A checkpoint's names as A1111's `CheckpointInfo` gives them: `model_name` (no extension),
/// `title` (the file name, with ` [shorthash]` once the file has been hashed) and the hashes.
/// A diffusers folder has its folder name and no hash.
struct CheckpointNames {
    title: String,
    model_name: String,
    sha256: Option<String>,
}

impl CheckpointNames {
    fn of(m: &str) -> Self {
        let p = Path::new(m);
        let file = p.file_name().map_or(m.to_string(), |n| n.to_string_lossy().into_owned());
        let model_name = if p.is_dir() { file.clone() } else { p.file_stem().map_or(m.to_string(), |n| n.to_string_lossy().into_owned()) };
        // Only hashes already known: listing models must not read gigabytes.
        let sha256 = studio::cached_model_sha256(m);
        let title = match &sha256 {
            Some(h) => format!("{file} [{}]", studio::shorthash(h)),
            None => file,
        };
        Self { title, model_name, sha256 }
    }

    fn shorthash(&self) -> Option<&str> {
        self.sha256.as_deref().map(studio::shorthash)
    }

    /// A1111's `checkpoint_aliases`: a checkpoint answers to its title, file name, model name
    /// and hashes.
    fn answers_to(&self, m: &str, want: &str) -> bool {
        let file = self.title.split(" [").next().unwrap_or(&self.title);
        [self.title.as_str(), file, self.model_name.as_str(), m].contains(&want) || self.sha256.as_deref().is_some_and(|h| want.len() >= 8 && h.starts_with(want))
    }
}

fn model_title(m: &str) -> String {
    CheckpointNames::of(m).title
}

/// A checkpoint by its `sd-models` title, model name, file or hash, or any model path.
fn find_checkpoint(config: &ApiConfig, want: &str) -> Option<String> {
    model_files(config).into_iter().find(|m| CheckpointNames::of(m).answers_to(m, want)).or_else(|| Path::new(want).exists().then(|| want.to_string()))
}

async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(
        model_files(&state.config)
            .iter()
            .map(|m| {
                let n = CheckpointNames::of(m);
                json!({"title": n.title, "model_name": n.model_name, "hash": n.shorthash(), "sha256": n.sha256, "filename": m, "config": null})
            })
            .collect(),
    ))
}

async fn samplers() -> Json<Value> {
    Json(Value::Array(
        crate::sdxl::schedulers::SamplerKind::ALL.iter().map(|k| json!({"name": k.a1111_name(), "aliases": std::iter::once(k.name()).chain(k.a1111_aliases().iter().copied()).collect::<Vec<_>>(), "options": {}})).collect(),
    ))
}

async fn schedulers() -> Json<Value> {
    use crate::sdxl::schedulers::Schedule;
    Json(Value::Array(
        Schedule::ALL
            .iter()
            .map(|k| json!({"name": if *k == Schedule::Default { "automatic" } else { k.name() }, "label": k.a1111_name(), "aliases": null, "default_rho": -1, "need_inner_model": false}))
            .collect(),
    ))
}

/// A LoRA file's safetensors metadata (kohya's `ss_*`, `modelspec.*`), which A1111 returns;
/// values that hold JSON (`ss_tag_frequency`) are returned as JSON, as A1111 parses them.
fn file_metadata(path: &Path) -> serde_json::Map<String, Value> {
    let Ok(f) = crate::weights::SafetensorsFile::open(path) else { return Default::default() };
    f.user_metadata()
        .into_iter()
        .map(|(k, v)| {
            let parsed = if v.starts_with('{') || v.starts_with('[') { serde_json::from_str(&v).ok() } else { None };
            (k, parsed.unwrap_or(Value::String(v)))
        })
        .collect()
}

/// The LoRAs `<lora:NAME:w>` resolves to: the library's, then the current model's own `loras/`.
async fn loras(State(state): State<Arc<AppState>>) -> std::result::Result<Json<Value>, ApiError> {
    let mut out = vec![];
    let root = match &state.config.library {
        Some(r) => Some(r.clone()),
        None => crate::lora::library::LoraLibrary::default_root().ok(),
    };
    if let Some(root) = root.filter(|r| r.exists()) {
        let lib = crate::lora::library::LoraLibrary::open(&root).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        for e in lib.list(&Default::default()).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))? {
            let mut metadata = file_metadata(&e.path);
            metadata.entry("ss_base_model_version").or_insert(json!(e.base_model));
            metadata.insert("role".into(), json!(e.role));
            out.push(json!({"name": e.display_name, "alias": e.display_name, "path": e.path, "metadata": metadata}));
        }
    }
    let own = Path::new(&current_model(&state)).join("loras");
    if let Ok(rd) = std::fs::read_dir(&own) {
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
        files.sort();
        for p in files {
            let name = p.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !out.iter().any(|o| o["name"] == name.as_str()) {
                out.push(json!({"name": name, "alias": name, "path": p, "metadata": file_metadata(&p)}));
            }
        }
    }
    Ok(Json(Value::Array(out)))
}

/// A1111's `embeddings`: the textual-inversion embeddings a prompt can call by name (the
/// model's `embeddings/`, then the library's), keyed by name.
async fn embeddings(State(state): State<Arc<AppState>>) -> std::result::Result<Json<Value>, ApiError> {
    let model = current_model(&state);
    let all = crate::studio::job_embeddings(&model, state.config.library.as_deref(), &[])
        .map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut loaded = serde_json::Map::new();
    for e in all.items() {
        loaded.insert(
            e.name.clone(),
            json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null, "shape": e.vectors[0].dim(1).unwrap_or(0), "vectors": e.vector_count()}),
        );
    }
    Ok(Json(json!({"loaded": loaded, "skipped": {}})))
}

fn library_root(state: &AppState) -> Option<PathBuf> {
    state.config.library.clone().or_else(|| crate::lora::library::LoraLibrary::default_root().ok())
}

/// `hr_upscaler`'s choices in A1111's shape (clients such as SillyTavern list them): the pixel
/// upscalers and the library's ESRGAN-family models (`latent-upscale-modes` has the latent ones).
async fn upscalers(State(state): State<Arc<AppState>>) -> Json<Value> {
    let entry = |name: &str, model: Option<PathBuf>| {
        json!({"name": name, "model_name": model.as_ref().map(|_| name), "model_path": model, "model_url": null, "scale": 4})
    };
    // The order is what the "SD upscale" script's upscaler index counts in.
    let root = library_root(&state);
    let out: Vec<Value> = a1111::upscaler_names(root.as_deref())
        .iter()
        .map(|name| entry(name, root.as_ref().and_then(|r| crate::studio::upscaler_model_path(name, Some(r)).ok().flatten())))
        .collect();
    Json(Value::Array(out))
}

async fn latent_upscale_modes() -> Json<Value> {
    Json(Value::Array(crate::sdxl::upscale::Upscaler::names().into_iter().filter(|n| n.starts_with("Latent")).map(|n| json!({"name": n})).collect()))
}

/// The library's `styles.csv` (what `styles` in a request names), in A1111's shape.
async fn prompt_styles(State(state): State<Arc<AppState>>) -> std::result::Result<Json<Value>, ApiError> {
    let path = library_root(&state).map(|r| r.join("styles.csv"));
    let styles = match path.filter(|p| p.exists()) {
        Some(p) => crate::studio::read_styles(&p).map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => vec![],
    };
    Ok(Json(Value::Array(styles.iter().map(|s| json!({"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt})).collect())))
}

/// `override_settings.sd_vae` as `sd-vae` lists it (a name in `--models-dir`'s `VAE/`), or a path.
fn resolve_vae(state: &AppState, settings: &mut Settings) {
    if settings.vae.is_empty() || Path::new(&settings.vae).exists() {
        return;
    }
    if let Some(p) = state.config.models_dir.as_ref().map(|d| d.join("VAE").join(&settings.vae)).filter(|p| p.exists()) {
        settings.vae = p.to_string_lossy().into_owned();
    }
}

/// VAEs `override_settings.sd_vae` can name: the `.safetensors` files and diffusers
/// folders in `--models-dir`'s `VAE/` (A1111's folder name).
async fn sd_vae(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut out: Vec<Value> = vec![];
    if let Some(dir) = state.config.models_dir.as_ref().map(|d| d.join("VAE")) {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "safetensors") || p.join("config.json").exists()).collect())
            .unwrap_or_default();
        found.sort();
        for p in found {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(json!({"model_name": name, "filename": p}));
        }
    }
    Json(Value::Array(out))
}

/// The library and the models folder are read on every `loras`, `embeddings` and `sd-models`
/// call, so their refresh routes have nothing to rescan.
async fn refresh() -> Json<Value> {
    Json(Value::Null)
}

async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    let model = current_model(&state);
    let mut out = json!({"sd_model_checkpoint": model_title(&model), "sd_checkpoint_hash": studio::cached_model_sha256(&model), "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png", "jpeg_quality": 80});
    if let Value::Object(m) = &mut out {
        m.extend(state.options.lock().unwrap_or_else(|e| e.into_inner()).clone());
    }
    Json(out)
}

/// Sets `sd_model_checkpoint` (a title from `sd-models`, or a path). Other options are kept and
/// shown by `GET options`; `CLIP_stop_at_last_layers` and `sd_vae` apply to later requests.
async fn set_options(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<Value>, ApiError> {
    let mut opts: serde_json::Map<String, Value> = parse_body(&body)?;
    if let Some(v) = opts.remove("sd_model_checkpoint") {
        let want = v.as_str().ok_or_else(|| FieldError::new("sd_model_checkpoint", "expected a checkpoint title"))?;
        let path = find_checkpoint(&state.config, want).ok_or_else(|| FieldError::new("sd_model_checkpoint", format!("{want:?}: not a checkpoint of /sdapi/v1/sd-models")))?;
        *state.model.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }
    if let Some(v) = opts.get("CLIP_stop_at_last_layers") {
        v.as_u64().filter(|n| (1..=12).contains(n)).ok_or_else(|| FieldError::new("CLIP_stop_at_last_layers", "expected a whole number from 1 to 12"))?;
    }
    if let Some(v) = opts.get("eta_noise_seed_delta") {
        v.as_i64().ok_or_else(|| FieldError::new("eta_noise_seed_delta", "expected a whole number"))?;
    }
    if let Some(v) = opts.get("tiling") {
        v.as_bool().ok_or_else(|| FieldError::new("tiling", "expected true or false"))?;
    }
    if opts.contains_key("samples_format") || opts.contains_key("jpeg_quality") {
        let mut merged = state.options.lock().unwrap_or_else(|e| e.into_inner()).clone();
        merged.extend(opts.iter().filter(|(k, _)| matches!(k.as_str(), "samples_format" | "jpeg_quality")).map(|(k, v)| (k.clone(), v.clone())));
        parse_samples_format(&merged)?;
    }
    if let Some(v) = opts.get("sd_vae") {
        let name = v.as_str().ok_or_else(|| FieldError::new("sd_vae", "expected a VAE name, Automatic or None"))?;
        let mut probe = Settings { vae: if matches!(name, "Automatic" | "None" | "") { String::new() } else { name.to_string() }, ..Settings::default() };
        resolve_vae(&state, &mut probe);
        if !probe.vae.is_empty() && !Path::new(&probe.vae).exists() {
            return Err(FieldError::new("sd_vae", format!("{name:?}: not a VAE of /sdapi/v1/sd-vae (expected one of its names, Automatic or None)")).into());
        }
    }
    // Kept and shown by `GET options`, as A1111 keeps them.
    state.options.lock().unwrap_or_else(|e| e.into_inner()).extend(opts);
    Ok(Json(Value::Null))
}

async fn progress(State(state): State<Arc<AppState>>) -> Json<Value> {
    let format = samples_format(&state);
    // The preview is copied out and encoded after the lock is let go: the worker takes it at
    // every step.
    let preview = {
        let g = state.worker.progress.lock().unwrap_or_else(|e| e.into_inner());
        g.current_image.clone().filter(|_| g.active)
    };
    let preview = match preview {
        Some(png) => tokio::task::spawn_blocking(move || in_samples_format(&png, "", format).ok()).await.ok().flatten(),
        None => None,
    };
    let g = state.worker.progress.lock().unwrap_or_else(|e| e.into_inner());
    let frac = if g.active && g.steps > 0 && g.batches > 0 { (g.batch as f64 + g.step as f64 / g.steps as f64) / g.batches as f64 } else { 0.0 };
    let elapsed = g.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let eta = if frac > 0.0 { elapsed / frac - elapsed } else { 0.0 };
    Json(json!({
        "progress": frac,
        "eta_relative": eta,
        "state": {
            "skipped": state.worker.skip.load(Ordering::SeqCst),
            "interrupted": g.interrupted,
            "stopping_generation": false,
            "job": if g.active { format!("Batch {} out of {}", g.batch + 1, g.batches.max(1)) } else { String::new() },
            "job_count": if g.active { g.batches.max(1) } else { 0 },
            "job_timestamp": g.job_timestamp,
            "job_no": g.batch,
            "sampling_step": g.step,
            "sampling_steps": g.steps,
        },
        "current_image": preview.map(|b| b64(&b)),
        "textinfo": null,
        "current_task": null,
    }))
}

async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.worker.interrupt();
    Json(json!({}))
}

async fn skip(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.worker.skip();
    Json(Value::Null)
}

fn yes() -> bool {
    true
}

fn none_upscaler() -> String {
    "None".into()
}

fn five_twelve() -> i64 {
    512
}

fn zero() -> Value {
    json!(0)
}

/// A field's value when the body has it, `null` included (absent: `None`), so an explicit null
/// can be refused as pydantic refuses it where a default stands in for absence.
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    <Value as serde::Deserialize>::deserialize(d).map(Some)
}

/// One picture of `extra-batch-images`' `imageList` (A1111's `FileData`: both fields required).
#[derive(serde::Deserialize)]
struct FileData {
    data: String,
    #[allow(dead_code)]
    name: String,
}

/// A1111's `ExtrasSingleImageRequest` / `ExtrasBatchImagesRequest` (their `ExtrasBaseRequest`
/// fields, defaults included). `show_extras_results` and `upscale_first` change nothing here:
/// the API always returns its pictures, and there is no face restoration to order against.
#[derive(serde::Deserialize)]
struct ExtrasRequest {
    /// A1111's `Literal[0, 1]`; an explicit null is refused as pydantic refuses it.
    #[serde(default = "zero")]
    resize_mode: Value,
    #[serde(default = "yes")]
    #[allow(dead_code)]
    show_extras_results: bool,
    #[serde(default)]
    gfpgan_visibility: f64,
    #[serde(default)]
    codeformer_visibility: f64,
    #[serde(default)]
    codeformer_weight: f64,
    /// Absent: A1111's default, the int 2, which it writes as `2` (pydantic v1 does not
    /// validate defaults); a value given is a float (`2.0`).
    #[serde(default, deserialize_with = "given")]
    upscaling_resize: Option<Value>,
    #[serde(default = "five_twelve")]
    upscaling_resize_w: i64,
    #[serde(default = "five_twelve")]
    upscaling_resize_h: i64,
    #[serde(default = "yes")]
    upscaling_crop: bool,
    #[serde(default = "none_upscaler")]
    upscaler_1: String,
    #[serde(default = "none_upscaler")]
    upscaler_2: String,
    #[serde(default)]
    extras_upscaler_2_visibility: f64,
    #[serde(default)]
    #[allow(dead_code)]
    upscale_first: bool,
    #[serde(default)]
    image: String,
    #[serde(rename = "imageList")]
    image_list: Option<Vec<FileData>>,
}

impl ExtrasRequest {
    /// The settings, each bad field named as pydantic names it.
    fn settings(&self, library: Option<&Path>) -> std::result::Result<studio::ExtrasSettings, ApiError> {
        for (field, v, what) in [("gfpgan_visibility", self.gfpgan_visibility, "GFPGAN"), ("codeformer_visibility", self.codeformer_visibility, "CodeFormer")] {
            if v != 0.0 {
                return Err(FieldError::new(field, format!("{v}: face restoration ({what}) is not available here (its models are pickled): expected 0")).into());
            }
        }
        if !(0.0..=1.0).contains(&self.codeformer_weight) {
            return Err(FieldError::new("codeformer_weight", "ensure this value is between 0 and 1").into());
        }
        let mode = match &self.resize_mode {
            Value::Number(n) if n.as_f64() == Some(0.0) => 0,
            Value::Number(n) if n.as_f64() == Some(1.0) => 1,
            v => return Err(FieldError::new("resize_mode", format!("{v}: expected 0 (scale by upscaling_resize) or 1 (scale to upscaling_resize_w x upscaling_resize_h)")).into()),
        };
        let factor = match &self.upscaling_resize {
            None => 2.0,
            Some(v) => v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())).ok_or_else(|| ApiError::from(FieldError::new("upscaling_resize", format!("{v}: expected a number from 1 to 8"))))?,
        };
        if !(1.0..=8.0).contains(&factor) {
            return Err(FieldError::new("upscaling_resize", format!("{factor}: ensure this value is from 1 to 8")).into());
        }
        // A1111 bounds the target size below only; it is used (and bounded here) in mode 1.
        let side = |field: &str, v: i64| -> std::result::Result<u32, ApiError> {
            let max = if mode == 1 { studio::MAX_EXTRAS_SIDE as i64 } else { u32::MAX as i64 };
            if v < 1 || v > max {
                return Err(FieldError::new(field, format!("{v}: expected 1 to {max} pixels")).into());
            }
            Ok(v as u32)
        };
        let (w, h) = (side("upscaling_resize_w", self.upscaling_resize_w)?, side("upscaling_resize_h", self.upscaling_resize_h)?);
        if !(0.0..=1.0).contains(&self.extras_upscaler_2_visibility) {
            return Err(FieldError::new("extras_upscaler_2_visibility", format!("{}: ensure this value is from 0 to 1", self.extras_upscaler_2_visibility)).into());
        }
        let resize = if mode == 1 {
            studio::ExtrasResize::ScaleTo { width: w, height: h, crop: self.upscaling_crop }
        } else {
            studio::ExtrasResize::ScaleBy { factor, max_side_length: 0 }
        };
        // Upscalers by the names `/sdapi/v1/upscalers` lists, as A1111's `sd_upscalers`: never
        // a path, which would let a client load or probe any file of the server. Upscaler 2
        // only counts once upscaler 1 is one (A1111 returns before looking at it).
        let named = |field: &str, name: &str| -> std::result::Result<(), ApiError> {
            a1111::check_upscaler_name(field, name)?;
            studio::upscaler_model_by_name(name, library, true, &format!("Extras {}", field.replace('_', " "))).map(|_| ()).map_err(|e| ApiError::from(FieldError::new(field, e.to_string())))
        };
        named("upscaler_1", &self.upscaler_1)?;
        let s = studio::ExtrasSettings {
            resize,
            upscaler_1: self.upscaler_1.clone(),
            upscaler_2: self.upscaler_2.clone(),
            upscaler_2_visibility: self.extras_upscaler_2_visibility,
            factor_as_int: self.upscaling_resize.is_none(),
        };
        if s.upscales() {
            named("upscaler_2", &self.upscaler_2)?;
        }
        s.check(library).map_err(|e| ApiError::from(FieldError::new("upscaler_1", e.to_string())))?;
        Ok(s)
    }
}

/// Extras on decoded pictures, off the async threads: each picture as a base64 PNG with its
/// own text chunks and A1111's `postprocessing` line, and the last picture's `html_info`.
/// `pictures` holds each picture's `loc` and bytes.
async fn run_extras(state: &AppState, req: &ExtrasRequest, pictures: Vec<(Vec<String>, Vec<u8>)>) -> std::result::Result<(Vec<String>, String), ApiError> {
    let library = library_root(state);
    let settings = req.settings(library.as_deref())?;
    let device = state.worker.studio.device().clone();
    let format = samples_format(state);
    let internal = |e: String| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e);
    tokio::task::spawn_blocking(move || -> std::result::Result<(Vec<String>, String), ApiError> {
        let prepared = settings.prepare(library.as_deref(), &device).map_err(|e| internal(e.to_string()))?;
        // Every picture is read and sized before any is upscaled.
        let mut decoded = Vec::with_capacity(pictures.len());
        for (loc, bytes) in pictures {
            let at = |m: String| ApiError::from(FieldError { loc: loc.clone(), msg: m });
            let (img, chunks) = studio::decode_extras_input(&bytes).map_err(|e| at(e.to_string()))?;
            prepared.check_size(img.dimensions()).map_err(|e| at(e.to_string()))?;
            decoded.push((img, chunks));
        }
        let mut images = Vec::with_capacity(decoded.len());
        let mut html = studio::infotext_html("");
        for (img, chunks) in decoded {
            let out = prepared.run(&img).map_err(|e| internal(e.to_string()))?;
            let text = out.infotext();
            let chunks = studio::extras_chunks(&chunks, &text, false);
            // `encode_pil_to_base64`: RGB, and the picture's `parameters` (not `postprocessing`).
            let parameters: Vec<(&str, String)> = chunks.iter().filter(|(k, _)| k == "parameters").map(|(k, v)| (k.as_str(), v.clone())).collect();
            let (w, h) = out.image.dimensions();
            let (format, note) = format.or_png(w, h, parameters.first().map_or("", |(_, v)| v.as_str()));
            if let Some(note) = note {
                eprintln!("{note}");
            }
            let encoded = match format {
                studio::SamplesFormat::Png => out.image.encode_png(&chunks),
                f => f.encode(&out.image.to_rgb(), &parameters),
            };
            images.push(b64(&encoded.map_err(|e| internal(e.to_string()))?));
            html = studio::infotext_html(&text);
        }
        Ok((images, html))
    })
    .await
    .map_err(|e| internal(e.to_string()))?
}

/// A1111's `POST /sdapi/v1/extra-single-image`: the Extras tab's upscale on one picture. They
/// run beside the generation queue, not in it: a picture upscale holds no model of the queue's.
async fn extra_single_image(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<Value>, ApiError> {
    let req: ExtrasRequest = parse_body(&body)?;
    if req.image.trim().is_empty() {
        return Err(FieldError::new("image", "no image: expected a base64 picture").into());
    }
    let bytes = decode_image("image", &req.image)?;
    let (mut images, html) = run_extras(&state, &req, vec![(vec!["body".into(), "image".into()], bytes)]).await?;
    Ok(Json(json!({"html_info": html, "image": images.pop()})))
}

/// A1111's `POST /sdapi/v1/extra-batch-images`: the same on `imageList`'s pictures.
async fn extra_batch_images(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<Value>, ApiError> {
    let req: ExtrasRequest = parse_body(&body)?;
    let Some(list) = &req.image_list else {
        return Err(FieldError::new("imageList", "field required").into());
    };
    let mut pictures = Vec::with_capacity(list.len());
    for (i, f) in list.iter().enumerate() {
        let loc: Vec<String> = ["body", "imageList", &i.to_string(), "data"].map(String::from).to_vec();
        let bytes = decode_base64(&f.data).map_err(|m| ApiError::from(FieldError { loc: loc.clone(), msg: m }))?;
        pictures.push((loc, bytes));
    }
    let (images, html) = run_extras(&state, &req, pictures).await?;
    Ok(Json(json!({"html_info": html, "images": images})))
}

#[derive(serde::Deserialize)]
struct PngInfoRequest {
    image: String,
}

async fn png_info(State(state): State<Arc<AppState>>, body: Bytes) -> std::result::Result<Json<studio::PngInfo>, ApiError> {
    let req: PngInfoRequest = parse_body(&body)?;
    // Empty info for an empty image, as A1111 answered before 1.6 (1.10 fails with a 500 here).
    let found = match req.image.trim().is_empty() {
        true => studio::ImageInfo::default(),
        // A1111's `read_info_from_image`: a PNG's `parameters`, a JPEG's or WebP's EXIF comment.
        false => studio::read_image_info(&decode_image("image", &req.image)?).map_err(|e| FieldError::new("image", e.to_string()))?,
    };
    let internal = |e: String| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e);
    // The model's own `loras/`, a bare shipped name included.
    let model = current_model(&state);
    let own_loras = crate::hub::shipped(&model).unwrap_or_else(|| PathBuf::from(&model)).join("loras");
    let library = library_root(&state);
    // Hashing the model's LoRAs and parsing a long text take a while: off the async threads.
    tokio::task::spawn_blocking(move || {
        let ctx = studio::PasteContext::load(library.as_deref(), Some(&own_loras), found.parameters.as_deref().unwrap_or_default());
        for w in &ctx.warnings {
            eprintln!("png-info: {w}");
        }
        found.png_info(&ctx).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map(Json)
    .map_err(internal)
}

async fn require_auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some((user, pass)) = &state.config.auth {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|cred| cred == format!("{user}:{pass}"));
        if !ok {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic")], Json(json!({"detail": "Incorrect username or password"}))).into_response();
        }
    }
    next.run(req).await
}

/// The routes, over `worker`.
pub fn router(config: ApiConfig, worker: Arc<Worker>) -> Router {
    let state = Arc::new(AppState { model: Mutex::new(config.model.clone()), config: config.clone(), worker, options: Mutex::default() });
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/refresh-loras", post(refresh))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/refresh-embeddings", post(refresh))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/upscalers", get(upscalers))
        .route("/sdapi/v1/latent-upscale-modes", get(latent_upscale_modes))
        .route("/sdapi/v1/prompt-styles", get(prompt_styles))
        .route("/sdapi/v1/sd-vae", get(sd_vae))
        .route("/sdapi/v1/refresh-checkpoints", post(refresh))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/extra-single-image", post(extra_single_image))
        .route("/sdapi/v1/extra-batch-images", post(extra_batch_images))
        .route("/sdapi/v1/scripts", get(scripts))
        .route("/controlnet/model_list", get(controlnet_model_list))
        .route("/controlnet/module_list", get(controlnet_module_list))
        .route("/controlnet/version", get(controlnet_version))
        .route("/controlnet/detect", post(controlnet_detect))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_auth))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state)
}

/// Serves until `shutdown` resolves. Binds where the config says (loopback by default).
pub async fn serve(config: ApiConfig, worker: Arc<Worker>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let listener = bind(&config).await?;
    serve_on(listener, config, worker, shutdown).await
}

/// Binds the API's address (so a caller can report a taken port before serving).
pub async fn bind(config: &ApiConfig) -> Result<tokio::net::TcpListener> {
    let addr = format!("{}:{}", config.host, config.port);
    tokio::net::TcpListener::bind(&addr).await.map_err(|e| Error::Argument(format!("cannot listen on {addr}: {e}")))
}

/// Serves on a bound listener until `shutdown` resolves.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    config: ApiConfig,
    worker: Arc<Worker>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(config, worker)).with_graceful_shutdown(shutdown).await.map_err(|e| Error::Argument(format!("server: {e}")))
}

#[cfg(test)]
mod b64_tests {
    /// Each as CPython 3's `base64.b64decode` answers it.
    #[test]
    fn base64_as_python_reads_it() {
        for (text, want) in [("QQ==QUJD", Ok("A")), ("=QUJD", Ok("ABC")), ("QUJD=", Ok("ABC")), ("QR==", Ok("A")), ("QUJD\nRA==", Ok("ABCD")), ("Q=UJD", Ok("ABC")), ("QU=JD", Ok("ABC")), ("QUJ=D", Ok("AB")), ("QUJDR", Err("(5) cannot be 1 more")), ("QUJDRA", Err("padding")), ("QU JD RA =", Err("padding"))] {
            let got = super::python_b64decode(text.as_bytes());
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w.as_bytes()), "{text:?}"),
                Err(w) => assert!(got.as_ref().is_err_and(|e| e.contains(w)), "{text:?}: {got:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_objects() {
        let bad = |b: &str| match parse_body::<GenerationRequest>(&Bytes::from(b.to_string())) {
            Err(ApiError::Field(e)) => e,
            _ => panic!("{b}: accepted"),
        };
        assert_eq!(bad(r#"["a red circle", "neg"]"#).msg, "value is not a valid dict");
        assert_eq!(bad("[]").loc, ["body"]);
        assert!(bad("{").msg.starts_with("JSON decode error"));
        assert_eq!(bad(r#"{"steps": "many"}"#).loc, ["body", "steps"]);
        assert!(parse_body::<GenerationRequest>(&Bytes::from_static(br#"{"prompt": "x"}"#)).is_ok());
    }

    /// `sd-models` names a checkpoint as A1111 does, and `sd_model_checkpoint` finds it by any
    /// of those names.
    #[test]
    fn checkpoints_answer_to_their_a1111_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sdxl_base.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let folder = dir.path().join("tiny");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("model_index.json"), b"{}").unwrap();
        let (f, d) = (file.to_string_lossy().into_owned(), folder.to_string_lossy().into_owned());
        let config = ApiConfig { model: d.clone(), models_dir: Some(dir.path().to_path_buf()), ..ApiConfig::default() };
        // Not hashed yet: listing does not hash.
        let n = CheckpointNames::of(&f);
        assert_eq!((n.title.as_str(), n.model_name.as_str(), n.shorthash()), ("sdxl_base.safetensors", "sdxl_base", None));
        crate::studio::model_hash::hash_in(&f, None).unwrap();
        let n = CheckpointNames::of(&f);
        assert_eq!((n.title.as_str(), n.shorthash()), ("sdxl_base.safetensors [ba7816bf8f]", Some("ba7816bf8f")));
        for want in ["sdxl_base.safetensors [ba7816bf8f]", "sdxl_base.safetensors", "sdxl_base", "ba7816bf8f", f.as_str()] {
            assert_eq!(find_checkpoint(&config, want).as_deref(), Some(f.as_str()), "{want}");
        }
        let n = CheckpointNames::of(&d);
        assert_eq!((n.title.as_str(), n.model_name.as_str(), n.shorthash()), ("tiny", "tiny", None));
        assert_eq!(find_checkpoint(&config, "tiny").as_deref(), Some(d.as_str()));
        assert_eq!(find_checkpoint(&config, "other"), None);
        assert!(timestamp().len() == 14 && timestamp().bytes().all(|b| b.is_ascii_digit()), "{}", timestamp());
    }
}
