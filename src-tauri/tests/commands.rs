//! The command layer without a window: the same functions the Tauri commands wrap.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use loramix::studio::{LoraSetting, Settings};
use loramix_app::commands::{user_path, AppState, ExportRequest, JobEvent, LibraryQuery, LibraryUpdate};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn state(dir: &Path) -> AppState {
    AppState::new(dir.join("library"), repo().join("models")).unwrap()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn paths_from_the_ui_are_validated() {
    assert!(user_path("relative/file", "x").is_err());
    assert!(user_path("", "x").is_err());
    assert!(user_path("/tmp/../etc/passwd", "x").unwrap_err().to_string().contains(".."));
    assert!(user_path("/tmp/ok.png", "x").is_ok());
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    assert!(st.resolve_model("../../etc").is_err());
    assert!(st.resolve_model("owner/name").is_ok());
    assert!(st.resolve_model("miniworld").unwrap().ends_with("miniworld"));
    // Only gallery images are served or exported.
    let outside = tmp.path().join("x.png");
    std::fs::write(&outside, b"not a png").unwrap();
    assert!(st.gallery_image(&s(&outside)).unwrap_err().to_string().contains("not an image of the gallery"));
    let e = st.gallery_export(ExportRequest { images: vec![s(&outside)], dest: s(&tmp.path().join("out")), template: String::new(), zip: false, manifest: false });
    assert!(e.unwrap_err().to_string().contains("only gallery images"));
}

#[test]
fn library_import_reports_each_file() {
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    let loras = repo().join("models/miniworld/loras");
    let bad = repo().join("tests/fixtures/bad/truncated.safetensors");
    let events = std::sync::Mutex::new(vec![]);
    let sum = st.library_import(&[s(&loras), s(&bad)], &|e| events.lock().unwrap().push(e)).unwrap();
    let events = events.into_inner().unwrap();
    assert_eq!(sum.added, 8);
    assert_eq!(sum.failed, 1);
    assert_eq!(events.len(), 9);
    let failed: Vec<_> = events.iter().filter(|e| e.status == "failed").collect();
    assert!(failed[0].message.as_deref().unwrap().contains("truncated"), "{:?}", failed[0].message);
    let styles = st.library_list(LibraryQuery { role: Some("style".into()), ..Default::default() }).unwrap();
    assert_eq!(styles.len(), 4);
    let e = st.library_update("vlox", LibraryUpdate { role: Some("style".into()), tags: Some(vec!["emblem".into()]), name: None }).unwrap();
    assert_eq!((e.role.as_str(), e.user_tags.clone()), ("style", vec!["emblem".to_string()]));
    assert!(st.library_update("vlox", LibraryUpdate { role: Some("hero".into()), ..Default::default() }).is_err());
    st.library_remove("vlox").unwrap();
    assert_eq!(st.library_list(LibraryQuery::default()).unwrap().len(), 7);
}

fn wait_for(rx: &mpsc::Receiver<JobEvent>, done: impl Fn(&JobEvent) -> bool) -> Vec<JobEvent> {
    let mut seen = vec![];
    loop {
        let e = rx.recv_timeout(Duration::from_secs(300)).expect("job event");
        let stop = done(&e);
        seen.push(e);
        if stop {
            return seen;
        }
    }
}

#[test]
fn generate_restore_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    let settings = Settings {
        prompt: "a big red circle on a cream background, flat style".into(),
        negative_prompt: "blurry".into(),
        steps: 4,
        seed: Some(11),
        batch_count: 2,
        loras: vec![LoraSetting { name: "striped".into(), weight: 0.8, role: None, schedule: None }],
        mix: "merge".into(),
        ..Settings::default()
    };
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let id = st.enqueue(settings.clone(), Box::new(move |e| { let _ = tx.lock().unwrap().send(e); })).unwrap();
    let events = wait_for(&rx, |e| matches!(e, JobEvent::Done { .. } | JobEvent::Failed { .. }));
    let images = match events.last().unwrap() {
        JobEvent::Done { job, images } => {
            assert_eq!(*job, id);
            images.clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(images.len(), 2);
    assert!(matches!(events[0], JobEvent::Queued { position: 0, .. }));
    let steps = events.iter().filter(|e| matches!(e, JobEvent::Progress { event: loramix::studio::StudioEvent::Step { .. }, .. })).count();
    assert_eq!(steps, 8, "a step event per step and batch");
    assert_eq!(events.iter().filter(|e| matches!(e, JobEvent::Preview { .. })).count(), 8);
    // Gallery lists them with their settings; a PNG restores them (seed of its batch).
    let gallery = st.gallery_list().unwrap();
    assert_eq!(gallery.len(), 2);
    let restored = st.png_settings(&s(&images[1])).unwrap();
    assert_eq!(restored.prompt, settings.prompt);
    assert_eq!(restored.seed, Some(12));
    assert_eq!(restored.loras, settings.loras);
    // A1111's JPEG and WebP pictures restore from their EXIF comment; other files are refused.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/image_info").canonicalize().unwrap();
    for name in ["a1111_saved.jpg", "a1111_api.webp"] {
        let r = st.png_settings(&s(&fixtures.join(name))).unwrap();
        assert_eq!((r.steps, r.seed, r.cfg, r.width, r.height), (20, Some(1234), 5.0, 24, 16), "{name}");
        assert!(r.prompt.starts_with("a caf\u{e9} at dusk"), "{name}: {}", r.prompt);
        assert_eq!(r.negative_prompt, "blurry, \"low quality\"");
    }
    let err = st.png_settings(&s(&fixtures.join("plain.jpg"))).unwrap_err().to_string();
    assert!(err.contains("plain.jpg") && err.contains("no generation settings"), "{err}");
    assert!(st.png_settings(&s(&fixtures.join("expected.json"))).unwrap_err().to_string().contains("expected a .png, .jpg"));
    assert!(st.gallery_image(&s(&images[0])).unwrap().starts_with("data:image/png;base64,"));
    // The PNG's A1111 text carries the LoRA hash.
    let text = loramix::studio::png_text_chunks(&std::fs::read(&images[0]).unwrap()).unwrap();
    assert!(text["parameters"].contains("Lora hashes: \"striped: "), "{}", text["parameters"]);
    assert!(text["parameters"].contains("<lora:striped:0.8>"));
    // Export to a folder by template, then to a zip.
    let dest = tmp.path().join("export");
    let out = st.gallery_export(ExportRequest { images: images.iter().map(|p| s(p)).collect(), dest: s(&dest), template: "{index}-{seed}".into(), zip: false, manifest: false }).unwrap();
    let names: Vec<String> = out.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["00001-11.png", "00002-12.png"]);
    assert_eq!(std::fs::read(&out[0]).unwrap(), std::fs::read(&images[0]).unwrap());
    let zip = st.gallery_export(ExportRequest { images: images.iter().map(|p| s(p)).collect(), dest: s(&dest.join("batch.zip")), template: String::new(), zip: true, manifest: false }).unwrap();
    let bytes = std::fs::read(&zip[0]).unwrap();
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    let manifest = st.gallery_export(ExportRequest { images: images.iter().map(|p| s(p)).collect(), dest: s(&dest.join("jobs")), template: String::new(), zip: false, manifest: true }).unwrap();
    assert!(manifest[0].ends_with("jobs.jsonl"));
    let text = std::fs::read_to_string(&manifest[0]).unwrap();
    assert!(!text.trim().is_empty() && text.lines().all(|l| loramix::studio::parse_line(l).is_ok()), "{text}");
    assert!(std::fs::read_dir(&dest).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
    // Extras: a gallery picture upscaled into the gallery, its settings still restoring.
    let ex = loramix::studio::ExtrasSettings { upscaler_1: "Lanczos".into(), ..Default::default() };
    let up = st.gallery_extras(&[s(&images[0])], &ex).unwrap();
    assert_eq!(up.len(), 1);
    assert!(up[0].starts_with(&st.gallery_dir) && up[0] != images[0]);
    let (w, h) = image::image_dimensions(&up[0]).unwrap();
    assert_eq!((w, h), (2 * image::image_dimensions(&images[0]).unwrap().0, 2 * image::image_dimensions(&images[0]).unwrap().1));
    assert_eq!(st.png_settings(&s(&up[0])).unwrap().seed, Some(11));
    assert_eq!(st.gallery_list().unwrap().len(), 3);
    let e = st.gallery_extras(&[], &ex).unwrap_err().to_string();
    assert!(e.contains("no pictures"), "{e}");
    let e = st.gallery_extras(&["relative.png".into()], &ex).unwrap_err().to_string();
    assert!(e.contains("absolute"), "{e}");
}

#[test]
fn cancel_stops_within_a_step_and_queued_jobs_can_be_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    let settings = Settings { prompt: "a small blue square".into(), steps: 200, seed: Some(1), ..Settings::default() };
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let tx = std::sync::Mutex::new(tx);
    let a = st.enqueue(settings.clone(), Box::new(move |e| { let _ = tx.lock().unwrap().send(e); })).unwrap();
    let tx2 = std::sync::Mutex::new(tx2);
    let b = st.enqueue(settings, Box::new(move |e| { let _ = tx2.lock().unwrap().send(e); })).unwrap();
    // Drop the queued one, then stop the running one after its first step.
    assert!(st.cancel(b));
    let mut events = vec![];
    let mut cancelled = false;
    loop {
        let e = rx.recv_timeout(Duration::from_secs(300)).expect("job event");
        if !cancelled && matches!(e, JobEvent::Progress { event: loramix::studio::StudioEvent::Step { .. }, .. }) {
            assert!(st.cancel(a));
            cancelled = true;
        }
        let stop = matches!(e, JobEvent::Cancelled { job, .. } if job == a) || matches!(e, JobEvent::Done { .. } | JobEvent::Failed { .. });
        events.push(e);
        if stop {
            break;
        }
    }
    let last_step = events.iter().rev().find_map(|e| match e {
        JobEvent::Progress { event: loramix::studio::StudioEvent::Step { step, .. }, .. } => Some(*step),
        _ => None,
    });
    assert!(matches!(events.last().unwrap(), JobEvent::Cancelled { job, .. } if *job == a), "{:?}", events.last());
    // Stopped within one step of the request.
    assert!(last_step.unwrap() <= 2, "ran to step {last_step:?}");
    assert!(events.iter().any(|e| matches!(e, JobEvent::Cancelled { job, .. } if *job == b)));
    assert!(st.gallery_list().unwrap().is_empty(), "a cancelled job writes nothing");
}

#[test]
fn llm_pane_reuses_the_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    let granite = repo().join("tests/fixtures/llm/granite");
    st.llm_load(&s(&granite)).unwrap();
    let a = st.llm_add_adapter(&s(&granite.join("adapters/certainty"))).unwrap();
    assert_eq!(a.kind, "alora");
    let first = st.llm_send("what is the capital of france", None, 5, &|_| {}).unwrap();
    // A fresh conversation: the prompt is prefilled once, the reply feeds back its own tokens only.
    assert_eq!(first.reused_positions, first.prefilled_positions);
    assert_eq!(first.computed_positions, first.tokens - 1);
    let inv = st.llm_send("", Some("certainty"), 4, &|_| {}).unwrap();
    // The invocation reuses every conversation position and computes only itself and the reply.
    assert!(inv.reused_positions > 10);
    assert_eq!(inv.computed_positions, a.invocation_tokens.len() + inv.tokens - 1);
    assert!(st.llm_send("", Some("nope"), 4, &|_| {}).is_err());
}

