"""A small real merge: generated Llama-shaped checkpoints on disk, merged tensor by tensor with fastmerge's
fused TIES / DARE-TIES / task arithmetic kernels, checked against mergekit's formulation, written as
safetensors. (The streaming `fastmerge merge` engine and the MiniLM multi-task demo build on this.)
"""

import os
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastmerge
from fastmerge import ops

HIDDEN, INTER, LAYERS, VOCAB, T = 512, 1376, 4, 8000, 3


def make_checkpoints(root):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.up_proj.weight": (INTER, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, INTER),
                   p + "input_layernorm.weight": (HIDDEN,)}
    base = {k: (0.02 * torch.randn(s, generator=g)).bfloat16() for k, s in shapes.items()}
    paths = [os.path.join(root, "base.safetensors")]
    save_file(base, paths[0])
    for t in range(T):
        ex = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        paths.append(os.path.join(root, f"expert{t}.safetensors"))
        save_file(ex, paths[-1])
    return paths


def mergekit_style_ties(base, experts, density):
    deltas = []
    for e in experts:
        d = e - base
        k = max(1, int(density * d.numel()))
        mask = torch.zeros_like(d)
        mask.view(-1)[torch.argsort(d.abs().view(-1).float(), descending=True)[:k]] = 1
        deltas.append(d * mask)
    d = torch.stack(deltas)
    maj = (d.sum(0) >= 0).to(d.dtype) * 2 - 1
    mask = d.sign() == maj
    div = mask.to(d.dtype).sum(0)
    div[div == 0] = 1
    return (base + (d * mask).sum(0) / div).to(base.dtype)


def main():
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        paths = make_checkpoints(root)
        print(f"generated base + {T} experts ({os.path.getsize(paths[0]) / 1e6:.0f} MB each) in "
              f"{time.perf_counter() - t0:.1f} s")
        files = [safe_open(p, "pt") for p in paths]
        names = sorted(files[0].keys())
        methods = {
            "task_arithmetic": lambda b, ex, n: fastmerge.ties(b, ex, weights=0.4, compat="mergekit", elect="none",
                                                               merge="sum"),
            "ties": lambda b, ex, n: fastmerge.ties(b, ex, 0.3, compat="mergekit"),
            "dare_ties": lambda b, ex, n: ops.ties_merge(b, ex, ops.ties_params(len(ex), p=0.7, scale=1 / 0.3),
                                                         key=ops.name_key(n), seed=0, merge="wmean",
                                                         weighted_elect=True)[0],
        }
        print(f"{'method':16s} {'fastmerge':>10s} {'mergekit-style':>15s} {'identical':>10s}")
        for method, fn in methods.items():
            merged, t_fm, t_mk, same, total = {}, 0.0, 0.0, 0, 0
            for n in names:
                b, ex = files[0].get_tensor(n), [f.get_tensor(n) for f in files[1:]]
                t = time.perf_counter()
                merged[n] = fn(b, ex, n)
                t_fm += time.perf_counter() - t
                if method == "ties":
                    t = time.perf_counter()
                    want = mergekit_style_ties(b.float(), [e.float() for e in ex], 0.3).bfloat16()
                    t_mk += time.perf_counter() - t
                    same += int((merged[n] == want).sum())
                    total += want.numel()
            out = os.path.join(root, f"merged_{method}.safetensors")
            save_file(merged, out)
            mk, eq = (f"{t_mk:14.2f}s", f"{100 * same / total:9.2f}%") if total else (f"{'-':>15s}", f"{'-':>10s}")
            print(f"{method:16s} {t_fm:9.2f}s {mk} {eq}   -> {os.path.basename(out)}")
        print("(TIES keeps every magnitude equal to the threshold; argsort keeps exactly k, so the two differ only"
              " where bf16 deltas tie at the cut)")


if __name__ == "__main__":
    main()
