"""Builds tiny random-weight SDXL pipelines in the exact diffusers layout and writes goldens.

Run: python tools/parity/make_sdxl_fixtures.py  (from the repo root; see requirements.txt)

Writes tests/fixtures/sdxl/<config>/ with:
  pipeline/            a diffusers folder (model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/)
  golden.safetensors   module-level inputs and outputs (encoders, UNet, VAE) and pipeline latents
  golden.json          token ids, scheduler timesteps/sigmas, and the pipeline cases (names -> settings)
Every golden is computed by diffusers / transformers themselves, in float32 on CPU.
"""
import json, os, shutil, sys
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel)

torch.set_num_threads(2)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "sdxl")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "painting", "in", "style", "watercolor",
         "house", "tree", "green", "big", "small", "on", "with", "and", "masterpiece", "blurry", "ugly", "sks",
         "landscape", "mountain", "river", "sunset", "portrait", "woman", "man", "city", "night", "emblem"]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(folder, words):
    """A CLIP-style byte-level BPE: every byte symbol (bare and end-of-word), merges that build
    each listed word left to right, then the two special tokens last (as in CLIP)."""
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:
        sym = list(w)
        sym[-1] += "</w>"
        while len(sym) > 1:
            m = f"{sym[0]} {sym[1]}"
            if m not in merges:
                merges.append(m)
                vocab.append(sym[0] + sym[1])
            sym = [sym[0] + sym[1]] + sym[2:]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def make_tokenizer(folder, words, pad_token, fast_json):
    n = write_clip_vocab(folder, words)
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        pad_token=pad_token, model_max_length=77)
    if fast_json:
        # The layout transformers 5 writes: tokenizer.json only.
        for f in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(folder, f))
        tok.save_pretrained(folder)
    else:
        # The layout of the real SDXL repos: vocab.json + merges.txt + configs.
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                       "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": pad_token}, f, indent=2)
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": pad_token}, f, indent=2)
    return n


CONFIGS = {
    # Two-level UNet, linear projections, CLIP-L quick_gelu + CLIP-G gelu, legacy eos_token_id=2,
    # tokenizer as vocab.json + merges.txt.
    "tiny2": dict(
        te1=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu"),
        te2=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, hidden_act="gelu", projection_dim=32),
        legacy_eos=True, fast_json=False,
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                  addition_time_embed_dim=8, norm_num_groups=8),
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
        size=(32, 32)),
    # Three-level UNet with different text widths (48 + 32 = 80), conv projections, real eos id,
    # tokenizer.json only, a VAE with a 4x downscale.
    "tiny3": dict(
        te1=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"),
        te2=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=2, hidden_act="gelu", projection_dim=24),
        legacy_eos=False, fast_json=True,
        unet=dict(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=False,
                  addition_time_embed_dim=16, norm_num_groups=8),
        vae=dict(block_out_channels=[16, 16, 32], layers_per_block=2, norm_num_groups=8,
                 down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3),
        size=(48, 40)),
}

PROMPTS = ["a photo of a cat", "A Red  house, on the hill!!", "", "sks emblem in watercolor style, blurry 123",
           "the big blue dog and the small green tree " * 3]


