"""Mixing goldens for tests/mix.rs, on the tiny2 SDXL pipeline.

Writes tests/fixtures/mix/:
  content.safetensors, style.safetensors   kohya SDXL LoRAs on every attention projection (and a few
                                          other layers), ranks 4 and 2, alphas != rank, per-layer
                                          magnitudes spread so that K-LoRA's decisions change over time
  klora.json      K-LoRA decision tables [step][selector layer] (true = content), for
                  {reference, corrected} x {s, s*} x {6, 50 steps}
  golden.safetensors  final latents of merge / switch / composite from diffusers

K-LoRA reference mode runs the reference's own arithmetic: `KLoRALinearLayer` from HVision-NKU/K-LoRA
`klora.py` (pass its checkout with --klora-repo) wrapped around every attention projection of the real
diffusers UNet, sampling for real, so the global call counter advances in the true call order; its
gamma function (`utils.py`, which imports a diffusers module that no longer exists) is re-implemented
line by line. Corrected mode is a line-by-line re-implementation of the documented rule
(p = step / steps, ΔW scaled by alpha / rank).

Switch and composite are run the way Multi-LoRA-Composition runs them on diffusers: switch through
`callback_on_step_end` with `set_adapters`, composite by running the UNet once per adapter and
averaging the (batched uncond/cond) predictions before CFG.

EST-LoRA's tables come the same way from Godz-z/EST-LoRA's `klora.py` (--est-repo), with a fixed
discrepancy d standing in for the DINO previews (tests/embed.rs covers the embedder).

Run: /work/venv/bin/python tools/parity/make_mix_fixtures.py --klora-repo /path/to/K-LoRA --est-repo /path/to/EST-LoRA
"""
import argparse
import importlib.util
import json
import os

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PIPE = os.path.join(ROOT, "tests", "fixtures", "sdxl", "tiny2", "pipeline")
OUT = os.path.join(ROOT, "tests", "fixtures", "mix")
PARTS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_projections(unet):
    """(path, module) of every attention q/k/v/out linear, in registration order."""
    out = []
    for name, m in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for part in PARTS:
                out.append((f"{name}.{part}", m.get_submodule(part)))
    return out


def make_loras(pipe, gen):
    """Two kohya files; returns (files, per-path (up, down, alpha) for each)."""
    files, mats = {}, {}
    extra = [(n, m) for n, m in pipe.unet.named_modules() if n.endswith("ff.net.2")][:2]
    for name, rank, alpha in (("content", 4, 2.0), ("style", 2, 4.0)):
        sd, mm = {}, {}
        for path, m in attention_projections(pipe.unet) + extra:
            mag = float(torch.exp(torch.randn(1, generator=gen) * 0.6))
            down = torch.randn(rank, m.in_features, generator=gen) * 0.2
            up = torch.randn(m.out_features, rank, generator=gen) * 0.2 * mag
            key = "lora_unet_" + path.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
            mm[path] = (up, down, alpha)
        meta = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.title": f"{name} fixture"}
        save_file(sd, os.path.join(OUT, f"{name}.safetensors"), metadata=meta)
        files[name] = os.path.join(OUT, f"{name}.safetensors")
        mats[name] = mm
    return files, mats


def reference_gamma(content, style, scaled):
    """utils.get_ratio_between_content_and_style, line by line (keys sorted as safe_open lists them)."""
    ratios = []
    for path in sorted(content):
        uc, dc, ac = content[path]
        us, ds, as_ = style[path]
        pc, ps = uc @ dc, us @ ds
        if scaled:
            pc, ps = pc * (ac / dc.shape[0]), ps * (as_ / ds.shape[0])
        ratios.append(pc.abs().sum().item() / ps.abs().sum().item())
    average = sum(ratios) / len(ratios)
    ratios = [r for r in ratios if r < 3 * average]
    return sum(ratios) / len(ratios) if ratios else float("inf")


