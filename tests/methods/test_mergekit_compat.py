"""Golden equality of the merge engine against mergekit 0.1.5 on small generated Llama-shaped checkpoints.

Every config below is run once through mergekit (all of them in ONE subprocess, tests/_mergekit_runner.py,
since importing mergekit costs ~10 s; one more through the real ``mergekit-yaml`` CLI) and through fastmerge
(in-process ``fastmerge.merge``; one config through ``python -m fastmerge merge``). The mergekit processes
start in the background when the module's first test runs, so the fastmerge-only tests overlap with them.

Tolerances (see golden_configs): the task-arithmetic family (task_arithmetic, ties, breadcrumbs,
and DARE/DELLA where the density leaves nothing to chance) must give mergekit's bytes, exactly
k magnitudes kept in its sort's tie order, in fp32, bf16 and fp16 and on 1M-element tensors where thousands of
16-bit magnitudes tie at the cut; linear and slerp (in chunks of 1M elements) too.
DARE/DELLA draw their randomness differently (fastmerge: counter-based Philox), so those are checked
statistically (fastmerge and mergekit both) and for determinism per seed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from _models import add_tokenizer, load_dir, make_llama_family, make_lora, set_vocab

HAVE_MERGEKIT = importlib.util.find_spec("mergekit") is not None
MERGEKIT_YAML = next((p for p in (os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
                                  shutil.which("mergekit-yaml")) if p and os.path.exists(p)), None)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "_mergekit_runner.py")

pytestmark = pytest.mark.skipif(not HAVE_MERGEKIT, reason="mergekit is not installed (pip install mergekit)")

RTOL, ATOL = 1e-6, 1e-7


# ---- configs ----------------------------------------------------------------------------------------------
def _m(path: str, **params) -> dict:
    return {"model": path, "parameters": params} if params else {"model": path}


def golden_configs(F: list[str], B: list[str], L: list[str], H: list[str]) -> dict[str, tuple[str, dict]]:
    """name -> (tolerance, config). F: fp32 base + 3 experts (mixed shard layouts, 100-wide MLP so that
    int(density * numel) hits float artefacts such as int(0.29 * 6400) == 1855); B: bf16 base + 2 experts;
    L (bf16) and H (fp16): base + 2 experts 0.5 % away, 1024-wide (1M-element matrices, coarse 16-bit task
    vectors: ties at every cut).

    tolerance: "exact" (the same bytes); "exact_cast" (the same bytes once mergekit's fp32 output is cast to the
    model's dtype, which fastmerge writes); "fp32" (rtol 1e-6, atol 1e-7); "1ulp" (<= 1 ulp of the 16-bit output
    dtype, < 1 % of elements differ at all). ulps are taken at the largest operand (inputs, deltas, merged
    delta, result): results near 0 come from cancellation."""
    fb, f0, f1, f2 = F
    bb, b0, b1 = B
    attn_mlp_t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
                  {"value": 0.5}]
    return {
        "linear_normalize": ("exact", {
            "merge_method": "linear", "dtype": "float32",
            "models": [_m(fb, weight=0.2), _m(f0, weight=1.0), _m(f1, weight=[0.5, 2.0]),
                       _m(f2, weight=[{"filter": "mlp", "value": 0.1}, {"value": 0.7}])]}),
        "linear_no_normalize": ("exact", {
            "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
            "models": [_m(f0, weight=0.3), _m(f1, weight=0.6), _m(f2, weight=-0.2)]}),
        "task_arithmetic_lambda": ("exact", {
            "merge_method": "task_arithmetic", "base_model": fb, "dtype": "float32", "parameters": {"lambda": 0.8},
            "models": [_m(f0, weight=0.7), _m(f1, weight=[0.2, 0.8]),
                       _m(f2, weight=[{"filter": "self_attn", "value": [1.0, -0.5]}, {"value": 0.3}])]}),
        "task_arithmetic_no_dtype": ("exact", {  # no dtype key: maths in the inputs' dtype (fp32 here)
            "merge_method": "task_arithmetic", "base_model": fb,
            "parameters": {"normalize": True, "weight": 0.25},
            "models": [_m(f0, weight=1.5), _m(f1), _m(f2, weight=0.5)]}),
        "ties_d05": ("exact", {
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.6, density=0.5), _m(f1, weight=0.4, density=0.5),
                       _m(f2, weight=1.3, density=0.5)]}),
        "ties_float_k": ("exact", {  # k = int(density * numel) in doubles: int(0.29 * 6400) == 1855, not 1856
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=1.0, density=0.29), _m(f1, weight=1.0, density=0.57),
                       _m(f2, weight=1.0, density=0.58)]}),
        "ties_no_normalize_lambda": ("exact", {
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "parameters": {"normalize": False, "lambda": 1.3},
            "models": [_m(f0, weight=1.0, density=[0.2, 0.9]), _m(f1, weight=0.5, density=0.7),
                       _m(f2, weight=0.8, density=[0.9, 0.5, 0.1])]}),
        "ties_tiny_density": ("exact", {  # density * numel < 1 on the 64-element norms: keeps 1 element
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=1.0, density=0.01), _m(f1, weight=1.0, density=0.001),
                       _m(f2, weight=2.0, density=0.0001)]}),
        "ties_filters": ("exact", {
            "merge_method": "ties", "base_model": fb, "dtype": "float32", "parameters": {"normalize": True},
            "models": [
                _m(f0, density=[{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": [0.1, 0.9]},
                                {"value": 0.6}],
                   weight=[{"filter": "embed", "value": 0.2}, {"value": 0.9}]),
                _m(f1, density=[{"filter": "down_proj", "value": 0.05}, {"value": 0.5}], weight=0.5)]}),
        "ties_global_params": ("exact", {  # globals fill in; per-model values take precedence
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "parameters": {"density": 0.4, "weight": 0.5, "normalize": False, "lambda": 0.9},
            "models": [_m(f0), _m(f1, density=0.8), _m(f2, weight=[0.1, 1.0])]}),
        "ties_base_listed_int8_lambda_gradient": ("exact", {  # base in models: (its weight is ignored)
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "parameters": {"int8_mask": True, "lambda": [0.5, 1.5]},
            "models": [_m(fb, weight=3.0), _m(f0, weight=0.7, density=0.45), _m(f1, weight=0.3, density=0.8)]}),
        "ties_negative_weight": ("exact", {  # sum(weight * mask) == 0 where both agree: divisor 1
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.5, density=0.6), _m(f1, weight=-0.5, density=0.6),
                       _m(f2, weight=1.0, density=0.3)]}),
        "task_arithmetic_zero_sum": ("exact", {  # normalize with sum(weight) == 0: divisor 1
            "merge_method": "task_arithmetic", "base_model": fb, "dtype": "float32",
            "parameters": {"normalize": True}, "models": [_m(f0, weight=0.5), _m(f1, weight=-0.5)]}),
        "ties_rescale_zero_density": ("exact", {  # L1 rescale of the magnitude-pruned deltas; density 0 drops one
            "merge_method": "ties", "base_model": fb, "dtype": "float32", "parameters": {"rescale": True},
            "models": [_m(f0, weight=1.0, density=0.3), _m(f1, weight=0.5, density=0.6),
                       _m(f2, weight=0.5, density=0.0)]}),
        "ties_single_expert": ("exact", {
            "merge_method": "ties", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.7, density=0.4)]}),
        "dare_density1": ("exact", {  # density 1: DARE keeps everything (deterministic)
            "merge_method": "dare_ties", "base_model": fb, "dtype": "float32", "parameters": {"normalize": True},
            "models": [_m(f0, weight=0.7, density=1.0), _m(f1, weight=0.5, density=1.0)]}),
        "dare_linear_density1": ("exact", {
            "merge_method": "dare_linear", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=1.0, density=1.0), _m(f1, weight=-0.5, density=1.0)]}),
        "task_arithmetic_filter_fallthrough": ("exact", {  # no filter matches: the global value; "*" matches all
            "merge_method": "task_arithmetic", "base_model": fb, "dtype": "float32", "parameters": {"weight": 0.7},
            "models": [_m(f0, weight=[{"filter": "mlp", "value": 0.2}]),
                       _m(f1, weight=[{"filter": "*", "value": 0.4}])]}),
        "linear_bool_gradient": ("exact", {  # a gradient of booleans picks values[int(t * (n - 1))]
            "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": [True, False]},
            "models": [_m(f0, weight=0.3), _m(f1, weight=0.3)]}),
        "breadcrumbs": ("exact", {
            "merge_method": "breadcrumbs", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=1.0, density=0.8, gamma=0.05), _m(f1, weight=0.7, density=0.6, gamma=0.0),
                       _m(f2, weight=0.4, density=0.5)]}),  # default gamma 0.01
        "breadcrumbs_gamma0": ("exact", {
            "merge_method": "breadcrumbs", "base_model": fb, "dtype": "float32",
            "parameters": {"gamma": 0.0, "density": 0.5},
            "models": [_m(f0, weight=0.5), _m(f1, weight=0.5)]}),
        "breadcrumbs_ties_rescale_clamped": ("exact", {  # density + gamma > 1; int(density * 64) == 0
            "merge_method": "breadcrumbs_ties", "base_model": fb, "dtype": "float32", "parameters": {"rescale": True},
            "models": [_m(f0, weight=1.0, density=0.95, gamma=0.1), _m(f1, weight=0.5, density=0.01, gamma=0.01)]}),
        "breadcrumbs_ties": ("exact", {
            "merge_method": "breadcrumbs_ties", "base_model": fb, "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [_m(f0, weight=1.0, density=0.7, gamma=0.02), _m(f1, weight=0.6, density=0.9),
                       _m(f2, weight=0.8, density=0.2, gamma=0.1)]}),
        "della_density1": ("exact", {
            "merge_method": "della", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.5, density=1.0, epsilon=0.1), _m(f1, weight=0.8, density=1.0),
                       _m(f2, weight=0.3, density=1.0, epsilon=0.2)]}),
        "della_linear_density1": ("exact", {
            "merge_method": "della_linear", "base_model": fb, "dtype": "float32", "parameters": {"lambda": 1.1},
            "models": [_m(f0, weight=0.6, density=1.0, epsilon=0.2), _m(f1, weight=0.6, density=1.0)]}),
        "slerp_filters": ("exact", {
            "merge_method": "slerp", "base_model": fb, "dtype": "float32", "parameters": {"t": attn_mlp_t},
            "models": [_m(fb), _m(f0)]}),
        "slerp_gradient": ("exact", {  # base listed second; 4-point gradient over 3 layers
            "merge_method": "slerp", "base_model": f1, "dtype": "float32", "parameters": {"t": [0, 0.3, 0.7, 1]},
            "models": [_m(f2), _m(f1)]}),
        "passthrough_scale": ("fp32", {
            "merge_method": "passthrough", "dtype": "float32",
            "models": [_m(f1, scale=[{"filter": "mlp", "value": 2.0}, {"filter": "embed", "value": 0.5},
                                     {"value": 1.0}])]}),
        "bf16_linear": ("exact", {  # mergekit's linear kernel works in fp32 and rounds once, like fastmerge
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [_m(bb, weight=0.6), _m(b0, weight=0.3), _m(b1, weight=0.2)]}),
        "bf16_task_arithmetic": ("exact", {  # weights exact in bf16 (mergekit rounds them to bf16)
            "merge_method": "task_arithmetic", "base_model": bb, "dtype": "bfloat16",
            "models": [_m(b0, weight=0.5), _m(b1, weight=[0.25, 0.75])]}),
        "bf16_ties": ("exact", {  # the benchmark's setting: mergekit ranks and sums bf16-rounded task vectors
            "merge_method": "ties", "base_model": bb, "dtype": "bfloat16",
            "models": [_m(b0, weight=0.5, density=0.5), _m(b1, weight=0.5, density=0.5)]}),
        "bf16_in_fp32_math": ("exact", {  # bf16 checkpoints, fp32 maths: fp32 output
            "merge_method": "linear", "dtype": "float32",
            "models": [_m(bb, weight=1.0), _m(b0, weight=0.3), _m(b1, weight=0.2)]}),
        "fp32_math_fp16_out": ("exact", {
            "merge_method": "ties", "base_model": fb, "dtype": "float32", "out_dtype": "float16",
            "models": [_m(f0, weight=0.5, density=0.5), _m(f1, weight=0.5, density=0.5)]}),
        "bf16_in_fp32_math_bf16_out": ("exact", {  # fp32 maths rounded once to out_dtype, in both
            "merge_method": "ties", "base_model": bb, "dtype": "float32", "out_dtype": "bfloat16",
            "models": [_m(b0, weight=0.5, density=0.3), _m(b1, weight=0.5, density=0.6)]}),
        "nearswap_fp32": ("exact", {
            "merge_method": "nearswap", "base_model": fb, "dtype": "float32", "parameters": {"t": 0.01},
            "models": [_m(f1)]}),
        "nearswap_bf16_gradient": ("exact", {
            "merge_method": "nearswap", "base_model": bb, "parameters": {"t": [0.0001, 0.02]},
            "models": [_m(b0)]}),
        "model_stock_fp32": ("exact", {
            "merge_method": "model_stock", "base_model": fb, "dtype": "float32",
            "models": [_m(f0), _m(f1), _m(f2)]}),
        "model_stock_filter_wise_bf16": ("exact", {
            "merge_method": "model_stock", "base_model": bb, "parameters": {"filter_wise": True},
            "models": [_m(b0), _m(b1)]}),
        "model_stock_fp32_out_bf16": ("exact", {
            "merge_method": "model_stock", "base_model": fb, "dtype": "float32", "out_dtype": "bfloat16",
            "parameters": {"filter_wise": [True, False]}, "models": [_m(f0), _m(f2)]}),
        "sce_fp32_topk": ("exact", {
            "merge_method": "sce", "base_model": fb, "dtype": "float32", "parameters": {"select_topk": 0.5},
            "models": [_m(f0), _m(f1), _m(f2)]}),
        "sce_bf16": ("exact", {
            "merge_method": "sce", "base_model": bb, "models": [_m(b0), _m(b1)]}),
        "sce_bf16_gradient_int8": ("exact", {
            "merge_method": "sce", "base_model": bb, "parameters": {"select_topk": [0.1, 0.9], "int8_mask": True},
            "models": [_m(b0), _m(b1)]}),
        "arcee_fusion_fp32": ("exact", {
            "merge_method": "arcee_fusion", "base_model": fb, "dtype": "float32", "models": [_m(f2)]}),
        "arcee_fusion_bf16": ("exact_cast", {  # mergekit writes its fp32-promoted result; fastmerge the dtype
            "merge_method": "arcee_fusion", "base_model": bb, "models": [_m(b1)]}),
        "multislerp_fp32_base": ("exact", {
            "merge_method": "multislerp", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.5), _m(f1, weight=0.3), _m(f2, weight=[0.2, 1.0])]}),
        "multislerp_bf16_no_base": ("exact", {
            "merge_method": "multislerp", "parameters": {"normalize_weights": False},
            "models": [_m(b0, weight=0.6), _m(b1, weight=0.4), _m(bb, weight=0.2)]}),
        "karcher_fp32": ("exact", {
            "merge_method": "karcher", "dtype": "float32", "models": [_m(f0), _m(f1), _m(f2)]}),
        "karcher_bf16_base_iter": ("exact_cast", {  # mergekit's fp32 norms promote its result to fp32
            "merge_method": "karcher", "base_model": bb, "parameters": {"max_iter": 3, "tol": 1e-4},
            "models": [_m(b0), _m(b1)]}),
        "nuslerp_fp32_base_flatten": ("exact", {
            "merge_method": "nuslerp", "base_model": fb, "dtype": "float32",
            "models": [_m(f0, weight=0.3), _m(f1, weight=0.7)]}),
        "nuslerp_bf16_row_wise": ("exact", {
            "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "models": [_m(b0, weight=1.0), _m(b1, weight=2.0)]}),
        "nuslerp_fp32_rows_base": ("exact", {
            "merge_method": "nuslerp", "base_model": fb, "dtype": "float32", "parameters": {"nuslerp_flatten": False},
            "models": [_m(f2, weight=0.5), _m(f0, weight=0.5)]}),
        "ram_fp32": ("exact", {
            "merge_method": "ram", "base_model": fb, "dtype": "float32", "parameters": {"epsilon": 0.01},
            "models": [_m(f0), _m(f1), _m(f2)]}),
        "ram_bf16": ("exact", {
            "merge_method": "ram", "base_model": bb, "parameters": {"epsilon": 0.005}, "models": [_m(b0), _m(b1)]}),
        "ramplus_tl_fp32": ("exact", {
            "merge_method": "ramplus_tl", "base_model": fb, "dtype": "float32",
            "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.9}, "models": [_m(f0), _m(f1), _m(f2)]}),
        "ramplus_tl_bf16": ("exact_cast", {  # mergekit's fp32 lambda promotes its result to fp32
            "merge_method": "ramplus_tl", "base_model": bb, "parameters": {"epsilon": 0.005},
            "models": [_m(b0), _m(b1)]}),
        **slice_configs(F, B),
        # LoRA inputs (MODEL+ADAPTER): mergekit merges each adapter into a copy through PEFT first
        "lora_task_arithmetic_bf16": ("exact", {
            "merge_method": "task_arithmetic", "base_model": bb,
            "models": [_m(f"{b0}+{b0}-lora", weight=0.5), _m(b1, weight=0.5)]}),
        "lora_linear_fp32_rslora_embedding_head": ("exact", {
            "merge_method": "linear", "dtype": "float32",
            "models": [_m(f"{f0}+{f0}-lora", weight=1.0), _m(f"{f1}+{f1}-lora", weight=0.5)]}),
        **large_configs(L, "bf16"), **large_configs(H, "fp16"),
    }


def _src(path: str, a: int, b: int, **params) -> dict:
    return {"model": path, "layer_range": [a, b], **({"parameters": params} if params else {})}


def slice_configs(F: list[str], B: list[str]) -> dict[str, tuple[str, dict]]:
    """The ``slices:`` form (3-layer models): frankenmerges that repeat and reorder layers, per-slice bases and
    parameters (source > slice > global), gradients over each slice's layers, and the tensors outside the
    layers from the first / last slice's sources."""
    fb, f0, f1, f2 = F
    bb, b0, b1 = B
    return {
        "slices_passthrough_frankenmerge": ("exact", {
            "merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [_src(f0, 0, 2)]},
                       {"sources": [_src(f1, 1, 3, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]},
                       {"sources": [_src(f2, 0, 3)]}]}),
        "slices_passthrough_bf16_repeat": ("exact", {
            "merge_method": "passthrough",
            "slices": [{"sources": [_src(b0, 0, 3)]}, {"sources": [_src(b0, 1, 2)]},
                       {"sources": [_src(b1, 2, 3, scale=0.25)]}]}),
        "slices_slerp_gradient": ("exact", {
            "merge_method": "slerp", "base_model": fb, "dtype": "float32",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
            "slices": [{"sources": [_src(fb, 0, 3), _src(f0, 0, 3)]}]}),
        "slices_ties_per_slice": ("exact", {
            "merge_method": "ties", "base_model": bb, "parameters": {"weight": 1.0, "density": 0.6},
            "slices": [{"sources": [_src(bb, 0, 2), _src(b0, 0, 2, density=0.5, weight=0.6),
                                    _src(b1, 0, 2, weight=[0.2, 0.9])]},
                       {"sources": [_src(bb, 1, 3), _src(b1, 1, 3)], "parameters": {"density": 0.3}}]}),
        "slices_task_arithmetic_slice_base": ("exact", {
            "merge_method": "task_arithmetic", "dtype": "float32", "base_model": fb,
            "slices": [{"sources": [_src(fb, 0, 3), _src(f0, 0, 3, weight=0.5), _src(f1, 0, 3, weight=0.5)]},
                       {"sources": [_src(f2, 1, 2), _src(f1, 2, 3, weight=0.7)], "base_model": f2,
                        "parameters": {"weight": 0.3}}]}),
        "slices_linear_uneven": ("exact", {  # norm/head: the last slice's sources cut to the first slice's count
            "merge_method": "linear", "dtype": "float32",
            "slices": [{"sources": [_src(f0, 0, 1, weight=1.0)]},
                       {"sources": [_src(f1, 1, 3, weight=0.3), _src(f2, 1, 3, weight=0.7)]}]}),
    }


