"""Which backends these tests can run here, and on which device."""

import os

import pytest
import torch

from fastmerge import env, ops  # noqa: F401 - ops: every op file registers its reference kernel
from fastmerge.backends import get_backend


def backend_device(name: str) -> str | None:
    """The device backend ``name`` runs its tests on here, or None when it cannot run here."""
    if get_backend(name).unavailable():
        return None
    if name == "cpp":
        return "cpu"
    if name == "cuda":
        return "cuda" if torch.cuda.is_available() else None
    if name == "triton":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
    return "cpu"


def device_or_skip(name: str) -> str:
    """backend_device, or a skip of the test when the backend cannot run here."""
    dev = backend_device(name)
    if dev is None:
        pytest.skip(f"backend {name} cannot run here")
    return dev


def dtypes_for(name: str, device: str):
    """fp32/fp16/bf16, except that the Triton interpreter cannot run bf16."""
    if name == "triton" and device == "cpu":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def backend_param(name: str):
    marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.gpu] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=f"backend={name}")


# the reference adapter too: it checks the fill-the-outputs wrappers of the fallback
NATIVE = [backend_param(n) for n in env.BACKENDS]


def backends_for(op: str) -> list:
    """A ``backend`` parametrisation over every backend that registers a kernel of ``op``."""
    return [backend_param(n) for n in env.BACKENDS if op in get_backend(n).ops]


def kernel(backend: str, op: str):
    """``backend``'s kernel of ``op``, called directly (no dispatcher, no checks, no allocation)."""
    return get_backend(backend).fn(op)
