"""order_window on every backend that registers it, against its oracle (fastmerge/ops/order_window.py), which is
torch's own CPU sort: equal masks, ties included, on inputs where the tie order is the whole question."""

import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel

from fastmerge.ops.order_window import order_window_ref


def _inputs(n: int, dtype: torch.dtype, g: torch.Generator):
    yield "ties", (torch.randint(-6, 7, (n,), generator=g).float() / 4).to(dtype)   # a dozen distinct values
    yield "gauss", torch.randn(n, generator=g).to(dtype)
    yield "bf16-delta", ((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
                         - (torch.randn(n, generator=g) * 0.02 + 0.001).to(torch.bfloat16).float()).to(dtype)
    yield "zeros", torch.zeros(n, dtype=dtype)
    yield "sorted", torch.arange(n, dtype=torch.float32).to(dtype)
    yield "organ-pipe", torch.cat([torch.arange(n // 2), torch.arange(n - n // 2).flip(0)]).float().to(dtype)


def _windows(n: int):
    """Empty, whole, prefix (mergekit's magnitude), middle band (its outliers), single-element windows."""
    return sorted({(0, 0), (0, n), (0, n // 2), (0, max(1, n // 5)), (n // 7, n // 7 + n // 2), (n - 1, n),
                   (n // 3, n // 3 + 1)})


@pytest.mark.parametrize("backend", backends_for("order_window"))
@pytest.mark.parametrize("n", [1, 2, 16, 17, 100, 1009, 20000])
def test_order_window(backend, n):
    dev = device_or_skip(backend)
    g = torch.Generator().manual_seed(n)
    for dtype in dtypes_for(backend, dev):
        for kind, x in _inputs(n, dtype, g):
            for start, stop in _windows(n):
                for desc, topk in ((True, False), (False, False), (True, True), (False, True)):
                    if topk and start:
                        continue
                    out = torch.empty(n, dtype=torch.bool)
                    kernel(backend, "order_window")(x, start, stop, desc, topk, out)
                    want = order_window_ref(x, start, stop, desc, topk)
                    assert torch.equal(out, want), (dtype, kind, start, stop, desc, topk)
                    assert int(out.sum()) == stop - start


@pytest.mark.parametrize("backend", backends_for("order_window"))
def test_order_window_large_bf16(backend):
    """A 1M-element bf16 task vector (coarsely quantised: tens of thousands tied at the cut), the case the
    mergekit masks live on; and special values (NaN sorts first, -0 equals 0, infinities)."""
    device_or_skip(backend)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16)
    delta = (base.float() * (1 + 0.005 * torch.randn(1024, 1024, generator=g))).to(torch.bfloat16) - base
    n = delta.numel()
    for start, stop, desc, topk in [(0, n // 2, True, False), (0, n // 5, True, False),
                                    (n // 100, n // 100 + n // 2, False, False), (0, n // 2, True, True),
                                    (0, n // 100, True, True), (0, n // 64, True, True), (0, n // 64 + 1, True, True)]:
        out = torch.empty(delta.shape, dtype=torch.bool)
        kernel(backend, "order_window")(delta, start, stop, desc, topk, out)
        assert torch.equal(out, order_window_ref(delta, start, stop, desc, topk)), (start, stop, desc, topk)
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0, float("nan")] * 5)
    for start, stop in [(0, 3), (1, 7), (30, 40), (0, 40)]:
        for desc, topk in ((True, False), (False, False), (True, True)):
            start_ = 0 if topk else start
            out = torch.empty(x.shape, dtype=torch.bool)
            kernel(backend, "order_window")(x, start_, stop, desc, topk, out)
            assert torch.equal(out, order_window_ref(x, start_, stop, desc, topk)), (start_, stop, desc, topk)


def test_order_window_depth_limit(C):
    """An input that drives median-of-three quicksort to its depth limit (the heapsort fallback)."""
    n = 1 << 12
    # the "median-of-3 killer" family: pivots land at the edge of every range
    x = torch.empty(n)
    half = n // 2
    for i in range(half):
        x[2 * i] = i + 1 if i % 2 == 0 else half + i + 1 - (i % 2)
        x[2 * i + 1] = float(half + i + 1)
    x = torch.cat([x, torch.full((n,), 3.0), torch.randint(0, 4, (n,)).float()])
    for start, stop, desc in [(0, n, True), (7, n + 13, False), (n // 3, 2 * n, True)]:
        out = torch.empty(x.shape, dtype=torch.bool)
        C.order_window_cpu(x, start, stop, desc, False, out)
        assert torch.equal(out, order_window_ref(x, start, stop, desc))
        C.order_window_cpu(x, 0, stop, desc, True, out)
        assert torch.equal(out, order_window_ref(x, 0, stop, desc, True))


def test_order_window_errors():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="start <= stop"):
        torch.ops.fastmerge.order_window(x, 5, 3, True, False, torch.empty(10, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="out must be bool"):
        torch.ops.fastmerge.order_window(x, 0, 3, True, False, torch.empty(10))
    with pytest.raises(RuntimeError, match="a topk window starts at 0"):
        torch.ops.fastmerge.order_window(x, 2, 3, True, True, torch.empty(10, dtype=torch.bool))


def test_opcheck():
    x = torch.randn(3, 7)
    out = torch.empty(3, 7, dtype=torch.bool)
    torch.library.opcheck(torch.ops.fastmerge.order_window.default, (x, 2, 9, True, False, out))
