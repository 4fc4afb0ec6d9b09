"""Schedule: the order jobs run in, the memory budget, and the same-shape stacks of the methods that merge
stacks (``Method.batch``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from ..io import TensorInfo
from .jobs import Group, Job

# bytes of fp32/fp64 working memory per element and task of a stacked subspace merge (task vectors, the fp64
# copy the Gram eigensolvers take, factors): a stack is capped so that this stays within the memory budget
STACK_WORK = 32
STACK_MAX = 64


def order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """The reference model's (shard, offset) order, so that each input shard is read front to back once."""
    return sorted(tensors, key=lambda ti: (ti.file, ti.start))


def budget_bytes(jobs: list[Job], user_budget: int | None, write: bool) -> int:
    """Bytes that may be in flight (read, being merged, waiting to be written): the user's budget, else twice
    the largest job (one merging while the next is read)."""
    biggest = max((j.in_bytes + (j.out_bytes if write else 0) for j in jobs), default=1)
    if user_budget is not None:
        if user_budget < biggest:
            warnings.warn(f"memory budget {user_budget} B is below the largest tensor's inputs+output "
                          f"({biggest} B); that tensor is processed alone, without prefetch", stacklevel=3)
        return user_budget
    return 2 * biggest


def units(jobs: list[Job], *, stacked: bool, limit: int, tasks: int) -> list[Job | Group]:
    """The jobs as the merge pass takes them: one by one, or (``stacked``) floating jobs grouped by (shape,
    dtypes) in schedule order, each group capped so that its inputs stay within half the memory budget
    ``limit`` and its fp32/fp64 working set for ``tasks`` task vectors within it (at most STACK_MAX tensors)."""
    if not stacked:
        return list(jobs)
    T = max(1, tasks)
    open_: dict[tuple, list[Job]] = {}
    out: list[Job | Group] = []

    def close(key):
        out.append(Group(tuple(open_.pop(key))))

    for j in jobs:
        if not j.floating:
            out.append(j)
            continue
        key = (j.shape, j.out_dtype, tuple(s.dtype for s in j.sources))
        cur = open_.get(key)
        if cur is not None:
            nb = sum(x.in_bytes for x in cur) + j.in_bytes
            work = (sum(x.numel for x in cur) + j.numel) * T * STACK_WORK
            if len(cur) >= STACK_MAX or nb > limit // 2 or work > limit:
                close(key)
                cur = None
        if cur is None:
            open_[key] = cur = []
        cur.append(j)
    for key in list(open_):
        close(key)
    return out
