//! The shipped miniworld base model loads through the same code as SDXL and draws what the
//! prompt asks for: a big red circle on a cream background is red in the middle and light at
//! the edges.

use loramix::{GenerateRequest, LoadOptions, SdxlPipeline};

#[test]
fn miniworld_draws_the_prompted_colours() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/miniworld");
    let pipe = SdxlPipeline::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let req = GenerateRequest {
        prompt: "a big red circle on a cream background, flat style".into(),
        steps: 12,
        seed: 7,
        ..Default::default()
    };
    let img = &pipe.decode(&pipe.generate_latents(&req, &mut |_| true).unwrap()).unwrap()[0];
    assert_eq!((img.width(), img.height()), (64, 64));
    let mean = |x0: u32, x1: u32, y0: u32, y1: u32| {
        let mut s = [0f64; 3];
        let mut n = 0.0;
        for y in y0..y1 {
            for x in x0..x1 {
                let p = img.get_pixel(x, y);
                for c in 0..3 {
                    s[c] += p[c] as f64;
                }
                n += 1.0;
            }
        }
        s.map(|v| v / n)
    };
    let centre = mean(24, 40, 24, 40);
    let corner = mean(0, 6, 0, 6);
    assert!(centre[0] > centre[1] + 60.0 && centre[0] > centre[2] + 60.0, "centre is red: {centre:?}");
    assert!(corner.iter().all(|&c| c > 170.0), "corner is cream: {corner:?}");
}
