"""Reference re-implementation of AUTOMATIC1111 stable-diffusion-webui 1.10
/sdapi/v1/png-info `parameters`:

    params = infotext_utils.parse_generation_parameters(geninfo)
    script_callbacks.infotext_pasted_callback(geninfo, params)

Written by hand from the 1.10 sources (no web-UI import). Default options:
infotext_styles="Apply if any", use_old_hires_fix_width_height=False,
auto_backcompat=True, infotext_skip_pasting=[].

Writes tests/fixtures/image_info/generation_parameters.json: each case (infotext, styles.csv rows,
LoRAs known by short hash) and what A1111 answers: the dict's pairs in order, or the error it
raises. Run: python tools/parity/make_generation_parameters_fixtures.py (with `packaging`).
"""
from __future__ import annotations

import json
import math
import re
import sys
import typing

from packaging import version


# ---------------------------------------------------------------- options
class _Opts:
    infotext_styles = "Apply if any"
    use_old_hires_fix_width_height = False
    auto_backcompat = True
    infotext_skip_pasting: list = []
    lora_preferred_name = "Alias from file"


opts = _Opts()


# ---------------------------------------------------------------- modules/processing.py
def old_hires_fix_first_pass_dimensions(width, height):
    """old algorithm for auto-calculating first pass size"""

    desired_pixel_count = 512 * 512
    actual_pixel_count = width * height
    scale = math.sqrt(desired_pixel_count / actual_pixel_count)
    width = math.ceil(scale * width / 64) * 64
    height = math.ceil(scale * height / 64) * 64

    return width, height


# ---------------------------------------------------------------- modules/prompt_parser.py
from a1111_prompt_parser import parse_prompt_attention  # noqa: E402


# ---------------------------------------------------------------- modules/infotext_versions.py
v160 = version.parse("1.6.0")
v170_tsnr = version.parse("v1.7.0-225")
v180 = version.parse("1.8.0")
v180_hr_styles = version.parse("1.8.0-139")


def parse_version(text):
    if text is None:
        return None

    m = re.match(r'([^-]+-[^-]+)-.*', text)
    if m:
        text = m.group(1)

    try:
        return version.parse(text)
    except Exception:
        return None


def backcompat(d):
    """Checks infotext Version field, and enables backwards compatibility options according to it."""

    if not opts.auto_backcompat:
        return

    ver = parse_version(d.get("Version"))
    if ver is None:
        return

    if ver < v160 and '[' in d.get('Prompt', ''):
        d["Old prompt editing timelines"] = True

    if ver < v160 and d.get('Sampler', '') in ('DDIM', 'PLMS'):
        d["Pad conds v0"] = True

    if ver < v170_tsnr:
        d["Downcast alphas_cumprod"] = True

    if ver < v180 and d.get('Refiner'):
        d["Refiner switch by sampling steps"] = True


# ---------------------------------------------------------------- modules/styles.py
class PromptStyle(typing.NamedTuple):
    name: str
    prompt: str | None
    negative_prompt: str | None
    path: str | None = None


def extract_style_text_from_prompt(style_text, prompt):
    stripped_prompt = prompt.strip()
    stripped_style_text = style_text.strip()

    if "{prompt}" in stripped_style_text:
        left, right = stripped_style_text.split("{prompt}", 2)
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            prompt = stripped_prompt[len(left):len(stripped_prompt)-len(right)]
            return True, prompt
    else:
        if stripped_prompt.endswith(stripped_style_text):
            prompt = stripped_prompt[:len(stripped_prompt)-len(stripped_style_text)]

            if prompt.endswith(', '):
                prompt = prompt[:-2]

            return True, prompt

    return False, prompt


def extract_original_prompts(style: PromptStyle, prompt, negative_prompt):
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt

    match_positive, extracted_positive = extract_style_text_from_prompt(style.prompt, prompt)
    if not match_positive:
        return False, prompt, negative_prompt

    match_negative, extracted_negative = extract_style_text_from_prompt(style.negative_prompt, negative_prompt)
    if not match_negative:
        return False, prompt, negative_prompt

    return True, extracted_positive, extracted_negative


