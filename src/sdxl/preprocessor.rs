//! ControlNet preprocessors (sd-webui-controlnet's "modules"): what turns a user's picture into
//! the control map a ControlNet was trained on. Each runs on the image at its own size; the map
//! is then fitted to the generation's size by the unit's resize mode.

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocessor {
    /// The image is the control map already.
    None,
    /// OpenCV's Canny edge detector with a low and a high hysteresis threshold.
    Canny { low: f64, high: f64 },
    /// A1111's "invert (from white bg & black line)": line art drawn dark on light, flipped to
    /// the light-on-dark maps the line-art ControlNets take.
    Invert,
}

impl Preprocessor {
    /// The module names [`Self::parse`] takes (case aside); a unit test checks each parses.
    pub const NAMES: [&'static str; 4] = ["none", "canny", "invert", "invert (from white bg & black line)"];

    /// An A1111 module name (`none`, `canny`, `invert`, or `invert (from white bg & black line)`)
    /// with its two thresholds (A1111's "Threshold A / B"; canny's low and high, default 100
    /// and 200).
    pub fn parse(name: &str, threshold_a: Option<f64>, threshold_b: Option<f64>) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        Ok(match n.as_str() {
            "" | "none" => Self::None,
            "canny" => {
                let (low, high) = (threshold_a.unwrap_or(100.0), threshold_b.unwrap_or(200.0));
                if !(low.is_finite() && high.is_finite() && low >= 0.0 && high >= 0.0) {
                    return Err(Error::Argument(format!("canny thresholds {low} and {high}: expected numbers ≥ 0")));
                }
                Self::Canny { low, high }
            }
            "invert" | "invert (from white bg & black line)" => Self::Invert,
            _ => {
                return Err(Error::Argument(format!(
                    "controlnet preprocessor {name:?}: expected none, canny or invert"
                )))
            }
        })
    }

    /// The name A1111 writes in `ControlNet N: "Module: ..."`.
    pub fn a1111_name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Canny { .. } => "canny",
            Self::Invert => "invert (from white bg & black line)",
        }
    }

    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        match *self {
            Self::None => img.clone(),
            Self::Canny { low, high } => gray_to_rgb(&canny(img, low, high)),
            Self::Invert => {
                let mut out = img.clone();
                out.iter_mut().for_each(|v| *v = 255 - *v);
                out
            }
        }
    }
}

fn gray_to_rgb(g: &GrayImage) -> RgbImage {
    RgbImage::from_fn(g.width(), g.height(), |x, y| {
        let v = g.get_pixel(x, y)[0];
        image::Rgb([v, v, v])
    })
}

