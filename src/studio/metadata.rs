//! PNG metadata: A1111-compatible `parameters` text (written by us, read from A1111, Forge and
//! the rest) and our own JSON chunk, and settings restored from either.

use std::collections::HashMap;
use std::path::Path;

use super::settings::{ImageRecord, InpaintArea, LoraSetting, Settings};
use crate::error::{Error, Result};
use crate::rng::BatchSeeds;
use crate::lora;
use crate::output;
use crate::sdxl::schedulers::{SamplerKind, Schedule};

/// The PNG text chunk that holds our full settings as JSON.
pub const JSON_CHUNK: &str = "loramix";

/// One unit as sd-webui-controlnet writes it (`ControlNet 0: "Module: canny, Model: …"`). The
/// preprocessor runs on the control image at its own size, so no "Processor Res" is written;
/// the control image itself is in our JSON record, not in this text.
fn controlnet_unit_text(c: &super::ControlNetSetting) -> String {
    let resize = match c.resize_mode {
        // (A unit refuses the latent upscale; in pixels it is a plain resize.)
        crate::sdxl::img2img::ResizeMode::JustResize | crate::sdxl::img2img::ResizeMode::LatentUpscale => "Just Resize",
        crate::sdxl::img2img::ResizeMode::CropAndResize => "Crop and Resize",
        crate::sdxl::img2img::ResizeMode::ResizeAndFill => "Resize and Fill",
    };
    let module = crate::sdxl::preprocessor::Preprocessor::parse(&c.module, c.threshold_a, c.threshold_b);
    let mut t = format!(
        "Module: {}, Model: {}, Weight: {}, Resize Mode: {resize}",
        module.as_ref().map_or(c.module.as_str(), |m| m.a1111_name()),
        super::control::a1111_model_name(&c.model),
        c.weight
    );
    if let Ok(crate::sdxl::preprocessor::Preprocessor::Canny { low, high }) = module {
        t.push_str(&format!(", Threshold A: {low}, Threshold B: {high}"));
    }
    t.push_str(&format!(
        ", Guidance Start: {}, Guidance End: {}, Pixel Perfect: False, Control Mode: {}",
        c.guidance_start,
        c.guidance_end,
        c.control_mode.a1111_name()
    ));
    if c.guess_mode {
        // The extension's field from before control modes.
        t.push_str(", Guess Mode: True");
    }
    t
}

