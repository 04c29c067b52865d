"""Held-out fitting on miniworld (EigenLoRAx, issue 15): LoRAs trained with `loramix lora train`
on the held-out LoRAs' own training images (tools/miniworld/training_images.py), as a full
rank-8 LoRA, as loadings on a subspace built without them, and as loadings on a random
orthonormal basis of the same K, scored like subspace_quality.py (same prompts and seeds).

python3 tools/miniworld/train_quality.py --library LIB --runs RUNS_DIR [--seeds 2]

RUNS_DIR holds the `--json` outputs of the training runs, named <lora>_<condition>_<steps>.json
(condition: full | load | rand); the trained LoRAs are in LIB under the same names.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mix_quality import SHAPES, STYLES, SUBJECTS, evaluate  # noqa: E402
from subspace_quality import fidelity, images  # noqa: E402

LABEL = {"full": "full rank-8 LoRA", "load": "loadings on the subspace of the other 6 (K = 48)",
         "rand": "loadings on a random orthonormal basis (K = 48)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/loramix")
    ap.add_argument("--library", required=True)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-base", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=25)
    a = ap.parse_args()
    env = dict(os.environ, LORAMIX_HOME=a.library, RUST_BACKTRACE="0")
    work = os.path.join(a.runs, "images")
    rows = []
    runs = sorted(glob.glob(os.path.join(a.runs, "*_*_*.json")))
    who_all = sorted({os.path.basename(r).split("_")[0] for r in runs})
    for who in who_all:
        orig = os.path.join(SHAPES["locon"], f"{who}.safetensors")
        f0 = fidelity(evaluate(a.bin, images(a.bin, env, work, orig, who, a.seeds, a.seed_base, a.steps)), who)
        rows.append((who, "shipped LoRA (PyTorch, 400 steps × 16 images)", "", "", "", f0))
        for r in sorted(runs, key=lambda p: (os.path.basename(p).split("_")[1], int(os.path.basename(p).split("_")[2][:-5]))):
            base = os.path.basename(r)[:-5]
            w, cond, steps = base.split("_")
            if w != who:
                continue
            try:
                j = json.load(open(r))
            except json.JSONDecodeError:
                continue
            fid = fidelity(evaluate(a.bin, images(a.bin, env, work, base, who, a.seeds, a.seed_base, a.steps)), who)
            rows.append((who, LABEL[cond], steps, j["trainable"], f"{j['seconds']:.0f}", fid))
    print("| LoRA | trained as | steps (batch 4) | trainable numbers | seconds | fidelity |")
    print("|---|---|---|---|---|---|")
    for who, what, steps, n, secs, fid in rows:
        kind = "subject" if who in SUBJECTS else "style"
        print(f"| {who} ({kind}) | {what} | {steps} | {n} | {secs} | {fid:.3f} |")


if __name__ == "__main__":
    main()
