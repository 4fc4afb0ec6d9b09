"""tv_combine (test-time adaptation): theta = base + sum_t coef[t, s] * taus[t] over flat parameters cut into
segments s (one per tensor), from one stacked copy of the task vectors, in one pass."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_buffer, check_float
from ._lib import contig, register

SCHEMA = "tv_combine(Tensor base, Tensor taus, Tensor coef, Tensor offsets, Tensor(a!) out) -> ()"


def check_segments(name: str, vec, taus, offsets) -> int:
    """The flat inputs of the TTA ops (tv_combine, tv_coef_grad): ``vec`` fp32 (P,) like taus (T, P), offsets the
    S + 1 segment bounds. Returns S."""
    check_float("taus", taus)
    check(taus.dim() == 2, lambda: f"taus must be (T, P), got shape {tuple(taus.shape)}")
    P = taus.shape[1]
    check(vec.dtype == torch.float32 and tuple(vec.shape) == (P,),
          lambda: f"{name} must be float32 of shape ({P},), got {vec.dtype} {tuple(vec.shape)}")
    check(vec.device == taus.device, lambda: f"{name} is on {vec.device}, taus on {taus.device}")
    check(offsets.dtype == torch.int64 and offsets.dim() == 1 and offsets.numel() >= 1,
          lambda: f"offsets must be 1-D int64 (S + 1 segment bounds), got {offsets.dtype} {tuple(offsets.shape)}")
    return offsets.numel() - 1


def host_offsets(offsets, P: int) -> torch.Tensor:
    """The segment bounds on the CPU, where the kernels read them, checked to rise from 0 to P."""
    off = offsets.detach().cpu().contiguous()
    o = off.tolist()
    check(o[0] == 0 and o[-1] == P and all(x <= y for x, y in zip(o, o[1:], strict=False)),
          lambda: f"offsets must rise from 0 to P={P}, got {o[:3]}...{o[-2:]}")
    return off


def _check(base, taus, coef, offsets, out) -> None:
    S = check_segments("base", base, taus, offsets)
    T = taus.shape[0]
    check(coef.dtype == torch.float32 and tuple(coef.shape) == (T, S),
          lambda: f"coef must be float32 of shape ({T}, {S}), got {coef.dtype} {tuple(coef.shape)}")
    check_buffer("out", out, torch.float32, (taus.shape[1],), taus.device)


def _run(base, taus, coef, offsets, out) -> None:
    off = host_offsets(offsets, taus.shape[1])
    fn = select("tv_combine", taus.device, (taus.dtype,))
    fn(contig(base), contig(taus), coef.detach().float().contiguous(), off, out)


register(SCHEMA, _check, _run)


def tv_combine(base: torch.Tensor, taus: torch.Tensor, coef: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """theta = base + sum_t coef[t, s] * taus[t] over flat parameters, segment s = offsets[s]:offsets[s + 1];
    taus (T, P) fp32/fp16/bf16 (one stacked copy), base (P,) fp32. One pass."""
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    torch.ops.fastmerge.tv_combine(base, taus, coef, offsets, out)
    return out


def segment_ids(offsets: torch.Tensor, device) -> torch.Tensor:
    """The segment of every flat parameter (the oracles of the TTA ops)."""
    off = offsets.tolist()
    return torch.repeat_interleave(torch.arange(len(off) - 1, device=device),
                                   torch.tensor([b - a for a, b in zip(off, off[1:], strict=False)], device=device))


def tv_combine_ref(base: torch.Tensor, taus: torch.Tensor, coef: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """theta = base + sum_t coef[t, seg(p)] * taus[t, p] over flat parameters (segment s = offsets[s]..[s+1])."""
    seg = segment_ids(offsets, taus.device)
    return base.float() + (coef.float()[:, seg] * taus.float()).sum(0)


@REFERENCE.kernel("tv_combine")
def _reference(base, taus, coef, offsets, out):
    out.copy_(tv_combine_ref(base, taus, coef, offsets))
