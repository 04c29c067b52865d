//! The best set from candidates (issue 14): out of the 8 shipped miniworld LoRAs in a library,
//! every subject × style prompt picks exactly its subject and its style — by the scorer with our
//! own text encoder, and end to end through `generate --mix auto --candidates library`, whose
//! trace and PNG say what was picked and why. `auto` offered 4 LoRAs keeps only the 2 the
//! prompt names.

use std::path::{Path, PathBuf};
use std::process::Command;

use loramix::lora::library::LoraLibrary;
use loramix::lora::Role;
use loramix::mix::candidates::{phrases_of, select, text_similarity, Offered};
use loramix::{LoadOptions, SdxlPipeline};

const SUBJECTS: [&str; 4] = ["krin", "mupa", "tebo", "vlox"];
const STYLES: [&str; 4] = ["striped", "checkered", "dotted", "painted"];

fn miniworld() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld")
}

fn library_with_the_eight(root: &Path) -> LoraLibrary {
    let mut lib = LoraLibrary::open(root).unwrap();
    let files: Vec<PathBuf> = SUBJECTS.iter().chain(&STYLES).map(|n| miniworld().join(format!("loras/{n}.safetensors"))).collect();
    lib.import(&files, &mut |_| {}).unwrap();
    lib
}

#[test]
fn picks_the_right_pair_of_the_eight_for_every_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library_with_the_eight(dir.path());
    let entries = lib.list(&Default::default()).unwrap();
    assert_eq!(entries.len(), 8);
    let offered: Vec<Offered> = entries
        .iter()
        .map(|e| Offered { name: e.display_name.clone(), role: Role::parse(&e.role).unwrap(), phrases: phrases_of(e) })
        .collect();
    let pipe = SdxlPipeline::load(miniworld().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let sim = text_similarity(pipe.text().unwrap());
    for (i, s) in SUBJECTS.iter().enumerate() {
        for (j, st) in STYLES.iter().enumerate() {
            let bg = ["teal", "cream", "navy", "pink", "olive", "gray"][(i + 2 * j) % 6];
            let prompt = format!("a {s} emblem on a {bg} background, {st} style");
            let picks = select(&prompt, &offered, Some(&sim)).unwrap();
            let mut picked: Vec<&str> = picks.iter().filter(|c| c.picked).map(|c| c.name.as_str()).collect();
            picked.sort();
            let mut want = vec![*s, *st];
            want.sort();
            assert_eq!(picked, want, "{prompt}: {picks:#?}");
        }
    }
    // A prompt that names no LoRA picks none.
    let picks = select("a big red circle on a cream background, flat style", &offered, Some(&sim)).unwrap();
    assert!(picks.iter().all(|c| !c.picked), "{picks:#?}");
}

/// `loramix generate` on miniworld with `args`, writing to `out` and the trace to `trace`.
fn generate(args: &[&str], out: &Path, trace: &Path) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_loramix"))
        .args(["generate", "--model", miniworld().to_str().unwrap()])
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--mix-trace")
        .arg(trace)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn generate_picks_from_the_library_and_auto_narrows_what_it_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    library_with_the_eight(&dir.path().join("lib"));
    let trace_path = dir.path().join("trace.json");
    let lib = dir.path().join("lib");
    let out = generate(
        &["--prompt", "a tebo emblem on a pink background, dotted style", "--steps", "3", "--seed", "3", "--mix", "auto", "--candidates", "library", "--library", lib.to_str().unwrap()],
        &dir.path().join("out"),
        &trace_path,
    );
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
    let mut loras: Vec<&str> = trace["loras"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    loras.sort();
    assert_eq!(loras, ["dotted", "tebo"]);
    let cands = trace["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 8);
    assert!(cands.iter().any(|c| c["name"] == "tebo" && c["picked"] == true && c["reason"].as_str().unwrap().contains("tebo emblem")));
    let png = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    let chunks = loramix::studio::png_text_chunks(&std::fs::read(png).unwrap()).unwrap();
    assert!(chunks["parameters"].contains("LoRA picked: \""), "{}", chunks["parameters"]);
    assert!(chunks["loramix"].contains("\"candidates\""));

    // Four offered, the prompt names two: auto keeps those two.
    let l = |n: &str, role: &str| format!("{}:1:{role}", miniworld().join(format!("loras/{n}.safetensors")).display());
    let (k, v, st, p) = (l("krin", "subject"), l("vlox", "subject"), l("striped", "style"), l("painted", "style"));
    generate(
        &["--prompt", "a krin emblem on a teal background, striped style", "--steps", "2", "--seed", "4", "--mix", "auto"]
            .into_iter()
            .chain(["--lora", &k, "--lora", &v, "--lora", &st, "--lora", &p])
            .collect::<Vec<_>>(),
        &dir.path().join("out4"),
        &trace_path,
    );
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
    assert_eq!(trace["loras"], serde_json::json!(["krin", "striped"]));
}
