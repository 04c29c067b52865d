//! diffusers `LCMScheduler` (Latent Consistency Models; what LCM-LoRA and LCM-distilled SDXL
//! models sample with): the timesteps are a subset of the distillation schedule (every
//! `num_train_timesteps / original_inference_steps`-th), each step predicts x0 through the
//! consistency boundary condition and re-noises it to the next timestep with fresh noise from the
//! run's torch-compatible stream; the last step returns the denoised sample.

use candle_core::Tensor;
use serde_json::Value;

use super::{scale, ConfigReader, NoiseSchedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

pub struct Lcm {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha: f32,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    timestep_scaling: f64,
    clip: Option<f64>,
}

impl Lcm {
    pub fn new(config: &Value, steps: usize) -> Result<Self> {
        let c = ConfigReader(config);
        let sched = NoiseSchedule::from_config(&c, 0.00085, 0.012, "scaled_linear")?;
        c.refuse_true(&["thresholding"])?;
        let n = sched.num_train_timesteps;
        let original = c.usize("original_inference_steps", 50)?;
        if original == 0 || original > n {
            return Err(Error::Scheduler(format!("original_inference_steps {original}: expected 1..={n}")));
        }
        if steps > original {
            return Err(Error::Argument(format!(
                "LCM: {steps} steps is more than the distillation schedule's {original} (original_inference_steps); use at most {original}"
            )));
        }
        let k = n / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        // np.floor(np.linspace(0, len, num=steps, endpoint=False)).
        let timesteps = (0..steps).map(|i| origin[((i as f64) * (origin.len() as f64 / steps as f64)).floor() as usize] as f64).collect();
        let final_alpha = if c.bool("set_alpha_to_one", true)? { 1.0 } else { sched.alphas_cumprod[0] };
        let clip = if c.bool("clip_sample", false)? { Some(c.f64("clip_sample_range", 1.0)?) } else { None };
        Ok(Self {
            timesteps,
            alphas_cumprod: sched.alphas_cumprod.clone(),
            final_alpha,
            prediction: Prediction::from_config(&c, true)?, denoised: None,
            timestep_scaling: c.f64("timestep_scaling", 10.0)?,
            clip,
        })
    }
}

impl Scheduler for Lcm {
    unit_noise_getters!();
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_ddpm(&self.alphas_cumprod, original, noise, *self.timesteps.get(i).ok_or_else(|| crate::error::Error::Scheduler(format!("add_noise at step {i}: past the schedule")))?)
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let last = i + 1 == self.timesteps.len();
        let prev = if last { t as i64 } else { self.timesteps[i + 1] as i64 };
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        // c_skip and c_out in float32, as torch computes them from the integer timestep.
        let st = (t as f64 * self.timestep_scaling) as f32;
        let sd2 = 0.25f32;
        let c_skip = sd2 / (st * st + sd2);
        let c_out = st / (st * st + sd2).sqrt();
        let x0 = match self.prediction {
            Prediction::Epsilon => scale(&(sample - scale(model_output, b_t.sqrt() as f64)?)?, 1.0 / a_t.sqrt() as f64)?,
            Prediction::Sample => model_output.clone(),
            Prediction::V => (scale(sample, a_t.sqrt() as f64)? - scale(model_output, b_t.sqrt() as f64)?)?,
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r as f32, r as f32)?,
            None => x0,
        };
        let denoised = (scale(&x0, c_out as f64)? + scale(sample, c_skip as f64)?)?;
        self.denoised = Some(denoised.clone());
        if last {
            return Ok(denoised);
        }
        let n = noise(model_output.dims())?.to_dtype(denoised.dtype())?.to_device(denoised.device())?;
        Ok((scale(&denoised, a_prev.sqrt() as f64)? + scale(&n, b_prev.sqrt() as f64)?)?)
    }
}
