//! The Extras tab's upscale equal to A1111's byte for byte (Pillow 9.5.0 under its
//! postprocessing code; goldens: tools/parity/make_extras_fixtures.py): "Scale by" with and
//! without "Max side length", "Scale to" with and without "Crop to fit", a second upscaler
//! blended in, the `postprocessing` infotext, an RGBA picture kept RGBA and resized premultiplied
//! (A1111 1.10), an LA one made RGB.

use std::path::PathBuf;

use candle_core::Device;
use loramix::studio::{blend, read_extras_input, ExtrasImage, ExtrasResize, ExtrasSettings};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extras")
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn settings(c: &serde_json::Value) -> ExtrasSettings {
    let resize = if c["mode"] == 1 {
        ExtrasResize::ScaleTo { width: c["width"].as_u64().unwrap() as u32, height: c["height"].as_u64().unwrap() as u32, crop: c["crop"].as_bool().unwrap() }
    } else {
        ExtrasResize::ScaleBy { factor: c["factor"].as_f64().unwrap(), max_side_length: c["max_side_length"].as_u64().unwrap() as u32 }
    };
    ExtrasSettings {
        resize,
        upscaler_1: c["upscaler_1"].as_str().unwrap().into(),
        upscaler_2: c["upscaler_2"].as_str().unwrap().into(),
        upscaler_2_visibility: c["visibility"].as_f64().unwrap(),
        factor_as_int: false,
    }
}

/// A golden as Pillow wrote it: RGB, or RGBA when the picture kept its alpha.
fn golden(name: &str) -> ExtrasImage {
    match image::open(dir().join(name)).unwrap() {
        image::DynamicImage::ImageRgba8(i) => ExtrasImage::Rgba(i),
        other => ExtrasImage::Rgb(other.to_rgb8()),
    }
}

#[test]
fn extras_upscale_equals_a1111_byte_for_byte() {
    let g = cases();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 81);
    let mut rgba = 0;
    for c in cases {
        let (img, _) = read_extras_input(&dir().join(c["input"].as_str().unwrap())).unwrap();
        let out = settings(c).run(&img, None, &Device::Cpu).unwrap();
        let want = golden(c["output"].as_str().unwrap());
        assert_eq!(out.image.dimensions(), want.dimensions(), "{c}");
        match (&out.image, &want) {
            (ExtrasImage::Rgb(a), ExtrasImage::Rgb(b)) => assert!(a == b, "{c}: {} bytes differ", a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count()),
            (ExtrasImage::Rgba(a), ExtrasImage::Rgba(b)) => {
                rgba += 1;
                assert!(a == b, "{c}: {} bytes differ", a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x != y).count())
            }
            _ => panic!("{c}: RGB and RGBA"),
        }
        assert_eq!(out.infotext(), c["infotext"].as_str().unwrap(), "{c}");
    }
    assert_eq!(rgba, 12, "RGBA pictures (and a palette with an alpha table) stay RGBA unless cropped");
    for b in g["blends"].as_array().unwrap() {
        let x = image::open(dir().join("blend_x.png")).unwrap().to_rgb8();
        let y = image::open(dir().join("blend_y.png")).unwrap().to_rgb8();
        let want = image::open(dir().join(b["output"].as_str().unwrap())).unwrap().to_rgb8();
        assert!(blend(&x, &y, b["alpha"].as_f64().unwrap()).unwrap() == want, "Image.blend at {}", b["alpha"]);
    }
}

/// A phone picture is turned upright by its EXIF orientation first, as A1111's `images.read`
/// (`ImageOps.exif_transpose`): a 16x8 JPEG tagged "rotate 90° clockwise" is read as 8x16, its
/// left (blue) half on top.
#[test]
fn extras_turns_pictures_upright() {
    let (img, _) = read_extras_input(&dir().join("rotated.jpg")).unwrap();
    let ExtrasImage::Rgb(img) = img else { panic!("a JPEG is RGB") };
    assert_eq!(img.dimensions(), (8, 16));
    let (top, bottom) = (img.get_pixel(2, 2).0, img.get_pixel(2, 13).0);
    assert!(top[2] > 150 && top[0] < 80, "{top:?}");
    assert!(bottom[0] > 150 && bottom[2] < 80, "{bottom:?}");
}

/// A1111's run_postprocessing keeps a JPEG's or WebP's EXIF comment as the output's
/// `parameters` (tools/parity/make_image_info_fixtures.py), and a PNG's text chunks with
/// `parameters` last; an empty comment leaves none.
#[test]
fn extras_keeps_parameters_from_exif() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_info");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).unwrap()).unwrap();
    let infotext = expected["read"]["a1111_saved.jpg"]["info"].as_str().unwrap();
    for name in ["a1111_saved.jpg", "a1111_saved.webp", "a1111_api.webp"] {
        let (_, chunks) = read_extras_input(&fixtures.join(name)).unwrap();
        assert_eq!(chunks, vec![("parameters".to_string(), infotext.to_string())], "{name}");
    }
    let (_, chunks) = read_extras_input(&fixtures.join("a1111_api_empty.jpg")).unwrap();
    assert!(chunks.is_empty());
    let (_, chunks) = read_extras_input(&fixtures.join("exif_wins.png")).unwrap();
    assert_eq!(chunks, vec![("Software".to_string(), "x".to_string()), ("parameters".to_string(), "from eXIf".to_string())]);
}

/// "None" as upscaler 1 leaves the picture as it is and writes nothing, as A1111; bad values
/// and names are refused with the field named.
#[test]
fn extras_none_and_refusals() {
    let (img, _) = read_extras_input(&dir().join("a.png")).unwrap();
    let out = ExtrasSettings::default().run(&img, None, &Device::Cpu).unwrap();
    assert!(out.image == img && out.info.is_empty() && out.html_info() == "<p></p>");
    let bad = |s: ExtrasSettings| s.run(&img, None, &Device::Cpu).unwrap_err().to_string();
    let e = bad(ExtrasSettings { resize: ExtrasResize::ScaleBy { factor: 9.0, max_side_length: 0 }, upscaler_1: "Lanczos".into(), ..Default::default() });
    assert!(e.contains("scale factor") && e.contains("from 1 to 8"), "{e}");
    let e = bad(ExtrasSettings { upscaler_1: "Lanczos".into(), upscaler_2_visibility: 1.5, ..Default::default() });
    assert!(e.contains("visibility"), "{e}");
    let e = bad(ExtrasSettings { upscaler_1: "Latent".into(), ..Default::default() });
    assert!(e.contains("Extras upscaler 1") && e.contains("Lanczos"), "{e}");
    let e = bad(ExtrasSettings { upscaler_1: "Lanczos".into(), upscaler_2: "nope".into(), ..Default::default() });
    assert!(e.contains("Extras upscaler 2") && e.contains("nope"), "{e}");
    let e = bad(ExtrasSettings { resize: ExtrasResize::ScaleTo { width: 0, height: 5, crop: true }, upscaler_1: "Lanczos".into(), ..Default::default() });
    assert!(e.contains("0x5"), "{e}");
    let tiny = ExtrasImage::Rgb(image::RgbImage::new(3, 3));
    let e = ExtrasSettings { upscaler_1: "Lanczos".into(), ..Default::default() }.run(&tiny, None, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("3x3") && e.contains("0x0"), "{e}");
}