/// The A1111 `parameters` text: prompt (with `<lora:NAME:w>` tags), negative prompt, settings
/// line with `Lora hashes`.
pub fn parameters_text(r: &ImageRecord) -> String {
    let s = &r.settings;
    let (prompt, negative) = match &r.drawn {
        Some(d) => (d.prompt.as_str(), d.negative_prompt.as_str()),
        None => (s.prompt.as_str(), s.negative_prompt.as_str()),
    };
    let mut text = prompt.to_string();
    // Every entry, even one whose name a prompt tag or an earlier entry also has: each applies
    // (their weights add), so A1111's text must list each to restore the same image.
    for l in &s.loras {
        match &l.schedule {
            Some(fields) => text.push_str(&format!(" <lora:{}:{fields}>", lora_tag_name(&l.name))),
            None => text.push_str(&format!(" <lora:{}:{}>", lora_tag_name(&l.name), l.weight)),
        }
    }
    if !negative.is_empty() {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    // A1111 names a checkpoint by its file name without the extension (`name_for_extra`).
    let model = Path::new(&s.model).file_name().and_then(|n| n.to_str()).unwrap_or(&s.model);
    let model = match model.len().checked_sub(".safetensors".len()) {
        Some(n) if n > 0 && model.is_char_boundary(n) && model[n..].eq_ignore_ascii_case(".safetensors") => &model[..n],
        _ => model,
    };
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, ",
        s.steps, r.sampler
    ));
    if !r.schedule.is_empty() {
        text.push_str(&format!("Schedule type: {}, ", r.schedule));
    }
    text.push_str(&format!("CFG scale: {}, Seed: {}, Size: {}x{}, ", s.cfg, r.seed, r.width, r.height));
    if !r.model_hash.is_empty() {
        text.push_str(&format!("Model hash: {}, ", r.model_hash));
    }
    text.push_str(&format!("Model: {}", quote(model)));
    if !s.vae.is_empty() {
        let name = Path::new(&s.vae).file_name().and_then(|n| n.to_str()).unwrap_or(&s.vae);
        text.push_str(&format!(", VAE: {}", quote(name)));
    }
    if let Some(sub) = r.subseed.filter(|_| s.subseed_strength != 0.0) {
        text.push_str(&format!(", Variation seed: {sub}, Variation seed strength: {}", s.subseed_strength));
    }
    if let Some((w, h)) = s.seed_resize_from() {
        text.push_str(&format!(", Seed resize from: {w}x{h}"));
    }
    // Where A1111's `create_infotext` puts it (its dict has the key here; the hires or img2img
    // value fills it in), before Clip skip and ENSD.
    let hires = s.hires.as_ref().filter(|_| s.init.is_none());
    if let Some(denoise) = s.init.as_ref().map(|i| i.strength).or(hires.map(|h| h.denoise)) {
        text.push_str(&format!(", Denoising strength: {denoise}"));
    }
    if s.clip_skip > 0 {
        text.push_str(&format!(", Clip skip: {}", s.clip_skip + 1));
    }
    // Written where the sampler draws noise between steps from the generators ENSD reseeds, so
    // the text restores the image; elsewhere ENSD changes nothing. (A1111 writes it for its
    // ancestral samplers; its SDE samplers draw from a Brownian tree instead.)
    if s.eta_noise_seed_delta != 0 && r.sampler.parse::<SamplerKind>().map_or(true, |k| k.draws_noise()) {
        text.push_str(&format!(", ENSD: {}", s.eta_noise_seed_delta));
    }
    match s.tiling.as_str() {
        "" => {}
        // A1111 writes `Tiling: True` (both axes, all it has); one axis is ours (InvokeAI's
        // seamless X/Y).
        "xy" => text.push_str(", Tiling: True"),
        axis => text.push_str(&format!(", Tiling: {}", axis.to_ascii_uppercase())),
    }
    if !s.timestep_spacing.is_empty() {
        // Not an A1111 field (A1111 has the SGM Uniform schedule instead); others ignore it.
        text.push_str(&format!(", Timestep spacing: {}", s.timestep_spacing));
    }
    if s.batch_size > 1 {
        text.push_str(&format!(", Batch size: {}, Batch pos: {}", s.batch_size, r.index_in_batch));
        // A dynamic prompt draws per image, and each image then has its own seed whatever the
        // setting, so the text says what ran.
        if s.batch_seeds == BatchSeeds::Shared && !super::is_dynamic(&s.prompt) && !super::is_dynamic(&s.negative_prompt) {
            // Not an A1111 field: A1111's batches take per-image seeds, so its text without
            // this field restores as per-image.
            text.push_str(", Batch seeds: shared");
        }
    }
    if let Some(hr) = hires {
        text.push_str(&format!(", Hires upscale: {}", hr.scale));
        if hr.steps > 0 {
            text.push_str(&format!(", Hires steps: {}", hr.steps));
        }
        text.push_str(&format!(", Hires upscaler: {}", quote(&hr.upscaler)));
    }
    if let Some(init) = &s.init {
        // A1111's img2img fields (`processing.py` extra_generation_params).
        if init.mask.is_some() || init.outpaint.is_some() {
            text.push_str(&format!(", Mask blur: {}, Masked content: {}", init.mask_blur, init.masked_content.a1111_name()));
            if init.inpaint_area == InpaintArea::OnlyMasked {
                text.push_str(&format!(", Inpaint area: Only masked, Masked area padding: {}", init.padding));
            }
        }
        if init.resize_mode != crate::sdxl::img2img::ResizeMode::JustResize {
            // A1111's img2img paste fields read it back.
            text.push_str(&format!(", Resize mode: {}", init.resize_mode.a1111_name()));
        }
        if let Some(u) = &s.sd_upscale {
            // A1111's script writes the overlap and the upscaler (its `Size` is a tile's); the
            // scale factor is ours, so the picture can be made again.
            text.push_str(&format!(", SD upscale: {}, SD upscale overlap: {}, SD upscale upscaler: {}", u.scale, u.overlap, quote(&u.upscaler)));
        }
    }
    // As A1111 writes them: each name without `:` and `,` (which would split the list when read),
    // the list quoted as JSON.
    let hash_list = |hashes: &[(String, String)]| quote(&hashes.iter().map(|(n, h)| format!("{}: {h}", n.replace([':', ','], ""))).collect::<Vec<_>>().join(", "));
    if !r.ti_hashes.is_empty() {
        text.push_str(&format!(", TI hashes: {}", hash_list(&r.ti_hashes)));
    }
    if !r.lora_hashes.is_empty() {
        text.push_str(&format!(", Lora hashes: {}", hash_list(&r.lora_hashes)));
        text.push_str(&format!(", LoRA mix: {}", s.mix));
    }
    if let Some(t) = r.mix_trace.as_ref().filter(|t| !t.candidates.is_empty()) {
        let picked: Vec<&str> = t.candidates.iter().filter(|c| c.picked).map(|c| c.name.as_str()).collect();
        text.push_str(&format!(", LoRA picked: \"{}\"", picked.join(", ")));
    }
    if r.drawn.is_some() {
        // sd-dynamic-prompts' fields: what was written before styles and draws.
        if s.prompt != prompt && !s.prompt.is_empty() {
            text.push_str(&format!(", Template: {}", quote(&s.prompt)));
        }
        if s.negative_prompt != negative && !s.negative_prompt.is_empty() {
            text.push_str(&format!(", Negative Template: {}", quote(&s.negative_prompt)));
        }
    }
    if !s.styles.is_empty() {
        text.push_str(&format!(", Styles array: {}", quote(&serde_json::to_string(&s.styles).unwrap_or_default())));
    }
    for (i, c) in s.controlnet.iter().enumerate() {
        text.push_str(&format!(", ControlNet {i}: {}", quote(&controlnet_unit_text(c))));
    }
    text.push_str(&format!(", Version: loramix {}", env!("CARGO_PKG_VERSION")));
    text
}

