"""Goldens for ControlNet (diffusers' `ControlNetModel` and `StableDiffusionXLControlNetPipeline`)
on tests/fixtures/sdxl/tiny2.

The ControlNet is `ControlNetModel.from_unet(tiny2's UNet)`, with the layers diffusers
zero-initialises (the conditioning embedding's `conv_out`, the zero convolutions and the mid
block's) given random weights instead, so a wrong residual cannot pass as zero.

It is saved as a diffusers folder (`controlnet/`). The Rust test also reads its weights file alone,
as one `.safetensors` with diffusers names and no config (how A1111's `diffusers_xl_*` ControlNets
ship), whose config the loader infers from the tensors and the base UNet.

python tools/parity/make_controlnet_fixtures.py   (writes tests/fixtures/sdxl/tiny2/controlnet*)
"""
import json
import os
import shutil

import numpy as np
import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        os.path.join(ROOT, "pipeline"), controlnet=None, torch_dtype=torch.float32)
    unet = pipe.unet
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn_like(p) * 0.2)
    cn.eval()
    out = os.path.join(ROOT, "controlnet")
    shutil.rmtree(out, ignore_errors=True)
    cn.save_pretrained(out, safe_serialization=True)

    g, js = {}, {"pipeline": {}}
    # One module call: the residuals, and the UNet with them added.
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 6, 8, generator=gen)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    text_embeds = torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[12.0, 16.0, 0.0, 0.0, 12.0, 16.0]] * 2)
    cond = torch.rand(2, 3, 12, 16, generator=gen)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        down, mid = cn(sample, 333.0, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=0.6,
                       added_cond_kwargs=added, return_dict=False)
        unet_out = unet(sample, 333.0, encoder_hidden_states=ctx, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    g.update({"module.sample": sample, "module.context": ctx, "module.text_embeds": text_embeds, "module.time_ids": time_ids,
              "module.cond": cond, "module.mid": mid.contiguous(), "module.unet": unet_out.contiguous()})
    for i, d in enumerate(down):
        g[f"module.down{i}"] = d.contiguous()
    js["module"] = {"t": 333.0, "scale": 0.6, "down": len(down)}

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        os.path.join(ROOT, "pipeline"), controlnet=cn, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cases = [dict(prompt="a red house", negative="blurry", steps=5, cfg=5.0, seed=21, batch=1, size=[32, 32],
                  weight=0.8, start=0.0, end=1.0),
             dict(prompt="a cat on a mat", negative=None, steps=6, cfg=4.0, seed=22, batch=2, size=[32, 48],
                  weight=1.3, start=0.2, end=0.7),
             dict(prompt="grass", negative="", steps=4, cfg=1.0, seed=23, batch=1, size=[48, 32],
                  weight=0.5, start=0.0, end=0.5)]
    for i, c in enumerate(cases):
        h, w = c["size"]
        rng = np.random.default_rng(100 + i)
        # Blocky, so the map has structure a resize would smear (it is used at its own size).
        img = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        img = (img.astype(np.int32) + rng.integers(-20, 21, size=img.shape)).clip(0, 255).astype(np.uint8)
        name = f"controlnet_run{i}.png"
        Image.fromarray(img).save(os.path.join(ROOT, name))
        c["image"] = name
        with torch.no_grad():
            lat = pipe(prompt=c["prompt"], negative_prompt=c["negative"], image=Image.open(os.path.join(ROOT, name)),
                       num_inference_steps=c["steps"], guidance_scale=c["cfg"], height=h, width=w,
                       num_images_per_prompt=c["batch"], controlnet_conditioning_scale=c["weight"],
                       control_guidance_start=c["start"], control_guidance_end=c["end"], output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        c["sampler"] = "euler"
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(ROOT, "controlnet.safetensors"))
    with open(os.path.join(ROOT, "controlnet.json"), "w") as f:
        json.dump(js, f, indent=1)
    print({k: tuple(v.shape) for k, v in g.items()})


if __name__ == "__main__":
    main()
