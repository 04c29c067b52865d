//! Per-LoRA weights over layers and steps that A1111 users write by hand in `<lora:...>` tags:
//! block weights from hako-mikan/sd-webui-lora-block-weight (`lbw=`, `start=`, `stop=`,
//! `step=`) and weight keyframes from cheald/sd-webui-loractl (`<lora:x:0.2@0,1@0.5>`).
//! Both are multipliers on whatever the mixing strategy decides, applied by the `Mixer`, so
//! they show in the trace.
//!
//! Exactness. The rules are those of the extensions' code, including A1111's timing: during the
//! UNet call of 0-based step i, A1111's `sampling_step` still says max(i − 1, 0) (it is updated
//! after each step). So a loractl curve is read at s = max(i − 1, 0), as a fraction s / (T − 2)
//! when its last keyframe is ≤ 1, else as a step number; lbw's `start=`/`stop=` keep a LoRA on for
//! start ≤ i < stop. Block vectors of 12 (SDXL), 17 (SD 1.x), 20 (SDXL with every block) or 26
//! slots are placed by block id into lbw's 26 (BASE, IN00–IN11, M00, OUT00–OUT11); blocks a short
//! vector does not name get 0 (lbw's rule, also for a 17-slot vector on SDXL: OUT00–OUT02 are
//! off), modules outside every block (time and label embeddings) keep 1. Where lbw silently
//! ignores a malformed vector, we say what is wrong. Random elements (`R`, `U`) and elemental
//! weights (`lbwe=`) are refused: an image's metadata could not reproduce them.

use crate::error::{Error, Result};

/// lbw's 26 blocks.
pub const BLOCKS: usize = 26;

/// A weight that is constant or follows loractl keyframes `(weight, position)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    Constant(f64),
    Keyframes(Vec<(f64, f64)>),
}

impl Weight {
    /// loractl's value `w@p,w@p,...` (`;` and `~` also accepted); a value whose first entry has
    /// no `@` is a plain number (its first number; loractl ignores the rest).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::Argument(format!("LoRA weight '{text}': {why}; expected a number or keyframes WEIGHT@STEP,WEIGHT@STEP"));
        let entries: Vec<&str> = text.split([',', ';']).map(str::trim).collect();
        let num = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| bad(&format!("'{s}' is not a number")));
        let first = entries.first().copied().unwrap_or("");
        if !first.contains(['@', '~']) {
            return Ok(Self::Constant(num(first)?));
        }
        let mut kf = Vec::new();
        for e in entries {
            match e.split_once(['@', '~']) {
                Some((w, p)) => kf.push((num(w)?, num(p)?)),
                None => kf.push((num(e)?, 1.0)),
            }
        }
        kf.sort_by(|a, b| a.1.total_cmp(&b.1));
        Ok(Self::Keyframes(kf))
    }

    /// The weight in effect during 0-based step `i` of `steps` (A1111's timing, module doc).
    pub fn at(&self, i: usize, steps: usize) -> f64 {
        match self {
            Self::Constant(w) => *w,
            Self::Keyframes(kf) => {
                let s = i.saturating_sub(1) as f64;
                let last = kf.last().map_or(0.0, |k| k.1);
                let x = if last <= 1.0 {
                    if steps > 2 {
                        s / (steps - 2) as f64
                    } else {
                        1.0
                    }
                } else {
                    s
                };
                interp(x, kf)
            }
        }
    }

    pub fn is_constant(&self) -> bool {
        matches!(self, Self::Constant(_))
    }
}

/// numpy's `interp`: linear between keyframes, the end values held outside.
fn interp(x: f64, kf: &[(f64, f64)]) -> f64 {
    let (Some(first), Some(last)) = (kf.first(), kf.last()) else { return 0.0 };
    if x <= first.1 {
        return first.0;
    }
    if x >= last.1 {
        return last.0;
    }
    for w in kf.windows(2) {
        let ((w0, p0), (w1, p1)) = (w[0], w[1]);
        if x >= p0 && x <= p1 {
            return if p1 > p0 { w0 + (w1 - w0) * (x - p0) / (p1 - p0) } else { w1 };
        }
    }
    last.0
}

