"""The oracle as a backend: fastmerge.reference behind the uniform fill-the-outputs signatures.

It runs on any device and dtype (fp64 included); it is the fallback where no kernel fits.
"""

from __future__ import annotations

from .. import reference as ref


def abs_histogram(x, hist, level, prefix):
    hist += ref.abs_histogram(x, level, prefix).to(hist.device)


def row_kth_largest_abs(x, k, out):
    out.copy_(ref.row_kth_largest_abs(x, k))


def prune(x, lo, hi, out, stats, p, seed, key, offset, scale):
    res, st = ref.prune(x, lo, hi, p, seed, key, offset, scale, out.dtype)
    out.copy_(res)
    stats += st.to(stats.device)


def della_prune(x, out, density, epsilon, seed, key, rescale):
    out.copy_(ref.della_prune(x, density, epsilon, seed, key, rescale, out.dtype))


def ties_merge(base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign, lam):
    res, c = ref.ties_merge(
        base,
        experts,
        params,
        seed=seed,
        key=key,
        offset=offset,
        elect=_name(ref.ELECT, elect),
        merge=_name(ref.MERGE, merge),
        weighted_elect=weighted_elect,
        zero_sign=zero_sign,
        lam=lam,
        out_dtype=None if out is None else out.dtype,
    )
    if out is not None:
        out.copy_(res)
    counts += c.to(counts.device)


def tall_masks(base, experts, lambdas, mtl, masks):
    masks.copy_(ref.tall_masks(base, experts, lambdas, mtl))


def consensus_merge(base, experts, lambdas, mtl, min_count, lam, out):
    out.copy_(ref.consensus_merge(base, experts, lambdas, mtl, min_count=min_count, lam=lam, out_dtype=out.dtype))


def emr_elect(base, experts, tau_uni, masks, stats):
    uni, m, st = ref.emr_elect(base, experts, tau_uni.dtype)
    tau_uni.copy_(uni)
    masks.copy_(m)
    stats += st.to(stats.device)


def _name(table: dict[str, int], code: int) -> str:
    return next(k for k, v in table.items() if v == code)


def orth_project(x, u, out):
    out.copy_(ref.orth_project(x, u, out.dtype))


def doge_grad(taus, a, d, out):
    out.copy_(ref.doge_grad(taus, a, d))


def adam_step(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step):
    ref.adam_step(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step)


def tv_combine(base, taus, coef, offsets, out):
    out.copy_(ref.tv_combine(base, taus, coef, offsets))


def tv_coef_grad(grad, taus, offsets, out):
    out.copy_(ref.tv_coef_grad(grad, taus, offsets))
