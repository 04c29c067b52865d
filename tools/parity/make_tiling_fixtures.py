"""Goldens for seamless tiling (A1111's "Tiling", InvokeAI's "Seamless X/Y"): diffusers' SDXL
pipeline on tests/fixtures/sdxl/tiny2 with the borders of every Conv2d in the UNet and the VAE
wrapped around.

- `xy` is exactly what A1111 does (`padding_mode = "circular"` on every torch Conv2d).
- `x` and `y` wrap one axis and zero-pad the other, as InvokeAI's seamless patch does
  (F.pad circular on the wrapped axis, then constant zeros on the other).

python tools/parity/make_tiling_fixtures.py   (writes tests/fixtures/sdxl/tiny2/tiling.{json,safetensors})
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")


def one_axis_forward(conv, x_axis):
    ph, pw = conv.padding

    def forward(inp):
        if x_axis:
            inp = F.pad(inp, (pw, pw, 0, 0), mode="circular")
            inp = F.pad(inp, (0, 0, ph, ph), mode="constant")
        else:
            inp = F.pad(inp, (0, 0, ph, ph), mode="circular")
            inp = F.pad(inp, (pw, pw, 0, 0), mode="constant")
        return F.conv2d(inp, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    return forward


def set_mode(pipe, mode):
    for model in (pipe.unet, pipe.vae):
        for m in model.modules():
            if not isinstance(m, torch.nn.Conv2d):
                continue
            if "forward" in m.__dict__:
                del m.forward
            m.padding_mode = "zeros"
            if mode == "xy":
                m.padding_mode = "circular"
            elif mode in ("x", "y") and m.padding != (0, 0):
                m.forward = one_axis_forward(m, mode == "x")


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    g, js = {}, {"pipeline": {}}
    cases = [dict(tiling="xy", prompt="a brick wall texture", negative="blurry", steps=5, cfg=5.0, seed=11, batch=1, size=[32, 32]),
             dict(tiling="x", prompt="a red house", negative=None, steps=4, cfg=4.0, seed=12, batch=2, size=[32, 48]),
             dict(tiling="y", prompt="grass", negative="", steps=4, cfg=6.0, seed=13, batch=1, size=[48, 32]),
             dict(tiling="off", prompt="a brick wall texture", negative="blurry", steps=5, cfg=5.0, seed=11, batch=1, size=[32, 32])]
    for i, c in enumerate(cases):
        set_mode(pipe, c["tiling"])
        h, w = c["size"]
        common = dict(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"], guidance_scale=c["cfg"],
                      height=h, width=w, num_images_per_prompt=c["batch"])
        with torch.no_grad():
            lat = pipe(**common, output_type="latent", generator=torch.Generator("cpu").manual_seed(c["seed"])).images
            img = pipe(**common, output_type="np", generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        c["sampler"] = "euler"
        g[f"run{i}.latents"] = lat.contiguous()
        g[f"run{i}.pixels"] = torch.from_numpy((img * 255).round().astype(np.float32)).contiguous()
        js["pipeline"][f"run{i}"] = c
    # The VAE's encoder wraps too (img2img starts from it): its distribution's mean and logvar.
    set_mode(pipe, "xy")
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
    g["encode.x"], g["encode.mean"], g["encode.logvar"] = x, dist.mean.contiguous(), dist.logvar.contiguous()
    save_file(g, os.path.join(ROOT, "tiling.safetensors"))
    with open(os.path.join(ROOT, "tiling.json"), "w") as f:
        json.dump(js, f, indent=1)
    print({k: tuple(v.shape) for k, v in g.items()})


if __name__ == "__main__":
    main()