def build(name, c, seed):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    pdir = os.path.join(out, "pipeline")
    torch.manual_seed(seed)
    vsz = make_tokenizer(os.path.join(pdir, "tokenizer"), WORDS, "<|endoftext|>", c["fast_json"])
    make_tokenizer(os.path.join(pdir, "tokenizer_2"), WORDS, "!", c["fast_json"])
    eos = 2 if c["legacy_eos"] else vsz - 1
    common = dict(vocab_size=vsz, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=vsz - 2,
                  eos_token_id=eos, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(**common, **c["te1"])).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **c["te2"])).eval()
    proj = c["te2"]["projection_dim"]
    u = dict(c["unet"])
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=c["te1"]["hidden_size"] + c["te2"]["hidden_size"],
                                addition_embed_type="text_time",
                                projection_class_embeddings_input_dim=u["addition_time_embed_dim"] * 6 + proj, **u).eval()
    # Random init leaves many zero-initialised convs (diffusers zero-inits nothing here, but
    # make every parameter non-trivial so a wrong wiring cannot hide).
    with torch.no_grad():
        for p in list(unet.parameters()) + list(te1.parameters()) + list(te2.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=c["size"][0],
                        scaling_factor=0.13025, force_upcast=True, **c["vae"]).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                   timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    tok1 = CLIPTokenizer.from_pretrained(os.path.join(pdir, "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(os.path.join(pdir, "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    # Keep the tokenizer folders exactly as written above (save_pretrained would rewrite them).
    tmp = pdir + ".tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        shutil.move(os.path.join(tmp, sub), os.path.join(pdir, sub))
    shutil.move(os.path.join(tmp, "model_index.json"), os.path.join(pdir, "model_index.json"))
    shutil.rmtree(tmp)
    pipe = StableDiffusionXLPipeline.from_pretrained(pdir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return out, pipe


def goldens(out, pipe, c, seed):
    g = {}
    js = {"tokens": {}, "schedulers": {}, "pipeline": {}}
    gen = torch.Generator().manual_seed(seed)
    for p in PROMPTS:
        ids1 = pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids
        ids2 = pipe.tokenizer_2(p, padding="max_length", max_length=77, truncation=True).input_ids
        raw = pipe.tokenizer(p, add_special_tokens=False).input_ids
        js["tokens"][p] = {"tokenizer": ids1, "tokenizer_2": ids2, "raw": raw}
    with torch.no_grad():
        # Encoders on one prompt: hidden states of every layer and the pooled outputs.
        p = "a photo of a cat"
        ids1 = torch.tensor([js["tokens"][p]["tokenizer"]])
        ids2 = torch.tensor([js["tokens"][p]["tokenizer_2"]])
        o1 = pipe.text_encoder(ids1, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        g["te1.penultimate"] = o1.hidden_states[-2][0]
        g["te1.last"] = o1.last_hidden_state[0]
        g["te1.pooled"] = o1.pooler_output[0]
        g["te2.penultimate"] = o2.hidden_states[-2][0]
        g["te2.text_embeds"] = o2.text_embeds[0]
        pe, npe, pp, npp = pipe.encode_prompt(p, negative_prompt="blurry", do_classifier_free_guidance=True)
        g["encode.prompt_embeds"] = pe[0]
        g["encode.pooled"] = pp[0]
        g["encode.negative_prompt_embeds"] = npe[0]
        g["encode.negative_pooled"] = npp[0]
        # UNet on fixed inputs, batch of 2 with different timesteps handled one at a time.
        h, w = c["size"]
        f = pipe.vae_scale_factor
        x = torch.randn(2, 4, h // f, w // f, generator=gen)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)
        te = torch.randn(2, c["te2"]["projection_dim"], generator=gen)
        tid = torch.tensor([[h, w, 0, 0, h, w], [2 * h, w, 3, 5, h, w]], dtype=torch.float32)
        g["unet.sample"], g["unet.context"], g["unet.text_embeds"], g["unet.time_ids"] = x, ctx, te, tid
        for t in (999.0, 421.0, 1.0):
            g[f"unet.out.t{int(t)}"] = pipe.unet(x, torch.tensor(t), encoder_hidden_states=ctx,
                                                 added_cond_kwargs={"text_embeds": te, "time_ids": tid}).sample
        # VAE decode of fixed latents, encode of a fixed image.
        z = torch.randn(1, 4, h // f, w // f, generator=gen)
        g["vae.latents"] = z
        g["vae.decoded"] = pipe.vae.decode(z).sample
        img = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
        dist = pipe.vae.encode(img).latent_dist
        g["vae.image"], g["vae.enc_mean"], g["vae.enc_logvar"] = img, dist.mean, dist.logvar

    # Schedulers: from the folder's config, as users switch samplers.
    cfg = pipe.scheduler.config
    samplers = {
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
        "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "ddim": (DDIMScheduler, {}),
    }
    for sname, (cls, kw) in samplers.items():
        js["schedulers"][sname] = {}
        for steps in (1, 4, 7, 25, 30, 50):
            s = cls.from_config(cfg, **kw)
            s.set_timesteps(steps)
            e = {"timesteps": [float(t) for t in s.timesteps]}
            if hasattr(s, "sigmas"):
                e["sigmas"] = [float(x) for x in s.sigmas]
            e["init_noise_sigma"] = float(s.init_noise_sigma)
            js["schedulers"][sname][str(steps)] = e

    # Full pipeline: final latents from given init noise (and from a torch CPU generator seed).
    h, w = c["size"]
    f = pipe.vae_scale_factor
    cases = []
    for sname in ("euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim"):
        cases.append(dict(sampler=sname, steps=6, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1))
    cases += [
        dict(sampler="euler", steps=5, cfg=1.0, prompt="a red house", negative=None, batch=1),
        dict(sampler="euler", steps=5, cfg=7.0, prompt="a red house", negative="blurry, ugly", batch=1),
        dict(sampler="dpmpp_2m", steps=8, cfg=3.0, prompt="sks emblem in watercolor style", negative="", batch=2),
        dict(sampler="ddim", steps=4, cfg=1.0, prompt="a blue dog", negative="blurry", batch=1),
        dict(sampler="euler_a", steps=5, cfg=5.0, prompt="a photo of a dog", negative=None, batch=1, seed=1234),
        dict(sampler="euler", steps=4, cfg=4.0, prompt="a green tree", negative=None, batch=2, seed=7),
    ]
    for i, case in enumerate(cases):
        cls, kw = samplers[case["sampler"]]
        pipe.scheduler = cls.from_config(cfg, **kw)
        key = f"pipe{i}"
        args = dict(prompt=case["prompt"], negative_prompt=case["negative"], num_inference_steps=case["steps"],
                    guidance_scale=case["cfg"], height=h, width=w, num_images_per_prompt=case["batch"],
                    output_type="latent")
        with torch.no_grad():
            if "seed" in case:
                lat = pipe(**args, generator=torch.Generator("cpu").manual_seed(case["seed"])).images
            else:
                noise = torch.randn(case["batch"], 4, h // f, w // f, generator=gen)
                g[f"{key}.init_noise"] = noise
                lat = pipe(**args, latents=noise.clone()).images
        g[f"{key}.latents"] = lat
        js["pipeline"][key] = case
    # One decoded image through the pipeline's own post-processing (uint8 values as float).
    pipe.scheduler = EulerDiscreteScheduler.from_config(cfg)
    with torch.no_grad():
        noise = torch.randn(1, 4, h // f, w // f, generator=gen)
        img = pipe(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=5.0, height=h, width=w,
                   latents=noise.clone(), output_type="np").images[0]
    g["image.init_noise"] = noise
    g["image.pixels"] = torch.from_numpy((img * 255).round().astype(np.float32))
    js["image"] = dict(sampler="euler", steps=3, cfg=5.0, prompt="a photo of a cat", negative=None, batch=1)
    save_file({k: v.contiguous().float() for k, v in g.items()}, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as fh:
        json.dump(js, fh, indent=1)


if __name__ == "__main__":
    only = sys.argv[1:] or list(CONFIGS)
    for i, name in enumerate(CONFIGS):
        if name in only:
            out, pipe = build(name, CONFIGS[name], 100 + i)
            goldens(out, pipe, CONFIGS[name], 200 + i)
            print("wrote", out)