/// A1111's quoting of a settings-line value that holds commas or quotes.
/// JSON, as A1111's `quote` (`json.dumps`): a newline becomes `\n` and the line stays one line.
fn quote(v: &str) -> String {
    if v.contains([',', '"', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_default()
    } else {
        v.to_string()
    }
}

/// The name a LoRA goes by in `<lora:NAME:w>`: a path's file stem, else the name itself.
pub fn lora_tag_name(name: &str) -> String {
    let p = Path::new(name);
    if name.ends_with(".safetensors") || name.contains('/') || name.contains('\\') {
        p.file_stem().and_then(|s| s.to_str()).unwrap_or(name).to_string()
    } else {
        name.to_string()
    }
}

/// The `Key: value` pairs of an infotext's settings line, as A1111's `parse_generation_parameters`
/// finds them with its `re_param` (values may be quoted, then `json.loads`-unquoted as its
/// `unquote` does; a key with an empty value is dropped, as its `v[0]` fails there).
pub fn split_settings_line(line: &str) -> Vec<(String, String)> {
    re_param()
        .captures_iter(line)
        .filter_map(|c| {
            let (k, v) = (c.get(1)?.as_str(), c.get(2)?.as_str());
            if v.is_empty() {
                return None;
            }
            let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') { serde_json::from_str::<String>(v).unwrap_or_else(|_| v.to_string()) } else { v.to_string() };
            Some((k.to_string(), v))
        })
        .collect()
}

/// An infotext's parts as A1111's `parse_generation_parameters` splits them: the last line is
/// the settings line when `re_param` finds three pairs or more in it (else it belongs to the
/// prompt), every other line is stripped and joined to the prompt until one starts
/// `Negative prompt:`, and to the negative prompt from there.
pub fn split_infotext(text: &str) -> (String, String, Vec<(String, String)>) {
    use super::generation_parameters::python_strip;
    let mut lines: Vec<&str> = python_strip(text).split('\n').collect();
    let mut last = lines.pop().unwrap_or_default();
    if split_settings_line_count(last) < 3 {
        lines.push(last);
        last = "";
    }
    let (mut prompt, mut negative, mut in_negative) = (String::new(), String::new(), false);
    for line in lines {
        let mut line = python_strip(line);
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = python_strip(rest);
        }
        let to = if in_negative { &mut negative } else { &mut prompt };
        if !to.is_empty() {
            to.push('\n');
        }
        to.push_str(line);
    }
    (prompt, negative, split_settings_line(last))
}

/// How many pairs `re_param` finds (empty values included, as A1111's `findall` counts them).
fn split_settings_line_count(line: &str) -> usize {
    re_param().captures_iter(line).count()
}

/// A1111's `infotext_utils.re_param`.
fn re_param() -> &'static regex::Regex {
    static RE_PARAM: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE_PARAM.get_or_init(|| regex::Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("a valid regex"))
}

