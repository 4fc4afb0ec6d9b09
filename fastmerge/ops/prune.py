"""prune: magnitude band + random drop, then rescale (magnitude prune, Breadcrumbs and DARE in one op), with the
L1 statistics mergekit's rescaling needs."""

from __future__ import annotations

import math

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_buffer, check_float, check_same
from ._lib import contig, empty, into, register
from .philox import philox_uniform, to_i64

SCHEMA = ("prune(Tensor x, Tensor lo, Tensor hi, Tensor(a!) out, Tensor(b!) stats, float p, int seed, int key, "
          "int offset, float scale) -> ()")


def _check(x, lo, hi, out, stats, p, seed, key, offset, scale) -> None:
    check_float("x", x)
    check_float("out", out)
    check_same("out", out, x, "x")
    for n, t in (("lo", lo), ("hi", hi)):
        check(t.dtype == torch.float32 and t.dim() == 1, lambda n=n: f"{n} must be 1-D float32")
    check(lo.numel() == hi.numel(), lambda: f"lo has {lo.numel()} entries, hi has {hi.numel()}")
    r = lo.numel()
    check(r >= 1 and x.numel() % r == 0, lambda: f"lo/hi ({r} rows) must divide x.numel()={x.numel()}")
    check_buffer("stats", stats, torch.float64, (2,), x.device)
    check(0.0 <= p <= 1.0, lambda: f"p (drop probability) must be in [0, 1], got {p}")
    check(offset >= 0, lambda: f"offset must be >= 0, got {offset}")


def _run(x, lo, hi, out, stats, p, seed, key, offset, scale) -> None:
    fn = select("prune", x.device, (x.dtype,))
    into(out, lambda o: fn(contig(x), contig(lo), contig(hi), o, stats, p, seed, key, offset, scale))


register(SCHEMA, _check, _run)


def _rows(v, rows: int, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float32).reshape(-1)
    return torch.full((rows,), float(v), dtype=torch.float32, device=device)


def prune(x: torch.Tensor, lo: float | torch.Tensor = 0.0, hi: float | torch.Tensor = math.inf, *, p: float = 0.0,
          seed: int = 0, key: int = 0, offset: int = 0, scale: float = 1.0,
          out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x * [lo <= |x| < hi] * [u >= p] * scale, and fp64 [sum |x|, sum |kept|].

    lo/hi: floats (per tensor) or fp32 tensors of one value per row of the last dimension.
    u: Philox uniform of (seed, key) at each element's linear index + offset.
    """
    rows = lo.numel() if isinstance(lo, torch.Tensor) else hi.numel() if isinstance(hi, torch.Tensor) else 1
    out = empty(x.shape, out_dtype or x.dtype, x.device)
    stats = torch.zeros(2, dtype=torch.float64, device=x.device)
    torch.ops.fastmerge.prune(
        x, _rows(lo, rows, x.device), _rows(hi, rows, x.device), out, stats, float(p), to_i64(seed),
        to_i64(key), int(offset), float(scale),
    )
    return out, stats


def prune_ref(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float = 0.0, seed: int = 0, key: int = 0,
              offset: int = 0, scale: float = 1.0,
              out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude band + random drop, then rescale: magnitude prune, Breadcrumbs and DARE in one op.

    x: any shape, viewed as (R, numel/R) where R = lo.numel() = hi.numel() (R = 1: per tensor, R = rows:
    per row of the last dimension). lo, hi: fp32 (R,).
    keep = (lo <= |x| < hi) and (u >= p), with u = philox_uniform(seed, key) at the element's index.
    Returns (x * keep * scale in ``out_dtype`` (default x.dtype), fp64 (2,) = [sum |x|, sum |x * keep|]).
    The second output is what mergekit's L1-norm rescaling needs. p = 0 never drops (u >= 0).
    """
    rows = lo.numel()
    xf = x.float().reshape(rows, -1)
    a = xf.abs()
    keep = (a >= lo.float().reshape(rows, 1)) & (a < hi.float().reshape(rows, 1))
    if p > 0:
        keep &= (philox_uniform(x.numel(), seed, key, offset, x.device) >= p).reshape(rows, -1)
    kept = xf * keep
    stats = torch.stack([a.double().sum(), kept.abs().double().sum()])
    return (kept * scale).reshape(x.shape).to(out_dtype or x.dtype), stats


@REFERENCE.kernel("prune")
def _reference(x, lo, hi, out, stats, p, seed, key, offset, scale):
    res, st = prune_ref(x, lo, hi, p, seed, key, offset, scale, out.dtype)
    out.copy_(res)
    stats += st.to(stats.device)
