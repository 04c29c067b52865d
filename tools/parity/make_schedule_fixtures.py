"""Goldens for the schedule types (issue 17) on the tiny pipeline of tests/fixtures/sdxl/tiny2.

- Karras, Exponential and Beta as diffusers builds them (`use_karras_sigmas`,
  `use_exponential_sigmas`, `use_beta_sigmas`) for every sampler whose diffusers class has
  them: the tables at 4 and 25 steps, and seeded pipeline runs.
- SGM Uniform and Align Your Steps are A1111's (modules/sd_schedulers.py: `sgm_uniform`,
  `get_align_your_steps_sigmas` with k-diffusion's DiscreteSchedule `sigma_to_t`/`t_to_sigma`),
  re-implemented below; their sigma lists are goldens, and pipeline runs pass them to diffusers'
  Euler as `sigmas=` (Euler derives the timesteps from sigmas as k-diffusion does).

python tools/parity/make_schedule_fixtures.py   (writes tests/fixtures/sdxl/tiny2/schedules.{json,safetensors})
"""
import json
import math
import os

import numpy as np
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, StableDiffusionXLPipeline, UniPCMultistepScheduler)
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {"use_karras_sigmas": False}),
}
FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


# --- A1111 (modules/sd_schedulers.py) over k-diffusion's DiscreteSchedule, re-implemented ---
class DiscreteSchedule:
    def __init__(self, alphas_cumprod):
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)


def sgm_uniform(n, model):
    start = model.sigma_to_t(torch.tensor(model.sigmas[-1].item()))
    end = model.sigma_to_t(torch.tensor(model.sigmas[0].item()))
    sigs = [model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def ays_sdxl(n):
    def loglinear_interp(t_steps, num_steps):
        xs = np.linspace(0, 1, len(t_steps))
        ys = np.log(t_steps[::-1])
        new_xs = np.linspace(0, 1, num_steps)
        new_ys = np.interp(new_xs, xs, ys)
        return np.exp(new_ys)[::-1].copy()
    sigmas = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    if n != len(sigmas):
        sigmas = np.append(loglinear_interp(sigmas, n), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    cfg = pipe.scheduler.config
    js = {"tables": {}, "a1111": {}, "pipeline": {}}
    g = {}
    for name, (cls, kw) in SAMPLERS.items():
        for sched, flag in FLAGS.items():
            for steps in (4, 25):
                s = cls.from_config(cfg, **{**kw, flag: True})
                s.set_timesteps(steps)
                js["tables"][f"{name}/{sched}/{steps}"] = {
                    "timesteps": [float(t) for t in s.timesteps], "sigmas": [float(x) for x in s.sigmas],
                    "init_noise_sigma": float(s.init_noise_sigma)}
    model = DiscreteSchedule(EulerDiscreteScheduler.from_config(cfg).alphas_cumprod)
    for steps in (4, 10, 11, 25):
        js["a1111"][f"sgm_uniform/{steps}"] = [float(x) for x in sgm_uniform(steps, model)]
        js["a1111"][f"ays/{steps}"] = [float(x) for x in ays_sdxl(steps)]
    cases = []
    prompts = ["a photo of a cat", "a red house", "a green tree", "a blue dog"]
    for name in SAMPLERS:
        for sched in FLAGS:
            cases.append(dict(sampler=name, schedule=sched, steps=4))
    for i, (name, sched) in enumerate([("euler", "karras"), ("heun", "exponential"), ("dpm2", "beta"), ("dpm2_a", "karras"),
                                       ("dpmpp_2m", "exponential"), ("dpmpp_2m_sde", "beta"), ("unipc", "exponential")]):
        cases.append(dict(sampler=name, schedule=sched, steps=25))
    for sched in ("sgm_uniform", "ays"):
        for steps in (4, 25):
            cases.append(dict(sampler="euler", schedule=sched, steps=steps))
    for i, c in enumerate(cases):
        c.update(prompt=prompts[i % 4], negative=None if i % 3 else "blurry", cfg=5.0 if i % 2 else 3.5, batch=1 + (i % 5 == 0), seed=100 + i)
        cls, kw = SAMPLERS[c["sampler"]]
        extra = {}
        if c["schedule"] in FLAGS:
            pipe.scheduler = cls.from_config(cfg, **{**kw, FLAGS[c["schedule"]]: True})
        else:
            pipe.scheduler = cls.from_config(cfg, **kw)
            sig = sgm_uniform(c["steps"], model) if c["schedule"] == "sgm_uniform" else ays_sdxl(c["steps"])
            extra["sigmas"] = [float(x) for x in sig]
        with torch.no_grad():
            lat = pipe(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=None if extra else c["steps"],
                       guidance_scale=c["cfg"], height=32, width=32, num_images_per_prompt=c["batch"], output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(c["seed"]), **extra).images
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(ROOT, "schedules.safetensors"))
    with open(os.path.join(ROOT, "schedules.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", os.path.join(ROOT, "schedules.json"), len(cases), "runs")


if __name__ == "__main__":
    main()
