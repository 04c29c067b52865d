//! Samplers equal to diffusers' schedulers, each a small independent unit.
//!
//! A scheduler is built from the model folder's `scheduler_config.json` the way diffusers'
//! `SchedulerClass.from_config(config)` does: keys the class knows are taken, missing keys take
//! *that class's* defaults (so DDIM built from SDXL's Euler config gets `clip_sample = true`,
//! exactly as in diffusers). Numerics follow diffusers: schedule tables in f32, interpolation
//! in f64, update coefficients as scalars.

/// The getters every sigma-table scheduler shares, over its `timesteps`, `sigmas` and
/// `init_noise_sigma` fields (a macro: trait default methods cannot read fields).
macro_rules! sigma_table_getters {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }
        fn init_noise_sigma(&self) -> f64 {
            self.init_noise_sigma
        }
        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.sigmas)
        }
    };
}

/// The same for schedulers that work in alpha space: unit initial noise, unscaled model input.
macro_rules! unit_noise_getters {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }
        fn init_noise_sigma(&self) -> f64 {
            1.0
        }
        fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
            Ok(sample.clone())
        }
    };
}

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod heun;
mod kdpm2;
mod lcm;
mod unipc;

use std::str::FromStr;

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{Error, Result};

pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestralDiscrete;
pub use heun::HeunDiscrete;
pub use kdpm2::{KDpm2Ancestral, KDpm2Discrete};
pub use lcm::Lcm;
pub use unipc::UniPc;

