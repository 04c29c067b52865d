//! Export of a selection of images to a folder or a zip, named by a file-name template.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::metadata::settings_from_image;
use super::settings::Settings;
use crate::error::{Error, Result};
use crate::output;

/// Fills a file-name template for an exported image: `{seed}`, `{index}` (position in the
/// export), `{prompt}` (first words, file-name safe), `{model}`, `{steps}`, `{sampler}`, `{cfg}`,
/// `{width}`, `{height}`, `{stem}` (the original file name).
pub fn fill_template(template: &str, index: usize, original: &Path, settings: Option<&Settings>, seed: Option<u64>) -> String {
    let safe = |s: &str| -> String {
        let cleaned: String = s.chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let mut out = String::new();
        for part in cleaned.split('_').filter(|p| !p.is_empty()) {
            if !out.is_empty() {
                out.push('_');
            }
            out.push_str(part);
        }
        out.chars().take(60).collect()
    };
    let stem = original.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
    let mut out = template.to_string();
    let mut put = |k: &str, v: String| out = out.replace(&format!("{{{k}}}"), &v);
    put("index", format!("{index:05}"));
    put("stem", safe(&stem));
    put("seed", seed.map(|s| s.to_string()).unwrap_or_default());
    if let Some(s) = settings {
        put("prompt", safe(&s.prompt));
        put("model", safe(Path::new(&s.model).file_name().and_then(|n| n.to_str()).unwrap_or(&s.model)));
        put("steps", s.steps.to_string());
        put("sampler", safe(&s.sampler));
        put("cfg", s.cfg.to_string());
        put("width", s.width.to_string());
        put("height", s.height.to_string());
    }
    let name = safe(&out.replace(['{', '}'], ""));
    if name.is_empty() {
        format!("{index:05}")
    } else {
        name
    }
}

/// Exports PNGs to a folder (one atomic write each) or to one zip (written to a temporary file
/// and renamed), named by `template`. Returns what was written.
pub fn export(images: &[PathBuf], dest: &Path, template: &str, as_zip: bool) -> Result<Vec<PathBuf>> {
    if images.is_empty() {
        return Err(Error::Argument("nothing to export: no images selected".into()));
    }
    let mut named: Vec<(String, Vec<u8>)> = vec![];
    let mut used: HashMap<String, usize> = HashMap::new();
    for (i, p) in images.iter().enumerate() {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let (settings, seed) = match settings_from_image(p) {
            Ok((s, _)) => {
                let seed = s.seed;
                (Some(s), seed)
            }
            Err(_) => (None, None),
        };
        let mut name = fill_template(template, i + 1, p, settings.as_ref(), seed);
        let n = used.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            name = format!("{name}-{}", *n - 1);
        }
        named.push((format!("{name}.png"), bytes));
    }
    if as_zip {
        let zip_path = if dest.extension().is_some_and(|e| e == "zip") { dest.to_path_buf() } else { dest.join("loramix-export.zip") };
        let parent = zip_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let bytes = zip_archive(&named).map_err(|e| Error::io(&zip_path, std::io::Error::other(e)))?;
        output::write_atomic(&zip_path, &bytes)?;
        return Ok(vec![zip_path]);
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut out = vec![];
    for (name, bytes) in named {
        let mut path = dest.join(&name);
        let mut k = 1;
        while path.exists() {
            path = dest.join(format!("{}-{k}.png", name.trim_end_matches(".png")));
            k += 1;
        }
        output::write_atomic(&path, &bytes)?;
        out.push(path);
    }
    Ok(out)
}

/// A zip of `entries` in memory, stored uncompressed (PNGs are compressed already) and with a
/// fixed 1980-01-01 timestamp, so the same images make the same archive.
fn zip_archive(entries: &[(String, Vec<u8>)]) -> zip::result::ZipResult<Vec<u8>> {
    use std::io::Write;
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    let mut zw = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        zw.start_file(name.as_str(), options)?;
        zw.write_all(bytes)?;
    }
    Ok(zw.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_file_name_safe() {
        let s = Settings { prompt: "a big/red: circle?".into(), ..Settings::default() };
        assert_eq!(fill_template("{index}-{seed}-{prompt}", 3, Path::new("x.png"), Some(&s), Some(7)), "00003-7-a_big_red_circle");
        assert_eq!(fill_template("../../{stem}", 1, Path::new("/a/b/img 1.png"), None, None), "img_1");
    }

    #[test]
    fn zip_is_readable() {
        let bytes = zip_archive(&[("a.png".into(), b"hello".to_vec()), ("b.png".into(), b"world!".to_vec())]).unwrap();
        // End-of-central-directory record says two entries, and each local header names its file.
        let eocd = bytes.len() - 22;
        assert_eq!(&bytes[eocd..eocd + 4], &[0x50, 0x4b, 0x05, 0x06]);
        assert_eq!(u16::from_le_bytes([bytes[eocd + 10], bytes[eocd + 11]]), 2);
        assert_eq!(&bytes[30..35], b"a.png");
        // CRC-32 of "hello".
        assert_eq!(u32::from_le_bytes(bytes[14..18].try_into().unwrap()), 0x3610_a686);
    }
}