def large_configs(L: list[str], tag: str) -> dict[str, tuple[str, dict]]:
    """The magnitude-ranked methods on 1M-element 16-bit tensors, where the tie order at the cut decides
    thousands of elements."""
    lb, l0, l1 = L
    return {
        f"{tag}_large_ties": ("exact", {
            "merge_method": "ties", "base_model": lb,
            "models": [_m(l0, weight=0.5, density=0.5), _m(l1, weight=0.5, density=0.2)]}),
        f"{tag}_large_ties_rescale_lambda": ("exact", {
            "merge_method": "ties", "base_model": lb, "parameters": {"rescale": True, "lambda": 0.8},
            "models": [_m(l0, weight=0.7, density=0.3), _m(l1, weight=0.6, density=0.1)]}),
        f"{tag}_large_breadcrumbs_ties": ("exact", {
            "merge_method": "breadcrumbs_ties", "base_model": lb,
            "models": [_m(l0, weight=1.0, density=0.6, gamma=0.05), _m(l1, weight=0.5, density=0.3)]}),
        f"{tag}_large_breadcrumbs": ("exact", {
            "merge_method": "breadcrumbs", "base_model": lb,
            "models": [_m(l0, weight=1.0, density=0.25, gamma=0.1), _m(l1, weight=-0.5, density=0.75)]}),
        f"{tag}_large_nearswap": ("exact", {
            "merge_method": "nearswap", "base_model": lb, "parameters": {"t": 0.0005}, "models": [_m(l1)]}),
        f"{tag}_large_model_stock": ("exact", {
            "merge_method": "model_stock", "base_model": lb, "models": [_m(l0), _m(l1)]}),
        f"{tag}_large_sce": ("exact", {
            "merge_method": "sce", "base_model": lb, "parameters": {"select_topk": 0.3},
            "models": [_m(l0), _m(l1)]}),
        f"{tag}_large_multislerp": ("exact", {
            "merge_method": "multislerp", "base_model": lb, "models": [_m(l0, weight=0.7), _m(l1, weight=0.3)]}),
        f"{tag}_large_linear": ("exact", {
            "merge_method": "linear", "models": [_m(lb, weight=0.2), _m(l0, weight=0.5), _m(l1, weight=0.35)]}),
        f"{tag}_large_slerp": ("exact", {  # the MLP matrices span 3 of its 1M-element chunks
            "merge_method": "slerp", "base_model": lb, "parameters": {"t": [{"filter": "mlp", "value": 0.6},
                                                                          {"value": 0.35}]},
            "models": [_m(lb), _m(l1)]}),
        f"{tag}_large_task_arithmetic": ("exact", {
            "merge_method": "task_arithmetic", "base_model": lb, "parameters": {"normalize": True},
            "models": [_m(l0, weight=0.3), _m(l1, weight=0.9)]}),
    }


