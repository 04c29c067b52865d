//! The API's worker on a host's queue (the desktop app's API switch): requests run on the host's
//! one job thread, after the jobs already queued there, on the host's studio.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};

use common::*;
use loramix::api::{ApiConfig, Dispatch, Worker};
use loramix::studio::Studio;

type Queue = Arc<(Mutex<VecDeque<Box<dyn FnOnce() + Send>>>, Condvar)>;

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    exchange(port, &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()))
}

fn get(port: u16, path: &str) -> (u16, String) {
    exchange(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
}

/// One raw HTTP request: the status code and the body.
fn exchange(port: u16, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn api_requests_queue_behind_the_hosts_jobs() {
    // The host: one thread running whatever is queued, in order, logging what ran.
    let queue: Queue = Arc::default();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let queue = queue.clone();
        std::thread::spawn(move || loop {
            let job = {
                let (lock, cv) = &*queue;
                let mut q = lock.lock().unwrap();
                while q.is_empty() {
                    q = cv.wait(q).unwrap();
                }
                q.pop_front().unwrap()
            };
            job();
        });
    }
    let push = {
        let queue = queue.clone();
        move |job: Box<dyn FnOnce() + Send>| {
            let (lock, cv) = &*queue;
            lock.lock().unwrap().push_back(job);
            cv.notify_one();
        }
    };
    // A long host job is running when the request arrives.
    let l = log.clone();
    push(Box::new(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        l.lock().unwrap().push("host job".into());
    }));
    let l = log.clone();
    let dispatch: Dispatch = Arc::new(move |job| {
        let l = l.clone();
        push(Box::new(move || {
            l.lock().unwrap().push("api request".into());
            job();
        }));
        true
    });
    let model = fixture("tiny2").join("pipeline").to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let config = ApiConfig { port: 0, model, library: Some(tmp.path().join("lib")), out: tmp.path().join("out"), ..Default::default() };
    let worker = Arc::new(Worker::start_on(Arc::new(Studio::new()), config.library.clone(), config.out.clone(), dispatch));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(loramix::api::bind(&config)).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(loramix::api::serve_on(listener, config, worker, std::future::pending()));
    let (code, body) = post(port, "/sdapi/v1/txt2img", r#"{"prompt": "a red house", "steps": 2, "width": 32, "height": 32, "seed": 4}"#);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    assert_eq!(*log.lock().unwrap(), ["host job", "api request"], "the request waited for the host's job");
    // A1111's batches: image k has the seed seed + k.
    let (code, body) = post(port, "/sdapi/v1/txt2img", r#"{"prompt": "a red house", "steps": 2, "width": 32, "height": 32, "seed": 4, "batch_size": 2}"#);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], serde_json::json!([4, 5]), "{info}");
    assert!(info["infotexts"][1].as_str().unwrap().contains("Seed: 5, "), "{info}");
}

/// Twelve Euler a steps of the tiny pipeline from seed 30 (the interrupt and skip jobs).
fn red_house() -> loramix::studio::Settings {
    loramix::studio::Settings {
        model: fixture("tiny2").join("pipeline").to_string_lossy().into_owned(),
        prompt: "a red house".into(),
        steps: 12,
        sampler: "euler_a".into(),
        seed: Some(30),
        width: 32,
        height: 32,
        ..Default::default()
    }
}

/// A1111's Interrupt (what the API's jobs do): the interrupted batch is decoded from the clean
/// latents its last step predicted, and written; without it (the app's Stop, fixed-name batch
/// runs) nothing unfinished is written. Either way the job ends Cancelled.
#[test]
fn an_interrupted_batch_is_decoded_from_its_last_prediction() {
    use loramix::rng::BatchSeeds;
    use loramix::studio::{ImageOutputs, Settings, StudioEvent};
    use std::sync::atomic::{AtomicBool, Ordering};
    let model = fixture("tiny2").join("pipeline");
    let settings = Settings { batch_size: 2, batch_seeds: BatchSeeds::PerImage, ..red_house() };
    let studio = Studio::new();
    let tmp = tempfile::tempdir().unwrap();
    let pngs = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect()).unwrap_or_default();
        v.sort();
        v
    };
    for keep in [false, true] {
        let dir = tmp.path().join(format!("keep-{keep}"));
        let cancel = AtomicBool::new(false);
        let outputs = ImageOutputs { dir: &dir, names: None, images: None, keep_interrupted: keep, skip: None, format: Default::default() };
        let r = studio.run(
            &settings,
            None,
            &outputs,
            &cancel,
            &mut |e| {
                if let StudioEvent::Step { step: 5, .. } = e {
                    cancel.store(true, Ordering::SeqCst);
                }
            },
            &mut |_| {},
        );
        assert!(matches!(r, Err(loramix::Error::Cancelled)), "{r:?}");
        let files = pngs(&dir);
        if !keep {
            assert!(files.is_empty(), "{files:?}");
            continue;
        }
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["00000-30.png", "00001-31.png"]);
        // The same five steps by hand: each image is the decode of the fifth step's x0.
        let pipe = loramix::SdxlPipeline::load(model.to_str().unwrap(), &loramix::LoadOptions::default()).unwrap();
        let req = loramix::GenerateRequest {
            prompt: settings.prompt.clone(),
            steps: 12,
            cfg: settings.cfg,
            sampler: Some("euler_a".parse().unwrap()),
            seed: 30,
            batch_seeds: BatchSeeds::PerImage,
            width: Some(32),
            height: Some(32),
            batch_size: 2,
            ..Default::default()
        };
        let mut x0 = None;
        let e = pipe.generate_latents(&req, &mut |p| {
            x0 = p.denoised.clone();
            p.step < 5
        });
        assert!(matches!(e, Err(loramix::Error::Cancelled)));
        let expected = pipe.decode(&x0.expect("euler a predicts x0")).unwrap();
        for (f, want) in files.iter().zip(&expected) {
            let got = image::open(f).unwrap().to_rgb8();
            let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= 1, "{}: {worst} levels from the decoded prediction", f.display());
        }
    }
}