#[test]
fn subspaces_are_listed_and_replaced_from_the_app() {
    use loramix::lora::library::{LoraLibrary, SubspaceRequest};
    use loramix::lora::subspace::{Centering, ComponentRule, Storage};
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    st.library_import(&[s(&repo().join("models/miniworld/loras"))], &|_| {}).unwrap();
    assert!(st.subspace_list().unwrap().is_empty());
    // Built by the engine (the CLI's `lora subspace build`) in the app's library.
    let pipe = loramix::SdxlPipeline::load(&s(&repo().join("models/miniworld")), &Default::default()).unwrap();
    let targets = loramix::lora::AdapterTargets::of_pipeline(&pipe);
    let members = vec!["vlox".to_string(), "dotted".to_string()];
    let req = SubspaceRequest { name: "pair", members: &members, all: false, base: None, centering: Centering::Uncentred, rule: ComponentRule::Fixed(16), storage: Storage::F32, random_basis: None };
    LoraLibrary::open(&tmp.path().join("library")).unwrap().build_subspace(&req, &targets).unwrap();
    let list = st.subspace_list().unwrap();
    assert_eq!((list.len(), list[0].members.len()), (1, 2));
    assert!(list[0].bytes_before > 0 && list[0].bytes_after > 0);
    assert!(st.subspace_replace("pair", f64::NAN).is_err());
    assert_eq!(st.subspace_replace("pair", 1e-3).unwrap().len(), 2);
    assert!(st.subspace_list().unwrap()[0].members.iter().all(|m| m.replaced));
    assert_eq!(st.subspace_restore("pair").unwrap(), 2);
    assert!(st.subspace_replace("nope", 0.1).unwrap_err().to_string().contains("no subspace"));
}

