"""Trains the small LLM we ship (models/minichat) and its adapters, on CPU, in a few minutes.

python tools/llm/train_minichat.py --out models/minichat

- a byte-level BPE tokenizer and a 4-layer Llama (transformers' LlamaForCausalLM, so our loader
  and transformers read the same files), trained on the text world's base corpus
  (tools/llm/textworld.py) with padding masked out of both attention and the loss;
- one PEFT LoRA per task (adapters/<task>), rank 8 on q/k/v/o, loss on the answer only;
- one PEFT activated LoRA per task (aloras/<task>), invoked by the assistant turn's opening
  "<|assistant|>\n", so the user's turn stays a base-model prefix whose KV cache is reused;
- a LoRA trained on the union of the four tasks (baselines/union), a benchmark baseline.
train.log records the losses and each adapter's greedy exact-match on held-out examples.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
import textworld as tw  # noqa: E402

SPECIALS = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
INVOCATION = "<|assistant|>\n"


def log(f, msg):
    print(msg, flush=True)
    f.write(msg + "\n")
    f.flush()


def make_tokenizer(texts):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def chat_ids(tok, prompt, completion):
    """(ids, labels): the chat-formatted example, loss on the answer and its <|end|> only."""
    head = tok.encode(f"<|user|>\n{prompt}<|end|>\n{INVOCATION}").ids
    tail = tok.encode(f"{completion}<|end|>").ids
    return head + tail, [-100] * len(head) + tail


def batches(examples, bs, rng, pad):
    """Endless shuffled batches of (ids, labels) padded on the right; pad never attended to."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - bs + 1, bs):
            rows = [examples[j] for j in order[i:i + bs]]
            n = max(len(r[0]) for r in rows)
            ids = torch.full((bs, n), pad)
            lab = torch.full((bs, n), -100)
            att = torch.zeros((bs, n), dtype=torch.long)
            for k, (a, b) in enumerate(rows):
                ids[k, :len(a)] = torch.tensor(a)
                lab[k, :len(b)] = torch.tensor(b)
                att[k, :len(a)] = 1
            yield ids, lab, att


def train(model, examples, steps, bs, lr, seed, pad, f, tag, params=None):
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    it = batches(examples, bs, rng, pad)
    t0 = time.time()
    model.train()
    for step in range(steps):
        ids, lab, att = next(it)
        cur = lr * 0.5 * (1 + math.cos(math.pi * step / steps)) if step > steps // 20 else lr * (step + 1) / (steps // 20 + 1)
        for g in opt.param_groups:
            g["lr"] = cur
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f, f"[{tag}] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()


@torch.no_grad()
def greedy(model, tok, prompt, end_id, max_new=40):
    ids = tok.encode(f"<|user|>\n{prompt}<|end|>\n{INVOCATION}").ids
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=end_id, pad_token_id=end_id)
    new = out[0, len(ids):].tolist()
    if end_id in new:
        new = new[:new.index(end_id)]
    return tok.decode(new)


def exact_match(model, tok, rows, end_id):
    ok = sum(greedy(model, tok, r["prompt"], end_id).strip() == r["completion"] for r in rows)
    return ok / max(1, len(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-steps", type=int, default=2500)
    ap.add_argument("--lora-steps", type=int, default=500)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    f = open(os.path.join(tmp, "train.log"), "w")

    rng = random.Random(1)
    base_docs = [tw.base_text(rng) for _ in range(20000)]
    task_texts = [tw.chat([(r["prompt"], r["completion"])]) for r in tw.task_rows(4000, 5)]
    tok = make_tokenizer(base_docs + task_texts)
    pad, end = tok.token_to_id("<|pad|>"), tok.token_to_id("<|end|>")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as g:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "eos_token": "<|end|>",
                   "pad_token": "<|pad|>", "bos_token": None, "model_max_length": 256}, g, indent=1)
    log(f, f"vocab {tok.get_vocab_size()}")

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=pad, eos_token_id=end,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    log(f, f"parameters {sum(p.numel() for p in model.parameters())}")
    docs = []
    for d in base_docs:
        ids = tok.encode(d).ids + [end]
        docs.append((ids, ids))  # next-token loss everywhere (shifted inside the model)
    train(model, docs, a.base_steps, 48, 3e-3, 0, pad, f, "base")
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "generation_config.json"), "w") as g:
        json.dump({"eos_token_id": end, "pad_token_id": pad, "do_sample": False}, g, indent=1)

    test = tw.task_rows(200, 909)
    by_task = {t: [r for r in test if r["task"] == t] for t in tw.TASKS}
    for t in tw.TASKS:
        log(f, f"[base] {t} exact-match {exact_match(model, tok, by_task[t][:40], end):.3f}")

    invocation = tok.encode(INVOCATION).ids
    jobs = [("adapters", t, [t], None) for t in tw.TASKS] + [("aloras", t, [t], invocation) for t in tw.TASKS]
    jobs.append(("baselines", "union", tw.TASKS, None))
    for folder, name, tasks, inv in jobs:
        base = LlamaForCausalLM.from_pretrained(tmp)
        lc = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        alora_invocation_tokens=inv)
        m = get_peft_model(base, lc)
        rows = tw.task_rows(1500 * len(tasks), sum(map(ord, name)), tasks)
        ex = [chat_ids(tok, r["prompt"], r["completion"]) for r in rows]
        steps = a.lora_steps * (2 if len(tasks) > 1 else 1)
        train(m, ex, steps, 32, 4e-3, 3, pad, f, f"{folder}/{name}")
        for t in tasks:
            log(f, f"[{folder}/{name}] {t} exact-match {exact_match(m, tok, by_task[t][:40], end):.3f}")
        m.save_pretrained(os.path.join(tmp, folder, name))
    f.close()
    tw_dir = os.path.join(tmp, "data")
    os.makedirs(tw_dir, exist_ok=True)
    sys.argv = ["textworld", "--out", tw_dir]
    tw.main()
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
