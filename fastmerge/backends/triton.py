"""Triton backend: adapter over fastmerge._kernels (imported lazily, on the first call of an op)."""

from __future__ import annotations

import importlib
import importlib.util

UNAVAILABLE = None
if importlib.util.find_spec("triton") is None:
    UNAVAILABLE = "triton is not installed; install it with `pip install triton`"

_MODULES = {
    "abs_histogram": "abs_histogram",
    "prune": "prune",
    "ties_merge": "ties_merge",
    "tall_masks": "consensus",
    "consensus_merge": "consensus",
    "emr_elect": "emr",
    "orth_project": "orth_project",
    "doge_grad": "doge",
    "adam_step": "doge",
    "tv_combine": "tta",
    "tv_coef_grad": "tta",
}


def _launcher(op: str):
    mod = importlib.import_module(f"fastmerge._kernels.{_MODULES[op]}")
    return getattr(mod, op)


def abs_histogram(x, hist, level, prefix):
    _launcher("abs_histogram")(x, hist, level, prefix)


def prune(x, lo, hi, out, stats, p, seed, key, offset, scale):
    _launcher("prune")(x, lo, hi, out, stats, p, seed, key, offset, scale)


def ties_merge(base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign, lam):
    _launcher("ties_merge")(
        base, experts, params, out, counts, seed, key, offset, elect, merge, weighted_elect, zero_sign, lam
    )


def tall_masks(base, experts, lambdas, mtl, masks):
    _launcher("tall_masks")(base, experts, lambdas, mtl, masks)


def consensus_merge(base, experts, lambdas, mtl, min_count, lam, out):
    _launcher("consensus_merge")(base, experts, lambdas, mtl, min_count, lam, out)


def emr_elect(base, experts, tau_uni, masks, stats):
    _launcher("emr_elect")(base, experts, tau_uni, masks, stats)


def orth_project(x, u, out):
    _launcher("orth_project")(x, u, out)


def doge_grad(taus, a, d, out):
    _launcher("doge_grad")(taus, a, d, out)


def adam_step(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step):
    _launcher("adam_step")(param, grad, exp_avg, exp_avg_sq, scale, repeat, lr, beta1, beta2, eps, step)


def tv_combine(base, taus, coef, offsets, out):
    _launcher("tv_combine")(base, taus, coef, offsets, out)


def tv_coef_grad(grad, taus, offsets, out):
    _launcher("tv_coef_grad")(grad, taus, offsets, out)