/// The samplers users choose by name (CLI `--sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Euler,
    EulerA,
    Dpmpp2m,
    Dpmpp2mKarras,
    Ddim,
    Heun,
    HeunKarras,
    Dpm2,
    Dpm2Karras,
    Dpm2A,
    Dpmpp2mSde,
    Dpmpp2mSdeKarras,
    Lcm,
    UniPc,
    UniPcKarras,
    EulerKarras,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 16] = [
        Self::Euler,
        Self::EulerA,
        Self::Dpmpp2m,
        Self::Dpmpp2mKarras,
        Self::Ddim,
        Self::Heun,
        Self::HeunKarras,
        Self::Dpm2,
        Self::Dpm2Karras,
        Self::Dpm2A,
        Self::Dpmpp2mSde,
        Self::Dpmpp2mSdeKarras,
        Self::Lcm,
        Self::UniPc,
        Self::UniPcKarras,
        Self::EulerKarras,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::Dpmpp2m => "dpmpp_2m",
            Self::Dpmpp2mKarras => "dpmpp_2m_karras",
            Self::Ddim => "ddim",
            Self::Heun => "heun",
            Self::HeunKarras => "heun_karras",
            Self::Dpm2 => "dpm2",
            Self::Dpm2Karras => "dpm2_karras",
            Self::Dpm2A => "dpm2_a",
            Self::Dpmpp2mSde => "dpmpp_2m_sde",
            Self::Dpmpp2mSdeKarras => "dpmpp_2m_sde_karras",
            Self::Lcm => "lcm",
            Self::UniPc => "unipc",
            Self::UniPcKarras => "unipc_karras",
            Self::EulerKarras => "euler_karras",
        }
    }

    /// The A1111 display name, used in PNG `parameters` text.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerA => "Euler a",
            Self::Dpmpp2m => "DPM++ 2M",
            Self::Dpmpp2mKarras => "DPM++ 2M Karras",
            Self::Ddim => "DDIM",
            Self::Heun => "Heun",
            Self::HeunKarras => "Heun Karras",
            Self::Dpm2 => "DPM2",
            Self::Dpm2Karras => "DPM2 Karras",
            Self::Dpm2A => "DPM2 a",
            Self::Dpmpp2mSde => "DPM++ 2M SDE",
            Self::Dpmpp2mSdeKarras => "DPM++ 2M SDE Karras",
            Self::Lcm => "LCM",
            Self::UniPc => "UniPC",
            Self::UniPcKarras => "UniPC Karras",
            Self::EulerKarras => "Euler Karras",
        }
    }

    /// A1111's aliases (k-diffusion's function names), which its API also accepts.
    pub fn a1111_aliases(self) -> &'static [&'static str] {
        match self {
            Self::Euler => &["k_euler"],
            Self::EulerA => &["k_euler_a", "k_euler_ancestral"],
            Self::Dpmpp2m => &["k_dpmpp_2m"],
            Self::Dpmpp2mKarras => &["k_dpmpp_2m_ka"],
            Self::Heun => &["k_heun"],
            Self::Dpm2 => &["k_dpm_2"],
            Self::Dpm2Karras => &["k_dpm_2_ka"],
            Self::Dpm2A => &["k_dpm_2_a"],
            Self::Dpmpp2mSde => &["k_dpmpp_2m_sde"],
            Self::Dpmpp2mSdeKarras => &["k_dpmpp_2m_sde_ka"],
            Self::Lcm => &["k_lcm"],
            Self::Ddim | Self::HeunKarras | Self::UniPc | Self::UniPcKarras | Self::EulerKarras => &[],
        }
    }

    /// The sampler a folder's scheduler config describes, if we implement it.
    pub fn from_config(config: &Value) -> Result<Self> {
        let class = config.get("_class_name").and_then(Value::as_str).unwrap_or("EulerDiscreteScheduler");
        let karras = config.get("use_karras_sigmas").and_then(Value::as_bool).unwrap_or(false);
        let sde = config.get("algorithm_type").and_then(Value::as_str) == Some("sde-dpmsolver++");
        match class {
            "EulerDiscreteScheduler" if karras => Ok(Self::EulerKarras),
            "EulerDiscreteScheduler" => Ok(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(Self::EulerA),
            "DPMSolverMultistepScheduler" if sde && karras => Ok(Self::Dpmpp2mSdeKarras),
            "DPMSolverMultistepScheduler" if sde => Ok(Self::Dpmpp2mSde),
            "DPMSolverMultistepScheduler" if karras => Ok(Self::Dpmpp2mKarras),
            "DPMSolverMultistepScheduler" => Ok(Self::Dpmpp2m),
            "DDIMScheduler" => Ok(Self::Ddim),
            "HeunDiscreteScheduler" if karras => Ok(Self::HeunKarras),
            "HeunDiscreteScheduler" => Ok(Self::Heun),
            "KDPM2DiscreteScheduler" if karras => Ok(Self::Dpm2Karras),
            "KDPM2DiscreteScheduler" => Ok(Self::Dpm2),
            "KDPM2AncestralDiscreteScheduler" => Ok(Self::Dpm2A),
            "LCMScheduler" => Ok(Self::Lcm),
            "UniPCMultistepScheduler" if karras => Ok(Self::UniPcKarras),
            "UniPCMultistepScheduler" => Ok(Self::UniPc),
            other => Err(Error::Scheduler(format!(
                "scheduler class {other:?} is not implemented; choose one with --sampler ({})",
                Self::ALL.map(|s| s.name()).join(", ")
            ))),
        }
    }
}

impl FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // Any case, as A1111's lookup lowercases names and aliases.
        let t = s.trim();
        let same = |n: &str| n.eq_ignore_ascii_case(t);
        Self::ALL.into_iter().find(|k| same(k.name()) || same(k.a1111_name()) || k.a1111_aliases().iter().any(|a| same(a))).ok_or_else(|| {
            Error::Argument(format!("unknown sampler {s:?}; expected one of {}", Self::ALL.map(|s| s.name()).join(", ")))
        })
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A1111's "Schedule type": the noise levels a sigma-table sampler steps through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The sampler's own (diffusers' spacing from the folder's config; A1111's "Automatic").
    #[default]
    Default,
    /// Karras et al. 2022 (ρ = 7) between the schedule's ends.
    Karras,
    /// Log-linear between the schedule's ends (diffusers' `use_exponential_sigmas`).
    Exponential,
    /// Beta(0.6, 0.6) quantiles between the ends (diffusers' `use_beta_sigmas`, arXiv 2407.12173).
    Beta,
    /// Uniform in model time from the first to the last training timestep (A1111's `sgm_uniform`).
    SgmUniform,
    /// NVIDIA's Align Your Steps list for SDXL, log-linearly resampled (A1111's `ays`).
    Ays,
}

