//! A1111's "Extras" tab, its upscale part (`scripts/postprocessing_upscale.py` under
//! `modules/postprocessing.py`): a finished picture enlarged by one upscaler, optionally blended
//! with a second ("Upscaler 2 visibility"), by a factor ("Scale by", with its "Max side length")
//! or to a size ("Scale to", cropped to fit or not). The picture keeps its text chunks and
//! gains A1111's `postprocessing` line (`Postprocess upscale by: 2.0, Postprocess upscaler:
//! Lanczos`), so the generation settings it came with still restore.
//!
//! Face restoration (GFPGAN, CodeFormer) is not here: those are pickled PyTorch models.

use std::path::Path;

use candle_core::Device;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::sdxl::img2img;
use crate::sdxl::upscale::Upscaler;
use crate::sdxl::upscale_model::UpscaleModel;

/// The largest side an Extras picture may reach: 8× a 2048-pixel picture. A1111 sets none and
/// runs out of memory instead.
pub const MAX_EXTRAS_SIDE: u32 = 16384;

/// The tab's "Scale by" and "Scale to" (the API's `resize_mode` 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum ExtrasResize {
    /// `upscaling_resize`, in [1, 8]. A `max_side_length` other than 0 shrinks a result whose
    /// longer side would pass it to that side (and then never crops).
    ScaleBy { factor: f64, max_side_length: u32 },
    /// `upscaling_resize_w` × `upscaling_resize_h`: enlarged by the larger of the two ratios,
    /// then, with `crop`, cut to exactly that size around the centre.
    ScaleTo { width: u32, height: u32, crop: bool },
}

/// One Extras run's settings, with the API's defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ExtrasSettings {
    pub resize: ExtrasResize,
    /// "None" leaves the picture as it is (A1111 then does nothing at all).
    pub upscaler_1: String,
    pub upscaler_2: String,
    /// How much of upscaler 2's picture is blended in, in [0, 1] (Pillow's `Image.blend`).
    pub upscaler_2_visibility: f64,
}

impl Default for ExtrasSettings {
    fn default() -> Self {
        Self { resize: ExtrasResize::ScaleBy { factor: 2.0, max_side_length: 0 }, upscaler_1: "None".into(), upscaler_2: "None".into(), upscaler_2_visibility: 0.0 }
    }
}

/// A picture after Extras, with the `Key: value` pairs A1111 writes, in its order.
#[derive(Debug, Clone)]
pub struct Postprocessed {
    pub image: RgbImage,
    pub info: Vec<(String, String)>,
}

impl Postprocessed {
    /// A1111's `postprocessing` line: `Key: value` joined by ", ", values quoted as its
    /// `infotext_utils.quote` does (JSON when they hold a comma, a colon or a newline).
    pub fn infotext(&self) -> String {
        self.info.iter().map(|(k, v)| if k == v { k.clone() } else { format!("{k}: {}", a1111_quote(v)) }).collect::<Vec<_>>().join(", ")
    }

    /// The API's `html_info` (A1111's `plaintext_to_html`).
    pub fn html_info(&self) -> String {
        infotext_html(&self.infotext())
    }
}

/// A1111's `plaintext_to_html`: each line escaped as Python's `html.escape`, joined by `<br>`.
pub fn infotext_html(text: &str) -> String {
    let esc = |l: &str| l.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#x27;");
    format!("<p>{}</p>", text.split('\n').map(esc).collect::<Vec<_>>().join("<br>\n"))
}

fn a1111_quote(v: &str) -> String {
    if v.contains([',', '\n', ':']) {
        serde_json::to_string(v).unwrap_or_default()
    } else {
        v.to_string()
    }
}

/// An ordered `pp.info`: setting a key again keeps its place, as a Python dict does.
struct Info(Vec<(String, String)>);

impl Info {
    fn set(&mut self, k: &str, v: String) {
        match self.0.iter_mut().find(|(key, _)| key == k) {
            Some(e) => e.1 = v,
            None => self.0.push((k.to_string(), v)),
        }
    }
}

/// A resolved upscaler: a built-in one or an ESRGAN-family model.
enum Step {
    Builtin(Upscaler),
    Model(UpscaleModel),
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::Builtin(Upscaler::Lanczos) => "Lanczos".into(),
            Step::Builtin(_) => "Nearest".into(),
            Step::Model(m) => m.name.clone(),
        }
    }

    /// A1111's `Upscaler.upscale(img, scale)`.
    fn upscale_by(&self, img: &RgbImage, scale: f64) -> Result<RgbImage> {
        match self {
            Step::Builtin(u) => Ok(u.upscale_by(img, scale)),
            Step::Model(m) => m.upscale_by(img, scale),
        }
    }
}