/// Settings from an A1111 `parameters` text (ours, A1111's, Forge's, ...). `<lora:NAME:w>` tags
/// move from the prompt into [`Settings::loras`].
pub fn parse_parameters(text: &str) -> Result<Settings> {
    let (prompt_text, negative_text, fields) = split_infotext(text);
    let (prompt, tags) = lora::extract_prompt_loras(&prompt_text)?;
    // Tags with block weights or schedules stay in the prompt, where they say all they say.
    let scheduled: Vec<&str> = tags.iter().filter(|t| t.schedule.is_some()).map(|t| t.text.as_str()).collect();
    let prompt = if scheduled.is_empty() { prompt.trim().to_string() } else { format!("{} {}", prompt.trim(), scheduled.join(" ")) };
    let mut s = Settings {
        prompt,
        negative_prompt: negative_text.trim().to_string(),
        loras: tags.into_iter().filter(|t| t.schedule.is_none()).map(|t| LoraSetting { name: t.name, weight: t.weight, role: None, schedule: None }).collect(),
        // A1111's "Seed" is the image's own: its batch sizes mean per-image seeds.
        batch_seeds: BatchSeeds::PerImage,
        ..Settings::default()
    };
    let bad = |k: &str, v: &str, want: &str| Error::Argument(format!("parameters: {k} {v:?}: expected {want}"));
    let mut hires_resize = None;
    for (k, v) in fields {
        match k.as_str() {
            "Steps" => s.steps = v.parse().map_err(|_| bad(&k, &v, "an integer"))?,
            "Sampler" => {
                s.sampler = v.parse::<SamplerKind>().map(|k| k.name().to_string()).unwrap_or(v.clone());
            }
            "Schedule type" => {
                // Unknown labels (other tools' schedules) are kept out rather than refused.
                if let Ok(k) = v.parse::<Schedule>() {
                    s.schedule = if k == Schedule::Default { String::new() } else { k.name().to_string() };
                }
            }
            "Denoising strength" => {
                // The init image itself is not in A1111's text; the strength is kept for
                // when the user picks one.
                let strength = v.parse().map_err(|_| bad(&k, &v, "a number"))?;
                s.init.get_or_insert_with(Default::default).strength = strength;
            }
            // The mask itself is not in A1111's text either; how it was used is, for when the
            // user picks one.
            "Mask blur" => s.init.get_or_insert_with(Default::default).mask_blur = v.parse().map_err(|_| bad(&k, &v, "a number"))?,
            "Masked content" => {
                s.init.get_or_insert_with(Default::default).masked_content =
                    v.parse().map_err(|_| bad(&k, &v, "original, fill, latent noise or latent nothing"))?
            }
            "Inpaint area" => {
                s.init.get_or_insert_with(Default::default).inpaint_area = match v.as_str() {
                    "Only masked" => InpaintArea::OnlyMasked,
                    "Whole picture" => InpaintArea::WholePicture,
                    _ => return Err(bad(&k, &v, "Whole picture or Only masked")),
                }
            }
            // A mode we do not know leaves the field at its default.
            "Resize mode" => {
                if let Ok(m) = v.parse() {
                    s.init.get_or_insert_with(Default::default).resize_mode = m;
                }
            }
            "Masked area padding" => s.init.get_or_insert_with(Default::default).padding = v.parse().map_err(|_| bad(&k, &v, "a whole number of pixels"))?,
            "Clip skip" => {
                let n: usize = v.parse().map_err(|_| bad(&k, &v, "a positive integer"))?;
                s.clip_skip = n.saturating_sub(1);
            }
            "Timestep spacing" => s.timestep_spacing = v.clone(),
            "Tiling" => {
                let t = super::settings::parse_tiling(&v).ok_or_else(|| bad(&k, &v, "True, False, X, Y or XY"))?;
                s.tiling = super::settings::tiling_name(t).to_string();
            }
            "CFG scale" => s.cfg = v.parse().map_err(|_| bad(&k, &v, "a number"))?,
            "Seed" => s.seed = Some(v.parse().map_err(|_| bad(&k, &v, "an integer"))?),
            "Variation seed" => s.subseed = Some(v.parse().map_err(|_| bad(&k, &v, "an integer"))?),
            "Variation seed strength" => {
                s.subseed_strength = v.parse().ok().filter(|x| (0.0..=1.0).contains(x)).ok_or_else(|| bad(&k, &v, "a number from 0 to 1"))?
            }
            "ENSD" => s.eta_noise_seed_delta = v.parse().map_err(|_| bad(&k, &v, "a whole number"))?,
            "Seed resize from" => {
                // A1111 before 1.5 wrote `-1x-1` (off) on every image its API made.
                let (w, h) = v.split_once('x').ok_or_else(|| bad(&k, &v, "WxH"))?;
                let (w, h): (i64, i64) = (w.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?, h.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?);
                (s.seed_resize_from_w, s.seed_resize_from_h) = if w > 0 && h > 0 { (w as usize, h as usize) } else { (0, 0) };
            }
            "Size" => {
                let (w, h) = v.split_once('x').ok_or_else(|| bad(&k, &v, "WxH"))?;
                s.width = w.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?;
                s.height = h.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?;
            }
            "Hires upscale" => s.hires.get_or_insert_with(Default::default).scale = v.parse().map_err(|_| bad(&k, &v, "a number"))?,
            "Hires steps" => s.hires.get_or_insert_with(Default::default).steps = v.parse().map_err(|_| bad(&k, &v, "an integer"))?,
            "Hires upscaler" => s.hires.get_or_insert_with(Default::default).upscaler = v,
            "SD upscale" => s.sd_upscale.get_or_insert_with(Default::default).scale = v.parse().map_err(|_| bad(&k, &v, "a number"))?,
            "SD upscale overlap" => s.sd_upscale.get_or_insert_with(Default::default).overlap = v.parse().map_err(|_| bad(&k, &v, "a whole number of pixels"))?,
            "SD upscale upscaler" => s.sd_upscale.get_or_insert_with(Default::default).upscaler = v,
            // A1111's "Resize width to / height to" (0: by the other side's ratio).
            "Hires resize" => {
                let (x, y) = v.split_once('x').ok_or_else(|| bad(&k, &v, "WxH"))?;
                let (x, y): (usize, usize) = (x.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?, y.trim().parse().map_err(|_| bad(&k, &v, "WxH"))?);
                hires_resize = Some((x, y));
                s.hires.get_or_insert_with(Default::default);
            }
            "Model" => s.model = v,
            "VAE" => s.vae = v,
            "Batch size" => s.batch_size = v.parse().unwrap_or(1),
            "Batch seeds" => s.batch_seeds = v.parse().map_err(|_| bad(&k, &v, "shared or per-image"))?,
            "LoRA mix" => s.mix = v,
            // The prompt text already has its styles (and draws) applied, so restoring from
            // `parameters` keeps them out of `styles`; our JSON chunk keeps the templates.
            _ => {}
        }
    }
    if let (Some((x, y)), Some(hr)) = (hires_resize, s.hires.as_mut()) {
        // Our hires fix takes a scale: the one that reaches the resize from the first pass's size.
        let scale = match (x, y) {
            (0, y) if s.height > 0 => super::factor_reaching(y, s.height),
            (x, _) if s.width > 0 && x > 0 => super::factor_reaching(x, s.width),
            _ => hr.scale,
        };
        hr.scale = scale;
    }
    // With hires fix, A1111's "Denoising strength" is the second pass's.
    if let (Some(hr), Some(init)) = (s.hires.as_mut(), s.init.as_ref()) {
        if init.image.is_empty() {
            hr.denoise = init.strength;
            s.init = None;
        }
    }
    Ok(s)
}