def chat_configs(T: list[str]) -> dict[str, dict]:
    """chat_template: auto (the plurality of the models' templates, one in chat_template.jinja) and raw Jinja;
    these run with mergekit's default --copy-tokenizer, which writes the template."""
    tb, t0, t1 = T
    return {
        "chat_auto": {"merge_method": "task_arithmetic", "base_model": tb, "chat_template": "auto",
                      "models": [_m(t0, weight=0.5), _m(t1, weight=0.5)]},
        "chat_jinja": {"merge_method": "linear", "chat_template": "{% for m in messages %}<{{ m['role'] }}>"
                                                                 "{{ m['content'] }}{% endfor %}",
                       "models": [_m(t0, weight=1.0), _m(t1, weight=1.0)]},
    }


def tokenizer_configs(V: list[str]) -> dict[str, dict]:
    """tokenizer_source / tokenizer: models whose vocabularies differ (extra tokens, another order, added
    tokens, padding rows past the tokenizer): embedding and LM-head rows re-indexed as mergekit does."""
    vb, v0, v1 = V
    return {
        "tok_union_ties": {"merge_method": "ties", "base_model": vb, "tokenizer_source": "union",
                           "models": [_m(v0, weight=0.5, density=0.6), _m(v1, weight=0.5, density=0.8)]},
        "tok_base_linear": {"merge_method": "linear", "base_model": vb, "tokenizer_source": "base",
                            "models": [_m(vb, weight=0.3), _m(v0, weight=0.7), _m(v1, weight=0.2)]},
        "tok_section": {"merge_method": "task_arithmetic", "base_model": vb, "dtype": "float32",
                        "models": [_m(v0, weight=0.5), _m(v1, weight=1.0)],
                        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                            "<new>": {"source": {"kind": "zero"}},
                            "a": {"source": v0, "force": True},
                            "<tool>": {"source": {"kind": "model_token", "model": v1, "token": "b"}},
                            "f": {"source": {"kind": "model_token", "model": v0, "token_id": 3}, "force": True}}}},
        "tok_model_source": {"merge_method": "linear", "tokenizer_source": v1,
                             "models": [_m(vb, weight=1.0), _m(v0, weight=1.0)]},
    }