class StyleDatabase:
    def __init__(self, styles_list):
        self.styles = {}
        for s in styles_list:
            self.styles[s["name"]] = PromptStyle(s["name"], s["prompt"], s["negative_prompt"], "styles.csv")

    def extract_styles_from_prompt(self, prompt, negative_prompt):
        extracted = []

        applicable_styles = list(self.styles.values())

        while True:
            found_style = None

            for style in applicable_styles:
                is_match, new_prompt, new_neg_prompt = extract_original_prompts(
                    style, prompt, negative_prompt
                )
                if is_match:
                    found_style = style
                    prompt = new_prompt
                    negative_prompt = new_neg_prompt
                    break

            if not found_style:
                break

            applicable_styles.remove(found_style)
            extracted.append(found_style.name)

        return list(reversed(extracted)), prompt, negative_prompt


# ---------------------------------------------------------------- modules/infotext_utils.py
re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text

    try:
        return json.loads(text)
    except Exception:
        return text


def restore_old_hires_fix_params(res):
    firstpass_width = res.get('First pass size-1', None)
    firstpass_height = res.get('First pass size-2', None)

    if opts.use_old_hires_fix_width_height:
        hires_width = int(res.get("Hires resize-1", 0))
        hires_height = int(res.get("Hires resize-2", 0))

        if hires_width and hires_height:
            res['Size-1'] = hires_width
            res['Size-2'] = hires_height
            return

    if firstpass_width is None or firstpass_height is None:
        return

    firstpass_width, firstpass_height = int(firstpass_width), int(firstpass_height)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))

    if firstpass_width == 0 or firstpass_height == 0:
        firstpass_width, firstpass_height = old_hires_fix_first_pass_dimensions(width, height)

    res['Size-1'] = firstpass_width
    res['Size-2'] = firstpass_height
    res['Hires resize-1'] = width
    res['Hires resize-2'] = height


def split_infotext(x: str):
    """The first part of parse_generation_parameters: the prompt and negative prompt lines, and
    the last line's `Key: value` pairs unquoted (a pair whose unquoting raises is left out, as
    A1111's loop skips it)."""
    prompt = ""
    negative_prompt = ""

    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    pairs = []
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            pairs.append((k, v))
        except Exception:
            print(f"Error parsing \"{k}: {v}\"", file=sys.stderr)
    return prompt, negative_prompt, pairs


