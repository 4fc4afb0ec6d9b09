"""sha256 of every file `fastmerge merge` writes, for every method, on one generated model family.

A refactor that must not change outputs records this before it starts and compares after:

    python tools/output_hashes.py record hashes.json [--family DIR] [--methods ties,dare_ties]
    python tools/output_hashes.py compare hashes.json

The family (base + 2 experts, Llama-shaped, bf16; tests/_models.py) is generated under DIR the first time.
Seeded methods (DARE, DELLA) run with the engine's default seed, so their outputs are fixed too; the run
record holds no timings, so every file is compared whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PARAMS = {  # per-model parameters (the first expert's; the second gets the same) and global parameters
    "linear": ({"weight": 0.6}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_linear": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs": ({"weight": 0.5, "density": 0.8, "gamma": 0.02}, {}),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.8, "gamma": 0.02}, {}),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "magnitude_prune": ({"weight": 0.5, "density": 0.5}, {}),
    "consensus_ta": ({}, {}),
    "consensus_ties": ({}, {}),
    "slerp": ({}, {"t": 0.3}),
    "tall": ({}, {}),
    "emr": ({}, {}),
    "tsv_m": ({}, {}),
    "iso_c": ({}, {}),
    "iso_cts": ({}, {}),
    "tsv_c": ({}, {}),
    "doge_ta": ({}, {"steps": 20}),
    "doge_am": ({}, {"steps": 20}),
}


def family(root: str) -> list[str]:
    from _models import make_llama_family

    stamp = os.path.join(root, "family.json")
    if not os.path.exists(stamp):
        import torch

        tmp = root + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        make_llama_family(tmp, hidden=256, layers=4, vocab=4096, experts=2, dtype=torch.bfloat16,
                          shard_bytes=[3 << 20, None, 2 << 20])
        with open(os.path.join(tmp, "family.json"), "w") as f:
            json.dump({"hidden": 256, "layers": 4, "vocab": 4096}, f)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return [os.path.join(root, m) for m in ("base", "ft0", "ft1")]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def merge(method: str, models: list[str], work: str) -> dict[str, str]:
    import yaml

    per, glob = PARAMS[method]
    models_cfg = [{"model": m, "parameters": dict(per)} for m in models[1:]]
    cfg = {"merge_method": method, "base_model": models[0], "dtype": "bfloat16", "models": models_cfg}
    if method == "slerp":
        cfg["models"] = [{"model": models[0]}, {"model": models[1]}]
    if method == "linear":  # no base: every model weighted
        del cfg["base_model"]
        weights = (0.2, 0.5, 0.3)
        cfg["models"] = [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)]
    if glob:
        cfg["parameters"] = glob
    path = os.path.join(work, f"{method}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    out = os.path.join(work, method)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run([sys.executable, "-m", "fastmerge", "merge", path, out], capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise SystemExit(f"{method}: fastmerge merge failed:\n{p.stderr[-2000:]}")
    digests = {os.path.relpath(os.path.join(d, n), out): _digest(os.path.join(d, n))
               for d, _, names in os.walk(out) for n in sorted(names)}
    shutil.rmtree(out)  # a large family's outputs would otherwise pile up (GBs per method)
    return digests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("record", "compare"))
    ap.add_argument("file")
    ap.add_argument("--family", default=os.path.join(ROOT, "benchmarks", ".cache", "hash-family"))
    ap.add_argument("--methods", default=",".join(PARAMS))
    args = ap.parse_args()
    models = family(args.family)
    got = {}
    with tempfile.TemporaryDirectory(prefix="fastmerge-hashes-") as work:
        for m in args.methods.split(","):
            got[m] = merge(m, models, work)
            print(f"{m}: {len(got[m])} files", flush=True)
    if args.action == "record":
        with open(args.file, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
        return 0
    with open(args.file) as f:
        want = json.load(f)
    bad = [(m, n) for m in got for n in sorted(set(got[m]) | set(want.get(m, {})))
           if got[m].get(n) != want.get(m, {}).get(n)]
    for m, n in bad:
        print(f"DIFFERS {m}: {n}")
    print(f"{len(bad)} file(s) differ" if bad else "all outputs identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