def _vocab(out: str) -> dict[str, int]:
    with open(os.path.join(out, "tokenizer.json")) as f:
        t = json.load(f)
    return {**t["model"]["vocab"], **{a["content"]: a["id"] for a in t["added_tokens"]}}


@pytest.mark.parametrize("name", ["tok_union_ties", "tok_base_linear", "tok_section", "tok_model_source"])
def test_tokenizer_vs_mergekit(env, name):
    fm, mk = env.fastmerge(name), env.mergekit(name)
    assert _vocab(fm) == _vocab(mk)
    with open(os.path.join(fm, "config.json")) as f, open(os.path.join(mk, "config.json")) as g:
        assert json.load(f)["vocab_size"] == json.load(g)["vocab_size"]
    compare_dirs(mk, fm, "exact", env, name)


def _chat_template(out: str) -> str | None:
    """The chat template a tokenizer folder gives transformers (chat_template.jinja first)."""
    p = os.path.join(out, "chat_template.jinja")
    if os.path.exists(p):
        return open(p, encoding="utf-8").read()
    return json.load(open(os.path.join(out, "tokenizer_config.json"))).get("chat_template")


@pytest.mark.parametrize("name", ["chat_auto", "chat_jinja"])
def test_chat_template_vs_mergekit(env, name):
    fm, mk = env.fastmerge(name), env.mergekit(name)
    ours, theirs = _chat_template(fm), _chat_template(mk)
    assert theirs and ours == theirs, (ours, theirs)
    compare_dirs(mk, fm, "exact", env, name)


