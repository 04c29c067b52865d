//! Generation parameters in PNG, JPEG and WebP pictures, read and written as A1111 does.
//!
//! A1111 (and Forge, Fooocus, Civitai's downloads) keeps a JPEG's or WebP's infotext in the EXIF
//! `UserComment`, written by piexif with its 8-byte `UNICODE\0` prefix and UTF-16BE text. PNGs
//! carry it in a `parameters` text chunk, unless an `eXIf` chunk has a comment, which wins;
//! NovelAI's PNGs carry a prompt and a JSON comment that A1111 turns into an infotext.
//!
//! What A1111 reads is what Pillow 9.5 and piexif 1.1.3 make of a file, broken ones included, so
//! the walks through PNG chunks, JPEG segments and the EXIF to its comment are written here with
//! their rules (each says why no crate does); decoding pixels and zlib stay the crates'.

use std::io::Cursor;

use image::ImageDecoder as _;

use crate::error::{Error, Result};

/// What A1111's `read_info_from_image` returns for a picture: its infotext, and the picture's
/// other text items (a PNG's other text chunks, in [`super::png_text_list`]'s order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageInfo {
    pub parameters: Option<String>,
    pub items: Vec<(String, String)>,
}

impl ImageInfo {
    /// What A1111's `/sdapi/v1/png-info` answers: `info` (the infotext, or empty), `items` and
    /// `parameters`, the infotext parsed as its `parse_generation_parameters` parses it (prompt,
    /// negative prompt, each `Key: value`, a `WxH` value as `Key-1` and `Key-2` instead), less
    /// the defaults it fills in and the Lora extension's renames; see
    /// [`super::parse_generation_parameters`]). Keys keep the picture's and A1111's order.
    pub fn png_info(&self, ctx: &super::PasteContext) -> Result<PngInfo> {
        let info = self.parameters.clone().unwrap_or_default();
        let parameters = super::parse_generation_parameters(&info, ctx)?;
        Ok(PngInfo { info, items: self.items.clone(), parameters })
    }
}

/// The answer of `/sdapi/v1/png-info` (and of `loramix info --json`), in A1111's key order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PngInfo {
    pub info: String,
    #[serde(serialize_with = "in_order")]
    pub items: Vec<(String, String)>,
    pub parameters: super::GenerationParameters,
}

fn in_order<S: serde::Serializer>(items: &[(String, String)], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(items.iter().map(|(k, v)| (k, v)))
}

/// Reads [`ImageInfo`] from PNG, JPEG or WebP bytes; other formats carry none. Unreadable EXIF
/// counts as no comment, where A1111 would fail on some of it.
pub fn read_image_info(bytes: &[u8]) -> Result<ImageInfo> {
    let format = image::guess_format(bytes).map_err(|_| Error::Argument("not a PNG, JPEG or WebP picture (its first bytes are no known image format)".into()))?;
    let unreadable = |e: image::ImageError| Error::Argument(format!("not a readable {format:?} picture: {e}"));
    let (mut items, exif) = match format {
        image::ImageFormat::Png => png_info_entries(bytes)?,
        image::ImageFormat::Jpeg => jpeg_info_entries(bytes),
        image::ImageFormat::WebP => (vec![], image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(unreadable)?.exif_metadata().map_err(unreadable)?),
        _ => (vec![], None),
    };
    let mut parameters = items.iter().position(|(k, _)| k == "parameters").map(|i| items.remove(i).1);
    if let Some(exif) = exif {
        // A1111: a non-empty comment replaces the `parameters` chunk.
        let comment = exif_user_comment(&exif).map(|raw| user_comment_text(&raw)).unwrap_or_default();
        if !comment.is_empty() {
            parameters = Some(comment);
        }
    } else if let Some((_, comment)) = items.iter().find(|(k, _)| k == "comment") {
        // A1111's branch "for gif": a `comment` (a JPEG's COM segment, a PNG text chunk so
        // named) is the infotext when there is no EXIF at all.
        parameters = Some(comment.clone());
    }
    // A1111's IGNORED_INFO_KEYS hold Pillow's own info entries; as PNG text chunks they are
    // dropped too.
    const IGNORED: [&str; 15] = ["jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"];
    items.retain(|(k, _)| !IGNORED.contains(&k.as_str()));
    if items.iter().any(|(k, v)| k == "Software" && v == "NovelAI") {
        if let Some(text) = novelai_infotext(&items, bytes) {
            parameters = Some(text);
        }
    }
    Ok(ImageInfo { parameters, items })
}

