"""The compiled extension fastmerge._C, loaded on first use, with the reason and the fix when it is missing.

``_C`` and ``ERROR`` are module attributes computed when first read, so that declaring the native backends
(fastmerge.backends.cpp, cuda) loads nothing: importing fastmerge never loads the extension.
"""

from __future__ import annotations

from .registry import REBUILD, Backend

_loaded: tuple[object | None, str | None] | None = None


def _load() -> tuple[object | None, str | None]:
    global _loaded
    if _loaded is None:
        try:
            from .. import _C

            _loaded = (_C, None)
        except Exception as e:  # noqa: BLE001 - reported when an op is called
            _loaded = (None, f"native extension fastmerge._C is not built or failed to load ({e}); build it with "
                             f"`{REBUILD}`")
    return _loaded


def __getattr__(name: str):
    if name == "_C":
        return _load()[0]
    if name == "ERROR":
        return _load()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bind(backend: Backend, suffix: str, ops: tuple[str, ...]) -> None:
    """Register ``_C.<op>_<suffix>`` as ``backend``'s kernel of every op in ``ops`` (looked up on first use)."""
    for op in ops:
        backend.kernel(op, lambda op=op: getattr(_load()[0], f"{op}_{suffix}"))
