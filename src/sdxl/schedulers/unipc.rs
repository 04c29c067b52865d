//! diffusers `UniPCMultistepScheduler` (UniPC, Zhao et al. 2023) as diffusers configures it by
//! default: order 2, data prediction (`predict_x0`), the B(h) = e^h − 1 variant (`bh2`), the
//! UniC corrector after every step but the first, lower orders at the end. The schedule is the
//! multistep solvers' own (shared with DPM-Solver++).

use candle_core::Tensor;
use serde_json::Value;

use super::dpm_solver::{alpha_sigma, data_prediction, lambda, multistep_schedule};
use super::{scale, ConfigReader, Schedule, NoiseSource, Prediction, Scheduler};
use crate::error::{Error, Result};

pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// The last step's prediction of the clean latents (what A1111 decodes when interrupted).
    denoised: Option<Tensor>,
    bh2: bool,
    lower_order_final: bool,
    /// The data predictions (x0) of the last two steps, newest last.
    history: Vec<Tensor>,
    lower_order_nums: usize,
    /// The sample before the last predictor step and that step's order, for the corrector.
    last: Option<(Tensor, usize)>,
}

impl UniPc {
    pub fn new(config: &Value, steps: usize, schedule: Schedule) -> Result<Self> {
        let c = ConfigReader(config);
        c.refuse_true(&["thresholding", "use_flow_sigmas"])?;
        if c.usize("solver_order", 2)? != 2 {
            return Err(Error::Scheduler("UniPC: only solver_order 2 (diffusers' default) is supported".into()));
        }
        if !c.bool("predict_x0", true)? {
            return Err(Error::Scheduler("UniPC: only predict_x0 = true (diffusers' default) is supported".into()));
        }
        let bh2 = match c.string("solver_type", "bh2")?.as_str() {
            "bh2" => true,
            "bh1" => false,
            other => return Err(Error::Scheduler(format!("UniPC solver_type {other:?} is not supported (bh1, bh2)"))),
        };
        if config.get("disable_corrector").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            return Err(Error::Scheduler("UniPC: disable_corrector is not supported".into()));
        }
        let (timesteps, sigmas, _) = multistep_schedule(&c, steps, schedule)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::from_config(&c, true)?, denoised: None,
            bh2,
            lower_order_final: c.bool("lower_order_final", true)?,
            history: Vec::with_capacity(2),
            lower_order_nums: 0,
            last: None,
        })
    }

    /// hh = −h, h·φ₁ = e^hh − 1 and B(h) for a step from `s0` to `t`.
    fn coefficients(&self, s_t: f64, s_s0: f64) -> (f64, f64, f64, f64) {
        let h = lambda(s_t) - lambda(s_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        (h, hh, h_phi_1, b_h)
    }
}

impl Scheduler for UniPc {
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
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let x0 = data_prediction(self.prediction, model_output, sample, self.sigmas[i])?;
        self.denoised = Some(x0.clone());
        // UniC: correct the sample the last predictor made, with this step's model output.
        let sample = match self.last.take() {
            Some((last_sample, order)) if i > 0 => {
                let (s_t, s_s0) = (self.sigmas[i], self.sigmas[i - 1]);
                let (alpha_t, sigma_t) = alpha_sigma(s_t);
                let (_, sigma_s0) = alpha_sigma(s_s0);
                let (h, hh, h_phi_1, b_h) = self.coefficients(s_t, s_s0);
                let m0 = &self.history[self.history.len() - 1];
                let base = (scale(&last_sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * h_phi_1)?)?;
                let d1_t = (&x0 - m0)?;
                let corrected = if order == 1 {
                    scale(&d1_t, alpha_t * b_h * 0.5)?
                } else {
                    // rhos_c = solve([[1, 1], [r1, 1]], b) for the previous step's point.
                    let m1 = &self.history[self.history.len() - 2];
                    let r1 = (lambda(self.sigmas[i - 2]) - lambda(s_s0)) / h;
                    let d1 = scale(&(m1 - m0)?, 1.0 / r1)?;
                    let hk1 = h_phi_1 / hh - 1.0;
                    let b1 = hk1 / b_h;
                    let hk2 = hk1 / hh - 0.5;
                    let b2 = hk2 * 2.0 / b_h;
                    // [[1, 1], [r1, 1]] ρ = [b1, b2]
                    let det = 1.0 - r1;
                    let rho0 = (b1 - b2) / det;
                    let rho1 = (b2 - r1 * b1) / det;
                    (scale(&d1, alpha_t * b_h * rho0)? + scale(&d1_t, alpha_t * b_h * rho1)?)?
                };
                (base - corrected)?
            }
            _ => sample.clone(),
        };
        if self.history.len() == 2 {
            self.history.remove(0);
        }
        self.history.push(x0);
        let len = self.timesteps.len();
        let order = if self.lower_order_final { 2.min(len - i) } else { 2 };
        let order = order.min(self.lower_order_nums + 1);
        // UniP: the predictor from the corrected sample.
        let (s_t, s_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (_, sigma_s0) = alpha_sigma(s_s0);
        let (h, _, h_phi_1, b_h) = self.coefficients(s_t, s_s0);
        let m0 = &self.history[self.history.len() - 1];
        let mut prev = (scale(&sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * h_phi_1)?)?;
        if order == 2 {
            let m1 = &self.history[self.history.len() - 2];
            let r1 = (lambda(self.sigmas[i - 1]) - lambda(s_s0)) / h;
            let d1 = scale(&(m1 - m0)?, 1.0 / r1)?;
            prev = (prev - scale(&d1, alpha_t * b_h * 0.5)?)?;
        }
        self.last = Some((sample, order));
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
