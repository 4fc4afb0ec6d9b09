"""The whole engine against mergekit, side by side on the same YAML: `fastmerge merge CFG OUT --quiet` and
`mergekit-yaml CFG OUT --no-copy-tokenizer --random-seed 0 --quiet` as child processes, on a Llama-shaped
~270M-parameter bf16 family (base + 2 fine-tunes, ~0.54 GB each; generated once into benchmarks/.cache/).

Per child: wall time and peak RSS (os.wait4; ru_maxrss is KiB on Linux); inputs are read once beforehand, so
both start from a warm page cache. Recorded in extra_info: GB/s of input read, speed-up and RSS ratio against
mergekit (same method, same session), fastmerge's own summary (engine seconds, stages), mergekit's import time
(`python -c "import mergekit.merge"`, measured separately). Targets: ties >= 15x faster than mergekit at
<= 1/2 of its peak RSS; task_arithmetic >= 5x faster. GPU-only case: fastmerge --device cuda against reading
all inputs from the page cache onto the GPU through pinned memory, in the same run.

    .venv/bin/python -m pytest benchmarks/bench_engine.py -m benchmark -o addopts="" -q
    FASTMERGE_BENCH_THREADS=1 ...   # threads for both children (default: all cores)
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch
import yaml
from _models import make_llama_family

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("FASTMERGE_BENCH_CACHE", os.path.join(HERE, ".cache"))
FAMILY = {"hidden": 1024, "layers": 16, "vocab": 32000, "experts": 2}  # 268M params, bf16
THREADS = int(os.environ.get("FASTMERGE_BENCH_THREADS", os.cpu_count() or 1))
MERGEKIT_YAML = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
HAVE_MERGEKIT = os.path.exists(MERGEKIT_YAML)
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "fastmerge")  # the console script, once pip install -e .
FASTMERGE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "fastmerge"]

METHODS = {  # mergekit's YAML; per-model parameters for ft0 and ft1
    "ties": {"weight": 0.5, "density": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "tsv_m": {},      # not in mergekit 0.1.5: fastmerge alone, against a wall-time target
    "iso_c": {},
}
# mergekit's other methods, each against mergekit-yaml on the same family: per-model parameters, plus
# "_global" (top-level parameters), "_n" (experts used, default 2) and "_base" (False: no base_model)
NEW_METHODS = {
    "linear": {"weight": 0.5, "_base": False}, "nearswap": {"_global": {"t": 0.001}, "_n": 1},
    "model_stock": {}, "sce": {"_global": {"select_topk": 0.5}}, "arcee_fusion": {"_n": 1},
    "multislerp": {"weight": 0.5}, "karcher": {}, "nuslerp": {"weight": 0.5}, "ram": {}, "ramplus_tl": {},
}
METHODS.update(NEW_METHODS)
MERGEKIT_HAS = ("ties", "task_arithmetic", "dare_ties", *NEW_METHODS)
TARGETS = {"ties": {"speedup": 15.0, "rss_ratio": 0.5}, "task_arithmetic": {"speedup": 5.0},
           "tsv_m": {"max_wall_s": 60.0}, "iso_c": {"max_wall_s": 60.0}}

_results: dict[tuple[str, str], dict] = {}  # (method, provider) -> measurements, for the ratios
_import: dict[str, float] = {}


@pytest.fixture(scope="module")
def family() -> list[str]:
    """[base, ft0, ft1] under benchmarks/.cache/, generated once (regenerated when FAMILY changes)."""
    root = os.path.join(CACHE, "llama270m")
    stamp = os.path.join(root, "family.json")
    want = dict(FAMILY, dtype="bfloat16", generator="tests/_models.py:make_llama_family")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return [os.path.join(root, m) for m in ("base", "ft0", "ft1")]
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    paths = make_llama_family(tmp, dtype=torch.bfloat16, **FAMILY)
    with open(os.path.join(tmp, "family.json"), "w") as f:
        json.dump(want, f)
    os.replace(tmp, root)
    return [p.replace(tmp, root) for p in paths]


def _config(method: str, models: list[str]) -> str:
    spec = METHODS[method]
    per = {k: v for k, v in spec.items() if not k.startswith("_")}
    experts = models[1:1 + spec.get("_n", 2)]
    if spec.get("_base", True):
        cfg = {"merge_method": method, "base_model": models[0], "dtype": "bfloat16"}
    else:  # the base as one more weighted model
        cfg = {"merge_method": method, "dtype": "bfloat16"}
        experts = [models[0], *experts]
    cfg["models"] = [{"model": m, "parameters": dict(per)} if per else {"model": m} for m in experts]
    if "_global" in spec:
        cfg["parameters"] = dict(spec["_global"])
    path = os.path.join(CACHE, f"{method}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def _input_files(models: list[str]) -> list[str]:
    return [os.path.join(m, f) for m in models for f in sorted(os.listdir(m)) if f.endswith(".safetensors")]


def _warm(files: list[str]) -> None:
    """Read every input once so both engines start from the page cache."""
    buf = bytearray(64 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


# The child is started by a small launcher process: Linux carries the pre-exec RSS high-water mark over into
# the exec'd program's ru_maxrss, so forking straight from this (large) pytest process would inflate it.
# The launcher also counts the CPU time the rest of the machine used meanwhile (/proc/stat busy time minus the
# child's): other_cpu_s well above 0 means something else competed for the cores (the numbers are suspect).
_LAUNCHER = """
import json, os, sys, time
def busy():  # user + nice + system + irq + softirq seconds, all cores (no idle, iowait, steal)
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0
b0, t0 = busy(), time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall, b1 = time.perf_counter() - t0, busy()
cpu = ru.ru_utime + ru.ru_stime
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "rc": os.waitstatus_to_exitcode(status),
               "cpu_s": cpu, "other_cpu_s": max(0.0, b1 - b0 - cpu)}, f)
