"""NP-LoRA golden (arXiv 2511.11051): the merged update of every layer both mix fixture LoRAs
adapt, written line by line from the paper's formula with numpy:

    ΔW_s = s_s m_s B_s A_s,  ΔW_c = s_c m_c B_c A_c            (s = alpha / rank, m = strength)
    U Σ Vᵀ = svd(ΔW_s);  V_k = the first k = rank(ΔW_s) right singular vectors
    ΔW = ΔW_s + ΔW_c (I − μ/(1+μ) V_k V_kᵀ),  μ = 0.5

Writes tests/fixtures/mix/np_golden.safetensors: one tensor per layer (every fourth shared UNet module) (kohya module name), f32,
for strengths m_c = 1.0, m_s = 0.7 (the Rust test uses the same).

.venv/bin/python tools/parity/make_np_fixtures.py
"""
import os

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
MIX = os.path.join(HERE, "..", "..", "tests", "fixtures", "mix")
MU = 0.5
M_C, M_S = 1.0, 0.7


def modules(path):
    d = load_file(path)
    out = {}
    for k, v in d.items():
        if k.endswith(".lora_down.weight"):
            m = k[: -len(".lora_down.weight")]
            down = v.astype(np.float64)
            up = d[m + ".lora_up.weight"].astype(np.float64)
            r = down.shape[0]
            alpha = float(d[m + ".alpha"]) if m + ".alpha" in d else r
            out[m] = (up.reshape(up.shape[0], r), down.reshape(r, -1), alpha / r)
    return out


def main():
    c = modules(os.path.join(MIX, "content.safetensors"))
    s = modules(os.path.join(MIX, "style.safetensors"))
    golden = {}
    # Every fourth shared UNet module keeps the file small and still covers every module kind.
    for m in sorted(x for x in set(c) & set(s) if x.startswith("lora_unet_"))[::4]:
        bc, ac, sc = c[m]
        bs, as_, ss = s[m]
        dw_s = ss * M_S * (bs @ as_)
        dw_c = sc * M_C * (bc @ ac)
        _, sig, vt = np.linalg.svd(dw_s, full_matrices=False)
        k = int((sig > sig[0] * 1e-9).sum())  # the style's rank
        v_k = vt[:k].T
        p_soft = np.eye(dw_c.shape[1]) - MU / (1 + MU) * (v_k @ v_k.T)
        golden[m] = (dw_s + dw_c @ p_soft).astype(np.float32)
    save_file(golden, os.path.join(MIX, "np_golden.safetensors"), metadata={"mu": str(MU), "m_c": str(M_C), "m_s": str(M_S)})
    print(f"{len(golden)} layers")


if __name__ == "__main__":
    main()
