"""Single-file (SGM / LDM layout) fixtures and full-size SDXL weight manifests.

Run after make_sdxl_fixtures.py:  python tools/parity/make_single_file_fixtures.py

1. tests/fixtures/sdxl/tiny3/sgm.safetensors: the tiny3 pipeline's weights in the layout of
   `sd_xl_base_1.0.safetensors`. The layout is produced by a diffusers→SGM map written here and
   *checked with diffusers' own converters* (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
   convert_open_clip_checkpoint), and end to end with `StableDiffusionXLPipeline.from_single_file`,
   whose latents must equal the folder pipeline's.
2. tests/fixtures/sdxl/manifest_sdxl_base.json: every tensor name and shape of SDXL base 1.0, in the
   diffusers layout (models built from the real configs on the meta device, no weights) and in the
   SGM layout (the same map, checked the same way), plus the configs.
"""
import json, os, re
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)

torch.set_num_threads(2)
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "sdxl")

SDXL_UNET = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "center_input_sample": False, "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
SDXL_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
SDXL_TE1 = {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
            "projection_dim": 768, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SDXL_TE2 = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
            "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "gelu", "projection_dim": 1280, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1}

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_to_sgm(sd, cfg):
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    rules = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    idx = 1
    for i, ty in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            rules[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            if ty.startswith("CrossAttn"):
                rules[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if i + 1 < n:
            rules[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    idx = 0
    for i, ty in enumerate(cfg["up_block_types"]):
        cross = ty.startswith("CrossAttn")
        for j in range(lpb + 1):
            rules[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            if cross:
                rules[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if j == lpb and i + 1 < n:
                rules[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if cross else 1}.conv"
            idx += 1
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in rules:
                tail = ".".join(parts[cut:])
                if ".resnets." in head + ".":
                    for a, b in RESNET:
                        if tail.startswith(a + "."):
                            tail = b + tail[len(a):]
                            break
                out["model.diffusion_model." + rules[head] + "." + tail] = v
                break
        else:
            raise KeyError(k)
    return out


def vae_to_sgm(sd, cfg):
    n = len(cfg["block_out_channels"])
    out = {}
    for k, v in sd.items():
        s = k
        s = s.replace("conv_norm_out", "norm_out")
        s = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", s)
        s = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv", s)
        s = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}", s)
        s = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv", s)
        s = s.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        s = s.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0" in s:
            s = s.replace("mid_block.attentions.0", "mid.attn_1")
            for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
                s = s.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if v.ndim == 2:  # the LDM VAE stores these as 1x1 convolutions
                v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + s] = v
    return out


def te1_to_sgm(sd):
    return {"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}


def te2_to_sgm(sd, layers):
    p = "conditioner.embedders.1.model."
    g = lambda k: sd[k] if k in sd else sd["text_model." + k] if ("text_model." + k) in sd else sd[k.replace("text_model.", "")]
    out = {p + "token_embedding.weight": g("text_model.embeddings.token_embedding.weight"),
           p + "positional_embedding": g("text_model.embeddings.position_embedding.weight"),
           p + "ln_final.weight": g("text_model.final_layer_norm.weight"), p + "ln_final.bias": g("text_model.final_layer_norm.bias"),
           p + "text_projection": sd["text_projection.weight"].T.contiguous() if sd["text_projection.weight"].device.type != "meta" else sd["text_projection.weight"].T,
           p + "logit_scale": torch.ones((), device=sd["text_projection.weight"].device)}
    for i in range(layers):
        t, s = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for a, b in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for w in ("weight", "bias"):
                out[f"{s}{b}.{w}"] = g(f"{t}{a}.{w}")
        for w in ("weight", "bias"):
            out[f"{s}attn.in_proj_{w}"] = torch.cat([g(f"{t}self_attn.{q}_proj.{w}") for q in "qkv"], 0)
    return out


def strip(sd):
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}


def check_with_diffusers(sgm, unet_sd, vae_sd, te2_model, unet_cfg, vae_cfg):
    """diffusers' own converters must turn our SGM dict back into the diffusers state dicts."""
    u = convert_ldm_unet_checkpoint(sgm, unet_cfg)
    assert set(u) == set(unet_sd), set(u) ^ set(unet_sd)
    assert all(u[k].shape == unet_sd[k].shape for k in u)
    v = convert_ldm_vae_checkpoint(sgm, vae_cfg)
    assert set(v) == set(vae_sd), set(v) ^ set(vae_sd)
    assert all(v[k].shape == vae_sd[k].shape for k in v)
    t = convert_open_clip_checkpoint(te2_model, sgm, prefix="conditioner.embedders.1.model.")
    want = {k for k in te2_model.state_dict() if "position_ids" not in k}
    got = {k for k in t if "position_ids" not in k}
    assert strip(dict.fromkeys(got)).keys() == strip(dict.fromkeys(want)).keys(), got ^ want
    return u, v, t


def tiny_single_file():
    root = os.path.join(FIX, "tiny3")
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(root, "pipeline"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    usd, vsd = pipe.unet.state_dict(), pipe.vae.state_dict()
    sgm = {}
    sgm.update(unet_to_sgm(usd, dict(pipe.unet.config)))
    sgm.update(vae_to_sgm(vsd, dict(pipe.vae.config)))
    sgm.update(te1_to_sgm(pipe.text_encoder.state_dict()))
    sgm.update(te2_to_sgm(pipe.text_encoder_2.state_dict(), pipe.text_encoder_2.config.num_hidden_layers))
    u, v, _ = check_with_diffusers(sgm, usd, vsd, pipe.text_encoder_2, dict(pipe.unet.config), dict(pipe.vae.config))
    assert all(torch.equal(u[k], usd[k]) for k in u) and all(torch.equal(v[k], vsd[k]) for k in v)
    path = os.path.join(root, "sgm.safetensors")
    save_file({k: t.contiguous() for k, t in sgm.items()}, path)
    # End to end: diffusers' from_single_file on our file equals the folder pipeline.
    sf = StableDiffusionXLPipeline.from_single_file(path, config=os.path.join(root, "pipeline"), torch_dtype=torch.float32)
    sf.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 12, 10, generator=gen)
    args = dict(prompt="a photo of a cat", num_inference_steps=4, guidance_scale=5.0, height=48, width=40, output_type="latent")
    a = pipe(**args, latents=noise.clone()).images
    b = sf(**args, latents=noise.clone()).images
    err = float((a - b).norm() / a.norm())
    assert err < 1e-6, err
    save_file({"init_noise": noise, "latents": b}, os.path.join(root, "sgm_golden.safetensors"))
    print("single file ok, diffusers folder vs single-file rel err", err)


def manifests():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2))
    usd, vsd, t1, t2 = unet.state_dict(), vae.state_dict(), te1.state_dict(), te2.state_dict()
    sgm = {}
    sgm.update(unet_to_sgm(usd, SDXL_UNET))
    sgm.update(vae_to_sgm(vsd, SDXL_VAE))
    sgm.update(te1_to_sgm(t1))
    sgm.update(te2_to_sgm(t2, SDXL_TE2["num_hidden_layers"]))
    check_with_diffusers(sgm, usd, vsd, te2, dict(unet.config), dict(vae.config))
    shapes = lambda sd: {k: list(v.shape) for k, v in sd.items() if "position_ids" not in k}
    out = {"configs": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": SDXL_TE1, "text_encoder_2": SDXL_TE2},
           "diffusers": {"unet": shapes(usd), "vae": shapes(vsd),
                         "text_encoder": {("text_model." + k if not k.startswith("text_model.") else k): s for k, s in shapes(t1).items()},
                         "text_encoder_2": {("text_model." + k if not (k.startswith("text_model.") or k.startswith("text_projection")) else k): s for k, s in shapes(t2).items()}},
           "sgm": shapes(sgm)}
    with open(os.path.join(FIX, "manifest_sdxl_base.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("manifest:", {k: len(v) for k, v in out["diffusers"].items()}, "sgm", len(out["sgm"]))


if __name__ == "__main__":
    tiny_single_file()
    manifests()
