"""The registered methods: each family module calls :func:`register` for its methods when imported
(``fastmerge/methods/__init__.py`` imports them all)."""

from __future__ import annotations

from ..config import ConfigError, MergeConfig
from .base import Method
from .base import resolve as _resolve
from .base import validate as _validate

METHODS: dict[str, Method] = {}


def register(*methods: Method) -> None:
    for m in methods:
        if m.name in METHODS:
            raise ValueError(f"merge method {m.name!r} is registered twice")
        if m.fn is None and m.batch is None and m.sink is None:
            raise ValueError(f"merge method {m.name!r} has neither fn, batch nor sink")
        METHODS[m.name] = m


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge_method {name!r}; expected one of {', '.join(sorted(METHODS))}") from None


def validate(cfg: MergeConfig) -> None:
    """The config's method checks (config.load knows no method): the shared ones, then the method's own."""
    _validate(get(cfg.method), cfg, METHODS)


def resolve(cfg: MergeConfig, tensor: str, t: float):
    """Shared and per-input parameter values of one tensor under the config's method."""
    return _resolve(get(cfg.method), cfg, tensor, t)
