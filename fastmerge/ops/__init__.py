"""The fastmerge ops: one file per op, each with its torch.library schema (``fastmerge::<op>``), its checks, its
real and fake kernels, its allocating Python API (exported here) and its plain-PyTorch oracle ``<op>_ref``.

Every op mutates preallocated outputs; the allocating functions here create them and call ``torch.ops.fastmerge.*``,
which checks the arguments, makes the inputs contiguous and runs the best backend for the inputs' device and dtype
(fastmerge.backends; the op context or FASTMERGE_BACKEND forces one). fp16/bf16 inputs are accumulated in fp32 by
every backend.

The oracles are the contract: every backend (CPU C++, CUDA, Triton) must reproduce them, bit for bit where the
result is a mask, a sign, a count or a threshold, and within fp32 rounding where it is a sum. They are short and
readable on purpose, run on any device, and are the reference backend's kernels. Conventions shared by all ops:

* ``experts`` is a list of T tensors of one shape and one floating dtype. When ``base`` is given (same shape and
  dtype) the task vectors are ``delta_t = experts[t] - base``; when it is ``None`` the experts *are* the task
  vectors.
* fp16/bf16 inputs are upcast and every accumulation is done in fp32, task by task in the order t = 0 .. T-1
  (stats that are summed over a whole tensor are accumulated in fp64).
* Element indices are linear indices in the tensor's logical row-major order plus ``offset`` (so a tensor
  processed in chunks draws the same random numbers as the whole tensor), never memory addresses.
* Magnitude keys (fastmerge.ops.keys) order magnitudes as integers; random drops draw from Philox streams
  (fastmerge.ops.philox) named by ``(seed, key)``.
"""

from ._lib import OPS as _REGISTERED
from ._lib import allocating, empty
from .keys import HIST_BINS
from .philox import name_key, to_i64

# registration order, the order fastmerge.info lists the ops in (a family's ops together)
# isort: off
from .abs_histogram import abs_histogram
from .row_kth_largest_abs import row_kth_largest_abs
from .order_window import order_window
from .prune import prune
from .della_prune import della_prune
from .ties_merge import ELECT, MERGE, ties_merge, ties_params, weighted_sum
from .gta_merge import gta_merge
from .tall_masks import tall_masks
from .consensus_merge import consensus_merge
from .emr_elect import emr_elect
from .orth_project import orth_project
from .doge_grad import doge_grad
from .adam_step import adam_step
from .tv_combine import tv_combine
from .tv_coef_grad import tv_coef_grad
# isort: on
from .threshold import MagnitudeThreshold, magnitude_threshold

OPS = tuple(_REGISTERED)  # every op, each defined by fastmerge/ops/<op>.py

__all__ = [
    "ELECT",
    "HIST_BINS",
    "MERGE",
    "OPS",
    "MagnitudeThreshold",
    "abs_histogram",
    "adam_step",
    "allocating",
    "consensus_merge",
    "della_prune",
    "doge_grad",
    "emr_elect",
    "empty",
    "gta_merge",
    "magnitude_threshold",
    "name_key",
    "order_window",
    "orth_project",
    "prune",
    "row_kth_largest_abs",
    "tall_masks",
    "ties_merge",
    "ties_params",
    "to_i64",
    "tv_coef_grad",
    "tv_combine",
    "weighted_sum",
]
