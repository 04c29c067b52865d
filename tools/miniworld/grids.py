"""Miniworld proof: image grids in docs/ and the mixing-strategy quality table, made with the
release `loramix` binary (generate + eval) on the shipped base model and LoRAs.

python tools/miniworld/grids.py [--bin target/release/loramix] [--steps 25]

Writes docs/miniworld_base_grid.png, docs/miniworld_subjects.png, docs/miniworld_styles.png,
docs/miniworld_mix_<strategy>.png and prints the quality table (markdown) that goes into
BENCHMARKS.md. Every image is seeded; rerunning gives the same files.
"""
import argparse
import os
import sys
import tempfile

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mix_quality  # noqa: E402
import world  # noqa: E402

MODEL = "models/miniworld"
LORAS = os.path.join(MODEL, "loras")
SUBJECTS = sorted(world.SUBJECTS)
STYLES = world.LORA_STYLES
BGS = ["teal", "cream", "navy", "pink"]


def generate(binary, prompt, out_dir, seed, steps, loras=(), mix=None, extra=()):
    return mix_quality.generate(binary, prompt, out_dir, seed, steps, loras, (["--mix", mix] if mix else []) + list(extra))


evaluate = mix_quality.evaluate


def grid(rows, labels, path, cell=64, pad=2):
    """rows: list of lists of image paths; labels: row labels."""
    w = max(len(r) for r in rows)
    lw = 150
    img = Image.new("RGB", (lw + w * (cell + pad), len(rows) * (cell + pad)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for i, (row, label) in enumerate(zip(rows, labels)):
        d.text((4, i * (cell + pad) + cell // 2 - 6), label, fill=(0, 0, 0))
        for j, p in enumerate(row):
            img.paste(Image.open(p).convert("RGB").resize((cell, cell)), (lw + j * (cell + pad), i * (cell + pad)))
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/loramix")
    ap.add_argument("--steps", type=int, default=25)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="miniworld_grids_")
    lora = lambda name, w=1.0, role="": f"{os.path.join(LORAS, name + '.safetensors')}:{w}" + (f":{role}" if role else "")

    # Base model, several prompts.
    prompts = ["a big red circle on a cream background, flat style", "a small blue square on a teal background, flat style",
               "a big yellow triangle on a navy background, gradient style", "a big green ring on a pink background, flat style",
               "a small purple diamond on a gray background, gradient style", "a big orange cross on a olive background, flat style"]
    rows = [generate(a.bin, p, os.path.join(tmp, f"base{i}"), 7, a.steps) for i, p in enumerate(prompts)]
    grid(rows, [p.split(" on ")[0][2:] for p in prompts], "docs/miniworld_base_grid.png")

    # Each subject LoRA and the base model on the same prompts.
    rows, labels, base_rows = [], [], []
    for s in SUBJECTS:
        row = []
        for k, bg in enumerate(BGS[:2]):
            p = f"a {s} emblem on a {bg} background, flat style"
            row += generate(a.bin, p, os.path.join(tmp, f"subj_{s}_{k}"), 11 + k, a.steps, [lora(s)])
            base_rows += generate(a.bin, p, os.path.join(tmp, f"subjbase_{s}_{k}"), 11 + k, a.steps)
        rows.append(row)
        labels.append(f"{s} LoRA")
    grid(rows, labels, "docs/miniworld_subjects.png")
    subj_scores = evaluate(a.bin, [p for r in rows for p in r])
    base_subj_scores = evaluate(a.bin, base_rows)

    # Each style LoRA and the base model.
    rows, labels, base_rows = [], [], []
    for st in STYLES:
        row = []
        for k, (obj, bg) in enumerate([("big red circle", "cream"), ("small blue square", "teal")]):
            p = f"a {obj} on a {bg} background, {st} style"
            row += generate(a.bin, p, os.path.join(tmp, f"style_{st}_{k}"), 21 + k, a.steps, [lora(st)])
            base_rows += generate(a.bin, p, os.path.join(tmp, f"stylebase_{st}_{k}"), 21 + k, a.steps)
        rows.append(row)
        labels.append(f"{st} LoRA")
    grid(rows, labels, "docs/miniworld_styles.png")
    style_scores = evaluate(a.bin, [p for r in rows for p in r])
    base_style_scores = evaluate(a.bin, base_rows)

    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    print("| images | subject fidelity | style fidelity | prompt alignment |\n|---|---|---|---|")
    for name, sc in (("subject LoRAs (subject prompts)", subj_scores), ("base model (same subject prompts)", base_subj_scores),
                     ("style LoRAs (style prompts)", style_scores), ("base model (same style prompts)", base_style_scores)):
        f = lambda k: mean([s[k] for s in sc if s[k] is not None])
        print(f"| {name} | {f('subject'):.3f} | {f('style'):.3f} | {f('alignment'):.3f} |")

    # Subject x style under each strategy.
    strategies = [("merge", []), ("switch", []), ("composite", []), ("klora", []), ("klora", ["--klora-mode", "reference"]), ("auto", [])]
    table = []
    for mix, extra in strategies:
        tag = mix + ("-reference" if extra else "")
        rows, labels, paths = [], [], []
        for s in SUBJECTS:
            row = []
            for st in STYLES:
                p = f"a {s} emblem on a {BGS[STYLES.index(st)]} background, {st} style"
                out = generate(a.bin, p, os.path.join(tmp, f"mix_{tag}_{s}_{st}"), 31, a.steps,
                               [lora(s, 1.0, "subject"), lora(st, 1.0, "style")], mix, extra)
                row.append(out[0])
                paths += out
            rows.append(row)
            labels.append(s)
        grid(rows, labels, f"docs/miniworld_mix_{tag}.png")
        sc = evaluate(a.bin, paths)
        table.append((tag, mean([x["subject"] for x in sc]), mean([x["style"] for x in sc]), mean([x["alignment"] for x in sc])))
    # auto with distractors: two subjects and two styles offered, the prompt asks for one of each.
    paths = []
    for i, s in enumerate(SUBJECTS):
        other_s = SUBJECTS[(i + 1) % len(SUBJECTS)]
        for j, st in enumerate(STYLES):
            other_st = STYLES[(j + 1) % len(STYLES)]
            p = f"a {s} emblem on a {BGS[j]} background, {st} style"
            paths += generate(a.bin, p, os.path.join(tmp, f"auto4_{s}_{st}"), 31, a.steps,
                              [lora(s, 1.0, "subject"), lora(other_s, 1.0, "subject"), lora(st, 1.0, "style"), lora(other_st, 1.0, "style")], "auto")
    sc = evaluate(a.bin, paths)
    table.append(("auto, 2 subjects + 2 styles offered", mean([x["subject"] for x in sc]), mean([x["style"] for x in sc]), mean([x["alignment"] for x in sc])))
    print("\n| strategy (16 subject x style pairs, 2 images each) | subject fidelity | style fidelity | prompt alignment | mean of subject and style |\n|---|---|---|---|---|")
    for tag, s, st, al in table:
        print(f"| {tag} | {s:.3f} | {st:.3f} | {al:.3f} | {(s + st) / 2:.3f} |")


if __name__ == "__main__":
    main()
