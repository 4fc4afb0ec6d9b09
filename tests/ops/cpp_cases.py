"""Inputs and comparisons of the C++ kernels' own tests (called directly: instruction-set variants, threads,
special values): bit-for-bit equality with the oracles, only the fp64 whole-tensor stats within a tolerance."""

import itertools

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0,), (1,), (7,), (1009,), (37, 129)]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-for-bit equality (signed zeros included), any NaN payload matching any NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    na, nb = a.isnan(), b.isnan()
    assert torch.equal(na, nb), "NaN positions differ"
    ia, ib = a.masked_fill(na, 0).view(_BITS[a.dtype]), b.masked_fill(nb, 0).view(_BITS[b.dtype])
    if not torch.equal(ia, ib):
        bad = (ia != ib).nonzero()[:5].tolist()
        raise AssertionError(
            f"{int((ia != ib).sum())} elements differ, e.g. at {bad}: {a[ia != ib][:5]} vs {b[ia != ib][:5]}"
        )


def close_stats(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def make(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "int":  # small integers: exact sums, many zeros and exact-zero elections
        return torch.randint(-3, 4, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def experts(shape, dtype, kind, T, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    base = make(shape, dtype, kind, g) if with_base else None
    ex = [make(shape, dtype, kind, g) for _ in range(T)]
    if kind == "int" and len(shape) == 2 and shape[0] > 1:  # all-zero columns / rows of deltas
        for e in ex:
            e[:, 0] = base[:, 0] if base is not None else 0
            e[0] = base[0] if base is not None else 0
    return base, ex


def s64(v: int) -> int:
    """The int64 that the bindings take for a seed / key modulo 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def tall_cases(dtype, T):
    """(shape, base, experts, lambdas, mtl) of the C++ TALL tests."""
    g = torch.Generator().manual_seed(T)
    for shape, kind, with_base, with_mtl in itertools.product(
        [(0,), (7,), (37, 129)], ["int", "float"], [True, False], [False, True]
    ):
        base, ex = experts(shape, dtype, kind, T, with_base, seed=T)
        lambdas = (torch.rand(T, generator=g) * 0.8 + 0.2).float()
        mtl = make(shape, torch.float16 if dtype != torch.float16 else torch.bfloat16, kind, g) if with_mtl else None
        yield shape, base, ex, lambdas, mtl
