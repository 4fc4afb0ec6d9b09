"""The sign-consensus family with each source's semantics (per tensor, and whole-model TIES).

``compat`` picks whose rules apply; the differences are documented in README.md ("Compat modes"):

* ``official`` (prateeky2806/ties-merging and its copies in the TSV/Iso/TALL/AdaMerging repos): keep the
  magnitudes >= the k-th smallest at k = n - int(n*density) (that keeps int(n*density)+1 entries, ties kept),
  elect sign(sum of trimmed deltas), zeros take the majority sign of the elected signs, disjoint mean.
* ``fusionbench``: as official, but the disjoint *sum* by default.
* ``mergekit`` (0.1.5): per tensor, keep the top max(1, int(density*n)) magnitudes, elect from the
  *weighted* deltas, a zero sum counts as +, divide by the sum of the agreeing weights (``normalize``).
* ``peft``: keep the top int(density*n), elect from the unweighted deltas ("total" or "frequency"),
  divide the weighted sum by the *count* of agreeing inputs.

PEFT keeps exactly int(density*n) magnitudes, ties at the cut broken as torch.topk breaks them
(ops.order_window replays its selection). The others keep every magnitude tied at a threshold (>=); mergekit
keeps exactly k through its sort, which the engine's ``compat: mergekit`` path reproduces bit for bit
(fastmerge.methods.task_arithmetic) and this per-tensor function does not.
"""

from __future__ import annotations

import math

import torch

from .. import ops

COMPAT = ("official", "fusionbench", "mergekit", "peft")


def _check_density(density: float, name: str = "density") -> float:
    d = float(density)
    if not 0.0 <= d <= 1.0 or math.isnan(d):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {density}")
    return d


def _compat(compat: str) -> str:
    if compat not in COMPAT:
        raise ValueError(f"compat must be one of {', '.join(COMPAT)}, got {compat!r}")
    return compat


def keep_rank(n: int, density: float, compat: str) -> int | None:
    """The 1-based rank (k-th largest) of the smallest magnitude each source keeps; None: keep everything."""
    density = _check_density(density)
    if _compat(compat) in ("official", "fusionbench"):
        kept = int(n * density)
        return None if kept >= n else kept + 1
    if density >= 1.0:
        return None
    k = int(density * n)
    return max(1, k) if compat == "mergekit" else k


