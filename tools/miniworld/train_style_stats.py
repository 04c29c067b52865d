"""Fits the evaluator's style-fidelity score: texture and palette statistics of world renders in
each style (the style's references), and a multinomial logistic regression over them.

python tools/miniworld/train_style_stats.py [--evaluator models/miniworld/evaluator] [--model models/miniworld]

Why statistics and not the CNN's style head: the CNN, trained on clean renders, does not carry
over to generated textures (it scored style-LoRA outputs near 0). Texture statistics are
translation invariant and dominated by area, not by the object's outline:

- texture: for a set of pixel offsets (dy, dx), the 50% and 90% quantiles of |Y(p) - Y(p + d)|
  over the image (Y = luminance after a small Gaussian blur; both diagonal signs of d), in log.
  A period-p pattern is near 0 at multiples of p and large at half periods; a flat area is 0
  everywhere; block noise is large at every offset.
  The same, less each quantile's mean over offsets (the structure function's shape alone).
- palette: the 5/50/95% quantiles of luminance and the 50/95% quantiles of saturation.

The references are renders of every style (generic objects and subject emblems) and the same
renders passed through the model's own VAE (encode, decode), which is what a generated image
looks like at the pixel level. The features are defined once, by the parameters in
config.json's "style_statistics" section; the Rust evaluator (src/eval/texture.rs) computes
them from those parameters and a golden fixture checks that the two agree.

Writes <evaluator>/style.safetensors, updates <evaluator>/config.json and writes
tests/fixtures/evaluator/style_golden.safetensors.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

CLASSES = world.BASE_STYLES + world.LORA_STYLES
PARAMS = {
    "file": "style.safetensors",
    "classes": CLASSES,
    "size": world.SIZE,
    "blur_sigma": 0.7,
    "offsets": [[dy, dx] for dy in (0, 1, 2, 3, 4, 6, 8, 12) for dx in (0, 1, 2, 3, 4, 6, 8, 12) if (dy, dx) != (0, 0)],
    "difference_quantiles": [0.5, 0.9],
    "log_eps": 0.01,
    # Also each offset's log quantile minus its mean over all offsets: the shape of the structure
    # function whatever the texture's contrast (generated textures are fainter than renders).
    "shape": True,
    "luminance_quantiles": [0.05, 0.5, 0.95],
    "saturation_quantiles": [0.5, 0.95],
}


def blur(y, sigma):
    """Separable Gaussian, radius round(3 sigma), mirrored edges (numpy's "reflect")."""
    r = int(3 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    w = np.exp(-t * t / (2 * sigma * sigma))
    w /= w.sum()
    h, wd = y.shape
    p = np.pad(y, ((r, r), (0, 0)), mode="reflect")
    a = sum(w[i] * p[i:i + h, :] for i in range(2 * r + 1))
    p = np.pad(a, ((0, 0), (r, r)), mode="reflect")
    return sum(w[i] * p[:, i:i + wd] for i in range(2 * r + 1))


def features(img, prm=PARAMS):
    """img: uint8 [S, S, 3] -> float64 feature vector (the order the Rust side follows)."""
    x = img.astype(np.float64) / 255.0
    lum = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    y = blur(lum, prm["blur_sigma"])
    n, m = y.shape
    out = []
    for dy, dx in prm["offsets"]:
        d = np.concatenate([np.abs(y[dy:, dx:] - y[:n - dy, :m - dx]).ravel(),
                            np.abs(y[dy:, :m - dx] - y[:n - dy, dx:]).ravel()])
        for q in prm["difference_quantiles"]:
            out.append(np.log(np.quantile(d, q) + prm["log_eps"]))
    if prm["shape"]:
        nq = len(prm["difference_quantiles"])
        d = np.array(out).reshape(len(prm["offsets"]), nq)
        out += list((d - d.mean(0, keepdims=True)).ravel())
    for q in prm["luminance_quantiles"]:
        out.append(np.quantile(lum, q))
    mx, mn = x.max(-1), x.min(-1)
    sat = (mx - mn) / (mx + 1e-3)
    for q in prm["saturation_quantiles"]:
        out.append(np.quantile(sat, q))
    return np.array(out)


def references(style_index, style, count, vae):
    """`count` renders of `style` (alternating generic objects and subject emblems), raw and
    through the VAE."""
    subjects = sorted(world.SUBJECTS)
    raw = []
    for i in range(count):
        kind = f"style:{style}" if i % 2 == 0 else f"mix:{subjects[(i // 2) % len(subjects)]}:{style}"
        raw.append(world.render(700_000 + style_index * 1000 + i, kind)[0])
    raw = np.stack(raw)
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    through = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return raw, through


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--evaluator", default="models/miniworld/evaluator")
    ap.add_argument("--model", default="models/miniworld")
    ap.add_argument("--per-style", type=int, default=160, help="renders per style; the last quarter is held out")
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    a = ap.parse_args()
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=torch.float32).eval()
    train_n = a.per_style * 3 // 4
    xs, ys, xh, yh = [], [], [], []
    for si, style in enumerate(CLASSES):
        raw, through = references(si, style, a.per_style, vae)
        for i in range(a.per_style):
            if i < train_n:
                xs += [features(raw[i]), features(through[i])]
                ys += [si, si]
            else:
                xh.append(features(through[i]))
                yh.append(si)
    x, xh = np.array(xs), np.array(xh)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xn = torch.tensor((x - mean) / std, dtype=torch.float64)
    xhn = torch.tensor((xh - mean) / std, dtype=torch.float64)
    y, yh = torch.tensor(ys), torch.tensor(yh)
    lin = torch.nn.Linear(x.shape[1], len(CLASSES)).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xn), y) + a.weight_decay * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = (lin(xn).argmax(1) == y).double().mean().item()
        hacc = (lin(xhn).argmax(1) == yh).double().mean().item()
    print(f"{x.shape[1]} features; train accuracy {acc:.3f}; held-out (through the VAE) {hacc:.3f}")

    tensors = {"mean": torch.tensor(mean), "std": torch.tensor(std), "weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(a.evaluator, PARAMS["file"]))
    cfg_path = os.path.join(a.evaluator, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["style_statistics"] = PARAMS
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=1)

    # Golden for the Rust side: features and probabilities of a few raw and VAE-passed renders.
    fx = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "evaluator")
    os.makedirs(fx, exist_ok=True)
    imgs = []
    for si, style in enumerate(CLASSES):
        raw, through = references(si + 50, style, 2, vae)
        imgs += [raw[0], through[1]]
    imgs = np.stack(imgs)
    f = np.stack([features(i) for i in imgs])
    with torch.no_grad():
        p = torch.softmax(lin(torch.tensor((f - mean) / std)), dim=1)
    save_file({"images": torch.from_numpy(imgs).contiguous(), "features": torch.tensor(f), "probs": p.contiguous()},
              os.path.join(fx, "style_golden.safetensors"))


if __name__ == "__main__":
    main()
