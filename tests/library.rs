//! The LoRA library: idempotent, deduplicating import; editing and queries; and consistency
//! of folder and index when a real import process is killed at arbitrary moments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loramix::lora::library::{ImportOutcome, LoraLibrary, LoraQuery};
use loramix::lora::Role;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

/// A small valid kohya SDXL LoRA, distinct per `seed`.
fn write_lora(path: &Path, seed: u64, meta: &[(&str, &str)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let v = |n: usize, k: u64| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let h = h ^ (h >> 29);
                ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
            })
            .collect()
    };
    let base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
    let (down, up, alpha) = (v(4 * 64, seed), v(64 * 4, seed + 1), 2f32.to_le_bytes().to_vec());
    let tensors = vec![
        (format!("{base}.lora_down.weight"), TensorView::new(Dtype::F32, vec![4, 64], &down).unwrap()),
        (format!("{base}.lora_up.weight"), TensorView::new(Dtype::F32, vec![64, 4], &up).unwrap()),
        (format!("{base}.alpha"), TensorView::new(Dtype::F32, vec![], &alpha).unwrap()),
    ];
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize_to_file(tensors, Some(meta), path).unwrap();
}

fn sha256_file(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn import_is_idempotent_and_deduplicates() {
    let lib_dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    let first = lib.import(&[fixtures()], &mut |_| {}).unwrap();
    let added = first.iter().filter(|o| matches!(o, ImportOutcome::Added { .. })).count();
    assert_eq!(added, 5, "the five fixture LoRAs ({first:?})");
    let again = lib.import(&[fixtures()], &mut |_| {}).unwrap();
    assert!(again.iter().all(|o| !matches!(o, ImportOutcome::Added { .. })), "second import adds nothing");
    // The same bytes under another name are the existing entry.
    let src = tempfile::tempdir().unwrap();
    let copy = src.path().join("renamed_copy.safetensors");
    std::fs::copy(fixtures().join("peft.safetensors"), &copy).unwrap();
    match &lib.import(std::slice::from_ref(&copy), &mut |_| {}).unwrap()[0] {
        ImportOutcome::Existing { entry, .. } => assert_eq!(entry.display_name, "peft"),
        other => panic!("{other:?}"),
    }
    // Different bytes, same file name: a distinct, suffixed name.
    let other = src.path().join("peft.safetensors");
    write_lora(&other, 1, &[]);
    match &lib.import(&[other], &mut |_| {}).unwrap()[0] {
        ImportOutcome::Added { entry, .. } => assert!(entry.display_name.starts_with("peft-") && entry.display_name != "peft"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lib.list(&LoraQuery::default()).unwrap().len(), 6);
    assert_eq!(std::fs::read_dir(lib_dir.path().join("loras")).unwrap().count(), 6);
}

/// Opening sweeps only this library's own leftovers, and only when no other opener has the
/// library: a user's files in the folder stay, a new or lost (empty) index keeps the stored
/// files, a temporary file of an import still running elsewhere stays, and an entry whose file
/// was deleted gets it back from a new import.
#[test]
fn the_sweep_keeps_what_is_not_its_own() {
    let lib_dir = tempfile::tempdir().unwrap();
    let loras = lib_dir.path().join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    // A folder of someone's LoRAs (ComfyUI keeps them in `models/loras`) and a lost index's files.
    std::fs::copy(fixtures().join("peft.safetensors"), loras.join("my_lora.safetensors")).unwrap();
    std::fs::write(loras.join("README.txt"), "notes").unwrap();
    let lost = loras.join(format!("{}.safetensors", "ab".repeat(32)));
    std::fs::write(&lost, b"a stored file whose row was lost").unwrap();
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    assert!(loras.join("my_lora.safetensors").exists() && loras.join("README.txt").exists() && lost.exists());
    let added = lib.import(&[fixtures().join("peft.safetensors")], &mut |_| {}).unwrap();
    let entry = match &added[0] {
        ImportOutcome::Added { entry, .. } => entry.clone(),
        other => panic!("{other:?}"),
    };
    // While this library is open, another opener does not sweep: an import's temporary file
    // (here a stand-in) survives it.
    let in_flight = loras.join(".import-1-2.tmp");
    std::fs::write(&in_flight, b"copying").unwrap();
    let other = LoraLibrary::open(lib_dir.path()).unwrap();
    assert!(in_flight.exists());
    drop(other);
    drop(lib);
    // Alone, with rows in the index: temporary and unindexed stored files go, the user's stay.
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    assert!(!in_flight.exists() && !lost.exists());
    assert!(loras.join("my_lora.safetensors").exists() && loras.join("README.txt").exists());
    // A stored file deleted by hand comes back with the next import of the same bytes.
    std::fs::remove_file(&entry.path).unwrap();
    lib.import(&[fixtures().join("peft.safetensors")], &mut |_| {}).unwrap();
    assert_eq!(sha256_file(&entry.path), entry.sha256);
    // A name goes in a picture's one-line settings: no newline.
    assert!(lib.rename("peft", "two\nlines").unwrap_err().to_string().contains("newline"));
}

/// A path that is not there fails alone: the other paths are imported. Names a
/// `<lora:NAME:w>` tag cannot hold are made usable.
#[test]
fn a_missing_path_fails_alone_and_names_fit_tags() {
    let lib_dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    write_lora(&src.path().join("my lora:v2.safetensors"), 7, &[]);
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    let out = lib.import(&[src.path().join("missing.safetensors"), src.path().to_path_buf()], &mut |_| {}).unwrap();
    assert!(matches!(&out[0], ImportOutcome::Failed { source, .. } if source.ends_with("missing.safetensors")), "{out:?}");
    match &out[1] {
        ImportOutcome::Added { entry, .. } => assert_eq!(entry.display_name, "my lora_v2"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn metadata_roles_tags_queries_and_removal() {
    let lib_dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    write_lora(&src.path().join("vlox_emblem.safetensors"), 1, &[
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.trigger_phrase", "vlox emblem"),
        ("modelspec.title", "Vlox emblem (subject)"),
        ("modelspec.thumbnail", "data:image/png;base64,iVBORw0KGgo="),
        ("ss_tag_frequency", r#"{"10_vlox": {"vlox": 20, "emblem": 12, "circle": 3}}"#),
    ]);
    write_lora(&src.path().join("striped.safetensors"), 2, &[
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_tag_frequency", r#"{"5_striped style": {"striped style": 30, "stripes": 9}}"#),
    ]);
    write_lora(&src.path().join("mystery.safetensors"), 3, &[]);
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    lib.import(&[src.path().to_path_buf()], &mut |_| {}).unwrap();

    let v = lib.resolve("vlox_emblem").unwrap();
    assert_eq!(v.role, "subject");
    assert_eq!(v.base_model, "sdxl");
    assert_eq!(v.trigger_words, vec!["vlox emblem", "vlox", "emblem", "circle"]);
    assert_eq!(v.thumbnail.as_deref(), Some("data:image/png;base64,iVBORw0KGgo="));
    assert_eq!((v.format.as_str(), v.ranks.clone(), v.alphas.clone(), v.module_count), ("kohya", vec![4], vec![2.0], 1));
    assert_eq!(v.sha256, sha256_file(&src.path().join("vlox_emblem.safetensors")));
    assert_eq!(lib.resolve("striped").unwrap().role, "style");
    assert_eq!(lib.resolve("mystery").unwrap().role, "unknown");
    assert_eq!(lib.resolve("mystery").unwrap().base_model, "unknown");

    fn names(lib: &LoraLibrary, q: LoraQuery) -> Vec<String> {
        lib.list(&q).unwrap().into_iter().map(|e| e.display_name).collect()
    }
    assert_eq!(names(&lib, LoraQuery { role: Some(Role::Style), ..Default::default() }), ["striped"]);
    assert_eq!(names(&lib, LoraQuery { text: Some("EMBLEM".into()), ..Default::default() }), ["vlox_emblem"]);
    assert_eq!(names(&lib, LoraQuery { base: Some("sdxl".into()), ..Default::default() }), ["striped", "vlox_emblem"]);

    lib.set_role("mystery", Role::Style).unwrap();
    lib.set_tags("mystery", &["night".into(), " neon ".into()]).unwrap();
    assert_eq!(names(&lib, LoraQuery { tag: Some("neon".into()), role: Some(Role::Style), ..Default::default() }), ["mystery"]);
    lib.rename("mystery", "neon night").unwrap();
    assert!(lib.rename("neon night", "striped").is_err(), "names are unique");
    assert!(lib.rename("neon night", "a:b").is_err(), "':' would break <lora:NAME:w>");
    let e = lib.resolve(&v.sha256[..8]).unwrap();
    assert_eq!(e.display_name, "vlox_emblem");
    let gone = lib.remove("neon night").unwrap();
    assert!(!gone.path.exists());
    let err = lib.resolve("neon night").unwrap_err().to_string();
    assert!(err.contains("no LoRA named 'neon night'"), "{err}");
    // State survives reopening.
    drop(lib);
    let lib = LoraLibrary::open(lib_dir.path()).unwrap();
    assert_eq!(lib.list(&LoraQuery::default()).unwrap().len(), 2);
}

/// Rows of the index, read directly (not through `open`, which would sweep leftovers first).
fn index_rows(lib_dir: &Path) -> rusqlite::Result<Vec<(String, i64)>> {
    let db = rusqlite::Connection::open(lib_dir.join("library.sqlite"))?;
    let mut st = db.prepare("SELECT sha256, size FROM loras")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect();
    rows
}

#[test]
fn killing_a_real_import_leaves_folder_and_index_consistent() {
    let src = tempfile::tempdir().unwrap();
    let n = 400;
    for i in 0..n {
        write_lora(&src.path().join(format!("l{i:04}.safetensors")), 10 + i, &[]);
    }
    let lib_dir = tempfile::tempdir().unwrap();
    let mut interrupted = 0;
    for (round, extra_ms) in [0u64, 7, 23, 61].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_loramix"))
            .args(["lora", "--library"])
            .arg(lib_dir.path())
            .arg("import")
            .arg(src.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill once the import is under way, at a different moment each round.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if index_rows(lib_dir.path()).is_ok_and(|r| r.len() > round * 20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(extra_ms));
        child.kill().unwrap(); // SIGKILL: no cleanup runs
        child.wait().unwrap();

        // Invariant at the moment of the kill: every row points at a complete file with its hash.
        let rows = index_rows(lib_dir.path()).unwrap();
        if rows.len() < n as usize {
            interrupted += 1;
        }
        let leftovers = std::fs::read_dir(lib_dir.path().join("loras")).unwrap().count() - rows.len();
        eprintln!("round {round}: killed with {} of {n} indexed, {leftovers} unindexed/temporary files", rows.len());
        for (sha, size) in &rows {
            let f = lib_dir.path().join("loras").join(format!("{sha}.safetensors"));
            assert!(f.exists(), "round {round}: row {sha} has no file");
            assert_eq!(std::fs::metadata(&f).unwrap().len() as i64, *size);
            assert_eq!(&sha256_file(&f), sha, "round {round}: stored file is incomplete");
        }
        // Opening sweeps temporary and unindexed files: folder == index.
        let lib = LoraLibrary::open(lib_dir.path()).unwrap();
        let listed = lib.list(&LoraQuery::default()).unwrap();
        let files = std::fs::read_dir(lib_dir.path().join("loras")).unwrap().count();
        assert_eq!(files, listed.len(), "round {round}: folder and index disagree after reopening");
    }
    assert!(interrupted > 0, "no round was interrupted mid-import; the test proved nothing");
    // Resuming completes the import exactly once.
    let mut lib = LoraLibrary::open(lib_dir.path()).unwrap();
    lib.import(&[src.path().to_path_buf()], &mut |_| {}).unwrap();
    assert_eq!(lib.list(&LoraQuery::default()).unwrap().len(), n as usize);
    assert_eq!(std::fs::read_dir(lib_dir.path().join("loras")).unwrap().count(), n as usize);
}
