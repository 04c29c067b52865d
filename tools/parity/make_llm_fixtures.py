"""Goldens for the LLM engine and activated LoRA: tiny random Llama, Granite and Qwen2 models (real
transformers architectures and key layouts) with random PEFT LoRA and aLoRA adapters, and what
transformers + PEFT compute with them.

python tools/parity/make_llm_fixtures.py --out tests/fixtures/llm

Per model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json):
  adapters/<name>/         PEFT folders written by PEFT's save_pretrained
  goldens.safetensors      logits [T, V] per case, f32
  goldens.json             cases: model, adapter, ids, logits key; generations: ids -> greedy tokens;
                           cli: prompt text, --invoke, the prompt tokens and greedy tokens PEFT gives
Cases put the invocation at the end, in the middle, twice, and nowhere.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, GraniteConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)
from peft import LoraConfig, PeftModel, get_peft_model

SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>",
            "<|certainty|>", "<|rewrite|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "a red circle on a cream background",
    "how certain are you about that answer", "please rewrite the question so it stands alone",
    "activated adapters reuse the cache of the conversation", "tokens before the invocation are computed once",
    "what is the capital of france", "paris is the capital and largest city of france",
    "models generate one token at a time", "low rank adapters change a few linear layers",
] * 20

GRANITE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}<|user|>{{ message.content | trim }}\n"
    "{% else %}<|assistant|>{{ message.content }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(folder, template, raw_bos):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if raw_bos:  # Llama-style: raw text gets <s> in front
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 4096}
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def randomize(model, std):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def add_adapter(base, tok, out_dir, name, seed, invocation=None, legacy=False, **cfg):
    torch.manual_seed(seed)
    kw = dict(r=cfg.pop("r", 4), lora_alpha=cfg.pop("lora_alpha", 8), task_type="CAUSAL_LM", **cfg)
    if invocation is not None:
        kw["alora_invocation_tokens"] = tok(invocation, add_special_tokens=False).input_ids
    peft_model = get_peft_model(base, LoraConfig(**kw), adapter_name=name)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    folder = os.path.join(out_dir, "adapters")
    peft_model.save_pretrained(folder, selected_adapters=[name])
    path = os.path.join(folder, name) if os.path.isdir(os.path.join(folder, name)) else folder
    if legacy:  # an older aLoRA config: only the invocation string
        cp = os.path.join(path, "adapter_config.json")
        c = json.load(open(cp))
        c.pop("alora_invocation_tokens")
        c["invocation_string"] = invocation
        json.dump(c, open(cp, "w"), indent=2)
    return peft_model.unload() if hasattr(peft_model, "unload") else base


def prompts(tok, invocation):
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    inv = enc(invocation) if invocation else []
    a = enc("what is the capital of france")
    b = enc("paris is the capital")
    return {
        "end": [tok.bos_token_id] + a + inv,
        "middle": [tok.bos_token_id] + a + inv + b,
        "twice": [tok.bos_token_id] + a + inv + b + inv + enc(" certain"),
        "absent": [tok.bos_token_id] + a + b,
    }


def build(kind, out):
    folder = os.path.join(out, kind)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    if kind == "llama":
        tok = make_tokenizer(folder, None, raw_bos=True)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}, rope_theta=10000.0,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif kind == "granite":
        tok = make_tokenizer(folder, GRANITE_TEMPLATE, raw_bos=False)
        cfg = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            embedding_multiplier=6.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0,
                            attention_bias=True, rope_theta=500000.0,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end_of_text|>"))
    else:
        tok = make_tokenizer(folder, QWEN_TEMPLATE, raw_bos=False)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          rope_theta=1000000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    inv1 = "<|start_of_role|>certainty<|end_of_role|>" if kind == "granite" else "<|certainty|> how certain"
    inv2 = "<|start_of_role|>rewrite<|end_of_role|>" if kind == "granite" else "<|rewrite|>"
    specs = [
        ("lora", dict(seed=1, target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)),
        ("certainty", dict(seed=2, invocation=inv1, target_modules=["q_proj", "k_proj", "v_proj"], r=8, lora_alpha=16)),
        ("rewrite", dict(seed=3, invocation=inv2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                                  "down_proj"], r=4, lora_alpha=32, use_rslora=True,
                         rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"o_proj": 12})),
    ]
    if kind == "llama":
        specs.append(("legacy", dict(seed=4, invocation=inv2, legacy=True, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)))
    for name, spec in specs:
        model = add_adapter(model, tok, folder, name, **spec)

    tensors, cases, generations, cli = {}, [], [], []

    def record(label, adapter, ids, m):
        with torch.no_grad():
            logits = m(torch.tensor([ids])).logits[0].float()
        key = f"{label}"
        tensors[key] = logits.contiguous()
        cases.append({"adapter": adapter, "ids": ids, "logits": key})
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        generations.append({"adapter": adapter, "ids": ids, "tokens": out[0, len(ids):].tolist()})

    base_prompts = prompts(tok, inv1)
    record("base.absent", None, base_prompts["absent"], model)
    record("base.end", None, base_prompts["end"], model)
    for name, spec in specs:
        inv = spec.get("invocation")
        path = os.path.join(folder, "adapters", name)
        if spec.get("legacy"):  # PEFT needs the ids; our loader must tokenize the string to the same ids
            lcfg = LoraConfig.from_pretrained(path)
            lcfg.alora_invocation_tokens = tok(inv, add_special_tokens=False).input_ids
            pm = PeftModel.from_pretrained(model, path, adapter_name=name, config=lcfg).eval()
        else:
            pm = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
        for where, ids in prompts(tok, inv).items():
            if inv is None and where != "end":
                continue
            record(f"{name}.{where}", name, ids, pm)
        model = pm.unload()

    # CLI cases: the prompt as the CLI builds it (chat template, or raw text), with --invoke.
    question = "what is the capital of france"
    for invoke in [None, None] + [n for n, s in specs if s.get("invocation") and not s.get("legacy")]:
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=invoke is None)
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(question).input_ids
        m = model
        # No invocation: the base model, alone and beside an aLoRA whose invocation is absent.
        adapters = [] if len(cli) == 0 else ["certainty"]
        if invoke:
            ids = ids + tok(dict(specs)[invoke]["invocation"], add_special_tokens=False).input_ids
            m = PeftModel.from_pretrained(model, os.path.join(folder, "adapters", invoke), adapter_name=invoke).eval()
            adapters = [invoke]
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        cli.append({"prompt": question, "invoke": invoke, "adapters": adapters, "prompt_tokens": ids,
                    "tokens": out[0, len(ids):].tolist(), "text": tok.decode(out[0, len(ids):], skip_special_tokens=True)})
        if invoke:
            model = m.unload()

    save_file(tensors, os.path.join(folder, "goldens.safetensors"))
    with open(os.path.join(folder, "goldens.json"), "w") as f:
        json.dump({"cases": cases, "generations": generations, "cli": cli, "eos": tok.eos_token_id}, f, indent=1)
    print(kind, len(cases), "cases")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/llm")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for kind in ["llama", "granite", "qwen2"]:
        build(kind, a.out)


if __name__ == "__main__":
    main()
