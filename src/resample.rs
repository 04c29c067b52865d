//! Pillow's `Image.resize` for 8-bit images, bit for bit: every filter, and the `box` argument
//! (a source region, which may have zero width or height).
//!
//! Ours rather than a resampling crate's because the pictures A1111, diffusers and the
//! ControlNet extension feed a model are made by Pillow, and being equal to them means Pillow's
//! arithmetic: its filter support and window rounding, coefficients normalised in `f64` and
//! rounded to 22-bit fixed point, a horizontal pass rounded to 8 bits before the vertical one,
//! and nearest neighbour by an accumulated `f64` position. The `image` crate's filters work in
//! `f32` and differ by a level here and there; `fast_image_resize` picks its own precision; and
//! neither takes a zero-height box, which A1111's "Resize and fill" uses to extrapolate edges.
//!
//! The reference is Pillow 9.5.0, the version A1111 pins; every Pillow up to 12 computes the same.
//! Pillow 13 chooses the order of its two passes by the sizes involved, so it can differ from
//! these by a level in some pixels.
//!
//! Pillow premultiplies alpha for `RGBA` before filtering; we do not, so a four-channel image
//! is resized as Pillow resizes `RGBX`. Our callers resize `RGB` and `L` images.

use image::{ImageBuffer, Pixel};

