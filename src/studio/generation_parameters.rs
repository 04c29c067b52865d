//! What A1111 1.10 makes of an infotext when it is pasted or read back: its
//! `parse_generation_parameters` in full (the defaults it fills in, styles taken back out of the
//! prompts, the old hires-fix sizes, the `Version` back-compatibility flags), then the callbacks
//! its built-in Lora extension runs on the result (`AddNet` fields become `<lora:…>` tags, a
//! `Lora hashes` entry renames a tag to the library's LoRA of that hash). This is the
//! `parameters` dict of `/sdapi/v1/png-info`, which clients read as A1111 answers it.
//!
//! The dict is kept as Python keeps it (insertion order, a key set again keeps its place, values
//! typed as A1111 types them), since the order is part of the answer and the `AddNet` callback's
//! output depends on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use regex::Regex;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::dynamic_prompt::PromptStyle;
use crate::error::{Error, Result};

/// A Python dict of parsed parameters: insertion order, a re-assigned key keeps its place.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParameters(Vec<(String, Value)>);

impl GenerationParameters {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value as Python's `str` would hold it; `None` for a missing key or a number.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let (key, value) = (key.into(), value.into());
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    fn set_default(&mut self, key: &str, value: impl Into<Value>) {
        if !self.contains(key) {
            self.set(key, value);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl Serialize for GenerationParameters {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// What the parsing looks up outside the text, as A1111 finds it in its styles database and
/// its list of LoRAs on disk.
#[derive(Debug, Clone, Default)]
pub struct PasteContext {
    /// `styles.csv` as A1111's dict of it: a name given twice kept at its first place with its
    /// last text.
    styles: Vec<PromptStyle>,
    /// A LoRA's short hash (the first 12 hex digits of its addnet hash) → its name here.
    lora_names: HashMap<String, String>,
    /// What could not be read (a bad `styles.csv`, a library that does not open): parsing goes
    /// on without it, as A1111 reports a bad styles file and goes on.
    pub warnings: Vec<String>,
}

impl PasteContext {
    pub fn new(styles: &[PromptStyle], loras: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut kept: Vec<PromptStyle> = Vec::with_capacity(styles.len());
        for s in styles {
            match kept.iter_mut().find(|k| k.name == s.name) {
                Some(k) => *k = s.clone(),
                None => kept.push(s.clone()),
            }
        }
        Self { styles: kept, lora_names: loras.into_iter().collect(), warnings: vec![] }
    }

    /// What A1111 consults for `infotext`: the library's `styles.csv`, and the LoRAs it knows by
    /// hash, looked up only when the text has `Lora hashes`: a model's own `loras/` folder, then
    /// the library (whose names win). A missing library or folder is none.
    pub fn load(library: Option<&Path>, own_loras: Option<&Path>, infotext: &str) -> Self {
        let mut warnings = vec![];
        let library = library.filter(|r| r.exists());
        let styles_csv = library.map(|r| r.join("styles.csv")).filter(|p| p.exists());
        let styles = match styles_csv.map(|p| super::read_styles(&p)).transpose() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                warnings.push(format!("styles left out: {e}"));
                vec![]
            }
        };
        let mut loras = vec![];
        if infotext.contains("Lora hashes") {
            let mut files: Vec<PathBuf> = own_loras.and_then(|d| std::fs::read_dir(d).ok()).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
            files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
            files.sort();
            for p in files {
                // A file that is no LoRA is no candidate, as A1111 lists only those it loads.
                if let Ok(hash) = crate::lora::addnet_hash_of(&p) {
                    loras.push((hash[..12].to_string(), p.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
                }
            }
            // Only a library that exists: reading pictures never makes one.
            if let Some(root) = library.filter(|r| r.join("library.sqlite").is_file()) {
                let listed = crate::lora::library::LoraLibrary::open(root).and_then(|lib| lib.list(&Default::default()));
                match listed {
                    Ok(entries) => loras.extend(entries.into_iter().filter(|e| e.addnet_hash.len() >= 12).map(|e| (e.addnet_hash[..12].to_string(), e.display_name))),
                    Err(e) => warnings.push(format!("the library's LoRAs left out of `Lora hashes` renames: {e}")),
                }
            }
        }
        Self { warnings, ..Self::new(&styles, loras) }
    }
}

/// A1111 1.10's `parse_generation_parameters(text)` with its default options, followed by the
/// Lora extension's `infotext_pasted` callbacks. An error is where A1111 raises (a style with
/// two `{prompt}`s, an old `First pass size` that is no integer), which fails its request too.
pub fn parse_generation_parameters(text: &str, ctx: &PasteContext) -> Result<GenerationParameters> {
    let (prompt, negative, fields) = super::split_infotext(text);
    let mut res = GenerationParameters::default();
    for (k, v) in fields {
        match re_imagesize().captures(&v) {
            Some(c) => {
                res.set(format!("{k}-1"), &c[1]);
                res.set(format!("{k}-2"), &c[2]);
            }
            None => res.set(k, v),
        }
    }

    // Styles whose text the prompts end with (or are wrapped in) are taken back out, as the
    // "Apply if any" default does; a hires prompt is compared without its styles.
    let (found, prompt_bare, negative_bare) = extract_styles(&ctx.styles, &prompt, &negative)?;
    let mut same_hr_styles = true;
    let hires_given = res.contains("Hires prompt") || res.contains("Hires negative prompt");
    if hires_given && parse_version(res.get_str("Version")).is_none_or(|v| v > version("1.8.0-139")) {
        let hr_prompt = res.get_str("Hires prompt").unwrap_or(&prompt).to_string();
        let hr_negative = res.get_str("Hires negative prompt").unwrap_or(&negative).to_string();
        let (hr_found, hr_prompt_bare, hr_negative_bare) = extract_styles(&ctx.styles, &hr_prompt, &hr_negative)?;
        same_hr_styles = found == hr_found;
        if same_hr_styles {
            res.set("Hires prompt", if hr_prompt_bare == prompt_bare { String::new() } else { hr_prompt_bare });
            res.set("Hires negative prompt", if hr_negative_bare == negative_bare { String::new() } else { hr_negative_bare });
        }
    }
    let (prompt, negative) = if same_hr_styles {
        if !found.is_empty() {
            res.set("Styles array", found);
        }
        (prompt_bare, negative_bare)
    } else {
        (prompt, negative)
    };
    res.set("Prompt", prompt.clone());
    res.set("Negative prompt", negative.clone());

    res.set_default("Clip skip", "1");
    if let Some(hypernet) = res.get("Hypernet").map(python_str) {
        let strength = res.get("Hypernet strength").map(python_str).unwrap_or_else(|| "1.0".into());
        let p = format!("{}<hypernet:{hypernet}:{strength}>", res.get("Prompt").map(python_str).unwrap_or_default());
        res.set("Prompt", p);
    }
    if !res.contains("Hires resize-1") {
        res.set("Hires resize-1", 0);
        res.set("Hires resize-2", 0);
    }
    res.set_default("Hires sampler", "Use same sampler");
    res.set_default("Hires schedule type", "Use same scheduler");
    res.set_default("Hires checkpoint", "Use same checkpoint");
    res.set_default("Hires prompt", "");
    res.set_default("Hires negative prompt", "");
    res.set_default("Mask mode", "Inpaint masked");
    res.set_default("Masked content", "original");
    res.set_default("Inpaint area", "Whole picture");
    res.set_default("Masked area padding", 32);
    restore_old_hires_fix_params(&mut res)?;
    res.set_default("RNG", "GPU");
    res.set_default("Schedule type", "Automatic");
    res.set_default("Schedule max sigma", 0);
    res.set_default("Schedule min sigma", 0);
    res.set_default("Schedule rho", 0);
    res.set_default("VAE Encoder", "Full");
    res.set_default("VAE Decoder", "Full");
    res.set_default("FP8 weight", "Disable");
    if !res.contains("Cache FP16 weight for LoRA") && res.get_str("FP8 weight") != Some("Disable") {
        res.set("Cache FP16 weight for LoRA", false);
    }
    // `Emphasis: Original` is the default only where the prompts use emphasis.
    let emphasised = [&prompt, &negative].iter().any(|p| crate::sdxl::prompt::attention_pairs(p).iter().any(|(t, w)| *w != 1.0 && t != "BREAK"));
    if emphasised {
        res.set_default("Emphasis", "Original");
    }
    res.set_default("Refiner switch by sampling steps", false);
    backcompat(&mut res);

    // The callbacks run one after another; one that raises leaves the dict as it was.
    addnet_loras(&mut res);
    if let Some(p) = renamed_by_hash(&res, &ctx.lora_names) {
        res.set("Prompt", p);
    }
    Ok(res)
}

/// `infotext_utils.re_imagesize`, `^(\d+)x(\d+)$`: Python's `\d` is any decimal digit and its
/// `$` also matches before a final newline.
fn re_imagesize() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\A(\d+)x(\d+)\n?\z").expect("a valid regex"))
}

/// `str(value)` for the values this dict holds.
fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// Python's `str.strip()`: Unicode whitespace, which includes U+001C..U+001F where Rust's
/// `trim` does not.
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// `StyleDatabase.extract_styles_from_prompt`: repeatedly the first style (in the file's order)
/// that the prompts carry is taken out; the names come back in the order they were applied.
fn extract_styles(styles: &[PromptStyle], prompt: &str, negative: &str) -> Result<(Vec<String>, String, String)> {
    let mut applicable: Vec<&PromptStyle> = styles.iter().collect();
    let (mut prompt, mut negative) = (prompt.to_string(), negative.to_string());
    let mut extracted = vec![];
    loop {
        let mut found = None;
        for (i, style) in applicable.iter().enumerate() {
            if style.prompt.is_empty() && style.negative_prompt.is_empty() {
                continue;
            }
            let Some(p) = extract_style_text(&style.prompt, &prompt)? else { continue };
            let Some(n) = extract_style_text(&style.negative_prompt, &negative)? else { continue };
            (prompt, negative) = (p, n);
            found = Some(i);
            break;
        }
        match found {
            Some(i) => extracted.push(applicable.remove(i).name.clone()),
            None => break,
        }
    }
    extracted.reverse();
    Ok((extracted, prompt, negative))
}

/// `styles.extract_style_text_from_prompt`: the prompt without the style's text, when the
/// stripped prompt is wrapped in a `{prompt}` style or ends with a plain one.
fn extract_style_text(style: &str, prompt: &str) -> Result<Option<String>> {
    let (prompt, style) = (python_strip(prompt), python_strip(style));
    if style.contains("{prompt}") {
        let parts: Vec<&str> = style.splitn(3, "{prompt}").collect();
        let [left, right] = parts[..] else {
            return Err(Error::Argument(format!("style text {style:?} has more than one {{prompt}}; A1111 fails on it too (ValueError: too many values to unpack)")));
        };
        if prompt.starts_with(left) && prompt.ends_with(right) {
            // Python's slice `[len(left):len(prompt) - len(right)]` is empty where they overlap.
            let (from, to) = (left.len(), prompt.len() - right.len());
            return Ok(Some(if from <= to { prompt[from..to].to_string() } else { String::new() }));
        }
    } else if let Some(rest) = prompt.strip_suffix(style) {
        return Ok(Some(rest.strip_suffix(", ").unwrap_or(rest).to_string()));
    }
    Ok(None)
}

/// `restore_old_hires_fix_params`: pictures of the first hires fix name the first pass's size
/// (`First pass size: 0x0` meaning "about 512²"); it becomes today's size and hires resize.
fn restore_old_hires_fix_params(res: &mut GenerationParameters) -> Result<()> {
    let (Some(w), Some(h)) = (res.get("First pass size-1"), res.get("First pass size-2")) else { return Ok(()) };
    let (mut first_w, mut first_h) = (python_int(w)?, python_int(h)?);
    let width = res.get("Size-1").map(python_int).transpose()?.unwrap_or(512);
    let height = res.get("Size-2").map(python_int).transpose()?.unwrap_or(512);
    if first_w == 0 || first_h == 0 {
        (first_w, first_h) = old_hires_fix_first_pass_dimensions(width, height)?;
    }
    res.set("Size-1", first_w);
    res.set("Size-2", first_h);
    res.set("Hires resize-1", width);
    res.set("Hires resize-2", height);
    Ok(())
}

/// `processing.old_hires_fix_first_pass_dimensions`: the size of about 512² pixels with the
/// picture's aspect, in multiples of 64.
fn old_hires_fix_first_pass_dimensions(width: i64, height: i64) -> Result<(i64, i64)> {
    let pixels = width as f64 * height as f64;
    if pixels <= 0.0 {
        let why = if pixels == 0.0 { "ZeroDivisionError: division by zero" } else { "ValueError: math domain error" };
        return Err(Error::Argument(format!("old hires fix: a size of {width}x{height} has no first pass ({why} in A1111 too)")));
    }
    let scale = (262144.0 / pixels).sqrt();
    Ok(((scale * width as f64 / 64.0).ceil() as i64 * 64, (scale * height as f64 / 64.0).ceil() as i64 * 64))
}

/// Python's `int(x)` on the strings and numbers of this dict: surrounding whitespace, a sign,
/// `_` between digits, and any Unicode decimal digit. Numbers past i64 are refused (Python's
/// integers have no bound).
pub(crate) fn python_int(v: &Value) -> Result<i64> {
    let text = match v {
        Value::Number(n) => return n.as_i64().ok_or_else(|| Error::Argument(format!("{n} is no integer"))),
        Value::String(s) => s.as_str(),
        other => return Err(Error::Argument(format!("{other} is no integer"))),
    };
    let bad = || Error::Argument(format!("invalid literal for int() with base 10: {text:?}"));
    let body = python_strip(text);
    let (negative, digits) = match body.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, body.strip_prefix('+').unwrap_or(body)),
    };
    let mut value: i64 = 0;
    let mut previous_digit = false;
    for c in digits.chars() {
        if c == '_' && previous_digit {
            previous_digit = false;
            continue;
        }
        let d = decimal_digit(c).ok_or_else(bad)?;
        value = value.checked_mul(10).and_then(|v| v.checked_add(d as i64)).ok_or_else(bad)?;
        previous_digit = true;
    }
    if !previous_digit {
        return Err(bad());
    }
    Ok(if negative { -value } else { value })
}

/// The value of a Unicode decimal digit (`\p{Nd}`). Unicode keeps each script's digits as a
/// run of ten code points 0..9, and adjacent runs are whole, so a digit's value is its distance
/// from the start of its run of digits, modulo ten.
fn decimal_digit(c: char) -> Option<u32> {
    static ND: OnceLock<Regex> = OnceLock::new();
    let nd = ND.get_or_init(|| Regex::new(r"\A\p{Nd}\z").expect("a valid regex"));
    let is_digit = |c: char| nd.is_match(c.encode_utf8(&mut [0; 4]));
    if !is_digit(c) {
        return None;
    }
    let mut start = c as u32;
    while let Some(p) = start.checked_sub(1).and_then(char::from_u32).filter(|&p| is_digit(p)) {
        start = p as u32;
    }
    Some((c as u32 - start) % 10)
}

/// `infotext_versions.parse_version`: a `git describe` version cut after its commit count
/// (`v1.7.0-225-gabc` → `v1.7.0-225`), read as `packaging.version.parse` reads it (PEP 440, so
/// `-225` is a post-release); anything else (Forge's `f2.0.1v1.10.1-…`) is no version.
fn parse_version(text: Option<&str>) -> Option<pep440_rs::Version> {
    static CUT: OnceLock<Regex> = OnceLock::new();
    let cut = CUT.get_or_init(|| Regex::new(r"\A([^-]+-[^-]+)-").expect("a valid regex"));
    let text = text?;
    let text = cut.captures(text).map_or(text, |c| c.get(1).map_or(text, |m| m.as_str()));
    pep440_rs::Version::from_str(text).ok()
}

fn version(text: &str) -> pep440_rs::Version {
    pep440_rs::Version::from_str(text).expect("a valid version")
}

/// `infotext_versions.backcompat`: pictures from older versions ask for the behaviour they were
/// made with.
fn backcompat(res: &mut GenerationParameters) {
    let Some(ver) = parse_version(res.get_str("Version")) else { return };
    if ver < version("1.6.0") && res.get("Prompt").map(python_str).is_some_and(|p| p.contains('[')) {
        res.set("Old prompt editing timelines", true);
    }
    if ver < version("1.6.0") && matches!(res.get_str("Sampler"), Some("DDIM" | "PLMS")) {
        res.set("Pad conds v0", true);
    }
    if ver < version("v1.7.0-225") {
        res.set("Downcast alphas_cumprod", true);
    }
    if ver < version("1.8.0") && res.get("Refiner").is_some_and(python_truthy) {
        res.set("Refiner switch by sampling steps", true);
    }
}

fn python_truthy(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.is_empty(),
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The Lora extension's first callback (`networks.infotext_pasted`): the fields of kohya's
/// additional-networks extension (`AddNet Module 1: LoRA, AddNet Model 1: name(hash), AddNet
/// Weight A 1: 0.7`) become `<lora:name:0.7>` tags on a new line of the prompt, in the dict's
/// order.
fn addnet_loras(res: &mut GenerationParameters) {
    static NAME: OnceLock<Regex> = OnceLock::new();
    let name_re = NAME.get_or_init(|| Regex::new(r"\A(.*)\s*\([0-9a-fA-F]+\)").expect("a valid regex"));
    let mut added = String::new();
    for (k, _) in res.iter() {
        let Some(num) = k.strip_prefix("AddNet Model ") else { continue };
        if res.get_str(&format!("AddNet Module {num}")) != Some("LoRA") {
            continue;
        }
        let Some(name) = res.get(k).map(python_str) else { continue };
        let name = name_re.captures(&name).and_then(|c| c.get(1)).map_or(name.clone(), |m| m.as_str().to_string());
        let multiplier = res.get(&format!("AddNet Weight A {num}")).map(python_str).unwrap_or_else(|| "1.0".into());
        added.push_str(&format!("<lora:{name}:{multiplier}>"));
    }
    if !added.is_empty() {
        let p = format!("{}\n{added}", res.get("Prompt").map(python_str).unwrap_or_default());
        res.set("Prompt", p);
    }
}

/// The Lora extension's second callback (`lora_script.infotext_pasted`): a `<lora:NAME:` tag
/// whose `Lora hashes` entry names a LoRA in the library is renamed to that LoRA's name here.
/// `None` where nothing changes or where A1111's callback raises (an entry without `:`).
fn renamed_by_hash(res: &GenerationParameters, lora_names: &HashMap<String, String>) -> Option<String> {
    static TAG: OnceLock<Regex> = OnceLock::new();
    let tag = TAG.get_or_init(|| Regex::new(r"<lora:([^:]+):").expect("a valid regex"));
    let hashes = res.get("Lora hashes").filter(|v| python_truthy(v)).map(python_str)?;
    let mut by_alias = HashMap::new();
    for entry in hashes.split(',') {
        let (alias, hash) = python_strip(entry).split_once(':')?;
        by_alias.insert(python_strip(alias).to_string(), python_strip(hash).to_string());
    }
    let prompt = res.get("Prompt").map(python_str)?;
    let out = tag.replace_all(&prompt, |c: &regex::Captures| match by_alias.get(&c[1]).and_then(|h| lora_names.get(h)) {
        Some(name) => format!("<lora:{name}:"),
        None => c[0].to_string(),
    });
    Some(out.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goldens from tools/parity/make_generation_parameters_fixtures.py (A1111 1.10's code, with
    /// its styles database and LoRA hash lookup given per case): every pair, in order, or an error
    /// where A1111 raises.
    #[test]
    fn parameters_equal_a1111s() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/image_info/generation_parameters.json");
        let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 50);
        for (i, case) in cases.iter().enumerate() {
            let text = case["infotext"].as_str().unwrap();
            let styles: Vec<PromptStyle> = serde_json::from_value(case["styles"].clone()).unwrap();
            let loras = case["loras"].as_object().unwrap().iter().map(|(h, n)| (h.clone(), n.as_str().unwrap().to_string()));
            let got = parse_generation_parameters(text, &PasteContext::new(&styles, loras));
            match case["expected"].get("pairs") {
                Some(pairs) => {
                    let want: Vec<(String, Value)> = serde_json::from_value(pairs.clone()).unwrap();
                    let got = got.unwrap_or_else(|e| panic!("case {i} {text:?}: {e}"));
                    assert_eq!(got.0, want, "case {i} {text:?}");
                }
                None => assert!(got.is_err(), "case {i} {text:?}: A1111 raises {}", case["expected"]["error"]),
            }
        }
    }

    /// The styles and LoRAs a library and a model's `loras/` folder give.
    #[test]
    fn context_from_a_library_and_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let own = concat!(env!("CARGO_MANIFEST_DIR"), "/models/miniworld/loras");
        std::fs::write(dir.path().join("styles.csv"), "name,prompt,negative_prompt\n# note,x,\nDotted,dotted style,\nDotted,\"polka dots\",\n").unwrap();
        let hash = crate::lora::addnet_hash_of(&Path::new(own).join("krin.safetensors")).unwrap();
        let text = format!("a <lora:old_krin:0.8>, polka dots\nSteps: 20, Seed: 1, Lora hashes: \"old_krin: {}\"", &hash[..12]);
        let ctx = PasteContext::load(Some(dir.path()), Some(Path::new(own)), &text);
        let got = parse_generation_parameters(&text, &ctx).unwrap();
        assert_eq!(got.get_str("Prompt"), Some("a <lora:krin:0.8>"));
        assert_eq!(got.get("Styles array"), Some(&serde_json::json!(["Dotted"])));
        // No `Lora hashes`: no LoRA file is read.
        let ctx = PasteContext::load(None, Some(Path::new("/nonexistent")), "a cat");
        assert!(ctx.lora_names.is_empty() && ctx.styles.is_empty());
        // A bad styles.csv is left out with a warning; parsing goes on.
        std::fs::write(dir.path().join("styles.csv"), "prompt\nx\n").unwrap();
        let ctx = PasteContext::load(Some(dir.path()), None, "a cat");
        assert!(ctx.styles.is_empty() && ctx.warnings.len() == 1 && ctx.warnings[0].contains("styles.csv"), "{:?}", ctx.warnings);
    }

    /// Texts made of the pieces the parser cares about, with styles made of them too: an answer
    /// or an error, never a panic.
    #[test]
    fn arbitrary_texts_never_panic() {
        let pieces = ["(", ")", "[", "]", ":", ",", " ", "\"", "\\", "\n", "{prompt}", "BREAK", "a", "1.5", "0x0", "512x", "\u{665}", "\u{1c}", "é", "Negative prompt:", "Steps: 2, ", "Version: v1.5.0, ", "First pass size: ", "Size: 0x8, ", "Hires prompt: ", "AddNet Model 1: n(ab), AddNet Module 1: LoRA, ", "Lora hashes: \"a: 0123456789ab, b\", ", "<lora:a:"];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..3000 {
            let mut text = |len: usize| (0..len).map(|_| pieces[next(pieces.len())]).collect::<String>();
            let (t, sp, sn) = (text(24), text(3), text(2));
            let styles = [PromptStyle { name: "s".into(), prompt: sp, negative_prompt: sn }];
            let _ = parse_generation_parameters(&t, &PasteContext::new(&styles, [("0123456789ab".to_string(), "b".to_string())]));
        }
    }

    #[test]
    fn python_ints_and_digits() {
        for (text, want) in [("12", Some(12)), (" +3 ", Some(3)), ("-4", Some(-4)), ("1_000", Some(1000)), ("\u{665}\u{661}\u{662}", Some(512)), ("\u{1d7ce}\u{1d7e3}", Some(1)), ("\u{1d7d7}\u{1d7e2}", Some(90)), ("", None), ("1__0", None), ("_1", None), ("1_", None), ("1.5", None), ("x", None)] {
            assert_eq!(python_int(&Value::String(text.into())).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn versions_as_packaging_reads_them() {
        assert!(parse_version(Some("v1.7.0-225-gabc")).is_some_and(|v| v == version("1.7.0.post225")));
        assert!(parse_version(Some("f2.0.1v1.10.1-previous-313-g8a042934")).is_none());
        assert!(parse_version(Some("v1.7.0-RC-5-gabc")).is_some_and(|v| v < version("1.7.0")));
        assert!(parse_version(None).is_none());
    }
}
