"""Can a LoRA's own response to the prompt pick it from candidates, where its file carries no
trigger words, name or tags? An experiment for issue 14's candidate selection ("the scores come
... from the step scores"), kept because its answer (no, not on miniworld) is in BENCHMARKS.md.

Every denoising step's cross-attention reads the prompt through `to_k` / `to_v`, so a LoRA's
keys-and-values update on the prompt's tokens is a per-step activation score that is the same at
every step and costs one small product. For each of the 16 "a SUBJECT emblem on a teal background,
STYLE style" prompts this scores the 8 LoRAs of a shape by that response (several normalisations)
and counts how often the best-scoring subject and style are the ones the prompt names (32 picks;
8 by chance; the text scores of src/mix/candidates.rs get all 32).

.venv/bin/python tools/miniworld/candidate_kv_response.py [MODEL] [LORA_FOLDER]
"""
import itertools
import sys

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

SUBJECTS = ["krin", "mupa", "tebo", "vlox"]
STYLES = ["striped", "checkered", "dotted", "painted"]


def kv_deltas(path):
    """ΔW (with alpha / rank) of every cross-attention key and value module of a kohya file."""
    sd = load_file(path)
    out = []
    for k in sd:
        if k.endswith("lora_down.weight") and "attn2" in k and ("to_k" in k or "to_v" in k):
            base = k[: -len(".lora_down.weight")]
            down, up = sd[k].float(), sd[base + ".lora_up.weight"].float()
            alpha = sd.get(base + ".alpha")
            out.append(up @ down * (alpha.item() / down.shape[0] if alpha is not None else 1.0))
    return out


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "models/miniworld"
    folder = sys.argv[2] if len(sys.argv) > 2 else "loras"
    torch.set_num_threads(1)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32)
    loras = {n: kv_deltas(f"{model}/{folder}/{n}.safetensors") for n in SUBJECTS + STYLES}

    def encode(p):
        return pipe.encode_prompt(p, do_classifier_free_guidance=False)[0][0]  # [77, C]

    def response(c, deltas):
        return sum((c @ d.T).norm(dim=-1) for d in deltas)  # per token

    empty = encode("")
    base = {n: response(empty, d).mean().item() for n, d in loras.items()}
    base_n = {n: (response(empty, d) / empty.norm(dim=-1)).mean().item() for n, d in loras.items()}
    scores_named = {
        "mean response": lambda r, rn, n: r.mean().item(),
        "peak token / mean": lambda r, rn, n: (r / r.mean()).max().item(),
        "mean / empty prompt's": lambda r, rn, n: r.mean().item() / base[n],
        "peak per unit token / empty's": lambda r, rn, n: rn.max().item() / base_n[n],
        "mean per unit token / empty's": lambda r, rn, n: rn.mean().item() / base_n[n],
    }
    right = {k: 0 for k in scores_named}
    for s, t in itertools.product(SUBJECTS, STYLES):
        prompt = f"a {s} emblem on a teal background, {t} style"
        c = encode(prompt)
        n = len(pipe.tokenizer(prompt).input_ids)
        per = {}
        for name, deltas in loras.items():
            r = response(c, deltas)[:n]
            rn = r / c[:n].norm(dim=-1)
            per[name] = {k: f(r, rn, name) for k, f in scores_named.items()}
        for k in scores_named:
            right[k] += (max(SUBJECTS, key=lambda x: per[x][k]) == s) + (max(STYLES, key=lambda x: per[x][k]) == t)
    print(f"{model}/{folder}: right picks of 32 (8 by chance)")
    for k, v in right.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