# Run through the real mergekit-yaml CLI (and through the in-process engine).
def cli_config(F: list[str]) -> dict:
    fb, f0, f1, f2 = F
    return {"merge_method": "ties", "base_model": fb, "dtype": "float32",
            "parameters": {"normalize": False, "lambda": 0.7},
            "models": [_m(f0, weight=[0.2, 1.0], density=[0.9, 0.1, 0.5]), _m(f1, weight=0.9, density=0.35),
                       _m(f2, weight=-0.4, density=0.6)]}


# Stochastic: checked statistically (fastmerge and mergekit both), determinism per seed (fastmerge).
def stochastic_configs(F: list[str]) -> dict[str, dict]:
    fb, f0, f1, _ = F
    return {
        "dare_linear_stats": {"merge_method": "dare_linear", "base_model": fb, "dtype": "float32",
                              "models": [_m(f0, weight=1.0, density=0.3)]},
        "della_linear_stats": {"merge_method": "della_linear", "base_model": fb, "dtype": "float32",
                               "models": [_m(f0, weight=1.0, density=0.5, epsilon=0.2)]},
        "dare_ties_stats": {"merge_method": "dare_ties", "base_model": fb, "dtype": "float32",
                            "models": [_m(f0, weight=0.6, density=0.5), _m(f1, weight=0.4, density=0.7)]},
    }


