"""gta_merge on every backend that registers it, against its oracle (fastmerge/ops/gta_merge.py): the same bits,
since the oracle is mergekit's own sequence of whole-tensor ops (tests/methods/test_mergekit_compat.py checks it
against mergekit)."""

import itertools

import cpp_cases as cpp
import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel

from fastmerge.ops.gta_merge import gta_merge_ref


def _case(shape, dtype, T, g, kind="float"):
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    noise = 0.002 if kind == "float" else 0.0
    experts = [(base.float() + noise * torch.randn(shape, generator=g)
                + (0.003 * torch.randint(-2, 3, shape, generator=g) if kind == "int" else 0)).to(dtype)
               for _ in range(T)]
    return base, experts


def _params(T, dtype, g, scales=False):
    w = torch.tensor([0.3, -0.7, 1.1, 0.5, 0.9, -0.2, 0.45][:T], dtype=dtype).double()
    s = (torch.rand(T, generator=g) + 0.5).to(dtype).double() if scales else torch.ones(T, dtype=torch.float64)
    return torch.stack([w, s], 1)


@pytest.mark.parametrize("backend", backends_for("gta_merge"))
@pytest.mark.parametrize("T", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (33, 129), (0, 4)], ids=str)
def test_gta_merge(backend, T, shape):
    dev = device_or_skip(backend)
    g = torch.Generator().manual_seed(T * 100 + len(shape))
    for dtype, kind in itertools.product(dtypes_for(backend, dev), ("float", "int")):
        base, experts = _case(shape, dtype, T, g, kind)
        masks = [torch.rand(shape, generator=g) < 0.5 for _ in range(T)]
        masks[0] = torch.empty(0, dtype=torch.bool)  # an expert without a mask (density >= 1)
        for consensus, normalize, lam, keep, scales, out_dtype in itertools.product(
                (True, False), (True, False), (1.0, 0.7), ([], masks), (False, True), (dtype, torch.float16)):
            prm = _params(T, dtype, g, scales)
            out = torch.empty(shape, dtype=out_dtype, device=dev)
            args = (base.to(dev), [e.to(dev) for e in experts], [k.to(dev) for k in keep], prm, consensus,
                    normalize, lam, out)
            if backend == "cpp" and dtype == torch.float32 and T > 4:  # the op runs the oracle there
                with pytest.raises(RuntimeError, match="more than 4 experts"):
                    kernel(backend, "gta_merge")(*args)
                torch.ops.fastmerge.gta_merge(*args)
            else:
                kernel(backend, "gta_merge")(*args)
            want = gta_merge_ref(base, experts, keep, prm, consensus, normalize, lam, out_dtype)
            cpp.same(out.cpu(), want)


@pytest.mark.parametrize("dtype", cpp.DTYPES)
def test_cpp_gta_merge_special_values(C, dtype):
    """NaN/inf inputs, signed zeros in the base, exactly cancelling votes (sum 0: positive), zero weights."""
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), -float("inf"), float("nan"), 3e-3, -3e-3])
    base = vals[torch.arange(40) % 10].to(dtype)
    e1 = (base.float() + vals[(torch.arange(40) // 4) % 10] * 0.5).to(dtype)
    e2 = (base.float() - vals[(torch.arange(40) // 4) % 10] * 0.5).to(dtype)
    e3 = base.clone()
    for ex, w in (([e1, e2], [1.0, 1.0]), ([e1, e2, e3], [0.5, 0.0, -0.5]), ([e3], [1.0])):
        prm = torch.stack([torch.tensor(w, dtype=dtype).double(), torch.ones(len(w), dtype=torch.float64)], 1)
        for consensus, normalize in itertools.product((True, False), (True, False)):
            out = torch.empty(40, dtype=dtype)
            C.gta_merge_cpu(base, ex, [], prm, consensus, normalize, 1.0, out)
            cpp.same(out, gta_merge_ref(base, ex, [], prm, consensus, normalize, 1.0))


def test_cpp_gta_merge_threads_and_large(C):
    """1M elements (every thread's share and the block tails), bf16 experts 0.5 % from their base."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(1024, 1023, generator=g) * 0.02).to(torch.bfloat16)
    ex = [(base.float() * (1 + 0.005 * torch.randn(base.shape, generator=g))).to(torch.bfloat16) for _ in range(3)]
    keep = [torch.rand(base.shape, generator=g) < 0.3 for _ in range(3)]
    prm = _params(3, torch.bfloat16, g, scales=True)
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    C.gta_merge_cpu(base, ex, keep, prm, True, True, 0.8, out)
    cpp.same(out, gta_merge_ref(base, ex, keep, prm, True, True, 0.8))


def test_gta_merge_errors():
    x = torch.randn(5)
    with pytest.raises(RuntimeError, match="params must be float64"):
        torch.ops.fastmerge.gta_merge(x, [x], [], torch.ones(1, 2), True, True, 1.0, torch.empty(5))
    with pytest.raises(RuntimeError, match="keep must be empty or hold one mask per expert"):
        torch.ops.fastmerge.gta_merge(x, [x, x], [torch.ones(5, dtype=torch.bool)],
                                      torch.ones(2, 2, dtype=torch.float64), True, True, 1.0, torch.empty(5))


def test_opcheck():
    x = torch.randn(3, 7)
    prm = torch.ones(2, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastmerge.gta_merge.default,
                          (x, [x + 1, x - 1], [], prm, True, True, 0.5, torch.empty(3, 7)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_gta_merge_rounding_edges(C, dtype):
    """Products and sums that land on the dtype's subnormals, its overflow threshold and every exponent
    between: each rounding must be torch's round-to-nearest-even."""
    g = torch.Generator().manual_seed(11)
    n = 1 << 16
    mag = torch.exp2(torch.empty(n).uniform_(-30, 17, generator=g))
    base = (torch.randn(n, generator=g) * mag).to(dtype)
    ex = [(base.float() + torch.randn(n, generator=g) * mag * 0.1).to(dtype) for _ in range(3)]
    for w in ([1.0, 1.0, 1.0], [1e3, -7.3, 0.01], [3e-4, 2.5, -1.0], [60000.0, 1.0, 0.5]):
        prm = torch.stack([torch.tensor(w, dtype=dtype).double(), torch.ones(3, dtype=torch.float64)], 1)
        for consensus, normalize, lam in ((True, True, 1.0), (False, False, 0.37), (True, False, 3.0)):
            out = torch.empty(n, dtype=dtype)
            C.gta_merge_cpu(base, ex, [], prm, consensus, normalize, lam, out)
            cpp.same(out, gta_merge_ref(base, ex, [], prm, consensus, normalize, lam))
