"""Trains the miniworld base model: an SDXL-architecture pipeline at tiny width, saved in the
diffusers layout (f16 safetensors) so the Rust engine loads it with the same code as real SDXL.

python tools/miniworld/train_base.py --out models/miniworld --minutes 40 [--threads 2]
python tools/miniworld/train_base.py --out models/miniworld --resume models/miniworld --minutes 60
python tools/miniworld/train_base.py --out models/miniworld-attn16 --attention-levels 2 \
       --encoders-from models/miniworld --minutes 40

--attention-levels 2 puts cross-attention at the 16x16 latent level too (the shipped model has it
at 8x8 only). With --encoders-from, the tokenizers, text encoders and VAE are that model's, frozen,
and the UNet is warm-started from its UNet: every weight with the same name and shape is copied,
and the new transformers' proj_out starts at zero, so the new model starts as exactly the old one
and only learns what the new attention adds. Real SDXL attends at 32x32 and 64x64 latents; this
variant lets spatial mixing (`--mix auto`) be measured with masks finer than 8x8.

--resume continues from a saved model (the shipped one) instead of random weights: the VAE is
fine-tuned, then the UNet and text encoders continue. The VAE always sees every rendering kind
(base, the held-back styles and subject emblems) — a decoder that never saw stripes or dots cannot
draw them however well a LoRA steers the UNet — while the UNet sees base data only, so LoRAs still
teach something new.

Phases: the VAE (reconstruction + small KL), then the UNet with both text encoders (epsilon
loss on SDXL's scaled-linear schedule, 10% caption dropout to *zero* conditioning, matching
force_zeros_for_empty_prompt at inference). Checkpoints are written periodically, so stopping
early still leaves a loadable model.
"""
import argparse, json, os, shutil, sys, time
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))
import world  # noqa: E402
from make_sdxl_fixtures import write_clip_vocab  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402


def batch(step, n, kinds=("base",)):
    imgs, caps = [], []
    for i in range(n):
        kind = kinds[(step * n + i) % len(kinds)]
        im, c = world.render(step * 1_000_003 + i, kind)
        imgs.append(im)
        caps.append(c)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps


def vae_kinds():
    kinds = ["base"] * 4 + [f"style:{s}" for s in world.LORA_STYLES]
    kinds += [f"mix:{w}:{s}" for w in world.SUBJECTS for s in world.BASE_STYLES + world.LORA_STYLES]
    return kinds


def load(folder):
    te1 = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"), torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32)
    sched = EulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    return te1, te2, unet, vae, sched


