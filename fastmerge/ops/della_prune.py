"""della_prune: DELLA's MagPrune, a random drop whose keep probability rises with the magnitude's rank in its row."""

from __future__ import annotations

import torch

from ..backends import select
from ..backends.reference import REFERENCE
from ._checks import check, check_float, check_same
from ._lib import contig, empty, into, register
from .keys import abs_keys
from .philox import philox_uniform, to_i64

SCHEMA = ("della_prune(Tensor x, Tensor(a!) out, float density, float epsilon, int seed, int key, bool rescale) "
          "-> ()")


def _check(x, out, density, epsilon, seed, key, rescale) -> None:
    check_float("x", x)
    check_same("out", out, x, "x")
    check(0.0 <= epsilon < density and density + epsilon <= 1.0,
          lambda: f"need 0 <= epsilon < density and density + epsilon <= 1 (keep probabilities in (0, 1]),"
          f" got density={density} epsilon={epsilon}")


def _run(x, out, density, epsilon, seed, key, rescale) -> None:
    fn = select("della_prune", x.device, (x.dtype,))
    into(out, lambda o: fn(contig(x), o, density, epsilon, seed, key, rescale))


register(SCHEMA, _check, _run)


def della_prune(x, density: float, epsilon: float, *, seed: int = 0, key: int = 0, rescale: bool = True,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DELLA MagPrune per row of the last dimension (see della_prune_ref)."""
    out = empty(x.shape, out_dtype or x.dtype, x.device)
    torch.ops.fastmerge.della_prune(x, out, float(density), float(epsilon), to_i64(seed), to_i64(key), bool(rescale))
    return out


def della_prune_ref(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int = 0,
    key: int = 0,
    rescale: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune, per row of the last dimension (a 1-D tensor is one row).

    x: (..., n). rank = 1 + position of |x| in the row sorted ascending, ties broken by column index;
    rn = (rank - 1) / (n - 1) (0 when n = 1); keep probability p = (density - epsilon) + 2*epsilon*rn;
    keep when u < p (u = philox_uniform at the element's index); kept entries are divided by their own p
    when ``rescale``. Returns a tensor of x's shape in ``out_dtype`` (default x.dtype).
    """
    n = x.shape[-1] if x.dim() else 1
    xf = x.float().reshape(-1, n)
    order = torch.sort(abs_keys(xf), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
    rn = rank.float() / (n - 1) if n > 1 else torch.zeros_like(xf)
    prob = (density - epsilon) + rn * (2 * epsilon)
    u = philox_uniform(x.numel(), seed, key, 0, x.device).reshape(xf.shape)
    res = xf * (u < prob)
    if rescale:
        res = res / prob
    return res.reshape(x.shape).to(out_dtype or x.dtype)


@REFERENCE.kernel("della_prune")
def _reference(x, out, density, epsilon, seed, key, rescale):
    out.copy_(della_prune_ref(x, density, epsilon, seed, key, rescale, out.dtype))
