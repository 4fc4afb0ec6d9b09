"""One test-time-adaptation optimisation step: fastmerge's fused path (tv_combine builds theta(lambda) from one
stacked copy of the task vectors, tv_coef_grad reduces <dL/dtheta, tau_t> per tensor) against the plain
torch.func.functional_call + autograd implementation of the same step (T products per tensor in the graph),
side by side in one run. Both run 20 steps from the same start; the largest coefficient (and head) difference
after them is recorded (``max_coef_diff``, ``max_head_diff``).

Cases: ``blocks4`` — four ViT-B/32-shaped MLP blocks (in 2304x768, out 768x768, fc 3072x768, proj 768x3072 with
biases; 28.3M parameters), 8 tasks, a batch of 8 vectors per task (the merge machinery dominates), AdaMerging
layer-wise and Model Tinting; ``minilm`` — the `make demo` MiniLM encoder with 4 of its real experts and the
official AdaMerging batch (2 x 16 sentences per task), when the demo cache exists.

    .venv/bin/python -m pytest benchmarks/bench_tta.py -m benchmark -o addopts="" -q
"""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
from torch import nn

from fastmerge import tta

STEPS = 20
_runs: dict[str, dict] = {}


class Blocks(nn.Module):
    def __init__(self, n=4, d=768):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(n):
            self.layers.append(nn.ModuleDict({"inp": nn.Linear(d, 3 * d), "out": nn.Linear(d, d),
                                              "fc": nn.Linear(d, 4 * d), "proj": nn.Linear(4 * d, d)}))

    def forward(self, x):
        for blk in self.layers:
            q, k, v = blk["inp"](x).chunk(3, -1)
            x = x + blk["out"](torch.tanh(q) * k + v)
            x = x + blk["proj"](torch.relu(blk["fc"](x)))
        return x


def _blocks_setup(T=8):
    torch.manual_seed(0)
    model = Blocks()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [{k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for _ in range(T)]
    tv = tta.TaskVectors.from_state_dicts(base, experts)
    heads = [nn.Linear(768, 10) for _ in range(T)]
    g = torch.Generator().manual_seed(1)
    loaders = [[torch.randn(8, 768, generator=g) * 0.1 for _ in range(4)] for _ in range(T)]
    return model, tv, heads, loaders, None


def _minilm_setup():
    root = os.path.expanduser(os.environ.get("FASTMERGE_DEMO_CACHE", "~/.cache/fastmerge-demo"))
    experts = sorted(glob.glob(os.path.join(root, "experts", "*")))
    base = os.path.join(root, "base-all-minilm-l6-v2")
    if len(experts) < 2 or not os.path.isdir(base):
        pytest.skip("run `make demo` first: it caches the MiniLM base and experts")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from minilm import tasks as mt

    model, tok = mt.load_model(base), mt.load_tokenizer(base)
    names = [os.path.basename(e).rsplit("-", 1)[0] for e in experts]
    tlist = [mt.load_task(n) for n in names]
    tv = tta.TaskVectors.from_checkpoints(os.path.join(base, "model.safetensors"),
                                          {n: os.path.join(e, "model.safetensors") for n, e in zip(names, experts,
                                                                                                   strict=True)})
    heads = []
    for t in tlist:
        h = nn.Linear(model.config.hidden_size, len(t.classes), bias=False)
        with torch.no_grad():
            h.weight.copy_(mt.LOGIT_SCALE * mt.class_head(model, tok, t))
        heads.append(h)
    loaders = []
    for t in tlist:
        texts = [x for x, _ in t.test[:64]]
        loaders.append([tok(texts[i:i + 16], padding=True, truncation=True, max_length=mt.MAX_LEN,
                            return_tensors="pt") for i in range(0, 64, 16)])

    def forward_fn(m, batch):
        return mt.encode(m, batch)

    return model, tv, heads, loaders, forward_fn


SETUPS = {"blocks4": _blocks_setup, "minilm": _minilm_setup}
CASES = [("blocks4", "adamerging"), ("blocks4", "tinting"), ("minilm", "adamerging")]


@pytest.mark.parametrize(("case", "algo"), CASES, ids=[f"{c}-{a}" for c, a in CASES])
@pytest.mark.parametrize("provider", ["plain", "fused"])
def test_tta_step(benchmark, provider, case, algo):
    torch.manual_seed(0)
    model, tv, heads, loaders, fwd = SETUPS[case]()
    kw = {"forward_fn": fwd} if fwd is not None else {}
    fused = provider == "fused"
    timing: dict[str, float] = {}

    def run():
        stamps: list[tuple[float, int]] = []

        def mark(_i, r):
            stamps.append((time.perf_counter(), r.steps))

        if algo == "adamerging":
            res = tta.adamerging(model, tv, heads, loaders, steps=STEPS, fused=fused, callback=mark, **kw)
        else:
            res = tta.tinting(model, tv, heads, loaders, epochs=max(2, STEPS // tv.num_tasks), fused=fused,
                              callback=mark, **kw)
        # per step after the first callback (the first steps also pay first-touch page faults)
        (t0, s0), (t1, s1) = stamps[0], stamps[-1]
        timing["per_step"] = (t1 - t0) / max(s1 - s0, 1)
        return res

    res = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    info = {"provider": provider, "op": f"tta_{algo}", "case": case, "T": tv.num_tasks, "params": tv.base.numel(),
            "steps": res.steps, "step_ms": round(timing["per_step"] * 1e3, 2)}
    key = f"{case}-{algo}"
    if provider == "plain":
        _runs[key] = {"step": timing["per_step"], "coef": res.coefficients.clone(),
                      "heads": [h.weight.detach().clone() for h in res.heads]}
    elif key in _runs:
        ref = _runs[key]
        info["speedup_per_step"] = round(ref["step"] / timing["per_step"], 2)
        info["max_coef_diff"] = float(f"{float((res.coefficients - ref['coef']).abs().max()):.3g}")
        head = max(float((h.weight - w).abs().max()) for h, w in zip(res.heads, ref["heads"], strict=True))
        info["max_head_diff"] = float(f"{head:.3g}")
    benchmark.extra_info.update(info)
