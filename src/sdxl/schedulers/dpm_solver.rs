//! diffusers `DPMSolverMultistepScheduler` as DPM++ 2M (`algorithm_type = "dpmsolver++"`,
//! order 2) and DPM++ 2M SDE (`"sde-dpmsolver++"`: the same multistep update with part of the
//! noise replaced by fresh noise each step, drawn from the run's torch-compatible stream), with
//! or without Karras sigmas. The sampler name fixes the algorithm and order;
//! the rest (spacing, offsets, final sigma, solver type) comes from the folder's config.

use candle_core::Tensor;
use serde_json::Value;

use super::{interp, round_half_even, Schedule, scale, sigma_to_t, ConfigReader, NoiseSchedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

/// The multistep solvers' schedule (DPM-Solver++, UniPC): their own timestep spacing (one more
/// point than steps, the last dropped), optionally Karras sigmas over the flipped training table,
/// and the final sigma. Returns int64-like timesteps, float32 sigmas with the final one, and
/// whether the final sigma is zero.
pub(crate) fn multistep_schedule(c: &ConfigReader, steps: usize, schedule: Schedule) -> Result<(Vec<f64>, Vec<f64>, bool)> {
    let sched = NoiseSchedule::from_config(c, 0.0001, 0.02, "linear")?;
    let n = sched.num_train_timesteps;
    let train = sched.train_sigmas();
    let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
    // lambda_min_clipped (default -inf) cuts the schedule's low-noise end.
    let lmc = c.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
    let clipped_idx = {
        let mut lambdas: Vec<f64> = sched
            .alphas_cumprod
            .iter()
            .map(|&a| (a.sqrt() as f64).ln() - ((1.0 - a).sqrt() as f64).ln())
            .collect();
        lambdas.reverse();
        lambdas.iter().position(|&l| l >= lmc).unwrap_or(lambdas.len())
    };
    let last = n - clipped_idx;
    let offset = c.usize("steps_offset", 0)?;
    let spacing = c.string("timestep_spacing", "linspace")?;
    let mut timesteps: Vec<f64> = match spacing.as_str() {
        "linspace" => (0..=steps)
            .rev()
            .map(|i| round_half_even(i as f64 * ((last - 1) as f64 / steps as f64)))
            .take(steps)
            .collect(),
        "leading" => {
            let ratio = last / (steps + 1);
            (0..=steps).rev().map(|i| (i * ratio + offset) as f64).take(steps).collect()
        }
        "trailing" => {
            let ratio = n as f64 / steps as f64;
            let len = ((0.0 - last as f64) / -ratio).ceil() as usize;
            (0..len).map(|i| round_half_even(last as f64 - i as f64 * ratio) - 1.0).collect()
        }
        other => return Err(Error::Scheduler(format!("timestep_spacing {other:?} is not supported (linspace, leading, trailing)"))),
    };
    let schedule = schedule.effective(c)?;
    let flipped: Vec<f64> = train.iter().rev().copied().collect();
    let mut sigmas: Vec<f64> = match schedule.sigmas(&flipped, steps, c, &train)? {
        Some(s) => {
            // Karras timesteps are rounded (except on squaredcos tables); the others are cut
            // to int64 below, as diffusers casts them.
            let round = schedule == Schedule::Karras && c.string("beta_schedule", "linear")? != "squaredcos_cap_v2";
            // Unrounded timesteps are cut, so they are read off numpy's float32 log table (as
            // diffusers does) for the cut to land on the same integer.
            let log32: Vec<f32> = train.iter().map(|&s| s.ln() as f32).collect();
            timesteps = s
                .iter()
                .map(|&x| if round { round_half_even(sigma_to_t(x, &log_sigmas)) } else { super::sigma_to_t_f32(x, &log32) })
                .collect();
            s
        }
        None => timesteps.iter().map(|&t| interp(t, &train)).collect(),
    };
    let final_type = c.string("final_sigmas_type", "zero")?;
    sigmas.push(match final_type.as_str() {
        "zero" => 0.0,
        "sigma_min" => train[0],
        other => return Err(Error::Scheduler(format!("final_sigmas_type {other:?} is not supported (zero, sigma_min)"))),
    });
    // Timesteps are int64 in diffusers.
    let timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
    Ok((timesteps, sigmas.into_iter().map(|s| s as f32 as f64).collect(), final_type == "zero"))
}

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    midpoint: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// `sde-dpmsolver++`.
    sde: bool,
    /// The last two data predictions (x0), newest last.
    history: Vec<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of the VP process at EDM noise level `sigma`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The half log-SNR λ = log α − log σ the multistep solvers step in.
pub(crate) fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The data prediction (x0) the multistep solvers work with, from any prediction type.
pub(crate) fn data_prediction(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match prediction {
        Prediction::Epsilon => scale(&(sample - scale(model_output, sigma_t)?)?, 1.0 / alpha_t)?,
        Prediction::V => (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?,
        Prediction::Sample => model_output.clone(),
    })
}

impl DpmSolverMultistep {
    pub fn new(config: &Value, steps: usize, schedule: Schedule, sde: bool) -> Result<Self> {
        let c = ConfigReader(config);
        c.refuse_true(&["thresholding", "use_lu_lambdas", "use_flow_sigmas"])?;
        let (timesteps, sigmas, final_zero) = multistep_schedule(&c, steps, schedule)?;
        let midpoint = match c.string("solver_type", "midpoint")?.as_str() {
            "midpoint" => true,
            "heun" => false,
            other => return Err(Error::Scheduler(format!("solver_type {other:?} is not supported (midpoint, heun)"))),
        };
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::from_config(&c, true)?, denoised: None,
            midpoint,
            lower_order_final: c.bool("lower_order_final", true)?,
            euler_at_final: c.bool("euler_at_final", false)?,
            final_zero,
            sde,
            history: Vec::with_capacity(2),
            lower_order_nums: 0,
        })
    }

}