# ---- the shared environment: models, configs, the background mergekit runs ----------------------------------
class Env:
    def __init__(self, root: str):
        self.root = root
        self.F = make_llama_family(os.path.join(root, "F"), hidden=64, layers=3, vocab=256, experts=3, inter=100,
                                   dtype=torch.float32, shard_bytes=[None, 200_000, None, 300_000])
        self.B = make_llama_family(os.path.join(root, "B"), hidden=64, layers=3, vocab=256, experts=2,
                                   dtype=torch.bfloat16, seed=1)
        self.L = make_llama_family(os.path.join(root, "L"), hidden=1024, layers=1, vocab=1024, experts=2,
                                   dtype=torch.bfloat16, seed=2, noise=1e-4)
        self.H = make_llama_family(os.path.join(root, "H"), hidden=1024, layers=1, vocab=1024, experts=2,
                                   dtype=torch.float16, seed=3, noise=1e-4)
        make_lora(self.B[1] + "-lora", self.B[1], ["q_proj", "v_proj", "down_proj"], dtype=torch.bfloat16)
        make_lora(self.F[1] + "-lora", self.F[1], ["q_proj", "o_proj", "up_proj", "embed_tokens"], r=8, alpha=16,
                  use_rslora=True, rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"], seed=1)
        make_lora(self.F[2] + "-lora", self.F[2], ["k_proj", "gate_proj"], r=2, alpha=1, seed=2)
        self.T = make_llama_family(os.path.join(root, "T"), hidden=32, layers=1, vocab=64, experts=2,
                                   dtype=torch.float32, seed=4)
        popular = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        add_tokenizer(self.T[0], "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
        add_tokenizer(self.T[1], popular + "\n", jinja_file=True)  # compared stripped
        add_tokenizer(self.T[2], popular)
        self.V = make_llama_family(os.path.join(root, "V"), hidden=32, layers=1, vocab=8, experts=2,
                                   dtype=torch.bfloat16, seed=5)
        base_toks = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"]
        set_vocab(self.V[0], base_toks, rows=10, seed=1)  # two padding rows past the tokenizer
        # one new token from one model only: mergekit numbers new tokens in hash order (set and dict iteration)
        set_vocab(self.V[1], base_toks + ["f"], ["<tool>"], seed=2)
        set_vocab(self.V[2], ["<unk>", "<s>", "</s>", "c", "a", "b", "e", "d"], ["<tool>", "<x>"], seed=3)
        self.tok = tokenizer_configs(self.V)
        self.golden = golden_configs(self.F, self.B, self.L, self.H)
        self.stochastic = stochastic_configs(self.F)
        self.chat = chat_configs(self.T)
        configs = {**{n: c for n, (_, c) in self.golden.items()},
                   **self.stochastic, **self.chat, **self.tok, "cli": cli_config(self.F)}
        self.cfg: dict[str, str] = {}
        self.cfg_dict: dict[str, dict] = configs
        os.makedirs(os.path.join(root, "cfg"))
        for name, cfg in configs.items():
            self.cfg[name] = os.path.join(root, "cfg", name + ".yml")
            with open(self.cfg[name], "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
        self.mk_dir = os.path.join(root, "mk")
        self.fm_dir = os.path.join(root, "fm")
        jobs = [[self.cfg[n], os.path.join(self.mk_dir, n), *([{"copy_tokenizer": True}] if n in self.chat else [])]
                for n in configs if n != "cli"]
        jobs_path = os.path.join(root, "mk_jobs.json")
        with open(jobs_path, "w") as f:
            json.dump(jobs, f)
        self.mk_results = os.path.join(root, "mk_results.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self._logs = {k: open(os.path.join(root, f"{k}.log"), "w") for k in ("runner", "cli")}
        self.procs = {"runner": subprocess.Popen([sys.executable, RUNNER, jobs_path, self.mk_results], env=env,
                                                 stdout=self._logs["runner"], stderr=subprocess.STDOUT)}
        if MERGEKIT_YAML:
            self.procs["cli"] = subprocess.Popen([MERGEKIT_YAML, self.cfg["cli"], os.path.join(self.mk_dir, "cli"),
                                                  "--no-copy-tokenizer", "--random-seed", "0", "--quiet"], env=env,
                                                 stdout=self._logs["cli"], stderr=subprocess.STDOUT)
        self._records: dict[str, dict] | None = None
        self._inputs: dict[str, dict[str, torch.Tensor]] = {}

    def _wait(self, key: str, timeout: float = 300) -> None:
        p = self.procs[key]
        p.wait(timeout=timeout)
        self._logs[key].flush()
        if p.returncode != 0:
            with open(self._logs[key].name) as f:
                log = f.read()[-4000:]
            pytest.fail(f"mergekit {key} exited with {p.returncode}:\n{log}")

    def mergekit(self, name: str) -> str:
        """Output dir of mergekit for config ``name`` (waits for the background run)."""
        if name == "cli":
            if "cli" not in self.procs:
                pytest.skip("the mergekit-yaml script is not installed")
            self._wait("cli")
            return os.path.join(self.mk_dir, "cli")
        if self._records is None:
            self._wait("runner")
            with open(self.mk_results) as f:
                self._records = {os.path.basename(r["out"]): r for r in json.load(f)["jobs"]}
        rec = self._records[name]
        if not rec["ok"]:
            pytest.fail(f"mergekit failed on {name}:\n{rec['error']}")
        return rec["out"]

    def fastmerge(self, name: str, seed: int = 0, tag: str = "") -> str:
        import fastmerge

        out = os.path.join(self.fm_dir, f"{name}{tag}-s{seed}")
        if not os.path.exists(out):
            fastmerge.merge(self.cfg[name], out, seed=seed, quiet=True)
        return out

    def inputs(self, name: str) -> list[dict[str, torch.Tensor]]:
        """Tensors of config ``name``'s base model (if any) followed by its other models."""
        cfg = self.cfg_dict[name]
        base = cfg.get("base_model")
        paths = [*([base] if base else []), *(m["model"] for m in cfg["models"] if m["model"] != base)]
        for p in paths:
            if p not in self._inputs:
                self._inputs[p] = load_dir(p)
        return [self._inputs[p] for p in paths]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self._logs.values():
            f.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(str(tmp_path_factory.mktemp("mergekit_compat")))
    yield e
    e.close()


# ---- comparison helpers -------------------------------------------------------------------------------------
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at the magnitude of ``x`` (fp32), floored at the smallest normal's ulp."""
    fi = torch.finfo(dtype)
    return fi.eps * torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(fi.tiny))))


def compare_dirs(mk_dir: str, fm_dir: str, tol: str, env: Env, name: str) -> dict:
    """Every tensor: same names, shapes, dtypes; values within ``tol`` (see golden_configs) of config ``name``."""
    mk, fm = load_dir(mk_dir), load_dir(fm_dir)
    assert sorted(fm) == sorted(mk), (f"tensor names differ: only mergekit {sorted(set(mk) - set(fm))}, "
                                      f"only fastmerge {sorted(set(fm) - set(mk))}")
    st = {"tensors": len(mk), "elements": 0, "differ": 0, "beyond_tol": 0, "max_ulps": 0.0}
    problems = []
    for k in sorted(mk):
        a, b = mk[k], fm[k]
        assert b.shape == a.shape, f"{k}: shape {tuple(b.shape)} != mergekit {tuple(a.shape)}"
        if tol == "exact_cast":  # mergekit's result rounded to fastmerge's output dtype, then the same bytes
            a = a.to(b.dtype)
        assert b.dtype == a.dtype, f"{k}: dtype {b.dtype} != mergekit {a.dtype}"
        if tol in ("exact", "exact_cast"):
            same = torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)
            st["elements"] += a.numel()
            if not same:
                d = (a.float() != b.float()) | (a.view(torch.uint8).reshape(a.numel(), -1)
                                                != b.view(torch.uint8).reshape(b.numel(), -1)).any(1).reshape(a.shape)
                i = int(d.reshape(-1).nonzero()[0])
                problems.append(f"{k} {tuple(a.shape)}: {int(d.sum())}/{a.numel()} elements differ in bytes; first at "
                                f"{i}: fastmerge {float(b.reshape(-1)[i])!r}, mergekit {float(a.reshape(-1)[i])!r}")
                st["differ"] += int(d.sum())
            continue
        a32, b32 = a.float(), b.float()
        assert torch.isfinite(b32).all(), f"{k}: non-finite values in fastmerge output"
        st["elements"] += a.numel()
        diff = (b32 - a32).abs()
        st["differ"] += int((diff > 0).sum())
        if tol == "fp32":
            bad = diff > ATOL + RTOL * a32.abs()
        else:  # in ulps of the largest operand (inputs, deltas, result): results near 0 come from cancellation
            xs = [x[k].float() for x in env.inputs(name)]
            deltas = [x - xs[0] for x in xs[1:]] if env.cfg_dict[name].get("base_model") else []
            mixed = [a32 - xs[0]] if deltas else []
            mag = torch.stack([a32.abs(), b32.abs(), *(x.abs() for x in xs + deltas + mixed)]).amax(0)
            ulps = diff / ulp(mag, a.dtype)
            bad = ulps > {"1ulp": 1.001, "3ulp": 3.001}[tol]
        if not bad.any():
            if tol != "fp32":
                st["max_ulps"] = max(st["max_ulps"], float(ulps.max()))
            continue
        idx = bad.reshape(-1).nonzero().squeeze(1)
        st["beyond_tol"] += idx.numel()
        i = int(idx[0])
        problems.append(f"{k} {tuple(a.shape)}: {idx.numel()}/{a.numel()} elements beyond tolerance (max |diff| "
                        f"{float(diff.reshape(-1)[idx].max()):.3g}); first at flat index {i}: fastmerge "
                        f"{float(b32.reshape(-1)[i])!r}, mergekit {float(a32.reshape(-1)[i])!r}")
    if problems:
        pytest.fail(f"{len(problems)} tensors differ from mergekit ({st}):\n" + "\n".join(problems[:20]))
    if tol == "1ulp":
        assert st["differ"] <= 0.01 * st["elements"], f"too many elements differ by 1 ulp: {st}"
    return st