/// A1111's reading of a NovelAI PNG (`Software: NovelAI`): its `Description` is the prompt and
/// its `Comment` JSON the rest, written as an infotext with NovelAI's fixed `Clip skip: 2, ENSD:
/// 31337`. `None` where A1111's conversion raises (it then keeps what it had).
fn novelai_infotext(items: &[(String, String)], bytes: &[u8]) -> Option<String> {
    let get = |key: &str| items.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let json: serde_json::Value = serde_json::from_str(get("Comment")?).ok()?;
    let field = |key: &str| json.get(key).and_then(python_str);
    // `sd_samplers.samplers_map.get(json_info["sampler"], "Euler a")`: a key error on a
    // missing sampler, a non-string one is no key.
    let sampler = match json.get("sampler")? {
        // A list or an object is no dict key in Python (a TypeError there).
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => return None,
        s => s.as_str().and_then(|s| A1111_SAMPLERS_MAP.iter().find(|(k, _)| *k == s)).map_or("Euler a", |(_, name)| name),
    };
    let (width, height) = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()?;
    Some(format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {width}x{height}, Clip skip: 2, ENSD: 31337",
        get("Description")?,
        field("uc")?,
        field("steps")?,
        field("scale")?,
        field("seed")?
    ))
}

/// A1111 1.10's `sd_samplers.samplers_map`: every sampler's name in lower case and its aliases
/// (`sd_samplers_kdiffusion`, `sd_samplers_timesteps`, `sd_samplers_lcm`), to its name.
const A1111_SAMPLERS_MAP: &[(&str, &str)] = &[
    ("dpm++ 2m", "DPM++ 2M"), ("k_dpmpp_2m", "DPM++ 2M"),
    ("dpm++ sde", "DPM++ SDE"), ("k_dpmpp_sde", "DPM++ SDE"),
    ("dpm++ 2m sde", "DPM++ 2M SDE"), ("k_dpmpp_2m_sde", "DPM++ 2M SDE"),
    ("dpm++ 2m sde heun", "DPM++ 2M SDE Heun"), ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"),
    ("dpm++ 2s a", "DPM++ 2S a"), ("k_dpmpp_2s_a", "DPM++ 2S a"),
    ("dpm++ 3m sde", "DPM++ 3M SDE"), ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
    ("euler a", "Euler a"), ("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"),
    ("euler", "Euler"), ("k_euler", "Euler"),
    ("lms", "LMS"), ("k_lms", "LMS"),
    ("heun", "Heun"), ("k_heun", "Heun"),
    ("dpm2", "DPM2"), ("k_dpm_2", "DPM2"),
    ("dpm2 a", "DPM2 a"), ("k_dpm_2_a", "DPM2 a"),
    ("dpm fast", "DPM fast"), ("k_dpm_fast", "DPM fast"),
    ("dpm adaptive", "DPM adaptive"), ("k_dpm_ad", "DPM adaptive"),
    ("restart", "Restart"),
    ("ddim", "DDIM"),
    ("ddim cfg++", "DDIM CFG++"), ("ddim_cfgpp", "DDIM CFG++"),
    ("plms", "PLMS"),
    ("unipc", "UniPC"),
    ("lcm", "LCM"), ("k_lcm", "LCM"),
];

