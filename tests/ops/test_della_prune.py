"""della_prune on every backend that registers it, against its oracle (fastmerge/ops/della_prune.py)."""

import itertools

import cpp_cases as cpp
import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import opcheck_args, qint

from fastmerge.ops.della_prune import della_prune_ref


@pytest.mark.parametrize("backend", backends_for("della_prune"))
@pytest.mark.parametrize("shape", [(1,), (2,), (9,), (4, 33), (2, 3, 17)], ids=str)
def test_della_prune(backend, shape):
    dev = device_or_skip(backend)
    for dtype in dtypes_for(backend, dev):
        x = qint(shape, dtype, dev)
        for density, eps, rescale in [(0.5, 0.1, True), (0.3, 0.3, False), (0.9, 0.05, True)]:
            out = torch.empty(shape, dtype=dtype, device=dev)
            kernel(backend, "della_prune")(x, out, density, eps, 11, 22, rescale)
            want = della_prune_ref(x, density, eps, 11, 22, rescale)
            assert torch.equal(out.cpu(), want.cpu()), (dtype, density, eps)


def test_opcheck():
    _, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.della_prune.default, (e[0], torch.empty(9, 5), 0.5, 0.1, 1, 2, True))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (1009,), (37, 129), (3, 4, 5), (4, 1)])
def test_cpp_della_prune(C, dtype, shape, isa):
    g = torch.Generator().manual_seed(2)
    for kind, (density, eps), rescale, out_dtype in itertools.product(
        ["int", "float"], [(0.5, 0.2), (0.3, 0.0), (0.9, 0.1), (0.2, 0.2)], [True, False], [dtype, torch.float32]
    ):
        x = cpp.make(shape, dtype, kind, g)
        ref = della_prune_ref(x, density, eps, seed=5, key=6, rescale=rescale, out_dtype=out_dtype)
        out = torch.empty(shape, dtype=out_dtype)
        C.della_prune_cpu(x, out, density, eps, 5, 6, rescale)
        cpp.same(out, ref)


def test_cpp_della_prune_many_rows_and_threads(C, isa):
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-40, 41, (64, 2500), generator=g).to(torch.bfloat16) * 0.01  # ties, several blocks a row
    ref = della_prune_ref(x, 0.4, 0.15, seed=-3, key=2**40)
    out = torch.empty_like(x)
    C.della_prune_cpu(x, out, 0.4, 0.15, -3, 2**40, True)
    cpp.same(out, ref)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty_like(x)
        C.della_prune_cpu(x, one, 0.4, 0.15, -3, 2**40, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, out)


def test_cpp_della_prune_empty(C):
    x = torch.empty(3, 0)
    out = torch.empty(3, 0)
    C.della_prune_cpu(x, out, 0.5, 0.1, 0, 0, True)
