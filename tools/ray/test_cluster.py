"""The Ray driver on a local 3-node cluster (loopback only, usage stats off): a 48-image manifest
on miniworld, one worker node removed and one loramix process SIGKILLed mid-run. Passes when the
output is exactly the 48 expected files, each byte-identical to one local `batch run` of the same
manifest.

    python tools/ray/test_cluster.py --binary target/debug/loramix
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Loopback only: Ray otherwise replaces 127.0.0.1 with the address it routes to the internet by.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loramix_ray  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def manifest(path, lines=12, images=4, steps=12):
    subjects = ["vlox", "krin", "tebo", "mupa"]
    styles = ["striped", "checkered", "dotted", "painted"]
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({
                "model": os.path.join(ROOT, "models/miniworld"),
                "prompt": f"a {subjects[i % 4]} emblem on a {{teal|cream|navy}} background, {styles[(i // 4) % 4]} style",
                "loras": [{"name": subjects[i % 4], "weight": 1.0}, {"name": styles[(i // 4) % 4], "weight": 0.8}],
                "steps": steps,
                "images": images,
            }) + "\n")
    return [f"{line:05}-{k:04}.png" for line in range(1, lines + 1) for k in range(images)]


def pngs(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".png"))


def loramix_pids(out):
    r = subprocess.run(["pgrep", "-f", f"batch run .* --out {out}"], stdout=subprocess.PIPE, text=True)
    return [int(p) for p in r.stdout.split()]


def check(ok, what):
    print(("ok - " if ok else "not ok - ") + what, flush=True)
    if not ok:
        raise SystemExit(f"ray test failed: {what}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(ROOT, "target/debug/loramix"))
    a = p.parse_args()
    binary = os.path.abspath(a.binary)
    tmp = tempfile.mkdtemp(prefix="loramix-ray-")
    m = os.path.join(tmp, "manifest.jsonl")
    expected = manifest(m)
    check(len(expected) == 48, "the manifest makes 48 images")
    env = {"LORAMIX_HOME": os.path.join(tmp, "home"), "RUST_BACKTRACE": "0"}

    # The reference: one local run.
    local = os.path.join(tmp, "local")
    r = subprocess.run([binary, "batch", "run", m, "--out", local], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    check(r.returncode == 0, f"the local batch run finished ({r.stderr[-500:]})")

    node = {"num_cpus": 1, "resources": {"loramix": 1}}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    workers = [cluster.add_node(**node, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    check(len([n for n in ray.nodes() if n["Alive"]]) == 3, "a 3-node local cluster")

    out = os.path.join(tmp, "ray")
    os.makedirs(out)
    chaos = {}

    def chaos_monkey():
        t0 = time.time()
        while len(pngs(out)) < 8 and time.time() - t0 < 300:
            time.sleep(0.05)
        cluster.remove_node(workers[1])
        chaos["removed_at"] = len(pngs(out))
        while len(pngs(out)) < chaos["removed_at"] + 6 and time.time() - t0 < 300:
            time.sleep(0.05)
        pids = loramix_pids(out)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            chaos["killed_at"] = len(pngs(out))

    t = threading.Thread(target=chaos_monkey, daemon=True)
    t.start()
    t0 = time.time()
    summary = loramix_ray.run(m, out, shards=6, binary=binary, resources={"loramix": 1}, max_retries=5, env=env)
    t.join(timeout=60)
    print(f"# ray run: {time.time() - t0:.1f}s; node removed after {chaos.get('removed_at')} images, a loramix killed after {chaos.get('killed_at')}", flush=True)
    check("removed_at" in chaos and chaos["removed_at"] < 48, "a worker node was removed mid-run")
    check("killed_at" in chaos and chaos["killed_at"] < 48, "a loramix process was SIGKILLed mid-run")
    got = pngs(out)
    check(got == expected, f"exactly the 48 expected files ({len(got)} found)")
    check(len(set(got)) == len(got) and not [n for n in os.listdir(out) if n.endswith(".png") and n not in expected], "no duplicate or extra images")
    same = [n for n in expected if open(os.path.join(out, n), "rb").read() == open(os.path.join(local, n), "rb").read()]
    check(len(same) == 48, f"every file byte-identical to the local run ({len(same)}/48)")
    with open(os.path.join(out, "batch.json")) as f:
        merged = json.load(f)
    check(merged["images"] == 48 and merged["failed_lines"] == 0 and len(merged["lines"]) == 12, "batch.json merges the 6 shards' summaries")
    ray.shutdown()
    cluster.shutdown()
    print("ray: all checks passed", flush=True)


if __name__ == "__main__":
    main()
