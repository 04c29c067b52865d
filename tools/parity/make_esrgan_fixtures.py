"""Goldens for ESRGAN-family upscalers (issue 17): tiny random RRDBNets in the two key layouts
(Real-ESRGAN / basicsr names, and the original ESRGAN `model.N` names; growth channels 32, which
spandrel assumes), 4x and a 2x with
pixel-unshuffle (Real-ESRGAN x2plus), run by spandrel (what A1111 and ComfyUI load these with);
and A1111's tiled upscale (modules/upscaler_utils.py `upscale_with_model`, modules/images.py
`split_grid` / `combine_grid`, re-implemented here line by line over PIL) on a small image.

python tools/parity/make_esrgan_fixtures.py   (needs `pip install spandrel`; writes tests/fixtures/sdxl/upscale/esrgan/)
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel import ModelLoader

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "upscale", "esrgan")


def rrdb_state(in_nc, out_nc, nf, nb, gc, n_up, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cin, cout):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (0.6 / math.sqrt(cin * 9))
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.02

    conv("conv_first", in_nc, nf)
    for b in range(nb):
        for r in (1, 2, 3):
            for k in range(5):
                conv(f"body.{b}.rdb{r}.conv{k + 1}", nf + k * gc, gc if k < 4 else nf)
    conv("conv_body", nf, nf)
    for u in range(n_up):
        conv(f"conv_up{u + 1}", nf, nf)
    conv("conv_hr", nf, nf)
    conv("conv_last", nf, out_nc)
    # Outputs spread over [0, 1] (around 0.5), so the clamp, the u8 rounding and the tile
    # blends all see real values.
    sd["conv_last.weight"] *= 18.0
    sd["conv_last.bias"] += 0.5
    # Stored in f16, as most published upscaler safetensors are; both sides compute in f32.
    return {k: v.half().float().contiguous() for k, v in sd.items()}


def to_old(sd, nb, n_up):
    """The original ESRGAN layout (xinntao/ESRGAN RRDB_ESRGAN_x4.pth names)."""
    out = {}
    for k, v in sd.items():
        name, p = k.rsplit(".", 1)
        if name == "conv_first":
            nk = f"model.0.{p}"
        elif name.startswith("body."):
            _, b, rdb, c = name.split(".")
            nk = f"model.1.sub.{b}.RDB{rdb[3]}.conv{c[4]}.0.{p}"
        elif name == "conv_body":
            nk = f"model.1.sub.{nb}.{p}"
        elif name.startswith("conv_up"):
            nk = f"model.{3 * int(name[7:])}.{p}"
        elif name == "conv_hr":
            nk = f"model.{3 * n_up + 2}.{p}"
        else:
            nk = f"model.{3 * n_up + 4}.{p}"
        out[nk] = v
    return out


def run(model, img):
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return model(x)


def a1111_patch(model, tile):
    """upscale_pil_patch: RGB in [0, 1], model, clamp, ToPILImage (x255, truncated to u8)."""
    y = run(model, tile).squeeze(0).clamp(0.0, 1.0)
    arr = (y * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def split_grid(image, tile_w, tile_h, overlap):
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    tiles = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_images = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        tiles.append([y, tile_h, row_images])
    return tiles


def combine_grid(tiles, tile_h, image_w, image_h, overlap):
    def mask(r):
        return Image.fromarray((r * 255 / overlap).astype(np.uint8), "L")
    mask_w = mask(np.arange(overlap, dtype=np.float32).reshape((1, overlap)).repeat(tile_h, axis=0))
    mask_h = mask(np.arange(overlap, dtype=np.float32).reshape((overlap, 1)).repeat(image_w, axis=1))
    combined = Image.new("RGB", (image_w, image_h))
    for y, h, row in tiles:
        crow = Image.new("RGB", (image_w, h))
        for x, w, tile in row:
            if x == 0:
                crow.paste(tile, (0, 0))
                continue
            crow.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            crow.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(crow, (0, 0))
            continue
        combined.paste(crow.crop((0, 0, crow.width, overlap)), (0, y), mask=mask_h)
        combined.paste(crow.crop((0, overlap, crow.width, h)), (0, y + overlap))
    return combined


def upscale_with_model(model, img, tile, overlap):
    tiles = split_grid(img, tile, tile, overlap)
    new, s = [], 1
    for y, h, row in tiles:
        nrow = []
        for x, w, t in row:
            o = a1111_patch(model, t)
            s = o.width // t.width
            nrow.append([x * s, w * s, o])
        new.append([y * s, h * s, nrow])
    return combine_grid(new, tile * s, img.width * s, img.height * s, overlap * s)


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:22, 0:30]
    img = np.stack([xx * 8, yy * 11, (xx + yy) * 5], -1) % 256
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(os.path.join(OUT, "input.png"))
    pil = Image.open(os.path.join(OUT, "input.png")).convert("RGB")
    models = {
        "tiny_x4": (rrdb_state(3, 3, 8, 1, 32, 2, 1), False),
        "tiny_x4_esrgan_old": (None, True),
        "tiny_x2": (rrdb_state(12, 3, 8, 1, 32, 2, 2), False),
    }
    models["tiny_x4_esrgan_old"] = (to_old(models["tiny_x4"][0], 1, 2), True)
    g, js = {}, {"models": {}, "tiled": {}}
    for name, (sd, _) in models.items():
        save_file({k: v.half() for k, v in sd.items()}, os.path.join(OUT, f"{name}.safetensors"))
        desc = ModelLoader().load_from_state_dict(sd).eval()
        js["models"][name] = {"architecture": desc.architecture.name, "scale": desc.scale}
        g[f"{name}.output"] = run(desc.model, pil).contiguous()
    # A1111's tiled upscale with small tiles, so edges, partial steps and both blends happen.
    desc = ModelLoader().load_from_state_dict(models["tiny_x4"][0]).eval()
    for tile, overlap in ((12, 4), (16, 2), (0, 0)):
        out = upscale_with_model(desc.model, pil, tile, overlap) if tile > 0 else a1111_patch(desc.model, pil)
        key = f"tiled_{tile}_{overlap}"
        g[key] = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())
        js["tiled"][key] = {"tile": tile, "overlap": overlap}
    save_file(g, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(js, f, indent=1)
    print(json.dumps(js))


if __name__ == "__main__":
    main()