def delta(x: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Task vector x - base, computed in fp32 and rounded once into ``out``'s dtype (fp32 when out is None).

    ``out``: a buffer of x's shape to reuse (saves the page faults of a fresh allocation per task). When all
    three share a dtype this is torch.sub, which computes 16-bit operands in fp32 and rounds once too: the same
    values, about twice as fast as the general fused kernel.
    """
    if base is None:
        return x.float() if out is None else out.copy_(x)
    if out is not None and x.dtype == base.dtype == out.dtype and x.device == base.device == out.device:
        return torch.sub(x, base, out=out)
    return ops.weighted_sum([x, base], [1.0, -1.0], out_dtype=torch.float32 if out is None else out.dtype, out=out)


def magnitude_threshold_for(x: torch.Tensor, density: float, compat: str = "official") -> float:
    """The magnitude threshold ``compat`` would trim x with (keep |x| >= threshold)."""
    k = keep_rank(x.numel(), density, compat)
    return 0.0 if k is None or x.numel() == 0 else ops.magnitude_threshold(x, k)


def magnitude_prune(x: torch.Tensor, density: float, *, compat: str = "official") -> torch.Tensor:
    """Keep the largest magnitudes of x (a task vector) as ``compat`` counts them: PEFT keeps exactly
    int(density * n), in torch.topk's tie order; the others keep every magnitude tied at the cut."""
    if compat == "peft":
        keep = topk_keep(x, keep_rank(x.numel(), density, compat))
        return x.clone() if keep is None else x * keep.to(x.dtype)
    return ops.prune(x, magnitude_threshold_for(x, density, compat))[0]


def topk_keep(x: torch.Tensor, k: int | None) -> torch.Tensor | None:
    """The mask of the k elements torch.topk(|x|, k) returns (PEFT's magnitude prune), ties in its order;
    None when k is None (keep everything)."""
    if k is None:
        return None
    if x.device.type == "cpu":
        return ops.order_window(x, 0, k, topk=True)
    keep = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    keep[torch.topk(x.abs().reshape(-1), k).indices] = True
    return keep.reshape(x.shape)


def dare(x: torch.Tensor, p: float, *, seed: int = 0, key: int | str = 0, rescale: str = "inverse",
         offset: int = 0) -> torch.Tensor:
    """DARE: drop each entry with probability p (counter-based Philox, bit-identical on every backend).

    rescale: "inverse" multiplies kept entries by 1/(1-p) (official DARE, FusionBench, PEFT >= 0.19);
    "l1" matches the L1 norm of x as mergekit does (left unscaled when ||x||_1 < 1e-7, and when everything
    was dropped, where mergekit would produce NaN); "none" keeps them as they are.
    key: an int, or a tensor name hashed with fastmerge.name_key.
    """
    p = _check_density(p, "p")
    k = ops.name_key(key) if isinstance(key, str) else key
    if rescale == "inverse":
        return ops.prune(x, p=p, seed=seed, key=k, offset=offset, scale=1.0 / (1.0 - p) if p < 1 else 1.0)[0]
    if rescale == "none":
        return ops.prune(x, p=p, seed=seed, key=k, offset=offset)[0]
    if rescale != "l1":
        raise ValueError(f"rescale must be 'inverse', 'l1' or 'none', got {rescale!r}")
    out, stats = ops.prune(x, p=p, seed=seed, key=k, offset=offset)
    before, after = float(stats[0]), float(stats[1])
    if before < 1e-7 or after == 0.0:
        return out
    return ops.prune(x, p=p, seed=seed, key=k, offset=offset, scale=before / after)[0]


def breadcrumbs(x: torch.Tensor, density: float, gamma: float, *, per_row: bool = True) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` outliers, keep the next ``density`` fraction.

    per_row=True is the official code (along the last dimension: per row of a matrix, the whole vector
    for 1-D, untouched for 0-D); per_row=False is mergekit's per-tensor ``magnitude_outliers``.
    """
    density, gamma = _check_density(density), _check_density(gamma, "gamma")
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    if per_row:
        d = x.shape[-1]
        rows = x.reshape(-1, d)
        n_top, n_keep = int(d * gamma), int(d * density)
        hi = ops.row_kth_largest_abs(rows, n_top) if n_top else math.inf
        lo = ops.row_kth_largest_abs(rows, min(n_top + n_keep, d))
        return ops.prune(x, lo, hi)[0]
    if density >= 1.0:
        return x.clone()
    n = x.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_bot, n_top = 0, n - target
    hi = ops.magnitude_threshold(x, n_top) if n_top else math.inf
    return ops.prune(x, ops.magnitude_threshold(x, n - n_bot), hi)[0]


def della(x: torch.Tensor, density: float, epsilon: float, *, seed: int = 0, key: int | str = 0,
          rescale: bool = True) -> torch.Tensor:
    """DELLA MagPrune per row: keep probability rises with the magnitude's rank, from density-eps to +eps."""
    if _check_density(density) >= 1.0:
        return x.clone()
    k = ops.name_key(key) if isinstance(key, str) else key
    return ops.della_prune(x, density, epsilon, seed=seed, key=k, rescale=rescale)


def _preset(compat: str, merge: str | None, elect: str | None, normalize: bool) -> tuple[str, str, bool]:
    if compat == "mergekit":
        return elect or "sum", merge or ("wmean" if normalize else "sum"), True
    if compat == "peft":
        return elect or "sum", merge or "mean", False
    return elect or "sum", merge or ("mean" if compat == "official" else "sum"), False


def ties(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    density: float | list[float] = 1.0,
    *,
    weights: float | list[float] | None = None,
    lam: float = 1.0,
    compat: str = "mergekit",
    merge: str | None = None,
    elect: str | None = None,
    normalize: bool = True,
    zero_sign: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES-merging of one tensor: trim each task vector, elect signs, disjoint merge, scale, add base.

    base: the pretrained tensor, or None when ``experts`` are task vectors (PEFT); experts: T tensors.
    density: kept fraction per task (a float or one per task). merge/elect override the compat preset
    ("sum"/"mean"/"wmean"/"max"; "sum"/"count"/"none"). zero_sign: the sign given to exact zero election
    sums (default: + for mergekit/PEFT; the tensor's majority sign for official/fusionbench).
    """
    _compat(compat)
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    dens = list(density) if isinstance(density, (list, tuple)) else [density] * len(experts)
    if len(dens) != len(experts):
        raise ValueError(f"density has {len(dens)} values for {len(experts)} experts")
    el, mg, weighted = _preset(compat, merge, elect, normalize)
    if compat == "peft":  # exactly int(density * n) kept, in torch.topk's tie order: masked task vectors
        pruned = []
        for e, d in zip(experts, dens, strict=True):
            tv = delta(e, base)
            keep = topk_keep(tv, keep_rank(tv.numel(), d, compat))
            pruned.append(tv if keep is None else tv * keep)
        out, _ = ops.ties_merge(None, pruned, ops.ties_params(len(experts), weights=weights), elect=el, merge=mg,
                                zero_sign=1.0 if zero_sign is None else zero_sign, lam=lam,
                                out_dtype=torch.float32)
        if base is not None:
            out = out.add_(base.float())
        return out.to(out_dtype or (base if base is not None else experts[0]).dtype)
    buf = ops.empty(experts[0].shape, torch.float32, experts[0].device)
    lo = [magnitude_threshold_for(delta(e, base, buf), d, compat) for e, d in zip(experts, dens, strict=True)]
    params = ops.ties_params(len(experts), weights=weights, lo=lo)
    if zero_sign is None:
        zero_sign = 1.0
        if compat in ("official", "fusionbench") and el != "none":
            _, counts = ops.ties_merge(base, experts, params, elect=el, merge=mg, write=False)
            zero_sign = float(torch.sign(counts[0] - counts[1]))
    out, _ = ops.ties_merge(base, experts, params, elect=el, merge=mg, weighted_elect=weighted,
                            zero_sign=zero_sign, lam=lam, out_dtype=out_dtype)
    return out


def ties_global(
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    density: float,
    *,
    lam: float = 1.0,
    compat: str = "official",
    merge: str | None = None,
    keys: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """TIES with whole-model trimming, as the official code and FusionBench do, without flattening the model.

    One exact threshold per task over all ``keys`` (default: every tensor of base) from streamed magnitude
    histograms, the whole-model majority sign for zero election sums, then one fused pass per tensor.
    Holds one tensor's worth of temporaries at a time.
    """
    if compat not in ("official", "fusionbench"):
        raise ValueError(f"whole-model trimming follows the official/fusionbench rules, got compat={compat!r}")
    if not experts:
        raise ValueError("experts must hold at least one state dict, got an empty list")
    keys = sorted(base) if keys is None else list(keys)
    for i, sd in enumerate(experts):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise KeyError(f"experts[{i}] lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
    n = sum(base[k].numel() for k in keys)
    lo = []
    for i, sd in enumerate(experts):
        k = keep_rank(n, density, compat)
        if k is None:
            lo.append(0.0)
            continue
        sel = ops.MagnitudeThreshold(base[keys[0]].device)
        for name in keys:
            sel.add(delta(sd[name], base[name]), f"experts[{i}][{name!r}]")
        if sel.select(k):
            for name in keys:
                sel.add(delta(sd[name], base[name]))
        lo.append(sel.threshold())
    el, mg, _ = _preset(compat, merge, None, True)
    params = ops.ties_params(len(experts), lo=lo)
    counts = torch.zeros(2, dtype=torch.int64)
    for name in keys:
        counts += ops.ties_merge(base[name], [sd[name] for sd in experts], params, elect=el, merge=mg,
                                 write=False)[1].cpu()
    zero_sign = float(torch.sign(counts[0] - counts[1]))
    return {
        name: ops.ties_merge(base[name], [sd[name] for sd in experts], params, elect=el, merge=mg,
                             zero_sign=zero_sign, lam=lam)[0]
        for name in keys
    }
