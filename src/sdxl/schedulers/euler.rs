//! diffusers `EulerDiscreteScheduler` (the SDXL default), with `s_churn = 0` as pipelines call it.

use candle_core::Tensor;
use serde_json::Value;

use super::{interp, round_half_even, scale, sigma_to_t, ConfigReader, Schedule, NoiseSchedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

/// Timesteps for the Euler family (diffusers keeps them as float32).
pub(crate) fn euler_timesteps(spacing: &str, n: usize, steps: usize, offset: usize) -> Result<Vec<f64>> {
    let v: Vec<f64> = match spacing {
        "linspace" => (0..steps)
            .rev()
            .map(|i| if steps == 1 { 0.0 } else { i as f64 * ((n - 1) as f64 / (steps - 1) as f64) })
            .collect(),
        "leading" => {
            let ratio = n / steps;
            (0..steps).rev().map(|i| (i * ratio) as f64 + offset as f64).collect()
        }
        "trailing" => {
            // np.arange(n, 0, -ratio): length ceil(n / ratio) in float arithmetic.
            let ratio = n as f64 / steps as f64;
            let len = ((0.0 - n as f64) / -ratio).ceil() as usize;
            (0..len).map(|i| round_half_even(n as f64 - i as f64 * ratio) - 1.0).collect()
        }
        other => return Err(Error::Scheduler(format!("timestep_spacing {other:?} is not supported (linspace, leading, trailing)"))),
    };
    Ok(v.into_iter().map(|t| t as f32 as f64).collect())
}

pub(crate) fn init_noise_sigma(sigmas: &[f64], spacing: &str) -> f64 {
    let max = sigmas.iter().copied().fold(0.0, f64::max);
    if spacing == "linspace" || spacing == "trailing" {
        max
    } else {
        ((max * max + 1.0) as f32).sqrt() as f64
    }
}

/// `x0` from the model output at noise level `sigma` (diffusers' formulas, in its order).
pub(crate) fn predict_x0(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - scale(model_output, sigma)?)?,
        Prediction::V => {
            (scale(model_output, -sigma / (sigma * sigma + 1.0).sqrt())? + scale(sample, 1.0 / (sigma * sigma + 1.0))?)?
        }
        Prediction::Sample => model_output.clone(),
    })
}

pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
}

impl EulerDiscrete {
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        let sched = NoiseSchedule::from_config(&c, 0.0001, 0.02, "linear")?;
        if c.string("timestep_type", "discrete")? != "discrete" {
            return Err(Error::Scheduler("timestep_type \"continuous\" is not supported".into()));
        }
        let spacing = c.string("timestep_spacing", "linspace")?;
        let n = sched.num_train_timesteps;
        let mut timesteps = euler_timesteps(&spacing, n, steps, c.usize("steps_offset", 0)?)?;
        let train = sched.train_sigmas();
        let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        let mut sigmas: Vec<f64> = match c.string("interpolation_type", "linear")?.as_str() {
            "linear" => timesteps.iter().map(|&t| interp(t, &train)).collect(),
            "log_linear" => {
                let (a, b) = (train[train.len() - 1].ln() as f32, train[0].ln() as f32);
                super::linspace_f32(a, b, steps + 1).into_iter().map(|x| x.exp() as f64).collect()
            }
            other => return Err(Error::Scheduler(format!("interpolation_type {other:?} is not supported (linear, log_linear)"))),
        };
        if let Some(s) = schedule.effective(&c)?.sigmas(&sigmas, steps, &c, &train)? {
            timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas) as f32 as f64).collect();
            sigmas = s;
        }
        let last = match c.string("final_sigmas_type", "zero")?.as_str() {
            "zero" => 0.0,
            "sigma_min" => train[0],
            other => return Err(Error::Scheduler(format!("final_sigmas_type {other:?} is not supported (zero, sigma_min)"))),
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            init_noise_sigma: init_noise_sigma(&sigmas, &spacing),
            timesteps,
            sigmas,
            prediction: Prediction::from_config(&c, true)?, denoised: None,
        })
    }
}

impl Scheduler for EulerDiscrete {
    sigma_table_getters!();
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        scale(sample, 1.0 / (s * s + 1.0).sqrt())
    }
    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        self.denoised = Some(x0.clone());
        let derivative = scale(&(sample - x0)?, 1.0 / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((sample + scale(&derivative, dt)?)?)
    }
}
