"""Real layer shapes (rows, cols) the benchmarks run on. FASTMERGE_BENCH_BIG=1 adds the 128256x4096 embedding."""

import os

LLAMA_ATTN = (4096, 4096)  # Llama-3-8B q/o projections
LLAMA_MLP = (14336, 4096)  # Llama-3-8B up/gate projections
LLAMA_EMBED = (128256, 4096)  # Llama-3 embedding / lm_head

SHAPES = [LLAMA_ATTN, LLAMA_MLP] + ([LLAMA_EMBED] if os.environ.get("FASTMERGE_BENCH_BIG") == "1" else [])


def shape_id(s):
    return "x".join(map(str, s))
