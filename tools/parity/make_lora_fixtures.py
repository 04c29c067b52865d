"""LoRA goldens for tests/lora_parity.rs, on the tiny2 SDXL pipeline.

Writes tests/fixtures/lora/:
  kohya_sgm.safetensors        kohya SDXL LoRA, SGM block names (input_blocks_4_1_...), conv LoRA on
                               resnets/samplers, te1 + te2, alphas on most modules (f16 storage)
  kohya_diffusers.safetensors  kohya SDXL LoRA, diffusers block names, no alphas on some modules
  peft.safetensors             diffusers/PEFT format written by diffusers' save_lora_weights with
                               its `lora_adapter_metadata` (lora_alpha, alpha_pattern)
  loha.safetensors, lokr.safetensors   LyCORIS (kohya naming)
  golden.safetensors / golden.json     per-layer ΔW (scale included, strength 1) and final latents

Reference: diffusers `load_lora_weights` + `set_adapters(names, adapter_weights)`; diffusers has no
LoHa/LoKr loader for SDXL, so for those the reference is the LyCORIS formula in torch
(LoHa ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha/r; LoKr ΔW = kron(w1, w2) · alpha/r when a factor is
decomposed, · 1 when both are full) merged into the diffusers weights, then the same pipeline.

Run: /work/venv/bin/python tools/parity/make_lora_fixtures.py
"""
import json
import os
import sys

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PIPE = os.path.join(ROOT, "tests", "fixtures", "sdxl", "tiny2", "pipeline")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")

torch.manual_seed(0)


def sgm_name(path, cfg):
    """diffusers UNet module path -> SGM module path, for an SDXL-like layout."""
    lpb = cfg.layers_per_block
    p = path.split(".")
    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}

    def inner(rest):
        if rest and rest[0] in res:
            return res[rest[0]].split(".") + rest[1:]
        return rest

    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return ".".join(["input_blocks", str(1 + i * (lpb + 1) + lpb), "0", "op"])
        j = int(p[3])
        idx = 1 + i * (lpb + 1) + j
        sub = "0" if p[2] == "resnets" else "1"
        return ".".join(["input_blocks", str(idx), sub] + (inner(p[4:]) if sub == "0" else p[4:]))
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "upsamplers":
            has_attn = "CrossAttn" in cfg.up_block_types[i]
            return ".".join(["output_blocks", str(i * (lpb + 1) + lpb), "2" if has_attn else "1", "conv"])
        j = int(p[3])
        sub = "0" if p[2] == "resnets" else "1"
        return ".".join(["output_blocks", str(i * (lpb + 1) + j), sub] + (inner(p[4:]) if sub == "0" else p[4:]))
    if p[0] == "mid_block":
        k = int(p[2])
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(p[1], k)]
        return ".".join(["middle_block", str(idx)] + (inner(p[3:]) if p[1] == "resnets" else p[3:]))
    raise ValueError(path)


def targets(pipe):
    """(component, path, module) of every LoRA target: transformer linears, resnet and sampler convs, CLIP linears."""
    out = []
    for path, m in pipe.unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not path.startswith(("down_blocks", "up_blocks", "mid_block")):
            continue
        out.append(("unet", path, m))
    for comp, enc in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        for path, m in enc.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in path:
                # transformers 5 dropped the `text_model.` level from CLIPTextModel; LoRA files
                # (kohya and diffusers alike) still name it.
                out.append((comp, path if path.startswith("text_model.") else "text_model." + path, m))
    return out


def rnd(*shape, s=0.3):
    return torch.randn(*shape) * s


def lora_pair(m, r):
    if isinstance(m, torch.nn.Conv2d):
        k = m.kernel_size[0]
        return rnd(r, m.in_channels, k, k), rnd(m.out_channels, r, 1, 1)
    return rnd(r, m.in_features), rnd(m.out_features, r)


def kohya_file(pipe, naming, every, dtype, with_alpha):
    """As sd-scripts writes it: one rank and alpha for linears (network_dim / network_alpha) and
    another for convs (conv_dim / conv_alpha, LoCon on resnets and samplers).

    A uniform alpha per kind is also what keeps diffusers exact: it rebuilds per-module alphas
    through an `alpha_pattern` whose keys miss attention projections (`attn1.processor.to_q_lora`)
    and text-encoder attention, giving those modules the most common alpha. We follow kohya
    (alpha / rank per module) everywhere."""
    sd = {}
    for n, (comp, path, m) in enumerate(targets(pipe)):
        if n % every:
            continue
        conv = isinstance(m, torch.nn.Conv2d)
        r = 2 if conv else 4
        if comp == "unet":
            name = "lora_unet_" + (sgm_name(path, pipe.unet.config) if naming == "sgm" else path).replace(".", "_")
        else:
            name = f"lora_{comp}_" + path.replace(".", "_")
        down, up = lora_pair(m, r)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        if with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(1.0 if conv else 2.0).to(dtype)
    return sd


