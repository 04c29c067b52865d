//! The tiny autoencoder's decoder (per-step previews) equals diffusers' AutoencoderTiny.decode
//! (tools/parity/make_taesd_fixtures.py), and the studio picks it up when its weights are present.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use loramix::studio::Previewer;

#[test]
fn tiny_decoder_equals_diffusers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/taesd");
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let p = Previewer::find_tiny(&[PathBuf::from("/nonexistent"), dir.clone()], &Device::Cpu).unwrap().expect("found");
    let Previewer::Tiny(t) = &p else { panic!("expected the tiny decoder") };
    let img = t.decode(&g["latents"]).unwrap();
    common::assert_close("taesd decode", &img, &g["image"], 1e-4);
    let rgb = p.render(&g["latents"]).unwrap();
    assert_eq!((rgb.width(), rgb.height()), (40, 48));
}
