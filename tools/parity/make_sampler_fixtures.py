"""Goldens for the samplers added after the first pipeline fixtures (issue 17), on the existing
tiny pipeline of tests/fixtures/sdxl/tiny2 (so its other goldens stay as they are): each
scheduler's timesteps, sigmas and init_noise_sigma built from the folder's config, and final
latents of a seeded pipeline run.

python tools/parity/make_sampler_fixtures.py   (writes tests/fixtures/sdxl/tiny2/samplers.{json,safetensors})
"""
import json
import os

import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline, UniPCMultistepScheduler
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
SAMPLERS = {
    "heun": (HeunDiscreteScheduler, {}),
    "heun_karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    "lcm": (LCMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {"use_karras_sigmas": False}),
    "unipc_karras": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
}


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    cfg = pipe.scheduler.config
    js = {"schedulers": {}, "pipeline": {}}
    g = {}
    for name, (cls, kw) in SAMPLERS.items():
        js["schedulers"][name] = {}
        for steps in (4, 7):
            s = cls.from_config(cfg, **kw)
            s.set_timesteps(steps)
            e = {"timesteps": [float(t) for t in s.timesteps], "init_noise_sigma": float(s.init_noise_sigma)}
            if hasattr(s, "sigmas"):
                e["sigmas"] = [float(x) for x in s.sigmas]
            js["schedulers"][name][str(steps)] = e
    cases = [
        dict(sampler="heun", steps=5, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1, seed=11),
        dict(sampler="heun_karras", steps=4, cfg=3.0, prompt="a red house", negative="blurry", batch=2, seed=3),
        dict(sampler="dpm2", steps=5, cfg=5.0, prompt="a photo of a dog", negative=None, batch=1, seed=21),
        dict(sampler="dpm2_karras", steps=6, cfg=4.0, prompt="a green tree", negative="ugly", batch=1, seed=5),
        dict(sampler="dpm2_a", steps=5, cfg=5.0, prompt="a blue dog", negative=None, batch=2, seed=99),
        dict(sampler="dpmpp_2m_sde", steps=6, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1, seed=4),
        dict(sampler="dpmpp_2m_sde_karras", steps=8, cfg=3.0, prompt="a red house", negative="blurry", batch=2, seed=8),
        dict(sampler="lcm", steps=4, cfg=1.5, prompt="a photo of a dog", negative=None, batch=2, seed=17),
        dict(sampler="unipc", steps=7, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1, seed=31),
        dict(sampler="unipc_karras", steps=9, cfg=4.0, prompt="a red house", negative="blurry", batch=2, seed=32),
        dict(sampler="unipc", steps=2, cfg=3.0, prompt="a blue dog", negative=None, batch=1, seed=33),
        dict(sampler="euler_karras", steps=6, cfg=5.0, prompt="a green tree", negative=None, batch=1, seed=34),
    ]
    for i, case in enumerate(cases):
        cls, kw = SAMPLERS[case["sampler"]]
        pipe.scheduler = cls.from_config(cfg, **kw)
        with torch.no_grad():
            lat = pipe(prompt=case["prompt"], negative_prompt=case["negative"], num_inference_steps=case["steps"],
                       guidance_scale=case["cfg"], height=32, width=32, num_images_per_prompt=case["batch"],
                       output_type="latent", generator=torch.Generator("cpu").manual_seed(case["seed"])).images
        g[f"pipe{i}.latents"] = lat.contiguous()
        js["pipeline"][f"pipe{i}"] = case
    save_file(g, os.path.join(ROOT, "samplers.safetensors"))
    with open(os.path.join(ROOT, "samplers.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", os.path.join(ROOT, "samplers.json"))


if __name__ == "__main__":
    main()
