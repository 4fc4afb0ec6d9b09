"""Whole-engine A/B: `fastmerge merge` from this checkout against another checkout (a baseline commit, built in
place), alternately on the same machine, same inputs, same threads.

    git worktree add ../base <commit> && (cd ../base && ln -s ../kernels fastmerge/_kernels &&
        python setup.py build_ext --inplace)
    python tools/ab_engine.py ../base --out benchmarks/results/cpu-2core-ab [--rounds 3]

Cases: the 268M Llama-shaped bf16 family of benchmarks/bench_engine.py (ties, task_arithmetic, dare_ties,
della, breadcrumbs, tsv_m, iso_c) and a family of 10 000 tiny fp32 tensors (per-tensor overhead: TIES). Per case
and checkout: the median wall time and peak RSS over the rounds (rounds alternate A, B, so drift hits both);
recorded as the ratio new/baseline, with GB/s of input read. A round that saw other CPU load (other_cpu_s) is
reported, not dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]

import bench_engine  # noqa: E402  (the 268M family, the launcher that measures a child's wall time and RSS)

LARGE = {"ties": {"weight": 0.5, "density": 0.5}, "task_arithmetic": {"weight": 0.5},
         "dare_ties": {"weight": 0.5, "density": 0.5}, "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
         "breadcrumbs": {"weight": 0.5, "density": 0.8, "gamma": 0.02}, "tsv_m": {}, "iso_c": {}}


def tiny_family(root: str, n: int = 10_000) -> list[str]:
    """base + 2 experts of ``n`` fp32 tensors of 16-300 elements each (generated once)."""
    from safetensors.torch import save_file

    names = ("base", "a", "b")
    if os.path.exists(os.path.join(root, "family.json")):
        return [os.path.join(root, m) for m in names]
    g = torch.Generator().manual_seed(0)
    shapes = [(int(torch.randint(4, 20, (1,), generator=g)), int(torch.randint(4, 16, (1,), generator=g)))
              for _ in range(n)]
    base = {f"t.{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for m in names:
        os.makedirs(os.path.join(tmp, m))
        sd = base if m == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, os.path.join(tmp, m, "model.safetensors"))
    with open(os.path.join(tmp, "family.json"), "w") as f:
        json.dump({"tensors": n}, f)
    os.replace(tmp, root)
    return [os.path.join(root, m) for m in names]


def config(work: str, name: str, method: str, params: dict, models: list[str], dtype: str) -> str:
    cfg = {"merge_method": method, "base_model": models[0], "dtype": dtype,
           "models": [{"model": m, "parameters": dict(params)} for m in models[1:]]}
    path = os.path.join(work, f"{name}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run(checkout: str, cfg: str, out: str, log: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.environ["PYTHONPATH"] = checkout  # the launcher passes its environment to the child
    try:
        return bench_engine.run_child([sys.executable, "-m", "fastmerge", "merge", cfg, out, "--quiet"], log)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", help="a checkout of the baseline commit, its extension built in place")
    ap.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join([*LARGE, "tiny_ties"]))
    args = ap.parse_args()
    baseline = os.path.abspath(args.baseline)
    base_rev = subprocess.run(["git", "-C", baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    new_rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    large = bench_engine.family.__wrapped__()
    tiny = tiny_family(os.path.join(bench_engine.CACHE, "tiny10k"))
    results = []
    with tempfile.TemporaryDirectory(prefix="fastmerge-ab-") as work:
        for case in args.cases.split(","):
            if case == "tiny_ties":
                models, cfg = tiny, config(work, case, "ties", LARGE["ties"], tiny, "float32")
            else:
                models, cfg = large, config(work, case, case, LARGE[case], large, "bfloat16")
            files = bench_engine._input_files(models)
            read = sum(os.path.getsize(p) for p in files)
            bench_engine._warm(files)
            runs = {"baseline": [], "new": []}
            for r in range(args.rounds):
                for who, src in (("baseline", baseline), ("new", ROOT)):
                    log = os.path.join(work, f"{case}.{who}.{r}.log")
                    runs[who].append(run(src, cfg, os.path.join(work, "out"), log))
            row = {"case": case, "input_bytes": read}
            for who, rs in runs.items():
                wall = statistics.median(x["wall_s"] for x in rs)
                row[who] = {"wall_s": wall, "peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in rs),
                            "gb_per_s": read / wall / 1e9, "other_cpu_s": max(x["other_cpu_s"] for x in rs),
                            "walls": [x["wall_s"] for x in rs]}
            row["wall_ratio"] = row["new"]["wall_s"] / row["baseline"]["wall_s"]
            row["rss_ratio"] = row["new"]["peak_rss_bytes"] / row["baseline"]["peak_rss_bytes"]
            results.append(row)
            print(f"{case}: baseline {row['baseline']['wall_s']:.2f} s, new {row['new']['wall_s']:.2f} s "
                  f"(x{row['wall_ratio']:.3f}), RSS x{row['rss_ratio']:.3f}", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": bench_engine.THREADS, "torch": torch.__version__}
    with open("/proc/cpuinfo") as f:
        machine["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                              machine["cpu"])
    doc = {"baseline": base_rev, "new": new_rev, "rounds": args.rounds, "machine": machine, "results": results}
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Whole engine, {new_rev} against {base_rev}", "",
             f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, torch {machine['torch']};"
             f" median of {args.rounds} alternating rounds, warm page cache.", "",
             "| case | input | baseline s | new s | new/baseline | GB/s new | peak RSS new/baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['input_bytes'] / 1e9:.2f} GB | {r['baseline']['wall_s']:.2f} | "
                     f"{r['new']['wall_s']:.2f} | {r['wall_ratio']:.3f} | {r['new']['gb_per_s']:.2f} | "
                     f"{r['rss_ratio']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
