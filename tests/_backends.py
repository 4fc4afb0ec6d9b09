"""Which backends these tests can run here, and on which device."""

import os

import pytest
import torch

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


def dtypes_for(name: str, device: str):
    """fp32/fp16/bf16, except that the Triton interpreter cannot run bf16."""
    if name == "triton" and device == "cpu":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def backend_param(name: str):
    marks = [pytest.mark.triton] if name == "triton" else [pytest.mark.gpu] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=f"backend={name}")


# the reference adapter too: it checks the fill-the-outputs wrappers of the fallback
NATIVE = [backend_param(n) for n in ("reference", "cpp", "cuda", "triton")]
