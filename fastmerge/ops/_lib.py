"""What every op file shares: the ``fastmerge`` torch.library namespace and :func:`register`, the normalisation of
inputs and outputs before a kernel runs, the output allocator, and the oracles' task vectors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import context

LIB = torch.library.Library("fastmerge", "DEF")  # noqa: TOR901 - the namespace is owned by this package
OPS: list[str] = []  # every op, in the order its file registered it


def register(schema: str, check: Callable, run: Callable) -> None:
    """Define the op ``fastmerge::<name>`` of ``schema``. Every op mutates preallocated outputs and returns nothing,
    so its fake kernel (torch.compile, fake and meta tensors) is ``check``, and its real kernel is ``check`` then
    ``run`` (normalise the inputs, pick a backend, run it); both take the schema's arguments."""
    name = schema.partition("(")[0]
    LIB.define(schema)

    def impl(*args):
        check(*args)
        run(*args)

    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastmerge::{name}", check, lib=LIB)
    OPS.append(name)


# ---------------------------------------------------------------------------------------------------------
# before a kernel runs: kernels take contiguous tensors (a strided input is copied, visibly)


def contig(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def into(out, call) -> None:
    """Run ``call`` on ``out`` itself when contiguous, else on a contiguous scratch copied back (visible)."""
    if out is None or out.is_contiguous():
        call(out)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        call(tmp)
        out.copy_(tmp)


def host_floats(t: torch.Tensor) -> torch.Tensor:
    """A small per-task table (params, lambdas) as contiguous fp32 on the CPU, where the kernels read it."""
    return t.detach().float().cpu().contiguous()


# ---------------------------------------------------------------------------------------------------------
# outputs of the allocating wrappers


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a buffer from the op context's allocator (host memory only): the engine reuses buffers
    across tensors, since first-touch page faults cost as much as the maths."""
    fn = context.current().allocator
    if fn is not None and torch.device(device).type == "cpu":
        return fn(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def allocating(fn: Callable[[tuple, torch.dtype], torch.Tensor] | None):
    """Within the block, outputs and scratch buffers of the ops come from ``fn(shape, dtype)`` (None: torch)."""
    return context.use(allocator=fn)


# ---------------------------------------------------------------------------------------------------------
# the multi-expert oracles' task vectors


def deltas(base: torch.Tensor | None, experts: list[torch.Tensor]) -> torch.Tensor:
    """(T, N) fp32 task vectors."""
    d = torch.stack([e.float().reshape(-1) for e in experts])
    if base is not None:
        d = d - base.float().reshape(1, -1)
    return d


def task_sum(d: torch.Tensor) -> torch.Tensor:
    """(1, N): the sum of the task vectors d (T, N) in fp32, task by task in order, as every backend adds them."""
    acc = torch.zeros(d.shape[1], device=d.device)
    for t in range(d.shape[0]):
        acc = acc + d[t]
    return acc.reshape(1, -1)
