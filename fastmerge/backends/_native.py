"""Loading of the compiled extension fastmerge._C, with the reason and the fix when it is missing."""

from __future__ import annotations

from .registry import REBUILD

try:
    from .. import _C
    ERROR = None
except Exception as e:  # noqa: BLE001 - reported when an op is called
    _C = None
    ERROR = f"native extension fastmerge._C is not built or failed to load ({e}); build it with `{REBUILD}`"


def bind(suffix: str, names: tuple[str, ...]) -> dict:
    """{op: _C.<op>_<suffix>} for the ops this build has."""
    if _C is None:
        return {}
    return {n: getattr(_C, f"{n}_{suffix}") for n in names if hasattr(_C, f"{n}_{suffix}")}