impl Schedule {
    pub const ALL: [Schedule; 6] = [Self::Default, Self::Karras, Self::Exponential, Self::Beta, Self::SgmUniform, Self::Ays];
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::Beta => "beta",
            Self::SgmUniform => "sgm_uniform",
            Self::Ays => "ays",
        }
    }
    /// A1111's label (`Schedule type: Karras`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Default => "Automatic",
            Self::Karras => "Karras",
            Self::Exponential => "Exponential",
            Self::Beta => "Beta",
            Self::SgmUniform => "SGM Uniform",
            Self::Ays => "Align Your Steps",
        }
    }
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // ComfyUI's names too ("normal" is its default, "AYS SDXL" its node's label).
        let alias = match s {
            "" | "automatic" | "normal" | "Normal" => Some(Self::Default),
            "AYS SDXL" | "align_your_steps" => Some(Self::Ays),
            "SGM uniform" => Some(Self::SgmUniform),
            _ => None,
        };
        alias.or_else(|| Self::ALL.into_iter().find(|k| k.name() == s || k.a1111_name() == s)).ok_or_else(|| {
            Error::Argument(format!("unknown schedule {s:?}; expected one of {}", Self::ALL.map(|k| k.name()).join(", ")))
        })
    }
}

impl Schedule {
    /// The schedule a run uses: the one asked for, else the folder config's `use_*_sigmas`.
    pub(crate) fn effective(self, c: &ConfigReader) -> Result<Self> {
        if self != Self::Default {
            return Ok(self);
        }
        let flags = [(c.bool("use_karras_sigmas", false)?, Self::Karras), (c.bool("use_exponential_sigmas", false)?, Self::Exponential), (c.bool("use_beta_sigmas", false)?, Self::Beta)];
        let on: Vec<Schedule> = flags.iter().filter(|(b, _)| *b).map(|(_, k)| *k).collect();
        match on[..] {
            [] => Ok(Self::Default),
            [k] => Ok(k),
            _ => Err(Error::Scheduler("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set".into())),
        }
    }

    /// The schedule's `steps` sigmas, descending, without the final one. `in_sigmas` is the
    /// sampler's own schedule (its ends bound Karras, Exponential and Beta, unless the config
    /// sets `sigma_min`/`sigma_max`); `train` the training table, ascending. `None` for the
    /// sampler's own schedule.
    pub(crate) fn sigmas(self, in_sigmas: &[f64], steps: usize, c: &ConfigReader, train: &[f64]) -> Result<Option<Vec<f64>>> {
        let ends = || -> Result<(f64, f64)> { Ok((c.f64("sigma_min", in_sigmas[in_sigmas.len() - 1])?, c.f64("sigma_max", in_sigmas[0])?)) };
        let ramp = |i: usize| if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
        Ok(Some(match self {
            Self::Default => return Ok(None),
            Self::Karras => karras(in_sigmas, steps, c)?,
            Self::Exponential => {
                let (lo, hi) = ends()?;
                (0..steps).map(|i| (hi.ln() + ramp(i) * (lo.ln() - hi.ln())).exp()).collect()
            }
            Self::Beta => {
                let (lo, hi) = ends()?;
                (0..steps).map(|i| lo + puruspe::invbetai(1.0 - ramp(i), 0.6, 0.6) * (hi - lo)).collect()
            }
            Self::SgmUniform => {
                // k-diffusion's t_to_sigma over torch.linspace(t_max, 0, steps + 1)[:-1] (float32).
                let log: Vec<f64> = train.iter().map(|s| s.ln()).collect();
                let t_max = (train.len() - 1) as f32;
                linspace_f32(t_max, 0.0, steps + 1)[..steps].iter().map(|&t| interp(t as f64, &log).exp()).collect()
            }
            Self::Ays => {
                const SDXL: [f64; 11] = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029];
                if steps == SDXL.len() {
                    SDXL.to_vec()
                } else {
                    // A1111's loglinear_interp: np.interp of the reversed log list on [0, 1].
                    let ys: Vec<f64> = SDXL.iter().rev().map(|s| s.ln()).collect();
                    let m = (ys.len() - 1) as f64;
                    let mut out: Vec<f64> = (0..steps).map(|i| interp(ramp(i) * m, &ys).exp()).collect();
                    out.reverse();
                    out
                }
            }
        }))
    }
}

