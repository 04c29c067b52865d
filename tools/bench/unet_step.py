"""diffusers side of `loramix bench`: seconds per SDXL UNet step (CFG batch of 2) on CPU.

python tools/bench/unet_step.py --unet DIR --height H --width W --threads T --iters N
If DIR does not exist and --create SHAPE is given (mid, mid2, conv), writes a random-weight
SDXL-architecture UNet of that shape there first (seed 0), so the Rust side times the very same weights.
Prints one JSON line.

With --serve (`loramix bench --alternate`), it loads and warms the UNet, prints {"ready": ..., "params": ...},
then runs one timed step per "step" line on stdin and answers {"seconds": ...} for each, so that the caller can
alternate its own steps with ours under the same conditions; at end of input it prints its peak RSS and exits.
"""
import argparse, json, os, time
import torch
from diffusers import UNet2DConditionModel

MID = dict(block_out_channels=(160, 320, 640), layers_per_block=2, sample_size=64,
           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
           attention_head_dim=(5, 5, 10), transformer_layers_per_block=(1, 2, 4), use_linear_projection=True,
           cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
           projection_class_embeddings_input_dim=2816, in_channels=4, out_channels=4)
# Issue 19's mid-size shape: real SDXL widths (cross-attention 2048, head dim 64), one layer per block.
MID2 = dict(MID, block_out_channels=(128, 256, 512), layers_per_block=1, attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2))
# A second family: fewer transformer blocks, more convolution (attention at the lowest level only).
CONV = dict(MID, block_out_channels=(128, 256, 512), layers_per_block=2, attention_head_dim=(2, 4, 8),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 1))
SHAPES = {"mid": MID, "mid2": MID2, "conv": CONV}

ap = argparse.ArgumentParser()
ap.add_argument("--unet", required=True)
ap.add_argument("--height", type=int, required=True)
ap.add_argument("--width", type=int, required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--create", choices=sorted(SHAPES))
ap.add_argument("--profile", action="store_true", help="also time the iterations under torch.profiler and print ms per step by op kind")
ap.add_argument("--serve", action="store_true", help="time one step per 'step' line on stdin (see the module doc)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
if not os.path.isdir(a.unet):
    if not a.create:
        raise SystemExit(f"{a.unet}: no such UNet folder")
    torch.manual_seed(0)
    UNet2DConditionModel(**SHAPES[a.create]).save_pretrained(a.unet, safe_serialization=True)
unet = UNet2DConditionModel.from_pretrained(a.unet, torch_dtype=torch.float32).eval()
c = unet.config
g = torch.Generator().manual_seed(0)
x = torch.randn(2, c.in_channels, a.height, a.width, generator=g)
ctx = torch.randn(2, 77, c.cross_attention_dim, generator=g)
proj = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
added = {"text_embeds": torch.randn(2, proj, generator=g), "time_ids": torch.tensor([[8.0 * a.height, 8.0 * a.width, 0, 0, 8.0 * a.height, 8.0 * a.width]] * 2)}
import resource, sys


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if a.serve:
    with torch.no_grad():
        unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)  # warm-up
        print(json.dumps({"ready": True, "params": sum(p.numel() for p in unet.parameters())}), flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                raise SystemExit(f"--serve: expected 'step' on stdin, got {line.strip()!r}")
            t = time.perf_counter()
            unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)
            print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
    raise SystemExit(0)

times = []
with torch.no_grad():
    unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)  # warm-up
    for _ in range(a.iters):
        t = time.perf_counter()
        unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)
        times.append(time.perf_counter() - t)
times.sort()
result = {"seconds_per_step": times[len(times) // 2], "params": sum(p.numel() for p in unet.parameters()),
          "attention": type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}


def op_kind(name, shapes):
    """The op kinds of `loramix bench --profile` (kernels/src/profile.rs), from aten names."""
    if name in ("aten::mkldnn_convolution", "aten::slow_conv2d_forward", "aten::thnn_conv2d"):
        k = shapes[1][2:] if len(shapes) > 1 and len(shapes[1]) == 4 else None
        return {(1, 1): "conv 1x1", (3, 3): "conv 3x3"}.get(tuple(k) if k else None, "conv (other)")
    return {"aten::addmm": "linear", "aten::mm": "linear",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
            "aten::native_group_norm": "group norm (+SiLU)", "aten::silu": "group norm (+SiLU)",
            "aten::native_layer_norm": "layer norm", "aten::gelu": "GEGLU"}.get(name, "other")


if a.profile:
    from torch.profiler import profile, ProfilerActivity
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(a.iters):
            unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added)
    ops = {}
    for e in prof.key_averages(group_by_input_shape=True):
        kind = op_kind(e.key, e.input_shapes)
        ops[kind] = ops.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / a.iters
    result["ms_per_step_by_op"] = ops
result["peak_rss_mb"] = peak_rss_mb()
print(json.dumps(result))