/// A1111's Skip: the running batch ends as an interrupted one (kept, decoded from its last
/// prediction, where the job keeps those) and the job goes on with its next batch, which is the
/// image its seed makes; the job ends well.
#[test]
fn skip_ends_one_batch_and_the_job_goes_on() {
    use loramix::studio::{ImageOutputs, Settings, StudioEvent};
    use std::sync::atomic::{AtomicBool, Ordering};
    let settings = Settings { batch_count: 2, ..red_house() };
    let studio = Studio::new();
    let tmp = tempfile::tempdir().unwrap();
    let alone = studio
        .generate(&Settings { seed: Some(31), batch_count: 1, ..settings.clone() }, None, &tmp.path().join("alone"), &AtomicBool::new(false), &mut |_| {}, &mut |_| {})
        .unwrap();
    let full30 = studio
        .generate(&Settings { batch_count: 1, ..settings.clone() }, None, &tmp.path().join("full30"), &AtomicBool::new(false), &mut |_| {}, &mut |_| {})
        .unwrap();
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    for keep in [true, false] {
        let dir = tmp.path().join(format!("skip-{keep}"));
        let (cancel, skip) = (AtomicBool::new(false), AtomicBool::new(false));
        let outputs = ImageOutputs { dir: &dir, names: None, images: None, keep_interrupted: keep, skip: Some(&skip), format: Default::default() };
        let mut written = vec![];
        let r = studio.run(
            &settings,
            None,
            &outputs,
            &cancel,
            &mut |e| match e {
                StudioEvent::Step { batch: 0, step: 5, .. } => skip.store(true, Ordering::SeqCst),
                StudioEvent::Image { path, .. } => written.push(path),
                _ => {}
            },
            &mut |_| {},
        );
        assert!(r.is_ok(), "{r:?}");
        let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        if keep {
            assert_eq!(names, ["00000-30.png", "00001-31.png"]);
            assert_ne!(pixels(&written[0]), pixels(&full30[0]), "the skipped batch stopped at step 5");
        } else {
            assert_eq!(names, ["00000-31.png"], "without keep, the skipped batch is dropped");
        }
        assert_eq!(pixels(written.last().unwrap()), pixels(&alone[0]), "the next batch is seed 31's image");
        assert!(!skip.load(Ordering::SeqCst), "the flag is taken");
    }
}

