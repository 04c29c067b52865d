"""Goldens for LoRA-Mixer routing, ChameleonLLM's hypernetwork and k-means, and the shipped LLM.

python tools/parity/make_llm_mixer_fixtures.py --out tests/fixtures/llm/mixer

- routing: the tiny random Llama of tests/fixtures/llm/llama with three of its PEFT adapters as
  experts and random routers; a torch re-implementation of the routed forward (each targeted
  linear: y = W x + sum_e g_e(u) * s_e * B_e A_e x, g = softmax(R u), top-k renormalised, with
  u = x (the paper's router) or u = [x, causal running mean of x] (ours)) gives the logits for
  soft, top-1 and top-2 routing; the prompt-mean router (u = [x, mean of x over the whole prompt]
  for prompt positions, the causal mean after it) for a whole-prompt sequence and for a prompt of
  7 tokens followed by 5 answer tokens.
- hypernetwork: random weights (d -> 64 -> 32 -> r(d+V), ReLU), a feature, and A, B and adapted
  logits of random hidden states.
- k-means: random points and initial centres; scikit-learn's Lloyd iterations (max_iter 10).
- minichat: greedy tokens of models/minichat from transformers (+ PEFT for its adapters).
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from transformers import AutoModelForCausalLM
from peft import PeftModel

LLAMA = "tests/fixtures/llm/llama"
EXPERTS = ["legacy", "lora", "rewrite"]


def peft_branches(name):
    """module path -> (A, B, scale) of a PEFT adapter, with PEFT's own per-module scaling
    (rank_pattern, alpha_pattern, rsLoRA)."""
    base = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    m = PeftModel.from_pretrained(base, os.path.join(LLAMA, "adapters", name))
    out = {}
    for path, mod in m.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = path[len("base_model.model."):]
            out[key] = (mod.lora_A["default"].weight.detach().float(), mod.lora_B["default"].weight.detach().float(),
                        float(mod.scaling["default"]))
    return out


def routed_logits(model, experts, modules, routers, ids, k, causal_mean, prompt_end=None):
    """Logits with every targeted linear routed: y = W x + sum_e g_e * s_e * B_e A_e x,
    g = softmax(R u) (top-k renormalised when k > 0), u = x or [x, running mean of x]; with
    prompt_end, positions before it take the mean over positions [0, prompt_end)."""
    hooks = []
    for m in modules:
        lin = model.get_submodule(m)

        def hook(mod, inp, outp, m=m):
            x = inp[0]
            u = x
            if causal_mean:
                n = x.shape[1]
                mean = torch.cumsum(x, dim=1) / torch.arange(1, n + 1, dtype=x.dtype).reshape(1, n, 1)
                if prompt_end is not None:
                    mean = mean.clone()
                    mean[:, :prompt_end] = x[:, :prompt_end].mean(dim=1, keepdim=True)
                u = torch.cat([x, mean], dim=-1)
            g = torch.softmax(u @ routers[m].T, dim=-1)
            if k > 0:
                top = torch.topk(g, k, dim=-1)
                keep = torch.zeros_like(g).scatter(-1, top.indices, top.values)
                g = keep / keep.sum(-1, keepdim=True)
            delta = 0
            for e, br in enumerate(experts):
                if m in br:
                    a, b, s = br[m]
                    delta = delta + g[..., e:e + 1] * (s * (x @ a.T) @ b.T)
            return outp + delta
        hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        out = model(ids).logits[0].contiguous()
    for h in hooks:
        h.remove()
    return out


def routing(out):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32).eval()
    experts = [peft_branches(n) for n in EXPERTS]
    modules = sorted({m for e in experts for m in e})
    routers, cm_routers = {}, {}
    for m in modules:
        lin = model.get_submodule(m)
        routers[m] = torch.randn(len(EXPERTS), lin.in_features) * 0.5
    for m in modules:
        lin = model.get_submodule(m)
        cm_routers[m] = torch.randn(len(EXPERTS), 2 * lin.in_features) * 0.5
    save_file({f"{m}.router.weight": w.contiguous() for m, w in routers.items()}, os.path.join(out, "routers.safetensors"))
    save_file({f"{m}.router.weight": w.contiguous() for m, w in cm_routers.items()}, os.path.join(out, "routers_causal_mean.safetensors"))
    ids = torch.tensor([[0, 5, 9, 17, 33, 8, 41, 2, 77, 12, 8, 3]])
    logits = {}
    for k in [0, 1, 2]:
        logits[f"logits_top{k}"] = routed_logits(model, experts, modules, routers, ids, k, False)
        logits[f"logits_causal_mean_top{k}"] = routed_logits(model, experts, modules, cm_routers, ids, k, True)
        logits[f"logits_prompt_mean_top{k}"] = routed_logits(model, experts, modules, cm_routers, ids, k, True, ids.shape[1])
    logits["logits_prompt_mean_split7_top2"] = routed_logits(model, experts, modules, cm_routers, ids, 2, True, 7)
    save_file(logits, os.path.join(out, "routing_goldens.safetensors"))
    json.dump({"experts": EXPERTS, "ids": ids[0].tolist(), "modules": modules}, open(os.path.join(out, "routing.json"), "w"), indent=1)


def hypernet(out):
    torch.manual_seed(1)
    d, v, r = 64, 320, 3
    dims = [d, 64, 32, r * (d + v)]
    layers = [torch.nn.Linear(dims[i], dims[i + 1]) for i in range(3)]
    feat = torch.nn.functional.normalize(torch.randn(d), dim=0)
    x = feat
    for i, l in enumerate(layers):
        x = l(x)
        if i < 2:
            x = torch.relu(x)
    a = x[: r * d].reshape(r, d)
    b = x[r * d:].reshape(v, r)
    h = torch.randn(5, d)
    w = torch.randn(v, d) * 0.1
    logits = h @ w.T + 1.5 * (h @ a.T) @ b.T
    t = {f"layers.{i}.weight": l.weight.detach().contiguous() for i, l in enumerate(layers)}
    t.update({f"layers.{i}.bias": l.bias.detach().contiguous() for i, l in enumerate(layers)})
    t.update({"feature": feat, "a": a.detach().contiguous(), "b": b.detach().contiguous(), "hidden": h, "head": w,
              "logits": logits.detach().contiguous()})
    save_file(t, os.path.join(out, "hypernet.safetensors"))


def kmeans(out):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 16)) * 2
    pts = np.concatenate([c + rng.normal(size=(30, 16)) for c in centres]).astype(np.float32)
    rng.shuffle(pts)
    init = pts[[0, 1, 2, 3]].copy()
    km = KMeans(n_clusters=4, init=init, n_init=1, max_iter=10, tol=0.0, algorithm="lloyd").fit(pts)
    save_file({"points": torch.from_numpy(pts), "init": torch.from_numpy(init),
               "centres": torch.from_numpy(km.cluster_centers_.astype(np.float32)),
               "labels": torch.from_numpy(km.labels_.astype(np.int64))}, os.path.join(out, "kmeans.safetensors"))


def minichat(out):
    from tokenizers import Tokenizer
    mdir = "models/minichat"
    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    end = tok.token_to_id("<|end|>")
    prompts = ["make me a tebo in dotted style on navy", "negative prompt for: a krin emblem on a pink background, painted style",
               "what are the trigger words of vlox?", "name the subject and style: a mupa emblem on a teal background, striped style"]
    cases = []
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    for adapter in [None, "adapters/prompt", "adapters/negative", "aloras/name", "aloras/trigger"]:
        m = base if adapter is None else PeftModel.from_pretrained(base, os.path.join(mdir, adapter)).eval()
        for p in prompts:
            ids = tok.encode(f"<|user|>\n{p}<|end|>\n<|assistant|>\n").ids
            x = torch.tensor([ids])
            with torch.no_grad():
                g = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                               eos_token_id=end, pad_token_id=end)
            cases.append({"adapter": adapter, "prompt": p, "prompt_ids": ids, "tokens": g[0, len(ids):].tolist()})
        if adapter is not None:
            base = m.unload()
    json.dump({"cases": cases}, open(os.path.join(out, "minichat_greedy.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-minichat", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    routing(a.out)
    hypernet(a.out)
    kmeans(a.out)
    if not a.skip_minichat:
        minichat(a.out)


if __name__ == "__main__":
    main()
