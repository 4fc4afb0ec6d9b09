#!/usr/bin/env python3
"""Compile check of fastmerge's CUDA sources, with nvcc and no GPU (CI runs this).

Compiles (``nvcc -c``, nothing is linked or run):
  * every csrc/cuda/*.cu launcher, against the installed torch's headers, the way setup.py builds them
    (-DFASTMERGE_WITH_CUDA, torch's COMMON_NVCC_FLAGS, -std=c++17, --expt-relaxed-constexpr);
  * tools/cuda_kernels_check.cu, which includes every csrc/cuda/kernels/*.cuh and instantiates every kernel
    for every element-type combination (torch-free);
  * each csrc/cuda/kernels/*.cuh alone, to keep the headers self-contained.
Prints one line per translation unit and exits non-zero on any failure, with nvcc's output. Warnings that
point into this repository's sources are printed too.

nvcc: $CUDA_HOME/bin/nvcc, else the one on PATH. Without nvcc it fails, unless FASTMERGE_ALLOW_NO_NVCC=1
(then it says so and exits 0). A CPU-only torch ships the ATen/c10 CUDA headers but not the configured
c10/cuda/impl/cuda_cmake_macros.h; when that file is missing the check defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE
(the file only carries Windows DLL-export switches).

Usage: python tools/check_cuda.py [--arch sm_90] [--jobs 2] [--verbose]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        cand = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def torch_flags() -> tuple[list[str], list[str]]:
    """(include flags, define/other flags) for translation units that include torch headers."""
    from torch.utils import cpp_extension

    incs = list(cpp_extension.include_paths())
    incs.append(sysconfig.get_paths()["include"])
    flags = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    if not any(os.path.isfile(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in incs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [f"-I{i}" for i in incs], flags


def common_flags(arch: str) -> list[str]:
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except Exception:  # noqa: BLE001 - torch missing: the same flags, spelled out
        COMMON_NVCC_FLAGS = [
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr",
        ]
    flags = ["-c", "-std=c++17", f"-arch={arch}", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
    for f in COMMON_NVCC_FLAGS:
        if f not in flags:
            flags.append(f)
    flags += ["-DFASTMERGE_WITH_CUDA", f"-I{os.path.join(ROOT, 'csrc', 'include')}"]
    return flags


def own_warnings(text: str) -> list[str]:
    """Warning lines of nvcc/host-compiler output that point into this repository (not into torch)."""
    out = []
    for line in text.splitlines():
        if "warning" in line and (ROOT in line or line.startswith(("csrc/", "tools/"))) and ".venv" not in line:
            out.append(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90, the H100)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    ap.add_argument("--verbose", action="store_true", help="print the nvcc command lines")
    args = ap.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        msg = "check_cuda: nvcc not found (set CUDA_HOME or put nvcc on PATH); the CUDA sources were NOT checked"
        if os.environ.get("FASTMERGE_ALLOW_NO_NVCC") == "1":
            print(msg + " (FASTMERGE_ALLOW_NO_NVCC=1: not an error)")
            return 0
        print(msg + " (set FASTMERGE_ALLOW_NO_NVCC=1 to allow this)", file=sys.stderr)
        return 1
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"check_cuda: {nvcc} ({version[-1] if version else 'unknown version'}), -arch={args.arch}")

    base = common_flags(args.arch)
    try:
        t_incs, t_flags = torch_flags()
    except Exception as e:  # noqa: BLE001
        print(f"check_cuda: cannot import torch for its include paths: {e}", file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="fastmerge_check_cuda_")
    units: list[tuple[str, list[str]]] = []  # (label, command)
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        rel = os.path.relpath(src, ROOT)
        obj = os.path.join(tmp, os.path.basename(src) + ".o")
        units.append((rel, [nvcc, *base, *t_incs, *t_flags, "-o", obj, src]))
    kcheck = os.path.join(ROOT, "tools", "cuda_kernels_check.cu")
    units.append(
        (os.path.relpath(kcheck, ROOT), [nvcc, *base, "-o", os.path.join(tmp, "cuda_kernels_check.o"), kcheck])
    )
    for hdr in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", "*.cuh"))):
        name = os.path.basename(hdr)
        tu = os.path.join(tmp, f"alone_{name}.cu")
        with open(tu, "w") as f:
            f.write(f'#include "{hdr}"\n#include "{hdr}"\n')  # twice: include guards work too
        units.append((f"{os.path.relpath(hdr, ROOT)} (alone)", [nvcc, *base, "-o", os.path.join(tmp, name + ".o"), tu]))
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        print("check_cuda: no csrc/cuda/*.cu found", file=sys.stderr)
        return 1

    def run(unit: tuple[str, list[str]]) -> tuple[str, int, str, float]:
        label, cmd = unit
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        return label, p.returncode, p.stdout + p.stderr, time.time() - t0

    failures = 0
    t_start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (label, cmd), (_, rc, out, dt) in zip(units, pool.map(run, units), strict=True):
            status = "ok  " if rc == 0 else "FAIL"
            print(f"{status} {label} ({dt:.1f} s)", flush=True)
            if args.verbose:
                print("     " + " ".join(cmd))
            if rc != 0:
                failures += 1
                print(out.rstrip(), flush=True)
            else:
                for w in own_warnings(out):
                    print(f"     {w}")
    shutil.rmtree(tmp, ignore_errors=True)
    total = len(units)
    print(f"check_cuda: {total - failures}/{total} translation units compiled in {time.time() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
