"""ViT (DINO embedder) goldens for tests/embed.rs: a tiny random transformers ViTModel saved in
transformers 5 layout (`new/`) and with transformers 4 key names (`old/`, as hub checkpoints such
as facebook/dino-vits16 are stored), a random 64x64 PNG, the PIL image processor's pixel values
(resize to image_size with Pillow bilinear, rescale, ImageNet normalisation) and the model's last
hidden state.

Run: /work/venv/bin/python tools/parity/make_vit_fixtures.py
"""
import json
import os
import re

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTModel

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "vit")


def old_name(k):
    m = re.match(r"layers\.(\d+)\.(.*)", k)
    if not m:
        return k
    i, t = m.groups()
    t = (t.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj", "attention.attention.key")
         .replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense")
         .replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense"))
    return f"encoder.layer.{i}.{t}"


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                    patch_size=8, layer_norm_eps=1e-12, qkv_bias=True)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    for p in model.parameters():  # visible LayerNorm affine terms and biases
        p.data += torch.randn_like(p) * 0.02
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    cfg_json = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                             "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act", "qkv_bias")}
    pp = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
          "image_std": [0.229, 0.224, 0.225], "resample": 2, "rescale_factor": 1 / 255,
          "size": {"height": 32, "width": 32}}
    for sub, names in (("new", lambda k: k), ("old", old_name)):
        d = os.path.join(OUT, sub)
        os.makedirs(d, exist_ok=True)
        save_file({names(k): v for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as fh:
            json.dump(cfg_json, fh, indent=1)
        with open(os.path.join(d, "preprocessor_config.json"), "w") as fh:
            json.dump(pp, fh, indent=1)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img.save(os.path.join(OUT, "image.png"))
    small = Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8))
    small.save(os.path.join(OUT, "image_small.png"))
    g = {}
    for name, im in (("image", img), ("image_small", small)):
        # transformers' ViT image processor, PIL backend (what EST-LoRA's ViTFeatureExtractor was).
        from transformers import ViTImageProcessorPil
        proc = ViTImageProcessorPil(do_resize=True, size={"height": 32, "width": 32}, resample=2,
                                    image_mean=pp["image_mean"], image_std=pp["image_std"])
        px = proc(images=im, return_tensors="pt")["pixel_values"].float()
        g[f"{name}.resized"] = torch.from_numpy(np.asarray(im.resize((32, 32), resample=Image.BILINEAR)).astype(np.float32))
        g[f"{name}.pixel_values"] = px
        with torch.no_grad():
            g[f"{name}.last_hidden_state"] = model(pixel_values=px).last_hidden_state
    save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(OUT, "golden.safetensors"))


if __name__ == "__main__":
    main()