def parse_generation_parameters(x: str, prompt_styles: StyleDatabase, skip_fields: list[str] | None = None):
    if skip_fields is None:
        skip_fields = opts.infotext_skip_pasting

    res = {}

    prompt, negative_prompt, pairs = split_infotext(x)

    for k, v in pairs:
        try:
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"", file=sys.stderr)

    # Extract styles from prompt
    if opts.infotext_styles != "Ignore":
        found_styles, prompt_no_styles, negative_prompt_no_styles = prompt_styles.extract_styles_from_prompt(prompt, negative_prompt)

        same_hr_styles = True
        if ("Hires prompt" in res or "Hires negative prompt" in res) and (infotext_ver > v180_hr_styles if (infotext_ver := parse_version(res.get("Version"))) else True):
            hr_prompt, hr_negative_prompt = res.get("Hires prompt", prompt), res.get("Hires negative prompt", negative_prompt)
            hr_found_styles, hr_prompt_no_styles, hr_negative_prompt_no_styles = prompt_styles.extract_styles_from_prompt(hr_prompt, hr_negative_prompt)
            if same_hr_styles := found_styles == hr_found_styles:
                res["Hires prompt"] = '' if hr_prompt_no_styles == prompt_no_styles else hr_prompt_no_styles
                res['Hires negative prompt'] = '' if hr_negative_prompt_no_styles == negative_prompt_no_styles else hr_negative_prompt_no_styles

        if same_hr_styles:
            prompt, negative_prompt = prompt_no_styles, negative_prompt_no_styles
            if (opts.infotext_styles == "Apply if any" and found_styles) or opts.infotext_styles == "Apply":
                res['Styles array'] = found_styles

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    # Missing CLIP skip means it was set to 1 (the default)
    if "Clip skip" not in res:
        res["Clip skip"] = "1"

    hypernet = res.get("Hypernet", None)
    if hypernet is not None:
        res["Prompt"] += f"""<hypernet:{hypernet}:{res.get("Hypernet strength", "1.0")}>"""

    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0

    if "Hires sampler" not in res:
        res["Hires sampler"] = "Use same sampler"

    if "Hires schedule type" not in res:
        res["Hires schedule type"] = "Use same scheduler"

    if "Hires checkpoint" not in res:
        res["Hires checkpoint"] = "Use same checkpoint"

    if "Hires prompt" not in res:
        res["Hires prompt"] = ""

    if "Hires negative prompt" not in res:
        res["Hires negative prompt"] = ""

    if "Mask mode" not in res:
        res["Mask mode"] = "Inpaint masked"

    if "Masked content" not in res:
        res["Masked content"] = 'original'

    if "Inpaint area" not in res:
        res["Inpaint area"] = "Whole picture"

    if "Masked area padding" not in res:
        res["Masked area padding"] = 32

    restore_old_hires_fix_params(res)

    # Missing RNG means the default was set, which is GPU RNG
    if "RNG" not in res:
        res["RNG"] = "GPU"

    if "Schedule type" not in res:
        res["Schedule type"] = "Automatic"

    if "Schedule max sigma" not in res:
        res["Schedule max sigma"] = 0

    if "Schedule min sigma" not in res:
        res["Schedule min sigma"] = 0

    if "Schedule rho" not in res:
        res["Schedule rho"] = 0

    if "VAE Encoder" not in res:
        res["VAE Encoder"] = "Full"

    if "VAE Decoder" not in res:
        res["VAE Decoder"] = "Full"

    if "FP8 weight" not in res:
        res["FP8 weight"] = "Disable"

    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False

    prompt_attention = parse_prompt_attention(prompt)
    prompt_attention += parse_prompt_attention(negative_prompt)
    prompt_uses_emphasis = len(prompt_attention) != len([p for p in prompt_attention if p[1] == 1.0 or p[0] == 'BREAK'])
    if "Emphasis" not in res and prompt_uses_emphasis:
        res["Emphasis"] = "Original"

    if "Refiner switch by sampling steps" not in res:
        res["Refiner switch by sampling steps"] = False

    backcompat(res)

    for key in skip_fields:
        res.pop(key, None)

    return res


# ---------------------------------------------------------------- extensions-builtin/Lora/networks.py
INFOTEXT_FIELDS_TXT2IMG_LABELS: list = []  # "AddNet Module 1" is not among them (additional-networks not installed)

re_network_name = re.compile(r"(.*)\s*\([0-9a-fA-F]+\)")


def networks_infotext_pasted(infotext, params):
    if "AddNet Module 1" in INFOTEXT_FIELDS_TXT2IMG_LABELS:
        return  # if the other extension is active, it will handle those fields, no need to do anything

    added = []

    for k in params:
        if not k.startswith("AddNet Model "):
            continue

        num = k[13:]

        if params.get("AddNet Module " + num) != "LoRA":
            continue

        name = params.get("AddNet Model " + num)
        if name is None:
            continue

        m = re_network_name.match(name)
        if m:
            name = m.group(1)

        multiplier = params.get("AddNet Weight A " + num, "1.0")

        added.append(f"<lora:{name}:{multiplier}>")

    if added:
        params["Prompt"] += "\n" + "".join(added)


# ---------------------------------------------------------------- extensions-builtin/Lora/scripts/lora_script.py
re_lora = re.compile("<lora:([^:]+):")


class _NetworkOnDisk:
    def __init__(self, alias):
        self.alias = alias

    def get_alias(self):
        return self.alias