impl ExtrasSettings {
    /// The checks that need no picture: ranges as A1111's API model has them, and upscalers
    /// that are there (a latent one is not a picture upscaler).
    pub fn check(&self, library: Option<&Path>) -> Result<()> {
        match self.resize {
            ExtrasResize::ScaleBy { factor, .. } if !(1.0..=8.0).contains(&factor) => {
                return Err(Error::Argument(format!("Extras scale factor (upscaling_resize) {factor}: expected a number from 1 to 8")));
            }
            ExtrasResize::ScaleTo { width, height, .. } if width == 0 || height == 0 || width > MAX_EXTRAS_SIDE || height > MAX_EXTRAS_SIDE => {
                return Err(Error::Argument(format!("Extras target size {width}x{height}: expected sides from 1 to {MAX_EXTRAS_SIDE} pixels")));
            }
            _ => {}
        }
        if !(0.0..=1.0).contains(&self.upscaler_2_visibility) {
            return Err(Error::Argument(format!("Extras upscaler 2 visibility {}: expected a number from 0 to 1", self.upscaler_2_visibility)));
        }
        super::hires::pixel_upscaler_path(&self.upscaler_1, library, "Extras upscaler 1")?;
        super::hires::pixel_upscaler_path(&self.upscaler_2, library, "Extras upscaler 2")?;
        Ok(())
    }

    fn resolve(name: &str, library: Option<&Path>, device: &Device, what: &str) -> Result<Option<Step>> {
        match super::hires::pixel_upscaler_path(name, library, what)? {
            Some(p) => Ok(Some(Step::Model(UpscaleModel::load(&p, device)?))),
            None => match name.parse::<Upscaler>()? {
                Upscaler::Resize => Ok(None),
                u => Ok(Some(Step::Builtin(u))),
            },
        }
    }

    /// `image` as A1111's Extras makes it (`ScriptPostprocessingUpscale.process`). ESRGAN-family
    /// models run on `device`.
    pub fn run(&self, image: &RgbImage, library: Option<&Path>, device: &Device) -> Result<Postprocessed> {
        self.check(library)?;
        let Some(first) = Self::resolve(&self.upscaler_1, library, device, "Extras upscaler 1")? else {
            return Ok(Postprocessed { image: image.clone(), info: Vec::new() });
        };
        let second = Self::resolve(&self.upscaler_2, library, device, "Extras upscaler 2")?;
        let mut info = Info(Vec::new());
        let mut out = self.upscale(image, &mut info, &first)?;
        info.set("Postprocess upscaler", first.name());
        if let Some(second) = second.filter(|_| self.upscaler_2_visibility > 0.0) {
            let other = self.upscale(image, &mut info, &second)?;
            if other.dimensions() != out.dimensions() {
                return Err(Error::Argument(format!(
                    "Extras: upscaler 1 made {}x{} and upscaler 2 {}x{}: they cannot be blended",
                    out.width(),
                    out.height(),
                    other.width(),
                    other.height()
                )));
            }
            out = blend(&out, &other, self.upscaler_2_visibility);
            info.set("Postprocess upscaler 2", second.name());
        }
        Ok(Postprocessed { image: out, info: info.0 })
    }

    /// `ScriptPostprocessingUpscale.upscale` with one upscaler.
    fn upscale(&self, image: &RgbImage, info: &mut Info, step: &Step) -> Result<RgbImage> {
        let (iw, ih) = (image.width() as f64, image.height() as f64);
        if iw == 0.0 || ih == 0.0 {
            return Err(Error::Argument("Extras: the picture is empty".into()));
        }
        // (scale, the size to crop to)
        let (scale, crop_to) = match self.resize {
            ExtrasResize::ScaleTo { width, height, crop } => {
                info.set("Postprocess upscale to", format!("{width}x{height}"));
                ((width as f64 / iw).max(height as f64 / ih), crop.then_some((width, height)))
            }
            ExtrasResize::ScaleBy { factor, max_side_length } => {
                // Python's `str(float)`, as A1111 writes the API's float.
                info.set("Postprocess upscale by", format!("{factor:?}"));
                if max_side_length != 0 && iw.max(ih) * factor > max_side_length as f64 {
                    let (tw, th) = limit_size_by_one_dimension(iw * factor, ih * factor, max_side_length);
                    info.set("Max side length", max_side_length.to_string());
                    ((tw as f64 / iw).max(th as f64 / ih), None)
                } else {
                    (factor, None)
                }
            }
        };
        let (dw, dh) = img2img::a1111_upscaled_size(image.dimensions(), scale);
        if dw == 0 || dh == 0 || dw > MAX_EXTRAS_SIDE || dh > MAX_EXTRAS_SIDE {
            return Err(Error::Argument(format!(
                "Extras: the {}x{} picture would become {dw}x{dh} (sides rounded down to 8 pixels): expected sides from 8 to {MAX_EXTRAS_SIDE}",
                image.width(),
                image.height()
            )));
        }
        let up = step.upscale_by(image, scale)?;
        let Some((w, h)) = crop_to else { return Ok(up) };
        // `Image.new("RGB", size)` and a paste at the centre, in Python's integer division.
        let mut canvas = RgbImage::new(w, h);
        image::imageops::replace(&mut canvas, &up, (w / 2) as i64 - (up.width() / 2) as i64, (h / 2) as i64 - (up.height() / 2) as i64);
        info.set("Postprocess crop to", format!("{w}x{h}"));
        Ok(canvas)
    }
}

