"""The one context ops run in: which backend runs them (forced, or picked per call) and where their host
buffers come from. Whoever drives the ops sets it for a block (the engine for one merge, from the config's
``fastmerge.backend`` and its buffer pool); the dispatcher and the allocating wrappers read it. It belongs to
a thread; a thread started through :func:`worker` (the engine's reader and writer, the subspace workers) gets
its starter's, with the backend and without the allocator (a buffer pool serves one thread)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

import torch

from . import env


@dataclasses.dataclass(frozen=True)
class OpContext:
    backend: str | None = None  # one of env.BACKENDS forced for every op, or None (FASTMERGE_BACKEND, else pick)
    allocator: Callable[[tuple, torch.dtype], torch.Tensor] | None = None  # host buffers, or None: torch.empty


_DEFAULT = OpContext()
_local = threading.local()  # a thread-local rather than a ContextVar: torch.compile traces through it


def current() -> OpContext:
    return getattr(_local, "ctx", _DEFAULT)


@contextlib.contextmanager
def _set(ctx: OpContext) -> Iterator[OpContext]:
    prev = current()
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


def use(**changes) -> contextlib.AbstractContextManager[OpContext]:
    """Within the block, this thread's ops run with these fields changed (``backend=``, ``allocator=``)."""
    backend = changes.get("backend")
    if backend is not None and backend not in env.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(env.BACKENDS)} or None, got {backend!r}")
    return _set(dataclasses.replace(current(), **changes))


def forced_backend() -> str | None:
    """The backend every op must run on: this context's, else FASTMERGE_BACKEND's, else None (pick per call)."""
    return current().backend or env.backend()


def worker(fn: Callable) -> Callable:
    """``fn`` wrapped to run, on whatever thread calls it, in the caller's context without its allocator."""
    ctx = dataclasses.replace(current(), allocator=None)

    def run(*args, **kw):
        with _set(ctx):
            return fn(*args, **kw)
    return run