/// A JSON scalar as Python's `str()` prints what `json.loads` made of it (an f-string field).
/// Lists and objects (Python's repr of them) are not rendered: `None`.
fn python_str(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value as J;
    match v {
        J::String(s) => Some(s.clone()),
        J::Bool(b) => Some(if *b { "True" } else { "False" }.into()),
        J::Null => Some("None".into()),
        J::Number(n) if n.is_f64() => n.as_f64().map(python_float_repr),
        J::Number(n) => Some(n.to_string()),
        J::Array(_) | J::Object(_) => None,
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip (as Rust's), positional from
/// 1e-4 up to 1e16 with at least one decimal, else `d.ddde±XX`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits.clone() };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// What Pillow 9.5 puts in a PNG's `info`, in its order: each text chunk (tEXt, zTXt, iTXt) as
/// it decodes them, in file order, those after the image data too (A1111 reads a loaded
/// picture), a key given twice keeping its first place and its last value; and its `exif`, the
/// last `eXIf` chunk (with Pillow's `Exif\0\0` header) or `exif`-named tEXt chunk.
///
/// Ours, because the `png` crate keeps each chunk kind in its own list and stops at the image
/// data: only the chunk framing and Pillow's decoding rules are written here; zlib is flate2's.
pub(crate) fn png_info_entries(bytes: &[u8]) -> Result<(Vec<(String, String)>, Option<Vec<u8>>)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    let mut rest = bytes.strip_prefix(SIGNATURE).ok_or_else(|| Error::Argument("not a PNG: no PNG signature".into()))?;
    let latin1 = |b: &[u8]| -> String { b.iter().map(|&c| c as char).collect() };
    let split_nul = |b: &'_ [u8]| -> Option<(Vec<u8>, Vec<u8>)> { b.iter().position(|&c| c == 0).map(|i| (b[..i].to_vec(), b[i + 1..].to_vec())) };
    let mut items: Vec<(String, String)> = vec![];
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut exif = None;
    // Pillow's `check_text_memory`: past 64 MiB of decoded text the picture is refused.
    let mut text_memory = 0usize;
    let mut put = |k: String, v: String| -> Result<()> {
        text_memory += v.len();
        if text_memory > 64 << 20 {
            return Err(Error::Argument("the PNG's text chunks hold over 64 MiB of text (Pillow refuses it too)".into()));
        }
        match index.get(&k) {
            Some(&i) => items[i].1 = v,
            None => {
                index.insert(k.clone(), items.len());
                items.push((k, v));
            }
        }
        Ok(())
    };
    let too_large = || Error::Argument("a PNG text chunk over 1 MiB uncompressed (Pillow refuses it too)".into());
    while rest.len() >= 8 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind: [u8; 4] = [rest[4], rest[5], rest[6], rest[7]];
        let Some(end) = len.checked_add(8) else { break };
        let Some(data) = rest.get(8..end) else { break };
        rest = rest.get(end.saturating_add(4)..).unwrap_or_default();
        match &kind {
            b"IEND" => break,
            b"tEXt" => {
                let (k, v) = split_nul(data).unwrap_or((data.to_vec(), vec![]));
                if k == b"exif" {
                    exif = Some(v.clone());
                }
                if !k.is_empty() {
                    put(latin1(&k), latin1(&v))?;
                }
            }
            b"zTXt" => {
                let (k, v) = split_nul(data).unwrap_or((data.to_vec(), vec![]));
                // Pillow refuses a method other than 0 (deflate); an undecodable stream is empty.
                if v.first().is_some_and(|&m| m != 0) {
                    continue;
                }
                let text = match inflate_text(v.get(1..).unwrap_or_default()) {
                    Inflated::Text(t) => t,
                    Inflated::Corrupt => vec![],
                    Inflated::TooLarge => return Err(too_large()),
                };
                if !k.is_empty() {
                    if k == b"exif" {
                        // Pillow keeps this `exif` as text, which piexif cannot read: EXIF
                        // present, no comment.
                        exif = Some(vec![]);
                    }
                    put(latin1(&k), latin1(&text))?;
                }
            }
            b"iTXt" => {
                let Some((k, r)) = split_nul(data) else { continue };
                let (Some(&flag), Some(&method)) = (r.first(), r.get(1)) else { continue };
                let Some((lang, r)) = split_nul(&r[2..]) else { continue };
                let Some((translated, v)) = split_nul(&r) else { continue };
                let v = match (flag, method) {
                    (0, _) => v,
                    (_, 0) => match inflate_text(&v) {
                        Inflated::Text(v) => v,
                        Inflated::Corrupt => continue,
                        Inflated::TooLarge => return Err(too_large()),
                    },
                    _ => continue,
                };
                // Every part must be UTF-8, or Pillow drops the chunk.
                if let (Ok(_), Ok(_), Ok(v)) = (std::str::from_utf8(&lang), std::str::from_utf8(&translated), String::from_utf8(v)) {
                    if k == b"exif" {
                        exif = Some(vec![]);
                    }
                    put(latin1(&k), v)?;
                }
            }
            b"eXIf" => exif = Some([b"Exif\0\0".as_slice(), data].concat()),
            _ => {}
        }
    }
    Ok((items, exif))
}

enum Inflated {
    Text(Vec<u8>),
    /// Not a zlib stream (Python's `zlib.error`).
    Corrupt,
    /// Over Pillow's 1 MiB (its `ValueError`, which fails the whole picture).
    TooLarge,
}

/// A zlib stream as Pillow's `_safe_zlib_decompress` takes it: a stream cut short gives what it
/// holds (Python's `decompressobj` does not complain), up to the 1 MiB limit.
fn inflate_text(compressed: &[u8]) -> Inflated {
    const LIMIT: usize = 1 << 20;
    let mut z = flate2::Decompress::new(true);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).min(LIMIT + 1));
    loop {
        if out.len() == out.capacity() {
            if out.len() > LIMIT {
                return Inflated::TooLarge;
            }
            // Doubling, to one byte past the limit at most (out.len() <= LIMIT here).
            out.reserve(out.len().max(1024).min(LIMIT + 1 - out.len()));
        }
        let before = (z.total_in(), z.total_out());
        let input = &compressed[(z.total_in() as usize).min(compressed.len())..];
        match z.decompress_vec(input, &mut out, flate2::FlushDecompress::None) {
            Ok(flate2::Status::StreamEnd) => break,
            Ok(_) if (z.total_in(), z.total_out()) == before && out.len() < out.capacity() => break, // input used up
            Ok(_) => {}
            Err(_) => return Inflated::Corrupt,
        }
    }
    if out.len() > LIMIT {
        return Inflated::TooLarge;
    }
    Inflated::Text(out)
}

