//! `loramix batch run` as a user (or a scheduler that retries) runs it: fixed names, killed and
//! restarted runs that lose nothing and make nothing twice, shards whose union is the whole job,
//! and bad lines reported by number while the others run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn loramix() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loramix"));
    c.env("RUST_BACKTRACE", "0").env("LORAMIX_HOME", std::env::temp_dir().join("loramix-batch-test-home"));
    c
}

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/miniworld").display().to_string()
}

/// A manifest of `lines` jobs on miniworld: LoRAs, several images per line, a dynamic prompt.
fn manifest(dir: &Path, lines: usize) -> PathBuf {
    let subjects = ["vlox", "krin", "tebo", "mupa"];
    let styles = ["striped", "checkered", "dotted", "painted"];
    let mut text = String::from("# a comment line keeps its number\n");
    for i in 0..lines {
        let line = serde_json::json!({
            "model": model(),
            "prompt": format!("a {} emblem on a {{teal|cream}} background, {} style", subjects[i % 4], styles[(i / 4) % 4]),
            "loras": [{"name": subjects[i % 4], "weight": 1.0}, {"name": styles[(i / 4) % 4], "weight": 0.8}],
            "steps": 4,
            "images": 2,
            "mix": if i % 2 == 0 { "klora" } else { "merge" },
        });
        text.push_str(&format!("{line}\n"));
    }
    let p = dir.join("manifest.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// `loramix generate ARGS --model miniworld --out OUT`, which must succeed.
fn generate(out: &Path, args: &[&str]) {
    let o = loramix().arg("generate").args(args).arg("--model").arg(model()).arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn run(manifest: &Path, out: &Path, shard: Option<&str>) -> std::process::Output {
    let mut c = loramix();
    c.args(["batch", "run"]).arg(manifest).arg("--out").arg(out);
    if let Some(s) = shard {
        c.args(["--shard", s]);
    }
    c.output().unwrap()
}

#[test]
fn killed_and_restarted_runs_finish_exactly_once_and_shards_match() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest(tmp.path(), 6);
    let whole = tmp.path().join("whole");
    let o = run(&m, &whole, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = pngs(&whole);
    let expected: Vec<String> = (2..8).flat_map(|line| (0..2).map(move |k| format!("{line:05}-{k:04}.png"))).collect();
    assert_eq!(reference.keys().cloned().collect::<Vec<_>>(), expected);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(whole.join("batch.json")).unwrap()).unwrap();
    assert_eq!((summary["images"].as_u64(), summary["written"].as_u64(), summary["kept"].as_u64()), (Some(12), Some(12), Some(0)));
    // The PNG names nothing about where or when it was made.
    for bytes in reference.values() {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(&whole.display().to_string()));
    }

    // Batch-aware mixing is exact: every job on its own makes the same bytes; the summary lists
    // the prompt clusters, and the LoRA sets that recur shared their statistics.
    let alone = tmp.path().join("alone");
    let o = loramix().args(["batch", "run"]).arg(&m).arg("--out").arg(&alone).arg("--one-by-one").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pngs(&alone), reference);
    assert!(!summary["clusters"].as_array().unwrap().is_empty(), "{summary}");
    let lines_in_clusters: usize = summary["clusters"].as_array().unwrap().iter().map(|c| c["lines"].as_array().unwrap().len()).sum();
    assert_eq!(lines_in_clusters, 6);
    assert!(summary["sharing"]["statistics_shared"].as_u64().unwrap() > 0, "{}", summary["sharing"]);
    let alone_summary: serde_json::Value = serde_json::from_slice(&std::fs::read(alone.join("batch.json")).unwrap()).unwrap();
    assert_eq!(alone_summary["sharing"]["statistics_shared"].as_u64(), Some(0));

    // A second run of a finished job does nothing and changes no byte.
    let o = run(&m, &whole, None);
    assert!(o.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(whole.join("batch.json")).unwrap()).unwrap();
    assert_eq!((summary["written"].as_u64(), summary["kept"].as_u64()), (Some(0), Some(12)));
    assert_eq!(pngs(&whole), reference);

    // Killed mid-run, then started again: the same files, byte for byte.
    let killed = tmp.path().join("killed");
    let mut child = loramix().args(["batch", "run"]).arg(&m).arg("--out").arg(&killed).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_dir(&killed).map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".png")).count()).unwrap_or(0) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no images after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = pngs(&killed).len();
    assert!(partial < 12, "the run finished before it was killed ({partial} images)");
    let o = run(&m, &killed, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pngs(&killed), reference);
    let leftovers: Vec<_> = std::fs::read_dir(&killed).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp")).collect();
    // A temp file of the killed write may stay (hidden, never a .png); the images are whole.
    assert!(leftovers.iter().all(|n| n.starts_with('.')), "{leftovers:?}");

    // Three shards, counted from 1, into one folder: the same files.
    let sharded = tmp.path().join("sharded");
    for s in ["1/3", "2/3", "3/3"] {
        let o = run(&m, &sharded, Some(s));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(pngs(&sharded), reference);
    for i in 1..=3 {
        assert!(sharded.join(format!("batch.shard-{i}-of-3.json")).exists());
    }
}