def make_lora_script_infotext_pasted(available_network_hash_lookup):
    def infotext_pasted(infotext, d):
        hashes = d.get("Lora hashes")
        if not hashes:
            return

        hashes = [x.strip().split(':', 1) for x in hashes.split(",")]
        hashes = {x[0].strip().replace(",", ""): x[1].strip() for x in hashes}

        def network_replacement(m):
            alias = m.group(1)
            shorthash = hashes.get(alias)
            if shorthash is None:
                return m.group(0)

            network_on_disk = available_network_hash_lookup.get(shorthash)
            if network_on_disk is None:
                return m.group(0)

            return f'<lora:{network_on_disk.get_alias()}:'

        d["Prompt"] = re.sub(re_lora, network_replacement, d["Prompt"])

    return infotext_pasted


# ---------------------------------------------------------------- modules/script_callbacks.py
def infotext_pasted_callback(callbacks, infotext, params):
    for c in callbacks:
        try:
            c(infotext, params)
        except Exception as e:
            print(f"callback {c.__name__} raised {type(e).__name__}: {e}", file=sys.stderr)


# ---------------------------------------------------------------- driver (modules/api/api.py pnginfoapi)
def run_case(case):
    prompt_styles = StyleDatabase(case.get("styles", []))
    lookup = {h: _NetworkOnDisk(alias) for h, alias in case.get("loras", {}).items()}
    geninfo = case["infotext"]
    try:
        params = parse_generation_parameters(geninfo, prompt_styles)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    callbacks = [networks_infotext_pasted, make_lora_script_infotext_pasted(lookup)]
    infotext_pasted_callback(callbacks, geninfo, params)
    return {"pairs": [[k, v] for k, v in params.items()]}


# ---------------------------------------------------------------- cases
INFOTEXT = (
    "a café at dusk, <lora:subject_cat:0.8>, (watercolor:1.2) \U0001F600\n"
    "Negative prompt: blurry, \"low quality\"\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1234, Size: 24x16, "
    "Model hash: 0123456789, Model: miniworld, Lora hashes: \"subject_cat: abcdef012345\", Version: v1.10.1"
)
STYLES = [
    {"name": "Cinematic", "prompt": "cinematic, {prompt}, film grain", "negative_prompt": "blurry"},
    {"name": "Sharp", "prompt": "sharp focus", "negative_prompt": ""},
    {"name": "NegOnly", "prompt": "", "negative_prompt": "watermark"},
]
LORAS = {"0123456789ab": "newname", "abcdef012345": "cat_v2"}
def case(text, styles=(), loras=None):
    return {"infotext": text, "styles": list(styles), "loras": loras or {}}