def build(tmp, attention_levels=1):
    vocab = world.vocabulary()
    n = write_clip_vocab(os.path.join(tmp, "tokenizer"), vocab)
    write_clip_vocab(os.path.join(tmp, "tokenizer_2"), vocab)
    for tk, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        with open(os.path.join(tmp, tk, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                       "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}, f, indent=2)
    common = dict(vocab_size=n, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=n - 2, eos_token_id=2, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=2, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                     num_attention_heads=2, hidden_act="gelu", projection_dim=64))
    top_down, top_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_levels == 2 else ("DownBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
                                down_block_types=(top_down, "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", top_up), attention_head_dim=(2, 4),
                                transformer_layers_per_block=(1, 1), use_linear_projection=True, cross_attention_dim=128,
                                addition_embed_type="text_time", addition_time_embed_dim=16,
                                projection_class_embeddings_input_dim=16 * 6 + 64, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64], layers_per_block=1,
                        norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        sample_size=64, scaling_factor=1.0, force_upcast=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
    return te1, te2, unet, vae, sched


def save(out, tmp, te1, te2, unet, vae, sched):
    tok1 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    stage = out + ".tmp"
    shutil.rmtree(stage, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(stage, safe_serialization=True)
    pipe.to(torch.float32)
    for tk in ("tokenizer", "tokenizer_2"):  # keep vocab.json + merges.txt, the real SDXL layout
        shutil.rmtree(os.path.join(stage, tk), ignore_errors=True)
        shutil.copytree(os.path.join(tmp, tk), os.path.join(stage, tk))
    loras = os.path.join(out, "loras")
    if os.path.isdir(loras):
        shutil.copytree(loras, os.path.join(stage, "loras"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)


def warm_start(unet, old):
    """Copies every same-named, same-shaped weight of `old` into `unet` and zeroes the proj_out of
    the transformers `old` lacks: a transformer block adds its output to its input, so the new
    model computes exactly what the old one does until training moves the new attention."""
    own, theirs = unet.state_dict(), old.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    unet.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name.endswith("proj_out") and f"{name}.weight" not in copied:
                m.weight.zero_()
                m.bias.zero_()
    print(f"warm start: {len(copied)} of {len(own)} tensors copied", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/miniworld")
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--vae-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resume", help="continue from this saved model folder")
    ap.add_argument("--lr", type=float, default=3e-4, help="UNet learning rate")
    ap.add_argument("--attention-levels", type=int, choices=(1, 2), default=1,
                    help="1: cross-attention at 8x8 only (the shipped model); 2: at 16x16 and 8x8")
    ap.add_argument("--encoders-from", help="reuse this model's tokenizers, text encoders and VAE (frozen); warm-start the UNet from it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tmp = a.out + ".work"
    os.makedirs(tmp, exist_ok=True)
    te1, te2, unet, vae, sched = build(tmp, a.attention_levels)
    if a.encoders_from:
        te1, te2, old, vae, sched = load(a.encoders_from)
        warm_start(unet, old)
        for m in (te1, te2, vae):
            m.eval().requires_grad_(False)
    if a.resume:
        te1, te2, unet, vae, sched = load(a.resume)
        vae.train().requires_grad_(True)
    t0 = time.time()
    budget = a.minutes * 60
    log = open(os.path.join(tmp, "train.log"), "a")

    # Phase 1: VAE (skipped when it is reused).
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-4 if a.resume else 1e-3)
    step = 0
    while not a.encoders_from and time.time() - t0 < budget * a.vae_fraction:
        x, _ = batch(step, a.batch, vae_kinds())
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if step % 50 == 0:
            print(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.1f} {time.time()-t0:.0f}s", file=log, flush=True)
    vae.eval().requires_grad_(False)
    # Latent scale so latents have unit variance (what scaling_factor is for).
    with torch.no_grad():
        if not a.encoders_from:
            z = torch.cat([vae.encode(batch(10_000 + i, 32)[0]).latent_dist.mean for i in range(4)])
            vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    print(f"vae done after {step} steps, scaling_factor {vae.config.scaling_factor:.4f}", file=log, flush=True)

    # Phase 2: UNet + text encoders.
    tok1 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    params = list(unet.parameters())
    if not a.encoders_from:
        params += list(te1.parameters()) + list(te2.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr)
    ac = sched.alphas_cumprod
    time_ids = torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]])
    step, last_save = 0, time.time()
    while time.time() - t0 < budget:
        x, caps = batch(500_000 + step, a.batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        ids1 = tok1(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids2, output_hidden_states=True)
        ctx = torch.cat([h1, o2.hidden_states[-2]], -1)
        pooled = o2.text_embeds
        drop = (torch.rand(len(caps)) < 0.1).float()
        ctx = ctx * (1 - drop)[:, None, None]
        pooled = pooled * (1 - drop)[:, None]
        t = torch.randint(0, 1000, (len(caps),))
        noise = torch.randn_like(z)
        a_t = ac[t].sqrt()[:, None, None, None]
        s_t = (1 - ac[t]).sqrt()[:, None, None, None]
        pred = unet(a_t * z + s_t * noise, t, encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(caps), 1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); step += 1
        if step % 50 == 0:
            print(f"unet step {step} loss {loss.item():.4f} {time.time()-t0:.0f}s", file=log, flush=True)
        if time.time() - last_save > 600:
            save(a.out, tmp, te1, te2, unet, vae, sched)
            last_save = time.time()
    save(a.out, tmp, te1, te2, unet, vae, sched)
    print(f"done: unet {step} steps in {time.time()-t0:.0f}s", file=log, flush=True)


if __name__ == "__main__":
    main()
