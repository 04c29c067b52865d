//! A1111's "SD upscale" img2img script (`scripts/sd_upscale.py`): the init image enlarged by
//! an upscaler (`Upscaler.upscale`), cut into overlapping tiles of the job's size
//! (`images.split_grid`), every tile run through img2img with its own seed, and the tiles blended
//! back (`images.combine_grid`). Each tile is an ordinary job of the studio, so LoRAs, mixing,
//! ControlNet units and the sampler settings apply to every tile as they would to one image.
//!
//! Seeds follow the script: upscale `n` of the batch count starts at `seed + n`; tiles go in
//! batches of the batch size, and each batch starts one above the last batch's first seed, so
//! tile `k` of batch `b` takes `seed + n + b + k`. Under a variation seed (A1111's `all_seeds`
//! then keep the batch's seed) tile `k` of batch `b` takes `seed + n + b` and variation seed
//! `subseed + k`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use image::RgbImage;

use super::jobs::{holds_image, random_seed, ImageOutputs, JobOutput, Studio, StudioEvent};
use super::metadata::{encode_image_as, settings_from_image};
use super::settings::{InitSettings, Settings};
use crate::error::{Error, Result};
use crate::output;
use crate::sdxl::img2img::{self, ResizeMode};
use crate::sdxl::tile_grid::{combine_grid, split_grid, TileRow};
use crate::sdxl::upscale::Upscaler;
use crate::sdxl::upscale_model::UpscaleModel;

/// A folder for the tiles of one job, removed when done. It is new: a folder left by another
/// run would hold pictures that pass for this run's.
struct TileDir(PathBuf);

