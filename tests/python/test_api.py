"""`loramix serve` driven by the `webuiapi` package from PyPI (a client nobody here wrote), on
the miniworld model: txt2img with a LoRA tag, the returned PNG's parameters, info's seeds, the
LoRA list, progress and interrupt during a job, png-info, 401 without credentials, a 422 naming
the field, and a load test of 50 concurrent requests.

    python tests/python/test_api.py --binary target/debug/loramix
"""

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import webuiapi
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
USER, PASS = "tester", "s3cret"


def check(ok, what):
    print(("ok - " if ok else "not ok - ") + what, flush=True)
    if not ok:
        raise SystemExit(f"api test failed: {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=6)
    api.set_auth(USER, PASS)
    return api


def pixels(img):
    return img.convert("RGB").tobytes()


def b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(ROOT, "target/debug/loramix"))
    a = p.parse_args()
    binary = os.path.abspath(a.binary)
    tmp = tempfile.mkdtemp(prefix="loramix-api-")
    port = free_port()
    env = {**os.environ, "LORAMIX_HOME": os.path.join(tmp, "home"), "RUST_BACKTRACE": "0"}
    model = os.path.join(ROOT, "models/miniworld")
    server = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--api-auth", f"{USER}:{PASS}", "--model", model, "--out", os.path.join(tmp, "saved"), "--queue-limit", "100"],
        env=env, stderr=open(os.path.join(tmp, "server.log"), "w"),
    )
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    try:
        for _ in range(200):
            try:
                requests.get(base + "/samplers", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        r = requests.get(base + "/samplers")
        check(r.status_code == 401 and "Basic" in r.headers.get("WWW-Authenticate", ""), "401 without credentials")
        check(requests.get(base + "/samplers", auth=(USER, "wrong")).status_code == 401, "401 with a wrong password")
        api = client(port)

        # txt2img with a LoRA tag.
        res = api.txt2img(prompt="a vlox emblem on a teal background <lora:vlox:1>", seed=11, width=64, height=64, steps=8, n_iter=2)
        params = res.image.info.get("parameters", "")
        check(len(res.images) == 2, "txt2img returns the images of n_iter 2")
        check("<lora:vlox:1>" in params and "Seed: 11" in params and "Lora hashes" in params and "Size: 64x64" in params, f"the PNG's parameters carry the LoRA tag, seed and hash ({params!r})")
        check(res.info["seed"] == 11 and res.info["all_seeds"] == [11, 12], f"info's seed and all_seeds ({res.info.get('seed')}, {res.info.get('all_seeds')})")
        check("Seed: 12" in res.images[1].info.get("parameters", ""), "the second image carries its own seed")

        # A batch: A1111's seeds, image k has seed + k and is the image that seed makes alone.
        batch = api.txt2img(prompt="a vlox emblem on a teal background", seed=21, width=64, height=64, steps=6, batch_size=2, sampler_name="Euler a")
        check(len(batch.images) == 2 and batch.info["all_seeds"] == [21, 22], f"batch_size 2: all_seeds {batch.info.get('all_seeds')}")
        second = batch.images[1].info.get("parameters", "")
        check("Seed: 22," in second and "Batch pos: 1" in second, f"the batch's second image records its own seed ({second!r})")
        alone = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler a")
        worst = max(abs(a - b) for a, b in zip(pixels(batch.images[1]), pixels(alone.image)))
        check(worst <= 1, f"the batch's second image is seed 22 alone ({worst} levels apart)")

        # Variation seeds: strength 1 starts from the variation seed's noise (Euler is
        # deterministic, so that seed's image); image k's variation seed is subseed + k.
        varied = api.txt2img(prompt="a vlox emblem on a teal background", seed=3, subseed=22, subseed_strength=1.0, width=64, height=64, steps=6, sampler_name="Euler", batch_size=2)
        own = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler")
        worst = max(abs(a - b) for a, b in zip(pixels(varied.images[0]), pixels(own.image)))
        check(worst <= 1, f"subseed_strength 1 is the variation seed's image ({worst} levels apart)")
        check(varied.info["all_subseeds"] == [22, 23] and varied.info["subseed_strength"] == 1.0, f"all_subseeds ({varied.info['all_subseeds']})")
        check(varied.info["all_seeds"] == [3, 3], f"variations of one image keep its seed, as A1111's all_seeds ({varied.info['all_seeds']})")
        check("Variation seed: 22, Variation seed strength: 1" in varied.info["infotexts"][0], "the infotext names the variation seed")

        # Resize seed from: recorded and reported; the image's own size changes nothing.
        resized = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler", seed_resize_from_w=48, seed_resize_from_h=96)
        check("Seed resize from: 48x96" in resized.info["infotexts"][0] and resized.info["seed_resize_from_w"] == 48, f"seed resize is recorded ({resized.info['infotexts'][0]!r})")
        check(pixels(resized.image) != pixels(own.image), "resize seed from changes the image")
        same = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler", seed_resize_from_w=64, seed_resize_from_h=64)
        check(pixels(same.image) == pixels(own.image), "resize seed from the image's own size is the plain image")

        # ENSD from override_settings: recorded for an ancestral sampler, and it changes the noise.
        ensd = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 31337})
        ancestral = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler a")
        check("ENSD: 31337" in ensd.info["infotexts"][0], f"the infotext says ENSD ({ensd.info['infotexts'][0]!r})")
        check(pixels(ensd.image) != pixels(ancestral.image), "ENSD changes an ancestral sampler's image")

        # ENSD as A1111 users set it: a global option.
        api.set_options({"eta_noise_seed_delta": 31337})
        global_ensd = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler a")
        api.set_options({"eta_noise_seed_delta": 0})
        check(pixels(global_ensd.image) == pixels(ensd.image) and "ENSD: 31337" in global_ensd.info["infotexts"][0], "ENSD set in /sdapi/v1/options applies")

        # A1111's Tiling: seamless images, recorded as `Tiling: True`.
        tiled = api.txt2img(prompt="a vlox emblem on a teal background", seed=22, width=64, height=64, steps=6, sampler_name="Euler", tiling=True)
        check("Tiling: True" in tiled.info["infotexts"][0], f"the infotext says Tiling ({tiled.info['infotexts'][0]!r})")
        check(pixels(tiled.image) != pixels(own.image), "tiling changes the image")

        # The same seed without the LoRA draws a different picture.
        plain = api.txt2img(prompt="a vlox emblem on a teal background", seed=11, width=64, height=64, steps=8)
        check(pixels(plain.image) != pixels(res.image), "the LoRA tag changes the image")

        loras = api.get_loras()
        check(any(l["name"] == "vlox" for l in loras) and any(l["name"] == "checkered" for l in loras), "the LoRA list names the model's LoRAs")
        check(requests.post(base + "/refresh-loras", auth=(USER, PASS)).status_code == 200, "refresh-loras")
        check(any(s["name"] == "Euler a" for s in api.get_samplers()), "samplers in A1111's names")
        check(any(s["label"] == "Karras" for s in api.get_schedulers()), "schedulers")
        check(api.util_get_current_model() == "miniworld", "options name the current checkpoint")
        check([m["title"] for m in api.get_sd_models()] == ["miniworld"], "sd-models")
        # What clients such as SillyTavern and Open WebUI list besides.
        check(any(u["name"] == "Lanczos" for u in api.get_upscalers()), "upscalers")
        check("Latent (bicubic antialiased)" in [m["name"] for m in api.get_latent_upscale_modes()], "latent-upscale-modes")
        check(isinstance(api.get_prompt_styles(), list) and isinstance(api.get_sd_vae(), list), "prompt-styles and sd-vae are lists")
        check(requests.post(base + "/refresh-checkpoints", auth=(USER, PASS)).status_code == 200, "refresh-checkpoints")

        # png-info on our own PNG.
        info = api.png_info(res.image)
        check(info.info == params, "png-info reads our PNG's parameters back")
        check(info.json["parameters"]["Seed"] == "11" and "vlox" in info.json["parameters"]["Prompt"], "png-info parses the infotext")
        keys = list(info.json["parameters"])
        check(keys.index("Seed") < keys.index("Prompt") < keys.index("Hires sampler") and info.json["parameters"]["Masked area padding"] == 32,
              f"png-info's parameters in A1111's order, with the defaults it fills in ({keys})")

        # samples_format, a global option as in A1111 (whose encode_pil_to_base64 encodes every
        # returned picture by it): JPEG and WebP carry the infotext as the EXIF UserComment.
        def user_comment(raw):
            comment = Image.open(io.BytesIO(raw)).getexif().get_ifd(0x8769).get(0x9286, b"")
            return comment[8:].decode("utf_16_be") if comment[:8] == b"UNICODE\x00" else None
        for fmt, kind in (("jpg", "JPEG"), ("webp", "WEBP")):
            api.set_options({"samples_format": fmt})
            out = api.txt2img(prompt="a vlox emblem on a teal background <lora:vlox:1>", seed=11, width=64, height=64, steps=8)
            raw = base64.b64decode(out.json["images"][0])
            check(Image.open(io.BytesIO(raw)).format == kind and user_comment(raw) == params, f"samples_format {fmt}: a {kind} with the infotext as its EXIF comment")
            if fmt == "webp":
                check(pixels(out.image) == pixels(res.image), "a WebP is lossless")
            read = requests.post(base + "/png-info", json={"image": base64.b64encode(raw).decode()}, auth=(USER, PASS)).json()
            check(read["info"] == params and read["parameters"]["Seed"] == "11", f"png-info reads a {kind}'s EXIF comment")
            # save_images writes the same picture in the same format, as A1111's save_image does.
            saved = lambda: set(os.listdir(os.path.join(tmp, "saved"))) if os.path.isdir(os.path.join(tmp, "saved")) else set()
            before = saved()
            kept = api.txt2img(prompt="a vlox emblem on a teal background <lora:vlox:1>", seed=11, width=64, height=64, steps=8, save_images=True)
            new = sorted(saved() - before)
            with open(os.path.join(tmp, "saved", new[-1]) if new else os.devnull, "rb") as f:
                on_disk = f.read()
            check(len(new) == 1 and new[0].endswith("-11." + fmt) and on_disk == base64.b64decode(kept.json["images"][0]),
                  f"save_images with samples_format {fmt} keeps the answered picture ({new})")
            up = api.extra_single_image(res.image, upscaler_1="Lanczos", upscaling_resize=2)
            raw = base64.b64decode(up.json["image"])
            check(Image.open(io.BytesIO(raw)).format == kind and user_comment(raw) == params, f"Extras answers a {kind} with the parameters as its EXIF comment")
        wrapped = base64.encodebytes(raw).decode()  # line breaks every 76 characters, as A1111 takes them
        read = requests.post(base + "/png-info", json={"image": wrapped}, auth=(USER, PASS)).json()
        check(read.get("info") == params, "png-info takes base64 with line breaks")
        empty = requests.post(base + "/png-info", json={"image": ""}, auth=(USER, PASS))
        check(empty.status_code == 200 and empty.json()["info"] == "", f"png-info of an empty picture is empty info ({empty.text})")
        api.set_options({"samples_format": "png"})
        check(api.txt2img(prompt="x", seed=1, width=64, height=64, steps=2).image.format == "PNG", "samples_format back to png")
        # Numbers as A1111's pydantic (v1) takes them: strings, floats for integers, flags as text.
        loose = requests.post(base + "/txt2img", json={"prompt": "x", "steps": "2", "cfg_scale": "5", "width": 64.0, "height": "64", "seed": "3", "save_images": "no", "send_images": 1}, auth=(USER, PASS))
        check(loose.status_code == 200 and json.loads(loose.json()["info"])["seed"] == 3 and len(loose.json()["images"]) == 1, f"numeric strings and floats are read as pydantic reads them ({loose.status_code})")
        frac = requests.post(base + "/txt2img", json={"prompt": "x", "steps": "2.5"}, auth=(USER, PASS))
        check(frac.status_code == 422 and "steps" in frac.text, f"a fractional string for an integer is refused by field ({frac.text})")
        bad = requests.post(base + "/options", json={"samples_format": "gif"}, auth=(USER, PASS))
        check(bad.status_code == 422 and "samples_format" in bad.text and "webp" in bad.text, f"an unknown samples_format is refused ({bad.text})")
        bad = requests.post(base + "/options", json={"samples_format": "jpg", "jpeg_quality": 101}, auth=(USER, PASS))
        check(bad.status_code == 422 and "jpeg_quality" in bad.text, f"a JPEG quality over 100 is refused ({bad.text})")
        check(api.get_options()["samples_format"] == "png", "a refused option is not kept")

        # Extras: A1111's upscale of a finished picture, its metadata kept.
        ex = api.extra_single_image(res.image, upscaler_1="Lanczos", upscaling_resize=2)
        check(ex.image.size == (128, 128), f"extra-single-image doubles the picture ({ex.image.size})")
        check(ex.image.info.get("parameters") == params and ex.image.info.get("postprocessing") == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos",
              f"the picture keeps its parameters and gains A1111's postprocessing line ({ex.image.info.get('postprocessing')!r})")
        check(ex.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>", f"html_info ({ex.info!r})")
        exb = api.extra_batch_images([res.image, plain.image], resize_mode=1, upscaling_resize_w=96, upscaling_resize_h=80,
                                     upscaler_1="Nearest", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.4)
        check([i.size for i in exb.images] == [(96, 80), (96, 80)], f"extra-batch-images scales to a size and crops ({[i.size for i in exb.images]})")
        check(pixels(exb.images[0]) != pixels(exb.images[1]), "each picture of the batch is its own")
        r = requests.post(base + "/extra-single-image", auth=(USER, PASS), json={"image": b64(res.image), "upscaler_1": "Lanczos", "gfpgan_visibility": 0.5})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"], f"face restoration is refused, naming the field ({r.text[:200]})")
        r = requests.post(base + "/extra-single-image", auth=(USER, PASS), json={"image": b64(res.image), "upscaler_1": "R-ESRGAN 9x"})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaler_1"], f"an unknown upscaler is a 422 naming upscaler_1 ({r.text[:200]})")
        r = requests.post(base + "/extra-single-image", auth=(USER, PASS), json={"image": b64(res.image), "upscaler_1": "Lanczos", "upscaler_2": os.path.join(model, "vae", "diffusion_pytorch_model.safetensors"), "extras_upscaler_2_visibility": 0.5})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaler_2"], f"an upscaler is a name, never a server path ({r.text[:200]})")
        r = requests.post(base + "/extra-single-image", auth=(USER, PASS), json={"image": b64(res.image), "upscaler_1": "Lanczos"})
        check(r.status_code == 200 and r.json()["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>", f"the default factor is A1111's int 2 ({r.text[:200]})")
        r = requests.post(base + "/extra-batch-images", auth=(USER, PASS), json={"upscaler_1": "Lanczos"})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "imageList"], f"imageList is required ({r.text[:200]})")
        r = requests.post(base + "/extra-batch-images", auth=(USER, PASS), json={"imageList": [{"name": "x"}]})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "imageList", "0", "data"], f"a missing picture is named by its place ({r.text[:200]})")

        # A bad field gets FastAPI's 422 naming it.
        r = requests.post(base + "/txt2img", auth=(USER, PASS), json={"prompt": "x", "steps": "many"})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"], f"422 names the field ({r.text[:200]})")
        r = requests.post(base + "/txt2img", auth=(USER, PASS), data="{not json", headers={"Content-Type": "application/json"})
        check(r.status_code == 422, "malformed JSON is a 422")
        r = requests.post(base + "/txt2img", auth=(USER, PASS), json={"prompt": "x", "width": 65})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"], "a bad size is a 422 naming width")
        r = requests.post(base + "/txt2img", auth=(USER, PASS), data=b"{" + b" " * (65 << 20) + b"}", headers={"Content-Type": "application/json"})
        check(r.status_code == 413, f"a body over the limit is refused ({r.status_code})")

        # Progress during a job, then interrupt within a step.
        out = {}

        def long_job():
            t = time.time()
            out["res"] = client(port).txt2img(prompt="a krin emblem", seed=5, width=64, height=64, steps=400)
            out["t"] = time.time()

        th = threading.Thread(target=long_job)
        th.start()
        seen = None
        t0 = time.time()
        while time.time() - t0 < 120:
            pr = api.get_progress()
            if pr["state"]["sampling_step"] >= 3 and pr["current_image"]:
                seen = pr
                break
            time.sleep(0.05)
        check(seen is not None and 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 400, f"progress during a job ({seen and {k: seen[k] for k in ('progress', 'eta_relative')}})")
        Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).load()
        check(True, "progress carries a current preview image")
        s1 = api.get_progress()["state"]["sampling_step"]
        time.sleep(0.5)
        s2 = api.get_progress()["state"]["sampling_step"]
        step_time = 0.5 / max(1, s2 - s1)
        t_int = time.time()
        api.interrupt()
        th.join(60)
        check("res" in out, "the interrupted request answers")
        waited = out["t"] - t_int
        check(waited < max(2.0, 3 * step_time + 1.0), f"interrupt stops the job within a step ({waited:.2f}s after interrupt, {step_time:.3f}s a step)")
        check(out["res"].info.get("interrupted") is True, "info says the job was interrupted")
        got = out["res"].images
        check(len(got) == 1 and "Seed: 5," in got[0].info.get("parameters", ""), "as A1111, the interrupted image comes back, decoded from its last prediction")

        # Skip: the running batch ends (kept, as A1111 does) and the job goes on with the next.
        two = {}
        th = threading.Thread(target=lambda: two.setdefault("res", client(port).txt2img(prompt="a krin emblem", seed=7, width=64, height=64, steps=200, n_iter=2)))
        th.start()
        t0 = time.time()
        while time.time() - t0 < 120:
            st = api.get_progress()["state"]
            if st["job"] and st["job_no"] == 0 and st["sampling_step"] >= 3:
                break
            time.sleep(0.02)
        api.skip()
        th.join(120)
        r = two.get("res")
        check(r is not None and len(r.images) == 2 and r.info.get("interrupted") is False and r.info["all_seeds"] == [7, 8],
              f"skip ends the running batch and the next one runs ({r and (len(r.images), r.info.get('interrupted'), r.info.get('all_seeds'))})")

        # Load: 50 concurrent requests, each right for its seed.
        seeds = list(range(1000, 1050))

        def one(seed):
            try:
                r = client(port).txt2img(prompt="a tebo emblem on a cream background <lora:tebo:0.8>", seed=seed, width=64, height=64, steps=4)
                return seed, r
            except Exception as e:  # noqa: BLE001
                return seed, e

        t0 = time.time()
        with ThreadPoolExecutor(max_workers=50) as ex:
            results = list(ex.map(one, seeds))
        took = time.time() - t0
        errors = [(s, r) for s, r in results if isinstance(r, Exception)]
        check(not errors, f"50 concurrent requests all answered ({errors[:2]})")
        check(took < 600, f"the 50 answered in bounded time ({took:.1f}s)")
        check(all(r.info["seed"] == s and f"Seed: {s}" in r.image.info["parameters"] for s, r in results), "each answer carries its own seed")
        # Right for its seed: the same picture as a request made alone.
        for s in (1000, 1025, 1049):
            alone = api.txt2img(prompt="a tebo emblem on a cream background <lora:tebo:0.8>", seed=s, width=64, height=64, steps=4)
            check(pixels(alone.image) == pixels(dict(results)[s].image), f"seed {s} under load equals seed {s} alone")
        check(server.poll() is None, "the server is still running")
        print("api: all checks passed", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
