"""Triton kernels of fastmerge, packaged as ``fastmerge._kernels``.

One op per module (abs_histogram, prune, ties_merge, consensus, emr); each holds a private ``@triton.jit``
kernel and a host launcher that fills preallocated outputs. Semantics: ``fastmerge.reference``.
Nothing is imported here, so importing the package does not import triton; the backend adapter imports
the launchers lazily as ``fastmerge._kernels.<module>``.
"""
