"""Goldens for the tiled VAE (issues 17 and 19): diffusers' AutoencoderKL with enable_tiling(),
on tests/fixtures/sdxl/tiny3's VAE, with tiles small enough that the images span several rows and
columns of them, including partial tiles at the right and bottom edges.

python tools/parity/make_vae_tiling_fixtures.py   (writes tests/fixtures/sdxl/tiny3/vae_tiling.safetensors)
"""
import json
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny3")


def main():
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "pipeline", "vae"), torch_dtype=torch.float32)
    vae.enable_tiling()
    # tiny3 downsamples by 4: tiles of 32 pixels are 8 latents; blends of 8 pixels / 2 latents.
    vae.tile_sample_min_size = 32
    vae.tile_latent_min_size = 8
    g = torch.Generator().manual_seed(7)
    out = {}
    with torch.no_grad():
        z = torch.randn(2, 4, 19, 26, generator=g)
        out["decode.z"] = z
        out["decode.pixels"] = vae.decode(z).sample
        x = torch.rand(1, 3, 76, 108, generator=g) * 2 - 1
        out["encode.x"] = x
        dist = vae.encode(x).latent_dist
        out["encode.mean"] = dist.mean
        out["encode.logvar"] = dist.logvar
        # diffusers' own default tiles (the config's sample_size, 48 pixels / 12 latents).
        vae.tile_sample_min_size = vae.config.sample_size
        vae.tile_latent_min_size = vae.config.sample_size // 4
        out["default.pixels"] = vae.decode(z).sample
    meta = {"sample_tile": 32, "latent_tile": 8, "overlap": 0.25}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "vae_tiling.safetensors"), metadata={"tiling": json.dumps(meta)})
    print({k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
