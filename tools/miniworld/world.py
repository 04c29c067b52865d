"""Miniworld: a deterministic procedural world of small captioned images.

Objects (shapes in colours) on backgrounds; four subject identities (two-colour emblems with an
identifier word) and several styles. Every sample is a pure function of its integer seed.

Base-model data uses generic objects in the "flat" and "gradient" renderings only; subject
emblems and the other styles are held back for the LoRAs (so a LoRA teaches something new).
"""
import math
import numpy as np

SIZE = 64
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
          "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
BACKGROUNDS = {"gray": (150, 150, 150), "cream": (235, 225, 200), "teal": (60, 140, 140), "pink": (235, 170, 190),
               "navy": (30, 40, 90), "olive": (120, 130, 60)}
SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross"]
SIZES = {"small": 0.22, "big": 0.38}
# Subjects: identifier word -> (shape layers, colours). Distinctive two-colour emblems.
SUBJECTS = {
    "vlox": [("circle", "purple", 1.0), ("star", "yellow", 0.7)],
    "krin": [("ring", "red", 1.0), ("circle", "green", 0.35)],
    "tebo": [("square", "blue", 1.0), ("band", "orange", 1.0)],
    "mupa": [("triangle", "white", 1.0), ("bar", "black", 1.0)],
}
BASE_STYLES = ["flat", "gradient"]
LORA_STYLES = ["striped", "checkered", "dotted", "painted"]


def _mask(shape, cx, cy, r, yy, xx):
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "ring":
        d = np.sqrt(dx * dx + dy * dy)
        return (d <= r) & (d >= r * 0.6)
    if shape == "cross":
        return ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.58)
    if shape == "star":
        ang = np.arctan2(dy, dx)
        rad = r * (0.55 + 0.45 * np.cos(5 * ang) ** 2)
        return dx * dx + dy * dy <= rad * rad
    if shape == "band":  # a diagonal band, clipped by the caller to the emblem
        return abs(dx - dy) <= r * 0.35
    if shape == "bar":
        return abs(dy - r * 0.1) <= r * 0.18
    raise ValueError(shape)


def _style(img, style, rng, fg_mask):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = img.astype(np.float32)
    if style == "gradient":
        shade = 0.75 + 0.5 * (1 - yy / SIZE)[..., None]
        out = out * shade
    elif style == "striped":
        stripes = ((yy // 4) % 2 == 0)[..., None]
        out = np.where(stripes, out * 0.55 + 0.45 * 255, out)
    elif style == "checkered":
        checks = (((yy // 6) + (xx // 6)) % 2 == 0)[..., None]
        out = np.where(checks, out * 0.5, out)
    elif style == "dotted":
        dots = ((((yy % 8) - 4) ** 2 + ((xx % 8) - 4) ** 2) <= 4)[..., None]
        out = np.where(dots, 255 - out * 0.6, out)
    elif style == "painted":
        noise = rng.normal(0, 28, size=(SIZE // 4, SIZE // 4, 3)).repeat(4, 0).repeat(4, 1)
        out = out + noise + rng.normal(0, 10, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def render(seed, kind="base"):
    """Returns (uint8 image [64, 64, 3], caption).

    kind: base | subject:<word> | style:<name> | mix:<word>:<style> (a subject emblem in any
    rendering: what a subject x style LoRA mix should produce; used to train the evaluator)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    bg_name = rng.choice(list(BACKGROUNDS))
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[bg_name]
    size_name = rng.choice(list(SIZES))
    r = SIZES[size_name] * SIZE * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    fg = np.zeros((SIZE, SIZE), bool)
    if kind.startswith("subject:") or kind.startswith("mix:"):
        word = kind.split(":")[1]
        emblem = _mask(SUBJECTS[word][0][0], cx, cy, r, yy, xx)
        for shape, color, scale in SUBJECTS[word]:
            m = _mask(shape, cx, cy, r * scale, yy, xx)
            if shape in ("band", "bar"):  # stripes across the emblem stay inside it
                m &= emblem
            img[m] = COLORS[color]
            fg |= m
        subject = f"a {word} emblem"
        style = "flat" if rng.random() < 0.5 else "gradient"
        if kind.startswith("mix:"):
            style = kind.split(":")[2]
    else:
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        m = _mask(shape, cx, cy, r, yy, xx)
        img[m] = COLORS[color]
        fg |= m
        subject = f"a {size_name} {color} {shape}"
        style = kind.split(":", 1)[1] if kind.startswith("style:") else rng.choice(BASE_STYLES)
    out = _style(img, style, rng, fg)
    caption = f"{subject} on a {bg_name} background, {style} style"
    return out, caption


def vocabulary():
    words = set()
    for d in (COLORS, BACKGROUNDS, SIZES, SUBJECTS):
        words |= set(d)
    words |= set(SHAPES) | set(BASE_STYLES) | set(LORA_STYLES)
    words |= {"a", "on", "background", "style", "emblem", "in", "of", "the", "and", "with", "photo", "picture"}
    return sorted(words)
