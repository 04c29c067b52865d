//! diffusers `DDIMScheduler` with `eta = 0` (deterministic), as pipelines call it.

use candle_core::Tensor;
use serde_json::Value;

use super::{round_half_even, scale, ConfigReader, NoiseSchedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(config: &Value, steps: usize) -> Result<Self> {
        let c = ConfigReader(config);
        let sched = NoiseSchedule::from_config(&c, 0.0001, 0.02, "linear")?;
        c.refuse_true(&["thresholding"])?;
        let n = sched.num_train_timesteps;
        if steps > n {
            return Err(Error::Argument(format!("steps ({steps}) cannot exceed the scheduler's num_train_timesteps ({n})")));
        }
        let offset = c.usize("steps_offset", 0)?;
        let timesteps: Vec<f64> = match c.string("timestep_spacing", "leading")?.as_str() {
            "leading" => (0..steps).rev().map(|i| (i * (n / steps) + offset) as f64).collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                let len = ((0.0 - n as f64) / -ratio).ceil() as usize;
                (0..len).map(|i| round_half_even(n as f64 - i as f64 * ratio) - 1.0).collect()
            }
            "linspace" => (0..steps)
                .rev()
                .map(|i| if steps == 1 { 0.0 } else { round_half_even(i as f64 * ((n - 1) as f64 / (steps - 1) as f64)) })
                .collect(),
            other => return Err(Error::Scheduler(format!("timestep_spacing {other:?} is not supported (linspace, leading, trailing)"))),
        };
        let final_alpha_cumprod = if c.bool("set_alpha_to_one", true)? { 1.0 } else { sched.alphas_cumprod[0] as f64 };
        let clip = if c.bool("clip_sample", true)? { Some(c.f64("clip_sample_range", 1.0)?) } else { None };
        Ok(Self {
            timesteps,
            alphas_cumprod: sched.alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: n / steps,
            prediction: Prediction::from_config(&c, true)?, denoised: None,
            clip,
        })
    }

    fn alpha_at(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod.get(t as usize).copied().unwrap_or(1.0) as f64
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Ddim {
    unit_noise_getters!();
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_ddpm(&self.alphas_cumprod, original, noise, *self.timesteps.get(i).ok_or_else(|| crate::error::Error::Scheduler(format!("add_noise at step {i}: past the schedule")))?)
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio as i64;
        let a_t = self.alpha_at(t);
        let a_prev = self.alpha_at(prev_t);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => (scale(&(sample - scale(model_output, b_t.sqrt())?)?, 1.0 / a_t.sqrt())?, model_output.clone()),
            Prediction::Sample => {
                let x0 = model_output.clone();
                let eps = scale(&(sample - scale(&x0, a_t.sqrt())?)?, 1.0 / b_t.sqrt())?;
                (x0, eps)
            }
            Prediction::V => (
                (scale(sample, a_t.sqrt())? - scale(model_output, b_t.sqrt())?)?,
                (scale(model_output, a_t.sqrt())? + scale(sample, b_t.sqrt())?)?,
            ),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        self.denoised = Some(x0.clone());
        Ok((scale(&x0, a_prev.sqrt())? + scale(&eps, (1.0 - a_prev).sqrt())?)?)
    }
}
