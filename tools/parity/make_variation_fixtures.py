"""Goldens for A1111's variation seeds (`modules/rng.py`: `ImageRNG.first`, `randn`, `slerp`),
re-implemented below from A1111's code with its "CPU" noise source: each image's noise is
`torch.randn([4, h, w])` from its own seeded CPU generator, the variation noise the same from
`subseed + k`, and the two are interpolated by A1111's `slerp` (norms along dim 1, and its
fallback for nearly parallel noises).

python tools/parity/make_variation_fixtures.py   (writes tests/fixtures/rng/variation.{json,safetensors})
"""
import json
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "rng")


def randn(seed, shape):
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g)


def slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def first(seeds, subseeds, strength, shape):
    xs = []
    for seed, subseed in zip(seeds, subseeds):
        noise = randn(seed, shape)
        if strength != 0:
            noise = slerp(strength, noise, randn(subseed, shape))
        xs.append(noise)
    return torch.stack(xs)


CASES = [
    # name, seed, subseed, strength, batch, (c, h, w)
    ("s03", 7, 12345, 0.3, 1, (4, 8, 6)),
    ("s1", 7, 99, 1.0, 1, (4, 8, 6)),
    ("batch", 100, 5, 0.55, 3, (4, 6, 10)),
    ("same", 42, 42, 0.25, 1, (4, 8, 8)),
]

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    tensors, meta = {}, {}
    for name, seed, subseed, strength, batch, shape in CASES:
        # processing.py: all_seeds = [seed + (x if subseed_strength == 0 else 0) ...]
        seeds = [seed + (k if strength == 0 else 0) for k in range(batch)]
        subseeds = [subseed + k for k in range(batch)]
        tensors[name] = first(seeds, subseeds, strength, shape).contiguous()
        meta[name] = {"seed": seed, "subseed": subseed, "strength": strength, "shape": [batch, *shape]}
    save_file(tensors, os.path.join(OUT, "variation.safetensors"))
    with open(os.path.join(OUT, "variation.json"), "w") as f:
        json.dump(meta, f, indent=1)
