"""Triton backend: one kernel module per op in fastmerge._kernels (kernels/<op>.py, exporting ``<op>``).

Every public module there is registered as the kernel of the op it is named after, found by its file name and
imported on the op's first call: declaring the backend imports neither triton nor the kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from .registry import HALF, Backend


def _unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; install it with `pip install triton`"
    return None


TRITON = Backend("triton", ("cuda", "cpu"), HALF, unavailable=_unavailable)


def _launcher(op: str):
    return getattr(importlib.import_module(f"fastmerge._kernels.{op}"), op)


_spec = importlib.util.find_spec("fastmerge._kernels")
for _mod in pkgutil.iter_modules(_spec.submodule_search_locations if _spec else []):
    if not _mod.name.startswith("_"):
        TRITON.kernel(_mod.name, lambda op=_mod.name: _launcher(op))
