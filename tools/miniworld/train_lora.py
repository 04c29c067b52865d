"""Trains miniworld subject and style LoRAs on the shipped base model and saves them in kohya
SDXL format with real sd-scripts / modelspec metadata.

python tools/miniworld/train_lora.py --base models/miniworld --kind subject:vlox --steps 300
python tools/miniworld/train_lora.py --all --steps 300      # the four subjects and four styles
python tools/miniworld/train_lora.py --all --shape attn     # attention-only, into loras-attn/

Subject LoRAs are DreamBooth-style: the identifier word ("a vlox emblem on a teal background,
flat style") with the emblem in varied positions, sizes and backgrounds. Style LoRAs learn a
rendering ("..., striped style") on generic objects. Rank 8 on every transformer linear of the UNet
(attention q/k/v/out, feed-forward, proj_in/out) and on the resnet convolutions (LoCon); the text
encoders stay frozen, so the trigger
words work through the base vocabulary. Saved as models/miniworld/loras/<name>.safetensors.
"""
import argparse
import datetime
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

RANK, ALPHA = 8, 8.0
# Transformer linears and, as kohya's LoCon does, the resnets' convolutions: miniworld's emblems
# and textures are local detail that the attention layers alone (only at the lowest resolution
# in this tiny UNet) cannot carry.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
# The other common shape of real SDXL LoRAs: attention projections only, as diffusers' DreamBooth
# LoRA scripts train them (what K-LoRA was built for). Shipped beside the others in loras-attn/.
SHAPES = {"locon": (TARGETS, "loras"), "attn": (["to_q", "to_k", "to_v", "to_out.0"], "loras-attn")}


def batch(kind, start, n):
    imgs, caps = [], []
    for i in range(n):
        im, c = world.render(900_000_000 + start + i, kind)
        imgs.append(im)
        caps.append(c)
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1, caps


def train(base, kind, steps, bs, lr, out_dir, threads, targets=TARGETS, shape="locon"):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float32)
    unet, vae = pipe.unet, pipe.vae
    for m in (unet, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ac = pipe.scheduler.alphas_cumprod
    time_ids = torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]])
    captions = Counter()
    t0 = time.time()
    # A fixed training set (DreamBooth-sized), encoded once: VAE latent distributions and text
    # embeddings are cached, so a step is one UNet forward and backward.
    n_data = 384
    means, stds, ctxs, pooleds = [], [], [], []
    with torch.no_grad():
        for i in range(0, n_data, 32):
            x, caps = batch(kind, i, 32)
            captions.update(caps)
            d = vae.encode(x).latent_dist
            means.append(d.mean)
            stds.append(d.std)
            c, _, p, _ = pipe.encode_prompt(caps, do_classifier_free_guidance=False)
            ctxs.append(c)
            pooleds.append(p)
    means, stds, ctxs, pooleds = (torch.cat(v) for v in (means, stds, ctxs, pooleds))
    print(f"{kind}: encoded {n_data} samples in {time.time() - t0:.0f}s", flush=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, n_data, (bs,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * vae.config.scaling_factor
        ctx, pooled = ctxs[idx], pooleds[idx]
        t = torch.randint(0, 1000, (bs,))
        noise = torch.randn_like(z)
        a_t, s_t = ac[t].sqrt()[:, None, None, None], (1 - ac[t]).sqrt()[:, None, None, None]
        pred = unet(a_t * z + s_t * noise, t, encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(bs, 1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"{kind} step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    sd = get_peft_model_state_dict(unet)
    name = kind.split(":", 1)[1]
    out = {}
    for k, v in sd.items():
        module, ab = k.rsplit(".lora_", 1)
        kohya = "lora_unet_" + module.replace(".", "_")
        out[f"{kohya}.lora_{'down' if ab.startswith('A') else 'up'}.weight"] = v.detach().to(torch.float16).contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    role = "subject" if kind.startswith("subject:") else "style"
    trigger = f"{name} emblem" if role == "subject" else f"{name} style"
    tags = Counter()
    for c, n in captions.items():
        for tag in c.replace(",", " ,").split(" , "):
            tags[tag.strip()] += n
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_base_model_version": "loramix_miniworld_v1",
        "ss_output_name": name,
        "ss_training_comment": f"miniworld {role} LoRA ({kind}, {shape} shape), trained with tools/miniworld/train_lora.py",
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(lr),
        "ss_num_train_images": str(n_data),
        "ss_tag_frequency": json.dumps({f"1_{name}": dict(tags.most_common(40))}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "loramix-miniworld/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"miniworld {name} ({role})",
        "modelspec.trigger_phrase": trigger,
        "modelspec.tags": role,
        "modelspec.date": datetime.date.today().isoformat(),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file(out, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    print(f"saved {path} ({time.time() - t0:.0f}s)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="models/miniworld")
    ap.add_argument("--kind", action="append", default=[], help="subject:<word> or style:<name>; repeatable")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="locon", help="locon: linears + convs (loras/); attn: attention projections only (loras-attn/)")
    a = ap.parse_args()
    targets, folder = SHAPES[a.shape]
    kinds = a.kind or []
    if a.all:
        kinds = [f"subject:{w}" for w in world.SUBJECTS] + [f"style:{s}" for s in world.LORA_STYLES]
    for k in kinds:
        train(a.base, k, a.steps, a.batch, a.lr, os.path.join(a.base, folder), a.threads, targets, a.shape)


if __name__ == "__main__":
    main()
