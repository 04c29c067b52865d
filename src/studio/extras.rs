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
use image::{ImageBuffer, RgbImage, RgbaImage};

use crate::error::{Error, Result};
use crate::resample::{self, Filter};
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
    /// Write a whole "Scale by" factor as an int (`by: 2`), as A1111 writes its tab's (Gradio's
    /// slider hands it an int) and its API's default (pydantic v1 leaves the default `2`
    /// unconverted); a factor an API request gives is a float there, written `2.0`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub factor_as_int: bool,
}

impl Default for ExtrasSettings {
    fn default() -> Self {
        Self { resize: ExtrasResize::ScaleBy { factor: 2.0, max_side_length: 0 }, upscaler_1: "None".into(), upscaler_2: "None".into(), upscaler_2_visibility: 0.0, factor_as_int: false }
    }
}

/// A picture after Extras, with the `Key: value` pairs A1111 writes, in its order.
#[derive(Debug, Clone)]
pub struct Postprocessed {
    pub image: ExtrasImage,
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

/// A picture as Extras holds it: Pillow's "RGB" or "RGBA" (A1111 keeps an RGBA picture's
/// transparency and converts every other mode to RGB).
#[derive(Debug, Clone, PartialEq)]
pub enum ExtrasImage {
    Rgb(RgbImage),
    Rgba(RgbaImage),
}

impl ExtrasImage {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Self::Rgb(i) => i.dimensions(),
            Self::Rgba(i) => i.dimensions(),
        }
    }

    /// Pillow's `convert("RGB")`: the alpha dropped, the colours kept as they are.
    pub fn to_rgb(&self) -> RgbImage {
        match self {
            Self::Rgb(i) => i.clone(),
            Self::Rgba(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
                let p = i.get_pixel(x, y).0;
                image::Rgb([p[0], p[1], p[2]])
            }),
        }
    }

    /// `other` in this picture's mode (Pillow's `convert`: RGB gains an opaque alpha).
    fn in_mode_of(&self, other: Self) -> Self {
        match (self, other) {
            (Self::Rgb(_), o) => Self::Rgb(o.to_rgb()),
            (Self::Rgba(_), Self::Rgb(o)) => Self::Rgba(RgbaImage::from_fn(o.width(), o.height(), |x, y| {
                let p = o.get_pixel(x, y).0;
                image::Rgba([p[0], p[1], p[2], 255])
            })),
            (Self::Rgba(_), o) => o,
        }
    }

    /// Pillow's `Image.resize(size, filter)`: the same size is a copy; an RGBA picture is
    /// resized premultiplied (`RGBa`) unless by nearest neighbour.
    pub fn resize(&self, w: u32, h: u32, filter: Filter) -> Self {
        if (w, h) == self.dimensions() {
            return self.clone();
        }
        match self {
            Self::Rgb(i) => Self::Rgb(resample::resize(i, w, h, filter)),
            Self::Rgba(i) if filter == Filter::Nearest => Self::Rgba(resample::resize(i, w, h, filter)),
            Self::Rgba(i) => Self::Rgba(unpremultiply(&resample::resize(&premultiply(i), w, h, filter))),
        }
    }

    /// PNG bytes with `chunks` (an RGBA picture stays RGBA).
    pub fn encode_png(&self, chunks: &[(String, String)]) -> Result<Vec<u8>> {
        let text: Vec<(&str, String)> = chunks.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        match self {
            Self::Rgb(i) => crate::output::encode_png(i, &text),
            Self::Rgba(i) => crate::output::encode_png_rgba(i, &text),
        }
    }
}

impl img2img::Upscalable for ExtrasImage {
    fn size(&self) -> (u32, u32) {
        self.dimensions()
    }
    fn lanczos(&self, w: u32, h: u32) -> Self {
        self.resize(w, h, Filter::Lanczos)
    }
}

/// Pillow's `RGBA → RGBa` (`rgbA2rgba`: `c·a/255` rounded by its `MULDIV255`).
fn premultiply(img: &RgbaImage) -> RgbaImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let a = p[3] as u32;
        for c in 0..3 {
            let t = p[c] as u32 * a + 128;
            p[c] = (((t >> 8) + t) >> 8) as u8;
        }
    }
    out
}