/// sd-webui-controlnet's API: `/controlnet/model_list` names the models in `--models-dir`'s
/// `ControlNet/`, a txt2img request's `alwayson_scripts.controlnet.args` unit (model by that
/// name, base64 image, canny with its thresholds) makes the image the same settings make in the
/// studio, the infotext names the unit, and a bad unit is a 422 naming its field.
/// The API on `config`, its jobs each on a thread of their own: the studio, the port, and the
/// runtime that serves until dropped.
fn serve_threaded(config: ApiConfig) -> (Arc<Studio>, u16, tokio::runtime::Runtime) {
    let studio = Arc::new(Studio::new());
    let dispatch: Dispatch = Arc::new(|job| {
        std::thread::spawn(job);
        true
    });
    let worker = Arc::new(Worker::start_on(studio.clone(), config.library.clone(), config.out.clone(), dispatch));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(loramix::api::bind(&config)).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(loramix::api::serve_on(listener, config, worker, std::future::pending()));
    (studio, port, rt)
}

#[test]
fn controlnet_units_through_the_api() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    copy_dir(&fixture("tiny2").join("controlnet"), &models.join("ControlNet").join("edges-xl"));
    copy_dir(&fixture("tiny2").join("t2i_adapter"), &models.join("ControlNet").join("zz-adapter"));
    let model = fixture("tiny2").join("pipeline").to_string_lossy().into_owned();
    let config = ApiConfig { port: 0, model: model.clone(), models_dir: Some(models.clone()), library: Some(tmp.path().join("lib")), out: tmp.path().join("out"), ..Default::default() };
    let (studio, port, _rt) = serve_threaded(config);

    let (code, body) = get(port, "/controlnet/model_list");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let name = list["model_list"][0].as_str().unwrap().to_string();
    assert!(name.starts_with("edges-xl [") && name.len() == "edges-xl [12345678]".len(), "{name}");
    let shapes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/canny/shapes.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&shapes).unwrap());
    let unit = serde_json::json!({"enabled": true, "module": "canny", "model": name, "image": b64, "weight": 1.5, "threshold_a": 50.7, "threshold_b": 80.2,
        "guidance_start": 0.0, "guidance_end": 0.75, "resize_mode": "Crop and Resize", "control_mode": "Balanced", "pixel_perfect": false, "processor_res": 512});
    let request = |unit: serde_json::Value| {
        serde_json::json!({"prompt": "a red house", "steps": 4, "sampler_name": "Euler", "seed": 9, "width": 48, "height": 32, "cfg_scale": 5,
            "save_images": true, "alwayson_scripts": {"controlnet": {"args": [{"enabled": false, "model": "absent"}, unit]}}})
        .to_string()
    };
    let (code, body) = post(port, "/sdapi/v1/txt2img", &request(unit.clone()));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    let text = info["infotexts"][0].as_str().unwrap();
    assert!(text.contains(&format!("ControlNet 0: \"Module: canny, Model: {name}, Weight: 1.5")), "{text}");
    let png = base64::engine::general_purpose::STANDARD.decode(v["images"][0].as_str().unwrap()).unwrap();
    let api_pixels = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
    // The same job given to the studio directly.
    let settings = loramix::studio::Settings {
        model,
        prompt: "a red house".into(),
        steps: 4,
        sampler: "euler".into(),
        seed: Some(9),
        width: 48,
        height: 32,
        cfg: 5.0,
        batch_seeds: loramix::rng::BatchSeeds::PerImage,
        controlnet: vec![loramix::studio::ControlNetSetting {
            model: models.join("ControlNet/edges-xl").to_string_lossy().into_owned(),
            image: shapes.to_string_lossy().into_owned(),
            module: "canny".into(),
            weight: 1.5,
            guidance_end: 0.75,
            threshold_a: Some(50.7),
            threshold_b: Some(80.2),
            ..Default::default()
        }],
        ..Default::default()
    };
    let out = studio.generate(&settings, None, &tmp.path().join("direct"), &std::sync::atomic::AtomicBool::new(false), &mut |_| {}, &mut |_| {}).unwrap();
    assert!(image::open(&out[0]).unwrap().to_rgb8().into_raw() == api_pixels, "the API's unit is not the studio's");
    // The extension's other control modes: written in the infotext, and they change the image.
    for (mode, label) in [(serde_json::json!(2), "ControlNet is more important"), (serde_json::json!("My prompt is more important"), "My prompt is more important")] {
        let mut u = unit.clone();
        u["control_mode"] = mode;
        let (code, body) = post(port, "/sdapi/v1/txt2img", &request(u));
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
        assert!(info["infotexts"][0].as_str().unwrap().contains(&format!("Control Mode: {label}")), "{info}");
        let png = base64::engine::general_purpose::STANDARD.decode(v["images"][0].as_str().unwrap()).unwrap();
        assert!(image::load_from_memory(&png).unwrap().to_rgb8().into_raw() != api_pixels, "{label} made the balanced image");
    }
    // A T2I-Adapter whose hires size it cannot divide: the request's fault, a 422, before any pass.
    let adapter = list["model_list"].as_array().unwrap().iter().filter_map(|m| m.as_str()).find(|m| m.starts_with("zz-adapter [")).unwrap().to_string();
    let mut u = unit.clone();
    u["model"] = adapter.into();
    u["module"] = "none".into();
    let mut body: serde_json::Value = serde_json::from_str(&request(u)).unwrap();
    body["enable_hr"] = true.into();
    body["hr_scale"] = 1.3.into();
    let (code, body) = post(port, "/sdapi/v1/txt2img", &body.to_string());
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("in the hires pass") && body.contains("62x40"), "{body}");
    // The saved image's record names a control image that outlives the request.
    let saved = std::fs::read_dir(tmp.path().join("out")).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "png")).unwrap();
    let (_, rec) = loramix::studio::settings_from_image(&saved).unwrap();
    let kept = std::path::PathBuf::from(&rec.unwrap().settings.controlnet[0].image);
    assert!(kept.starts_with(tmp.path().join("out").join("inputs")) && kept.is_file(), "{}", kept.display());
    assert!(!std::fs::read(&kept).unwrap().is_empty());
    // Bad units name their field.
    // A file that is not a plain ControlNet (a UNet's weights) is the request's fault.
    std::fs::copy(fixture("tiny2").join("pipeline/unet/diffusion_pytorch_model.safetensors"), models.join("ControlNet/not-a-controlnet.safetensors")).unwrap();
    for (field, bad) in [
        ("module", serde_json::json!({"module": "depth_zoe"})),
        ("model", serde_json::json!({"model": "nope [00000000]"})),
        ("model", serde_json::json!({"model": "not-a-controlnet"})),
        ("image", serde_json::json!({"image": "not base64!"})),
        ("guidance_end", serde_json::json!({"guidance_start": 0.5, "guidance_end": 0.2})),
        ("control_mode", serde_json::json!({"control_mode": "Whatever is more important"})),
        ("control_mode", serde_json::json!({"control_mode": 1, "guessmode": true})),
    ] {
        let mut u = unit.clone();
        u.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let (code, body) = post(port, "/sdapi/v1/txt2img", &request(u));
        assert_eq!(code, 422, "{field}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["detail"][0]["loc"], serde_json::json!(["body", "alwayson_scripts", "controlnet", "args", "1", field]), "{body}");
    }

    // `/controlnet/detect`: the map a unit would follow, OpenCV's canny bit for bit.
    let detect = |body: serde_json::Value| post(port, "/controlnet/detect", &body.to_string());
    let (code, body) = detect(serde_json::json!({"controlnet_module": "canny", "controlnet_input_images": [b64.clone(), format!("data:image/png;base64,{b64}")],
        "controlnet_processor_res": 512, "controlnet_threshold_a": 50.7, "controlnet_threshold_b": 80.2}));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["info"], "Success");
    let want = image::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/canny/shapes_50.7_80.2.png")).unwrap().to_rgb8().into_raw();
    for img in v["images"].as_array().unwrap() {
        let png = base64::engine::general_purpose::STANDARD.decode(img.as_str().unwrap()).unwrap();
        assert!(image::load_from_memory(&png).unwrap().to_rgb8().into_raw() == want, "detect's map is not OpenCV's");
    }
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    // -1 thresholds are the module's defaults.
    let (_, body) = detect(serde_json::json!({"controlnet_module": "canny", "controlnet_input_images": [b64.clone()], "controlnet_threshold_a": -1, "controlnet_threshold_b": -1}));
    let (_, body2) = detect(serde_json::json!({"controlnet_module": "canny", "controlnet_input_images": [b64.clone()], "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}));
    assert_eq!(body, body2);
    for (bad, detail) in [
        (serde_json::json!({"controlnet_module": "depth_zoe", "controlnet_input_images": [b64.clone()]}), "Module not available"),
        (serde_json::json!({"controlnet_module": "canny", "controlnet_input_images": []}), "No image selected"),
    ] {
        let (code, body) = detect(bad);
        assert_eq!(code, 422, "{body}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["detail"], detail);
    }
    let (code, body) = detect(serde_json::json!({"controlnet_module": "canny", "controlnet_input_images": [b64.clone(), "bm90IGFuIGltYWdl"]}));
    assert_eq!(code, 422, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["detail"][0]["loc"], serde_json::json!(["body", "controlnet_input_images", "1"]));
}

/// A1111's img2img `script_name: "SD upscale"` with its `script_args` (`[info, overlap,
/// upscaler index, scale]`, the index counting in `/sdapi/v1/upscalers`) makes the studio's SD
/// upscale; another script is a 422 naming it.
#[test]
fn sd_upscale_script_through_the_api() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny2").join("pipeline").to_string_lossy().into_owned();
    let config = ApiConfig { port: 0, model: model.clone(), library: Some(tmp.path().join("lib")), out: tmp.path().join("out"), ..Default::default() };
    let (studio, port, _rt) = serve_threaded(config);

    let (code, body) = get(port, "/sdapi/v1/upscalers");
    assert_eq!(code, 200, "{body}");
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["None", "Lanczos", "Nearest"]);
    let (code, body) = get(port, "/sdapi/v1/scripts");
    assert!(code == 200 && body.contains("\"img2img\":[\"sd upscale\"]"), "{code} {body}");
    let init = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 9) as u8, 77]));
    let init_path = tmp.path().join("init.png");
    init.save(&init_path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&init_path).unwrap());
    let request = |script: &str, args: serde_json::Value| {
        serde_json::json!({"prompt": "a red house", "steps": 4, "sampler_name": "Euler", "seed": 3, "width": 32, "height": 32, "cfg_scale": 5,
            "denoising_strength": 0.6, "init_images": [b64], "script_name": script, "script_args": args})
        .to_string()
    };
    let (code, body) = post(port, "/sdapi/v1/img2img", &request("SD upscale", serde_json::json!(["", 8, 1, 1.5])));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let png = base64::engine::general_purpose::STANDARD.decode(v["images"][0].as_str().unwrap()).unwrap();
    let api = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(api.dimensions(), (56, 32), "40x24 × 1.5, rounded down to 8");
    let settings = loramix::studio::Settings {
        model,
        prompt: "a red house".into(),
        steps: 4,
        sampler: "euler".into(),
        seed: Some(3),
        width: 32,
        height: 32,
        cfg: 5.0,
        batch_seeds: loramix::rng::BatchSeeds::PerImage,
        init: Some(loramix::studio::InitSettings { image: init_path.to_string_lossy().into_owned(), strength: 0.6, ..Default::default() }),
        sd_upscale: Some(loramix::studio::SdUpscaleSettings { scale: 1.5, overlap: 8, upscaler: "Lanczos".into() }),
        ..Default::default()
    };
    let no = std::sync::atomic::AtomicBool::new(false);
    let out = studio.generate(&settings, None, &tmp.path().join("direct"), &no, &mut |_| {}, &mut |_| {}).unwrap();
    assert!(image::open(&out[0]).unwrap().to_rgb8() == api, "the API's SD upscale is not the studio's");
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8();
    // A batch count of 2: the second picture redraws the same upscaled tiles from seed + 1.
    let two = studio.generate(&loramix::studio::Settings { batch_count: 2, ..settings.clone() }, None, &tmp.path().join("two"), &no, &mut |_| {}, &mut |_| {}).unwrap();
    let alone = studio.generate(&loramix::studio::Settings { seed: Some(4), ..settings.clone() }, None, &tmp.path().join("alone"), &no, &mut |_| {}, &mut |_| {}).unwrap();
    assert_eq!(two.len(), 2);
    assert!(pixels(&two[0]) == api && pixels(&two[1]) == pixels(&alone[0]), "upscale 2 of 2 is the upscale of seed + 1");
    // A variation seed with both tiles in one batch: both keep the batch's seed, and tile k
    // takes variation seed + k (A1111's all_seeds / all_subseeds), blended at x = 0 and 24. A
    // ControlNet unit on the init image sees each tile.
    let unit = |image: &std::path::Path| loramix::studio::ControlNetSetting {
        model: fixture("tiny2").join("controlnet").to_string_lossy().into_owned(),
        image: image.to_string_lossy().into_owned(),
        weight: 0.8,
        ..Default::default()
    };
    let varied = loramix::studio::Settings { batch_size: 2, subseed: Some(50), subseed_strength: 0.5, controlnet: vec![unit(&init_path)], ..settings.clone() };
    let job = studio.generate(&varied, None, &tmp.path().join("varied"), &no, &mut |_| {}, &mut |_| {}).unwrap();
    let big = loramix::sdxl::upscale::Upscaler::Lanczos.upscale_by(&init, 1.5);
    let mut row = vec![];
    for (k, x) in [0u32, 24].into_iter().enumerate() {
        let tile = image::imageops::crop_imm(&big, x, 0, 32, 32).to_image();
        let p = tmp.path().join(format!("tile{k}.png"));
        tile.save(&p).unwrap();
        let one = loramix::studio::Settings {
            init: Some(loramix::studio::InitSettings { image: p.to_string_lossy().into_owned(), strength: 0.6, ..Default::default() }),
            sd_upscale: None,
            subseed: Some(50 + k as u64),
            controlnet: vec![unit(&p)],
            ..varied.clone()
        };
        let one = loramix::studio::Settings { batch_size: 1, ..one };
        let made = studio.generate(&one, None, &tmp.path().join(format!("v{k}")), &no, &mut |_| {}, &mut |_| {}).unwrap();
        row.push((x as i64, 32, pixels(&made[0])));
    }
    let want = loramix::sdxl::tile_grid::combine_grid(&[(0, 32, row)], 32, 56, 32, 8);
    assert!(pixels(&job[0]) == want, "varied tiles take the batch's seed and variation seed + k, and the unit each tile");
    for (script, args, want) in [
        ("Ultimate SD upscale", serde_json::json!([]), "Script 'Ultimate SD upscale' not found"),
        ("SD upscale", serde_json::json!(["", 8, 7, 2]), "SD upscale upscaler 7"),
        ("SD upscale", serde_json::json!(["", 40, 0, 2]), "tile overlap 40"),
    ] {
        let (code, body) = post(port, "/sdapi/v1/img2img", &request(script, args));
        assert!(code == 422 && body.contains(want) && body.contains("script_"), "{script}: {code} {body}");
    }
}
