"""Goldens for A1111 prompt handling (emphasis, BREAK, 75-token chunking with comma backtrack).

A1111 is not a package; this is a line-by-line re-implementation of its
modules/prompt_parser.py::parse_prompt_attention and sd_hijack_clip.py (tokenize_line, the
"Original" emphasis: scale hidden states, restore the chunk mean), run on the tiny2 pipeline's
transformers encoders. SDXL in A1111 takes the penultimate layer of both encoders and the pooled
output of OpenCLIP-G's first chunk.

Writes tests/fixtures/sdxl/tiny2/a1111_prompts.{json,safetensors}.
"""
import json, os, re
from a1111_prompt_parser import parse_prompt_attention
import torch
from safetensors.torch import save_file
from diffusers import StableDiffusionXLPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "sdxl", "tiny2")

def tokenize_line(tok, line, comma_padding_backtrack=20):
    chunk_length = 75
    id_start, id_end, id_pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    comma = tok.get_vocab().get(",</w>")
    parsed = parse_prompt_attention(line)
    tokenized = [tok(t, truncation=False, add_special_tokens=False)["input_ids"] for t, _ in parsed]
    chunks = []
    cur = {"tokens": [], "mult": []}
    last_comma = -1

    def next_chunk():
        nonlocal cur, last_comma
        to_add = chunk_length - len(cur["tokens"])
        if to_add > 0:
            cur["tokens"] += [id_end] * to_add
            cur["mult"] += [1.0] * to_add
        toks = [id_start] + cur["tokens"] + [id_end]
        # SD2/SDXL OpenCLIP: everything after the first end token becomes the pad token.
        if id_pad != id_end:
            idx = toks.index(id_end)
            toks = toks[: idx + 1] + [id_pad] * (len(toks) - idx - 1)
        chunks.append((toks, [1.0] + cur["mult"] + [1.0]))
        last_comma = -1
        cur = {"tokens": [], "mult": []}

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(cur["tokens"])
            elif comma_padding_backtrack != 0 and len(cur["tokens"]) == chunk_length and last_comma != -1 \
                    and len(cur["tokens"]) - last_comma <= comma_padding_backtrack:
                brk = last_comma + 1
                reloc_t, reloc_m = cur["tokens"][brk:], cur["mult"][brk:]
                cur["tokens"], cur["mult"] = cur["tokens"][:brk], cur["mult"][:brk]
                next_chunk()
                cur["tokens"], cur["mult"] = reloc_t, reloc_m
            if len(cur["tokens"]) == chunk_length:
                next_chunk()
            cur["tokens"].append(token)
            cur["mult"].append(weight)
            position += 1
    if cur["tokens"] or not chunks:
        next_chunk()
    return chunks


def encode(pipe, prompt):
    per_encoder, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        zs, ids_all = [], []
        for n, (ids, mult) in enumerate(tokenize_line(tok, prompt)):
            out = enc(torch.tensor([ids]), output_hidden_states=True)
            z = out.hidden_states[-2]
            m = torch.tensor(mult)
            original_mean = z.mean()
            z = z * m.reshape(m.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
            zs.append(z)
            ids_all.append(ids)
            if n == 0 and enc is pipe.text_encoder_2:
                pooled = out.text_embeds
        per_encoder.append((torch.cat(zs, 1), ids_all))
    ctx = torch.cat([per_encoder[0][0], per_encoder[1][0]], -1)
    return ctx, pooled, per_encoder[0][1], per_encoder[1][1]


PROMPTS = [
    "a photo of a cat",
    "a (photo:1.3) of a [cat], (((blue))) dog",
    "a red house BREAK a green tree",
    "\\(sks\\) emblem in (watercolor style",
    ", ".join(["the big blue dog", "a small green tree", "red house on the hill"] * 5) + ", (masterpiece:1.2)",
    " ".join(["landscape mountain river sunset"] * 25),
    "",
]

if __name__ == "__main__":
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "pipeline"), torch_dtype=torch.float32)
    g, js = {}, []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ctx, pooled, ids1, ids2 = encode(pipe, p)
            g[f"p{i}.context"] = ctx[0].contiguous()
            g[f"p{i}.pooled"] = pooled[0].contiguous()
            js.append({"prompt": p, "chunks_1": ids1, "chunks_2": ids2,
                       "fragments": [[t, w] for t, w in parse_prompt_attention(p)]})
    save_file(g, os.path.join(ROOT, "a1111_prompts.safetensors"))
    with open(os.path.join(ROOT, "a1111_prompts.json"), "w") as f:
        json.dump(js, f, indent=1)
    print("wrote", [c["chunks_1"].__len__() for c in js])