/// lbw's presets: its shipped defaults (17 slots, SD 1.x block ids, as lbw applies them to any
/// model) and the SDXL ones ComfyUI users know from the Inspire pack (12 slots).
const PRESETS: &[(&str, &str)] = &[
    ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    ("ALL0.5", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
    ("SDXL-ALL", "1,1,1,1,1,1,1,1,1,1,1,1"),
    ("SDXL-NONE", "0,0,0,0,0,0,0,0,0,0,0,0"),
    ("SDXL-INALL", "1,1,1,1,1,0,0,0,0,0,0,0"),
    ("SDXL-MIDALL", "1,0,0,0,0,1,0,0,0,0,0,0"),
    ("SDXL-OUTALL", "1,0,0,0,0,0,1,1,1,1,1,1"),
];

/// Where each slot of a vector of a given length goes among the 26 blocks.
fn slot_positions(len: usize) -> Option<Vec<usize>> {
    Some(match len {
        // BASE, IN04, IN05, IN07, IN08, MID, OUT00–OUT05
        12 => vec![0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19],
        // BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11
        17 => vec![0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25],
        // BASE, IN00–IN08, MID, OUT00–OUT08
        20 => (0..10).chain(13..23).collect(),
        26 => (0..26).collect(),
        _ => return None,
    })
}

/// lbw's block ratios from a preset name or a vector; `x` is the base for `X±v` elements.
pub fn parse_block_weights(text: &str, x: f64) -> Result<[f64; BLOCKS]> {
    let vector = PRESETS.iter().find(|(k, _)| *k == text.trim()).map_or(text, |(_, v)| v);
    let parts: Vec<&str> = vector.split(',').map(str::trim).collect();
    let Some(pos) = slot_positions(parts.len()) else {
        return Err(Error::Argument(format!(
            "lbw={text}: not a preset ({}) and not a block vector of 12 (SDXL), 17 (SD 1.x), 20 or 26 values (got {})",
            PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
            parts.len()
        )));
    };
    let mut out = [0.0; BLOCKS];
    for (p, v) in pos.into_iter().zip(parts) {
        out[p] = if let Some(rest) = v.strip_prefix('X') {
            let off = rest.trim();
            if off.is_empty() {
                x
            } else {
                x + off.parse::<f64>().map_err(|_| Error::Argument(format!("lbw={text}: '{v}': expected X, X+NUMBER or X-NUMBER")))?
            }
        } else if v == "R" || v == "U" {
            return Err(Error::Argument(format!("lbw={text}: random block weights ({v}) are not supported: an image's metadata could not reproduce them; write the numbers")));
        } else {
            v.parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(|| Error::Argument(format!("lbw={text}: '{v}' is not a number")))?
        };
    }
    Ok(out)
}

/// lbw's block (0..26) of a UNet module from its SGM path (`input_blocks.4.1.proj_in` → IN04);
/// `None` for modules outside every block.
pub fn block_of_sgm_path(sgm: &str) -> Option<usize> {
    let num = |rest: &str| rest.split('.').next().and_then(|n| n.parse::<usize>().ok());
    if let Some(rest) = sgm.strip_prefix("input_blocks.") {
        num(rest).filter(|n| *n < 12).map(|n| 1 + n)
    } else if sgm.starts_with("middle_block") {
        Some(13)
    } else if let Some(rest) = sgm.strip_prefix("output_blocks.") {
        num(rest).filter(|n| *n < 12).map(|n| 14 + n)
    } else {
        None
    }
}

/// What a `<lora:...>` tag says beyond its name.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSchedule {
    pub te: Weight,
    pub unet: Weight,
    /// lbw's 26 block ratios; `None`: 1 everywhere.
    pub blocks: Option<[f64; BLOCKS]>,
    /// The UNet LoRA is on for start ≤ step < stop.
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

impl LoraSchedule {
    /// The fields after the name in `<lora:NAME:...>`, read as A1111 + loractl + lbw read them:
    /// an item `k=v` is named, anything else positional; te = `te=` or the first positional
    /// (default 1), unet = `unet=` or the second (default: te). `dyn` and loractl's hires
    /// weights (`hr=`, `hrte=`, `hrunet=`) are accepted and have no effect here (no dynamic rank,
    /// no hires pass).
    pub fn parse(fields: &[&str]) -> Result<Self> {
        let mut positional = Vec::new();
        let mut named: Vec<(&str, &str)> = Vec::new();
        for f in fields {
            let parts: Vec<&str> = f.splitn(3, '=').collect();
            if parts.len() == 2 {
                named.push((parts[0].trim(), parts[1].trim()));
            } else {
                positional.push(f.trim());
            }
        }
        let get = |k: &str| named.iter().rev().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let te = match get("te").or(positional.first().copied()) {
            Some(t) => Weight::parse(t)?,
            None => Weight::Constant(1.0),
        };
        let unet = match get("unet").or(positional.get(1).copied()) {
            Some(u) => Weight::parse(u)?,
            None => te.clone(),
        };
        let int = |k: &str, v: &str| v.trim().parse::<usize>().map_err(|_| Error::Argument(format!("<lora:...:{k}={v}>: expected a step number")));
        let mut start = get("start").map(|v| int("start", v)).transpose()?;
        let mut stop = get("stop").map(|v| int("stop", v)).transpose()?;
        if let Some(step) = get("step") {
            if let Some((a, b)) = step.split_once('-') {
                start = Some(int("step", a)?);
                stop = Some(int("step", b)?);
            }
        }
        if let (Some(a), Some(b)) = (start, stop) {
            if a >= b {
                return Err(Error::Argument(format!("<lora:...:start={a}:stop={b}>: the LoRA would apply at no step (expected start < stop)")));
            }
        }
        if get("lbwe").is_some() {
            return Err(Error::Argument("<lora:...:lbwe=...>: lbw's elemental weights are not supported; use lbw= block weights".into()));
        }
        let x = match get("x") {
            Some(v) => v.parse::<f64>().map_err(|_| Error::Argument(format!("<lora:...:x={v}>: expected a number")))?,
            None => 1.0,
        };
        let blocks = get("lbw").or(get("w")).map(|v| parse_block_weights(v, x)).transpose()?;
        for (k, _) in &named {
            if !["te", "unet", "dyn", "hr", "hrte", "hrunet", "lbw", "w", "x", "start", "stop", "step"].contains(k) {
                return Err(Error::Argument(format!("<lora:...:{k}=...>: unknown field (known: te, unet, dyn, lbw, start, stop, step, x, hr, hrte, hrunet)")));
            }
        }
        Ok(Self { te, unet, blocks, start, stop })
    }

    /// Anything beyond one constant weight on every layer and step.
    pub fn is_plain(&self) -> bool {
        self.blocks.is_none() && self.start.is_none() && self.stop.is_none() && self.unet.is_constant() && self.te == self.unet
    }

    /// The weight varies with the step (loractl keyframes, start/stop).
    pub fn varies_per_step(&self) -> bool {
        !self.unet.is_constant() || self.start.is_some() || self.stop.is_some()
    }

    /// The UNet weight of a module in lbw block `block` (None: outside every block) at a step.
    pub fn unet_weight(&self, block: Option<usize>, step: usize, steps: usize) -> f64 {
        if self.start.is_some_and(|s| step < s) || self.stop.is_some_and(|s| step >= s) {
            return 0.0;
        }
        self.unet.at(step, steps) * self.block_ratio(block)
    }

    pub fn block_ratio(&self, block: Option<usize>) -> f64 {
        match (&self.blocks, block) {
            (Some(b), Some(i)) => b[i],
            _ => 1.0,
        }
    }

    /// The text encoders' weight: te at the first step (the prompt is encoded once, where every
    /// curve is at its start) times BASE.
    pub fn te_weight(&self) -> f64 {
        self.te.at(0, usize::MAX) * self.block_ratio(Some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approx(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn loractl_parsing_as_its_tests() {
        assert_eq!(Weight::parse("1").unwrap(), Weight::Constant(1.0));
        let k = Weight::Keyframes(vec![(1.0, 0.0), (0.5, 3.0), (1.0, 6.0)]);
        assert_eq!(Weight::parse("1@0,0.5@3,1@6").unwrap(), k);
        assert_eq!(Weight::parse("0.5@3,1@6,1@0").unwrap(), k);
        assert_eq!(Weight::parse("0.5@0,0.5@0.5,0@1").unwrap(), Weight::Keyframes(vec![(0.5, 0.0), (0.5, 0.5), (0.0, 1.0)]));
        assert_eq!(Weight::parse("1@0;0.5@3;1@6").unwrap(), k);
        assert_eq!(Weight::parse("1,0@0.5").unwrap(), Weight::Constant(1.0));
        assert_eq!(Weight::parse("0.5@0.2,1").unwrap(), Weight::Keyframes(vec![(0.5, 0.2), (1.0, 1.0)]));
        assert!(Weight::parse("a@1").is_err());
    }

    /// loractl's tests call `calculate_weight(m, sampling_step, T)`; during our step i A1111's
    /// sampling_step is max(i − 1, 0), so their step s is our step s + 1.
    #[test]
    fn loractl_interpolation_as_its_tests() {
        let at = |w: &str, s: usize, t: usize| Weight::parse(w).unwrap().at(s + 1, t);
        for s in [0, 15, 30] {
            assert_eq!(at("1.0", s, 30), 1.0);
        }
        assert!(approx(at("0.75@0;0.5@3;1@6", 0, 30), 0.75));
        assert!(approx(at("0.75@0;0.5@3;1@6", 3, 30), 0.5));
        assert!(approx(at("0.75@0;0.5@3;1@6", 6, 30), 1.0));
        assert!(approx(at("0.75@0;0.5@3;1@6", 9, 30), 1.0));
        assert!(approx(at("0.5@5,1.0@10", 0, 30), 0.5));
        assert!(approx(at("0.5@5,1.0@10", 5, 30), 0.5));
        assert!(approx(at("0.5@5,1.0@10", 8, 30), 0.8));
        assert!(approx(at("0.5@5,1.0@10", 15, 30), 1.0));
        // README: 0@0,1@0.5,0@1 over 20 steps rises to 1 at the middle and back to 0 at the end.
        let w = Weight::parse("0@0,1@0.5,0@1").unwrap();
        assert_eq!(w.at(0, 20), 0.0);
        assert!(approx(w.at(5, 20), 4.0 / 9.0));
        assert!(approx(w.at(10, 20), 1.0));
        assert_eq!(w.at(19, 20), 0.0);
        // README: 0.25@0.5,1@1 holds 0.25 to the middle, then ramps to 1.
        let w = Weight::parse("0.25@0.5,1@1").unwrap();
        assert!(approx(w.at(5, 20), 0.25));
        assert!(approx(w.at(14, 20), 0.25 + 0.75 * (13.0 / 18.0 - 0.5) / 0.5));
        assert!(approx(w.at(19, 20), 1.0));
    }

    #[test]
    fn loractl_and_a1111_fields() {
        let s = LoraSchedule::parse(&["1"]).unwrap();
        assert!(s.is_plain());
        // <lora:pixel:1:0@5,1@6>: te 1, unet absolute keyframes.
        let s = LoraSchedule::parse(&["1", "0@5,1@6"]).unwrap();
        assert_eq!(s.te, Weight::Constant(1.0));
        assert_eq!(s.unet_weight(None, 6, 30), 0.0); // sampling_step 5
        assert_eq!(s.unet_weight(None, 7, 30), 1.0); // sampling_step 6
        // te= and unet=: the other falls back as loractl does.
        let s = LoraSchedule::parse(&["te=0.5@0,1@1"]).unwrap();
        assert_eq!(s.unet, s.te);
        let s = LoraSchedule::parse(&["unet=0@0,1@1"]).unwrap();
        assert_eq!(s.te, Weight::Constant(1.0));
        let s = LoraSchedule::parse(&["0.5", "hr=1.0"]).unwrap();
        assert_eq!(s.unet, Weight::Constant(0.5));
        assert!(LoraSchedule::parse(&["1", "foo=2"]).is_err());
        assert!(LoraSchedule::parse(&["1", "lbwe=ATTNON"]).is_err());
    }

    #[test]
    fn lbw_vectors_presets_and_steps() {
        // A 12-slot SDXL vector lands on BASE, IN04, IN05, IN07, IN08, M00, OUT00–OUT05.
        let b = parse_block_weights("1,2,3,4,5,6,7,8,9,10,11,12", 1.0).unwrap();
        let at: Vec<usize> = (0..BLOCKS).filter(|&i| b[i] != 0.0).collect();
        assert_eq!(at, vec![0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(b[13], 6.0);
        // lbw's 17-slot ALL on SDXL: IN00, IN03, IN06 and OUT00–OUT02 are off.
        let all = parse_block_weights("ALL", 1.0).unwrap();
        for off in [1, 4, 7, 14, 15, 16] {
            assert_eq!(all[off], 0.0, "block {off}");
        }
        assert_eq!(all[17], 1.0);
        // README: 26 values, BASE and IN00–IN11 on, MID and OUT off.
        let v = "1,1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0";
        let b = parse_block_weights(v, 1.0).unwrap();
        assert!((0..13).all(|i| b[i] == 1.0) && (13..26).all(|i| b[i] == 0.0));
        // X with x=: base ± offset.
        let b = parse_block_weights("X,1,1,1,1,1,1,1,1,1,1,X+0.2", 0.7).unwrap();
        assert!(approx(b[0], 0.7) && approx(b[19], 0.9));
        assert!(parse_block_weights("1,1,1", 1.0).is_err());
        assert!(parse_block_weights("R,1,1,1,1,1,1,1,1,1,1,1", 1.0).is_err());
        // start=/stop=/step=: on for start ≤ i < stop.
        let s = LoraSchedule::parse(&["1", "lbw=SDXL-ALL", "stop=10"]).unwrap();
        assert_eq!(s.unet_weight(Some(5), 9, 30), 1.0);
        assert_eq!(s.unet_weight(Some(5), 10, 30), 0.0);
        let s = LoraSchedule::parse(&["0.8", "lbw=SDXL-OUTALL", "step=5-10"]).unwrap();
        assert_eq!(s.unet_weight(Some(14), 4, 30), 0.0);
        assert!(approx(s.unet_weight(Some(14), 5, 30), 0.8));
        assert_eq!(s.unet_weight(Some(5), 5, 30), 0.0); // IN04 is off in SDXL-OUTALL
        assert_eq!(s.unet_weight(None, 5, 30), 0.8); // outside every block: 1
        assert_eq!(s.unet_weight(Some(14), 10, 30), 0.0);
        assert!(approx(s.te_weight(), 0.8));
        assert_eq!(block_of_sgm_path("input_blocks.4.1.proj_in"), Some(5));
        assert_eq!(block_of_sgm_path("middle_block.1.proj_in"), Some(13));
        assert_eq!(block_of_sgm_path("output_blocks.11.0.conv1"), Some(25));
        assert_eq!(block_of_sgm_path("time_embed.0"), None);
    }
}
