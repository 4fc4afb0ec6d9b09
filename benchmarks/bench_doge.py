"""DOGE_TA: the batched closed-form path (fastmerge.algo.doge, fused step kernels, one Adam state per layer) against
the sequential reference written from the spec (tests/peers.py: one layer after the other, autograd on the
row-wise loss, a fresh torch.optim.Adam per layer, the m x m projector), side by side in one run.

Cases: one ViT-B/32 block (6 layers: q, k, v, out 768x768, fc1 3072x768, fc2 768x3072) with 8 tasks, and one
Llama block (hidden 1024: q, k, v, o 1024x1024, gate/up 2752x1024, down 1024x2752) with 2 tasks; `steps`
Adam steps (default: the official 400; FASTMERGE_BENCH_DOGE_STEPS=100 for a quicker run). Records
the speed-up and the relative error of the merged update against the reference.

    .venv/bin/python -m pytest benchmarks/bench_doge.py -m benchmark -o addopts="" -q
"""

from __future__ import annotations

import os

import peers
import pytest
import torch

from fastmerge.algo import doge
from fastmerge.methods.doge import DEFAULTS

STEPS = int(os.environ.get("FASTMERGE_BENCH_DOGE_STEPS", "400"))
BLOCKS = {
    "vit_b32": ([(768, 768)] * 4 + [(3072, 768), (768, 3072)], 8),
    "llama1024": ([(1024, 1024)] * 4 + [(2752, 1024)] * 2 + [(1024, 2752)], 2),
}
_runs: dict[str, dict] = {}


def _layers(block):
    shapes, T = BLOCKS[block]
    g = torch.Generator().manual_seed(0)
    base, tasks = {}, [{} for _ in range(T)]
    for i, (m, n) in enumerate(shapes):
        k = f"vision_model.encoder.layers.0.w{i}.weight"
        base[k] = 0.02 * torch.randn(m, n, generator=g)
        shared = torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g) / 4
        for t in range(T):
            own = torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g) / 6
            tasks[t][k] = base[k] + 1e-3 * (0.5 * shared + own + 0.2 * torch.randn(m, n, generator=g))
    return base, tasks


def _thresholds(base, tasks, keys, density):
    lo = []
    for t in tasks:
        flat = torch.cat([(t[k] - base[k]).reshape(-1) for k in sorted(keys)]).abs()
        lo.append(float(flat.kthvalue(flat.numel() - int(flat.numel() * density)).values))
    return lo


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("provider", ["reference", "fastmerge"])
def test_doge_block(benchmark, provider, block):
    base, tasks = _layers(block)
    keys = sorted(base)
    T = len(tasks)
    if provider == "reference":
        def run():
            return peers.official_doge(base, tasks, keys, steps=STEPS)[0]
    else:
        p = dict(DEFAULTS, steps=STEPS)
        lo = _thresholds(base, tasks, keys, p["density"])

        def run():
            out = {}
            shapes = sorted({tuple(base[k].shape) for k in keys})
            for shape in shapes:
                ks = [k for k in keys if tuple(base[k].shape) == shape]
                taus = torch.stack([torch.stack([t[k] - base[k] for t in tasks]) for k in ks])
                for k, u in zip(ks, doge.doge_ta_update(taus, lo, p), strict=True):
                    out[k] = base[k] + u
            return out

    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    wall = benchmark.stats.stats.median
    info = {"provider": "official" if provider == "reference" else "fast", "op": "doge_ta_block", "block": block,
            "T": T, "steps": STEPS, "layers": len(keys), "wall_s": round(wall, 3)}
    if provider == "reference":
        _runs[block] = {"wall": wall, "out": out}
    elif block in _runs:
        ref = _runs[block]
        err = max(float(((out[k] - base[k]) - (ref["out"][k] - base[k])).norm() / (ref["out"][k] - base[k]).norm())
                  for k in keys)
        info.update(speedup_vs_official=round(ref["wall"] / wall, 2), err_vs_exact=float(f"{err:.3g}"))
    benchmark.extra_info.update(info)
