//! A1111's tiles (`modules/images.py` `split_grid` / `combine_grid`): how its ESRGAN upscaler
//! and its "SD upscale" script cut a picture into overlapping tiles and blend them back, byte for
//! byte with PIL's pasting.

use image::RgbImage;

/// One row of tiles: its top, height and `(left, width, tile)` entries.
pub type TileRow = (i64, usize, Vec<(i64, usize, RgbImage)>);

/// A crop that may reach past the image, the outside black (PIL's `crop`).
pub fn crop(img: &RgbImage, x: i64, y: i64, w: usize, h: usize) -> RgbImage {
    let mut out = RgbImage::new(w as u32, h as u32);
    for ty in 0..h {
        let sy = y + ty as i64;
        if sy < 0 || sy >= img.height() as i64 {
            continue;
        }
        for tx in 0..w {
            let sx = x + tx as i64;
            if sx >= 0 && sx < img.width() as i64 {
                out.put_pixel(tx as u32, ty as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

/// A1111's `split_grid`.
pub fn split_grid(img: &RgbImage, tile_w: usize, tile_h: usize, overlap: usize) -> Vec<TileRow> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (tw, th, ov) = (tile_w as i64, tile_h as i64, overlap as i64);
    let ceil_div = |a: i64, b: i64| if a <= 0 { 0 } else { (a + b - 1) / b };
    let cols = ceil_div(w - ov, tw - ov).max(1);
    let rows = ceil_div(h - ov, th - ov).max(1);
    let dx = if cols > 1 { (w - tw) as f64 / (cols - 1) as f64 } else { 0.0 };
    let dy = if rows > 1 { (h - th) as f64 / (rows - 1) as f64 } else { 0.0 };
    let mut grid = Vec::new();
    for row in 0..rows {
        let mut y = (row as f64 * dy) as i64;
        if y + th >= h {
            y = h - th;
        }
        let mut tiles = Vec::new();
        for col in 0..cols {
            let mut x = (col as f64 * dx) as i64;
            if x + tw >= w {
                x = w - tw;
            }
            tiles.push((x, tile_w, crop(img, x, y, tile_w, tile_h)));
        }
        grid.push((y, tile_h, tiles));
    }
    grid
}

/// PIL's `Image.paste(src, (x, y), mask)` for RGB with an "L" mask: 8-bit blend with PIL's
/// rounding, clipped to `dst`.
pub fn paste(dst: &mut RgbImage, src: &RgbImage, x: i64, y: i64, mask: Option<&image::GrayImage>) {
    for sy in 0..src.height() as i64 {
        let dy = y + sy;
        if dy < 0 || dy >= dst.height() as i64 {
            continue;
        }
        for sx in 0..src.width() as i64 {
            let dx = x + sx;
            if dx < 0 || dx >= dst.width() as i64 {
                continue;
            }
            let s = src.get_pixel(sx as u32, sy as u32).0;
            let d = dst.get_pixel_mut(dx as u32, dy as u32);
            match mask {
                None => d.0 = s,
                Some(m) => {
                    let a = m.get_pixel(sx as u32, sy as u32).0[0] as u32;
                    for c in 0..3 {
                        let t = d.0[c] as u32 * (255 - a) + s[c] as u32 * a + 128;
                        d.0[c] = (((t >> 8) + t) >> 8) as u8;
                    }
                }
            }
        }
    }
}

/// A1111's `combine_grid`: each tile's first `overlap` columns blended into the row with a
/// left-to-right ramp, each row's first `overlap` lines blended top to bottom.
pub fn combine_grid(rows: &[TileRow], tile_h: usize, image_w: usize, image_h: usize, overlap: usize) -> RgbImage {
    // `(arange(overlap) * 255 / overlap).astype(uint8)`, in float32 as numpy computes it.
    let ramp: Vec<u8> = (0..overlap).map(|i| (i as f32 * 255.0 / overlap as f32) as u8).collect();
    let mask_w = image::GrayImage::from_fn(overlap as u32, tile_h as u32, |x, _| image::Luma([ramp[x as usize]]));
    let mask_h = image::GrayImage::from_fn(image_w as u32, overlap as u32, |_, y| image::Luma([ramp[y as usize]]));
    let mut combined = RgbImage::new(image_w as u32, image_h as u32);
    for (y, h, tiles) in rows {
        let mut row = RgbImage::new(image_w as u32, *h as u32);
        for (x, w, tile) in tiles {
            if *x == 0 {
                paste(&mut row, tile, 0, 0, None);
                continue;
            }
            paste(&mut row, &crop(tile, 0, 0, overlap, *h), *x, 0, Some(&mask_w));
            paste(&mut row, &crop(tile, overlap as i64, 0, w - overlap, *h), *x + overlap as i64, 0, None);
        }
        if *y == 0 {
            paste(&mut combined, &row, 0, 0, None);
            continue;
        }
        paste(&mut combined, &crop(&row, 0, 0, image_w, overlap), 0, *y, Some(&mask_h));
        paste(&mut combined, &crop(&row, 0, overlap as i64, image_w, h - overlap), 0, *y + overlap as i64, None);
    }
    combined
}