/// Pillow's `RGBa → RGBA` (`rgba2rgbA`: `255·c/a` truncated and clipped; alpha 0 and 255 kept).
fn unpremultiply(img: &RgbaImage) -> RgbaImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let a = p[3] as u32;
        if a != 0 && a != 255 {
            for c in 0..3 {
                p[c] = ((255 * p[c] as u32) / a).min(255) as u8;
            }
        }
    }
    out
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

    /// A1111's `Upscaler.upscale(img, scale)`. "Lanczos" and "Nearest" resize as Pillow does
    /// (`do_upscale`: `img.resize((int(w·scale), int(h·scale)))`); a model sees the picture
    /// in RGB (A1111's `pil_image_to_torch_bgr`), so its result has no alpha.
    fn upscale_by(&self, img: &ExtrasImage, scale: f64) -> Result<ExtrasImage> {
        match self {
            Step::Builtin(u) => {
                let filter = if *u == Upscaler::Lanczos { Filter::Lanczos } else { Filter::Nearest };
                let step = |im: &ExtrasImage, s: f64| -> std::result::Result<ExtrasImage, std::convert::Infallible> {
                    let (w, h) = im.dimensions();
                    Ok(im.resize((w as f64 * s) as u32, (h as f64 * s) as u32, filter))
                };
                match img2img::a1111_upscale(img, scale, step) {
                    Ok(i) => Ok(i),
                    Err(never) => match never {},
                }
            }
            Step::Model(m) => Ok(ExtrasImage::Rgb(m.upscale_by(&img.to_rgb(), scale)?)),
        }
    }
}

impl ExtrasSettings {
    /// The checks that need no picture: ranges as A1111's API model has them, and upscalers
    /// that are there (a latent one is not a picture upscaler). With upscaler 1 "None" A1111
    /// looks no further, and neither does this.
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
        if !self.upscales() {
            return Ok(());
        }
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

    /// The checks, and the upscalers resolved and their models loaded once for many pictures.
    /// ESRGAN-family models run on `device`.
    pub fn prepare(&self, library: Option<&Path>, device: &Device) -> Result<PreparedExtras> {
        self.check(library)?;
        let first = Self::resolve(&self.upscaler_1, library, device, "Extras upscaler 1")?;
        let second = match &first {
            Some(_) if self.upscaler_2_visibility > 0.0 => Self::resolve(&self.upscaler_2, library, device, "Extras upscaler 2")?,
            _ => None,
        };
        Ok(PreparedExtras { settings: self.clone(), first, second })
    }

    /// [`PreparedExtras::run`] for one picture.
    pub fn run(&self, image: &ExtrasImage, library: Option<&Path>, device: &Device) -> Result<Postprocessed> {
        self.prepare(library, device)?.run(image)
    }
}

impl ExtrasSettings {
    /// Whether upscaler 1 is one: "None" leaves the picture as it is, and A1111 then looks at
    /// nothing else.
    pub fn upscales(&self) -> bool {
        !matches!(self.upscaler_1.parse::<Upscaler>(), Ok(Upscaler::Resize))
    }
}

/// Settings with their upscalers ready.
pub struct PreparedExtras {
    settings: ExtrasSettings,
    first: Option<Step>,
    second: Option<Step>,
}

impl PreparedExtras {
    /// `image` as A1111's Extras makes it (`ScriptPostprocessingUpscale.process`).
    pub fn run(&self, image: &ExtrasImage) -> Result<Postprocessed> {
        let Some(first) = &self.first else {
            return Ok(Postprocessed { image: image.clone(), info: Vec::new() });
        };
        self.check_size(image.dimensions())?;
        let mut info = Info(Vec::new());
        let mut out = self.upscale(image, &mut info, first)?;
        info.set("Postprocess upscaler", first.name());
        if let Some(second) = &self.second {
            let other = out.in_mode_of(self.upscale(image, &mut info, second)?);
            out = match (&out, &other) {
                (ExtrasImage::Rgb(a), ExtrasImage::Rgb(b)) => ExtrasImage::Rgb(blend(a, b, self.settings.upscaler_2_visibility)?),
                (ExtrasImage::Rgba(a), ExtrasImage::Rgba(b)) => ExtrasImage::Rgba(blend(a, b, self.settings.upscaler_2_visibility)?),
                _ => unreachable!("converted to one mode above"),
            };
            info.set("Postprocess upscaler 2", second.name());
        }
        Ok(Postprocessed { image: out, info: info.0 })
    }

