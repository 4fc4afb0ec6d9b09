"""Build of fastmerge's one native module, fastmerge._C.

The CPU part (C++17, OpenMP) is always built. The CUDA part is built when the installed torch has CUDA and
nvcc is found. Switches (read here only):
  FASTMERGE_BUILD_CUDA=auto|0|1   auto (default): CUDA iff torch.version.cuda and CUDA_HOME; 1 forces it.
  FASTMERGE_SKIP_EXT=1            pure-Python install (reference + Triton backends only).
  FASTMERGE_DEBUG=1               -O0 -g.
Standard knobs apply: TORCH_CUDA_ARCH_LIST, MAX_JOBS. Build against the installed torch with
  pip install --no-build-isolation -e .
"""

import glob
import json
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("FASTMERGE_SKIP_EXT", "0") == "1":
        return [], {}, {"native": False, "reason": "FASTMERGE_SKIP_EXT=1"}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("FASTMERGE_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTMERGE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    use_cuda = mode == "1" or (mode == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    debug = os.environ.get("FASTMERGE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = ["-std=c++17", *opt]
    link = []
    if platform.system() != "Darwin":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = [os.path.relpath(p, ROOT) for p in ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]]
    macros = []
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if use_cuda:
        sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob("csrc/cuda/*.cu"))
        macros.append(("FASTMERGE_WITH_CUDA", "1"))
        extra["nvcc"] = [*opt, "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = CUDAExtension
    ext = ext_cls(
        "fastmerge._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=link,
    )
    info = {
        "native": True,
        "cuda": bool(use_cuda),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "openmp": "-fopenmp" in cxx,
        "debug": debug,
    }
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


ext_modules, cmdclass, build_info = _ext_modules()
with open(os.path.join(ROOT, "fastmerge", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
