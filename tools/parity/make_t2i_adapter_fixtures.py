"""Goldens for T2I-Adapters (diffusers' `T2IAdapter`, the UNet's `down_intrablock_additional_residuals`
and `StableDiffusionXLAdapterPipeline`) on tests/fixtures/sdxl/tiny2.

Adapters (random weights):
- `t2i_adapter/`: a diffusers folder, `full_adapter_xl` for tiny2 (channels 32/64/64/64, RGB input);
- `t2i_adapter_grey.safetensors`: the same kind with a one-channel input, saved as one file with no
  config (how sd-webui-controlnet's `t2i-adapter_diffusers_xl_*` files ship), whose config the
  loader infers;
- `t2i/full.safetensors` and `t2i/light.safetensors`: `full_adapter` and `light_adapter`, checked at
  module level only.

Module cases: each adapter's features for one image; tiny2's UNet with the XL adapter's features
(a block without attention adds its feature after its downsampler, in place, so its last skip has
it too; a block with attention adds before); and two small UNets saved beside them, one with
SDXL's block layout and three levels (so the fourth feature reaches the mid block) and one with
SD 1.5's (attention first, a last block without attention or downsampler) under the plain adapter.

Pipeline cases (Euler, and one Heun, whose factor counts steps, not its schedule's entries): weight,
`adapter_conditioning_factor`, a batch, no CFG, and the grey adapter given a colour map (the pipeline
is given PIL's `convert("L")` of it, which the Rust side must reproduce). The small UNets' adapters
are `t2i/xl8` (the XL kind unshuffling by 8) and `t2i/full4` (the plain kind by 4).

python tools/parity/make_t2i_adapter_fixtures.py   (writes tests/fixtures/sdxl/tiny2/t2i*)
"""
import json
import os
import shutil

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionXLAdapterPipeline, T2IAdapter, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")


