"""fastmerge: fast, memory-bounded model merging on custom kernels.

Importing fastmerge never initialises CUDA and never imports triton; a missing compiled extension or
triton is reported when an op is called, with the command that fixes it (see ``python -m fastmerge.info``).
"""

from . import consensus, ops, reference
from .backends import NoBackendError
from .consensus import breadcrumbs, dare, della, magnitude_prune, ties, ties_global
from .ops import MagnitudeThreshold, magnitude_threshold, name_key

__version__ = "0.1.0"

__all__ = [
    "MagnitudeThreshold",
    "NoBackendError",
    "breadcrumbs",
    "consensus",
    "dare",
    "della",
    "magnitude_prune",
    "magnitude_threshold",
    "name_key",
    "ops",
    "reference",
    "ties",
    "ties_global",
]
