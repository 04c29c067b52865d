//! diffusers `HeunDiscreteScheduler` (A1111's "Heun"): Karras et al.'s second-order sampler. Each
//! step after the first is an Euler step followed by a correction that averages the derivative at
//! both ends, so the schedule lists every inner timestep twice and a run of N steps makes 2N − 1
//! model calls (diffusers' `timesteps` and `sigmas` are interleaved the same way).

use candle_core::Tensor;
use serde_json::Value;

use super::euler::{init_noise_sigma, predict_x0};
use super::{interleave, k_diffusion_schedule, KSchedule, scale, ConfigReader, Schedule, NoiseSource, Prediction, Scheduler};
use crate::error::Result;

pub struct HeunDiscrete {
    timesteps: Vec<f64>,
    /// Interleaved as diffusers keeps them: `[σ0, σ1, σ1, σ2, σ2, …, σN−1, σN−1, 0]`.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    clip: Option<f64>,
    /// Between the Euler half and the correction: the first derivative, dt and the sample.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl HeunDiscrete {
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        let KSchedule { timesteps, mut sigmas, spacing, .. } = k_diffusion_schedule(&c, steps, schedule, false)?;
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let init = init_noise_sigma(&sigmas.iter().map(|&s| s as f64).collect::<Vec<_>>(), &spacing);
        // Heun's interleaving drops the final sigma's repeat: [σ0, σ1, σ1, …, σN−1, σN−1, 0].
        let mut inter = interleave(&sigmas[..sigmas.len() - 1]);
        inter.pop();
        inter.push(0.0);
        let mut ts = interleave(&timesteps);
        ts.pop();
        let clip = if c.bool("clip_sample", false)? { Some(c.f64("clip_sample_range", 1.0)?) } else { None };
        Ok(Self { timesteps: ts, sigmas: inter, init_noise_sigma: init, prediction: Prediction::from_config(&c, true)?, denoised: None, clip, pending: None })
    }
}

impl Scheduler for HeunDiscrete {
    sigma_table_getters!();
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        scale(sample, 1.0 / (s * s + 1.0).sqrt())
    }
    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let first = self.pending.is_none();
        let (sigma, sigma_next) = if first { (self.sigmas[i], self.sigmas[i + 1]) } else { (self.sigmas[i - 1], self.sigmas[i]) };
        let x0 = predict_x0(self.prediction, model_output, sample, if first { sigma } else { sigma_next })?;
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r as f32, r as f32)?,
            None => x0,
        };
        self.denoised = Some(x0.clone());
        match self.pending.take() {
            None => {
                let derivative = scale(&(sample - x0)?, 1.0 / sigma)?;
                let dt = sigma_next - sigma;
                let next = (sample + scale(&derivative, dt)?)?;
                self.pending = Some((derivative, dt, sample.clone()));
                Ok(next)
            }
            Some((d1, dt, start)) => {
                let d2 = scale(&(sample - x0)?, 1.0 / sigma_next)?;
                let derivative = scale(&(d1 + d2)?, 0.5)?;
                Ok((start + scale(&derivative, dt)?)?)
            }
        }
    }
}