/// What Pillow 9.5's JPEG reader puts in `info` that A1111 reads: the first APP1 segment that
/// starts `Exif\0` (later ones are ignored) and the last COM segment, as `comment` (UTF-8,
/// bad bytes dropped, as A1111 decodes it). Ours, because the `image` crate's JPEG decoder keeps
/// the last EXIF segment, wants `Exif\0\0` and skips comments: only the marker walk up to the
/// scan is written here.
fn jpeg_info_entries(bytes: &[u8]) -> (Vec<(String, String)>, Option<Vec<u8>>) {
    let (mut exif, mut comment) = (None, None);
    jpeg_segments(bytes, &mut |marker, data| match marker {
        0xE1 if exif.is_none() && data.starts_with(b"Exif\0") => exif = Some(data.to_vec()),
        0xFE => comment = Some(utf8_dropping_bad_bytes(data)),
        _ => {}
    });
    (comment.map(|c| ("comment".to_string(), c)).into_iter().collect(), exif)
}

/// Each marker segment of a JPEG before its first scan, as Pillow's reader walks them.
fn jpeg_segments(bytes: &[u8], on_segment: &mut dyn FnMut(u8, &[u8])) {
    let mut at = 2; // after SOI
    while at + 1 < bytes.len() {
        if bytes[at] != 0xFF {
            at += 1; // junk between segments, as Pillow skips it
            continue;
        }
        let marker = bytes[at + 1];
        at += 2;
        match marker {
            0xFF => at -= 1,                          // fill byte
            // No length in Pillow's marker table.
            0x00 | 0x01 | 0xC8 | 0xD0..=0xD9 | 0xF0..=0xFD => {}
            0xDA => return,                           // start of scan: no more metadata
            _ => {
                let (Some(&hi), Some(&lo)) = (bytes.get(at), bytes.get(at + 1)) else { return };
                let len = (u16::from_be_bytes([hi, lo]) as usize).max(2);
                let Some(data) = bytes.get(at + 2..at + len) else { return };
                on_segment(marker, data);
                at += len;
            }
        }
    }
}

/// The raw `UserComment` of EXIF data as piexif's `load` takes it: a TIFF structure (`II` or
/// `MM`), or one after a 6-byte `Exif` header (JPEG's APP1, some WebP chunks, Pillow's PNG
/// `exif`); anything else is no EXIF to piexif.
fn exif_user_comment(exif: &[u8]) -> Option<Vec<u8>> {
    let tiff = if exif.starts_with(b"II") || exif.starts_with(b"MM") {
        exif
    } else if exif.starts_with(b"Exif") {
        exif.get(6..)?
    } else {
        return None;
    };
    piexif_user_comment(tiff)
}

