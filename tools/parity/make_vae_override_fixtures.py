"""Goldens for --vae (issue 17): a second tiny VAE (same architecture, other random weights,
force_upcast false like sdxl-vae-fp16-fix) in a diffusers folder and as an LDM-named single file
without the checkpoint prefix (as sdxl_vae.safetensors ships); diffusers decodes a seeded run
of tests/fixtures/sdxl/tiny2 with it (output_type="np", float pixels).

python tools/parity/make_vae_override_fixtures.py   (writes tests/fixtures/sdxl/tiny2/vae_override/)
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_single_file_fixtures import vae_to_sgm  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
OUT = os.path.join(TINY, "vae_override")


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(TINY, "pipeline"), torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cfg = dict(pipe.vae.config)
    cfg["force_upcast"] = False
    torch.manual_seed(123)
    vae = AutoencoderKL.from_config(cfg)
    vae.save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)
    ldm = {k[len("first_stage_model."):]: v.contiguous() for k, v in vae_to_sgm(vae.state_dict(), cfg).items()}
    save_file(ldm, os.path.join(OUT, "vae_ldm.safetensors"))
    pipe.vae = vae
    case = dict(prompt="a red house", negative=None, steps=5, cfg=5.0, seed=9, batch=1, sampler="euler")
    with torch.no_grad():
        img = pipe(prompt=case["prompt"], num_inference_steps=case["steps"], guidance_scale=case["cfg"], height=32, width=32,
                   output_type="np", generator=torch.Generator("cpu").manual_seed(case["seed"])).images
    save_file({"pixels": torch.from_numpy(img).contiguous()}, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(case, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