    /// The factor A1111 upscales by and the size it crops to, if it does.
    fn plan(&self, (iw, ih): (u32, u32)) -> (f64, Option<(u32, u32)>) {
        let (iw, ih) = (iw as f64, ih as f64);
        match self.settings.resize {
            ExtrasResize::ScaleTo { width, height, crop } => ((width as f64 / iw).max(height as f64 / ih), crop.then_some((width, height))),
            ExtrasResize::ScaleBy { factor, max_side_length } => {
                if max_side_length != 0 && iw.max(ih) * factor > max_side_length as f64 {
                    let (tw, th) = limit_size_by_one_dimension(iw * factor, ih * factor, max_side_length);
                    ((tw as f64 / iw).max(th as f64 / ih), None)
                } else {
                    (factor, None)
                }
            }
        }
    }

    /// Whether a picture of `dims` can be made: not empty once rounded down to 8 pixels (Pillow
    /// refuses an empty size), and within [`MAX_EXTRAS_SIDE`] (the enlarged picture before a
    /// crop within that many pixels squared).
    pub fn check_size(&self, (w, h): (u32, u32)) -> Result<()> {
        if self.first.is_none() {
            return Ok(());
        }
        if w == 0 || h == 0 {
            return Err(Error::Argument("Extras: the picture is empty".into()));
        }
        let (scale, crop) = self.plan((w, h));
        let (dw, dh) = img2img::a1111_upscaled_size((w, h), scale);
        let max = MAX_EXTRAS_SIDE as u64;
        let too_big = match crop {
            Some(_) => dw as u64 * dh as u64 > max * max,
            None => dw as u64 > max || dh as u64 > max,
        };
        if dw == 0 || dh == 0 || too_big {
            return Err(Error::Argument(format!(
                "Extras: the {w}x{h} picture would become {dw}x{dh} (sides rounded down to 8 pixels): expected sides from 8 to {MAX_EXTRAS_SIDE}"
            )));
        }
        Ok(())
    }

    /// `ScriptPostprocessingUpscale.upscale` with one upscaler.
    fn upscale(&self, image: &ExtrasImage, info: &mut Info, step: &Step) -> Result<ExtrasImage> {
        match self.settings.resize {
            ExtrasResize::ScaleTo { width, height, .. } => info.set("Postprocess upscale to", format!("{width}x{height}")),
            ExtrasResize::ScaleBy { factor, max_side_length } => {
                // Python's `str(float)`, as A1111 writes the API's float.
                let text = if self.settings.factor_as_int && factor.fract() == 0.0 { format!("{factor}") } else { format!("{factor:?}") };
                info.set("Postprocess upscale by", text);
                let (w, h) = image.dimensions();
                if max_side_length != 0 && (w.max(h) as f64) * factor > max_side_length as f64 {
                    info.set("Max side length", max_side_length.to_string());
                }
            }
        }
        let (scale, crop) = self.plan(image.dimensions());
        let up = step.upscale_by(image, scale)?;
        let Some((w, h)) = crop else { return Ok(up) };
        // `Image.new("RGB", size)` and a paste at the centre, in Python's integer division (an
        // RGBA picture's bytes go in as they are, its alpha dropped).
        let up = up.to_rgb();
        let mut canvas = RgbImage::new(w, h);
        image::imageops::replace(&mut canvas, &up, (w / 2) as i64 - (up.width() / 2) as i64, (h / 2) as i64 - (up.height() / 2) as i64);
        info.set("Postprocess crop to", format!("{w}x{h}"));
        Ok(ExtrasImage::Rgb(canvas))
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

/// Pillow's `Image.blend(a, b, alpha)` on 8-bit pictures of one mode and size, every band
/// (alpha too): `a + alpha · (b − a)` in C `float` (the argument narrowed from Python's double),
/// truncated to a byte. Ours because the result must be Pillow's to the level.
pub fn blend<P: image::Pixel<Subpixel = u8>>(a: &ImageBuffer<P, Vec<u8>>, b: &ImageBuffer<P, Vec<u8>>, alpha: f64) -> Result<ImageBuffer<P, Vec<u8>>> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::Argument(format!("Extras: upscaler 1 made {:?} and upscaler 2 {:?}: pictures of two sizes cannot be blended", a.dimensions(), b.dimensions())));
    }
    let al = alpha as f32;
    if al == 0.0 {
        return Ok(a.clone());
    }
    if al == 1.0 {
        return Ok(b.clone());
    }
    let data = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f32 + al * (y as i32 - x as i32) as f32) as u8).collect();
    ImageBuffer::from_raw(a.width(), a.height(), data).ok_or_else(|| Error::Internal("blend: buffer size".into()))
}