def check_output_dir(out: str, base: str) -> None:
    """An HF dir with config.json (from the base) and weights."""
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(base, "config.json")) as f:
        bcfg = json.load(f)
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        assert cfg.get(key) == bcfg[key], f"config.json: {key} {cfg.get(key)} != {bcfg[key]}"


# ---- fastmerge-only tests first: they overlap with the background mergekit runs -------------------------------
def _diff_count(d1: str, d2: str) -> int:
    x, y = load_dir(d1), load_dir(d2)
    assert sorted(x) == sorted(y)
    return sum(int((x[k] != y[k]).sum()) for k in x)


@pytest.mark.parametrize("name", ["dare_linear_stats", "dare_ties_stats", "della_linear_stats"])
def test_stochastic_deterministic_per_seed(env, name):
    """Same seed: bit-identical output across runs; another seed: a different draw."""
    a = env.fastmerge(name, seed=0)
    b = env.fastmerge(name, seed=0, tag="-again")
    c = env.fastmerge(name, seed=1)
    assert _diff_count(a, b) == 0, "same seed, different output"
    assert _diff_count(a, c) > 0, "different seeds, identical output"


def test_fastmerge_cli_seed_and_shards(env):
    """`python -m fastmerge merge ... --seed 1 --out-shard-size 200K`: same tensors as the in-process run with
    seed=1, different from seed 0, written as shards with an index."""
    out = os.path.join(env.fm_dir, "cli-dare-seed1")
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", env.cfg["dare_linear_stats"], out, "--seed", "1",
                        "--out-shard-size", "200K", "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), os.listdir(out)
    check_output_dir(out, env.F[0])
    assert _diff_count(out, env.fastmerge("dare_linear_stats", seed=1)) == 0
    assert _diff_count(out, env.fastmerge("dare_linear_stats", seed=0)) > 0