impl Scheduler for DpmSolverMultistep {
    unit_noise_getters!();
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_vp(&self.sigmas, original, noise, i)
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn denoised(&self) -> Option<&Tensor> {
        self.denoised.as_ref()
    }
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let len = self.timesteps.len();
        let lower_final = i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let x0 = data_prediction(self.prediction, model_output, sample, self.sigmas[i])?;
        self.denoised = Some(x0.clone());
        if self.history.len() == 2 {
            self.history.remove(0);
        }
        self.history.push(x0.clone());

        let (s_t, s_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (_, sigma_s0) = alpha_sigma(s_s0);
        let h = lambda(s_t) - lambda(s_s0);
        let ratio = sigma_t / sigma_s0;
        let second = !(self.lower_order_nums < 1 || lower_final);
        let d1 = if second {
            let h0 = lambda(s_s0) - lambda(self.sigmas[i - 1]);
            Some(scale(&(&x0 - &self.history[0])?, h / h0)?)
        } else {
            None
        };
        let prev = if self.sde {
            // Drawn at every step, as diffusers draws it, so the stream stays aligned.
            let noise = noise(model_output.dims())?.to_dtype(sample.dtype())?.to_device(sample.device())?;
            let e2h = (-2.0 * h).exp();
            let c0 = alpha_t * (1.0 - e2h);
            let mut x = (scale(sample, ratio * (-h).exp())? + scale(&x0, c0)?)?;
            if let Some(d1) = &d1 {
                let c1 = if self.midpoint { 0.5 * c0 } else { alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0) };
                x = (x + scale(d1, c1)?)?;
            }
            (x + scale(&noise, sigma_t * (1.0 - e2h).sqrt())?)?
        } else {
            let phi = alpha_t * ((-h).exp() - 1.0);
            let base = (scale(sample, ratio)? - scale(&x0, phi)?)?;
            match &d1 {
                None => base,
                Some(d1) if self.midpoint => (base - scale(d1, 0.5 * phi)?)?,
                Some(d1) => (base + scale(d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?,
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
