"""The oracle as a backend: runs on any device and dtype (fp64 included); the fallback where no kernel fits.

Its kernels are the plain-PyTorch oracles of the ops, each registered beside its oracle in the op's own file
(``fastmerge/ops/<op>.py``) behind the fill-the-outputs signature of the op's schema.
"""

from __future__ import annotations

import torch

from .registry import HALF, Backend

REFERENCE = Backend("reference", ("cpu", "cuda", "mps", "xpu"), HALF | {torch.float64})
