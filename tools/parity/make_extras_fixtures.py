"""Goldens for the Extras tab's upscale (A1111's scripts/postprocessing_upscale.py under
modules/postprocessing.py), re-implemented here line by line over Pillow 9.5.0, the version A1111
pins: `Upscaler.upscale` (modules/upscaler.py) with its "Lanczos" and "Nearest" upscalers,
"Scale by" with "Max side length" (`limit_size_by_one_dimention`), "Scale to" with and without
"Crop to fit", a second upscaler blended in with `Image.blend`, and the `postprocessing` infotext
(`infotext_utils.quote`). Inputs are taken as A1111 1.10's run_postprocessing takes them (`image
if image.mode in ("RGBA", "RGB") else image.convert("RGB")`): an RGBA picture keeps its alpha and
Pillow resizes it premultiplied, an LA one loses it. Also `Image.blend` alone at several alphas.

/tmp/pil95/bin/python tools/parity/make_extras_fixtures.py   (pip install pillow==9.5.0 numpy; writes tests/fixtures/extras/)
"""
import json
import os
import struct
import zlib

import numpy as np
import PIL
from PIL import Image

assert PIL.__version__ == "9.5.0", f"Pillow 9.5.0 is A1111's; this is {PIL.__version__}"
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "extras")
LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class Upscaler:
    """modules/upscaler.py's Upscaler.upscale with UpscalerLanczos / UpscalerNearest's do_upscale."""

    def __init__(self, name, resample):
        self.name, self.resample = name, resample

    def do_upscale(self, img):
        return img.resize((int(img.width * self.scale), int(img.height * self.scale)), resample=self.resample)

    def upscale(self, img, scale):
        self.scale = scale
        dest_w = int((img.width * scale) // 8 * 8)
        dest_h = int((img.height * scale) // 8 * 8)
        for i in range(3):
            if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = (img.width, img.height)
            img = self.do_upscale(img)
            if shape == (img.width, img.height):
                break
        if img.width != dest_w or img.height != dest_h:
            img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
        return img


UPSCALERS = {"Lanczos": Upscaler("Lanczos", LANCZOS), "Nearest": Upscaler("Nearest", NEAREST)}


def limit_size_by_one_dimention(w, h, limit):
    if h > w and h > limit:
        w = limit * w // h
        h = limit
    elif w > limit:
        h = limit * h // w
        w = limit
    return int(w), int(h)


def upscale(image, info, upscaler, upscale_mode, upscale_by, max_side_length, upscale_to_width, upscale_to_height, upscale_crop):
    if upscale_mode == 1:
        upscale_by = max(upscale_to_width / image.width, upscale_to_height / image.height)
        info["Postprocess upscale to"] = f"{upscale_to_width}x{upscale_to_height}"
    else:
        info["Postprocess upscale by"] = upscale_by
        if max_side_length != 0 and max(*image.size) * upscale_by > max_side_length:
            upscale_mode = 1
            upscale_crop = False
            upscale_to_width, upscale_to_height = limit_size_by_one_dimention(image.width * upscale_by, image.height * upscale_by, max_side_length)
            upscale_by = max(upscale_to_width / image.width, upscale_to_height / image.height)
            info["Max side length"] = max_side_length
    image = upscaler.upscale(image, upscale_by)
    if upscale_mode == 1 and upscale_crop:
        cropped = Image.new("RGB", (upscale_to_width, upscale_to_height))
        cropped.paste(image, box=(upscale_to_width // 2 - image.width // 2, upscale_to_height // 2 - image.height // 2))
        image = cropped
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def process(image, c):
    info = {}
    u1 = UPSCALERS[c["upscaler_1"]]
    args = (c["mode"], c["factor"], c["max_side_length"], c["width"], c["height"], c["crop"])
    out = upscale(image, info, u1, *args)
    info["Postprocess upscaler"] = u1.name
    if c["upscaler_2"] != "None" and c["visibility"] > 0:
        u2 = UPSCALERS[c["upscaler_2"]]
        second = upscale(image, info, u2, *args)
        if out.mode != second.mode:
            second = second.convert(out.mode)
        out = Image.blend(out, second, c["visibility"])
        info["Postprocess upscaler 2"] = u2.name
    return out, ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in info.items() if v is not None])


def picture(w, h, seed, alpha=False, grey=False):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x * 7 + y * 13) % 256)], -1).astype(np.int32)
    img = np.clip(img + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
    img[h // 3:h // 2, w // 4:w // 2] = [250, 20, 30]
    a = ((x * 255) // max(w - 1, 1)).astype(np.uint8)[..., None]
    a[:, : w // 5] = 0
    if grey:
        return Image.fromarray(np.concatenate([img[..., :1], a], -1), "LA")
    if alpha:
        return Image.fromarray(np.concatenate([img, a], -1), "RGBA")
    return Image.fromarray(img)


def png16(path, arr):
    """A 16-bit PNG (grey when `arr` is 2-D, RGB when 3-D), written here: Pillow cannot write
    16-bit RGB."""
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main():
    os.makedirs(OUT, exist_ok=True)
    inputs = {"a.png": picture(37, 23, 1), "b.png": picture(20, 31, 2), "c.png": picture(40, 28, 3, alpha=True), "d.png": picture(16, 13, 6, grey=True)}
    for n, im in inputs.items():
        im.save(os.path.join(OUT, n))
    # 16-bit PNGs as Pillow opens them: grey as mode "I" (made RGB by clipping at 255), RGB by
    # its high bytes.
    rng = np.random.default_rng(7)
    png16(os.path.join(OUT, "e.png"), rng.integers(0, 65536, (11, 14)).astype(np.uint16) // np.array([1, 300])[rng.integers(0, 2, (11, 14))].astype(np.uint16))
    png16(os.path.join(OUT, "f.png"), rng.integers(0, 65536, (9, 12, 3)).astype(np.uint16))
    # tRNS transparency: a palette with a table of alphas (A1111's `fix_png_transparency` makes
    # it RGBA), a palette with one transparent entry and an RGB picture with a transparent colour
    # (both made RGB, the transparency dropped).
    pal = picture(15, 12, 8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(os.path.join(OUT, "g.png"), transparency=bytes([0, 128, 255, 40] + [255] * 12))
    pal.save(os.path.join(OUT, "h.png"), transparency=3)
    picture(13, 10, 9).save(os.path.join(OUT, "i.png"), transparency=(0, 0, 0))
    for n in ("e.png", "f.png", "g.png", "h.png", "i.png"):
        inputs[n] = Image.open(os.path.join(OUT, n))
    base = dict(mode=0, factor=2.0, max_side_length=0, width=512, height=512, crop=True, upscaler_1="Lanczos", upscaler_2="None", visibility=0.0)
    settings = [
        dict(),
        dict(factor=2.5, upscaler_1="Nearest", upscaler_2="Lanczos", visibility=0.37),
        dict(mode=1, width=100, height=60),
        dict(mode=1, width=100, height=60, crop=False, upscaler_1="Nearest"),
        dict(factor=4.0, max_side_length=150, upscaler_2="Nearest", visibility=0.5),
        dict(mode=1, width=50, height=90, upscaler_2="Nearest", visibility=0.999),
        dict(factor=1.0),
        dict(factor=3.3, upscaler_1="Nearest", upscaler_2="Lanczos", visibility=0.25, max_side_length=100),
        dict(mode=1, width=33, height=17, upscaler_2="Lanczos", visibility=0.6),
    ]
    cases = []
    for name, im in inputs.items():
        if im.mode in ("RGB", "P") and isinstance(im.info.get("transparency"), bytes):
            im = im.convert("RGBA")  # images.fix_png_transparency
        rgb = im if im.mode in ("RGBA", "RGB") else im.convert("RGB")
        for k, s in enumerate(settings):
            c = dict(base, **s)
            out, text = process(rgb, c)
            # The pixels are the golden: a transparent colour Pillow carried over from the
            # input's `info` would be written as tRNS and read back as alpha.
            out.info.pop("transparency", None)
            fn = f"{os.path.splitext(name)[0]}_{k}.png"
            out.save(os.path.join(OUT, fn))
            cases.append(dict(input=name, output=fn, infotext=text, **c))
    blends = []
    x, y = picture(29, 17, 4), picture(29, 17, 5)
    x.save(os.path.join(OUT, "blend_x.png"))
    y.save(os.path.join(OUT, "blend_y.png"))
    for k, alpha in enumerate([0.1, 1 / 3, 0.5, 0.77, 0.999, 0.0, 1.0]):
        fn = f"blend_{k}.png"
        Image.blend(x, y, alpha).save(os.path.join(OUT, fn))
        blends.append(dict(alpha=alpha, output=fn))
    # A phone picture: 16x8, left half blue, tagged EXIF Orientation 6 (upright it is 8x16).
    rot = Image.new("RGB", (16, 8), (200, 30, 30))
    rot.paste((20, 20, 220), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(os.path.join(OUT, "rotated.jpg"), quality=95, exif=exif.tobytes())
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"cases": cases, "blends": blends}, f, indent=1)
    print("wrote", len(cases), "cases and", len(blends), "blends to", OUT)


if __name__ == "__main__":
    main()
