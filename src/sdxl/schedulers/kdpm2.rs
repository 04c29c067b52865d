//! diffusers `KDPM2DiscreteScheduler` (A1111's "DPM2"): Katherine Crowson's second-order DPM
//! solver. Each step goes to the geometric midpoint of the two noise levels with an Euler step,
//! evaluates the model there, and takes the whole step with that midpoint derivative; N steps make
//! 2N − 1 model calls, the midpoints' timesteps interleaved with the steps' as diffusers does.
//! The midpoint sigmas are computed as diffusers computes them (log, lerp at 0.5, exp in
//! float32); its timesteps come from the float32 log-sigma table.

use candle_core::Tensor;
use serde_json::Value;

use super::euler::{init_noise_sigma, predict_x0};
use super::{interleave, k_diffusion_schedule, KSchedule, scale, sigma_to_t_f32, ConfigReader, Schedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

pub struct KDpm2Discrete {
    timesteps: Vec<f64>,
    /// `[σ0, σ1, σ1, …, σN−1, σN−1, 0, 0, 0]` as diffusers interleaves them.
    sigmas: Vec<f64>,
    /// The midpoints, interleaved the same way.
    sigmas_interpol: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    /// The sample at the start of a step, kept while the midpoint is evaluated.
    start: Option<Tensor>,
}

/// torch.lerp(a, b, 0.5) in float32 (torch switches formula at weight 0.5).
fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}

impl KDpm2Discrete {
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        let prediction = Prediction::from_config(&c, false)?;
        let KSchedule { timesteps, mut sigmas, spacing, log_sigmas } = k_diffusion_schedule(&c, steps, schedule, true)?;
        sigmas.push(0.0);
        let s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let n = s32.len();
        // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp(): index 0 pairs with the final 0.
        let interpol: Vec<f32> = (0..n).map(|i| lerp_half(s32[i].ln(), s32[(i + n - 1) % n].ln()).exp()).collect();
        let ti: Vec<f64> = interpol.iter().map(|&s| if s.is_finite() { sigma_to_t_f32(s as f64, &log_sigmas) as f32 as f64 } else { f64::NAN }).collect();
        if ti.len() < 2 {
            return Err(Error::Scheduler("DPM2 needs at least one step".into()));
        }
        let mut ts = vec![timesteps[0]];
        for k in 1..timesteps.len() {
            ts.extend([ti[k], timesteps[k]]);
        }
        let sigmas_f64: Vec<f64> = s32.iter().map(|&s| s as f64).collect();
        Ok(Self {
            init_noise_sigma: init_noise_sigma(&sigmas_f64, &spacing),
            timesteps: ts,
            sigmas: interleave(&s32),
            sigmas_interpol: interleave(&interpol),
            prediction,
            denoised: None,
            start: None,
        })
    }
}

impl Scheduler for KDpm2Discrete {
    sigma_table_getters!();
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = if self.start.is_none() { self.sigmas[i] } else { self.sigmas_interpol[i] };
        scale(sample, 1.0 / (s * s + 1.0).sqrt())
    }
    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        match self.start.take() {
            None => {
                let (sigma, mid) = (self.sigmas[i], self.sigmas_interpol[i + 1]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
                self.denoised = Some(x0.clone());
                let derivative = scale(&(sample - x0)?, 1.0 / sigma)?;
                self.start = Some(sample.clone());
                Ok((sample + scale(&derivative, mid - sigma)?)?)
            }
            Some(start) => {
                let (sigma, mid, next) = (self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]);
                let x0 = predict_x0(self.prediction, model_output, sample, mid)?;
                self.denoised = Some(x0.clone());
                let derivative = scale(&(sample - x0)?, 1.0 / mid)?;
                Ok((start + scale(&derivative, next - sigma)?)?)
            }
        }
    }
}

/// diffusers `KDPM2AncestralDiscreteScheduler` (A1111's "DPM2 a"): DPM2's midpoint step towards
/// the ancestral step's lower noise level, then fresh noise of the ancestral amount, drawn from the
/// run's noise source (so seeds match diffusers' generator stream).
pub struct KDpm2Ancestral {
    timesteps: Vec<f64>,
    /// Per step k (not interleaved): σ, the midpoint, σ_up and σ_down.
    sigma: Vec<f64>,
    mid: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
    /// Interleaved as diffusers keeps its `sigmas` (for `sigmas()`).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    start: Option<Tensor>,
}

impl KDpm2Ancestral {
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        let prediction = Prediction::from_config(&c, false)?;
        let KSchedule { timesteps, mut sigmas, spacing, log_sigmas } = k_diffusion_schedule(&c, steps, schedule, true)?;
        sigmas.push(0.0);
        // The ancestral split and the midpoints in float32, as torch computes them.
        let s: Vec<f32> = sigmas.iter().map(|&x| x as f32).collect();
        let n = s.len();
        let next: Vec<f32> = (0..n).map(|k| if k + 1 < n { s[k + 1] } else { 0.0 }).collect();
        let up: Vec<f32> = (0..n).map(|k| (next[k] * next[k] * (s[k] * s[k] - next[k] * next[k]) / (s[k] * s[k])).sqrt()).collect();
        let mut down: Vec<f32> = (0..n).map(|k| (next[k] * next[k] - up[k] * up[k]).sqrt()).collect();
        down[n - 1] = 0.0;
        let mut mid: Vec<f32> = (0..n).map(|k| lerp_half(s[k].ln(), down[k].ln()).exp()).collect();
        mid[n - 1] = 0.0;
        if n >= 2 {
            mid[n - 2] = 0.0;
        }
        let ti: Vec<f64> = mid.iter().map(|&m| sigma_to_t_f32(m as f64, &log_sigmas) as f32 as f64).collect();
        let mut ts = vec![timesteps[0]];
        for k in 0..timesteps.len().saturating_sub(1) {
            ts.extend([ti[k], timesteps[k + 1]]);
        }
        let interleaved = interleave(&s);
        let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        Ok(Self {
            init_noise_sigma: init_noise_sigma(&interleaved, &spacing),
            timesteps: ts,
            sigma: f(s),
            mid: f(mid),
            up: f(up),
            down: f(down),
            sigmas: interleaved,
            prediction,
            denoised: None,
            start: None,
        })
    }
}

impl Scheduler for KDpm2Ancestral {
    sigma_table_getters!();
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let k = i / 2;
        let s = if self.start.is_none() { self.sigma[k] } else { self.mid[k] };
        scale(sample, 1.0 / (s * s + 1.0).sqrt())
    }
    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        // Step i belongs to step k of the schedule: i = 2k (to the midpoint) or 2k + 1 (the rest).
        let k = i / 2;
        match self.start.take() {
            None => {
                let (sigma, mid) = (self.sigma[k], self.mid[k]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
                self.denoised = Some(x0.clone());
                let derivative = scale(&(sample - x0)?, 1.0 / sigma)?;
                self.start = Some(sample.clone());
                Ok((sample + scale(&derivative, mid - sigma)?)?)
            }
            Some(start) => {
                let (sigma, mid, up, down) = (self.sigma[k], self.mid[k], self.up[k], self.down[k]);
                let x0 = predict_x0(self.prediction, model_output, sample, mid)?;
                self.denoised = Some(x0.clone());
                let derivative = scale(&(sample - x0)?, 1.0 / mid)?;
                let prev = (start + scale(&derivative, down - sigma)?)?;
                let n = noise(model_output.dims())?.to_dtype(prev.dtype())?.to_device(prev.device())?;
                Ok((prev + scale(&n, up)?)?)
            }
        }
    }
}
