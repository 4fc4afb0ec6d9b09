"""Triton kernels of fastmerge, packaged as ``fastmerge._kernels``.

One module per op, named after it (``ties_merge.py`` holds ``ties_merge``); each holds its private
``@triton.jit`` kernels and a host launcher named after the op that fills preallocated outputs; shared device and
host helpers are in ``_common.py``. Semantics: the op's oracle, ``fastmerge.ops.<op>.<op>_ref``.
Nothing is imported here, so importing the package does not import triton; the Triton backend registers every
module here named after an op and imports it on the op's first call.
"""