/// Supplies standard-normal noise of a shape (ancestral samplers draw fresh noise each step).
pub type NoiseSource<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// One denoising run's schedule and update rule.
pub trait Scheduler: Send {
    /// Model timesteps, in the order they are used.
    fn timesteps(&self) -> &[f64];
    /// The multiplier for unit-variance initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// Scale the latents before the model call at step `i`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;
    /// Advance from step `i` given the (guided) model output.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor>;
    /// The clean latents the last step predicted (its x0, k-diffusion's `denoised`): what an
    /// interrupted run decodes, as A1111 does.
    fn denoised(&self) -> Option<&Tensor> {
        None
    }
    /// The sigma schedule, for samplers that have one (length steps + 1).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// diffusers' `order`: how many entries of `timesteps` one sampling step takes (2 for the
    /// second-order k-diffusion samplers). img2img starts `order × t_start` entries in.
    fn order(&self) -> usize {
        1
    }
    /// diffusers' `add_noise` at entry `i` of the schedule (img2img's start latents and the
    /// inpainting pipeline's re-noised original). The k-diffusion samplers add `σᵢ · noise`;
    /// the alpha-space ones override this.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigmas = self.sigmas().ok_or_else(|| Error::Scheduler("this sampler has no sigma table to add noise with".into()))?;
        let sigma = *sigmas.get(i).ok_or_else(|| Error::Scheduler(format!("add_noise at step {i}: the schedule has {} sigmas", sigmas.len())))?;
        Ok((original + scale(noise, sigma as f32 as f64)?)?)
    }
}

/// `add_noise` of the schedulers that work in alpha space on a sigma table (DPM-Solver++, UniPC):
/// `α·x + σ_t·noise` with `α = 1/√(σ²+1)`, in float32 as torch computes it.
pub(crate) fn add_noise_vp(sigmas: &[f64], original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
    let sigma = *sigmas.get(i).ok_or_else(|| Error::Scheduler(format!("add_noise at step {i}: the schedule has {} sigmas", sigmas.len())))? as f32;
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    Ok((scale(original, alpha as f64)? + scale(noise, sigma_t as f64)?)?)
}

/// DDPM's `add_noise` at training timestep `t`: `√ᾱ·x + √(1−ᾱ)·noise` (DDIM, LCM).
pub(crate) fn add_noise_ddpm(alphas_cumprod: &[f32], original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
    let a = *alphas_cumprod
        .get(t as usize)
        .ok_or_else(|| Error::Scheduler(format!("add_noise at timestep {t}: outside the training schedule")))?;
    Ok((scale(original, a.sqrt() as f64)? + scale(noise, (1.0f32 - a).sqrt() as f64)?)?)
}

impl SamplerKind {
    /// The sampler without a schedule in its name, and that schedule (`dpmpp_2m_karras` is
    /// `dpmpp_2m` with Karras sigmas).
    pub fn split(self) -> (SamplerKind, Schedule) {
        match self {
            Self::Dpmpp2mKarras => (Self::Dpmpp2m, Schedule::Karras),
            Self::HeunKarras => (Self::Heun, Schedule::Karras),
            Self::Dpm2Karras => (Self::Dpm2, Schedule::Karras),
            Self::Dpmpp2mSdeKarras => (Self::Dpmpp2mSde, Schedule::Karras),
            Self::UniPcKarras => (Self::UniPc, Schedule::Karras),
            Self::EulerKarras => (Self::Euler, Schedule::Karras),
            other => (other, Schedule::Default),
        }
    }

