"""Goldens for img2img's resize mode 3, A1111's "Just resize (latent upscale)", on the tiny
pipeline of tests/fixtures/sdxl/tiny2. A1111 (processing.py, StableDiffusionProcessingImg2Img.init)
encodes the init image at its own size, not resized, then calls
torch.nn.functional.interpolate(init_latent, size=(height // 8, width // 8), mode="bilinear").
Here: the image as diffusers' preprocess makes it (÷255, ×2−1) but at its own size, the VAE
posterior sampled from the run's generator and scaled (diffusers' prepare_latents), the latents
interpolated as A1111 does, then StableDiffusionXLImg2ImgPipeline given those latents as its
image with the same generator, which draws the noise next. Sizes are odd on purpose: one init
shrinks, one enlarges. Final latents are compared (output_type="latent").

python tools/parity/make_latent_resize_fixtures.py   (writes tests/fixtures/sdxl/tiny2/img2img/latent_resize/)
"""
import json
import os

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents
from PIL import Image
from safetensors.torch import save_file

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
OUT = os.path.join(TINY, "img2img", "latent_resize")
SAMPLERS = {"euler_a": (EulerAncestralDiscreteScheduler, {}), "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False})}


def make_init(name, w, h):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 11) % 256, (y * 7) % 256, ((x * y) * 3) % 256], -1).astype(np.uint8)
    img[h // 4:h // 2, w // 3:w // 2] = [30, 200, 90]
    Image.fromarray(img).save(os.path.join(OUT, name))


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    make_init("init_a.png", 45, 37)
    make_init("init_b.png", 21, 14)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(os.path.join(TINY, "pipeline"), torch_dtype=torch.float32)
    f = pipe.vae_scale_factor
    cases = [
        dict(init="init_a.png", width=32, height=32, sampler="euler_a", steps=6, strength=0.75, cfg=5.0, prompt="a red house", batch=1, seed=21),
        dict(init="init_b.png", width=32, height=24, sampler="dpmpp_2m", steps=7, strength=0.6, cfg=4.0, prompt="a green tree", batch=2, seed=22),
    ]
    g = {}
    for i, c in enumerate(cases):
        cls, kw = SAMPLERS[c["sampler"]]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
        gen = torch.Generator("cpu").manual_seed(c["seed"])
        img = np.array(Image.open(os.path.join(OUT, c["init"])).convert("RGB")).astype(np.float32) / 255.0
        x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2.0 - 1.0
        with torch.no_grad():
            lat = retrieve_latents(pipe.vae.encode(x), generator=gen) * pipe.vae.config.scaling_factor
            lat = torch.nn.functional.interpolate(lat, size=(c["height"] // f, c["width"] // f), mode="bilinear")
            out = pipe(prompt=c["prompt"], image=lat, strength=c["strength"], num_inference_steps=c["steps"], guidance_scale=c["cfg"],
                       num_images_per_prompt=c["batch"], generator=gen, output_type="latent").images
        g[f"case{i}.latents"] = out.contiguous()
    save_file(g, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as fh:
        json.dump({f"case{i}": c for i, c in enumerate(cases)}, fh, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