/// A decoded picture as A1111's Extras takes it: what Pillow opens (a 16-bit PNG's high byte;
/// a 16-bit grey one as Pillow's "I" mode, clipped to 255 when made RGB), RGB and RGBA kept,
/// every other mode made RGB (an "LA" picture's alpha dropped). A palette PNG with a
/// transparent entry opens as RGBA, as A1111's `fix_png_transparency` makes it.
pub fn extras_picture(img: image::DynamicImage) -> ExtrasImage {
    use image::DynamicImage as D;
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageRgb8(i) => ExtrasImage::Rgb(i),
        D::ImageRgba8(i) => ExtrasImage::Rgba(i),
        D::ImageRgb16(i) => ExtrasImage::Rgb(RgbImage::from_fn(i.width(), i.height(), |x, y| image::Rgb(i.get_pixel(x, y).0.map(hi)))),
        D::ImageRgba16(i) => ExtrasImage::Rgba(RgbaImage::from_fn(i.width(), i.height(), |x, y| image::Rgba(i.get_pixel(x, y).0.map(hi)))),
        D::ImageLuma16(i) => ExtrasImage::Rgb(RgbImage::from_fn(i.width(), i.height(), |x, y| image::Rgb([i.get_pixel(x, y).0[0].min(255) as u8; 3]))),
        D::ImageLumaA16(i) => ExtrasImage::Rgb(RgbImage::from_fn(i.width(), i.height(), |x, y| image::Rgb([hi(i.get_pixel(x, y).0[0]); 3]))),
        other => ExtrasImage::Rgb(other.to_rgb8()),
    }
}

/// A picture file as Extras reads it ([`extras_picture`]) with its text chunks.
pub fn read_extras_input(path: &Path) -> Result<(ExtrasImage, Vec<(String, String)>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_extras_input(&bytes).map_err(|e| match e {
        Error::Argument(m) | Error::Internal(m) => Error::BadFile { path: path.into(), message: m },
        e => e,
    })
}

/// [`read_extras_input`] on bytes (the API's base64 pictures). The text chunks come in the
/// order A1111 keeps them: the file's, `parameters` last (a JPEG's or WebP's from its EXIF
/// comment), as its `read_info_from_image` gives them.
pub fn decode_extras_input(bytes: &[u8]) -> Result<(ExtrasImage, Vec<(String, String)>)> {
    use image::ImageDecoder as _;
    let unreadable = |e: &dyn std::fmt::Display| Error::Argument(format!("not a readable image: {e}"));
    let mut decoder = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| unreadable(&e))?.into_decoder().map_err(|e| unreadable(&e))?;
    // A1111's `images.read` turns the picture upright first (`ImageOps.exif_transpose`).
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| unreadable(&e))?;
    img.apply_orientation(orientation);
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 || w > MAX_EXTRAS_SIDE || h > MAX_EXTRAS_SIDE {
        return Err(Error::Argument(format!("the picture is {w}x{h}: expected sides from 1 to {MAX_EXTRAS_SIDE} pixels")));
    }
    let png = bytes.starts_with(b"\x89PNG");
    // A1111's run_postprocessing: `read_info_from_image`'s items, then its parameters (a PNG's
    // chunk or a JPEG's or WebP's EXIF comment) when not empty.
    let info = super::read_image_info(bytes)?;
    let mut chunks = info.items;
    if let Some(p) = info.parameters.filter(|p| !p.is_empty()) {
        chunks.push(("parameters".into(), p));
    }
    let mut picture = extras_picture(img);
    if png && !png_has_alpha(bytes) {
        // A `tRNS` transparency is no alpha channel to Pillow: its RGB, grey and palette
        // pictures (palette ones with one transparent entry) are made RGB, dropping it.
        picture = ExtrasImage::Rgb(picture.to_rgb());
    }
    Ok((picture, chunks))
}

