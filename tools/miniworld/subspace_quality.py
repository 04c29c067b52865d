"""EigenLoRAx subspaces on miniworld: for K in a sweep and both centerings, the ΔW error, the
storage before and after, and what the evaluator sees in images made with each member's
reconstruction beside the original LoRA (same prompts and seeds), plus the mean pixel
difference. Also the held-out projection: a basis built without 2 of the 8 LoRAs, and those 2
projected in with `lora subspace add`.

python3 tools/miniworld/subspace_quality.py [--bin target/release/loramix] [--shapes locon,attn]
       [--ks 8,16,32,48,64,e0.9,e0.99] [--seeds 2] [--seed-base 8000] [--json out.json]

Everything goes through the CLI as a user runs it: `lora import`, `lora subspace build|add
--json`, `generate --lora NAME@S`, `eval --json`. Pixel differences need Pillow (skipped without).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mix_quality import BGS, MODEL, SHAPES, SHAPE_LABEL, STYLES, SUBJECTS, evaluate, mean  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
OBJ_SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross"]
HELD_OUT = ["tebo", "dotted"]


def prompt_for(lora, k, seed):
    bg = BGS[(seed + 3 * k) % len(BGS)]
    if lora in SUBJECTS:
        return f"a {lora} emblem on a {bg} background"
    return f"a {COLORS[seed % 6]} {OBJ_SHAPES[(seed // 6) % 6]} on a {bg} background, {lora} style"


def run(binary, env, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}\n{r.stderr}")
    return r.stdout


def pixel_diff(a_paths, b_paths):
    try:
        from PIL import Image
    except ImportError:
        return None
    tot = []
    for a, b in zip(a_paths, b_paths):
        ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
        pa, pb = ia.tobytes(), ib.tobytes()
        tot.append(sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa) / 255)
    return mean(tot)


def fidelity(scores, lora):
    key = "subject" if lora in SUBJECTS else "style"
    return mean([s[key] or 0.0 for s in scores])


def images(binary, env, work, spec, lora, seeds, seed_base, steps):
    paths = []
    for k in range(seeds):
        seed = seed_base + 100 * k + 7 * (SUBJECTS + STYLES).index(lora)
        out = os.path.join(work, os.path.basename(spec).replace("@", "_at_"), str(k))
        paths += gen_env(binary, env, prompt_for(lora, k, seed), out, seed, steps, spec)
    return paths


def gen_env(binary, env, prompt, out, seed, steps, spec):
    os.makedirs(out, exist_ok=True)
    o = run(binary, env, "generate", "--model", MODEL, "--prompt", prompt, "--steps", str(steps), "--seed", str(seed),
            "--batch-size", "2", "--out", out, "--lora", spec)
    return o.split()


def table(rows, seeds, steps, seed_base, dtype):
    """Fidelity ratios are ratios of means (per role), so a LoRA that is weak alone cannot
    inflate them."""
    out = [f"8 miniworld LoRAs per shape, {2 * seeds} images per LoRA and row ({seeds} seeds × a batch of 2), {steps} steps, "
           f"seeds from {seed_base}, storage {dtype}\n",
           "| LoRA shape | basis | storage ratio | ΔW error (mean over members) | subject fidelity (mean of 4) | style fidelity (mean of 4) | "
           "subject / original | style / original | mean pixel difference |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    fmt = lambda v, p="%.3f": "" if v is None or v != v else p % v
    for r in rows:
        f = r["fidelity"]
        if r["config"] == "original LoRAs":
            base[r["shape"]] = f
        b = base[r["shape"]]
        subj = [l for l in SUBJECTS if l in f]
        sty = [l for l in STYLES if l in f]
        ms, mt = (mean([f[l] for l in subj]) if subj else None), (mean([f[l] for l in sty]) if sty else None)
        rs = ms / mean([b[l] for l in subj]) if subj else None
        rt = mt / mean([b[l] for l in sty]) if sty else None
        out.append(f"| {SHAPE_LABEL[r['shape']]} | {r['config']} | {fmt(r['ratio'], '%.2f×')} | {fmt(r['error'])} | "
                   f"{fmt(ms)} | {fmt(mt)} | {fmt(rs, '%.2f')} | {fmt(rt, '%.2f')} | {fmt(r['pixel'])} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/loramix")
    ap.add_argument("--shapes", default="locon,attn")
    ap.add_argument("--ks", default="8,16,32,48,64,e0.9,e0.99", help="K values; eX: --energy X")
    ap.add_argument("--centerings", default="uncentred,centred")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-base", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--json")
    ap.add_argument("--render", nargs="+", help="print the table of earlier --json files (rows of one shape stay together)")
    a = ap.parse_args()
    if a.render:
        rows = [r for f in a.render for r in json.load(open(f))]
        print(table(rows, a.seeds, a.steps, a.seed_base, a.dtype))
        return
    loras = SUBJECTS + STYLES
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in a.shapes.split(","):
            env = dict(os.environ, LORAMIX_HOME=os.path.join(work, f"lib-{shape}"), RUST_BACKTRACE="0")
            run(a.bin, env, "lora", "import", SHAPES[shape])
            # The originals by path: a bare name would find the model's own (LoCon) LoRAs first.
            orig = {l: images(a.bin, env, work + f"/{shape}", os.path.join(SHAPES[shape], f"{l}.safetensors"), l, a.seeds, a.seed_base, a.steps)
                    for l in loras}
            orig_scores = {l: evaluate(a.bin, orig[l]) for l in loras}
            rows.append({"shape": shape, "config": "original LoRAs", "ratio": 1.0, "error": 0.0,
                         "fidelity": {l: fidelity(orig_scores[l], l) for l in loras}, "pixel": 0.0})
            configs = [(c, k) for c in a.centerings.split(",") for k in a.ks.split(",")]
            for centering, k in configs:
                name = f"{centering[0]}{k}"
                rule = ["--energy", k[1:]] if k.startswith("e") else ["--components", k]
                s = json.loads(run(a.bin, env, "lora", "subspace", "build", "--all", *rule, "--centering", centering,
                                   "--dtype", a.dtype, "--name", name, "--json"))
                fid, pix = {}, []
                for l in loras:
                    paths = images(a.bin, env, work + f"/{shape}", f"{l}@{name}", l, a.seeds, a.seed_base, a.steps)
                    fid[l] = fidelity(evaluate(a.bin, paths), l)
                    pix.append(pixel_diff(orig[l], paths))
                label = f"energy {k[1:]} (K per module side)" if k.startswith("e") else f"K = {k}"
                rows.append({"shape": shape, "config": f"{centering}, {label}", "ratio": s["ratio"],
                             "error": mean([m["error"] for m in s["members"]]), "fidelity": fid,
                             "pixel": None if None in pix else mean(pix)})
                print(json.dumps(rows[-1]), file=sys.stderr)
            # Held out: a basis without two LoRAs, then those two projected in.
            for centering in a.centerings.split(","):
                k = max(int(x) for x in a.ks.split(",") if not x.startswith("e") and int(x) <= 8 * (len(loras) - len(HELD_OUT)))
                name = f"h{centering[0]}{k}"
                members = [l for l in loras if l not in HELD_OUT]
                run(a.bin, env, "lora", "subspace", "build", *members, "--components", str(k), "--centering", centering,
                    "--dtype", a.dtype, "--name", name)
                for l in HELD_OUT:
                    m = json.loads(run(a.bin, env, "lora", "subspace", "add", name, l, "--json"))
                    paths = images(a.bin, env, work + f"/{shape}", f"{l}@{name}", l, a.seeds, a.seed_base, a.steps)
                    rows.append({"shape": shape, "config": f"held out {l}: {centering}, K = {k} from the other 6",
                                 "ratio": None, "error": m["error"], "fidelity": {l: fidelity(evaluate(a.bin, paths), l)},
                                 "pixel": pixel_diff(orig[l], paths)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows, a.seeds, a.steps, a.seed_base, a.dtype))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