CASES = [
    case(INFOTEXT),
    case(INFOTEXT, loras=LORAS),
    case(""),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("only a prompt"),
    case("[a:b:0.5] cat\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.6.0"),
    case("a cat\nSteps: 20, Sampler: PLMS, Seed: 1, Version: v1.5.2"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.7.0-225-g1234abc"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.7.0-224-g1234abc"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.7.0-RC-5-gabc"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: f2.0.1v1.10.1-previous-313-g8a042934"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.7.0, Refiner: sdxl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.8.0, Refiner: sdxl_refiner_1.0 [7440042bbd]"),
    case("a (cat:1.2)\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("a (cat:1.0) \\(literal\\)\nNegative prompt: plain\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("a cat\nNegative prompt: [ugly]\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("a BREAK b\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("(BREAK:1.5)\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("[(cat)]\nSteps: 20, Sampler: Euler, Seed: 1"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Emphasis: No norm"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hypernet: anime, Hypernet strength: 0.5"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hypernet: anime (0123abcd)"),
    case("a cat\nSteps: 20, Sampler: Euler, Size: 1024x768, Seed: 1, Denoising strength: 0.7, First pass size: 0x0"),
    case("a cat\nSteps: 20, Sampler: Euler, Size: 1024x768, Seed: 1, Denoising strength: 0.7, First pass size: 512x384"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.7, First pass size: 0x0"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hires upscale: 2, Hires prompt: a cat, Version: v1.10.1"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hires upscale: 2, Hires prompt: a dog, Version: v1.10.1"),
    case("a cat\nNegative prompt: bad\nSteps: 20, Sampler: Euler, Seed: 1, Hires negative prompt: bad, Version: v1.8.0-139"),
    case("a cat\nNegative prompt: bad\nSteps: 20, Sampler: Euler, Seed: 1, Hires negative prompt: bad, Version: v1.8.0-140"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hires prompt: a cat"),
    case("cinematic, a cat, film grain, sharp focus\nNegative prompt: lowres, blurry\nSteps: 20, Sampler: Euler, Seed: 1", STYLES),
    case("cinematic, a cat, film grain\nNegative prompt: lowres, blurry, watermark\nSteps: 20, Sampler: Euler, Seed: 1, Styles array: \"[\\\"Old\\\"]\"", STYLES),
    case("cinematic, a cat, film grain\nNegative prompt: lowres, blurry\nSteps: 20, Sampler: Euler, Seed: 1, Hires prompt: \"cinematic, a dog, film grain\", Version: v1.10.1", STYLES),
    case("cinematic, a cat, film grain\nNegative prompt: lowres, blurry\nSteps: 20, Sampler: Euler, Seed: 1, Hires prompt: a dog, Version: v1.10.1", STYLES),
    case("  a cat  ,  sharp focus  \nSteps: 20, Sampler: Euler, Seed: 1", STYLES),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1", STYLES),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, AddNet Enabled: True, AddNet Module 1: LoRA, AddNet Model 1: myLora(6e8e2bd2b01f), AddNet Weight A 1: 0.7, AddNet Weight B 1: 0.7, AddNet Module 2: LoRA, AddNet Model 2: other lora (ABCDEF), AddNet Module 3: LyCORIS, AddNet Model 3: skip(aa)"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, AddNet Model 2: second, AddNet Module 2: LoRA, AddNet Model 1: first, AddNet Module 1: LoRA, AddNet Weight A 1: 0.3"),
    case("<lora:oldname:0.8> <lora:keep:1> <lora:cat:0.5>\nSteps: 20, Sampler: Euler, Seed: 1, Lora hashes: \"oldname: 0123456789ab, keep: ffffffffffff, cat: abcdef012345\"", loras=LORAS),
    case("<lora:oldname:0.8>\nSteps: 20, Sampler: Euler, Seed: 1, Lora hashes: \"oldname\"", loras=LORAS),
    case("<lora:oldname:0.8>\nSteps: 20, Sampler: Euler, Seed: 1, Lora hashes: \"old,name: 0123456789ab\"", loras=LORAS),
    case("<lora:old,name:0.8>\nSteps: 20, Sampler: Euler, Seed: 1, Lora hashes: \"old,name: 0123456789ab\"", loras=LORAS),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Prompt: overridden, Negative prompt: neg2"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Clip skip: 2, RNG: CPU, Schedule type: Karras, Schedule max sigma: 14.6, FP8 weight: Enable for SDXL"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, FP8 weight: Enable, Cache FP16 weight for LoRA: True"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: \"512x512\\n\""),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: \u0665\u0661\u0662x\u0665\u0661\u0662"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512x3, Hires resize: 1024x1024"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: 1.0+local, Mask blur: 4, Inpaint area: Only masked"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: garbage"),
    case("[a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.5.1, Hires prompt: x"),
    # Where A1111 raises, its request fails too.
    case("a, b\nSteps: 20, Sampler: Euler, Seed: 1", [{"name": "Twice", "prompt": "{prompt} and {prompt}", "negative_prompt": ""}]),
    case("a cat\nSteps: 20, Sampler: Euler, Size: 0x0, Seed: 1, First pass size: 0x0"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, First pass size-1: 12.5, First pass size-2: 3"),
    case("a cat\nSteps: 20, Sampler: Euler, Seed: 1, First pass size-1: 1_0, First pass size-2: \u0663"),
]

def main():
    import os
    dst = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "image_info", "generation_parameters.json")
    out = [dict(c, expected=run_case(c)) for c in CASES]
    for v in (x for o in out for _, x in o["expected"].get("pairs", [])):
        assert isinstance(v, (str, int, bool, list)), repr(v)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"{len(out)} cases, {sum('error' in o['expected'] for o in out)} errors")


if __name__ == "__main__":
    main()