"""


def run_child(cmd: list[str], log: str) -> dict:
    """Wall seconds and peak RSS of one child process (os.wait4's rusage; ru_maxrss is KiB on Linux)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    res_path = log + ".rusage.json"
    with open(log, "w") as out:
        # run from the log's folder, not the checkout: `python -c "import mergekit.merge"` puts the working
        # directory first on sys.path, where the checkout's kernels/ would shadow the `kernels` package that
        # transformers imports
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, res_path, *cmd], stdout=out,
                       stderr=subprocess.STDOUT, env=_child_env(), cwd=os.path.dirname(log), check=True)
    with open(res_path) as f:
        res = json.load(f)
    if res["rc"] != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        pytest.fail(f"{cmd[0]} exited with {res['rc']}:\n{tail}")
    return res


def _measure(benchmark, fn, setup, rounds: int) -> list[dict]:
    runs: list[dict] = []
    benchmark.pedantic(lambda: runs.append(fn()), setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    return runs


@pytest.mark.parametrize("provider", ["mergekit", "fastmerge", "torch"])
def test_import_time(benchmark, provider):
    """Interpreter start + import of each engine (mergekit: several seconds through the peft import chain;
    torch alone: the part of fastmerge's start no engine on torch can avoid)."""
    if provider == "mergekit" and not HAVE_MERGEKIT:
        pytest.skip("mergekit is not installed")
    mod = {"mergekit": "mergekit.merge", "fastmerge": "fastmerge.cli", "torch": "torch"}[provider]
    # os._exit: start + import only (the fastmerge CLI skips interpreter teardown the same way)
    runs = _measure(benchmark, lambda: run_child([sys.executable, "-c", f"import {mod}, os; os._exit(0)"],
                                                 os.path.join(CACHE, f"import-{provider}.log")), None, rounds=2)
    _import[provider] = min(r["wall_s"] for r in runs)
    benchmark.extra_info.update(provider=provider, op="import", import_s=round(_import[provider], 3),
                                peak_rss_mb=round(max(r["peak_rss_bytes"] for r in runs) / 2**20, 1))


@pytest.mark.parametrize("mode", ["direct"])
def test_write_floor(benchmark, family, mode):
    """Writing one model's bytes (the merged output's size) into a new file with O_DIRECT, as fastmerge's
    writer does for large tensors: the floor under its write stage. (A buffered floor is not measured: a file
    rewritten right after deleting one reuses the freed page-cache pages and looks several times faster than
    the first write of a merge, which must get fresh pages.)"""
    n = os.path.getsize(_input_files(family[:1])[0]) // (1 << 20) << 20
    path = os.path.join(CACHE, f"write-floor-{mode}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_DIRECT", 0) if mode == "direct" else 0)
    src = mmap.mmap(-1, 8 << 20)
    src.write(b"\x5a" * (8 << 20))

    def write():
        fd = os.open(path, flags, 0o644)
        try:
            os.posix_fallocate(fd, 0, n)
            off = 0
            while off < n:
                off += os.pwrite(fd, src, off)
        finally:
            os.close(fd)
            os.remove(path)

    try:
        benchmark.pedantic(write, rounds=3, iterations=1, warmup_rounds=0)
    except OSError as e:
        pytest.skip(f"{mode} writes are not possible here: {e}")
    benchmark.extra_info.update(provider=mode, op="write_floor", bytes=n,
                                gbps=round(n / benchmark.stats.stats.median / 1e9, 3))


