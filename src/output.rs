//! Writing results: PNGs with A1111-compatible `parameters` text, and latent files — always
//! through a temporary file and a rename, so a crash never leaves a half-written file.
//! Shared by every room that writes (the studio's images, the mix trace, exports).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// A temp file's name beside `path`, unique within the process too (two threads of the app
/// may write the same name).
fn temp_beside(path: &Path) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes `bytes` atomically under the first of `name(0)`, `name(1)`, … that is free, and never
/// over a file, even one another writer makes meanwhile: the finished temp file is hard-linked
/// to the name, which fails if the name exists. Returns the name used.
pub fn write_new(name: impl Fn(usize) -> std::path::PathBuf, bytes: &[u8]) -> Result<std::path::PathBuf> {
    let first = name(0);
    let tmp = temp_beside(&first);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&first, e));
    }
    let mut i = 0;
    let out = loop {
        let p = name(i);
        match std::fs::hard_link(&tmp, &p) {
            Ok(()) => break Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => i += 1,
            // A file system without hard links: the name checked, then renamed onto.
            Err(_) if !p.exists() => break std::fs::rename(&tmp, &p).map(|_| p.clone()).map_err(|e| Error::io(&p, e)),
            Err(_) => i += 1,
        }
    };
    let _ = std::fs::remove_file(&tmp);
    out
}

/// PNG bytes with `tEXt` chunks (A1111 reads `parameters`).
pub fn encode_png(img: &image::RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    encode_png_raw(img, png::ColorType::Rgb, text)
}

/// [`encode_png`] for a picture with transparency.
pub fn encode_png_rgba(img: &image::RgbaImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    encode_png_raw(img, png::ColorType::Rgba, text)
}

fn encode_png_raw<P: image::Pixel<Subpixel = u8>>(img: &image::ImageBuffer<P, Vec<u8>>, color: png::ColorType, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // tEXt is Latin-1; iTXt carries UTF-8 prompts.
            let r = if v.is_ascii() { enc.add_text_chunk(k.to_string(), v.clone()) } else { enc.add_itxt_chunk(k.to_string(), v.clone()) };
            r.map_err(|e| Error::Internal(format!("png text chunk {k}: {e}")))?;
        }
        let mut w = enc.write_header().map_err(|e| Error::Internal(format!("png: {e}")))?;
        w.write_image_data(img.as_raw()).map_err(|e| Error::Internal(format!("png: {e}")))?;
    }
    Ok(buf)
}

/// The next free `NNNNN-<seed>.<extension>` name in `dir` (A1111's numbering).
pub fn next_image_path(dir: &Path, seed: u64, extension: &str, taken: &mut usize) -> PathBuf {
    loop {
        let p = dir.join(format!("{:05}-{seed}.{extension}", *taken));
        *taken += 1;
        if !p.exists() {
            return p;
        }
    }
}

pub fn first_free_index(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.split('-').next()).and_then(|n| n.parse::<usize>().ok()))
                .map(|n| n + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Saves a tensor under the key `latents` (the `--save-latents` format).
pub fn save_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let t = latents.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let mut m = HashMap::new();
    m.insert("latents".to_string(), t);
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&m, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads the `latents` tensor of an `--init-noise` file as f32.
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let f = SafetensorsFile::open(path)?;
    if f.shape_of("latents").is_none() {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            message: format!("no tensor named 'latents' (found: {})", {
                let mut n = f.names();
                n.sort();
                n.join(", ")
            }),
        });
    }
    Ok(f.load("latents")?.to_dtype(candle_core::DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `write_new` takes the first free name, never replaces a file, and leaves no temp file.
    #[test]
    fn write_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: usize| if i == 0 { dir.path().join("a.png") } else { dir.path().join(format!("a-{i}.png")) };
        std::fs::write(dir.path().join("a.png"), b"old").unwrap();
        std::fs::write(dir.path().join("a-1.png"), b"older").unwrap();
        let p = write_new(name, b"new").unwrap();
        assert_eq!(p, dir.path().join("a-2.png"));
        assert_eq!(std::fs::read(dir.path().join("a.png")).unwrap(), b"old");
        assert_eq!(std::fs::read(dir.path().join("a-1.png")).unwrap(), b"older");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no temp file left");
        // Many writers racing for one name each get their own.
        let d = dir.path();
        let names: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|k| s.spawn(move || write_new(|i| d.join(format!("b-{i}.png")), &[k as u8]).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 8);
    }
}
