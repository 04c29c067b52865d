"""Goldens for `src/resample.rs` (Pillow's `Image.resize`, every filter, with and without a
`box`) and for A1111's `images.resize_image` without an upscaler model (its three resize modes)
and its "Lanczos" and "Nearest" upscalers (`modules/upscaler.py`: `Upscaler.upscale`, then
`resize_image`'s final resize), written here from A1111's code so the test needs no A1111.

Pillow 9.5.0 is the version A1111 pins (`requirements_versions.txt`). Pillow 13 picks the order
of its two passes per size, so its outputs differ by a level in some pixels; ours is 9.5's
(horizontal pass first), which every Pillow before 13 shares.

pip install pillow==9.5.0 numpy safetensors
python tools/parity/make_resample_fixtures.py   (writes tests/fixtures/resample/)
"""
import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "resample")
assert Image.__version__ == "9.5.0", f"Pillow {Image.__version__}: the goldens are A1111's Pillow 9.5.0"
R = Image.Resampling
FILTERS = {"nearest": R.NEAREST, "box": R.BOX, "bilinear": R.BILINEAR, "hamming": R.HAMMING,
           "bicubic": R.BICUBIC, "lanczos": R.LANCZOS}


def source(rng, h, w, channels):
    # A smooth gradient with noise and one hard edge: overshoot and clipping both happen.
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255.0 / max(w - 1, 1) * 0.6 + yy * 255.0 / max(h - 1, 1) * 0.4)
    img = base[..., None] + rng.normal(0, 30, size=(h, w, channels))
    img[:, w // 2:w // 2 + 2] = 255
    img[h // 3, :] = 0
    img = img.clip(0, 255).astype(np.uint8)
    return Image.fromarray(img[..., 0] if channels == 1 else img, "L" if channels == 1 else "RGB")


def a1111_resize_image(mode, im, width, height, upscale=None):
    """A1111's `images.resize_image(mode, im, width, height, upscaler_name)`; `upscale` is the
    upscaler's `do_upscale(img, scale)` or None for plain Lanczos."""
    def resize(im, w, h):
        if upscale is None or im.mode == "L":
            return im.resize((w, h), resample=R.LANCZOS)
        scale = max(w / im.width, h / im.height)
        if scale > 1.0:
            # Upscaler.upscale
            dest_w = int((im.width * scale) // 8 * 8)
            dest_h = int((im.height * scale) // 8 * 8)
            for i in range(3):
                if im.width >= dest_w and im.height >= dest_h and (i > 0 or scale != 1):
                    break
                shape = (im.width, im.height)
                im = upscale(im, scale)
                if shape == (im.width, im.height):
                    break
            if im.width != dest_w or im.height != dest_h:
                im = im.resize((int(dest_w), int(dest_h)), resample=R.LANCZOS)
        if im.width != w or im.height != h:
            im = im.resize((w, h), resample=R.LANCZOS)
        return im

    if mode == 0:
        return resize(im, width, height)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, src_w, src_h)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    # A mask (mode L) is pasted onto RGB by A1111; our masks stay grey, which is the same values.
    return res.convert(im.mode) if im.mode == "L" else res


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(11)
    sources = {"rgb": source(rng, 13, 19, 3), "gray": source(rng, 17, 13, 1), "thin": source(rng, 2, 9, 3)}
    tensors, cases = {}, []
    for name, im in sources.items():
        tensors[f"source.{name}"] = np.array(im).reshape(im.height, im.width, -1)
        w, h = im.size
        plans = [((31, 22), None), ((7, 5), None), ((w, 6), None), ((40, h), None), ((5, 30), None), ((1, 1), None),
                 ((11, 9), (w * 0.2, h * 0.125, w - 0.75, h - 0.5)), ((w, h), (1, 1, w - 1, h - 1)),
                 ((w, 4), (0, 0, w, 0)), ((w, 3), (0, h, w, h)), ((5, h), (0, 0, 0, h)), ((6, h), (w, 0, w, h)),
                 ((8, 8), (0.5, 0.25, w, h)), ((w - 2, h - 1), (1, 1, w - 1, h))]
        for fname, f in FILTERS.items():
            for i, (size, box) in enumerate(plans):
                out = im.resize(size, resample=f, box=box)
                key = f"resize.{name}.{fname}.{i}"
                tensors[key] = np.array(out).reshape(out.height, out.width, -1)
                cases.append({"kind": "resize", "key": key, "source": name, "filter": fname,
                              "size": list(size), "box": list(box) if box else None})
        for mode in (0, 1, 2):
            for size in [(16, 16), (24, 12), (12, 24), (40, 13), (9, 30), (25, 17), (19, 13), (31, 19)]:
                out = a1111_resize_image(mode, im, *size)
                key = f"a1111.{name}.{mode}.{size[0]}x{size[1]}"
                tensors[key] = np.array(out).reshape(out.height, out.width, -1)
                cases.append({"kind": "resize_image", "key": key, "source": name, "mode": mode, "size": list(size)})
        if im.mode == "RGB":
            upscalers = {
                "Lanczos": lambda img, s: img.resize((int(img.width * s), int(img.height * s)), resample=R.LANCZOS),
                "Nearest": lambda img, s: img.resize((int(img.width * s), int(img.height * s)), resample=R.NEAREST),
            }
            for uname, up in upscalers.items():
                for size in [(40, 24), (57, 39), (64, 20), (23, 16)]:
                    out = a1111_resize_image(0, im, *size, upscale=up)
                    key = f"upscaler.{name}.{uname}.{size[0]}x{size[1]}"
                    tensors[key] = np.array(out).reshape(out.height, out.width, -1)
                    cases.append({"kind": "upscaler", "key": key, "source": name, "upscaler": uname, "size": list(size)})
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as fh:
        json.dump({"pillow": Image.__version__, "cases": cases}, fh, indent=0)
    print(len(cases), "cases")


if __name__ == "__main__":
    main()
