//! `loramix grid`: a 2×2×2 X/Y/Z plot on miniworld, its files, the order of its labels and the
//! metadata of every cell.

use std::path::Path;
use std::process::Command;

fn chunks(path: &Path) -> std::collections::HashMap<String, String> {
    loramix::studio::png_text_chunks(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_2x2x2_grid_writes_cells_and_labelled_grids() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    // `loramix grid ARGS --model miniworld --out OUT`.
    let grid = |args: &[&str]| -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loramix"));
        c.env("RUST_BACKTRACE", "0").env("LORAMIX_HOME", tmp.path().join("home")).arg("grid").args(args).arg("--model").arg(&model).arg("--out").arg(&out);
        c
    };
    let o = grid(&["--x", "mix=merge,auto", "--y", "lora:vlox=0.5,1", "--z", "seed=3,4", "--prompt", "a vlox emblem on a teal background, checkered style", "--lora", "vlox", "--lora", "checkered", "--steps", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut expected = vec!["grid-z00.png".to_string(), "grid-z01.png".to_string()];
    for z in 0..2 {
        for y in 0..2 {
            for x in 0..2 {
                expected.push(format!("xyz-z{z:02}-y{y:02}-x{x:02}-00.png"));
            }
        }
    }
    expected.sort();
    assert_eq!(names, expected);
    // Every cell's own metadata carries the values of its position.
    for z in 0..2 {
        for y in 0..2 {
            for x in 0..2 {
                let (s, rec) = loramix::studio::settings_from_image(&out.join(format!("xyz-z{z:02}-y{y:02}-x{x:02}-00.png"))).unwrap();
                assert_eq!(s.mix, ["merge", "auto"][x]);
                assert_eq!(s.seed, Some([3, 4][z]));
                let vlox = s.loras.iter().find(|l| l.name == "vlox").unwrap();
                assert_eq!(vlox.weight, [0.5, 1.0][y]);
                let params = chunks(&out.join(format!("xyz-z{z:02}-y{y:02}-x{x:02}-00.png")))["parameters"].clone();
                assert!(params.contains(&format!("LoRA mix: {}", ["merge", "auto"][x])), "{params}");
                assert!(params.contains(&format!("<lora:vlox:{}>", [0.5, 1.0][y])), "{params}");
                assert!(rec.is_some());
            }
        }
    }
    // The grid names its axes and values in order, maps cells to files, and is large enough for
    // two scaled-up columns and rows plus labels.
    for z in 0..2 {
        let path = out.join(format!("grid-z{z:02}.png"));
        let c = chunks(&path);
        let meta: serde_json::Value = serde_json::from_str(&c["loramix-grid"]).unwrap();
        assert_eq!(meta["x"], serde_json::json!(["LoRA mix", ["merge", "auto"]]));
        assert_eq!(meta["y"], serde_json::json!(["LoRA vlox", ["0.5", "1"]]));
        assert_eq!(meta["z"], serde_json::json!(["Seed", ["3", "4"]]));
        assert_eq!(meta["z_value"], ["3", "4"][z]);
        assert_eq!(meta["cells"][1]["images"][0], format!("xyz-z{z:02}-y00-x01-00.png"));
        assert!(c["parameters"].contains(&format!("Seed: {}", [3, 4][z])));
        let img = image::open(&path).unwrap().to_rgb8();
        assert!(img.width() >= 512 && img.height() >= 512, "{}x{}", img.width(), img.height());
        // The top-left cell sits right of the row labels and below the column labels: its
        // pixels are the first cell's, scaled up 4×.
        let cell = image::open(out.join(format!("xyz-z{z:02}-y00-x00-00.png"))).unwrap().to_rgb8();
        let (gw, gh) = (img.width(), img.height());
        let found = (0..gw - 256).step_by(1).any(|ox| {
            (0..gh.saturating_sub(512)).step_by(1).any(|oy| (0..64).step_by(9).all(|i| img.get_pixel(ox + i * 4, oy + i * 4) == cell.get_pixel(i, i)))
        });
        assert!(found, "the first cell is not drawn in the grid");
    }
    // A second grid in the same folder is numbered and leaves the first's files as they were.
    let before: Vec<Vec<u8>> = expected.iter().map(|n| std::fs::read(out.join(n)).unwrap()).collect();
    let o = grid(&["--x", "seed=5", "--prompt", "a teal background", "--steps", "2", "--width", "32", "--height", "32"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), out.join("grid-0001.png").display().to_string());
    assert!(out.join("xyz-0001-z00-y00-x00-00.png").exists());
    let after: Vec<Vec<u8>> = expected.iter().map(|n| std::fs::read(out.join(n)).unwrap()).collect();
    assert!(before == after, "the first grid's files changed");
    // Two grids started together reserve different numbers, and leave no marker behind.
    let spawn = |seed: &str| {
        grid(&["--x", &format!("seed={seed}"), "--prompt", "a teal background", "--steps", "2", "--width", "32", "--height", "32"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("6"), spawn("7"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{} {}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    let mut grids = vec![String::from_utf8_lossy(&a.stdout).trim().to_string(), String::from_utf8_lossy(&b.stdout).trim().to_string()];
    grids.sort();
    assert_eq!(grids, ["grid-0002.png", "grid-0003.png"].map(|n| out.join(n).display().to_string()));
    let seeds: Vec<bool> = ["-0002", "-0003"].iter().map(|t| chunks(&out.join(format!("xyz{t}-z00-y00-x00-00.png")))["parameters"].contains("Seed: 6,")).collect();
    assert!(seeds[0] != seeds[1], "each grid's cell is its own run's");
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".reserved")));
}

/// A Var. strength axis keeps the given `--subseed` in every cell (as A1111's X/Y/Z plot keeps
/// `p.subseed`); without one a random variation seed is drawn once for the whole grid.
#[test]
fn a_variation_strength_axis_keeps_the_given_subseed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    let run = |out: &str, extra: &[&str]| -> Vec<String> {
        let out = tmp.path().join(out);
        let o = Command::new(env!("CARGO_BIN_EXE_loramix"))
            .env("RUST_BACKTRACE", "0")
            .env("LORAMIX_HOME", tmp.path().join("home"))
            .args(["grid", "--x", "subseed_strength=0.5,1", "--prompt", "a red circle", "--steps", "2", "--seed", "1"])
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        ["xyz-z00-y00-x00-00.png", "xyz-z00-y00-x01-00.png"].iter().map(|n| chunks(&out.join(n))["parameters"].clone()).collect()
    };
    let given = run("given", &["--subseed", "9"]);
    assert!(given[0].contains("Variation seed: 9, Variation seed strength: 0.5") && given[1].contains("Variation seed: 9, Variation seed strength: 1"), "{given:?}");
    let drawn = run("drawn", &[]);
    let seed_of = |t: &str| t.split("Variation seed: ").nth(1).and_then(|r| r.split(',').next()).map(str::to_string);
    assert!(seed_of(&drawn[0]).is_some() && seed_of(&drawn[0]) == seed_of(&drawn[1]), "{drawn:?}");
}
