"""fastmerge: fast, memory-bounded model merging on custom kernels.

Importing fastmerge never initialises CUDA and never imports triton; a missing compiled extension or
triton is reported when an op is called, with the command that fixes it (see ``python -m fastmerge.info``).
"""

from . import consensus, ops, reference
from .backends import NoBackendError
from .consensus import breadcrumbs, dare, della, magnitude_prune, ties, ties_global
from .ops import MagnitudeThreshold, magnitude_threshold, name_key
from .svd_methods import iso_c_delta, iso_cts_delta, tsv_m_delta


def merge(config, out_dir, **options):
    """Merge the models a mergekit-style config names into ``out_dir``; see fastmerge.engine.merge."""
    from .engine import merge as _merge

    return _merge(config, out_dir, **options)


def reconstruct(store, task, out_dir, **options):
    """Write one task's model from a multi-task store; see fastmerge.store.reconstruct."""
    from .store import reconstruct as _reconstruct

    return _reconstruct(store, task, out_dir, **options)


__version__ = "0.1.0"

__all__ = [
    "MagnitudeThreshold",
    "NoBackendError",
    "breadcrumbs",
    "consensus",
    "dare",
    "iso_c_delta",
    "iso_cts_delta",
    "della",
    "magnitude_prune",
    "magnitude_threshold",
    "merge",
    "name_key",
    "ops",
    "reconstruct",
    "reference",
    "ties",
    "ties_global",
    "tsv_m_delta",
]
