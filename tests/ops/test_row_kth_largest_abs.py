"""row_kth_largest_abs on every backend that registers it, against its oracle
(fastmerge/ops/row_kth_largest_abs.py)."""

import cpp_cases as cpp
import pytest
import torch
from _backends import backends_for, device_or_skip, dtypes_for, kernel
from _cases import INF, opcheck_args

from fastmerge.ops.row_kth_largest_abs import row_kth_largest_abs_ref


@pytest.mark.parametrize("backend", backends_for("row_kth_largest_abs"))
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 1009), (17, 256), (0, 4)], ids=str)
def test_row_kth_largest_abs(backend, shape):
    dev = device_or_skip(backend)
    for dtype in dtypes_for(backend, dev):
        x = (torch.randint(-6, 7, shape).float() / 4).to(dtype=dtype, device=dev)  # many ties
        for k in sorted({0, 1, shape[1] // 2, shape[1]}):
            out = torch.empty(shape[0], dtype=torch.float32, device=dev)
            kernel(backend, "row_kth_largest_abs")(x, k, out)
            assert torch.equal(out.cpu(), row_kth_largest_abs_ref(x, k).cpu()), (dtype, k)
        y = torch.randn(shape).to(dtype=dtype, device=dev)
        k = max(1, shape[1] // 3) if shape[1] else 0
        out = torch.empty(shape[0], dtype=torch.float32, device=dev)
        kernel(backend, "row_kth_largest_abs")(y, k, out)
        assert torch.equal(out.cpu(), row_kth_largest_abs_ref(y, k).cpu())


def test_opcheck():
    _, e = opcheck_args()
    torch.library.opcheck(torch.ops.fastmerge.row_kth_largest_abs.default, (e[0], 2, torch.empty(9)))


# ---- the C++ kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", cpp.DTYPES)
def test_cpp_row_kth_largest_abs(C, dtype):
    g = torch.Generator().manual_seed(6)
    cases = [
        cpp.make((37, 129), dtype, "int", g),  # many ties
        cpp.make((37, 129), dtype, "float", g),
        cpp.make((1, 1), dtype, "float", g),
        cpp.make((3, 1009), dtype, "float", g),
        torch.zeros(5, 17, dtype=dtype),
        torch.tensor([[0.0, -0.0, INF, -INF, 1e-40, -3.0, 2.0]]).to(dtype),
        torch.empty(0, 9, dtype=dtype),
        torch.empty(4, 0, dtype=dtype),
    ]
    for x in cases:
        cols = x.shape[1]
        for k in sorted({0, 1, cols // 3, cols // 2, cols - 1, cols} & set(range(cols + 1))):
            out = torch.empty(x.shape[0], dtype=torch.float32)
            C.row_kth_largest_abs_cpu(x, k, out)
            cpp.same(out, row_kth_largest_abs_ref(x, k))


def test_cpp_row_kth_largest_abs_many_rows(C):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(96, 1031, generator=g).bfloat16()  # enough rows for several threads
    for k in (1, 500, 1031):
        out = torch.empty(96)
        C.row_kth_largest_abs_cpu(x, k, out)
        cpp.same(out, row_kth_largest_abs_ref(x, k))


def test_cpp_row_kth_largest_abs_bad_k(C):
    with pytest.raises(RuntimeError, match="k"):
        C.row_kth_largest_abs_cpu(torch.ones(2, 3), 4, torch.empty(2))
