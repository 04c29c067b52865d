"""The malformed-file corpus in tests/fixtures/bad/ (plain Python, no dependencies).

Each file is refused by LoRAMix with its own message; tests/bad_files.rs lists what each must say.
Run: python3 tools/parity/make_bad_fixtures.py
"""
import json
import math
import os
import pickle
import random
import struct
import zipfile

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "bad")
rng = random.Random(0)


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def rand(n, s=0.1):
    return [rng.gauss(0, s) for _ in range(n)]


def safetensors(tensors, metadata=None, header_override=None):
    """tensors: list of (name, dtype, shape, bytes) laid out in order."""
    header, data, off = {}, b"", 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    if header_override:
        header_override(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def lora_module(name, r, i, o, up=None):
    return [
        (f"{name}.alpha", "F32", [], f32([float(r)])),
        (f"{name}.lora_down.weight", "F32", [r, i], f32(rand(r * i))),
        (f"{name}.lora_up.weight", "F32", [o, r], f32(up if up is not None else rand(o * r))),
    ]


def small_sdxl_lora():
    # Matches the tiny2 fixture (cross-attention 64, inner dim 64).
    t = []
    t += lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 4, 64, 64)
    t += lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 4, 64, 64)
    return t


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as fh:
        fh.write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    good = safetensors(small_sdxl_lora())

    write("empty.safetensors", b"")
    write("truncated.safetensors", good[: len(good) - 100])
    write("header_past_end.safetensors", struct.pack("<Q", 10_000) + b'{"a":1}')
    write("huge_header.safetensors", struct.pack("<Q", 200_000_000) + b"{" + b" " * 63)

    def overlap(h):
        h["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"]["data_offsets"] = [0, 64 * 4 * 4]
    write("overlapping_offsets.safetensors", safetensors(small_sdxl_lora(), header_override=overlap))

    def out_of_range(h):
        k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
        a, b = h[k]["data_offsets"]
        h[k]["data_offsets"] = [a + 1_000_000, b + 1_000_000]
    write("out_of_range_offsets.safetensors", safetensors(small_sdxl_lora(), header_override=out_of_range))

    def wrong_shape(h):
        h["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"]["shape"] = [4, 65]
    write("dtype_shape_mismatch.safetensors", safetensors(small_sdxl_lora(), header_override=wrong_shape))

    bad_up = rand(64 * 4)
    bad_up[7] = math.nan
    bad_up[9] = math.inf
    t = lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 4, 64, 64, up=bad_up)
    write("nan_inf.safetensors", safetensors(t))

    write("pickle.ckpt", pickle.dumps({"state_dict": {"not": "weights"}}, protocol=2))
    with zipfile.ZipFile(os.path.join(OUT, "zipped.safetensors"), "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))

    # An SD 1.5 kohya LoRA: single text encoder, 768-wide cross-attention.
    sd15 = []
    sd15 += lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 4, 768, 640)
    sd15 += lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 4, 640, 640)
    sd15 += lora_module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768)
    write("sd15_lora.safetensors", safetensors(sd15, metadata={"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}))
    write("sd15_lora_no_metadata.safetensors", safetensors(sd15))

    # A real-size SDXL LoRA (2048-wide cross-attention) on a model of another width.
    xl = lora_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 4, 2048, 640)
    write("sdxl_full_size_lora.safetensors", safetensors(xl, metadata={"ss_base_model_version": "sdxl_base_v1-0"}))

    dora = small_sdxl_lora() + [("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale", "F32", [64, 1], f32([1.0] * 64))]
    write("dora.safetensors", safetensors(dora))

    ckpt = [("model.diffusion_model.input_blocks.0.0.weight", "F32", [4, 4], f32(rand(16)))]
    write("checkpoint_not_lora.safetensors", safetensors(ckpt))


if __name__ == "__main__":
    main()