def small_unet(down, up, dir):
    """A tiny UNet (8/16/16 channels) with the given block layout, saved as a diffusers folder."""
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
                                block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=16, attention_head_dim=4)
    unet.eval()
    shutil.rmtree(dir, ignore_errors=True)
    unet.save_pretrained(dir, safe_serialization=True)
    return unet


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(
        os.path.join(ROOT, "pipeline"), adapter=T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2,
                                                           downscale_factor=4, adapter_type="full_adapter_xl"),
        torch_dtype=torch.float32)
    unet = pipe.unet
    adapter = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=4,
                         adapter_type="full_adapter_xl")
    grey = T2IAdapter(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                      adapter_type="full_adapter_xl")
    full = T2IAdapter(in_channels=3, channels=[8, 16, 16], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter")
    light = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=2, downscale_factor=4, adapter_type="light_adapter")
    # For the two small UNets below (16x16 latents of 64x64 images): the XL kind unshuffling by 8
    # (features at 8x8, 8x8, 4x4, 4x4: the latent halved once and twice) and the plain kind by 4
    # (16x16, 8x8, 4x4).
    xl8 = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter_xl")
    full4 = T2IAdapter(in_channels=3, channels=[8, 16, 16], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter")
    for a in (adapter, grey, full, light, xl8, full4):
        a.eval()
    out = os.path.join(ROOT, "t2i_adapter")
    shutil.rmtree(out, ignore_errors=True)
    adapter.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in grey.state_dict().items()}, os.path.join(ROOT, "t2i_adapter_grey.safetensors"))
    extra = os.path.join(ROOT, "t2i")
    os.makedirs(extra, exist_ok=True)
    for name, a in (("full", full), ("light", light), ("xl8", xl8), ("full4", full4)):
        save_file({k: v.contiguous() for k, v in a.state_dict().items()}, os.path.join(extra, f"{name}.safetensors"))
        with open(os.path.join(extra, f"{name}.json"), "w") as f:
            json.dump({k: v for k, v in a.config.items() if not k.startswith("_")}, f, indent=1)

    g, js = {}, {"pipeline": {}}
    gen = torch.Generator().manual_seed(7)
    # tiny2's UNet (VAE factor 2): a 16x24 latent is a 32x48 image.
    image = torch.rand(1, 3, 32, 48, generator=gen)
    image_grey = torch.rand(1, 1, 32, 48, generator=gen)
    sample = torch.randn(2, 4, 16, 24, generator=gen)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]] * 2)}
    with torch.no_grad():
        feats = adapter(image)
        feats_grey = grey(image_grey)
        g.update({"module.image": image, "module.image_grey": image_grey, "module.sample": sample, "module.context": ctx,
                  "module.text_embeds": added["text_embeds"], "module.time_ids": added["time_ids"]})
        for i, f in enumerate(feats):
            g[f"module.feature{i}"] = f.contiguous()
        for i, f in enumerate(feats_grey):
            g[f"grey.feature{i}"] = f.contiguous()
        scaled = [(f * 0.7).repeat(2, 1, 1, 1) for f in feats]
        g["module.unet"] = unet(sample, 333.0, encoder_hidden_states=ctx, added_cond_kwargs=added,
                                down_intrablock_additional_residuals=[s.clone() for s in scaled]).sample.contiguous()
        js["module"] = {"t": 333.0, "scale": 0.7, "features": len(feats)}

        # The plain and the light adapter, features only.
        img_small = torch.rand(1, 3, 32, 32, generator=gen)
        g["small.image"] = img_small
        for name, a in (("full", full), ("light", light)):
            for i, f in enumerate(a(img_small)):
                g[f"{name}.feature{i}"] = f.contiguous()

        # Two small UNets: SDXL's layout with three levels (the fourth XL feature reaches the mid
        # block) and SD 1.5's under the plain adapter.
        s_sample = torch.randn(2, 4, 16, 16, generator=gen)
        s_ctx = torch.randn(2, 5, 16, generator=gen)
        g.update({"small.sample": s_sample, "small.context": s_ctx})
        xl_unet = small_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                             ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), os.path.join(extra, "unet_xl_layout"))
        sd_unet = small_unet(("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                             ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), os.path.join(extra, "unet_sd_layout"))
        img64 = torch.rand(1, 3, 64, 64, generator=gen)
        g["small.image64"] = img64
        xl_feats = [f.repeat(2, 1, 1, 1) * 0.9 for f in xl8(img64)]
        assert xl_feats[3].shape[-1] == 4
        g["small.xl_unet"] = xl_unet(s_sample, 500.0, encoder_hidden_states=s_ctx,
                                     down_intrablock_additional_residuals=[f.clone() for f in xl_feats]).sample.contiguous()
        g["small.xl_unet_plain"] = xl_unet(s_sample, 500.0, encoder_hidden_states=s_ctx).sample.contiguous()
        sd_feats = [f.repeat(2, 1, 1, 1) * 1.1 for f in full4(img64)]
        g["small.sd_unet"] = sd_unet(s_sample, 500.0, encoder_hidden_states=s_ctx,
                                     down_intrablock_additional_residuals=[f.clone() for f in sd_feats]).sample.contiguous()
        js["small"] = {"t": 500.0, "xl_scale": 0.9, "sd_scale": 1.1}

    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    heun = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    cases = [dict(prompt="a red house", negative="blurry", steps=5, cfg=5.0, seed=31, batch=1, size=[32, 32],
                  weight=0.8, end=1.0),
             dict(prompt="a cat on a mat", negative=None, steps=6, cfg=4.0, seed=32, batch=2, size=[32, 48],
                  weight=1.3, end=0.6),
             dict(prompt="grass", negative="", steps=4, cfg=1.0, seed=33, batch=1, size=[48, 32],
                  weight=0.9, end=1.0),
             dict(prompt="a red house", negative="blurry", steps=5, cfg=5.0, seed=34, batch=1, size=[32, 32],
                  weight=1.0, end=0.8, grey=True),
             # Heun: 7 schedule entries for 4 steps; the factor counts steps (i < int(4 * 0.5)).
             dict(prompt="a cat on a mat", negative="blurry", steps=4, cfg=5.0, seed=35, batch=1, size=[32, 32],
                  weight=1.2, end=0.5, sampler="heun")]
    for i, c in enumerate(cases):
        h, w = c["size"]
        rng = np.random.default_rng(200 + i)
        img = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        img = (img.astype(np.int32) + rng.integers(-20, 21, size=img.shape)).clip(0, 255).astype(np.uint8)
        name = f"t2i_run{i}.png"
        Image.fromarray(img).save(os.path.join(ROOT, name))
        c["image"] = name
        c.setdefault("sampler", "euler")
        pipe.scheduler = heun if c["sampler"] == "heun" else euler
        pil = Image.open(os.path.join(ROOT, name))
        if c.get("grey"):
            pil = pil.convert("L")
            pipe.adapter = grey
        else:
            pipe.adapter = adapter
        with torch.no_grad():
            lat = pipe(prompt=c["prompt"], negative_prompt=c["negative"], image=pil, num_inference_steps=c["steps"],
                       guidance_scale=c["cfg"], height=h, width=w, num_images_per_prompt=c["batch"],
                       adapter_conditioning_scale=c["weight"], adapter_conditioning_factor=c["end"], output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(ROOT, "t2i_adapter.safetensors"))
    with open(os.path.join(ROOT, "t2i_adapter.json"), "w") as f:
        json.dump(js, f, indent=1)
    print({k: tuple(v.shape) for k, v in g.items()})


if __name__ == "__main__":
    main()
