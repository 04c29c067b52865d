"""The procedural text world the shipped LLM (models/minichat) is trained on.

It talks about the same things the image studio does: miniworld's subjects and styles, and a
library of LoRAs with trigger words. Four tasks, each with its own phrasing, are kept OUT of the
base model's corpus so that a LoRA has something to teach:
  prompt    a plain request -> a miniworld prompt with <lora:name:weight> tags
  name      a prompt -> the subject and style it asks for
  negative  a prompt -> a negative prompt
  trigger   a LoRA's name -> its trigger words
The base corpus has the world's facts (LoRA cards, scene captions, small chat turns about
colours and styles), so a task LoRA teaches a format, not facts.

Everything is a pure function of a seed (random.Random), so the data files we ship are
reproducible: python tools/llm/textworld.py --out models/minichat/data
"""
import argparse
import json
import os
import random

SUBJECTS = {"vlox": ("purple circle", "yellow star"), "krin": ("red ring", "green dot"),
            "tebo": ("blue square", "orange band"), "mupa": ("white triangle", "black bar")}
STYLES = {"striped": "parallel stripes", "checkered": "a checkerboard", "dotted": "a grid of dots",
          "painted": "loose brush strokes"}
BACKGROUNDS = ["gray", "cream", "teal", "pink", "navy", "olive"]
WEIGHTS = {"light": "0.6", "": "0.8", "strong": "1.0"}
TASKS = ["prompt", "name", "negative", "trigger"]

SYLL = ["ka", "lo", "mi", "ru", "ze", "ta", "po", "vi", "ne", "su", "do", "fa", "gi", "xu", "be", "ho"]
TRIG_WORDS = ["moon", "glass", "amber", "frost", "velvet", "ember", "river", "paper", "neon", "stone",
              "silk", "storm", "chalk", "ivory", "rust", "cloud", "ink", "cedar", "pearl", "smoke"]


def library(seed=7, n=24):
    """The LoRA library of the world: miniworld's 8 plus n named ones with two trigger words."""
    rng = random.Random(seed)
    libs = {}
    for s in SUBJECTS:
        libs[s] = ("subject", f"{s} emblem")
    for st in STYLES:
        libs[st] = ("style", f"{st} style")
    while len(libs) < 8 + n:
        name = "".join(rng.choice(SYLL) for _ in range(rng.choice([2, 3])))
        if name in libs:
            continue
        role = rng.choice(["subject", "style", "concept"])
        a, b = rng.sample(TRIG_WORDS, 2)
        libs[name] = (role, f"{a} {b}")
    return libs


LIB = library()


def scene(rng):
    return rng.choice(list(SUBJECTS)), rng.choice(list(STYLES)), rng.choice(BACKGROUNDS)


def prompt_text(s, st, bg):
    return f"a {s} emblem on a {bg} background, {st} style"


def negative_for(st):
    others = ", ".join(f"{o} style" for o in STYLES if o != st)
    return f"blurry, lowres, {others}, text, watermark"


def task_example(task, rng):
    """(user message, answer) for one task."""
    if task == "prompt":
        s, st, bg = scene(rng)
        strength = rng.choice(list(WEIGHTS))
        adj = f"{strength} " if strength else ""
        req = rng.choice([
            f"make me a {s} in {adj}{st} style on {bg}",
            f"i want a {adj}{st} picture of {s}, {bg} background",
            f"draw {s} with a {adj}{st} look over {bg}",
            f"request: {s}, {adj}{st}, {bg}",
            f"could you paint a {s} on {bg}, {adj}{st} please",
        ])
        w = WEIGHTS[strength]
        return req, f"{prompt_text(s, st, bg)} <lora:{s}:{w}> <lora:{st}:{w}>"
    if task == "name":
        s, st, bg = scene(rng)
        q = rng.choice(["which subject and style does this ask for: ", "name the subject and style: ",
                        "what subject and style is this? "])
        return q + prompt_text(s, st, bg), f"subject: {s}, style: {st}"
    if task == "negative":
        s, st, bg = scene(rng)
        q = rng.choice(["write a negative prompt for: ", "negative prompt for: ", "what should i avoid for: "])
        return q + prompt_text(s, st, bg), negative_for(st)
    if task == "trigger":
        name = rng.choice(list(LIB))
        q = rng.choice([f"what are the trigger words of {name}?", f"how do i trigger the {name} lora?",
                        f"trigger words for {name}"])
        return q, LIB[name][1]
    raise ValueError(task)


