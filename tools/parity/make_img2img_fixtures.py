"""Goldens for img2img and inpainting (issue 17) on the tiny pipeline of
tests/fixtures/sdxl/tiny2: StableDiffusionXLImg2ImgPipeline at strengths 0.3 / 0.75 / 1.0 with
three samplers (Euler a: the ancestral noise stream; DPM++ 2M: alpha-space add_noise; Heun:
order 2) plus DDIM, and StableDiffusionXLInpaintPipeline on the 4-channel UNet and on a tiny
9-channel inpainting UNet made here (random weights, stored in f16 to stay small; diffusers
runs it upcast to f32, as our loader does). Final latents are compared (output_type="latent").

python tools/parity/make_img2img_fixtures.py   (writes tests/fixtures/sdxl/tiny2/img2img/)
"""
import json
import os

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
OUT = os.path.join(TINY, "img2img")
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
}


def make_inputs():
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([(x * 8) % 256, (y * 8) % 256, ((x + y) * 5) % 256], -1).astype(np.uint8)
    img[8:20, 10:26] = [220, 40, 60]
    Image.fromarray(img).save(os.path.join(OUT, "init.png"))
    mask = np.zeros((32, 32), np.uint8)
    mask[6:22, 12:28] = 255
    Image.fromarray(mask).save(os.path.join(OUT, "mask.png"))


def make_inpaint_unet():
    cfg = UNet2DConditionModel.load_config(os.path.join(TINY, "pipeline", "unet"))
    cfg["in_channels"] = 9
    cfg["layers_per_block"] = 1
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    d = os.path.join(OUT, "inpaint_unet")
    os.makedirs(d, exist_ok=True)
    unet.save_pretrained(d, safe_serialization=True)
    # Store f16 (exactly the values diffusers runs on).
    from safetensors.torch import load_file
    f = os.path.join(d, "diffusion_pytorch_model.safetensors")
    save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, f)
    return unet


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    make_inputs()
    base = StableDiffusionXLPipeline.from_pretrained(os.path.join(TINY, "pipeline"), torch_dtype=torch.float32)
    cfg = base.scheduler.config
    init = Image.open(os.path.join(OUT, "init.png")).convert("RGB")
    mask = Image.open(os.path.join(OUT, "mask.png"))
    i2i = StableDiffusionXLImg2ImgPipeline(**base.components)
    inp = StableDiffusionXLInpaintPipeline(**base.components)
    unet9 = make_inpaint_unet()
    comps = dict(base.components)
    comps["unet"] = unet9
    inp9 = StableDiffusionXLInpaintPipeline(**comps)
    cases = []
    for sampler, steps in (("euler_a", 6), ("dpmpp_2m", 7), ("heun", 5)):
        for strength in (0.3, 0.75, 1.0):
            cases.append(dict(kind="img2img", sampler=sampler, steps=steps, strength=strength, cfg=5.0, prompt="a red house", negative=None, batch=1, seed=40 + len(cases)))
    cases.append(dict(kind="img2img", sampler="ddim", steps=8, strength=0.6, cfg=3.0, prompt="a photo of a cat", negative="blurry", batch=2, seed=7))
    cases.append(dict(kind="img2img", sampler="euler", steps=10, strength=0.55, cfg=1.0, prompt="a green tree", negative=None, batch=1, seed=8))
    cases.append(dict(kind="inpaint", sampler="euler", steps=6, strength=0.75, cfg=5.0, prompt="a blue dog", negative=None, batch=1, seed=60))
    cases.append(dict(kind="inpaint", sampler="euler_a", steps=5, strength=1.0, cfg=4.0, prompt="a red house", negative="ugly", batch=2, seed=61))
    cases.append(dict(kind="inpaint", sampler="dpmpp_2m", steps=7, strength=0.5, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1, seed=62))
    cases.append(dict(kind="inpaint", sampler="heun", steps=4, strength=0.8, cfg=5.0, prompt="a green tree", negative=None, batch=1, seed=63))
    cases.append(dict(kind="inpaint9", sampler="euler", steps=6, strength=1.0, cfg=5.0, prompt="a blue dog", negative=None, batch=1, seed=70))
    cases.append(dict(kind="inpaint9", sampler="euler_a", steps=6, strength=0.7, cfg=4.0, prompt="a red house", negative=None, batch=2, seed=71))
    cases.append(dict(kind="inpaint9", sampler="dpmpp_2m", steps=5, strength=0.9, cfg=5.0, prompt="a photo of a cat", negative="blurry", batch=1, seed=72))
    # A1111's per-image seeds are diffusers' list of generators: image k has its own, seeded seed + k.
    cases.append(dict(kind="img2img", sampler="euler_a", steps=6, strength=0.7, cfg=4.0, prompt="a red house", negative="ugly", batch=2, seed=80,
                      batch_seeds="per_image"))
    g, js = {}, {}
    for i, c in enumerate(cases):
        cls, kw = SAMPLERS[c["sampler"]]
        pipe = {"img2img": i2i, "inpaint": inp, "inpaint9": inp9}[c["kind"]]
        pipe.scheduler = cls.from_config(cfg, **kw)
        args = dict(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"], strength=c["strength"],
                    guidance_scale=c["cfg"], num_images_per_prompt=c["batch"], output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(c["seed"]), image=init)
        if c.get("batch_seeds") == "per_image":
            args["generator"] = [torch.Generator("cpu").manual_seed(c["seed"] + k) for k in range(c["batch"])]
        if c["kind"] != "img2img":
            args.update(mask_image=mask, height=32, width=32)
        with torch.no_grad():
            lat = pipe(**args).images
        g[f"case{i}.latents"] = lat.contiguous()
        js[f"case{i}"] = c
    save_file(g, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
