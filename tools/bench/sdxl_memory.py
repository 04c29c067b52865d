"""diffusers' side of `loramix bench --suite sdxl-memory`: one SDXL generation from a single-file
checkpoint, then its peak resident memory as JSON on stdout.

    python tools/bench/sdxl_memory.py CHECKPOINT CONFIG_DIR --size 1024 --steps 1 --dtype f16 --mode plain

Modes: plain; vae_tiling (enable_vae_tiling with 512-pixel tiles, as our --low-memory);
model_offload / sequential_offload (enable_model_cpu_offload / enable_sequential_cpu_offload,
which move models to an accelerator and back: on a machine without one they fail, and the JSON
says why).
"""
import argparse, json, resource, sys, time

import torch
from diffusers import StableDiffusionXLPipeline


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("config")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--dtype", default="f16")
    p.add_argument("--mode", default="plain")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"f16": torch.float16, "f32": torch.float32}[a.dtype]
    t0 = time.time()
    pipe = StableDiffusionXLPipeline.from_single_file(a.checkpoint, config=a.config, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    out = {"mode": a.mode}
    try:
        if a.mode == "vae_tiling":
            pipe.vae.enable_tiling()  # the pipeline-level enable_vae_tiling is gone in diffusers 0.42
            pipe.vae.tile_sample_min_size = 512
            pipe.vae.tile_latent_min_size = 64
        elif a.mode == "model_offload":
            pipe.enable_model_cpu_offload()
        elif a.mode == "sequential_offload":
            pipe.enable_sequential_cpu_offload()
        elif a.mode != "plain":
            raise ValueError(f"unknown mode {a.mode}")
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=a.steps, height=a.size, width=a.size, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(1))
        out["seconds"] = time.time() - t0
    except Exception as e:  # offload without an accelerator: report, do not crash the bench
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
