//! Step windows per role: the training-free half of CRAFT-LoRA (arXiv 2602.18936), and what
//! A1111 users do by hand with lbw's `start=` / `stop=`.
//!
//! Why it works: a diffusion sampler lays out shapes and colours in its early, high-noise steps
//! and refines texture in its late ones. A subject LoRA's job (what the thing looks like) is
//! decided early, a style LoRA's (how it is rendered) late; when both run on every step, as in a
//! merge, the style's update also overwrites the subject's shapes. So each role gets a window of
//! the denoising progress p = step / steps: by default the subject on [0, 0.7) and the style on
//! [0.3, 1], overlapping in the middle (CRAFT's 1–35 and 15–50 of 50 steps). Other roles run on
//! every step. Inside its window a LoRA runs at its full strength on every layer it adapts.
//!
//! The optional asymmetric CFG (`--asymmetric-cfg`, a mixer option for every per-step strategy)
//! runs the unconditional half of classifier-free guidance on the base weights, so the guidance
//! direction includes the LoRAs' whole effect instead of its difference between prompts.

use super::{MixPlan, MixStrategy};
use crate::error::{Error, Result};
use crate::lora::Role;

/// A window `[start, end)` of the progress p = step / steps (`end = 1` includes the last step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub start: f64,
    pub end: f64,
}

impl Window {
    pub const ALWAYS: Window = Window { start: 0.0, end: 1.0 };

    pub fn contains(&self, step: usize, steps: usize) -> bool {
        let p = step as f64 / steps.max(1) as f64;
        p >= self.start && (p < self.end || self.end >= 1.0)
    }
}

/// The windows of each role.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleWindows {
    pub subject: Window,
    pub style: Window,
    pub other: Window,
}

impl Default for RoleWindows {
    fn default() -> Self {
        Self { subject: Window { start: 0.0, end: 0.7 }, style: Window { start: 0.3, end: 1.0 }, other: Window::ALWAYS }
    }
}

impl RoleWindows {
    /// `subject=0:0.7,style=0.3:1[,other=0:1]`: fractions of the steps; roles left out keep
    /// their defaults.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut w = Self::default();
        if spec.trim().is_empty() {
            return Err(Error::Argument("--windows \"\": expected ROLE=START:END,... (leave the flag out for the defaults)".into()));
        }
        let mut seen: Vec<&str> = vec![];
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || Error::Argument(format!("--windows {spec}: '{part}': expected ROLE=START:END with ROLE subject, style or other (concept) and 0 <= START < END <= 1"));
            let (role, range) = part.split_once('=').ok_or_else(bad)?;
            let (a, b) = range.split_once(':').ok_or_else(bad)?;
            let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) || a >= b {
                return Err(bad());
            }
            let win = Window { start: a, end: b };
            // `concept` is `--lora`'s name for the roles this window covers.
            let role = match role.trim() {
                "concept" => "other",
                r => r,
            };
            if seen.contains(&role) {
                return Err(Error::Argument(format!("--windows {spec}: the {role} window is given twice")));
            }
            seen.push(role);
            match role {
                "subject" => w.subject = win,
                "style" => w.style = win,
                "other" => w.other = win,
                _ => return Err(bad()),
            }
        }
        Ok(w)
    }

    pub fn of(&self, role: Role) -> Window {
        match role {
            Role::Subject => self.subject,
            Role::Style => self.style,
            _ => self.other,
        }
    }
}

pub struct Windows {
    windows: RoleWindows,
}

impl Windows {
    pub fn new(windows: RoleWindows) -> Self {
        Self { windows }
    }
}

impl MixStrategy for Windows {
    fn name(&self) -> &'static str {
        "windows"
    }

    fn weights(&self, plan: &MixPlan, step: usize, steps: usize, _pass: usize) -> Vec<Vec<f64>> {
        let on: Vec<bool> = plan.loras.iter().map(|l| self.windows.of(l.role).contains(step, steps)).collect();
        plan.layers
            .iter()
            .map(|l| plan.loras.iter().enumerate().map(|(j, m)| if on[j] && l.modules[j].is_some() { m.strength } else { 0.0 }).collect())
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        let w = |w: Window| serde_json::json!([w.start, w.end]);
        serde_json::json!({ "subject": w(self.windows.subject), "style": w(self.windows.style), "other": w(self.windows.other) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_at_50_steps_are_crafts() {
        let w = RoleWindows::default();
        let on = |win: Window| (0..50).filter(|&s| win.contains(s, 50)).collect::<Vec<_>>();
        assert_eq!(on(w.subject), (0..35).collect::<Vec<_>>());
        assert_eq!(on(w.style), (15..50).collect::<Vec<_>>());
        let p = RoleWindows::parse("style=0.5:1").unwrap();
        assert_eq!(p.style, Window { start: 0.5, end: 1.0 });
        assert_eq!(p.subject, w.subject);
        assert!(RoleWindows::parse("style=0.5").is_err());
        assert!(RoleWindows::parse("style=0.6:0.5").is_err());
        assert!(RoleWindows::parse("hue=0:1").is_err());
        assert!(RoleWindows::parse("").is_err());
        assert!(RoleWindows::parse("subject=0:0.5,subject=0.5:1").unwrap_err().to_string().contains("twice"));
        assert_eq!(RoleWindows::parse("concept=0:0.3").unwrap().other.end, 0.3);
    }
}
