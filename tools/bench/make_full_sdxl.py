"""A full-size SDXL base checkpoint with random weights, for the memory benchmark (issue 19).

    python tools/bench/make_full_sdxl.py OUT_DIR

writes OUT_DIR/sd_xl_base_random.safetensors (f16, the SGM layout of `sd_xl_base_1.0.safetensors`,
about 6.9 GB) and OUT_DIR/config/ (the diffusers configs, scheduler and tokenizers that a
single-file load needs; the tokenizers are the tiny fixtures', whose ids fit SDXL's vocabulary).
Each model is built from the real configs (tools/parity/make_single_file_fixtures.py) with
diffusers' / transformers' default initialisation, one at a time, so the peak stays near one f32
UNet. The key map is the one checked against diffusers' own converters there.
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))
from make_single_file_fixtures import (SDXL_TE1, SDXL_TE2, SDXL_UNET, SDXL_VAE, te1_to_sgm, te2_to_sgm,  # noqa: E402
                                       unet_to_sgm, vae_to_sgm)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TINY = os.path.join(ROOT, "tests", "fixtures", "sdxl", "tiny3", "pipeline")


def half(sd):
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items() if "position_ids" not in k}


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    sgm = {}
    unet = UNet2DConditionModel(**SDXL_UNET)
    sgm.update(half(unet_to_sgm(unet.state_dict(), SDXL_UNET)))
    del unet
    vae = AutoencoderKL(**SDXL_VAE)
    sgm.update(half(vae_to_sgm(vae.state_dict(), SDXL_VAE)))
    del vae
    te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1))
    sgm.update(half(te1_to_sgm(te1.state_dict())))
    del te1
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2))
    sgm.update(half(te2_to_sgm(te2.state_dict(), SDXL_TE2["num_hidden_layers"])))
    del te2
    path = os.path.join(out, "sd_xl_base_random.safetensors")
    save_file(sgm, path + ".partial")
    os.replace(path + ".partial", path)
    cfg = os.path.join(out, "config")
    for name, c in [("unet", SDXL_UNET), ("vae", SDXL_VAE), ("text_encoder", SDXL_TE1), ("text_encoder_2", SDXL_TE2)]:
        os.makedirs(os.path.join(cfg, name), exist_ok=True)
        with open(os.path.join(cfg, name, "config.json"), "w") as f:
            json.dump(c, f, indent=1)
    for name in ["scheduler", "tokenizer", "tokenizer_2"]:
        shutil.copytree(os.path.join(TINY, name), os.path.join(cfg, name), dirs_exist_ok=True)
    shutil.copy(os.path.join(TINY, "model_index.json"), os.path.join(cfg, "model_index.json"))
    print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB, {sum(v.numel() for v in sgm.values()) / 1e9:.2f} G parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/sdxl-full")