/// piexif's own path to the comment, with its Python slicing: IFD0 at the offset in bytes 4..8
/// (`II` little-endian, anything else big-endian, the magic number unchecked), its ExifTag as the
/// Exif IFD's offset, that IFD's UserComment (the last entry of each tag wins, as in its dict),
/// a value past the end of the data cut where the data ends. Ours, because a TIFF reader that
/// checks the structure (such as kamadak-exif) refuses files piexif reads, and drops an ASCII
/// value's last byte differently. Where piexif raises (a cut entry table), nothing is read.
fn piexif_user_comment(tiff: &[u8]) -> Option<Vec<u8>> {
    let le = tiff.starts_with(b"II");
    let u16_at = |at: usize| tiff.get(at..at.checked_add(2)?).map(|b| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) });
    let u32_of = |b: &[u8]| if le { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) } else { u32::from_be_bytes([b[0], b[1], b[2], b[3]]) };
    // Python's `data[start:end]`: clamped, never out of range.
    let slice = |start: usize, end: usize| -> Vec<u8> { tiff.get(start.min(tiff.len())..end.clamp(start.min(tiff.len()), tiff.len())).unwrap_or_default().to_vec() };
    // The last (type, count, value field) of `tag` in the IFD at `at`.
    let find = |at: usize, tag: u16| -> Option<(u16, u32, [u8; 4])> {
        let count = u16_at(at)? as usize;
        let mut found = None;
        for x in 0..count {
            let p = at.checked_add(2 + 12 * x)?;
            let entry = tiff.get(p..p.checked_add(12)?)?;
            if u16_at(p)? == tag {
                found = Some((u16_at(p + 2)?, u32_of(&entry[4..8]), [entry[8], entry[9], entry[10], entry[11]]));
            }
        }
        found
    };
    let ifd0 = u32_of(tiff.get(4..8)?) as usize;
    let exif_ifd = match find(ifd0, 0x8769)? {
        (4, 1, v) => u32_of(&v) as usize,                                              // LONG
        (3, 1, v) => (if le { u16::from_le_bytes([v[0], v[1]]) } else { u16::from_be_bytes([v[0], v[1]]) }) as usize, // SHORT
        _ => return None,
    };
    let (kind, count, value) = find(exif_ifd, 0x9286)?;
    let count = count as usize;
    let pointer = u32_of(&value) as usize;
    match kind {
        // UNDEFINED, and BYTE (a tuple to piexif, on which A1111 fails; read as bytes here).
        1 | 7 if count > 4 => Some(slice(pointer, pointer.saturating_add(count))),
        1 | 7 => Some(value[..count].to_vec()),
        // ASCII: one byte short of the count, as Python's `[:length - 1]` (`[0:-1]` for 0).
        2 if count > 4 => Some(slice(pointer, pointer.saturating_add(count - 1))),
        2 => Some(value[..if count == 0 { 3 } else { count - 1 }].to_vec()),
        _ => None,
    }
}

/// A `UserComment` as text: piexif's `UserComment.load` (its 8-byte prefix names ASCII,
/// UTF-16BE or JIS, bad sequences replaced), and where that fails (no known prefix, under 8
/// bytes, all-zero prefix) A1111's fallback, the whole value as UTF-8 with bad bytes dropped.
pub fn user_comment_text(raw: &[u8]) -> String {
    if raw.len() >= 8 {
        let (prefix, body) = raw.split_at(8);
        match prefix {
            b"UNICODE\0" => {
                let units: Vec<u16> = body.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
                let mut out: String = char::decode_utf16(units.iter().copied()).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect();
                // Python's utf_16_be: an odd trailing byte is one more U+FFFD, except after a
                // lone high surrogate, whose error takes the byte in.
                if body.len() % 2 == 1 && !units.last().is_some_and(|u| (0xD800..0xDC00).contains(u)) {
                    out.push(char::REPLACEMENT_CHARACTER);
                }
                return out;
            }
            // Python's `ascii` codec with errors="replace": each byte over 127 is one U+FFFD.
            b"ASCII\0\0\0" => return body.iter().map(|&b| if b < 128 { b as char } else { char::REPLACEMENT_CHARACTER }).collect(),
            b"JIS\0\0\0\0\0" => return shift_jis_lossy(body),
            _ => {}
        }
    }
    utf8_dropping_bad_bytes(raw)
}

/// Shift_JIS as far as it is not a table: ASCII and half-width katakana as Python's
/// `shift_jis` decodes them, each two-byte character (kanji, kana) as one U+FFFD. No crate
/// here has Python's JIS X 0208 table (encoding_rs decodes Windows-31J, which differs).
fn shift_jis_lossy(body: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            0x00..=0x7F => out.push(b as char),
            0xA1..=0xDF => out.push(char::from_u32(0xFF61 + (b - 0xA1) as u32).unwrap_or(char::REPLACEMENT_CHARACTER)),
            // Python's lead bytes (JIS X 0208 rows) with a trail byte in range.
            0x81..=0x9F | 0xE0..=0xEA if body.get(i + 1).is_some_and(|t| matches!(t, 0x40..=0x7E | 0x80..=0xFC)) => {
                out.push(char::REPLACEMENT_CHARACTER);
                i += 1;
            }
            _ => out.push(char::REPLACEMENT_CHARACTER),
        }
        i += 1;
    }
    out
}

/// Python's `bytes.decode("utf8", errors="ignore")`.
fn utf8_dropping_bad_bytes(mut raw: &[u8]) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(raw) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, rest) = raw.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                raw = &rest[e.error_len().unwrap_or(rest.len())..];
            }
        }
    }
}

