"""Inputs of the op tests (tests/ops/test_<op>.py) that run every backend registering the op, through its kernel
and the dispatcher: small integers times 1/4, so that every sum is exact in any order and in fp16/bf16 and results
are *equal* to the oracle's, not close. The C++ and Triton kernels' own tests have theirs in cpp_cases.py and
triton_cases.py."""

import torch

INF = float("inf")

SHAPES = [(0,), (1,), (7,), (1009,), (31, 37), (3, 5, 129)]


def qint(shape, dtype, device, lo=-4, hi=5, zero_frac=0.2):
    """Small integers / 4 (exact in fp16/bf16), with a share of exact zeros."""
    x = torch.randint(lo, hi, shape).float() / 4
    x[torch.rand(shape) < zero_frac] = 0
    return x.to(dtype=dtype, device=device)


def experts_for(shape, dtype, device, T, with_base=True):
    base = qint(shape, dtype, device) if with_base else None
    ex = [qint(shape, dtype, device) for _ in range(T)]
    if with_base and len(shape) and shape[-1] > 2:
        # all-zero columns and exact zero election sums
        for e in ex:
            e.view(-1, shape[-1])[:, 0] = base.view(-1, shape[-1])[:, 0]
        if T >= 2:
            d0 = ex[0].float() - base.float()
            ex[1].view(-1, shape[-1])[:, 1] = (base.float() - d0).to(dtype).view(-1, shape[-1])[:, 1]
    return base, ex


def opcheck_args():
    """(base, experts) of torch.library.opcheck's calls: a (9, 5) base and three experts."""
    base = torch.randn(9, 5)
    ex = [torch.randn(9, 5) for _ in range(3)]
    return base, ex


def tall_cases(backend, device, dtypes, shape, T):
    """(dtype, base, experts, lambdas, mtl) of the TALL ops' backend tests, mtl None and given."""
    for dtype in dtypes:
        base, ex = experts_for(shape, dtype, device, T)
        lambdas = torch.tensor([0.5, 1.0, 0.25, 2.0][:T])
        for mtl in (None, qint(shape, dtype, device)):
            yield dtype, base, ex, lambdas, mtl