ENGINE_CASES = [(m, p) for m in METHODS for p in ("mergekit", "fastmerge") if p == "fastmerge" or m in MERGEKIT_HAS]


@pytest.mark.parametrize(("method", "provider"), ENGINE_CASES, ids=[f"{m}-{p}" for m, p in ENGINE_CASES])
def test_engine(benchmark, family, method, provider):
    """One merge, end to end (process start, imports, planning, reading, maths, writing)."""
    if provider == "mergekit" and not HAVE_MERGEKIT:
        pytest.skip("mergekit is not installed")
    cfg = _config(method, family)
    out = os.path.join(CACHE, f"out-{method}-{provider}")
    files = _input_files(family)
    in_bytes = sum(os.path.getsize(p) for p in files)
    summary_path = out + ".summary.json"
    if provider == "mergekit":
        cmd = [MERGEKIT_YAML, cfg, out, "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
    else:
        cmd = [*FASTMERGE, "merge", cfg, out, "--quiet", "--summary-json", summary_path]

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        _warm(files)

    slow = provider == "mergekit" or method not in MERGEKIT_HAS
    runs = _measure(benchmark, lambda: run_child(cmd, out + ".log"), setup, rounds=1 if slow else 3)
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = max(r["peak_rss_bytes"] for r in runs)
    info = {"provider": provider, "op": "engine", "method": method, "threads": THREADS, "cmd": " ".join(cmd[:3]),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
            "other_cpu_s": round(max(r["other_cpu_s"] for r in runs), 2),
            "wall_s": round(wall, 3), "peak_rss_mb": round(rss / 2**20, 1), "input_gb": round(in_bytes / 1e9, 3),
            "gbps": round(in_bytes / wall / 1e9, 3)}
    if provider == "mergekit" and "mergekit" in _import:
        info["import_s"] = round(_import["mergekit"], 3)
        info["wall_minus_import_s"] = round(wall - _import["mergekit"], 3)
    if provider == "fastmerge":
        with open(summary_path) as f:
            s = json.load(f)
        info.update(engine_s=round(s["seconds"], 3), engine_gbps=round(s["bytes_read"] / s["seconds"] / 1e9, 3),
                    bytes_read=s["bytes_read"], passes=s.get("passes"),
                    stages={k: round(v, 3) for k, v in s["stages"].items()})
        mk = _results.get((method, "mergekit"))
        if mk:
            info["speedup"] = round(mk["wall_s"] / wall, 2)
            info["rss_ratio"] = round(rss / mk["peak_rss_bytes"], 3)
            if "mergekit" in _import and "fastmerge" in _import:  # both minus interpreter start + imports
                info["speedup_ex_import"] = round((mk["wall_s"] - _import["mergekit"])
                                                  / max(wall - _import["fastmerge"], 1e-3), 2)
            target = TARGETS.get(method)
            if target:
                info["target"] = target
                info["meets_target"] = info["speedup"] >= target["speedup"] and (
                    "rss_ratio" not in target or info["rss_ratio"] <= target["rss_ratio"])
        elif "max_wall_s" in TARGETS.get(method, {}):
            info["target"] = TARGETS[method]
            info["meets_target"] = wall <= TARGETS[method]["max_wall_s"]
            info["eigh1024_fp64_ms"] = _eigh_ms()
    _results[(method, provider)] = {"wall_s": wall, "peak_rss_bytes": rss}
    benchmark.extra_info.update(info)
    shutil.rmtree(out, ignore_errors=True)


PATCHED_CASES = [(m, p) for m in ("ties", "task_arithmetic", "dare_ties") for p in ("stock", "patched")]


@pytest.mark.parametrize(("method", "provider"), PATCHED_CASES, ids=[f"{m}-{p}" for m, p in PATCHED_CASES])
def test_mergekit_patched(benchmark, family, method, provider):
    """mergekit-yaml's command line, stock against fastmerge.integrations.mergekit's patched shim."""
    if not HAVE_MERGEKIT:
        pytest.skip("mergekit is not installed")
    cfg = _config(method, family)
    out = os.path.join(CACHE, f"out-{method}-mergekit-{provider}")
    flags = [cfg, out, "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
    cmd = [MERGEKIT_YAML, *flags] if provider == "stock" else [sys.executable, "-m", "fastmerge.integrations.mergekit",
                                                                 *flags]
    files = _input_files(family)

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        _warm(files)

    runs = _measure(benchmark, lambda: run_child(cmd, out + ".log"), setup, rounds=1 if provider == "stock" else 3)
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = max(r["peak_rss_bytes"] for r in runs)
    info = {"provider": f"mergekit_{provider}", "op": "mergekit_yaml", "method": method, "threads": THREADS,
            "wall_s": round(wall, 3), "peak_rss_mb": round(rss / 2**20, 1)}
    stock = _results.get((method, "mergekit_stock"))
    if provider == "patched" and stock:
        info["speedup"] = round(stock["wall_s"] / wall, 2)
        info["rss_ratio"] = round(rss / stock["peak_rss_bytes"], 3)
        info["target"] = {"speedup": 5.0}
        info["meets_target"] = info["speedup"] >= 5.0
    _results[(method, f"mergekit_{provider}")] = {"wall_s": wall, "peak_rss_bytes": rss}
    benchmark.extra_info.update(info)
    shutil.rmtree(out, ignore_errors=True)


def _eigh_ms() -> float:
    """This VM's speed at the moment, in the unit the subspace methods' CPU time is made of: one fp64
    eigendecomposition of a 1024 x 1024 symmetric matrix on one thread (median of 3). The 2-core VM drifts by
    ~25 % between runs, so wall-time targets are read against it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=g, dtype=torch.float64)
    a = a @ a.T
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.linalg.eigh(a)
            ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return round(statistics.median(ts) * 1e3, 1)


def _read_to_gpu(files: list[str]) -> int:
    """Every input file from the page cache into pinned host memory, then onto the GPU; bytes moved."""
    total = 0
    bufs = []
    for p in files:
        n = os.path.getsize(p)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        view, got = memoryview(host.numpy()), 0
        with open(p, "rb", buffering=0) as f:
            while got < n:
                r = f.readinto(view[got:])
                if not r:
                    raise OSError(f"{p}: short read ({got} of {n} bytes)")
                got += r
        bufs.append(host.to("cuda", non_blocking=True))
        total += n
    torch.cuda.synchronize()
    return total


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["read_to_gpu", "fastmerge_cuda"])
def test_engine_gpu(benchmark, family, provider):
    """ties on the GPU against the floor: reading all inputs from the page cache onto the GPU (pinned)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    files = _input_files(family)
    in_bytes = sum(os.path.getsize(p) for p in files)
    out = os.path.join(CACHE, "out-ties-cuda")
    summary_path = out + ".summary.json"
    info = {"provider": provider, "op": "engine_gpu", "method": "ties", "input_gb": round(in_bytes / 1e9, 3),
            "device": torch.cuda.get_device_name()}
    if provider == "read_to_gpu":
        _warm(files)
        runs = _measure(benchmark, lambda: {"wall_s": _t(lambda: _read_to_gpu(files))}, None, rounds=3)
        wall = statistics.median(r["wall_s"] for r in runs)
        _results[("ties", "read_to_gpu")] = {"wall_s": wall}
    else:
        cmd = [*FASTMERGE, "merge", _config("ties", family), out, "--device", "cuda",
               "--quiet", "--summary-json", summary_path]

        def setup():
            shutil.rmtree(out, ignore_errors=True)
            _warm(files)

        runs = _measure(benchmark, lambda: run_child(cmd, out + ".log"), setup, rounds=3)
        wall = statistics.median(r["wall_s"] for r in runs)
        with open(summary_path) as f:
            s = json.load(f)
        info.update(engine_s=round(s["seconds"], 3), peak_gpu_mb=round(s.get("peak_gpu_bytes", 0) / 2**20, 1),
                    stages={k: round(v, 3) for k, v in s["stages"].items()},
                    peak_rss_mb=round(max(r["peak_rss_bytes"] for r in runs) / 2**20, 1))
        floor = _results.get(("ties", "read_to_gpu"))
        if floor:
            info["read_to_gpu_s"] = round(floor["wall_s"], 3)
            info["engine_vs_read_floor"] = round(s["seconds"] / floor["wall_s"], 2)
        shutil.rmtree(out, ignore_errors=True)
    info.update(wall_s=round(wall, 3), gbps=round(in_bytes / wall / 1e9, 3))
    benchmark.extra_info.update(info)


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
