"""Mixing quality on miniworld: every strategy, both shipped LoRA shapes, all 16 subject x style
pairs, several seeds, with the solo LoRAs as ceilings in the same run. Made with the release
`loramix` binary exactly as a user runs it (`generate --lora PATH:WEIGHT:ROLE --mix X`, then
`loramix eval --json`).

python3 tools/miniworld/mix_quality.py [--bin target/release/loramix] [--seeds 2] [--seed-base 5000]
       [--shapes locon,attn] [--strategies merge,auto,...] [--grids docs] [--json results.json]
       [--model models/miniworld-attn16]

Prompts: "a <subject> emblem on a <background> background, <style> style", the background drawn
per pair and seed from all six of the world's backgrounds; seeds start at --seed-base (5000 by
default, away from the grids' and tests' seeds). Each generate call makes a batch of 2 images.

Prints a markdown table: per strategy and shape, subject and style fidelity (mean with a 95 %
bootstrap interval over images), the harmonic mean of the two means (with its interval), and the
ratios to the solo ceilings. Grids (rows: subjects, columns: styles, first image of the first
seed) go to --grids when Pillow is available.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

MODEL = "models/miniworld"
SHAPES = {"locon": "loras", "attn": "loras-attn"}  # LoRA folders inside the model folder
SHAPE_LABEL = {"locon": "all linear + conv (LoCon)", "attn": "attention only"}
# The world's vocabulary (tools/miniworld/world.py), written out so that this script needs only
# the standard library (world.py needs numpy).
SUBJECTS = ["krin", "mupa", "tebo", "vlox"]
STYLES = ["striped", "checkered", "dotted", "painted"]
BGS = ["cream", "gray", "navy", "olive", "pink", "teal"]
# name -> extra generate flags
STRATEGIES = {
    "merge": ["--mix", "merge"],
    "switch": ["--mix", "switch"],
    "composite": ["--mix", "composite"],
    "klora": ["--mix", "klora"],
    "klora-reference": ["--mix", "klora", "--klora-mode", "reference"],
    "np": ["--mix", "np"],
    "windows": ["--mix", "windows"],
    "windows+acfg": ["--mix", "windows", "--asymmetric-cfg"],
    "auto": ["--mix", "auto"],
}


def generate(binary, model, prompt, out_dir, seed, steps, loras, extra=()):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [binary, "generate", "--model", model, "--prompt", prompt, "--steps", str(steps), "--seed", str(seed),
           "--batch-size", "2", "--out", out_dir]
    for l in loras:
        cmd += ["--lora", l]
    cmd += list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr}")
    return r.stdout.split()


def evaluate(binary, paths):
    out = []
    for i in range(0, len(paths), 200):
        r = subprocess.run([binary, "eval", "--json"] + paths[i:i + 200], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        out += [json.loads(l) for l in r.stdout.splitlines()]
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def harmonic(a, b):
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def bootstrap(subj, style, n=2000, seed=0):
    """95 % intervals of the subject mean, the style mean and their harmonic mean, resampling
    images (subject and style of one image stay paired)."""
    rng = random.Random(seed)
    k = len(subj)
    ms, mt, mh = [], [], []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        a, b = mean([subj[i] for i in idx]), mean([style[i] for i in idx])
        ms.append(a)
        mt.append(b)
        mh.append(harmonic(a, b))
    ci = lambda v: (sorted(v)[int(0.025 * n)], sorted(v)[int(0.975 * n) - 1])
    return ci(ms), ci(mt), ci(mh)


def cases(seeds, seed_base):
    """(subject, style, seed, prompt) for every pair and seed."""
    out = []
    for i, s in enumerate(SUBJECTS):
        for j, st in enumerate(STYLES):
            for k in range(seeds):
                seed = seed_base + 100 * k + 10 * i + j
                bg = BGS[(3 * i + 5 * j + 7 * k) % len(BGS)]
                out.append((s, st, seed, f"a {s} emblem on a {bg} background, {st} style"))
    return out


def grid(rows, labels, cols, path, cell=64, pad=2):
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        print(f"(no Pillow: grid {path} skipped)", file=sys.stderr)
        return
    lw, th = 70, 14
    w = max(len(r) for r in rows)
    img = Image.new("RGB", (lw + w * (cell + pad), th + len(rows) * (cell + pad)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, c in enumerate(cols):
        d.text((lw + j * (cell + pad) + 2, 1), c, fill=(0, 0, 0))
    for i, (row, label) in enumerate(zip(rows, labels)):
        d.text((4, th + i * (cell + pad) + cell // 2 - 6), label, fill=(0, 0, 0))
        for j, p in enumerate(row):
            img.paste(Image.open(p).convert("RGB").resize((cell, cell)), (lw + j * (cell + pad), th + i * (cell + pad)))
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/loramix")
    ap.add_argument("--model", default=MODEL, help="the base model folder; its LoRAs are in loras/ and loras-attn/")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-base", type=int, default=5000)
    ap.add_argument("--shapes", default="locon,attn")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--grids", default=None, help="folder for grid PNGs (e.g. docs)")
    ap.add_argument("--json", default=None, help="write every image's scores here")
    ap.add_argument("--extra", default="", help="extra generate flags for every mixed run (space-separated)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="miniworld_mix_")
    all_rows, dump = [], []
    for shape in [s for s in a.shapes.split(",") if s]:
        d = os.path.join(a.model, SHAPES[shape])
        path = lambda name, role: f"{os.path.join(d, name + '.safetensors')}:1:{role}"
        cs = cases(a.seeds, a.seed_base)
        runs = {"subject LoRA alone": lambda s, st: ([path(s, "subject")], []),
                "style LoRA alone": lambda s, st: ([path(st, "style")], [])}
        for name in [x for x in a.strategies.split(",") if x]:
            flags = STRATEGIES.get(name)
            if flags is None:
                flags = ["--mix"] + name.split()
            runs[name] = (lambda f: lambda s, st: ([path(s, "subject"), path(st, "style")], f + a.extra.split()))(flags)
        scores = {}
        for name, mk in runs.items():
            paths, firsts = [], {}
            for (s, st, seed, prompt) in cs:
                loras, extra = mk(s, st)
                out = generate(a.bin, a.model, prompt, os.path.join(tmp, shape, name.replace(" ", "_"), f"{s}_{st}_{seed}"), seed, a.steps, loras, extra)
                firsts.setdefault((s, st), out[0])
                paths += out
            sc = evaluate(a.bin, paths)
            scores[name] = sc
            dump += [dict(x, shape=shape, run=name) for x in sc]
            if a.grids:
                os.makedirs(a.grids, exist_ok=True)
                grid([[firsts[(s, st)] for st in STYLES] for s in SUBJECTS], SUBJECTS, STYLES,
                     os.path.join(a.grids, f"{os.path.basename(os.path.normpath(a.model)).replace('-', '_')}_mix_{shape}_{name.replace(' ', '_').replace('+', '_')}.png"))
            print(f"{shape} {name}: subject {mean([x['subject'] for x in sc]):.3f} style {mean([x['style'] for x in sc]):.3f}", file=sys.stderr)
        ceil_s = mean([x["subject"] for x in scores["subject LoRA alone"]])
        ceil_t = mean([x["style"] for x in scores["style LoRA alone"]])
        for name, sc in scores.items():
            subj = [x["subject"] for x in sc]
            style = [x["style"] for x in sc]
            ms, mt = mean(subj), mean(style)
            (s0, s1), (t0, t1), (h0, h1) = bootstrap(subj, style)
            if name == "subject LoRA alone":
                all_rows.append(f"| {SHAPE_LABEL[shape]} | {name} | **{ms:.3f}** [{s0:.2f}, {s1:.2f}] | ({mt:.3f}) | | | |")
            elif name == "style LoRA alone":
                all_rows.append(f"| {SHAPE_LABEL[shape]} | {name} | ({ms:.3f}) | **{mt:.3f}** [{t0:.2f}, {t1:.2f}] | ({harmonic(ceil_s, ceil_t):.3f}) | | |")
            else:
                all_rows.append(f"| {SHAPE_LABEL[shape]} | {name} | {ms:.3f} [{s0:.2f}, {s1:.2f}] | {mt:.3f} [{t0:.2f}, {t1:.2f}] | "
                                f"{harmonic(ms, mt):.3f} [{h0:.2f}, {h1:.2f}] | {ms / ceil_s:.2f} | {mt / ceil_t:.2f} |")
    print(f"\n{len(SUBJECTS) * len(STYLES)} subject x style pairs x {a.seeds} seed(s) x 2 images, {a.steps} steps, seeds from {a.seed_base}\n")
    print("| LoRA shape | run | subject fidelity [95 % CI] | style fidelity [95 % CI] | harmonic mean [95 % CI] | subject / solo | style / solo |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(all_rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dump, f)


if __name__ == "__main__":
    main()