def peft_file(pipe, path_out):
    """diffusers-format LoRA written by diffusers itself, with PEFT adapter metadata."""
    unet, te, te2 = {}, {}, {}
    unet_paths = []
    for n, (comp, path, m) in enumerate(targets(pipe)):
        if n % 3:
            continue
        down, up = lora_pair(m, 4)
        d = {"unet": unet, "te1": te, "te2": te2}[comp]
        d[f"{path}.lora_A.weight"] = down
        d[f"{path}.lora_B.weight"] = up
        if comp == "unet":
            unet_paths.append(path)
    pattern_key = unet_paths[1]
    meta = dict(r=4, lora_alpha=8, target_modules=sorted({p.split(".")[-1] for p in unet_paths}), alpha_pattern={pattern_key: 2})
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    StableDiffusionXLPipeline.save_lora_weights(
        os.path.dirname(path_out), unet_lora_layers=unet, text_encoder_lora_layers=te, text_encoder_2_lora_layers=te2,
        weight_name=os.path.basename(path_out), unet_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=dict(r=4, lora_alpha=4, target_modules=te_targets),
        text_encoder_2_lora_adapter_metadata=dict(r=4, lora_alpha=6, target_modules=te_targets))


def lycoris_file(pipe, kind):
    """LoHa / LoKr in kohya naming, and their ΔW by the LyCORIS formula."""
    sd, deltas = {}, {}
    for n, (comp, path, m) in enumerate(targets(pipe)):
        if n % 4:
            continue
        prefix = "lora_unet_" if comp == "unet" else f"lora_{comp}_"
        name = prefix + path.replace(".", "_")
        conv = isinstance(m, torch.nn.Conv2d)
        w = m.weight
        out_f, in_f = w.shape[0], w.shape[1]
        k = w.shape[2] if conv else 1
        qual = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[comp] + path
        if kind == "loha":
            r = 2 + n % 3
            w1a, w1b, w2a, w2b = rnd(out_f, r), rnd(r, in_f * k * k), rnd(out_f, r), rnd(r, in_f * k * k)
            alpha = float(r) * 0.75
            sd.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                       f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
            delta = ((w1a @ w1b) * (w2a @ w2b) * (alpha / r)).reshape(w.shape)
        else:
            # Kronecker factors: w1 is [o1, i1] with o1 | out, i1 | in.
            o1 = 2 if out_f % 2 == 0 else 1
            i1 = 4 if in_f % 4 == 0 else 1
            o2, i2 = out_f // o1, in_f // i1
            w1 = rnd(o1, i1, s=0.5)
            sd[f"{name}.lokr_w1"] = w1
            if n % 8 == 0:
                # decomposed second factor: alpha / rank applies
                r = 3
                w2a, w2b = rnd(o2, r), rnd(r, i2 * k * k)
                sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = w2a, w2b
                alpha = 1.5
                sd[f"{name}.alpha"] = torch.tensor(alpha)
                w2 = (w2a @ w2b).reshape(o2, i2, k, k) if conv else w2a @ w2b
                scale = alpha / r
            else:
                # both factors full: alpha is stored but ignored
                w2 = rnd(o2, i2, k, k) if conv else rnd(o2, i2)
                sd[f"{name}.lokr_w2"] = w2
                sd[f"{name}.alpha"] = torch.tensor(7.0)
                scale = 1.0
            if conv:
                delta = torch.kron(w1.reshape(o1, i1, 1, 1), w2) * scale
            else:
                delta = torch.kron(w1, w2) * scale
        deltas[qual] = delta.reshape(w.shape)
    return sd, deltas


