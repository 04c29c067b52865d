"""Trains the miniworld evaluator: a small CNN with one head per attribute (subject identity,
style, object colour, object shape, background), on world renders degraded the way generated
images are (blur, noise, colour shifts). The Rust evaluator (src/eval/miniworld.rs) runs it.

python tools/miniworld/train_evaluator.py --out models/miniworld/evaluator [--steps 2500]

Writes model.safetensors, config.json (class names) and, for the Rust parity test, goldens of
logits on a few images under tests/fixtures/evaluator/.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

SUBJECTS = ["none"] + sorted(world.SUBJECTS)
STYLES = world.BASE_STYLES + world.LORA_STYLES
COLORS = list(world.COLORS)
SHAPES = list(world.SHAPES)
BACKGROUNDS = list(world.BACKGROUNDS)
HEADS = {"subject": SUBJECTS, "style": STYLES, "color": COLORS, "shape": SHAPES, "background": BACKGROUNDS}


class Evaluator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 128, 3, padding=1)
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = F.relu(self.conv4(x)).mean(dim=(2, 3))
        return {k: h(x) for k, h in self.heads.items()}


def parse(caption):
    """Labels from a caption; -100 (ignored) where the caption does not say."""
    words = caption.replace(",", "").split()
    lab = {k: -100 for k in HEADS}
    lab["background"] = BACKGROUNDS.index(words[words.index("background") - 1])
    lab["style"] = STYLES.index(words[words.index("style") - 1])
    if "emblem" in words:
        lab["subject"] = SUBJECTS.index(words[1])
    else:
        lab["subject"] = 0
        lab["color"] = COLORS.index(words[2])
        lab["shape"] = SHAPES.index(words[3])
    return lab


def degrade(x, rng):
    """Blur, noise, brightness/contrast shifts: generated images are never clean renders."""
    if rng.random() < 0.6:
        k = rng.choice([3, 5])
        x = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.1, 0.1)
    x = x + torch.randn_like(x) * rng.uniform(0.0, 0.12)
    return x.clamp(-1, 1)


def sample(seed, rng):
    r = rng.random()
    if r < 0.35:
        kind = "base"
    elif r < 0.55:
        kind = "style:" + rng.choice(world.LORA_STYLES)
    else:
        kind = f"mix:{rng.choice(list(world.SUBJECTS))}:{rng.choice(STYLES)}"
    return world.render(seed, kind)


def batch(step, n, rng):
    imgs, labs = [], []
    for i in range(n):
        im, cap = sample(700_000_000 + step * 131 + i, rng)
        imgs.append(im)
        labs.append(parse(cap))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = {k: torch.tensor([l[k] for l in labs]) for k in HEADS}
    return x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/miniworld/evaluator")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=a.steps)
    t0 = time.time()
    for step in range(a.steps):
        x, y = batch(step, 64, rng)
        x = degrade(x, rng)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], y[k], ignore_index=-100) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    # Held-out accuracy on clean and degraded renders.
    with torch.no_grad():
        x, y = batch(10_000_000, 512, np.random.default_rng(99))
        for name, xx in (("clean", x), ("degraded", degrade(x, np.random.default_rng(7)))):
            out = model(xx)
            acc = {k: float(((out[k].argmax(1) == y[k]) | (y[k] == -100)).float().mean()) for k in HEADS}
            print(name, json.dumps(acc), flush=True)
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, "model.safetensors"))
    # Keep the other sections (train_style_stats.py adds "style_statistics").
    cfg_path = os.path.join(a.out, "config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    cfg.update({"heads": HEADS, "input_size": 64})
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=1)
    # Parity goldens for the Rust runner.
    fx = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "evaluator")
    os.makedirs(fx, exist_ok=True)
    x, _ = batch(20_000_000, 4, np.random.default_rng(3))
    with torch.no_grad():
        out = model(x)
    g = {"images": ((x + 1) * 127.5).round()}
    g.update({f"logits.{k}": v for k, v in out.items()})
    save_file({k: v.contiguous().float() for k, v in g.items()}, os.path.join(fx, "golden.safetensors"))


if __name__ == "__main__":
    main()