def klora_reference_tables(pipe, klora_mod, mats, all_mats, steps_list, patterns, prefix="reference", beta_override=None):
    """Run the reference KLoRALinearLayer inside real sampling; record each call's choice.
    gamma runs over every module of the files (`all_mats`), as the reference's does."""
    sel = [(p, m) for p, m in attention_projections(pipe.unet) if p in mats["content"]]
    n_sel = len(sel)
    gamma = reference_gamma(all_mats["content"], all_mats["style"], scaled=False)
    tables = {}
    for pattern in patterns:
        alpha, beta = (1.5, 1.5 * 0.85) if pattern == "s*" else (1.5, 0.5)
        if beta_override is not None:
            beta = beta_override
        for steps in steps_list:
            klora_mod.glo_count = 0
            log = []
            handles = []
            for path, m in sel:
                uc, dc, _ = mats["content"][path]
                us, ds, _ = mats["style"][path]
                layer = klora_mod.KLoRALinearLayer(m.in_features, m.out_features, uc, dc, us, ds, average_ratio=gamma,
                                                   alpha=alpha, beta=beta, sum_timesteps=50 * n_sel, pattern=pattern,
                                                   device="cpu")
                orig = layer.get_klora_weight

                def logged(t, orig=orig, path=path, layer=layer):
                    w = orig(t)
                    log.append((path, bool(torch.equal(w, layer.weight_1_a @ layer.weight_1_b))))
                    return w

                layer.get_klora_weight = logged
                handles.append(m.register_forward_hook(lambda mod, inp, out, layer=layer: out + layer(inp[0])))
            with torch.no_grad():
                pipe(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0,
                     height=32, width=32, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
            for h in handles:
                h.remove()
            assert len(log) == steps * n_sel, (len(log), steps, n_sel)
            table = [[c for _, c in log[s * n_sel:(s + 1) * n_sel]] for s in range(steps)]
            tables[f"{prefix}/{pattern}/{steps}"] = {"layers": [p for p, _ in log[:n_sel]], "content": table, "gamma": gamma}
    return tables


def klora_corrected_tables(pipe, mats, all_mats, steps_list, patterns, prefix="corrected", energy=False, beta_override=None):
    """The corrected rule, line by line: p = step / steps; ΔW = (alpha / r) B A; same gamma on scaled ΔW."""
    order = [p for p, _ in attention_projections(pipe.unet) if p in mats["content"]]
    gamma = reference_gamma(all_mats["content"], all_mats["style"], scaled=True)
    sums = {}
    for path in order:
        uc, dc, ac = mats["content"][path]
        us, ds, as_ = mats["style"][path]
        k = dc.shape[0] * ds.shape[0]
        mc, ms = (uc @ dc) * (ac / dc.shape[0]), (us @ ds) * (as_ / ds.shape[0])
        if energy:
            sums[path] = ((torch.norm(mc) ** 2).item(), (torch.norm(ms) ** 2).item())
        else:
            sums[path] = (mc.abs().flatten().topk(k).values.sum().item(), ms.abs().flatten().topk(k).values.sum().item())
    tables = {}
    for pattern in patterns:
        for steps in steps_list:
            table = []
            for step in range(steps):
                p = step / steps
                beta = beta_override if beta_override is not None else (1.5 * 0.85 if pattern == "s*" else 0.5)
                scale = 1.5 * p + beta
                if pattern == "s*":
                    scale = scale % 1.5
                table.append([(sums[path][0] / gamma) / (sums[path][1] * scale) > 1 for path in order])
            tables[f"{prefix}/{pattern}/{steps}"] = {"layers": order, "content": table, "gamma": gamma}
    return tables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--klora-repo", required=True, help="a checkout of github.com/HVision-NKU/K-LoRA")
    ap.add_argument("--est-repo", required=True, help="a checkout of github.com/Godz-z/EST-LoRA")
    args = ap.parse_args()

    def load(path, name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "klora.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    klora_mod = load(args.klora_repo, "klora_ref")
    est_mod = load(args.est_repo, "est_ref")

    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    files, mats = make_loras(pipe, gen)
    # K-LoRA acts on attention projections only; the two extra ff modules exercise that.
    attn = {k: {p: v for p, v in mm.items() if not p.endswith("ff.net.2")} for k, mm in mats.items()}

    tables = {}
    tables.update(klora_reference_tables(pipe, klora_mod, attn, mats, (6, 50), ("s", "s*")))
    tables.update(klora_corrected_tables(pipe, attn, mats, (6, 50), ("s", "s*")))
    # EST-LoRA: its own klora.py (Frobenius energy) with beta = the style discrepancy d; d comes
    # from DINO previews in real runs, a fixed value here.
    d = 0.37
    tables.update(klora_reference_tables(pipe, est_mod, attn, mats, (6, 50), ("s", "s*"), prefix="est-reference", beta_override=d))
    tables.update(klora_corrected_tables(pipe, attn, mats, (6, 50), ("s", "s*"), prefix="est-corrected", energy=True, beta_override=d))
    for k in tables:
        if k.startswith("est-"):
            tables[k]["discrepancy"] = d
    with open(os.path.join(OUT, "klora.json"), "w") as fh:
        json.dump(tables, fh)

    # merge / switch / composite with diffusers adapters.
    for name, path in files.items():
        pipe.load_lora_weights(OUT, weight_name=os.path.basename(path), adapter_name=name)
    g = {}
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    g["init_noise"] = noise
    args_ = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=12, guidance_scale=5.0,
                 height=32, width=32, output_type="latent")
    weights = {"content": 1.0, "style": 0.8}
    names = list(files)
    with torch.no_grad():
        pipe.set_adapters(names, adapter_weights=[weights[n] for n in names])
        g["merge.latents"] = pipe(**args_, latents=noise.clone()).images

        k = 5

        def switch_cb(p, step_index, timestep, kw):
            # Multi-LoRA-Composition callbacks.py: switch after steps k, 2k, ... (not after step 0).
            if step_index > 0 and step_index % k == 0:
                cur = names.index(p.get_active_adapters()[0])
                nxt = names[(cur + 1) % len(names)]
                p.set_adapters(nxt, adapter_weights=weights[nxt])
            return {}

        pipe.set_adapters(names[0], adapter_weights=weights[names[0]])
        g["switch.latents"] = pipe(**args_, latents=noise.clone(), callback_on_step_end=switch_cb).images

        # Composite: the prompt is encoded with all adapters on; each step runs the UNet once per adapter.
        pipe.set_adapters(names, adapter_weights=[weights[n] for n in names])
        unet_forward = pipe.unet.forward

        def composite_forward(*a, **kw):
            outs = []
            for n in names:
                pipe.set_adapters(n, adapter_weights=weights[n])
                outs.append(unet_forward(*a, **kw)[0])
            pipe.set_adapters(names, adapter_weights=[weights[n] for n in names])
            return (torch.stack(outs).mean(0),)

        pipe.unet.forward = composite_forward
        g["composite.latents"] = pipe(**args_, latents=noise.clone()).images
        pipe.unet.forward = unet_forward
    save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as fh:
        json.dump({"generate": {k: v for k, v in args_.items() if k != "output_type"}, "weights": weights, "switch_every": 5}, fh)


if __name__ == "__main__":
    main()