def patch_text_encoder_adapters(pipe, path, adapter):
    """diffusers 0.42.1 with transformers 5 creates the text encoders' PEFT layers but does not
    fill them (transformers' load report lists every lora_A/lora_B as MISSING). Copy diffusers'
    own converted tensors into those layers so the reference is diffusers' conversion + PEFT's
    forward, as with transformers 4."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    sd, _ = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=pipe.unet.config)
    for comp, enc in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if not part:
            continue
        peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        n = 0
        for path_, m in enc.named_modules():
            if not (hasattr(m, "lora_A") and adapter in m.lora_A):
                continue
            full = path_ if path_.startswith("text_model.") else "text_model." + path_
            a, b = peft.get(f"{full}.lora_A.weight"), peft.get(f"{full}.lora_B.weight")
            if a is None:
                continue
            m.lora_A[adapter].weight.data = a.float().clone()
            m.lora_B[adapter].weight.data = b.float().clone()
            n += 1
        assert n == len(peft) // 2, (comp, n, len(peft))


def peft_deltas(pipe, adapter):
    out = {}
    for comp, mod in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        for path, m in mod.named_modules():
            if hasattr(m, "lora_A") and adapter in m.lora_A:
                if comp != "unet" and not path.startswith("text_model."):
                    path = "text_model." + path
                d = m.get_delta_weight(adapter).detach().clone()
                # diffusers creates layers for every `target_modules` match of the metadata,
                # also where the file has no weights (lora_B stays zero): not matched layers.
                if d.abs().max() > 0:
                    out[f"{comp}.{path}"] = d
    return out


def sample(deltas, n=14):
    """A spread of layers (UNet convs and linears, both text encoders) to keep goldens small."""
    keys = sorted(deltas)
    te = [k for k in keys if not k.startswith("unet.")]
    unet = [k for k in keys if k.startswith("unet.")]
    pick = unet[:: max(1, len(unet) // (n - 4))] + te[:: max(1, len(te) // 4)]
    return sorted(set(pick))


def module_by_qual(pipe, qual):
    comp, path = qual.split(".", 1)
    root = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}[comp]
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def main():
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    files = {
        "kohya_sgm": kohya_file(pipe, "sgm", 1, torch.float16, True),
        "kohya_diffusers": kohya_file(pipe, "diffusers", 2, torch.float32, False),
    }
    meta_common = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                   "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(OUT, f"{name}.safetensors"), metadata=meta_common)
    peft_file(pipe, os.path.join(OUT, "peft.safetensors"))
    lyco = {}
    for kind in ("loha", "lokr"):
        sd, deltas = lycoris_file(pipe, kind)
        lyco[kind] = deltas
        save_file(sd, os.path.join(OUT, f"{kind}.safetensors"),
                  metadata={**meta_common, "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kind})})

    g, js = {}, {"cases": {}, "layers": {}}
    h = w = 32
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, generator=gen)
    g["init_noise"] = noise
    args = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0,
                height=h, width=w, output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(**args, latents=noise.clone()).images

    g["base.latents"] = run()
    for name in ("kohya_sgm", "kohya_diffusers", "peft"):
        pipe.load_lora_weights(OUT, weight_name=f"{name}.safetensors", adapter_name=name)
        patch_text_encoder_adapters(pipe, os.path.join(OUT, f"{name}.safetensors"), name)
        d = peft_deltas(pipe, name)
        js["layers"][name] = sorted(d)
        for k in sample(d):
            g[f"delta.{name}.{k}"] = d[k]
    cases = {"kohya_sgm": [("kohya_sgm", 0.8)], "kohya_diffusers": [("kohya_diffusers", 1.0)], "peft": [("peft", 0.7)],
             "sgm_plus_peft": [("kohya_sgm", 0.8), ("peft", 0.5)]}
    for case, mix in cases.items():
        pipe.set_adapters([n for n, _ in mix], adapter_weights=[wt for _, wt in mix])
        g[f"{case}.latents"] = run()
        js["cases"][case] = mix
    pipe.unload_lora_weights()

    for kind, deltas in lyco.items():
        strength = 0.9
        js["layers"][kind] = sorted(deltas)
        saved = {}
        for qual, dw in deltas.items():
            m = module_by_qual(pipe, qual)
            saved[qual] = m.weight.data.clone()
            m.weight.data += strength * dw
        for qual in sample(deltas):
            g[f"delta.{kind}.{qual}"] = deltas[qual]
        g[f"{kind}.latents"] = run()
        js["cases"][kind] = [(kind, strength)]
        for qual, wt in saved.items():
            module_by_qual(pipe, qual).weight.data = wt
    js["generate"] = {k: v for k, v in args.items() if k != "output_type"}
    save_file({k: v.contiguous().float() for k, v in g.items()}, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as fh:
        json.dump(js, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