/// A1111's `limit_size_by_one_dimention` on float sides: the longer side set to `limit`, the
/// other scaled with Python's float floor division, both truncated.
fn limit_size_by_one_dimension(w: f64, h: f64, limit: u32) -> (u32, u32) {
    let l = limit as f64;
    let (w, h) = if h > w && h > l {
        (py_floordiv(l * w, h), l)
    } else if w > l {
        (l, py_floordiv(l * h, w))
    } else {
        (w, h)
    };
    (w as u32, h as u32)
}

/// CPython's `float // float` (`float_floor_div`): `fmod` first, then a floor that corrects the
/// quotient's rounding, which `(a / b).floor()` does not.
fn py_floordiv(vx: f64, wx: f64) -> f64 {
    let m = vx % wx;
    let mut div = (vx - m) / wx;
    if m != 0.0 && ((wx < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let mut fd = div.floor();
        if div - fd > 0.5 {
            fd += 1.0;
        }
        fd
    } else {
        0.0f64.copysign(vx / wx)
    }
}

/// Pillow's `Image.blend(a, b, alpha)` on 8-bit pictures of one size: `a + alpha · (b − a)`
/// in C `float` (the argument narrowed from Python's double), truncated to a byte. Ours
/// because the result must be Pillow's to the level.
pub fn blend(a: &RgbImage, b: &RgbImage, alpha: f64) -> RgbImage {
    let al = alpha as f32;
    if al == 0.0 {
        return a.clone();
    }
    if al == 1.0 {
        return b.clone();
    }
    let data = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f32 + al * (y as i32 - x as i32) as f32) as u8).collect();
    RgbImage::from_raw(a.width(), a.height(), data).expect("same size as a")
}

/// A picture as Extras reads it: Pillow's `convert("RGB")`, so transparency is dropped, not
/// flattened (img2img flattens onto white), and the text chunks a PNG carries.
pub fn read_extras_input(path: &Path) -> Result<(RgbImage, Vec<(String, String)>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_extras_input(&bytes).map_err(|e| match e {
        Error::Argument(m) | Error::Internal(m) => Error::BadFile { path: path.into(), message: m },
        e => e,
    })
}

/// [`read_extras_input`] on bytes (the API's base64 pictures).
pub fn decode_extras_input(bytes: &[u8]) -> Result<(RgbImage, Vec<(String, String)>)> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Argument(format!("not a readable image: {e}")))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 || w > MAX_EXTRAS_SIDE || h > MAX_EXTRAS_SIDE {
        return Err(Error::Argument(format!("the picture is {w}x{h}: expected sides from 1 to {MAX_EXTRAS_SIDE} pixels")));
    }
    let mut chunks: Vec<(String, String)> = if bytes.starts_with(b"\x89PNG") { super::png_text_chunks(bytes)?.into_iter().collect() } else { Vec::new() };
    // A1111 re-adds `parameters` after the others; ours are sorted, so the file is the same
    // whatever order the chunks came in.
    chunks.sort_by_key(|(k, _)| (k == "parameters", k.clone()));
    Ok((img.to_rgb8(), chunks))
}

/// The chunks an Extras picture is written with: the original's, then `postprocessing` (and,
/// for a saved file, `extras`, as A1111's `save_image(pnginfo_section_name="extras")`).
pub fn extras_chunks(original: &[(String, String)], infotext: &str, saved: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = original.iter().filter(|(k, _)| k != "postprocessing" && k != "extras").cloned().collect();
    out.push(("postprocessing".into(), infotext.to_string()));
    if saved {
        out.push(("extras".into(), infotext.to_string()));
    }
    out
}

/// PNG bytes of an Extras picture with `chunks`.
pub fn encode_extras_png(image: &RgbImage, chunks: &[(String, String)]) -> Result<Vec<u8>> {
    let text: Vec<(&str, String)> = chunks.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    crate::output::encode_png(image, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_division_and_size_limit_as_python() {
        assert_eq!(py_floordiv(7.0, 2.0), 3.0);
        assert_eq!(py_floordiv(-7.0, 2.0), -4.0);
        // (0.3 / 0.1 is 2.9999999999999996 in floats; Python's 0.3 // 0.1 is 2.0.)
        assert_eq!(py_floordiv(0.3, 0.1), 2.0);
        assert_eq!(limit_size_by_one_dimension(3000.0, 1500.0, 1024), (1024, 512));
        assert_eq!(limit_size_by_one_dimension(1000.0, 1999.5, 1024), (512, 1024));
        assert_eq!(limit_size_by_one_dimension(800.0, 600.0, 1024), (800, 600));
    }

    #[test]
    fn info_keeps_python_dict_order_and_quotes_as_a1111() {
        let mut i = Info(Vec::new());
        i.set("a", "1".into());
        i.set("b", "x, y".into());
        i.set("a", "2".into());
        let p = Postprocessed { image: RgbImage::new(1, 1), info: i.0 };
        assert_eq!(p.infotext(), "a: 2, b: \"x, y\"");
        assert_eq!(infotext_html("a <b> & 'c'"), "<p>a &lt;b&gt; &amp; &#x27;c&#x27;</p>");
    }
}
