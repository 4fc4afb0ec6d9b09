"""order_window: the elements that torch's CPU sort of |x| puts at positions [start, stop), ties included in
its order, or (``topk``) the k that torch.topk(|x|, k) returns. mergekit ranks magnitudes with
``torch.argsort``/``torch.sort`` on the CPU (fp32 keys) and PEFT with ``torch.topk``, and their masks keep
exactly a window of that order; this op gives the same mask without the sort (csrc/cpu/order_window.cpp replays
only the partitions that hold a window boundary, or topk's heap select)."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_float
from ._lib import contig, into, register

SCHEMA = "order_window(Tensor x, int start, int stop, bool descending, bool topk, Tensor(a!) out) -> ()"


def _check(x, start, stop, descending, topk, out) -> None:
    check_float("x", x)
    check(0 <= start <= stop <= x.numel(),
          lambda: f"need 0 <= start <= stop <= {x.numel()} (elements of x), got [{start}, {stop})")
    check(not topk or start == 0, lambda: f"a topk window starts at 0, got start={start}")
    check(out.dtype == torch.bool and tuple(out.shape) == tuple(x.shape),
          lambda: f"out must be bool of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    check(x.device.type == "cpu" and out.device.type == "cpu",
          lambda: f"order_window reproduces torch's CPU sort: x and out must be CPU tensors, got {x.device}")


def _run(x, start, stop, descending, topk, out) -> None:
    fn = select("order_window", x.device, (x.dtype,))
    into(out, lambda o: fn(contig(x), start, stop, descending, topk, o))


register(SCHEMA, _check, _run)


def order_window(x: torch.Tensor, start: int, stop: int, *, descending: bool = True,
                 topk: bool = False) -> torch.Tensor:
    """Bool mask of x's shape: the elements at positions [start, stop) of torch.sort(|x|.float()), or with
    ``topk`` the ``stop`` elements torch.topk(|x|, stop) returns (see the ref)."""
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    torch.ops.fastmerge.order_window(x, int(start), int(stop), bool(descending), bool(topk), out)
    return out


def order_window_ref(x: torch.Tensor, start: int, stop: int, descending: bool = True,
                     topk: bool = False) -> torch.Tensor:
    """x: floating CPU tensor, 0 <= start <= stop <= x.numel(). The mask of the elements at positions
    [start, stop) of ``torch.sort(x.abs().float().flatten(), descending=descending)`` (stable=False: the tie
    order of torch's CPU sort, which is what mergekit's magnitude masks keep), shaped like x. ``topk`` (start
    0): the elements of ``torch.topk(x.abs().flatten(), stop, largest=descending)`` (PEFT's magnitude prune)."""
    flat = x.abs().reshape(-1)
    if topk:
        chosen = torch.topk(flat, stop, largest=descending).indices
    else:
        chosen = torch.sort(flat.float(), descending=descending).indices[start:stop]
    out = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    out[chosen] = True
    return out.reshape(x.shape)


@REFERENCE.kernel("order_window")
def _reference(x, start, stop, descending, topk, out):
    out.copy_(order_window_ref(x, start, stop, descending, topk))
