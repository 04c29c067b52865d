//! The malformed-file corpus (tests/fixtures/bad, made by tools/parity/make_bad_fixtures.py):
//! every file is refused with its own message that names the file and what was expected,
//! both when loaded onto a model and when imported into the library.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::*;
use loramix::lora::library::{ImportOutcome, LoraLibrary};
use loramix::lora::{AdapterTargets, LoadedLora};
use loramix::{LoadOptions, SdxlPipeline};

fn bad(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad").join(name)
}

/// (file, text its refusal must contain, refused already at library import)
const CASES: &[(&str, &str, bool)] = &[
    ("empty.safetensors", "the file is empty", true),
    ("truncated.safetensors", "truncated", true),
    ("header_past_end.safetensors", "header length 10000 runs past the end of the file (15 bytes)", true),
    ("huge_header.safetensors", "the header claims 200000000 bytes", true),
    ("overlapping_offsets.safetensors", "its data offsets overlap those of tensor", true),
    ("out_of_range_offsets.safetensors", "lie outside the data section", true),
    ("dtype_shape_mismatch.safetensors", "does not match its dtype and shape", true),
    ("nan_inf.safetensors", "2 of 256 values are NaN or infinite", true),
    ("pickle.ckpt", "never unpickles", true),
    ("zipped.safetensors", "zip archive", true),
    ("checkpoint_not_lora.safetensors", "not a LoRA", true),
    // Valid files for another base or technique: the library keeps them (a user may own SD 1.5
    // LoRAs), loading them onto SDXL is refused.
    ("sd15_lora.safetensors", "this LoRA is for SD 1.x (ss_base_model_version = \"sd_v1\"), but the loaded model is SDXL-architecture (64-wide cross-attention)", false),
    ("sd15_lora_no_metadata.safetensors", "this LoRA is for SD 1.x (cross-attention LoRAs read 768-wide text embeddings), but the loaded model is SDXL-architecture (64-wide cross-attention)", false),
    ("dora.safetensors", "DoRA", false),
    ("sdxl_full_size_lora.safetensors", "this LoRA looks made for SDXL (ss_base_model_version = \"sdxl_base_v1-0\"); its shapes do not fit the loaded model, SDXL-architecture (64-wide cross-attention)", false),
];

#[test]
fn each_malformed_file_is_refused_with_its_own_message() {
    let pipe = SdxlPipeline::load(fixture("tiny2").join("pipeline").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let mut messages = HashSet::new();
    for (file, expect, _) in CASES {
        let path = bad(file);
        let err = LoadedLora::load(&path, "x", &targets).expect_err(file).to_string();
        assert!(err.contains(expect), "{file}: message does not say '{expect}':\n  {err}");
        assert!(err.contains(file), "{file}: message does not name the file:\n  {err}");
        messages.insert(err.replace(&path.display().to_string(), ""));
    }
    assert_eq!(messages.len(), CASES.len(), "every refusal has its own message");
}

#[test]
fn the_library_refuses_malformed_files_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    let outcomes = lib.import(&[bad("")], &mut |_| {}).unwrap();
    assert_eq!(outcomes.len(), CASES.len());
    for o in &outcomes {
        let (src, failed, msg) = match o {
            ImportOutcome::Failed { source, error } => (source, true, error.clone()),
            ImportOutcome::Added { source, .. } | ImportOutcome::Existing { source, .. } | ImportOutcome::Embedding { source, .. } => {
                (source, false, String::new())
            }
        };
        let name = src.file_name().unwrap().to_str().unwrap();
        let (_, expect, refused) = CASES.iter().find(|c| c.0 == name).unwrap();
        assert_eq!(failed, *refused, "{name}: {msg}");
        if failed {
            assert!(msg.contains(expect), "{name}: {msg}");
        }
    }
    let kept = lib.list(&Default::default()).unwrap();
    assert_eq!(kept.len(), CASES.iter().filter(|c| !c.2).count());
    let sd15 = lib.resolve("sd15_lora").unwrap();
    assert_eq!(sd15.base_model, "sd1");
    assert_eq!(lib.resolve("sd15_lora_no_metadata").unwrap().base_model, "sd1");
    // Nothing but the kept files is left in the library folder.
    assert_eq!(std::fs::read_dir(dir.path().join("loras")).unwrap().count(), kept.len());
}
