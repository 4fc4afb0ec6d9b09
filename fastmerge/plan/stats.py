"""Streamed statistics passes before the merge pass: whole-model magnitude thresholds per task (exact, from
streamed histograms) and TIES' whole-model zero-sign rule (``fastmerge.trim: global``)."""

from __future__ import annotations

import time

import torch

from .. import ops
from ..algo import ties as sign_consensus
from .jobs import Job


def magnitude_thresholds(run, jobs: list[Job], densities: list[float], rule: str) -> list[float]:
    """Per expert, the magnitude threshold keeping its top ``densities[t]`` task-vector entries over all
    ``jobs`` together (fastmerge.algo.ties.keep_rank's ``rule``; 0.0 keeps everything): exact, from streamed
    histograms over ``run.stream`` (fastmerge.execute.executor), one pass for bf16 inputs and two otherwise."""
    cfg = run.cfg
    experts = [i for i, m in enumerate(cfg.models) if m is not cfg.base]
    bi = cfg.models.index(cfg.base)
    n = sum(j.numel for j in jobs)
    ks = [sign_consensus.keep_rank(n, d, rule) for d in densities]
    sels = [ops.MagnitudeThreshold(run.device) for _ in experts]
    active = [t for t, k in enumerate(ks) if k is not None]

    def feed(job: Job, tensors: list[torch.Tensor]) -> None:
        buf = ops.empty(job.shape, torch.float32, run.device)
        for t in active:
            sels[t].add(sign_consensus.delta(tensors[experts[t]], tensors[bi], buf),
                        f"{cfg.models[experts[t]].label}: {job.name}")

    if active:
        run.stream(jobs, feed, "stats: magnitudes")
        again = [t for t in active if sels[t].select(ks[t])]
        if again:
            active = again
            run.stream(jobs, feed, "stats: refine")
    return [sels[t].threshold() if ks[t] is not None else 0.0 for t in range(len(experts))]


def global_trim(run) -> None:
    """``fastmerge.trim: global``: each task's whole-model magnitude threshold into ``run.stats["lo"]`` and,
    under the official rule, the whole-model zero-sign rule into ``run.stats["zero_sign"]``."""
    cfg = run.cfg
    if cfg.options.get("trim") != "global":
        return
    t0 = time.perf_counter()
    compat = cfg.options.get("compat", "mergekit")
    rule = "mergekit" if compat == "mergekit" and run.method.mergekit_trim else "official"
    experts = [i for i, m in enumerate(cfg.models) if m is not cfg.base]
    bi = cfg.models.index(cfg.base)
    jobs = [j for j in run.jobs if j.floating]
    dens = [float(jobs[0].per_input[i]["density"]) if jobs else 1.0 for i in experts]
    lo = run.stats["lo"] = magnitude_thresholds(run, jobs, dens, rule)
    if rule == "official":
        counts = torch.zeros(2, dtype=torch.int64)
        params = ops.ties_params(len(experts), lo=lo)

        def count(job: Job, tensors: list[torch.Tensor]) -> None:
            ex = [tensors[i] for i in experts]
            counts.add_(ops.ties_merge(tensors[bi], ex, params, elect="sum", merge="sum", write=False)[1].cpu())

        run.stream(jobs, count, "stats: signs")
        run.stats["zero_sign"] = float(torch.sign(counts[0] - counts[1]))
    run.stages["stats"] += time.perf_counter() - t0