def base_text(rng):
    """One base-corpus document: facts and small talk, never a task's phrasing."""
    k = rng.randrange(8)
    if k == 0:
        name = rng.choice(list(LIB))
        role, trig = LIB[name]
        w = rng.choice(list(WEIGHTS.values()))
        return f"lora card. name: {name}. kind: {role} lora. trigger: {trig}. usage: <lora:{name}:{w}>."
    if k == 1:
        s, st, bg = scene(rng)
        return f"caption: {prompt_text(s, st, bg)}."
    if k == 2:
        s = rng.choice(list(SUBJECTS))
        a, b = SUBJECTS[s]
        return chat([(f"what does {s} look like?", f"{s} is a {a} with a {b}.")])
    if k == 3:
        st = rng.choice(list(STYLES))
        return chat([(f"describe the {st} style.", f"the {st} style covers the picture with {STYLES[st]}.")])
    if k == 4:
        s, st, bg = scene(rng)
        return f"the {s} emblem sits on {bg}. it is drawn in {st} style, with {STYLES[st]}."
    if k == 5:
        return chat([(rng.choice(["hello", "hi there", "hey"]), "hello! ask me about emblems, styles and loras.")])
    # Notes then a caption: the same entities again in another order (reading back from context).
    s, st, bg = scene(rng)
    notes = [s, st, bg]
    rng.shuffle(notes)
    return f"notes: {', '.join(notes)}. caption: {prompt_text(s, st, bg)}."


def chat(turns):
    """Our chat template, written out (it must equal tokenizer_config.json's template)."""
    out = ""
    for u, a in turns:
        out += f"<|user|>\n{u}<|end|>\n<|assistant|>\n{a}<|end|>\n"
    return out


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def task_rows(n, seed, tasks=TASKS):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = tasks[i % len(tasks)] if len(tasks) > 1 else tasks[0]
        p, c = task_example(t, rng)
        rows.append({"prompt": p, "completion": c, "task": t})
    rng.shuffle(rows)
    return rows


def lm_rows(n, seed):
    """Mixed-domain language-model rows: task chats (prompt + completion) and plain documents."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % 6
        if k < 4:
            p, c = task_example(TASKS[k], rng)
            rows.append({"prompt": p, "completion": c, "domain": TASKS[k]})
        else:
            rows.append({"text": base_text(rng), "domain": "base"})
    rng.shuffle(rows)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    # Router training data: mixed tasks (the task field is for evaluation only; training ignores it).
    write_jsonl(os.path.join(a.out, "mixed_train.jsonl"), task_rows(2000, 101))
    write_jsonl(os.path.join(a.out, "mixed_test.jsonl"), task_rows(400, 202))
    # Language-model data for ChameleonLLM: four task domains plus the base corpus's two kinds of
    # documents, mixed; the test file drops any text that also occurs in training.
    train = lm_rows(3000, 404)
    seen = {json.dumps(r, sort_keys=True) for r in train}
    test = [r for r in lm_rows(6000, 505) if json.dumps(r, sort_keys=True) not in seen][:600]
    write_jsonl(os.path.join(a.out, "lm_train.jsonl"), train)
    write_jsonl(os.path.join(a.out, "lm_test.jsonl"), test)
    # A batch of prompts for the chat --batch demo (no answers).
    write_jsonl(os.path.join(a.out, "batch_prompts.jsonl"),
                [{"prompt": r["prompt"]} for r in task_rows(24, 303)])


if __name__ == "__main__":
    main()