/// Whether Pillow opens this PNG with an alpha channel that A1111 keeps: an RGBA (or grey and
/// alpha) picture, or a palette whose `tRNS` gives entries other than one fully transparent
/// one (a byte string in Pillow's `info["transparency"]`, which A1111's
/// `fix_png_transparency` makes RGBA; one transparent entry is an int there, left alone).
fn png_has_alpha(bytes: &[u8]) -> bool {
    let Ok(reader) = png::Decoder::new(std::io::Cursor::new(bytes)).read_info() else { return true };
    let info = reader.info();
    match info.color_type {
        png::ColorType::Rgba | png::ColorType::GrayscaleAlpha => true,
        png::ColorType::Indexed => info.trns.as_ref().is_some_and(|t| {
            // Pillow's `_simple_palette`: `^\xff*\x00\xff*$`.
            let simple = t.iter().filter(|&&a| a == 0).count() == 1 && t.iter().all(|&a| a == 0 || a == 255);
            !simple
        }),
        _ => false,
    }
}

/// The chunks an Extras picture is written with, as A1111's dict makes them: the original's,
/// `postprocessing` set (in its place if it was there), and for a saved file `extras` too
/// (`save_image(pnginfo_section_name="extras")`); the API's picture keeps an old `extras`.
pub fn extras_chunks(original: &[(String, String)], infotext: &str, saved: bool) -> Vec<(String, String)> {
    let mut info = Info(original.to_vec());
    info.set("postprocessing", infotext.to_string());
    if saved {
        info.set("extras", infotext.to_string());
    }
    info.0
}

/// A picture for [`extras_to_folder`]. A `listed` one must be readable (A1111's single picture
/// and file batch raise); one found in a folder is skipped when not (its "Batch from
/// Directory" goes on).
#[derive(Debug, Clone)]
pub struct ExtrasSource {
    pub path: std::path::PathBuf,
    pub listed: bool,
}

/// What [`extras_to_folder`] reports as it goes.
#[derive(Debug)]
pub enum ExtrasEvent<'a> {
    Written { from: &'a Path, to: &'a Path, size: (u32, u32), done: &'a Postprocessed },
    Skipped { path: &'a Path, reason: String },
}

/// Extras on picture files, each written atomically into `out` as a PNG named after it
/// (`stem.png`, else `stem-1.png`, …: nothing is overwritten). The upscalers are loaded and
/// every listed picture read and sized before anything is written, so bad input leaves no
/// half-done folder.
pub fn extras_to_folder(sources: &[ExtrasSource], s: &ExtrasSettings, library: Option<&Path>, device: &Device, out: &Path, on_event: &mut dyn FnMut(ExtrasEvent)) -> Result<Vec<std::path::PathBuf>> {
    let prepared = s.prepare(library, device)?;
    let named = |path: &Path, e: Error| match e {
        Error::Argument(m) => Error::BadFile { path: path.into(), message: m },
        e => e,
    };
    // Each listed picture decoded whole (a truncated file passes a header check).
    for src in sources.iter().filter(|s| s.listed) {
        let (img, _) = read_extras_input(&src.path)?;
        prepared.check_size(img.dimensions()).map_err(|e| named(&src.path, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::with_capacity(sources.len());
    for src in sources {
        let f = &src.path;
        // Only a picture that cannot be read is skipped (A1111's `except Exception: continue`
        // around `images.read`); a failure while upscaling stops the run, as there.
        let (img, chunks) = match read_extras_input(f) {
            Ok(v) => v,
            Err(e) if !src.listed => {
                on_event(ExtrasEvent::Skipped { path: f, reason: e.to_string() });
                continue;
            }
            Err(e) => return Err(e),
        };
        let done = prepared.run(&img).map_err(|e| named(f, e))?;
        let size = img.dimensions();
        let png = done.image.encode_png(&extras_chunks(&chunks, &done.infotext(), true))?;
        let stem = f.file_stem().map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
        let path = crate::output::write_new(|i| if i == 0 { out.join(format!("{stem}.png")) } else { out.join(format!("{stem}-{i}.png")) }, &png)?;
        on_event(ExtrasEvent::Written { from: f, to: &path, size, done: &done });
        written.push(path);
    }
    Ok(written)
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
        let p = Postprocessed { image: ExtrasImage::Rgb(RgbImage::new(1, 1)), info: i.0 };
        assert_eq!(p.infotext(), "a: 2, b: \"x, y\"");
        assert_eq!(infotext_html("a <b> & 'c'"), "<p>a &lt;b&gt; &amp; &#x27;c&#x27;</p>");
    }
}