def _delta_stats(out: str, inputs: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Per tensor, for a merge of base + ONE expert at weight 1 (so out - base is the rescaled kept delta)."""
    merged = load_dir(out)
    res = {}
    for k, m in merged.items():
        base, delta = inputs[0][k].float(), inputs[1][k].float() - inputs[0][k].float()
        d = m.float() - base
        kept = d != 0
        l1_in, l1_kept = float(delta.abs().sum()), float(delta[kept].abs().sum())
        scale = l1_in / l1_kept if l1_kept else 0.0
        # out - base == scale * delta on kept elements, up to the rounding of out (a few fp32 ulps of the operands)
        ref = torch.maximum(m.float().abs(), base.abs())[kept] * 2.0**-23 + 1e-30
        err = (d[kept] - scale * delta[kept]).abs() / ref
        res[k] = {"n": d.numel(), "kept": int(kept.sum()), "l1_in": l1_in, "l1_out": float(d.abs().sum()),
                  "scale_err_ulps": float(err.max()) if kept.any() else 0.0, "delta": delta, "d": d}
    return res


def _check_dare_like(stats: dict[str, dict], density: float, who: str) -> None:
    n_all = sum(s["n"] for s in stats.values())
    kept_all = sum(s["kept"] for s in stats.values())
    sigma_all = math.sqrt(density * (1 - density) / n_all)
    assert abs(kept_all / n_all - density) < 4 * sigma_all, f"{who}: kept {kept_all / n_all:.4f} vs {density}"
    for k, s in stats.items():
        sigma = math.sqrt(density * (1 - density) / s["n"])
        assert abs(s["kept"] / s["n"] - density) < 5 * sigma, f"{who} {k}: kept {s['kept']}/{s['n']}"
        # L1 rescale (mergekit's RescaleNorm.l1): sum |kept delta| * scale == sum |delta|
        assert s["l1_out"] == pytest.approx(s["l1_in"], rel=2e-5), f"{who} {k}: L1 not preserved"
        assert s["scale_err_ulps"] <= 16, f"{who} {k}: kept deltas not all scaled by sum|delta| / sum|kept delta|"


def test_dare_linear_statistics(env):
    """dare_linear, one expert, density 0.3: keep fraction within a few sigma of 0.3, kept deltas scaled by one
    factor per tensor that restores the L1 norm. mergekit's own output passes the same checks."""
    inputs = env.inputs("dare_linear_stats")
    fm = _delta_stats(env.fastmerge("dare_linear_stats"), inputs)
    _check_dare_like(fm, 0.3, "fastmerge")
    # independent draws per tensor: two same-shaped tensors keep the same element with probability 0.3^2
    masks = [s["d"] != 0 for k, s in sorted(fm.items()) if k.endswith("_proj.weight") and "self_attn" in k]
    assert len(masks) >= 6
    n = masks[0].numel()
    sig = math.sqrt(0.09 * 0.91 / n)
    for a, b in zip(masks, masks[1:], strict=False):
        assert abs(float((a & b).float().mean()) - 0.09) < 5 * sig, "masks of different tensors are correlated"
    mk = _delta_stats(env.mergekit("dare_linear_stats"), inputs)
    _check_dare_like(mk, 0.3, "mergekit")


def test_della_linear_statistics(env):
    """della_linear, density 0.5, epsilon 0.2: keep probability rises linearly with the rank of |delta| within
    each row from 0.3 to 0.7 (overall 0.5): bottom half of each row ~0.4, top half ~0.6. L1 rescaled."""
    inputs = env.inputs("della_linear_stats")
    for who, out in [("fastmerge", env.fastmerge("della_linear_stats")),
                     ("mergekit", env.mergekit("della_linear_stats"))]:
        st = _delta_stats(out, inputs)
        _check_dare_like(st, 0.5, who)
        top = bot = n_half = 0
        for s in st.values():
            delta, d = s["delta"], s["d"]
            rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
            kept = (d != 0).reshape(rows.shape)
            order = rows.abs().argsort(dim=1)
            h = rows.shape[1] // 2
            kept_sorted = kept.gather(1, order)
            bot += int(kept_sorted[:, :h].sum())
            top += int(kept_sorted[:, -h:].sum())
            n_half += rows.shape[0] * h
        sig = math.sqrt(0.25 / n_half)
        assert abs(bot / n_half - 0.4) < 5 * sig and abs(top / n_half - 0.6) < 5 * sig, \
            f"{who}: keep fraction bottom half {bot / n_half:.4f} (want 0.4), top half {top / n_half:.4f} (0.6)"


def test_dare_ties_statistics(env):
    """dare_ties, densities 0.5 and 0.7: an element changes iff some expert keeps it (the sign election never
    drops every kept delta): P = 1 - 0.5*0.3 = 0.85. mergekit and fastmerge agree on that and on the L1 mass."""
    inputs = env.inputs("dare_ties_stats")
    res = {}
    for who, out in [("fastmerge", env.fastmerge("dare_ties_stats")), ("mergekit", env.mergekit("dare_ties_stats"))]:
        merged = load_dir(out)
        n = sum(t.numel() for t in merged.values())
        changed = sum(int((merged[k].float() != inputs[0][k].float()).sum()) for k in merged)
        l1 = sum(float((merged[k].float() - inputs[0][k].float()).abs().sum()) for k in merged)
        p = 1 - 0.5 * 0.3
        assert abs(changed / n - p) < 4 * math.sqrt(p * (1 - p) / n), f"{who}: changed {changed / n:.4f}, want {p}"
        res[who] = l1
    assert res["fastmerge"] == pytest.approx(res["mergekit"], rel=0.01), res


# ---- golden equality ---------------------------------------------------------------------------------------
GOLDEN = list(golden_configs(["b", "0", "1", "2"], ["b", "0", "1"], ["b", "0", "1"], ["b", "0", "1"]))


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_vs_mergekit(env, name):
    tol, cfg = env.golden[name]
    fm = env.fastmerge(name)
    mk = env.mergekit(name)
    if "slices" in cfg:  # the layer count is the output's; the rest as in the first model's
        with open(os.path.join(fm, "config.json")) as f, open(os.path.join(mk, "config.json")) as g:
            ours, theirs = json.load(f), json.load(g)
        assert ours["num_hidden_layers"] == theirs["num_hidden_layers"], (ours, theirs)
        assert ours["num_hidden_layers"] == sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                                                for s in cfg["slices"])
    else:
        check_output_dir(fm, (cfg.get("base_model") or cfg["models"][0]["model"]).split("+")[0])
    compare_dirs(mk, fm, tol, env, name)


def test_golden_vs_mergekit_yaml_cli(env):
    """The config the real mergekit-yaml CLI ran, against the in-process engine."""
    compare_dirs(env.mergekit("cli"), env.fastmerge("cli"), "exact", env, "cli")


def test_fastmerge_cli_vs_mergekit(env, tmp_path):
    """`python -m fastmerge merge` on a golden config, sharded output, against mergekit."""
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", env.cfg["task_arithmetic_lambda"], out,
                        "--out-shard-size", "300K", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json")), os.listdir(out)
    check_output_dir(out, env.F[0])
    compare_dirs(env.mergekit("task_arithmetic_lambda"), out, "exact", env, "task_arithmetic_lambda")
