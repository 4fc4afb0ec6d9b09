"""Merge methods as plug-ins: each family module declares its :class:`Method` objects and registers them.

To add a method, write one module here and import it below (docs/ARCHITECTURE.md, "How to add a method").
"""

from . import doge, interpolate, linear, spherical, subspace, tall, task_arithmetic  # noqa: F401 - importing registers the methods
from .base import INPUT, NONBASE, REQUIRED, SHARED, Method, Param, TensorCall, param_specs
from .registry import METHODS, get, register, resolve, validate

__all__ = ["INPUT", "METHODS", "NONBASE", "REQUIRED", "SHARED", "Method", "Param", "TensorCall", "get",
           "param_specs", "register", "resolve", "validate"]
