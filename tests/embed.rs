//! The DINO embedder for EST-LoRA against transformers: Pillow-exact bilinear resize, the PIL
//! image processor's pixel values, and ViTModel's last hidden state, from checkpoints in both the
//! transformers 5 and the transformers 4 (hub) key layout. Goldens: tools/parity/make_vit_fixtures.py.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::*;
use loramix::eval::embed::{cosine_distance, resize_bilinear_pil, ImageEmbedder};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit")
}

#[test]
fn vit_embedder_equals_transformers() {
    let g = candle_core::safetensors::load(dir().join("golden.safetensors"), &Device::Cpu).unwrap();
    for layout in ["new", "old"] {
        let e = ImageEmbedder::load(&dir().join(layout), &Device::Cpu).unwrap();
        for name in ["image", "image_small"] {
            let img = image::open(dir().join(format!("{name}.png"))).unwrap().to_rgb8();
            let resized = resize_bilinear_pil(&img, 32, 32);
            let ours: Vec<f32> = resized.as_raw().iter().map(|v| *v as f32).collect();
            let want = g[&format!("{name}.resized")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(ours, want, "{name}: resize differs from Pillow");
            let px = e.pixel_values(&img).unwrap();
            assert_close(&format!("{layout} {name} pixel values"), &px, &g[&format!("{name}.pixel_values")], 1e-6);
            let hidden = e.model().forward(&px).unwrap();
            assert_close(&format!("{layout} {name} last hidden state"), &hidden, &g[&format!("{name}.last_hidden_state")], 1e-4);
            let cls = e.embed(&img).unwrap();
            let want = g[&format!("{name}.last_hidden_state")].narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(cosine_distance(&cls, &want) < 1e-6);
        }
    }
    let a = [1.0f32, 0.0];
    assert!((cosine_distance(&a, &[0.0, 2.0]) - 1.0).abs() < 1e-12);
}
