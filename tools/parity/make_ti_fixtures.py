"""Goldens for textual-inversion embeddings (issue 17): diffusers' `load_textual_inversion` on
both SDXL encoders of tests/fixtures/sdxl/tiny2, from an A1111/Civitai file (`clip_l`, `clip_g`)
and a diffusers pair (`learned_embeds.safetensors`, `learned_embeds_2.safetensors`).

python tools/parity/make_ti_fixtures.py   (writes tests/fixtures/sdxl/tiny2/ti/)

The embeddings are random, scaled like the encoders' own token embeddings. They are loaded in
the order vloxemb, shinystyle, so their vectors take ids 640-641 and 642-644 after the tiny
vocabulary (what the Rust test passes, in the same order).
"""
import json
import os

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "sdxl", "tiny2")
OUT = os.path.join(ROOT, "ti")


def main():
    torch.set_num_threads(2)
    torch.manual_seed(17)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    s1 = pipe.text_encoder.get_input_embeddings().weight.std().item()
    s2 = pipe.text_encoder_2.get_input_embeddings().weight.std().item()
    w1 = pipe.text_encoder.config.hidden_size
    w2 = pipe.text_encoder_2.config.hidden_size
    os.makedirs(OUT, exist_ok=True)
    # A1111 / Civitai layout: the file stem is the name.
    a1111 = {"clip_l": (torch.randn(2, w1) * s1 * 3).contiguous(), "clip_g": (torch.randn(2, w2) * s2 * 3).contiguous()}
    save_file(a1111, os.path.join(OUT, "vloxemb.safetensors"))
    # diffusers' textual_inversion_sdxl.py layout: a folder with one file per encoder.
    d = os.path.join(OUT, "shinystyle")
    os.makedirs(d, exist_ok=True)
    save_file({"shinystyle": (torch.randn(3, w1) * s1 * 3).contiguous()}, os.path.join(d, "learned_embeds.safetensors"))
    save_file({"shinystyle": (torch.randn(3, w2) * s2 * 3).contiguous()}, os.path.join(d, "learned_embeds_2.safetensors"))

    sd = load_file(os.path.join(OUT, "vloxemb.safetensors"))
    pipe.load_textual_inversion(sd["clip_l"], token="vloxemb", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="vloxemb", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    e1 = load_file(os.path.join(d, "learned_embeds.safetensors"))["shinystyle"]
    e2 = load_file(os.path.join(d, "learned_embeds_2.safetensors"))["shinystyle"]
    pipe.load_textual_inversion(e1, token="shinystyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(e2, token="shinystyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

    g, js = {}, {"embeds": {}, "pipeline": {}, "order": ["vloxemb.safetensors", "shinystyle"]}
    embeds = [("e0", "a vloxemb on a cream background", "shinystyle, blurry"),
              ("e1", "shinystyle vloxemb, a red house", None),
              ("e2", "a (vloxemb:1.3) and a house", "")]
    for key, prompt, negative in embeds:
        with torch.no_grad():
            pe, ne, pp, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negative)
        ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
        g[f"{key}.prompt"] = pe.contiguous()
        g[f"{key}.negative"] = ne.contiguous()
        g[f"{key}.pooled"] = pp.contiguous()
        js["embeds"][key] = {"prompt": prompt, "negative": negative, "ids": ids}
    # Emphasis is A1111's, not diffusers': e2 is compared only where it has none (the Rust test
    # checks the weighted one differs); its prompt is encoded here without the brackets.
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt("a vloxemb and a house", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    g["e2plain.prompt"] = pe.contiguous()
    cases = [dict(prompt="a vloxemb on a cream background", negative="shinystyle", steps=5, cfg=5.0, seed=21, batch=1),
             dict(prompt="shinystyle, a vloxemb", negative=None, steps=4, cfg=4.0, seed=22, batch=2)]
    for i, c in enumerate(cases):
        with torch.no_grad():
            lat = pipe(prompt=c["prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"], guidance_scale=c["cfg"],
                       height=32, width=32, num_images_per_prompt=c["batch"], output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(c["seed"])).images
        c["sampler"] = "euler"
        g[f"run{i}.latents"] = lat.contiguous()
        js["pipeline"][f"run{i}"] = c
    save_file(g, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", OUT, json.dumps(js["embeds"], indent=None))


if __name__ == "__main__":
    main()