    /// Whether the sampler draws fresh noise between steps (ancestral, SDE, LCM) from the run's
    /// generators, which A1111's "Eta noise seed delta" reseeds. (A1111 marks only its ancestral
    /// samplers `uses_ensd`: its SDE samplers draw from a Brownian tree instead.)
    pub fn draws_noise(self) -> bool {
        matches!(self, Self::EulerA | Self::Dpm2A | Self::Dpmpp2mSde | Self::Dpmpp2mSdeKarras | Self::Lcm)
    }

    /// Whether the sampler steps through a sigma table (and so takes a schedule type).
    pub fn takes_schedule(self) -> bool {
        !matches!(self, Self::Ddim | Self::Lcm)
    }
}

/// The sampler and schedule a run uses: `schedule` on top of the one the name implies.
pub fn resolve(kind: SamplerKind, schedule: Schedule) -> Result<(SamplerKind, Schedule)> {
    let (base, implied) = kind.split();
    let schedule = match (implied, schedule) {
        (Schedule::Default, s) | (s, Schedule::Default) => s,
        (a, b) if a == b => a,
        (a, b) => {
            return Err(Error::Argument(format!(
                "sampler {} already has the {} schedule; use --sampler {} with --schedule {}",
                kind.name(),
                a.name(),
                base.name(),
                b.name()
            )))
        }
    };
    if schedule != Schedule::Default && !base.takes_schedule() {
        return Err(Error::Argument(format!(
            "schedule {} is not available for sampler {}: it has no sigma schedule (schedules work with {})",
            schedule.name(),
            base.name(),
            SamplerKind::ALL.into_iter().filter(|k| k.takes_schedule() && k.split().1 == Schedule::Default).map(|k| k.name()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok((base, schedule))
}

/// Builds `kind` with `schedule` from a folder's scheduler config, as `from_config` would.
pub fn build(kind: SamplerKind, schedule: Schedule, config: &Value, steps: usize) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        return Err(Error::Argument("steps must be at least 1".into()));
    }
    let (base, schedule) = resolve(kind, schedule)?;
    Ok(match base {
        SamplerKind::Euler => Box::new(EulerDiscrete::new(config, steps, schedule)?),
        SamplerKind::EulerA => Box::new(EulerAncestralDiscrete::new(config, steps, schedule)?),
        SamplerKind::Dpmpp2m => Box::new(DpmSolverMultistep::new(config, steps, schedule, false)?),
        SamplerKind::Dpmpp2mSde => Box::new(DpmSolverMultistep::new(config, steps, schedule, true)?),
        SamplerKind::Ddim => Box::new(Ddim::new(config, steps)?),
        SamplerKind::Heun => Box::new(HeunDiscrete::new(config, steps, schedule)?),
        SamplerKind::Dpm2 => Box::new(KDpm2Discrete::new(config, steps, schedule)?),
        SamplerKind::Dpm2A => Box::new(KDpm2Ancestral::new(config, steps, schedule)?),
        SamplerKind::Lcm => Box::new(Lcm::new(config, steps)?),
        SamplerKind::UniPc => Box::new(UniPc::new(config, steps, schedule)?),
        karras => return Err(Error::Argument(format!("sampler {} did not resolve", karras.name()))),
    })
}

/// Typed access to a config with per-class defaults.
pub(crate) struct ConfigReader<'a>(pub &'a Value);

impl ConfigReader<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| Error::Scheduler(format!("config field {key}: expected a number, got {v}"))),
        }
    }
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| Error::Scheduler(format!("config field {key}: expected a non-negative integer, got {v}"))),
        }
    }
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| Error::Scheduler(format!("config field {key}: expected true/false, got {v}"))),
        }
    }
    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.present(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Scheduler(format!("config field {key}: expected a string, got {v}"))),
        }
    }
    /// Options no implementation here supports: refuse rather than silently differ.
    pub fn refuse_true(&self, keys: &[&str]) -> Result<()> {
        for k in keys {
            if self.bool(k, false)? {
                return Err(Error::Scheduler(format!("config field {k} = true is not supported")));
            }
        }
        Ok(())
    }
}

