"""arcee_fusion's quartiles: the multi-kth selection equals the sorted values at the same positions."""

import pytest
import torch

from fastmerge.methods.interpolate import _order_stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1 << 20 | 3])
def test_order_stats_equal_sorted_positions(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    x[::97] = x[0]  # ties
    if n > 10:
        x[5] = float("nan")  # sorted last, as torch.sort puts it
    qs = (0.0, 0.25, 0.5, 0.75, 1.0)
    idx = (torch.tensor(qs) * (n - 1)).long()
    want = torch.sort(x).values[idx]
    got = _order_stats(x, qs)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # the same values (NaN payloads aside)
