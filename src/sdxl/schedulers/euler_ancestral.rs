//! diffusers `EulerAncestralDiscreteScheduler`: an Euler step to a lower noise level plus fresh
//! noise, drawn from the run's noise source (so a seeded run reproduces diffusers' CPU
//! generator stream when the source is [`crate::rng::TorchCpuRng`]).

use candle_core::Tensor;
use serde_json::Value;

use super::euler::{euler_timesteps, init_noise_sigma, predict_x0};
use super::{interp, scale, ConfigReader, Schedule, NoiseSchedule, NoiseSource, Prediction, Scheduler};
use crate::error::Result;

pub struct EulerAncestralDiscrete {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
}

impl EulerAncestralDiscrete {
    /// diffusers' class has no schedule types; with one (A1111 offers them for Euler a) the
    /// sigmas and timesteps are derived as EulerDiscrete derives them.
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        let sched = NoiseSchedule::from_config(&c, 0.0001, 0.02, "linear")?;
        let spacing = c.string("timestep_spacing", "linspace")?;
        let mut timesteps = euler_timesteps(&spacing, sched.num_train_timesteps, steps, c.usize("steps_offset", 0)?)?;
        let train = sched.train_sigmas();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train) as f32 as f64).collect();
        if schedule != Schedule::Default {
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            let raw: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
            if let Some(s) = schedule.sigmas(&raw, steps, &c, &train)? {
                timesteps = s.iter().map(|&x| super::sigma_to_t(x, &log_sigmas) as f32 as f64).collect();
                sigmas = s.into_iter().map(|x| x as f32 as f64).collect();
            }
        }
        sigmas.push(0.0);
        Ok(Self { init_noise_sigma: init_noise_sigma(&sigmas, &spacing), timesteps, sigmas, prediction: Prediction::from_config(&c, false)?, denoised: None })
    }
}

impl Scheduler for EulerAncestralDiscrete {
    sigma_table_getters!();
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        scale(sample, 1.0 / (s * s + 1.0).sqrt())
    }
    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = predict_x0(self.prediction, model_output, sample, from)?;
        self.denoised = Some(x0.clone());
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = scale(&(sample - x0)?, 1.0 / from)?;
        let prev = (sample + scale(&derivative, sigma_down - from)?)?;
        let n = noise(sample.dims())?.to_dtype(prev.dtype())?.to_device(prev.device())?;
        Ok((prev + scale(&n, sigma_up)?)?)
    }
}