/// The training noise schedule: `alphas_cumprod` in f32, as diffusers keeps it.
pub(crate) struct NoiseSchedule {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f32>,
}

/// torch.linspace in f32: the first half counts up from `start`, the second half down from
/// `end`, as ATen's CPU kernel does.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

impl NoiseSchedule {
    pub fn from_config(c: &ConfigReader, beta_start_default: f64, beta_end_default: f64, schedule_default: &str) -> Result<Self> {
        c.refuse_true(&["rescale_betas_zero_snr"])?;
        let n = c.usize("num_train_timesteps", 1000)?;
        if n < 2 {
            return Err(Error::Scheduler(format!("num_train_timesteps must be at least 2, got {n}")));
        }
        let bs = c.f64("beta_start", beta_start_default)?;
        let be = c.f64("beta_end", beta_end_default)?;
        let betas: Vec<f32> = if let Some(tb) = c.0.get("trained_betas").filter(|v| !v.is_null()) {
            let v: Vec<f64> = serde_json::from_value(tb.clone())
                .map_err(|_| Error::Scheduler("trained_betas must be a list of numbers".into()))?;
            if v.len() != n {
                return Err(Error::Scheduler(format!("trained_betas has {} entries, expected num_train_timesteps = {n}", v.len())));
            }
            v.into_iter().map(|x| x as f32).collect()
        } else {
            match c.string("beta_schedule", schedule_default)?.as_str() {
                "linear" => linspace_f32(bs as f32, be as f32, n),
                // Python computes beta_start ** 0.5 in double; torch.linspace takes it as float.
                "scaled_linear" => linspace_f32(bs.sqrt() as f32, be.sqrt() as f32, n).into_iter().map(|x| x * x).collect(),
                "squaredcos_cap_v2" => {
                    let bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - bar(t2) / bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                other => return Err(Error::Scheduler(format!("beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"))),
            }
        };
        // torch's CPU cumprod accumulates in double and rounds each output to float.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Self { num_train_timesteps: n, alphas_cumprod })
    }

    /// `sqrt((1 - ᾱ) / ᾱ)` per training timestep, computed in f32 as diffusers does.
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|&a| (((1.0f32 - a) / a).sqrt()) as f64).collect()
    }
}

/// numpy.interp over integer abscissae 0..len.
pub(crate) fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    ys[i] + f * (ys[i + 1] - ys[i])
}

