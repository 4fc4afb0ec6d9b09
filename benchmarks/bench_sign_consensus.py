"""The sign-consensus family: each fastmerge backend against the oracle and against how mergekit (argsort)
and PEFT (topk) do it today, on real layer shapes. Run with `make bench`; summarise with benchmarks/report.py.
"""

import math

import peers
import pytest
import torch
from conftest import provider_device, record, timed
from shapes import SHAPES, shape_id

import fastmerge
from fastmerge import ops
from fastmerge.algo import ties as sign_consensus

DTYPES = [torch.bfloat16, torch.float32]
DT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _model(shape, dtype, device, T=3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    ex = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(T)]
    return base.to(device), [e.to(device) for e in ex]


def _grid(*providers):
    """Every (provider, shape, dtype) case of one benchmark."""
    axes = (("provider", providers, None), ("shape", SHAPES, shape_id), ("dtype", DTYPES, DT.get))

    def wrap(fn):
        for name, values, ids in axes:
            fn = pytest.mark.parametrize(name, values, ids=ids)(fn)
        return fn

    return wrap


@_grid("cpp", "cuda", "triton", "reference", "mergekit", "peft")
def test_ties(benchmark, forced, provider, shape, dtype):
    """Per-tensor TIES of base + 3 experts at density 0.5, mergekit semantics (PEFT: its own)."""
    dev = provider_device(provider)
    forced(provider)
    base, ex = _model(shape, dtype, dev)
    dens, w = [0.5] * 3, [1.0, 1.0, 1.0]
    if provider == "mergekit":
        fn = lambda: peers.mk_ties(base, ex, dens, w)  # noqa: E731
    elif provider == "peft":
        fn = lambda: base + peers.peft_ties([e - base for e in ex], w, 0.5)  # noqa: E731
    else:
        fn = lambda: fastmerge.ties(base, ex, dens, weights=w, compat="mergekit")  # noqa: E731
    timed(benchmark, fn, dev, rounds=3 if provider not in ("mergekit", "peft", "reference") else 1)
    n = math.prod(shape)
    record(benchmark, bytes_moved=5 * n * base.element_size(), elements=n, op="ties", T=3, provider=provider)


@_grid("cpp", "cuda", "triton", "reference", "mergekit")
def test_dare(benchmark, forced, provider, shape, dtype):
    """DARE drop p=0.5 with 1/(1-p) rescale of one task vector (mergekit-style: bernoulli mask)."""
    dev = provider_device(provider)
    forced(provider)
    x = _model(shape, dtype, dev, T=1)[1][0]
    if provider == "mergekit":
        fn = lambda: x * torch.bernoulli(torch.full_like(x, 0.5)) / 0.5  # noqa: E731
    else:
        fn = lambda: sign_consensus.dare(x, 0.5, seed=1, key="w")  # noqa: E731
    timed(benchmark, fn, dev, rounds=1 if provider == "reference" else 3)
    n = math.prod(shape)
    record(benchmark, bytes_moved=2 * n * x.element_size(), elements=n, op="dare", provider=provider)


@_grid("cpp", "cuda", "triton", "reference", "mergekit", "peft")
def test_threshold(benchmark, forced, provider, shape, dtype):
    """Exact top-50% magnitude threshold of one tensor: histogram select vs argsort (mergekit) / topk (PEFT)."""
    dev = provider_device(provider)
    forced(provider)
    x = _model(shape, dtype, dev, T=1)[1][0]
    n = x.numel()
    k = n // 2
    if provider == "mergekit":
        fn = lambda: x.abs().view(-1).float()[torch.argsort(x.abs().view(-1).float(), descending=True)[k - 1]]  # noqa: E731
    elif provider == "peft":
        fn = lambda: torch.topk(x.abs().reshape(-1), k).values[-1]  # noqa: E731
    else:
        fn = lambda: ops.magnitude_threshold(x, k)  # noqa: E731
    timed(benchmark, fn, dev, rounds=3 if provider not in ("mergekit", "peft") else 1)
    passes = 1 if dtype == torch.bfloat16 else 2
    record(benchmark, bytes_moved=passes * n * x.element_size(), elements=n, op="threshold",
           passes=passes if provider not in ("mergekit", "peft") else None, provider=provider)


@pytest.mark.parametrize("provider", ["cpp", "cuda", "triton"])
def test_global_threshold_1g(benchmark, forced, provider):
    """Whole-model threshold over 2^30 bf16 elements streamed as 16 tensors: one pass (bf16 needs no second)."""
    dev = provider_device(provider)
    forced(provider)
    chunks = [torch.randn(1 << 26, device=dev).to(torch.bfloat16) for _ in range(16)]

    def fn():
        sel = ops.MagnitudeThreshold(dev)
        for c in chunks:
            sel.add(c)
        extra = sel.select(1 << 28)
        assert not extra
        return sel.threshold()

    timed(benchmark, fn, dev, rounds=2)
    record(benchmark, bytes_moved=2 * (1 << 30), elements=1 << 30, op="global_threshold", passes=1, provider=provider)


@pytest.mark.parametrize("shape", SHAPES[:1], ids=shape_id)
@pytest.mark.parametrize("provider", ["cpp", "cuda", "triton", "reference"])
@pytest.mark.parametrize("op", ["row_kth", "tall", "consensus", "emr", "della"])
def test_other_ops(benchmark, forced, provider, op, shape):
    dev = provider_device(provider)
    forced(provider)
    from fastmerge.backends import get_backend

    name = {"row_kth": "row_kth_largest_abs", "tall": "tall_masks", "consensus": "consensus_merge",
            "emr": "emr_elect", "della": "della_prune"}[op]
    if name not in get_backend(provider).ops:
        pytest.skip(f"{provider} has no {name} kernel")
    base, ex = _model(shape, torch.bfloat16, dev)
    fns = {
        "row_kth": lambda: ops.row_kth_largest_abs(ex[0], shape[1] // 5),
        "tall": lambda: ops.tall_masks(base, ex, [0.4] * 3),
        "consensus": lambda: ops.consensus_merge(base, ex, [0.4] * 3),
        "emr": lambda: ops.emr_elect(base, ex),
        "della": lambda: sign_consensus.della(ex[0], 0.5, 0.1, seed=1, key="w"),
    }
    timed(benchmark, fns[op], dev, rounds=2)
    n = math.prod(shape)
    moved = {"row_kth": 2 * n, "della": 4 * n, "tall": 8 * n + 3 * n, "consensus": 10 * n, "emr": 8 * n + 4 * n + 3 * n}
    record(benchmark, bytes_moved=moved[op], elements=n, op=op, provider=provider)
