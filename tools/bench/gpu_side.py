"""Python side of tools/bench/gpu.sh (runs on the GPU machine; diffusers travels as a wheel).

  python gpu_side.py make DIR [--size full|small]     random-weight SDXL pipeline (diffusers layout,
                                                     f16 safetensors) + two random kohya LoRAs in DIR/loras
  python gpu_side.py diffusers DIR [--lora ...] ...  seconds per image with diffusers (fp16, SDPA), and
                                                     its VRAM peak; --offload model|sequential and
                                                     --vae-tiling for its low-VRAM recipes
  python gpu_side.py flops DIR --height H --width W  UNet FLOPs per step (CFG batch of 2) and the
                                                     measured fp16 matmul rate
  python gpu_side.py compare REF_DIR DIR             8-bit error of DIR's PNGs against REF_DIR's

Speed does not depend on weight values, so the weights are random (seeded); the tokenizers are
the small ones of our test fixture (token ids do not change the cost). Every command prints one
JSON line last.
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "..", "tests", "fixtures", "sdxl", "tiny2", "pipeline")

# stabilityai/stable-diffusion-xl-base-1.0 configs.
UNET_FULL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
VAE_FULL = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# A small stand-in with the same block structure, to check the script on a CPU.
UNET_SMALL = dict(UNET_FULL, block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2),
                  cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=32)
VAE_SMALL = dict(VAE_FULL, block_out_channels=(16, 16, 32, 32), sample_size=256, norm_num_groups=8)
CLIP_L_SMALL = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
CLIP_G_SMALL = dict(CLIP_G, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def make(a):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from safetensors.torch import save_file

    full = a.size == "full"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if os.path.isdir(a.dir):
        shutil.rmtree(a.dir)
    os.makedirs(a.dir)
    with torch.device(dev):
        unet = UNet2DConditionModel(**(UNET_FULL if full else UNET_SMALL))
        vae = AutoencoderKL(**(VAE_FULL if full else VAE_SMALL))
        te1 = CLIPTextModel(CLIPTextConfig(**(CLIP_L if full else CLIP_L_SMALL)))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_G if full else CLIP_G_SMALL)))
    # Default inits compound over 70 transformer blocks; shrink so f16 activations stay finite.
    with torch.no_grad():
        for m in (unet, te1, te2):
            for n, p in m.named_parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        m.to(torch.float16).save_pretrained(os.path.join(a.dir, name), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(os.path.join(FIXTURE, name), os.path.join(a.dir, name))
    shutil.copy(os.path.join(FIXTURE, "model_index.json"), a.dir)
    # Two random kohya-format LoRAs (rank 16) on every attention projection of the UNet.
    os.makedirs(os.path.join(a.dir, "loras"), exist_ok=True)
    targets = [n for n, mod in unet.named_modules() if isinstance(mod, torch.nn.Linear)
               and any(n.endswith(s) for s in ("to_q", "to_k", "to_v", "to_out.0"))]
    for li, lname in enumerate(("subject", "style")):
        g = torch.Generator().manual_seed(100 + li)
        sd = {}
        for n in targets:
            mod = unet.get_submodule(n)
            key = "lora_unet_" + n.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = (torch.randn(16, mod.in_features, generator=g) * 0.01).half()
            sd[f"{key}.lora_up.weight"] = (torch.randn(mod.out_features, 16, generator=g) * 0.01).half()
            sd[f"{key}.alpha"] = torch.tensor(16.0).half()
        save_file(sd, os.path.join(a.dir, "loras", f"{lname}.safetensors"),
                  metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "16", "ss_network_alpha": "16"})
    params = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"dir": a.dir, "unet_params": params, "lora_targets": len(targets)}))


def diffusers_time(a):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    if a.offload != "none" and dev != "cuda":
        sys.exit(f"--offload {a.offload}: diffusers' offload needs an accelerator, and this machine has none")
    if a.offload != "none":
        try:
            import accelerate  # noqa: F401  (diffusers' offload hooks)
        except ImportError:
            sys.exit(f"--offload {a.offload}: diffusers' offload needs the accelerate package "
                     "(pip download --no-deps accelerate into .whl/)")
    pipe = StableDiffusionXLPipeline.from_pretrained(a.dir, torch_dtype=dtype)
    # diffusers' low-VRAM recipes: each model moves to the GPU only while it runs ("model"), or
    # each submodule does ("sequential"); both need an accelerator.
    if a.offload == "model":
        pipe.enable_model_cpu_offload()
    elif a.offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe = pipe.to(dev)
    if a.vae_tiling:
        # The pipeline-level enable_vae_tiling is gone in diffusers 0.42. Its default tile is the
        # VAE's sample_size (1024 px), which a 1024² image does not exceed, so nothing would be
        # tiled: 512-pixel tiles, as our --low-memory uses.
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = 512
        pipe.vae.tile_latent_min_size = 64
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    attn = type(next(iter(pipe.unet.attn_processors.values()))).__name__
    if a.lora:
        for i, path in enumerate(a.lora):
            pipe.load_lora_weights(path, adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(a.lora))], [1.0] * len(a.lora))
        # diffusers' "merge": fuse the weighted sum into the weights once, then run the plain UNet.
        pipe.fuse_lora(adapter_names=[f"l{i}" for i in range(len(a.lora))])
    kw = dict(prompt="a photo", num_inference_steps=a.steps, guidance_scale=a.cfg, height=a.height, width=a.width)

    def once():
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(**kw, generator=torch.Generator(dev).manual_seed(0))
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()  # warm-up (kernel selection, allocator)
    times = sorted(once() for _ in range(a.iters))
    # Allocated is what tensors held at the peak; reserved adds the caching allocator's slack, and
    # is the figure to set beside nvidia-smi's (which adds the CUDA context on top).
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if dev == "cuda" else None
    print(json.dumps({"seconds_per_image": times[len(times) // 2], "attention": attn, "peak_gib": peak,
                      "peak_reserved_gib": reserved, "offload": a.offload, "vae_tiling": a.vae_tiling,
                      "torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}))


def flops(a):
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(a.dir, subfolder="unet", torch_dtype=dtype).to(dev).eval()
    c = unet.config
    h, w = a.height // 8, a.width // 8
    x = torch.randn(2, c.in_channels, h, w, device=dev, dtype=dtype)
    ctx = torch.randn(2, 77, c.cross_attention_dim, device=dev, dtype=dtype)
    proj = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, proj, device=dev, dtype=dtype),
             "time_ids": torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]] * 2, device=dev, dtype=dtype)}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)
    step_flops = counter.get_total_flops()
    # The machine's dense fp16 matmul rate, measured (not the datasheet's).
    n = 8192 if dev == "cuda" else 512
    m1 = torch.randn(n, n, device=dev, dtype=dtype)
    m2 = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        m1 @ m2
    if dev == "cuda":
        torch.cuda.synchronize()
    reps = 20 if dev == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        m1 @ m2
    if dev == "cuda":
        torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - t)
    print(json.dumps({"unet_flops_per_step": step_flops, "matmul_flops_per_second": rate,
                      "floor_seconds_per_step": step_flops / rate}))


def compare(a):
    """The error a reduced-precision decode adds: the same seeds' images of two runs, as 8-bit
    levels (what the user keeps). Only the VAE's precision differs between the runs, so this is
    its error; the worst image's PSNR is the headline."""
    import numpy as np
    from PIL import Image

    names = sorted(n for n in os.listdir(a.reference) if n.endswith(".png"))
    if not names:
        sys.exit(f"{a.reference}: no PNG images to compare")
    psnr, mean_abs, max_abs = [], [], 0
    for n in names:
        other = os.path.join(a.candidate, n)
        if not os.path.exists(other):
            sys.exit(f"{other}: missing (the reference run wrote {n})")
        x = np.asarray(Image.open(os.path.join(a.reference, n)).convert("RGB"), dtype=np.float64)
        y = np.asarray(Image.open(other).convert("RGB"), dtype=np.float64)
        d = np.abs(x - y)
        mse = float((d ** 2).mean())
        psnr.append(float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
        mean_abs.append(float(d.mean()))
        max_abs = max(max_abs, int(d.max()))
    print(json.dumps({"images": len(names), "worst_psnr_db": min(psnr), "mean_abs_levels": sum(mean_abs) / len(mean_abs),
                      "max_abs_levels": max_abs}))


def ncu_summary(a):
    """Total GPU time per kernel name from `ncu --print-summary per-kernel --csv` (the CSV block
    after ncu's own log lines), largest first, with the share of the whole."""
    import csv
    import io

    lines = open(a.csv, encoding="utf-8", errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if "Kernel Name" in l or "Function Name" in l), None)
    if start is None:
        print("no per-kernel table in", a.csv)
        return 1
    rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    name_col = next(c for c in rows[0] if c in ("Kernel Name", "Function Name"))
    unit_to_ns = {"nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}
    totals = {}
    for r in rows:
        if "duration" not in r.get("Metric Name", "gpu__time_duration"):
            continue
        avg = float(str(r.get("Average", r.get("Metric Value", "0"))).replace(",", ""))
        n = int(str(r.get("Invocations", "1")).replace(",", ""))
        ns = avg * unit_to_ns.get(r.get("Metric Unit", "nsecond"), 1) * n
        name = r[name_col].split("(")[0][:90]
        t, c = totals.get(name, (0.0, 0))
        totals[name] = (t + ns, c + n)
    whole = sum(t for t, _ in totals.values())
    print(f"| kernel | calls | ms | share |  (one step + text encoders + VAE decode: {whole / 1e6:.1f} ms GPU time)")
    print("|---|---|---|---|")
    for name, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"| {name} | {c} | {t / 1e6:.2f} | {100 * t / whole:.1f}% |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--size", choices=["full", "small"], default="full")
    d = sub.add_parser("diffusers")
    d.add_argument("dir")
    d.add_argument("--lora", action="append", default=[])
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--cfg", type=float, default=5.0)
    d.add_argument("--iters", type=int, default=2)
    d.add_argument("--offload", choices=["none", "model", "sequential"], default="none")
    d.add_argument("--vae-tiling", action="store_true")
    f = sub.add_parser("flops")
    f.add_argument("dir")
    for p in (d, f):
        p.add_argument("--height", type=int, default=1024)
        p.add_argument("--width", type=int, default=1024)
    c = sub.add_parser("compare")
    c.add_argument("reference")
    c.add_argument("candidate")
    n = sub.add_parser("ncu-summary")
    n.add_argument("csv")
    n.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    return {"make": make, "diffusers": diffusers_time, "flops": flops, "ncu-summary": ncu_summary, "compare": compare}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