/// diffusers' `_sigma_to_t`: piecewise-linear inverse of the sigma table in log space.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = (number of log_sigmas <= log_sigma) - 1 via cumsum/argmax, clipped to len-2.
    let dists: Vec<bool> = log_sigmas.iter().map(|ls| log_sigma - ls >= 0.0).collect();
    let mut best = 0usize;
    let mut best_val = 0usize;
    let mut cum = 0usize;
    for (i, d) in dists.iter().enumerate() {
        cum += *d as usize;
        if cum > best_val {
            best_val = cum;
            best = i;
        }
    }
    let low_idx = best.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_sigma_to_t` over a float32 table, with numpy's promotions: the distance to
/// the table in float64, the bracket's width `low − high` in float32.
pub(crate) fn sigma_to_t_f32(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas.iter().filter(|&&ls| log_sigma - ls as f64 >= 0.0).count();
    // cumsum(dists >= 0).argmax(): the last index where the count first reaches its maximum.
    let mut cum = 0usize;
    let mut low_idx = 0usize;
    for (i, ls) in log_sigmas.iter().enumerate() {
        if log_sigma - *ls as f64 >= 0.0 {
            cum += 1;
            if cum == below {
                low_idx = i;
                break;
            }
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// The schedule the second-order k-diffusion samplers (Heun, DPM2, DPM2 a) start from.
pub(crate) struct KSchedule {
    pub timesteps: Vec<f64>,
    /// Without the final 0.
    pub sigmas: Vec<f64>,
    pub spacing: String,
    /// The training table's log sigmas in float32, as numpy keeps them.
    pub log_sigmas: Vec<f32>,
}

/// [`KSchedule`] as those diffusers classes build it: class defaults for the betas, the Euler
/// family's timestep spacing, sigmas interpolated from the training table, optionally Karras
/// sigmas with their timesteps read off the float32 log-sigma table (rounded where the class
/// rounds them).
pub(crate) fn k_diffusion_schedule(c: &ConfigReader, steps: usize, schedule: Schedule, round_karras_t: bool) -> Result<KSchedule> {
    let sched = NoiseSchedule::from_config(c, 0.00085, 0.012, "linear")?;
    let spacing = c.string("timestep_spacing", "linspace")?;
    let mut timesteps = euler::euler_timesteps(&spacing, sched.num_train_timesteps, steps, c.usize("steps_offset", 0)?)?;
    let train = sched.train_sigmas();
    let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln() as f32).collect();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
    let schedule = schedule.effective(c)?;
    if let Some(s) = schedule.sigmas(&sigmas, steps, c, &train)? {
        // Only the Karras branch rounds (in the classes that round it).
        let round = round_karras_t && schedule == Schedule::Karras;
        timesteps = s
            .iter()
            .map(|&x| {
                let t = sigma_to_t_f32(x, &log_sigmas);
                (if round { round_half_even(t) } else { t }) as f32 as f64
            })
            .collect();
        sigmas = s;
    }
    Ok(KSchedule { timesteps, sigmas, spacing, log_sigmas })
}

/// `[x0, x1, x1, x2, x2, …, xn, xn, xn]`: diffusers' interleaving of a schedule for the
/// second-order samplers (`cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`).
pub(crate) fn interleave<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    let mut out = vec![x[0].into()];
    for v in &x[1..] {
        out.extend([(*v).into(), (*v).into()]);
    }
    out.push(x[x.len() - 1].into());
    out
}

/// Karras et al. (2022) schedule between the ends of `in_sigmas` (or the config's overrides).
pub(crate) fn karras(in_sigmas: &[f64], steps: usize, c: &ConfigReader) -> Result<Vec<f64>> {
    let sigma_min = c.f64("sigma_min", in_sigmas[in_sigmas.len() - 1])?;
    let sigma_max = c.f64("sigma_max", in_sigmas[0])?;
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    Ok((0..steps)
        .map(|i| {
            let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect())
}

/// np.round: round half to even.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Multiplies a tensor by a scalar keeping its dtype.
pub(crate) fn scale(t: &Tensor, s: f64) -> Result<Tensor> {
    Ok(t.affine(s, 0.0)?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    pub fn from_config(c: &ConfigReader, allow_sample: bool) -> Result<Self> {
        match c.string("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::V),
            "sample" if allow_sample => Ok(Self::Sample),
            other => Err(Error::Scheduler(format!("prediction_type {other:?} is not supported (epsilon, v_prediction)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_round_trip_and_unknown_is_clear() {
        for k in SamplerKind::ALL {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
            assert_eq!(k.a1111_name().to_lowercase().parse::<SamplerKind>().unwrap(), k);
            for a in k.a1111_aliases() {
                assert_eq!(a.parse::<SamplerKind>().unwrap(), k);
            }
        }
        assert_eq!("k_euler_a".parse::<SamplerKind>().unwrap(), SamplerKind::EulerA);
        let e = "lms".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(e.contains("unknown sampler \"lms\"") && e.contains("dpmpp_2m_karras"), "{e}");
    }

    #[test]
    fn round_half_even_matches_numpy() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-0.5), -0.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