/// `cv2.Canny(image, low, high)` bit for bit (aperture 3, L1 gradient), on an RGB image as
/// OpenCV takes one: per pixel, the channel with the largest |dx| + |dy| (the first on ties)
/// gives the gradient. Ours because ControlNets are trained on OpenCV's edges, and the Rust
/// edge detectors (imageproc's) blur first and suppress differently, giving other maps.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    if w == 0 || h == 0 {
        return GrayImage::new(img.width(), img.height());
    }
    let px = |x: isize, y: isize, c: usize| -> i32 {
        // BORDER_REPLICATE.
        let (x, y) = (x.clamp(0, w as isize - 1) as usize, y.clamp(0, h as isize - 1) as usize);
        img.as_raw()[(y * w + x) * 3 + c] as i32
    };
    // Sobel dx, dy of the strongest channel, and the L1 magnitude, with a zero border.
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    let (mw, mh) = (w + 2, h + 2);
    let mut mag = vec![0i32; mw * mh];
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as isize, y as isize);
            let mut best: Option<(i32, i32, i32)> = None;
            for c in 0..3 {
                let gx = (px(xi + 1, yi - 1, c) - px(xi - 1, yi - 1, c))
                    + 2 * (px(xi + 1, yi, c) - px(xi - 1, yi, c))
                    + (px(xi + 1, yi + 1, c) - px(xi - 1, yi + 1, c));
                let gy = (px(xi - 1, yi + 1, c) + 2 * px(xi, yi + 1, c) + px(xi + 1, yi + 1, c))
                    - (px(xi - 1, yi - 1, c) + 2 * px(xi, yi - 1, c) + px(xi + 1, yi - 1, c));
                let m = gx.abs() + gy.abs();
                if best.is_none_or(|(bm, _, _)| m > bm) {
                    best = Some((m, gx, gy));
                }
            }
            let (m, gx, gy) = best.unwrap_or_default();
            dx[y * w + x] = gx;
            dy[y * w + x] = gy;
            mag[(y + 1) * mw + x + 1] = m;
        }
    }
    // Non-maximum suppression along the gradient's sector (OpenCV's fixed-point tan 22.5°),
    // into 0: may be an edge, 1: is not, 2: is (above `high`).
    const SHIFT: i32 = 15;
    let tg22 = (0.414_213_562_373_095_05_f64 * (1 << SHIFT) as f64 + 0.5) as i64;
    let mut map = vec![1u8; mw * mh];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = (y + 1) * mw + x + 1;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x], dy[y * w + x]);
            let ax = xs.abs() as i64;
            let ay = (ys.abs() as i64) << SHIFT;
            let tg22x = ax * tg22;
            let keep = if ay < tg22x {
                m > mag[i - 1] && m >= mag[i + 1]
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > mag[i - mw] && m >= mag[i + mw]
                } else {
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > mag[(i as isize - mw as isize - s) as usize] && m > mag[(i as isize + mw as isize + s) as usize]
                }
            };
            if !keep {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 0;
            }
        }
    }
    // Hysteresis: weak candidates 8-connected to a strong edge become edges.
    let neighbours = [1isize, -1, mw as isize, -(mw as isize), mw as isize + 1, mw as isize - 1, -(mw as isize) + 1, -(mw as isize) - 1];
    while let Some(i) = stack.pop() {
        for d in neighbours {
            let j = (i as isize + d) as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    GrayImage::from_fn(w as u32, h as u32, |x, y| image::Luma([if map[(y as usize + 1) * mw + x as usize + 1] == 2 { 255 } else { 0 }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_parses() {
        for n in Preprocessor::NAMES {
            assert!(Preprocessor::parse(n, None, None).is_ok(), "{n}");
            assert!(Preprocessor::parse(&n.to_uppercase(), None, None).is_ok(), "{n}");
        }
        assert!(Preprocessor::parse("depth_zoe", None, None).is_err());
    }

    /// Equal to OpenCV's `cv2.Canny` on shapes, noise, a ramp and a 3×2 image, over thresholds
    /// that are swapped, fractional (floored) and zero (tools/parity/make_canny_fixtures.py).
    #[test]
    fn canny_equals_opencv() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/canny");
        let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let mut edges_seen = 0;
        for c in cases["cases"].as_array().unwrap() {
            let img = image::open(dir.join(c["image"].as_str().unwrap())).unwrap().to_rgb8();
            let want = image::open(dir.join(c["edges"].as_str().unwrap())).unwrap().to_luma8();
            let ours = canny(&img, c["low"].as_f64().unwrap(), c["high"].as_f64().unwrap());
            let off = ours.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
            assert_eq!(off, 0, "{c}: {off} pixels differ from OpenCV's");
            edges_seen += want.as_raw().iter().filter(|&&v| v > 0).count();
        }
        assert!(edges_seen > 1000);
    }

    #[test]
    fn names_and_thresholds() {
        assert_eq!(Preprocessor::parse("Canny", None, None).unwrap(), Preprocessor::Canny { low: 100.0, high: 200.0 });
        assert_eq!(Preprocessor::parse("invert (from white bg & black line)", None, None).unwrap(), Preprocessor::Invert);
        let e = Preprocessor::parse("depth_midas", None, None).unwrap_err().to_string();
        assert!(e.contains("depth_midas") && e.contains("none, canny or invert"), "{e}");
        assert!(Preprocessor::parse("canny", Some(-1.0), None).is_err());
        let img = RgbImage::from_pixel(2, 1, image::Rgb([10, 20, 250]));
        assert_eq!(Preprocessor::Invert.apply(&img).as_raw(), &vec![245, 235, 5, 245, 235, 5]);
    }
}
