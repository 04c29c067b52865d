//! EigenLoRAx subspaces: the maths against a line-by-line numpy version
//! (tools/parity/make_subspace_fixtures.py), exactness of members at K = N·r through the library's
//! storage and the LoRA loader, and bad input that leaves the library as it was.

use std::collections::BTreeMap;
use std::path::PathBuf;

use loramix::lora::library::{LoraLibrary, SubspaceRequest};
use loramix::lora::subspace::{self, Centering, ComponentRule, MemberFactors, ModuleFactors, Storage};
use loramix::lora::{AdapterTargets, LoadedLora};
use loramix::weights::SafetensorsFile;
use loramix::{LoadOptions, SdxlPipeline};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn values(f: &SafetensorsFile, name: &str) -> Vec<f64> {
    f.load(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn components_and_loadings_equal_the_numpy_reference() {
    let f = SafetensorsFile::open(&root().join("tests/fixtures/subspace/golden.safetensors")).unwrap();
    let modules = [("linear", 12, 10, [3, 2, 3]), ("conv", 6, 36, [2, 2, 1])];
    let scales = [0.5, 1.0, 2.0];
    let mut members: Vec<MemberFactors> = Vec::new();
    for (i, scale) in scales.iter().enumerate() {
        let mut m = BTreeMap::new();
        for (name, o, n, ranks) in modules {
            let r = ranks[i];
            let up: Vec<f32> = values(&f, &format!("m{i}.{name}.up")).into_iter().map(|v| v as f32).collect();
            let down: Vec<f32> = values(&f, &format!("m{i}.{name}.down")).into_iter().map(|v| v as f32).collect();
            let c = ModuleFactors::from_up_down(&up, &down, o, r, n, *scale).unwrap().canonical().unwrap();
            // Column-major [o × r] is the reference's row-major Bᵀ; compare entry by entry.
            let want_b = values(&f, &format!("m{i}.{name}.canonical_up"));
            let got_b: Vec<f64> = (0..o).flat_map(|row| (0..r).map(move |col| (row, col))).map(|(row, col)| c.up[col * o + row]).collect();
            assert!(rel(&got_b, &want_b) < 1e-5, "canonical up m{i}.{name}: {}", rel(&got_b, &want_b));
            let want_a = values(&f, &format!("m{i}.{name}.canonical_down_t"));
            let got_a: Vec<f64> = (0..n).flat_map(|row| (0..r).map(move |col| (row, col))).map(|(row, col)| c.down_t[col * n + row]).collect();
            assert!(rel(&got_a, &want_a) < 1e-5, "canonical down m{i}.{name}: {}", rel(&got_a, &want_a));
            m.insert(name.to_string(), c);
        }
        members.push(m);
    }
    let cases = [
        ("uncentred_k4", Centering::Uncentred, ComponentRule::Fixed(4)),
        ("centred_k4", Centering::Centred, ComponentRule::Fixed(4)),
        ("uncentred_e90", Centering::Uncentred, ComponentRule::Energy(0.9)),
        ("centred_full", Centering::Centred, ComponentRule::Fixed(100)),
    ];
    for (case, centering, rule) in cases {
        let basis = subspace::build(&members, centering, rule).unwrap();
        for (name, ..) in modules {
            for (side, sb) in [("up", &basis[name].up), ("down", &basis[name].down)] {
                // Our column-major [dim × k] has the reference's [k, dim] layout.
                let want = values(&f, &format!("{case}.{name}.{side}.components"));
                assert_eq!(sb.components.len(), want.len(), "{case}.{name}.{side}: K differs");
                assert!(rel(&sb.components, &want) < 1e-5, "{case}.{name}.{side} components: {}", rel(&sb.components, &want));
                let want_mean = values(&f, &format!("{case}.{name}.{side}.mean"));
                let d: f64 = sb.mean.iter().zip(&want_mean).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(d < 1e-5, "{case}.{name}.{side} mean: {d}");
            }
        }
        for (i, m) in members.iter().enumerate() {
            let (loadings, err) = subspace::project(&basis, m, Storage::F32).unwrap();
            for (name, ..) in modules {
                let l = &loadings[name];
                let (wu, wd) = (values(&f, &format!("{case}.m{i}.{name}.up")), values(&f, &format!("{case}.m{i}.{name}.down")));
                assert!(rel(&l.up, &wu) < 1e-5, "{case}.m{i}.{name} up loadings: {}", rel(&l.up, &wu));
                assert!(rel(&l.down, &wd) < 1e-5, "{case}.m{i}.{name} down loadings: {}", rel(&l.down, &wd));
                let want_err = values(&f, &format!("{case}.m{i}.{name}.error"))[0];
                let got = err.per_module[name];
                assert!((got - want_err).abs() < 1e-4 * want_err.max(1e-2), "{case}.m{i}.{name} error {got} vs {want_err}");
            }
        }
    }
}

fn miniworld_targets() -> AdapterTargets {
    let pipe = SdxlPipeline::load(root().join("models/miniworld").to_str().unwrap(), &LoadOptions::default()).unwrap();
    AdapterTargets::of_pipeline(&pipe)
}

fn request<'a>(name: &'a str, members: &'a [String], rule: ComponentRule, storage: Storage) -> SubspaceRequest<'a> {
    SubspaceRequest { name, members, all: false, base: None, centering: Centering::Uncentred, rule, storage, random_basis: None }
}

#[test]
fn members_are_exact_at_full_k_through_storage_and_the_loader() {
    let targets = miniworld_targets();
    let dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    lib.import(&[root().join("models/miniworld/loras")], &mut |_| {}).unwrap();
    let members: Vec<String> = ["vlox", "krin", "striped", "dotted"].iter().map(|s| s.to_string()).collect();
    // 4 LoRAs of rank 8: K = N·r = 32 holds all of them.
    let s = lib.build_subspace(&request("all4", &members, ComponentRule::Fixed(32), Storage::F32), &targets).unwrap();
    assert_eq!(s.members.len(), 4);
    for m in &s.members {
        assert!(m.error <= 1e-4, "{}: ΔW error {}", m.display_name, m.error);
        assert!(m.module_errors.values().all(|e| *e <= 1e-4), "{}", m.display_name);
    }
    // The reconstruction that `generate --lora vlox@all4` attaches has the original's ΔW per layer.
    let orig = LoadedLora::load(&root().join("models/miniworld/loras/vlox.safetensors"), "vlox", &targets).unwrap();
    let rec = lib.subspace_member_lora("all4", "vlox", "vlox@all4", &targets).unwrap();
    assert_eq!(orig.modules.len(), rec.modules.len());
    for m in &orig.modules {
        let r = rec.modules.iter().find(|r| r.target == m.target).expect("same layers");
        let a: Vec<f64> = orig.delta(m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
        let b: Vec<f64> = rec.delta(r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
        assert!(rel(&b, &a) <= 1e-4, "{}: {}", m.key, rel(&b, &a));
    }
    // Fewer components cost accuracy and save bytes; f16 storage roughly halves them again.
    let s8 = lib.build_subspace(&request("k8", &members, ComponentRule::Fixed(8), Storage::F32), &targets).unwrap();
    let s8h = lib.build_subspace(&request("k8h", &members, ComponentRule::Fixed(8), Storage::F16), &targets).unwrap();
    assert!(s8.members.iter().all(|m| m.error > 1e-2));
    assert!(s8.bytes_after < s.bytes_after && s8h.bytes_after < s8.bytes_after);
    assert!(s8.ratio > 1.0, "K = 8 of 32 stores less than the originals ({})", s8.ratio);
}

#[test]
fn bad_input_is_refused_and_leaves_the_library_unchanged() {
    let targets = miniworld_targets();
    let dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    lib.import(&[root().join("models/miniworld/loras"), root().join("tests/fixtures/bad/sd15_lora.safetensors")], &mut |_| {}).unwrap();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let state = |lib: &LoraLibrary| {
        let files = std::fs::read_dir(dir.path().join("subspaces")).map(|d| d.count()).unwrap_or(0);
        (lib.subspaces().unwrap().iter().map(|s| (s.name.clone(), s.members.len())).collect::<Vec<_>>(), files)
    };
    let rule = ComponentRule::Fixed(4);
    // LoRAs of two base models.
    let e = lib.build_subspace(&request("mixed", &names(&["vlox", "sd15_lora"]), rule, Storage::F32), &targets).unwrap_err().to_string();
    assert!(e.contains("sd15_lora is for sd1") && e.contains("one base model"), "{e}");
    // An unknown member.
    let e = lib.build_subspace(&request("x", &names(&["vlox", "nosuch"]), rule, Storage::F32), &targets).unwrap_err().to_string();
    assert!(e.contains("nosuch"), "{e}");
    let before = state(&lib);
    assert!(before.0.is_empty());
    // A good subspace of 3 at K = 4, then a rank-8 LoRA that K = 4 cannot hold.
    lib.build_subspace(&request("small", &names(&["vlox", "krin", "mupa"]), rule, Storage::F32), &targets).unwrap();
    let before = state(&lib);
    let e = lib.add_to_subspace("small", "striped", &targets).unwrap_err().to_string();
    assert!(e.contains("rank 8") && e.contains("only 4 components"), "{e}");
    assert_eq!(state(&lib), before);
    // The same name twice.
    let e = lib.build_subspace(&request("small", &names(&["tebo", "krin"]), rule, Storage::F32), &targets).unwrap_err().to_string();
    assert!(e.contains("exists already"), "{e}");
    assert_eq!(state(&lib), before);
    // An unknown subspace and a non-member.
    assert!(lib.subspace_member_lora("nope", "vlox", "b", &targets).unwrap_err().to_string().contains("no subspace named \"nope\""));
    let e = lib.subspace_member_lora("small", "striped", "b", &targets).unwrap_err().to_string();
    assert!(e.contains("not a member") && e.contains("krin"), "{e}");
    // A truncated, then a deleted components file.
    let file = lib.subspace("small").unwrap().file;
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = lib.subspace_member_lora("small", "vlox", "b", &targets).unwrap_err().to_string();
    assert!(e.contains("damaged") && e.contains(file.file_name().unwrap().to_str().unwrap()), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = lib.subspace_member_lora("small", "vlox", "b", &targets).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
    assert!(lib.add_to_subspace("small", "tebo", &targets).unwrap_err().to_string().contains("missing"));
    // A leftover components file from a crashed build (no row names it) is swept on open.
    let leftover = dir.path().join(format!("subspaces/{}.safetensors", "de".repeat(32)));
    std::fs::write(&leftover, b"partial").unwrap();
    drop(lib);
    let lib = LoraLibrary::open(dir.path()).unwrap();
    assert!(!leftover.exists());
    assert_eq!(lib.subspaces().unwrap().len(), 1);
}

#[test]
fn replace_originals_keeps_a_way_back() {
    use loramix::lora::library::resolve_choices;
    let targets = miniworld_targets();
    let dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    lib.import(&[root().join("models/miniworld/loras")], &mut |_| {}).unwrap();
    let members: Vec<String> = ["vlox", "krin", "striped"].iter().map(|s| s.to_string()).collect();
    lib.build_subspace(&request("s", &members, ComponentRule::Fixed(24), Storage::F32), &targets).unwrap();
    lib.build_subspace(&request("lossy", &members, ComponentRule::Fixed(4), Storage::F32), &targets).unwrap();
    let via = |key: &str| resolve_choices(&[(key.to_string(), 1.0, None)], &[], Some(dir.path()), None).unwrap()[0].subspace.clone();
    assert_eq!(via("krin"), None);
    // Only members under the threshold are replaced: none of the lossy subspace, all of the exact one.
    assert!(lib.replace_originals("lossy", 0.01).unwrap().is_empty());
    assert!(lib.replace_originals("s", -1.0).unwrap_err().to_string().contains("--max-error"));
    assert_eq!(lib.replace_originals("s", 1e-3).unwrap().len(), 3);
    assert_eq!(via("krin"), Some(("krin".to_string(), "s".to_string())));
    assert!(lib.subspace("s").unwrap().members.iter().all(|m| m.replaced && m.original_present));
    // Restoring is the way back while the originals exist.
    assert_eq!(lib.restore_originals("s").unwrap(), 3);
    assert_eq!(via("krin"), None);
    // After replacing and removing an original, the name still works, and the subspace is its
    // only copy: restoring and removing the subspace are refused.
    lib.replace_originals("s", 1e-3).unwrap();
    lib.remove("krin").unwrap();
    drop(lib);
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    assert_eq!(via("krin"), Some(("krin".to_string(), "s".to_string())));
    assert!(lib.restore_originals("s").unwrap_err().to_string().contains("only copy"));
    assert!(lib.remove_subspace("s").unwrap_err().to_string().contains("only copy"));
    assert!(lib.subspace_member_lora("s", "krin", "krin@s", &targets).is_ok());
    lib.remove_subspace("lossy").unwrap();
    assert_eq!(lib.subspaces().unwrap().len(), 1);
}

/// A LyCORIS "full" copy of a miniworld LoRA: each module's `scale · up · down` as a dense
/// `.diff` (what LoHa and LoKr files also load as), with the original's metadata.
fn dense_copy(src: &std::path::Path, dest: &std::path::Path) {
    use candle_core::{DType, Device, Tensor};
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap_or_default();
    meta.insert("ss_network_module".into(), "lycoris.kohya".into());
    let t = candle_core::safetensors::load(src, &Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for key in t.keys().filter(|k| k.ends_with(".lora_down.weight")) {
        let prefix = key.trim_end_matches(".lora_down.weight");
        let down = t[key].to_dtype(DType::F32).unwrap();
        let up = t[&format!("{prefix}.lora_up.weight")].to_dtype(DType::F32).unwrap();
        let r = down.dim(0).unwrap();
        let alpha = t.get(&format!("{prefix}.alpha")).map_or(r as f32, |a| a.to_dtype(DType::F32).unwrap().to_vec0::<f32>().unwrap());
        let o = up.dim(0).unwrap();
        let d: Tensor = (up.reshape((o, r)).unwrap().matmul(&down.reshape((r, ())).unwrap()).unwrap() * (alpha / r as f32) as f64).unwrap();
        let mut shape = vec![o];
        shape.extend_from_slice(&down.dims()[1..]);
        let v: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
        out.push((format!("{prefix}.diff"), shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        out.iter().map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dest, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// `subspace add` of a dense LoRA (LoHa, LoKr, full ΔW): each module's orthogonal projection
/// onto the basis, errors against the true ΔW. A dense copy of a member is reproduced; a dense
/// copy of a non-member gets exactly the low-rank file's projection and error; a centred
/// subspace refuses dense modules by name.
#[test]
fn dense_loras_join_by_projection() {
    let targets = miniworld_targets();
    let dir = tempfile::tempdir().unwrap();
    let mut lib = LoraLibrary::open(dir.path()).unwrap();
    let loras = root().join("models/miniworld/loras");
    let dense = dir.path().join("dense");
    std::fs::create_dir_all(&dense).unwrap();
    dense_copy(&loras.join("vlox.safetensors"), &dense.join("vloxfull.safetensors"));
    dense_copy(&loras.join("tebo.safetensors"), &dense.join("tebofull.safetensors"));
    lib.import(&[loras, dense], &mut |_| {}).unwrap();
    let members: Vec<String> = ["vlox", "krin", "striped", "dotted"].iter().map(|s| s.to_string()).collect();
    lib.build_subspace(&request("all4", &members, ComponentRule::Fixed(32), Storage::F32), &targets).unwrap();
    assert!(LoadedLora::load(&dir.path().join("dense/vloxfull.safetensors"), "vloxfull", &targets)
        .unwrap()
        .modules
        .iter()
        .all(|m| matches!(m.weights, loramix_models::BranchWeights::Dense(_))));
    let m = lib.add_to_subspace("all4", "vloxfull", &targets).unwrap();
    assert!(m.error <= 1e-4, "a dense copy of a member: ΔW error {}", m.error);
    let orig = LoadedLora::load(&root().join("models/miniworld/loras/vlox.safetensors"), "vlox", &targets).unwrap();
    let rec = lib.subspace_member_lora("all4", "vloxfull", "vloxfull@all4", &targets).unwrap();
    for m in &orig.modules {
        let r = rec.modules.iter().find(|r| r.target == m.target).expect("same layers");
        let a: Vec<f64> = orig.delta(m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
        let b: Vec<f64> = rec.delta(r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
        assert!(rel(&b, &a) <= 1e-4, "{}: {}", m.key, rel(&b, &a));
    }
    let full = lib.add_to_subspace("all4", "tebofull", &targets).unwrap();
    let low = lib.add_to_subspace("all4", "tebo", &targets).unwrap();
    assert!(low.error > 0.1, "tebo is outside the 4 members' span ({})", low.error);
    assert!((full.error - low.error).abs() <= 1e-5, "dense {} vs low-rank {}", full.error, low.error);
    for (path, e) in &low.module_errors {
        assert!((full.module_errors[path] - e).abs() <= 1e-5, "{path}: {} vs {e}", full.module_errors[path]);
    }
    let centred = SubspaceRequest { centering: Centering::Centred, ..request("c", &members, ComponentRule::Fixed(32), Storage::F32) };
    lib.build_subspace(&centred, &targets).unwrap();
    let e = lib.add_to_subspace("c", "tebofull", &targets).unwrap_err().to_string();
    assert!(e.contains("tebofull") && e.contains("dense") && e.contains("uncentred"), "{e}");
}
