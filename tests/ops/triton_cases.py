"""Inputs and comparisons of the Triton kernels' own tests, on a CUDA device or on the CPU under the interpreter
(TRITON_INTERPRET=1, fp32/fp16 only): integer-valued inputs, exact comparisons."""

import importlib.util
import os

import pytest
import torch
from _cases import INF

_ON_GPU = torch.cuda.is_available()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the interpreter runs on CPU tensors (it would dereference the device addresses of the experts' pointer table)
DEV = "cuda" if _ON_GPU and not _INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SHAPES = [(0,), (1,), (7,), (257,), (31, 37)]
_TRITON_MARKS = [
    pytest.mark.triton,
    # the interpreter runs the kernels with numpy, which warns on inf * 0 (the reference makes NaN there too)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.skipif(not (_ON_GPU or _INTERPRET), reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


def test(fn):
    """Marks a test of the Triton kernels themselves (selected by ``-m triton``; skipped where they cannot run)."""
    for mark in _TRITON_MARKS:
        fn = mark(fn)
    return fn


def same(a, b):
    """Exact equality (NaN == NaN), same dtype and device."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int_tensor(shape, lo, hi, g):
    return torch.randint(lo, hi, shape, generator=g).float()


def int_experts(shape, T, dtype, with_base, seed=0):
    """Integer-valued base and experts on DEV: deltas in [-3, 3] with all-zero positions (every 5th
    element, and column 0 of a 2-D shape) and exact zero sums (positions 1 mod 5: the last delta cancels the
    others)."""
    g = gen(seed)
    d = int_tensor((T, *shape), -3, 4, g)
    flat = d.view(T, -1)
    flat[:, ::5] = 0
    if T >= 2:
        flat[-1, 1::5] = -flat[:-1, 1::5].sum(0)
    if len(shape) == 2:
        d[:, :, 0] = 0
    base = int_tensor(shape, -4, 5, g) if with_base else None
    experts = [(d[t] + base if with_base else d[t]).to(dtype).to(DEV) for t in range(T)]
    return (base.to(dtype).to(DEV) if with_base else None), experts


def special_values(dtype):
    vals = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, INF, -INF, float("nan"), 1e-30, -6e-39, 65504.0]
    if dtype == torch.float16:
        vals = [v for v in vals if v != 1e-30 and v != -6e-39] + [6e-8, -3e-5]
    return torch.tensor(vals, dtype=torch.float32).to(dtype).to(DEV)


def tall_cases(shape, dtype):
    """(T, base, experts, lambdas, mtl) of the Triton TALL tests."""
    for T, with_base, with_mtl in [(1, True, False), (2, False, True), (3, True, False), (3, False, True)]:
        base, experts = int_experts(shape, T, dtype, with_base, seed=10 + T)
        mtl = int_tensor(shape, -5, 6, gen(T)).to(dtype).to(DEV) if with_mtl else None
        yield T, base, experts, torch.tensor([0.5, 1.0, 0.25][:T], dtype=torch.float32), mtl


def special_experts():
    """(base, experts) of special values (inf, NaN, -0, subnormals), shuffled."""
    sv = special_values(torch.float32)
    g = gen(14)
    experts = [sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(7) for _ in range(3)]
    return sv[torch.randperm(sv.numel(), generator=g).to(DEV)].repeat(7), experts


def random_experts():
    """(base, experts, lambdas): random fp16 data of 2049 elements."""
    g = gen(12)
    experts = [torch.randn(2049, generator=g).to(torch.float16).to(DEV) for _ in range(3)]
    base = torch.randn(2049, generator=g).to(torch.float16).to(DEV)
    return base, experts, torch.tensor([0.6, 1.0, 1.7])