/// All text chunks of a PNG (tEXt, zTXt, iTXt).
pub fn png_text_chunks(bytes: &[u8]) -> Result<HashMap<String, String>> {
    Ok(png_text_list(bytes)?.into_iter().collect())
}

/// [`png_text_chunks`] in file order, those after the image data too (a key given twice keeps
/// its last value, in its first place, as Pillow's `info` dict).
pub fn png_text_list(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    Ok(super::image_info::png_info_entries(bytes)?.0)
}

/// Settings restored from a picture made by us (a PNG's JSON chunk) or by A1111-compatible
/// tools: a PNG's `parameters` (or `eXIf` comment), a JPEG's or WebP's EXIF UserComment, as
/// A1111's `read_info_from_image` finds them.
pub fn settings_from_image(path: &Path) -> Result<(Settings, Option<ImageRecord>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: Error| Error::BadFile { path: path.into(), message: e.to_string() };
    let info = super::read_image_info(&bytes).map_err(bad)?;
    if let Some((_, j)) = info.items.iter().find(|(k, _)| k == JSON_CHUNK) {
        let rec: ImageRecord = serde_json::from_str(j)
            .map_err(|e| Error::BadFile { path: path.into(), message: format!("'{JSON_CHUNK}' chunk: {e}") })?;
        let mut s = rec.settings.clone();
        s.seed = Some(rec.seed);
        if rec.subseed.is_some() {
            s.subseed = rec.subseed;
        }
        return Ok((s, Some(rec)));
    }
    match info.parameters.filter(|p| !p.is_empty()) {
        Some(p) => Ok((parse_parameters(&p).map_err(bad)?, None)),
        None => Err(Error::BadFile {
            path: path.into(),
            message: "this picture carries no generation settings (no 'parameters' or 'loramix' text chunk in a PNG, no EXIF UserComment in a JPEG or WebP)".into(),
        }),
    }
}