#[test]
fn bad_lines_are_reported_by_number_and_the_rest_still_run() {
    let tmp = tempfile::tempdir().unwrap();
    let good = serde_json::json!({"model": model(), "prompt": "a vlox emblem", "steps": 2}).to_string();
    let lines = [
        good.clone(),
        "{\"prompt\": \"a\", \"steps\": 2".to_string(),
        serde_json::json!({"model": model(), "prompt": "a", "steps": 2, "loras": [{"name": "no-such-lora", "weight": 1.0}]}).to_string(),
        serde_json::json!({"model": model(), "prompt": "a", "steps": 2, "width": 102}).to_string(),
        serde_json::json!({"model": model(), "prompt": "a tebo emblem", "steps": 2, "images": 2}).to_string(),
        // A model that is not there fails its own line, not the run (the clustering before the
        // jobs skips it).
        serde_json::json!({"prompt": "a", "steps": 2, "model": "/nonexistent/model"}).to_string(),
    ];
    let m = tmp.path().join("m.jsonl");
    std::fs::write(&m, lines.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let o = run(&m, &out, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "bad lines must fail the run: {err}");
    assert!(err.contains("m.jsonl:2: column") && err.contains("malformed JSON"), "{err}");
    assert!(err.contains("m.jsonl:3:") && err.contains("no-such-lora"), "{err}");
    assert!(err.contains("m.jsonl:4: field width: 102"), "{err}");
    assert!(err.contains("m.jsonl:6:") && err.contains("/nonexistent/model"), "{err}");
    assert_eq!(pngs(&out).keys().cloned().collect::<Vec<_>>(), vec!["00001-0000.png", "00005-0000.png", "00005-0001.png"]);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("batch.json")).unwrap()).unwrap();
    assert_eq!(summary["failed_lines"].as_u64(), Some(4));
    assert_eq!(summary["errors"][0]["line"].as_u64(), Some(2));
}

#[test]
fn a_gallery_manifest_makes_the_same_images_again() {
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("made");
    generate(&made, &["--prompt", "a mupa emblem on a navy background", "--lora", "mupa", "--steps", "3", "--seed", "21", "--batch-size", "2"]);
    let images: Vec<PathBuf> = pngs(&made).keys().map(|n| made.join(n)).collect();
    assert_eq!(images.len(), 2);
    let m = loramix::studio::export_manifest(&images, &tmp.path().join("saved")).unwrap();
    assert_eq!(m.extension().unwrap(), "jsonl");
    let text = std::fs::read_to_string(&m).unwrap();
    assert_eq!(text.lines().count(), 1, "one job for one batch: {text}");
    let again = tmp.path().join("again");
    let o = run(&m, &again, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let mut made_px: Vec<Vec<u8>> = images.iter().map(|p| pixels(p)).collect();
    let mut again_px: Vec<Vec<u8>> = pngs(&again).keys().map(|n| pixels(&again.join(n))).collect();
    made_px.sort();
    again_px.sort();
    assert_eq!(made_px, again_px);
}

/// A WebP keeps only A1111's text (`Model: miniworld`, `<lora:vlox:0.7>`): run as a manifest
/// from another folder, the shipped model and its own LoRA are found and the picture is made
/// again exactly.
#[test]
fn a_webp_restores_with_the_models_own_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("made");
    generate(&made, &["--prompt", "a vlox emblem", "--lora", "vlox:0.7", "--steps", "3", "--seed", "21", "--samples-format", "webp"]);
    let webp = made.join("00000-21.webp");
    let again = tmp.path().join("again");
    let o = loramix().current_dir(tmp.path()).args(["batch", "run"]).arg(&webp).arg("--out").arg(&again).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&again.join("00001-0000.png")), pixels(&webp));
}

/// A hires line's image is larger than its record's (first-pass) size; a second run still
/// finds it there and makes nothing again.
#[test]
fn a_hires_line_is_kept_when_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let line = serde_json::json!({"model": model(), "prompt": "a vlox emblem on a teal background", "steps": 3, "width": 64, "height": 64, "seed": 4,
        "hires": {"scale": 1.5, "steps": 2}});
    let m = tmp.path().join("hires.jsonl");
    std::fs::write(&m, format!("{line}\n")).unwrap();
    let out = tmp.path().join("out");
    let first = run(&m, &out, None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let made = pngs(&out);
    assert_eq!(made.len(), 1);
    let again = run(&m, &out, None);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.contains("0 written, 1 already there"), "{err}");
    assert_eq!(pngs(&out), made);
}
