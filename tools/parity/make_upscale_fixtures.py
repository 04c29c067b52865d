"""Goldens for the hires-fix latent upscalers (issue 17): A1111 calls
torch.nn.functional.interpolate(samples, size=(h // 8, w // 8), mode=..., antialias=...) with
align_corners=False; this records its output for each mode on random latents at several scales.

python tools/parity/make_upscale_fixtures.py   (writes tests/fixtures/sdxl/upscale/latent.safetensors)
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "upscale")
MODES = {"bilinear": ("bilinear", False), "bilinear_aa": ("bilinear", True), "bicubic": ("bicubic", False),
         "bicubic_aa": ("bicubic", True), "nearest": ("nearest", False), "nearest_exact": ("nearest-exact", False)}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5)
    g = {"input": x}
    for h, w in ((12, 10), (9, 7), (15, 11), (6, 5)):
        for name, (mode, aa) in MODES.items():
            kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            g[f"{name}.{h}x{w}"] = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=aa, **kw).contiguous()
    # Shrinking, as img2img's resize mode 3 does (plain bilinear there); antialiased bilinear,
    # which only hires fix names and which only enlarges, is left out.
    for h, w in ((4, 3), (5, 2), (3, 5)):
        for name, (mode, aa) in MODES.items():
            if name == "bilinear_aa":
                continue
            kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            g[f"{name}.{h}x{w}"] = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=aa, **kw).contiguous()
    save_file(g, os.path.join(OUT, "latent.safetensors"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
