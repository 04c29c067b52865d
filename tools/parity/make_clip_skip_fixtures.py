"""Goldens for --clip-skip (issue 17): diffusers' SDXL `encode_prompt(clip_skip=N)` embeddings
and seeded pipeline runs with clip_skip 1 and 2 on tests/fixtures/sdxl/tiny2.

python tools/parity/make_clip_skip_fixtures.py   (writes tests/fixtures/sdxl/tiny2/clip_skip.{json,safetensors})
"""
import json
import os

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    g, js = {}, {"pipeline": {}, "embeds": {}}
    for skip in (1, 2):
        with torch.no_grad():
            pe, ne, pp, npool = pipe.encode_prompt("a red house by the sea", device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt="blurry", clip_skip=skip)
        g[f"embeds{skip}.prompt"] = pe.contiguous()
        g[f"embeds{skip}.negative"] = ne.contiguous()
        g[f"embeds{skip}.pooled"] = pp.contiguous()
        js["embeds"][f"embeds{skip}"] = {"prompt": "a red house by the sea", "negative": "blurry", "clip_skip": skip}
    cases = [dict(clip_skip=1, prompt="a photo of a cat", negative=None, steps=5, cfg=5.0, seed=5, batch=1),
             dict(clip_skip=2, prompt="a red house", negative="blurry", steps=6, cfg=4.0, seed=6, batch=2)]
    for i, c in enumerate(cases):
        with torch.no_grad():
            lat = pipe(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"], guidance_scale=c["cfg"],
                       height=32, width=32, num_images_per_prompt=c["batch"], clip_skip=c["clip_skip"], output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        c["sampler"] = "euler"
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(ROOT, "clip_skip.safetensors"))
    with open(os.path.join(ROOT, "clip_skip.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", os.path.join(ROOT, "clip_skip.json"))


if __name__ == "__main__":
    main()