/// PNG bytes with both text chunks.
pub fn encode_image(img: &image::RgbImage, rec: &ImageRecord) -> Result<Vec<u8>> {
    let json = serde_json::to_string(rec).map_err(|e| Error::Argument(e.to_string()))?;
    output::encode_png(img, &[("parameters", parameters_text(rec)), (JSON_CHUNK, json)])
}

/// [`encode_image`] in `format`. A JPEG or WebP carries A1111's `parameters` only (its EXIF
/// comment, as A1111 writes them), so it restores from that text as A1111's pictures do.
pub fn encode_image_as(img: &image::RgbImage, rec: &ImageRecord, format: super::SamplesFormat) -> Result<Vec<u8>> {
    match format {
        super::SamplesFormat::Png => encode_image(img, rec),
        f => f.encode(img, &[("parameters", parameters_text(rec))]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::settings::InitSettings;
    use crate::sdxl::img2img::MaskedContent;

    /// Infotexts split as A1111 1.10's `parse_generation_parameters` splits them
    /// (tools/parity/make_image_info_fixtures.py runs its code): stripped lines, a last line of
    /// fewer than three pairs kept in the prompt, `re_param`'s pairs, `unquote`.
    #[test]
    fn infotexts_split_as_a1111_splits_them() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image_info/expected.json");
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = expected["parse"].as_array().unwrap();
        assert!(cases.len() >= 11);
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let (prompt, negative, fields) = split_infotext(text);
            let want: Vec<(String, String)> = c["fields"].as_array().unwrap().iter().map(|kv| (kv[0].as_str().unwrap().into(), kv[1].as_str().unwrap().into())).collect();
            assert_eq!((prompt.as_str(), negative.as_str(), &fields), (c["prompt"].as_str().unwrap(), c["negative"].as_str().unwrap(), &want), "{text:?}");
        }
    }

    /// A1111 quotes with `json.dumps` and unquotes with `json.loads`: every escape survives.
    #[test]
    fn quoted_values_keep_every_character() {
        for v in ["a \\(b\\) \"q\"\nnl é, x: y", "plain"] {
            let line = format!("Steps: 2, Template: {}, Model: {}, Seed: 1", quote(v), quote("mini, world: v2"));
            let got: HashMap<String, String> = split_settings_line(&line).into_iter().collect();
            assert_eq!((got["Template"].as_str(), got["Model"].as_str(), got["Seed"].as_str()), (v, "mini, world: v2", "1"), "{line}");
        }
        let s = parse_parameters("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x384, Denoising strength: 0.5, Hires resize: 1024x0, Hires upscaler: Latent").unwrap();
        let hr = s.hires.unwrap();
        assert_eq!((crate::studio::hires_size(&hr, (512, 384), 8).unwrap(), hr.denoise, s.init.is_none()), ((1024, 768), 0.5, true));
        // An SD upscale's fields come back (the init image, which A1111's text does not name,
        // is the user's to give again).
        let s = parse_parameters("a cat\nSteps: 20, Seed: 3, Size: 512x512, Denoising strength: 0.3, SD upscale: 2.5, SD upscale overlap: 48, SD upscale upscaler: \"4x, Ultra\"").unwrap();
        assert_eq!(s.sd_upscale, Some(crate::studio::SdUpscaleSettings { scale: 2.5, overlap: 48, upscaler: "4x, Ultra".into() }));
        assert!(parse_parameters("x\nSteps: 2, Sampler: Euler, SD upscale overlap: -3").unwrap_err().to_string().contains("SD upscale overlap \"-3\""));
    }

    #[test]
    fn a1111_parameters_round_trip() {
        let text = "a red circle, <lora:vlox:0.8> flat style\nNegative prompt: blurry, dark\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 832x1216, Model hash: abc, Model: sdxl, Lora hashes: \"vlox: 0123456789ab, b: cdef\", Version: v1.10";
        let s = parse_parameters(text).unwrap();
        assert_eq!(s.prompt, "a red circle,  flat style");
        assert_eq!(s.negative_prompt, "blurry, dark");
        assert_eq!((s.steps, s.cfg, s.seed, s.width, s.height), (30, 6.5, Some(1234), 832, 1216));
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("dpmpp_2m", "karras"));
        assert_eq!(s.loras, vec![LoraSetting { name: "vlox".into(), weight: 0.8, role: None, schedule: None }]);
        assert_eq!(s.model, "sdxl");
    }

    /// A 64×64 Euler image's record of `settings` with `seed`.
    fn record(settings: Settings, seed: u64) -> ImageRecord {
        ImageRecord {
            settings,
            seed,
            batch_index: 0,
            index_in_batch: 0,
            width: 64,
            height: 64,
            sampler: "Euler".into(),
            schedule: String::new(),
            lora_hashes: vec![],
            subseed: None,
            model_hash: String::new(),
            ti_hashes: vec![],
            mix_trace: None,
            version: "0".into(),
            drawn: None,
        }
    }

    /// A1111's inpainting fields come back into the init settings (the mask and image are not
    /// in the text; the user picks them again).
    #[test]
    fn inpainting_fields_parse_back() {
        let text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 512x512, Model: x, Denoising strength: 0.6, Mask blur: 6, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 48, Resize mode: Crop and resize";
        let init = parse_parameters(text).unwrap().init.unwrap();
        assert_eq!(init.resize_mode, crate::sdxl::img2img::ResizeMode::CropAndResize);
        assert_eq!((init.strength, init.mask_blur, init.masked_content, init.inpaint_area, init.padding), (0.6, 6.0, MaskedContent::LatentNoise, InpaintArea::OnlyMasked, 48));
        let rec = record(Settings { init: Some(InitSettings { image: "a.png".into(), mask: Some("m.png".into()), ..init.clone() }), ..Settings::default() }, 3);
        let back = parse_parameters(&parameters_text(&rec)).unwrap().init.unwrap();
        assert_eq!(InitSettings { image: String::new(), mask: None, ..back }, init);
        let err = parse_parameters("a\nSteps: 2, Sampler: Euler, Inpaint area: Everywhere").unwrap_err().to_string();
        assert!(err.contains("Inpaint area") && err.contains("Only masked"), "{err}");
    }

    /// `Tiling: True` is A1111's (both axes); one axis is written as X / Y and read back.
    #[test]
    fn tiling_parses_back() {
        assert_eq!(parse_parameters("a cat\nSteps: 2, Sampler: Euler, Tiling: True").unwrap().tiling, "xy");
        assert_eq!(parse_parameters("a cat\nSteps: 2, Sampler: Euler, Tiling: False").unwrap().tiling, "");
        for axes in ["xy", "x", "y", ""] {
            let rec = record(Settings { tiling: axes.into(), ..Settings::default() }, 3);
            let text = parameters_text(&rec);
            assert_eq!(text.contains("Tiling: "), !axes.is_empty(), "{text}");
            assert_eq!(parse_parameters(&text).unwrap().tiling, axes, "{text}");
        }
        let err = parse_parameters("a\nSteps: 2, Sampler: Euler, Tiling: sideways").unwrap_err().to_string();
        assert!(err.contains("Tiling") && err.contains("True, False, X, Y"), "{err}");
    }

    #[test]
    fn our_parameters_parse_back() {
        let settings = Settings {
            prompt: "a vlox emblem".into(),
            negative_prompt: "noise".into(),
            steps: 12,
            cfg: 4.0,
            seed: Some(9),
            loras: vec![LoraSetting { name: "models/miniworld/loras/vlox.safetensors".into(), weight: 0.7, role: None, schedule: None }],
            ..Settings::default()
        };
        let rec = ImageRecord { lora_hashes: vec![("vlox".into(), "0123456789ab".into())], model_hash: "31e35c80fc".into(), ..record(settings.clone(), 9) };
        let mut varied = rec.clone();
        (varied.settings.subseed_strength, varied.subseed) = (0.25, Some(77));
        (varied.settings.seed_resize_from_w, varied.settings.seed_resize_from_h) = (512, 768);
        let text = parameters_text(&varied);
        assert!(text.contains("Variation seed strength: 0.25, Seed resize from: 512x768"), "{text}");
        let back = parse_parameters(&text).unwrap();
        assert_eq!((back.subseed, back.subseed_strength, back.seed_resize_from()), (Some(77), 0.25, Some((512, 768))));
        assert!(parse_parameters("a\nSteps: 2, Sampler: Euler, Seed resize from: big").unwrap_err().to_string().contains("Seed resize from"));
        let old = parse_parameters("a\nSteps: 2, Seed: 1, Seed resize from: -1x-1, ENSD: 31337").unwrap();
        assert_eq!((old.seed_resize_from(), old.eta_noise_seed_delta), (None, 31337));
        assert_eq!(parse_parameters("a\nSteps: 2, Sampler: Euler, ENSD: -5").unwrap().eta_noise_seed_delta, -5);
        // ENSD: written for samplers that draw noise, as A1111's `uses_ensd`, and read back.
        varied.settings.eta_noise_seed_delta = 31337;
        assert!(!parameters_text(&varied).contains("ENSD"), "Euler draws no noise");
        varied.sampler = "Euler a".into();
        let text = parameters_text(&varied);
        assert!(text.contains(", ENSD: 31337"), "{text}");
        assert_eq!(parse_parameters(&text).unwrap().eta_noise_seed_delta, 31337);
        let text = parameters_text(&rec);
        assert!(!text.contains("Variation"), "{text}");
        // A1111's order: the hash right before the name.
        assert!(text.contains("Size: 64x64, Model hash: 31e35c80fc, Model: miniworld,"), "{text}");
        let back = parse_parameters(&text).unwrap();
        assert_eq!(back.prompt, "a vlox emblem");
        assert_eq!(back.negative_prompt, "noise");
        assert_eq!((back.steps, back.cfg, back.seed, back.width, back.height), (12, 4.0, Some(9), 64, 64));
        assert_eq!(back.sampler, "euler");
        assert_eq!(back.loras, vec![LoraSetting { name: "vlox".into(), weight: 0.7, role: None, schedule: None }]);
        assert_eq!(back.mix, "merge");
        // A block-weighted, keyframed LoRA is written as its tag and comes back in the prompt.
        let mut rec2 = rec.clone();
        rec2.settings.loras = vec![LoraSetting { name: "vlox".into(), weight: 1.0, role: None, schedule: Some("1:lbw=SDXL-OUTALL:stop=10".into()) }];
        let text = parameters_text(&rec2);
        assert!(text.contains("<lora:vlox:1:lbw=SDXL-OUTALL:stop=10>"), "{text}");
        let back = parse_parameters(&text).unwrap();
        assert!(back.loras.is_empty());
        assert!(back.prompt.ends_with("<lora:vlox:1:lbw=SDXL-OUTALL:stop=10>"), "{}", back.prompt);
        // A batch's seeds: A1111's text means per-image; a shared generator's batch says so.
        assert_eq!(parse_parameters("a cat\nSteps: 2, Seed: 5, Batch size: 2, Batch pos: 1").unwrap().batch_seeds, BatchSeeds::PerImage);
        let mut rec3 = rec.clone();
        rec3.settings.batch_size = 2;
        for seeds in [BatchSeeds::Shared, BatchSeeds::PerImage] {
            rec3.settings.batch_seeds = seeds;
            let back = parse_parameters(&parameters_text(&rec3)).unwrap();
            assert_eq!((back.batch_size, back.batch_seeds), (2, seeds));
        }
        assert!(parse_parameters("a cat\nSteps: 2, Sampler: Euler, Batch seeds: sometimes").unwrap_err().to_string().contains("Batch seeds"));
    }

    #[test]
    fn a1111_second_order_samplers_with_karras_schedule() {
        let s = parse_parameters("a cat\nSteps: 20, Sampler: Heun, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("heun", "karras"));
        let s = parse_parameters("a cat\nSteps: 20, Sampler: Heun, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("heun", ""));
        let s = parse_parameters("a cat\nSteps: 20, Sampler: DPM2, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("dpm2", "karras"));
        let s = parse_parameters("a cat\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("dpmpp_2m_sde", "karras"));
        let s = parse_parameters("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Align Your Steps, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("euler_a", "ays"));
        let s = parse_parameters("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 1, Size: 64x64").unwrap();
        assert_eq!((s.sampler.as_str(), s.schedule.as_str()), ("dpmpp_2m_karras", ""));
    }
}