/// Pillow's `Image.Resampling`, with its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// Half the filter's width, in source pixels at scale 1 (Pillow's `support`).
    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        use std::f64::consts::PI;
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                (x * PI).sin() / (x * PI)
            }
        };
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    // Pillow writes the constants as C floats.
                    (x * PI).sin() / (x * PI) * (0.54f32 as f64 + 0.46f32 as f64 * (x * PI).cos())
                }
            }
            Filter::Bicubic => {
                // Keys' cubic with a = −0.5, as Pillow.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output position's source window: its first index and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for one axis: `out` positions over
/// the source span `in0..in1` of an axis `len` long.
fn taps(len: usize, in0: f32, in1: f32, out: usize, filter: Filter) -> Vec<Taps> {
    let scale = (in1 - in0) as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out)
        .map(|xx| {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates towards zero; a negative start is clamped to 0 either way.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).clamp(0, len as i64) as usize;
            let mut k: Vec<f64> = (first..end.max(first))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let weights = k
                .iter()
                .map(|v| {
                    if *v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `img.resize((w, h), resample=filter)`.
pub fn resize<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
    filter: Filter,
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    resample_inside(
        img,
        w,
        h,
        filter,
        [0.0, 0.0, img.width() as f32, img.height() as f32],
    )
}

/// `img.resize((w, h), resample=filter, box=region)`: the source rectangle `region`
/// (left, top, right, bottom, in pixels, fractions allowed) scaled to `w × h`. A zero-width or
/// zero-height region extrapolates the pixels at that edge. A region that is not inside the
/// image is refused with Pillow's words; an empty output size gives an empty image (Pillow
/// raises).
pub fn resize_region<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
    filter: Filter,
    region: [f32; 4],
) -> crate::Result<ImageBuffer<P, Vec<u8>>>
where
    P: Pixel<Subpixel = u8>,
{
    let [x0, y0, x1, y1] = region;
    let bad = |why: &str| Err(crate::Error::Argument(format!("resize box {region:?} of a {}x{} image: {why}", img.width(), img.height())));
    // Negated comparisons so that NaN is refused too.
    if !(x0 >= 0.0 && y0 >= 0.0) {
        return bad("box offset can't be negative");
    }
    if !(x1 <= img.width() as f32 && y1 <= img.height() as f32) {
        return bad("box can't exceed original image size");
    }
    if !(x1 - x0 >= 0.0 && y1 - y0 >= 0.0) {
        return bad("box can't be empty");
    }
    Ok(resample_inside(img, w, h, filter, region))
}

/// [`resize_region`] for a region inside the image.
fn resample_inside<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
    filter: Filter,
    region: [f32; 4],
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (w as usize, h as usize);
    if ow == 0 || oh == 0 || iw == 0 || ih == 0 {
        return ImageBuffer::new(w, h);
    }
    // A whole-pixel region of the output's size is a crop (`_imaging.c`'s `_resize`).
    let [x0, y0, x1, y1] = region;
    if x0.fract() == 0.0 && y0.fract() == 0.0 && x1 - x0 == ow as f32 && y1 - y0 == oh as f32 {
        let (cx, cy, ch) = (x0 as usize, y0 as usize, P::CHANNEL_COUNT as usize);
        let raw: Vec<u8> = (cy..cy + oh).flat_map(|y| img.as_raw()[(y * iw + cx) * ch..(y * iw + cx + ow) * ch].iter().copied()).collect();
        return ImageBuffer::from_raw(w, h, raw).expect("the output buffer has w × h pixels");
    }
    let raw = if filter == Filter::Nearest {
        nearest(
            img.as_raw(),
            iw,
            ih,
            P::CHANNEL_COUNT as usize,
            ow,
            oh,
            region,
        )
    } else {
        convolve(
            img.as_raw(),
            iw,
            ih,
            P::CHANNEL_COUNT as usize,
            ow,
            oh,
            filter,
            region,
        )
    };
    ImageBuffer::from_raw(w, h, raw).expect("the output buffer has w × h pixels")
}

/// Pillow's two separable passes (`ImagingResampleInner`).
#[allow(clippy::too_many_arguments)]
fn convolve(
    src: &[u8],
    iw: usize,
    ih: usize,
    ch: usize,
    ow: usize,
    oh: usize,
    filter: Filter,
    [x0, y0, x1, y1]: [f32; 4],
) -> Vec<u8> {
    let need_horizontal = ow != iw || x0 != 0.0 || x1 != ow as f32;
    let need_vertical = oh != ih || y0 != 0.0 || y1 != oh as f32;
    let vertical = taps(ih, y0, y1, oh, filter);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Only the rows the vertical pass reads are filtered horizontally.
    let (row0, row1) = match (vertical.first(), vertical.last()) {
        (Some(a), Some(b)) => (a.first, b.first + b.weights.len()),
        _ => (0, 0),
    };
    let (rows, row_offset, width) = if need_horizontal {
        let horizontal = taps(iw, x0, x1, ow, filter);
        let mut out = vec![0u8; (row1 - row0) * ow * ch];
        for y in row0..row1 {
            let line = &src[y * iw * ch..(y + 1) * iw * ch];
            let dst = &mut out[(y - row0) * ow * ch..(y - row0 + 1) * ow * ch];
            for (xx, t) in horizontal.iter().enumerate() {
                for c in 0..ch {
                    let ss = t.weights.iter().enumerate().fold(half, |ss, (j, k)| {
                        ss + line[(t.first + j) * ch + c] as i64 * *k as i64
                    });
                    dst[xx * ch + c] = clip8(ss);
                }
            }
        }
        (std::borrow::Cow::Owned(out), row0, ow)
    } else {
        (std::borrow::Cow::Borrowed(src), 0, iw)
    };
    if !need_vertical {
        return rows.into_owned();
    }
    let mut out = vec![0u8; ow * oh * ch];
    let stride = width * ch;
    for (yy, t) in vertical.iter().enumerate() {
        let dst = &mut out[yy * stride..(yy + 1) * stride];
        for (i, v) in dst.iter_mut().enumerate() {
            let ss = t.weights.iter().enumerate().fold(half, |ss, (j, k)| {
                ss + rows[(t.first + j - row_offset) * stride + i] as i64 * *k as i64
            });
            *v = clip8(ss);
        }
    }
    out
}

/// Pillow's nearest neighbour (`ImagingScaleAffine`): source positions accumulated in `f64`
/// from the first pixel's centre, truncated; outside the image is black.
fn nearest(
    src: &[u8],
    iw: usize,
    ih: usize,
    ch: usize,
    ow: usize,
    oh: usize,
    [x0, y0, x1, y1]: [f32; 4],
) -> Vec<u8> {
    let (ax, ay) = ((x1 - x0) as f64 / ow as f64, (y1 - y0) as f64 / oh as f64);
    let coord = |v: f64| if v < 0.0 { None } else { Some(v as usize) };
    let mut xo = x0 as f64 + ax * 0.5;
    let columns: Vec<Option<usize>> = (0..ow)
        .map(|_| {
            let x = coord(xo).filter(|x| *x < iw);
            xo += ax;
            x
        })
        .collect();
    let mut out = vec![0u8; ow * oh * ch];
    let mut yo = y0 as f64 + ay * 0.5;
    for yy in 0..oh {
        if let Some(y) = coord(yo).filter(|y| *y < ih) {
            for (xx, x) in columns.iter().enumerate() {
                if let Some(x) = x {
                    out[(yy * ow + xx) * ch..(yy * ow + xx + 1) * ch]
                        .copy_from_slice(&src[(y * iw + x) * ch..(y * iw + x + 1) * ch]);
                }
            }
        }
        yo += ay;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A golden image: height, width, channels, bytes.
    pub(crate) type Golden = (usize, usize, usize, Vec<u8>);

    /// `tests/fixtures/resample`: Pillow's outputs (`tools/parity/make_resample_fixtures.py`),
    /// as cases.json's cases and the images by name.
    pub(crate) fn fixtures() -> (
        Vec<serde_json::Value>,
        std::collections::HashMap<String, Golden>,
    ) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resample");
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, t)| {
                let s = t.shape();
                (name, (s[0], s[1], s[2], t.data().to_vec()))
            })
            .collect();
        (cases["cases"].as_array().unwrap().clone(), tensors)
    }

    pub(crate) fn rgb((h, w, c, data): &Golden) -> image::RgbImage {
        assert_eq!(*c, 3);
        image::RgbImage::from_raw(*w as u32, *h as u32, data.clone()).unwrap()
    }

    pub(crate) fn gray((h, w, c, data): &Golden) -> image::GrayImage {
        assert_eq!(*c, 1);
        image::GrayImage::from_raw(*w as u32, *h as u32, data.clone()).unwrap()
    }

    /// Every filter, enlarging, reducing, one axis only, 1×1, fractional boxes and the
    /// zero-height and zero-width boxes at each edge, on RGB and L: equal to Pillow byte for byte.
    #[test]
    fn resize_equals_pillow() {
        let (cases, tensors) = fixtures();
        let (mut checked, mut failures) = (0, vec![]);
        for case in cases.iter().filter(|c| c["kind"] == "resize") {
            let key = case["key"].as_str().unwrap();
            let source = &tensors[&format!("source.{}", case["source"].as_str().unwrap())];
            let filter = match case["filter"].as_str().unwrap() {
                "nearest" => Filter::Nearest,
                "box" => Filter::Box,
                "bilinear" => Filter::Bilinear,
                "hamming" => Filter::Hamming,
                "bicubic" => Filter::Bicubic,
                "lanczos" => Filter::Lanczos,
                other => panic!("filter {other}"),
            };
            let size: Vec<u32> = case["size"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let region = match case["box"].as_array() {
                Some(b) => [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32),
                None => [0.0, 0.0, source.1 as f32, source.0 as f32],
            };
            let want = &tensors[key];
            let got = if source.2 == 1 {
                resize_region(&gray(source), size[0], size[1], filter, region).unwrap().into_raw()
            } else {
                resize_region(&rgb(source), size[0], size[1], filter, region).unwrap().into_raw()
            };
            assert_eq!(
                (want.0, want.1),
                (size[1] as usize, size[0] as usize),
                "{key}"
            );
            let diff = got.iter().zip(&want.3).filter(|(a, b)| a != b).count();
            if diff != 0 {
                failures.push(format!("{key}: {diff} of {} bytes", got.len()));
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "differ from Pillow: {failures:#?}");
        assert_eq!(checked, 252, "every resize case ran");
        // Boxes Pillow refuses are refused, naming the box.
        let img = image::GrayImage::new(4, 3);
        for (region, why) in [([-1.0, 0.0, 2.0, 2.0], "negative"), ([0.0, 0.0, 4.0, 3.5], "exceed"), ([2.0, 0.0, 1.0, 3.0], "empty"), ([f32::NAN, 0.0, 1.0, 1.0], "negative")] {
            let e = resize_region(&img, 2, 2, Filter::Lanczos, region).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("4x3"), "{region:?}: {e}");
        }
    }
}
