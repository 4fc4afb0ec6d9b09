"""Importing the peer libraries (transformers, mergekit, PEFT) from a fastmerge source checkout.

The checkout's top-level ``kernels/`` folder (fastmerge's Triton kernels, installed as ``fastmerge._kernels``)
shadows the ``kernels`` package that transformers imports when it is installed, whenever the checkout's root is
on sys.path (``python -m`` run from it puts it there). :func:`checkout_off_path` takes it off while a peer is
imported or run; an installed fastmerge has no such folder and is left alone.
"""

from __future__ import annotations

import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def checkout_off_path():
    if not os.path.isdir(os.path.join(ROOT, "kernels")):
        yield
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    try:
        yield
    finally:
        sys.path[:] = saved
