"""Goldens for ControlNet (diffusers' `ControlNetModel` and `StableDiffusionXLControlNetPipeline`)
on tests/fixtures/sdxl/tiny2.

The ControlNet is `ControlNetModel.from_unet(tiny2's UNet)`, with the layers diffusers
zero-initialises (the conditioning embedding's `conv_out`, the zero convolutions and the mid
block's) given random weights instead, so a wrong residual cannot pass as zero.

It is saved as a diffusers folder (`controlnet/`). The Rust test also reads its weights file alone,
as one `.safetensors` with diffusers names and no config (how A1111's `diffusers_xl_*` ControlNets
ship), whose config the loader infers from the tensors and the base UNet.

Pipeline cases: Euler with weight, guidance start/end, a batch and no CFG; Heun (two model calls
per step, counted per call as diffusers counts them); guess mode; a ControlNet whose config says
`global_pool_conditions` (the same weights, which the test reads with that config; diffusers then
runs it in guess mode and pools its residuals); and img2img (`StableDiffusionXLControlNetImg2ImgPipeline`).

python tools/parity/make_controlnet_fixtures.py   (writes tests/fixtures/sdxl/tiny2/controlnet*)
"""
import json
import os
import shutil

import numpy as np
import torch
from diffusers import (ControlNetModel, EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionXLControlNetImg2ImgPipeline,
                       StableDiffusionXLControlNetPipeline)
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

    # Like the `-mid` / `-small` SDXL ControlNets: a cross-attention level with no transformer
    # block (depth 0), so also a mid block without one. Saved as one file without a config.
    small_config = {k: v for k, v in cn.config.items() if k != "_use_default_values"}
    small = ControlNetModel.from_config({**small_config, "transformer_layers_per_block": [1, 0]})
    with torch.no_grad():
        for p in small.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    small.eval()
    assert not any(".attentions.0.transformer_blocks." in k for k in small.state_dict() if k.startswith(("down_blocks.1", "mid_block")))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, os.path.join(ROOT, "controlnet_small.safetensors"))
    with torch.no_grad():
        down_s, mid_s = small(sample, 333.0, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=0.6,
                              added_cond_kwargs=added, return_dict=False)
    for i, d in enumerate(down_s):
        g[f"small.down{i}"] = d.contiguous()
    g["small.mid"] = mid_s.contiguous()

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        os.path.join(ROOT, "pipeline"), controlnet=cn, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cases = [dict(prompt="a red house", negative="blurry", steps=5, cfg=5.0, seed=21, batch=1, size=[32, 32],
                  weight=0.8, start=0.0, end=1.0),
             dict(prompt="a cat on a mat", negative=None, steps=6, cfg=4.0, seed=22, batch=2, size=[32, 48],
                  weight=1.3, start=0.2, end=0.7),
             dict(prompt="grass", negative="", steps=4, cfg=1.0, seed=23, batch=1, size=[48, 32],
                  weight=0.5, start=0.0, end=0.5)]
    cases += [dict(prompt="a red house", negative="blurry", steps=4, cfg=5.0, seed=24, batch=1, size=[32, 32],
                   weight=0.9, start=0.1, end=0.9, sampler="heun"),
              dict(prompt="a cat on a mat", negative="blurry", steps=4, cfg=6.0, seed=25, batch=2, size=[32, 32],
                   weight=1.1, start=0.0, end=1.0, guess_mode=True),
              dict(prompt="grass", negative="", steps=4, cfg=5.0, seed=26, batch=1, size=[32, 32],
                   weight=0.7, start=0.0, end=1.0, global_pool=True),
              dict(prompt="a red house", negative="blurry", steps=5, cfg=5.0, seed=27, batch=1, size=[32, 32],
                   weight=0.8, start=0.0, end=0.8, strength=0.6)]
    # Without `_use_default_values`, which would put the default (False) back.
    pooled_config = {k: v for k, v in cn.config.items() if k != "_use_default_values"}
    pooled = ControlNetModel.from_config({**pooled_config, "global_pool_conditions": True})
    assert pooled.config.global_pool_conditions
    pooled.load_state_dict(cn.state_dict())
    pooled.eval()
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    heun = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    for i, c in enumerate(cases):
        h, w = c["size"]
        rng = np.random.default_rng(100 + i)
        # Blocky, so the map has structure a resize would smear (it is used at its own size).
        img = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        img = (img.astype(np.int32) + rng.integers(-20, 21, size=img.shape)).clip(0, 255).astype(np.uint8)
        name = f"controlnet_run{i}.png"
        Image.fromarray(img).save(os.path.join(ROOT, name))
        c["image"] = name
        c.setdefault("sampler", "euler")
        pipe.scheduler = heun if c["sampler"] == "heun" else euler
        pipe.controlnet = pooled if c.get("global_pool") else cn
        args = dict(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"], guidance_scale=c["cfg"],
                    height=h, width=w, num_images_per_prompt=c["batch"], controlnet_conditioning_scale=c["weight"],
                    control_guidance_start=c["start"], control_guidance_end=c["end"], output_type="latent",
                    guess_mode=c.get("guess_mode", False), generator=torch.Generator("cpu").manual_seed(c["seed"]))
        with torch.no_grad():
            if "strength" in c:
                # The init image: the first run's control image, so it is a real picture.
                c["init"] = "controlnet_run0.png"
                i2i = StableDiffusionXLControlNetImg2ImgPipeline(**pipe.components)
                lat = i2i(image=Image.open(os.path.join(ROOT, c["init"])), control_image=Image.open(os.path.join(ROOT, name)),
                          strength=c["strength"], **args).images
            else:
                lat = pipe(image=Image.open(os.path.join(ROOT, name)), **args).images
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(ROOT, "controlnet.safetensors"))
    with open(os.path.join(ROOT, "controlnet.json"), "w") as f:
        json.dump(js, f, indent=1)
    print({k: tuple(v.shape) for k, v in g.items()})


if __name__ == "__main__":
    main()