impl TileDir {
    fn new() -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("loramix-sd-upscale-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for TileDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The checks that need no model: an img2img job without a mask, a scale in (0, 8], tiles
/// wider and taller than their overlap, and an upscaler that is there (a latent one is not a
/// picture upscaler).
pub fn check_sd_upscale(settings: &Settings, library: Option<&Path>) -> Result<()> {
    let Some(up) = &settings.sd_upscale else { return Ok(()) };
    let init = settings.init.as_ref().ok_or_else(|| Error::Argument("SD upscale enlarges an init image: give one (img2img)".into()))?;
    if init.mask.is_some() || init.outpaint.is_some() {
        return Err(Error::Argument("SD upscale is for img2img: it takes no mask and no outpainting".into()));
    }
    if !(up.scale > 0.0 && up.scale <= 8.0) {
        return Err(Error::Argument(format!("SD upscale scale factor {}: expected more than 0 and at most 8", up.scale)));
    }
    let (w, h) = (settings.width, settings.height);
    if (w != 0 && up.overlap >= w) || (h != 0 && up.overlap >= h) {
        return Err(Error::Argument(format!("SD upscale tile overlap {}: expected less than the tile's sides ({w}x{h})", up.overlap)));
    }
    super::pixel_upscaler_model_path(&up.upscaler, library)?;
    Ok(())
}

impl Studio {
    pub(super) fn run_sd_upscale(
        &self,
        settings: &Settings,
        library: Option<&Path>,
        outputs: &ImageOutputs,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(StudioEvent),
        on_preview: &mut dyn FnMut(&RgbImage),
    ) -> Result<JobOutput> {
        check_sd_upscale(settings, library)?;
        let (Some(up), Some(init)) = (&settings.sd_upscale, &settings.init) else { unreachable!("checked above") };
        if settings.batch_count == 0 || settings.batch_size == 0 {
            return Err(Error::Argument("batch count and batch size must be at least 1".into()));
        }
        // Each upscale of the batch count makes one picture; the batch size groups tiles.
        let total = outputs.images.unwrap_or(settings.batch_count);
        let seed0 = settings.seed.unwrap_or_else(random_seed);
        let target = |n: usize| outputs.names.map(|f| outputs.dir.join(f(n)));
        let mut out = JobOutput::default();
        let todo: Vec<usize> = (0..total)
            .filter(|&n| match target(n) {
                Some(p) if holds_image(&p, settings, seed0.wrapping_add(n as u64), n, 0) => {
                    on_event(StudioEvent::Kept { path: p.clone() });
                    out.kept.push(p);
                    false
                }
                _ => true,
            })
            .collect();
        if todo.is_empty() {
            return Ok(out);
        }
        let image = img2img::load_image(Path::new(&init.image))?;
        // A1111's upscalers round the size down to 8 pixels; Pillow refuses an empty one.
        let (dest_w, dest_h) = img2img::a1111_upscaled_size(image.dimensions(), up.scale);
        let keeps_size = matches!(up.upscaler.parse::<Upscaler>(), Ok(Upscaler::Resize));
        if !keeps_size && (dest_w == 0 || dest_h == 0) {
            return Err(Error::Argument(format!(
                "SD upscale scale factor {}: the {}x{} init image would become {dest_w}x{dest_h} (sides are rounded down to 8 pixels)",
                up.scale,
                image.width(),
                image.height(),
            )));
        }
        let (pipe, _) = self.pipeline(&settings.model, &settings.vae, &settings.dtype, library, on_event)?;
        let f = pipe.vae_scale_factor();
        let (dw, dh) = pipe.default_size();
        let tile_w = if settings.width == 0 { dw } else { settings.width };
        let tile_h = if settings.height == 0 { dh } else { settings.height };
        if !tile_w.is_multiple_of(f) || !tile_h.is_multiple_of(f) || up.overlap >= tile_w.min(tile_h) {
            return Err(Error::Argument(format!(
                "SD upscale tiles {tile_w}x{tile_h} with overlap {}: expected sides that are multiples of {f} and larger than the overlap",
                up.overlap
            )));
        }
        let big = match up.upscaler.parse::<Upscaler>() {
            Ok(u) => u.upscale_by(&image, up.scale),
            Err(_) => match super::pixel_upscaler_model_path(&up.upscaler, library)? {
                Some(p) => UpscaleModel::load(&p, &pipe.device)?.upscale_by(&image, up.scale)?,
                None => return Err(Error::Argument(format!("SD upscale upscaler {:?}: not found", up.upscaler))),
            },
        };
        // Tiles past the picture's edge (a picture smaller than a tile) are padded with black,
        // as A1111's crop pads them. A picture no wider than the overlap has one tile here, none
        // (and a black result) in A1111.
        let grid = split_grid(&big, tile_w, tile_h, up.overlap);
        let inputs: Vec<RgbImage> = grid.iter().flat_map(|(_, _, row)| row.iter().map(|(_, _, tile)| tile.clone())).collect();
        let tiles = inputs.len();
        on_event(StudioEvent::Notice {
            message: format!(
                "SD upscale: {}x{} in {} tiles of {tile_w}x{tile_h} ({} x {}), overlap {}",
                big.width(),
                big.height(),
                tiles,
                grid.first().map_or(0, |r| r.2.len()),
                grid.len(),
                up.overlap
            ),
        });
        // The variation seed, drawn once when none is given.
        let subseed = (settings.subseed_strength != 0.0).then(|| settings.subseed.unwrap_or_else(random_seed));
        let mut idx = output::first_free_index(outputs.dir);
        std::fs::create_dir_all(outputs.dir).map_err(|e| Error::io(outputs.dir, e))?;
        let bs = settings.batch_size;
        let _sharing = self.sharing_mixes();
        for n in todo {
            let start = seed0.wrapping_add(n as u64);
            let dir = TileDir::new()?;
            let mut made: Vec<RgbImage> = Vec::with_capacity(tiles);
            let mut first_record = None;
            let mut skipped = false;
            for t in 0..tiles {
                let (b, k) = (t / bs, t % bs);
                let tile_path = dir.0.join(format!("input{t}.png"));
                inputs[t].save(&tile_path).map_err(|e| Error::BadFile { path: tile_path.clone(), message: e.to_string() })?;
                let mut ts = settings.clone();
                ts.sd_upscale = None;
                ts.hires = None;
                let tile_file = tile_path.to_string_lossy().into_owned();
                // A ControlNet unit on the init image (the API's units without an image) sees
                // the tile, as the extension's unit sees the script's `p.init_images`.
                for c in ts.controlnet.iter_mut().filter(|c| c.image == init.image) {
                    c.image = tile_file.clone();
                }
                ts.init = Some(InitSettings { image: tile_file, resize_mode: ResizeMode::JustResize, ..init.clone() });
                (ts.width, ts.height, ts.batch_count, ts.batch_size) = (tile_w, tile_h, 1, 1);
                match subseed {
                    None => ts.seed = Some(start.wrapping_add((b + k) as u64)),
                    Some(sub) => {
                        ts.seed = Some(start.wrapping_add(b as u64));
                        ts.subseed = Some(sub.wrapping_add(k as u64));
                    }
                }
                let name = move |_: usize| format!("tile{t}.png");
                let sub = ImageOutputs { dir: &dir.0, names: Some(&name), images: Some(1), keep_interrupted: false, skip: outputs.skip, format: Default::default() };
                let done = n * tiles + t;
                let mut relay = |e: StudioEvent| match e {
                    StudioEvent::Step { step, steps, its, eta_seconds, .. } => {
                        let rest = (total * tiles).saturating_sub(done + 1);
                        let eta = eta_seconds + (rest * steps) as f64 / its.max(1e-9);
                        on_event(StudioEvent::Step { batch: done, batches: total * tiles, step, steps, its, eta_seconds: eta })
                    }
                    // The tiles are the job's workings, not its pictures.
                    StudioEvent::Image { .. } | StudioEvent::Kept { .. } | StudioEvent::Loading { .. } | StudioEvent::Loaded { .. } => {}
                    other => on_event(other),
                };
                let job = self.run(&ts, library, &sub, cancel, &mut relay, on_preview)?;
                let Some(path) = job.written.first().or(job.kept.first()) else {
                    // Skip ended this tile: A1111's Skip drops the picture being made.
                    skipped = true;
                    break;
                };
                made.push(image::open(path).map_err(|e| Error::BadFile { path: path.clone(), message: e.to_string() })?.to_rgb8());
                if first_record.is_none() {
                    first_record = settings_from_image(path)?.1;
                    out.prompts.extend(job.prompts.iter().cloned());
                }
                for l in job.loras {
                    if !out.loras.contains(&l) {
                        out.loras.push(l);
                    }
                }
            }
            if skipped {
                continue;
            }
            // The grid's places with the redrawn tiles; the next upscale starts from the inputs again.
            let mut it = made.into_iter();
            let drawn: Vec<TileRow> = grid
                .iter()
                .map(|(y, h, row)| (*y, *h, row.iter().map(|(x, w, _)| (*x, *w, it.next().expect("one picture per tile"))).collect()))
                .collect();
            let combined = combine_grid(&drawn, tile_h, big.width() as usize, big.height() as usize, up.overlap);
            let mut rec = first_record.ok_or_else(|| Error::Internal("an SD upscale tile was written without its record".into()))?;
            // The record is the job's: the first tile's generation, A1111's `Size` the tile's.
            rec.settings = settings.recorded();
            rec.seed = start;
            rec.batch_index = n;
            rec.index_in_batch = 0;
            let (path, format) = match target(n) {
                Some(p) => (p, super::SamplesFormat::Png),
                None => {
                    let (format, note) = outputs.format.or_png(combined.width(), combined.height(), &super::parameters_text(&rec));
                    if let Some(message) = note {
                        on_event(StudioEvent::Notice { message });
                    }
                    (output::next_image_path(outputs.dir, start, format.extension(), &mut idx), format)
                }
            };
            output::write_atomic(&path, &encode_image_as(&combined, &rec, format)?)?;
            on_event(StudioEvent::Image { path: path.clone(), seed: start, batch: n, index: 0, record: Box::new(rec.clone()) });
            out.written.push(path);
        }
        Ok(out)
    }
}

