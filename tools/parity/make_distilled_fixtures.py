"""Goldens for the few-step recipes of distilled SDXL models and LoRAs (issue 17), as their model
cards run them in diffusers, on tests/fixtures/sdxl/tiny2 with the LoRA fixtures of
make_lora_fixtures.py standing in for the distilled LoRAs (tiny random weights; the recipe, not
the weights, is what is checked):

  lightning       SDXL-Lightning LoRA: EulerDiscreteScheduler(timestep_spacing="trailing"), 4 steps, CFG 0
  lightning_mix   the same LoRA merged with a subject and a style LoRA (set_adapters weights)
  hyper_ddim      Hyper-SD LoRA: DDIMScheduler(timestep_spacing="trailing"), 4 steps, CFG 0
  lcm_lora        LCM-LoRA: LCMScheduler, 4 steps, CFG 1
  turbo           SDXL-Turbo: EulerAncestralDiscreteScheduler(timestep_spacing="trailing"), 1 step, CFG 0

python tools/parity/make_distilled_fixtures.py   (writes tests/fixtures/sdxl/tiny2/distilled/golden.{json,safetensors};
not beside the LoRAs, whose folder the library-import tests import whole)
"""
import json
import os
import sys

import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       StableDiffusionXLPipeline)
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_lora_fixtures import OUT as LORAS, PIPE, patch_text_encoder_adapters  # noqa: E402

CASES = {
    "lightning": dict(scheduler="euler", spacing="trailing", steps=4, cfg=0.0, loras=[["kohya_sgm", 1.0]], seed=31),
    "lightning_mix": dict(scheduler="euler", spacing="trailing", steps=4, cfg=0.0,
                          loras=[["kohya_sgm", 1.0], ["kohya_diffusers", 0.8], ["peft", 0.6]], seed=32),
    "hyper_ddim": dict(scheduler="ddim", spacing="trailing", steps=4, cfg=0.0, loras=[["kohya_sgm", 1.0]], seed=33),
    "lcm_lora": dict(scheduler="lcm", spacing=None, steps=4, cfg=1.0, loras=[["peft", 1.0]], seed=34),
    "turbo": dict(scheduler="euler_a", spacing="trailing", steps=1, cfg=0.0, loras=[], seed=35),
}
CLASSES = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "lcm": LCMScheduler, "euler_a": EulerAncestralDiscreteScheduler}


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)
    base = dict(pipe.scheduler.config)
    for name in ("kohya_sgm", "kohya_diffusers", "peft"):
        pipe.load_lora_weights(LORAS, weight_name=f"{name}.safetensors", adapter_name=name)
        patch_text_encoder_adapters(pipe, os.path.join(LORAS, f"{name}.safetensors"), name)
    g, js = {}, {}
    for case, c in CASES.items():
        extra = {"timestep_spacing": c["spacing"]} if c["spacing"] else {}
        pipe.scheduler = CLASSES[c["scheduler"]].from_config(base, **extra)
        if c["loras"]:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in c["loras"]], adapter_weights=[w for _, w in c["loras"]])
        else:
            pipe.disable_lora()
        with torch.no_grad():
            lat = pipe(prompt="a photo of a cat", num_inference_steps=c["steps"], guidance_scale=c["cfg"], height=32, width=32,
                       output_type="latent", generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        g[f"{case}.latents"] = lat.contiguous()
        js[case] = c
    out = os.path.join(os.path.dirname(PIPE), "distilled")
    os.makedirs(out, exist_ok=True)
    save_file(g, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(js, f, indent=1)
    print(json.dumps(js))


if __name__ == "__main__":
    main()
