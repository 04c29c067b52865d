"""Golden values for EigenLoRAx subspaces (src/lora/subspace.rs), written line by line in numpy
from the maths in that module's doc (and ../shared/notes/algorithms.md §6), independently of the
Rust code:

  1. fold the scale into the up factor: ΔW = (s·U) D;
  2. canonical factors from the thin SVD of ΔW: B = U_Δ √Σ, Aᵀ = V_Δ √Σ (rank r), each column's
     sign fixed so that the entry of B's column with the largest magnitude is positive;
  3. per side, stack every member's columns, subtract the mean column when centred, SVD, keep K
     leading left singular vectors (fixed K, or the fewest reaching an energy share), each
     component's sign fixed the same way;
  4. loadings L = Cᵀ (X − μ 1ᵀ); reconstruction C L + μ 1ᵀ.

python tools/parity/make_subspace_fixtures.py   (writes tests/fixtures/subspace/golden.safetensors)
"""
import json
import os

import numpy as np
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "subspace", "golden.safetensors")
# (name, out, in (flattened), rank per member)
MODULES = [("linear", 12, 10, [3, 2, 3]), ("conv", 6, 36, [2, 2, 1])]
SCALES = [0.5, 1.0, 2.0]
CASES = [("uncentred_k4", "uncentred", ("fixed", 4)), ("centred_k4", "centred", ("fixed", 4)),
         ("uncentred_e90", "uncentred", ("energy", 0.9)), ("centred_full", "centred", ("fixed", 100))]


def sign_fix(cols):
    """Flip each column so its largest-magnitude entry is positive; returns the signs."""
    idx = np.argmax(np.abs(cols), axis=0)
    return np.where(cols[idx, np.arange(cols.shape[1])] < 0, -1.0, 1.0)


def canonical(up, down, scale):
    dw = (up * scale) @ down
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    r = up.shape[1]
    u, s, vt = u[:, :r], s[:r], vt[:r]
    keep = (s > s.max() * 1e-12) & (s > 0)
    u, s, vt = u[:, keep], s[keep], vt[keep]
    b = u * np.sqrt(s)
    a = vt.T * np.sqrt(s)
    sg = sign_fix(b)
    return b * sg, a * sg


def fit(cols, centred, rule):
    mean = cols.mean(axis=1) if centred else np.zeros(cols.shape[0])
    u, s, _ = np.linalg.svd(cols - mean[:, None], full_matrices=False)
    avail = int(np.sum(s > s[0] * 1e-9))  # rank deficiency is never kept
    if rule[0] == "fixed":
        k = min(rule[1], avail)
    else:
        total, acc, k = float(np.sum(s ** 2)), 0.0, 0
        while k < avail and (total == 0 or acc < rule[1] * total * (1 - 1e-12)):
            acc += s[k] ** 2
            k += 1
        k = min(max(k, 1), avail)
    c = u[:, :k]
    return c * sign_fix(c), mean


def main():
    rng = np.random.default_rng(20261204)
    t = {}
    members = []
    for i, scale in enumerate(SCALES):
        m = {}
        for name, o, n, ranks in MODULES:
            r = ranks[i]
            up = rng.standard_normal((o, r)).astype(np.float32)
            down = rng.standard_normal((r, n)).astype(np.float32)
            t[f"m{i}.{name}.up"] = up
            t[f"m{i}.{name}.down"] = down
            b, a = canonical(up.astype(np.float64), down.astype(np.float64), scale)
            t[f"m{i}.{name}.canonical_up"] = b.astype(np.float32)
            t[f"m{i}.{name}.canonical_down_t"] = a.astype(np.float32)
            m[name] = (b, a)
        members.append(m)
    for case, centering, rule in CASES:
        for name, o, n, _ in MODULES:
            bases = {}
            for side, dim in (("up", o), ("down", n)):
                cols = np.concatenate([m[name][0 if side == "up" else 1] for m in members], axis=1)
                c, mean = fit(cols, centering == "centred", rule)
                bases[side] = (c, mean)
                t[f"{case}.{name}.{side}.components"] = c.T.astype(np.float32).copy()  # [k, dim]
                t[f"{case}.{name}.{side}.mean"] = mean.astype(np.float32)
            for i, m in enumerate(members):
                num = den = 0.0
                b, a = m[name]
                lb = bases["up"][0].T @ (b - bases["up"][1][:, None])
                la = bases["down"][0].T @ (a - bases["down"][1][:, None])
                t[f"{case}.m{i}.{name}.up"] = lb.T.astype(np.float32).copy()  # [r, k]
                t[f"{case}.m{i}.{name}.down"] = la.T.astype(np.float32).copy()
                rb = bases["up"][0] @ lb + bases["up"][1][:, None]
                ra = bases["down"][0] @ la + bases["down"][1][:, None]
                dw, rdw = b @ a.T, rb @ ra.T
                t[f"{case}.m{i}.{name}.error"] = np.array([np.linalg.norm(rdw - dw) / np.linalg.norm(dw)], dtype=np.float32)
    meta = {"modules": json.dumps(MODULES), "scales": json.dumps(SCALES), "cases": json.dumps(CASES)}
    # safetensors writes an array's memory as it lies; SVD outputs and .T are Fortran-ordered.
    t = {k: np.ascontiguousarray(v) for k, v in t.items()}
    save_file(t, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(t)} tensors")


if __name__ == "__main__":
    main()