/// EXIF (a big-endian TIFF, without the `Exif\0\0` header) holding only `text` as a
/// `UserComment`, byte for byte what A1111 writes into its JPEG and WebP pictures:
/// `piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})`. Ours,
/// because that exact layout is piexif's (its Exif IFD has no next-IFD offset, which a TIFF
/// writer such as kamadak-exif's adds), and it sets how long a JPEG's parameters may be.
pub fn user_comment_exif(text: &str) -> Vec<u8> {
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    const EXIF_IFD: u32 = 8 + 2 + 12 + 4;
    let mut tiff = b"MM\0\x2a".to_vec();
    tiff.extend(8u32.to_be_bytes());
    // IFD0: one entry, ExifTag (LONG, 1) pointing at the Exif IFD; no next IFD.
    tiff.extend(1u16.to_be_bytes());
    tiff.extend([0x87u8, 0x69, 0, 4, 0, 0, 0, 1]);
    tiff.extend(EXIF_IFD.to_be_bytes());
    tiff.extend(0u32.to_be_bytes());
    // The Exif IFD: one entry, UserComment (UNDEFINED), its value right after the entry.
    tiff.extend(1u16.to_be_bytes());
    tiff.extend([0x92u8, 0x86, 0, 7]);
    tiff.extend((comment.len() as u32).to_be_bytes());
    tiff.extend((EXIF_IFD + 2 + 12).to_be_bytes());
    tiff.extend(comment);
    tiff
}

/// A1111's `samples_format`: the file type generated pictures are saved (or sent) as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplesFormat {
    #[default]
    Png,
    /// With A1111's `jpeg_quality` (1 to 100; its default 80). `jpeg_suffix`: named `.jpeg`, as
    /// A1111 names a file by the format's name as given (`jpeg`), instead of `.jpg`.
    Jpeg { quality: u8, jpeg_suffix: bool },
    /// Always lossless: the `image` crate has no lossy WebP encoder (A1111's default is lossy,
    /// quality 80; its `webp_lossless` option gives this).
    Webp,
}

impl SamplesFormat {
    pub const DEFAULT_JPEG_QUALITY: u8 = 80;

