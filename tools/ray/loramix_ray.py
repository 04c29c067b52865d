"""Runs a LoRAMix batch manifest on a Ray cluster: one Ray task per shard, each running
`loramix batch run MANIFEST --out DIR --shard I/N` on a node with a GPU (or a custom resource).

Ray delivers tasks at least once: a task whose worker or node dies, or whose loramix process is
killed, runs again (`max_retries`, `retry_exceptions`). The manifest fixes every image's name and
`batch run` keeps a file that already holds its image, so a retried shard finishes its images
without making any twice: the result is exactly once. OUT must be a folder every node sees
(a shared filesystem), as for any cluster job writing files.

    python tools/ray/loramix_ray.py MANIFEST.jsonl --out DIR --shards 8 --num-gpus 1
    python tools/ray/loramix_ray.py MANIFEST.jsonl --out DIR --shards 8 --resource loramix=1 --address auto

The shards' summaries (batch.shard-I-of-N.json) are merged into OUT/batch.json.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ray

# `batch run` exits with 2 when it finished but some manifest lines are bad: running it again
# cannot help, so that is a result, not a failure to retry.
BAD_LINES_EXIT = 2


class ShardFailed(RuntimeError):
    """A loramix process that died or failed: Ray retries the task."""


def _die_with_parent():
    # A loramix process must not outlive the Ray worker that started it (a removed node's worker
    # is killed; its child would otherwise keep running unseen).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_shard(binary, manifest, out, index, count, library=None, env=None):
    """One shard, in this process: runs loramix and returns its summary."""
    cmd = [binary, "batch", "run", manifest, "--out", out, "--shard", f"{index}/{count}"]
    if library:
        cmd += ["--library", library]
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    summary_path = os.path.join(out, f"batch.shard-{index}-of-{count}.json")
    if proc.returncode not in (0, BAD_LINES_EXIT) or not os.path.exists(summary_path):
        raise ShardFailed(f"shard {index}/{count}: {' '.join(cmd)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    with open(summary_path) as f:
        return json.load(f)


def merge(summaries, manifest, count):
    """One summary from the shards' (the shape `batch run` writes for a whole manifest)."""
    lines = sorted((l for s in summaries for l in s["lines"]), key=lambda l: l["line"])
    errors = summaries[0]["errors"] if summaries else []
    # Every shard clusters the whole manifest the same way; each lists the mixes of its own lines.
    clusters = [dict(c, mixes=[]) for c in (summaries[0].get("clusters", []) if summaries else [])]
    for s in summaries:
        for c in s.get("clusters", []):
            for m in c["mixes"]:
                if m not in clusters[c["id"]]["mixes"]:
                    clusters[c["id"]]["mixes"].append(m)
    sharing = {}
    for s in summaries:
        for k, v in s.get("sharing", {}).items():
            sharing[k] = sharing.get(k, 0) + v
    return {
        "manifest": manifest,
        "shard": f"all {count}",
        "jobs": sum(s["jobs"] for s in summaries),
        "images": sum(s["images"] for s in summaries),
        "written": sum(s["written"] for s in summaries),
        "kept": sum(s["kept"] for s in summaries),
        "failed_lines": sum(1 for l in lines if l.get("error")) + len(errors),
        "seconds": max((s["seconds"] for s in summaries), default=0.0),
        "errors": errors,
        "batch_aware": all(s.get("batch_aware", False) for s in summaries),
        "clusters": clusters,
        "sharing": sharing,
        "lines": lines,
    }


def write_atomic(path, data):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".batch.json.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(manifest, out, shards, binary="loramix", library=None, num_gpus=0, resources=None, max_retries=3, env=None, on_submitted=None):
    """Submits one task per shard and waits for them; returns the merged summary."""
    manifest, out = os.path.abspath(manifest), os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    task = ray.remote(run_shard).options(
        num_cpus=1,
        num_gpus=num_gpus,
        resources=resources or {},
        max_retries=max_retries,
        retry_exceptions=True,
    )
    refs = [task.remote(binary, manifest, out, i, shards, library, env) for i in range(1, shards + 1)]
    if on_submitted:
        on_submitted(refs)
    summaries = ray.get(refs)
    merged = merge(summaries, manifest, shards)
    write_atomic(os.path.join(out, "batch.json"), merged)
    return merged


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="a folder every node sees")
    p.add_argument("--shards", type=int, default=None, help="tasks (default: the cluster's GPUs or resource units)")
    p.add_argument("--binary", default=shutil.which("loramix") or "loramix", help="loramix on every node")
    p.add_argument("--library", default=None)
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per task")
    p.add_argument("--resource", action="append", default=[], metavar="NAME=AMOUNT", help="a custom resource per task")
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--address", default=None, help="an existing cluster (auto, or ray://host:port); default: start a local one")
    a = p.parse_args()
    resources = {}
    for r in a.resource:
        name, _, amount = r.partition("=")
        resources[name] = float(amount or 1)
    ray.init(address=a.address)
    shards = a.shards
    if not shards:
        total = ray.cluster_resources()
        key = next(iter(resources), "GPU" if a.num_gpus else "CPU")
        shards = max(1, int(total.get(key, 1) / (resources.get(key) or a.num_gpus or 1)))
    t0 = time.time()
    summary = run(a.manifest, a.out, shards, a.binary, a.library, a.num_gpus, resources, a.max_retries)
    print(
        f"{summary['images']} images in {shards} shards: {summary['written']} written, {summary['kept']} already there, "
        f"{summary['failed_lines']} failed lines; {time.time() - t0:.1f}s; {os.path.join(a.out, 'batch.json')}",
        file=sys.stderr,
    )
    sys.exit(0 if summary["failed_lines"] == 0 else BAD_LINES_EXIT)


if __name__ == "__main__":
    main()
