"""Goldens for the ControlNet "canny" preprocessor: OpenCV's `cv2.Canny(image, low, high)` on RGB
images (3 channels: OpenCV takes, per pixel, the channel whose gradient is largest), which is what
sd-webui-controlnet's canny annotator and diffusers' ControlNet examples call.

pip install opencv-python-headless pillow numpy
python tools/parity/make_canny_fixtures.py   (writes tests/fixtures/canny/)
"""
import json
import os

import cv2
import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "canny")


def shapes(rng, h, w):
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(3, max(4, w // 3))), c, -1)
        else:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(2, w // 2)), y + int(rng.integers(2, h // 2))), c, -1)
    noise = rng.integers(-12, 13, size=img.shape)
    return (img.astype(np.int32) + noise).clip(0, 255).astype(np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)
    cases = []
    images = [("shapes", shapes(rng, 61, 83)),
              ("noise", rng.integers(0, 256, size=(40, 37, 3), dtype=np.uint8)),
              ("gradient", (np.add.outer(np.arange(50), np.arange(64)) * 2 % 256).astype(np.uint8)[..., None].repeat(3, 2)),
              ("tiny", rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8))]
    for name, img in images:
        Image.fromarray(img).save(os.path.join(OUT, f"{name}.png"))
        for low, high in [(100, 200), (50.7, 80.2), (200, 100), (0, 0), (10, 400)]:
            edges = cv2.Canny(img, low, high)
            out = f"{name}_{low}_{high}.png"
            Image.fromarray(edges).save(os.path.join(OUT, out))
            cases.append({"image": f"{name}.png", "low": low, "high": high, "edges": out, "edge_pixels": int((edges > 0).sum())})
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "cases": cases}, f, indent=1)
    print(cv2.__version__, [(c["edges"], c["edge_pixels"]) for c in cases])


if __name__ == "__main__":
    main()