    /// A1111's names (`png`, `jpg`, `jpeg`, `webp`, any case), JPEG at `quality`.
    pub fn parse(name: &str, quality: u8) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            n @ ("jpg" | "jpeg") if (1..=100).contains(&quality) => Ok(Self::Jpeg { quality, jpeg_suffix: n == "jpeg" }),
            "jpg" | "jpeg" => Err(Error::Argument(format!("JPEG quality {quality}: expected 1 to 100"))),
            "webp" => Ok(Self::Webp),
            _ => Err(Error::Argument(format!("samples format {name:?}: expected png, jpg, jpeg or webp"))),
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg { jpeg_suffix: true, .. } => "jpeg",
            Self::Jpeg { .. } => "jpg",
            Self::Webp => "webp",
        }
    }

    /// Why a picture of this size with these parameters cannot be written in this format, if it
    /// cannot: a JPEG side over 65535 or a WebP side over 16383 (A1111 saves PNG then), or
    /// parameters over what one JPEG segment holds (about 32,700 UTF-16 units; A1111 fails
    /// there, and a longer segment would be a corrupt file).
    pub fn unfit(self, width: u32, height: u32, parameters: &str) -> Option<String> {
        match self {
            Self::Png => None,
            Self::Jpeg { .. } if width.max(height) > 65535 => Some(format!("a {width}x{height} picture is too large for a JPEG (65535 pixels a side)")),
            // "Exif\0\0", piexif's TIFF (header, two one-entry IFDs) and the comment's prefix:
            // at most 32,739 UTF-16 units, as in A1111.
            Self::Jpeg { .. } if 6 + 48 + 2 * parameters.encode_utf16().count() > 65533 => {
                Some(format!("its parameters ({} UTF-16 units) are too long for a JPEG's EXIF (at most 32,739)", parameters.encode_utf16().count()))
            }
            Self::Webp if width.max(height) > 16383 => Some(format!("a {width}x{height} picture is too large for a WebP (16383 pixels a side)")),
            _ => None,
        }
    }

    /// This format, or PNG where [`Self::unfit`] says why not (with that reason).
    pub fn or_png(self, width: u32, height: u32, parameters: &str) -> (Self, Option<String>) {
        match self.unfit(width, height, parameters) {
            Some(why) => (Self::Png, Some(format!("{why}: written as PNG"))),
            None => (self, None),
        }
    }

    /// The picture in this format, as A1111 saves it: a PNG keeps every text chunk; a JPEG or
    /// WebP keeps only `parameters`, as its EXIF UserComment (written even when empty, as the
    /// API's `encode_pil_to_base64` does).
    pub fn encode(self, img: &image::RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
        let parameters = text.iter().find(|(k, _)| *k == "parameters").map_or("", |(_, v)| v.as_str());
        if let Some(why) = self.unfit(img.width(), img.height(), parameters) {
            return Err(Error::Argument(format!("cannot write a {}: {why}", self.extension())));
        }
        fn with_exif(mut enc: impl image::ImageEncoder, exif: Vec<u8>, img: &image::RgbImage) -> image::ImageResult<()> {
            enc.set_exif_metadata(exif).map_err(image::ImageError::Unsupported)?;
            enc.write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        }
        let mut out = Vec::new();
        let written = match self {
            Self::Png => return crate::output::encode_png(img, text),
            Self::Jpeg { quality, .. } => with_exif(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality), user_comment_exif(parameters), img),
            Self::Webp => with_exif(image::codecs::webp::WebPEncoder::new_lossless(&mut out), user_comment_exif(parameters), img),
        };
        written.map_err(|e| Error::Internal(format!("encoding a {} picture: {e}", self.extension())))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        for (x, want) in [(5.0, "5.0"), (7.5, "7.5"), (0.1, "0.1"), (1e-4, "0.0001"), (1e-5, "1e-05"), (123456789012345.6, "123456789012345.6"), (1e16, "1e+16"), (1.5e16, "1.5e+16"), (-2.25e-7, "-2.25e-07"), (1234.0, "1234.0"), (0.000123, "0.000123")] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn bad_utf8_bytes_are_dropped() {
        assert_eq!(utf8_dropping_bad_bytes(b"a\xffb\xc3\xa9\xe2\x82"), "abé");
        assert_eq!(user_comment_text(b"abc"), "abc");
        assert_eq!(user_comment_text(b"UNICODE\0\0a\0"), "a\u{fffd}");
        // A lone high surrogate and an odd byte are one error to Python.
        assert_eq!(user_comment_text(b"UNICODE\0\xd8\x00A"), "\u{fffd}");
        assert_eq!(user_comment_text(b"UNICODE\0\xd8\x00\x00A\xdc"), "\u{fffd}A\u{fffd}");
        // Shift_JIS: ASCII and half-width kana as Python reads them, a kanji as one U+FFFD.
        assert_eq!(user_comment_text(b"JIS\0\0\0\0\0\x94\x4c\xb1Steps: 2"), "\u{fffd}\u{ff71}Steps: 2");
    }

    fn goldens() -> (std::path::PathBuf, serde_json::Value) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_info");
        let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        (dir, expected)
    }

    /// Every picture of tools/parity/make_image_info_fixtures.py reads as A1111's
    /// `read_info_from_image` reads it under Pillow 9.5.0 and piexif 1.1.3.
    #[test]
    fn reads_what_a1111_reads() {
        let (dir, expected) = goldens();
        let read = expected["read"].as_object().unwrap();
        assert!(read.len() >= 44);
        for (name, want) in read {
            let got = read_image_info(&std::fs::read(dir.join(name)).unwrap()).unwrap();
            assert_eq!(got.parameters.as_deref(), want["info"].as_str(), "{name}");
            let items: Vec<(String, String)> = want["items"].as_array().unwrap().iter().map(|kv| (kv[0].as_str().unwrap().to_string(), kv[1].as_str().unwrap().to_string())).collect();
            assert_eq!(got.items, items, "{name}");
        }
    }

    /// Pillow's limits: one text chunk over 1 MiB uncompressed, or over 64 MiB of text in all,
    /// and the picture is refused (A1111 fails on it too), whatever the file's own size.
    #[test]
    fn text_bombs_are_refused() {
        use std::io::Write as _;
        let chunk = |kind: &[u8], data: &[u8]| [&(data.len() as u32).to_be_bytes()[..], kind, data, &[0; 4]].concat();
        let ztxt = |key: &str, size: usize| {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            z.write_all(&vec![b'a'; size]).unwrap();
            chunk(b"zTXt", &[key.as_bytes(), b"\0\0", &z.finish().unwrap()].concat())
        };
        let png = |chunks: Vec<Vec<u8>>| [b"\x89PNG\r\n\x1a\n".to_vec(), chunks.concat(), chunk(b"IEND", b"")].concat();
        let one_mib = read_image_info(&png(vec![ztxt("parameters", 1 << 20)])).unwrap();
        assert_eq!(one_mib.parameters.map(|p| p.len()), Some(1 << 20));
        let err = read_image_info(&png(vec![ztxt("parameters", (1 << 20) + 1)])).unwrap_err().to_string();
        assert!(err.contains("over 1 MiB"), "{err}");
        let many = png((0..65).map(|i| ztxt(&format!("k{i}"), 1 << 20)).collect());
        assert!(many.len() < 200_000, "a small file: {}", many.len());
        let err = read_image_info(&many).unwrap_err().to_string();
        assert!(err.contains("64 MiB"), "{err}");
        // Many keys, each given twice: the first place, the last value.
        let texts = png((0..20_000).flat_map(|i| [chunk(b"tEXt", format!("k{}\0first", i % 10_000).as_bytes())]).chain([chunk(b"tEXt", b"k3\0last")]).collect());
        let info = read_image_info(&texts).unwrap();
        assert_eq!(info.items.len(), 10_000);
        assert_eq!(info.items[3], ("k3".to_string(), "last".to_string()));
    }

    /// Every golden picture cut short at every length, and with bytes overwritten at many
    /// places, reads as Ok or a clean error: the walkers never panic on hostile files.
    #[test]
    fn damaged_pictures_never_panic() {
        let (dir, expected) = goldens();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for name in expected["read"].as_object().unwrap().keys() {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            for cut in 0..bytes.len().min(600) {
                let _ = read_image_info(&bytes[..cut]);
            }
            for _ in 0..200 {
                let mut damaged = bytes.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % damaged.len();
                    damaged[at] = [0x00, 0xFF, 0x7F, 0x80, next() as u8][(next() % 5) as usize];
                }
                let _ = read_image_info(&damaged);
            }
        }
    }

    /// Our EXIF is piexif's `dump`, byte for byte.
    #[test]
    fn writes_the_comment_a1111_writes() {
        let (_, expected) = goldens();
        for (text, hex) in expected["dumps"].as_object().unwrap() {
            let theirs: Vec<u8> = (0..hex.as_str().unwrap().len()).step_by(2).map(|i| u8::from_str_radix(&hex.as_str().unwrap()[i..i + 2], 16).unwrap()).collect();
            let ours = user_comment_exif(text);
            assert_eq!(ours, theirs[6..], "{text:?}: piexif.dump's bytes after its Exif header");
            assert_eq!(user_comment_text(&exif_user_comment(&ours).unwrap()), *text);
        }
    }

    /// A JPEG or WebP we write reads back with its parameters (and only those), its pixels
    /// intact where lossless.
    #[test]
    fn samples_formats_keep_their_parameters() {
        let img = image::RgbImage::from_fn(19, 7, |x, y| image::Rgb([(x * 13) as u8, (y * 31) as u8, ((x + y) * 7) as u8]));
        let text = [("parameters", "a cat \u{e9}\u{1F600}\nSteps: 2, Seed: 3".to_string()), ("loramix", "{}".to_string())];
        for format in [SamplesFormat::Png, SamplesFormat::Jpeg { quality: 80, jpeg_suffix: false }, SamplesFormat::Webp] {
            let bytes = format.encode(&img, &text).unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap().extensions_str()[0].replace("jpeg", "jpg"), format.extension());
            let info = read_image_info(&bytes).unwrap();
            assert_eq!(info.parameters.as_deref(), Some(text[0].1.as_str()), "{format:?}");
            let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (19, 7));
            if !matches!(format, SamplesFormat::Jpeg { .. }) {
                assert_eq!(decoded, img, "{format:?}");
            }
        }
        assert!(SamplesFormat::parse("JPG", 0).unwrap_err().to_string().contains("1 to 100"));
        assert!(SamplesFormat::parse("gif", 80).unwrap_err().to_string().contains("png, jpg, jpeg or webp"));
        assert_eq!(SamplesFormat::parse("JPEG", 95).unwrap(), SamplesFormat::Jpeg { quality: 95, jpeg_suffix: true });
        assert_eq!(SamplesFormat::parse("jpeg", 95).unwrap().extension(), "jpeg");
        assert_eq!(SamplesFormat::parse("Jpg", 95).unwrap().extension(), "jpg");
        // The longest comment one JPEG segment holds is written and read back; one more
        // UTF-16 unit is refused (never a wrapped segment length), and PNG is offered instead.
        let jpeg = SamplesFormat::Jpeg { quality: 80, jpeg_suffix: false };
        let longest = "x".repeat((65533 - 54) / 2);
        let bytes = jpeg.encode(&img, &[("parameters", longest.clone())]).unwrap();
        assert_eq!(read_image_info(&bytes).unwrap().parameters.as_deref(), Some(longest.as_str()));
        let over = format!("{longest}\u{1F600}");
        assert!(jpeg.encode(&img, &[("parameters", over.clone())]).unwrap_err().to_string().contains("too long for a JPEG"));
        assert_eq!(jpeg.or_png(19, 7, &over).0, SamplesFormat::Png);
        assert_eq!(SamplesFormat::Webp.or_png(16384, 7, "").0, SamplesFormat::Png);
        assert_eq!(SamplesFormat::Webp.or_png(16383, 7, &over), (SamplesFormat::Webp, None));
    }
}
