"""Python reference for `loramix bench --suite library`: the same import job done the way a
Python app would — safetensors header (keys + metadata), a NaN/Inf check of every tensor,
sha256, copy to a temporary file + fsync + rename, one SQLite row per file.

Usage: python import_ref.py SRC_DIR LIBRARY_DIR
"""
import hashlib
import json
import os
import sqlite3
import sys

import numpy as np
from safetensors import safe_open


def main(src, lib):
    os.makedirs(os.path.join(lib, "loras"), exist_ok=True)
    db = sqlite3.connect(os.path.join(lib, "index.sqlite"))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS loras (sha256 TEXT PRIMARY KEY, file_name TEXT, display_name TEXT UNIQUE, size INTEGER,"
               " format TEXT, ranks TEXT, base_model TEXT, module_count INTEGER, trigger_words TEXT, added_at INTEGER)")
    for root, _, files in os.walk(src):
        for name in sorted(files):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(root, name)
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                modules = {k.split(".")[0] for k in keys if k.endswith("lora_down.weight")}
                ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_down.weight")})
                for k in keys:
                    t = f.get_tensor(k)
                    if not np.isfinite(t).all():
                        raise ValueError(f"{path}: {k} has NaN/Inf")
            tags = json.loads(meta.get("ss_tag_frequency", "{}"))
            totals = {}
            for d in tags.values():
                for t, n in d.items():
                    totals[t] = totals.get(t, 0) + n
            triggers = [meta.get("modelspec.trigger_phrase", "")] + sorted(totals, key=lambda t: -totals[t])[:5]
            h = hashlib.sha256()
            tmp = os.path.join(lib, "loras", ".tmp")
            with open(path, "rb") as fi, open(tmp, "wb") as fo:
                while True:
                    b = fi.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
                    fo.write(b)
                fo.flush()
                os.fsync(fo.fileno())
            sha = h.hexdigest()
            os.rename(tmp, os.path.join(lib, "loras", sha + ".safetensors"))
            db.execute("INSERT OR IGNORE INTO loras VALUES (?,?,?,?,?,?,?,?,?,strftime('%s','now'))",
                       (sha, name, name[:-12], os.path.getsize(path), "kohya", json.dumps(ranks),
                        meta.get("ss_base_model_version", ""), len(modules), json.dumps(triggers)))
            db.commit()
    db.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
