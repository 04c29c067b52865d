"""Writes a miniworld LoRA's training images with kohya caption files (`NNNN.png` + `NNNN.txt`),
the same renders and captions tools/miniworld/train_lora.py trains on, for `loramix lora train
--images DIR`.

python tools/miniworld/training_images.py --kind subject:tebo --n 64 --out target/train/tebo
"""
import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, help="subject:<word> or style:<name>")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--start", type=int, default=0, help="first render index (train_lora.py draws from 0 on)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for i in range(a.n):
        im, cap = world.render(900_000_000 + a.start + i, a.kind)
        Image.fromarray(im).save(os.path.join(a.out, f"{i:04d}.png"))
        with open(os.path.join(a.out, f"{i:04d}.txt"), "w") as f:
            f.write(cap + "\n")
    print(f"wrote {a.n} images of {a.kind} to {a.out}")


if __name__ == "__main__":
    main()
