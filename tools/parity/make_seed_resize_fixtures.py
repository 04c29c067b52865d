"""Goldens for A1111's "Resize seed from width/height" (`seed_resize_from_w/h`;
`modules/rng.py` `ImageRNG.first`), re-implemented below from A1111's code with its "CPU" noise
source. The seed's noise is drawn at the size it was found at (latents of `from // 8`, here
`from // f` for a VAE factor f) from a fresh generator, moved toward the variation seed's noise
at that size, and pasted centred into the seed's own noise at the new size, which the image's
generator draws first (later draws continue from there). Wider or taller sources are cropped
around their centre; smaller ones keep the new noise around them. Python's floor division of a
negative offset is kept.

python tools/parity/make_seed_resize_fixtures.py   (writes tests/fixtures/rng/seed_resize.{json,safetensors})
"""
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "rng")


from make_variation_fixtures import slerp  # noqa: E402  (A1111's slerp, as the variation goldens use it)


def randn(seed, shape, generator=None):
    g = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g)


def first(shape, seeds, subseeds, strength, from_h, from_w, f):
    noise_shape = shape if from_h <= 0 or from_w <= 0 else (shape[0], from_h // f, from_w // f)
    xs, gens = [], []
    for i, seed in enumerate(seeds):
        generator = torch.Generator("cpu").manual_seed(seed)
        subnoise = None
        if strength != 0:
            subnoise = randn(subseeds[i], noise_shape)
        noise = randn(seed, noise_shape) if noise_shape != shape else randn(seed, shape, generator)
        if subnoise is not None:
            noise = slerp(strength, noise, subnoise)
        if noise_shape != shape:
            x = randn(seed, shape, generator)
            dx = (shape[2] - noise_shape[2]) // 2
            dy = (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx = 0 if dx < 0 else dx
            ty = 0 if dy < 0 else dy
            dx = max(-dx, 0)
            dy = max(-dy, 0)
            x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
            noise = x
        xs.append(noise)
        gens.append(generator)
    # What the images' generators draw next (the first ancestral noise), to check they continue.
    after = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return torch.stack(xs), after


CASES = [
    # name, seed, subseed, strength, batch, (c, h, w) latents, (from_w, from_h) pixels, f
    ("larger", 7, 0, 0.0, 1, (4, 8, 6), (80, 96), 8),
    ("smaller", 7, 0, 0.0, 1, (4, 12, 10), (48, 64), 8),
    ("mixed", 3, 0, 0.0, 1, (4, 9, 10), (104, 40), 8),
    ("odd", 11, 0, 0.0, 1, (4, 10, 10), (104, 88), 8),
    ("varied", 5, 21, 0.4, 2, (4, 8, 8), (48, 80), 8),
    ("factor4", 9, 0, 0.0, 1, (4, 8, 12), (36, 20), 4),
    ("same", 7, 0, 0.0, 1, (4, 8, 6), (48, 64), 8),
]

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    tensors, meta = {}, {}
    for name, seed, subseed, strength, batch, shape, (fw, fh), f in CASES:
        seeds = [seed + (k if strength == 0 else 0) for k in range(batch)]
        subseeds = [subseed + k for k in range(batch)]
        noise, after = first(shape, seeds, subseeds, strength, fh, fw, f)
        tensors[name] = noise.contiguous()
        tensors[name + ".after"] = after.contiguous()
        meta[name] = {"seed": seed, "subseed": subseed, "strength": strength, "shape": [batch, *shape], "from": [fw, fh], "factor": f}
    save_file(tensors, os.path.join(OUT, "seed_resize.safetensors"))
    with open(os.path.join(OUT, "seed_resize.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print({k: tuple(v.shape) for k, v in tensors.items()})