#[test]
fn training_runs_from_the_app_and_stops_on_request() {
    use loramix::studio::TrainRequest;
    let tmp = tempfile::tempdir().unwrap();
    let st = state(tmp.path());
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..2u8 {
        image::RgbImage::from_fn(64, 64, |x, _| image::Rgb([x as u8 * 4, 80 * i, 40])).save(imgs.join(format!("{i}.png"))).unwrap();
    }
    let req = |name: &str, images: PathBuf| TrainRequest {
        images,
        prompt: "a zorp emblem".into(),
        name: name.into(),
        subspace: None,
        rank: 2,
        steps: 2,
        batch: 1,
        lr: 1e-3,
        seed: 0,
        resolution: None,
        base: Some("loramix-miniworld".into()),
        export: None,
        restart: false,
        checkpoint_every: 1,
        model: "miniworld".into(),
    };
    assert!(st.start_training(req("a", PathBuf::from("relative/imgs"))).is_err());
    let (r, stop) = st.start_training(req("zorp", imgs.clone())).unwrap();
    assert!(st.start_training(req("other", imgs.clone())).unwrap_err().to_string().contains("running already"));
    let steps = std::sync::Mutex::new(0);
    let report = st.run_training(&r, &stop, &|e| {
        if let loramix::studio::TrainEvent::Step { .. } = e {
            *steps.lock().unwrap() += 1;
        }
    }).unwrap();
    assert_eq!((report.steps, *steps.lock().unwrap()), (2, 2));
    assert_eq!(report.entry.unwrap().display_name, "zorp");
    // A stop request ends a job after its checkpoint; the same request resumes it.
    let (r, stop) = st.start_training(req("zorp2", imgs.clone())).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stopped = st.run_training(&r, &stop, &|_| {}).unwrap();
    assert!(stopped.stopped && stopped.entry.is_none() && stopped.steps == 1);
    let (r, stop) = st.start_training(req("zorp2", imgs)).unwrap();
    let done = st.run_training(&r, &stop, &|_| {}).unwrap();
    assert!(!done.stopped && done.steps == 2 && done.entry.is_some());
}
