"""fastmerge: fast, memory-bounded model merging on custom kernels.

Importing fastmerge never initialises CUDA and never imports triton; a missing compiled extension or
triton is reported when an op is called, with the command that fixes it (see ``python -m fastmerge.info``).
"""

import importlib

# Attributes load on first use (PEP 562), so that `fastmerge.cli` starts without importing torch: the command
# line installs its signal handling first (fastmerge.signals), and a Ctrl-C during torch's import is not lost.
_LAZY = {
    "ops": ".ops", "subspace": ".algo.subspace",
    "NoBackendError": ".backends",
    "breadcrumbs": ".algo.ties", "dare": ".algo.ties", "della": ".algo.ties", "magnitude_prune": ".algo.ties",
    "ties": ".algo.ties", "ties_global": ".algo.ties",
    "MagnitudeThreshold": ".ops", "magnitude_threshold": ".ops", "name_key": ".ops",
    "iso_c_delta": ".methods.subspace", "iso_cts_delta": ".methods.subspace", "tsv_m_delta": ".methods.subspace",
}


_MODULES = frozenset({"ops", "subspace"})


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")
    m = importlib.import_module(mod, __name__)
    value = m if name in _MODULES else getattr(m, name)
    globals()[name] = value
    return value


def merge(config, out_dir, **options):
    """Merge the models a mergekit-style config names into ``out_dir``; see fastmerge.engine.merge."""
    from .engine import merge as _merge

    return _merge(config, out_dir, **options)


def reconstruct(store, task, out_dir, **options):
    """Write one task's model from a multi-task store; see fastmerge.store.reconstruct."""
    from .store import reconstruct as _reconstruct

    return _reconstruct(store, task, out_dir, **options)


from ._version import __version__ as __version__  # noqa: E402

__all__ = [
    "MagnitudeThreshold",
    "NoBackendError",
    "breadcrumbs",
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
    "subspace",
    "ties",
    "ties_global",
    "tsv_m_delta",
]
