"""Argument checks shared by the op files; each runs in the real and the fake kernel, and its message names the
argument."""

from __future__ import annotations

import torch

FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check(cond, message) -> None:
    """torch._check for plain bools without its first-call import of the symbolic-shapes machinery (sympy,
    ~0.4 s); symbolic conditions (fake tensors under torch.compile) still go to torch._check."""
    if cond is True:
        return
    if cond is False:
        raise RuntimeError(message())
    torch._check(cond, message)


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT, lambda: f"{name} must be a floating tensor, got {t.dtype}")


def check_buffer(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    check(
        t.dtype == dtype and tuple(t.shape) == tuple(shape),
        lambda: f"{name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}",
    )
    check(t.device == device, lambda: f"{name} is on {t.device}, inputs are on {device}")


def check_same(name: str, t: torch.Tensor, like: torch.Tensor, what: str = "experts[0]") -> None:
    check(
        tuple(t.shape) == tuple(like.shape),
        lambda: f"{name} has shape {tuple(t.shape)}, {what} has {tuple(like.shape)}",
    )
    check(t.device == like.device, lambda: f"{name} is on {t.device}, {what} is on {like.device}")


def check_experts(base, experts, table: torch.Tensor | None = None, table_name: str = "", cols: int = 0) -> None:
    """The experts: at least one, floating, of one shape, dtype and device (base too); ``table``: fp32 (T,) or
    (T, cols)."""
    check(len(experts) > 0, lambda: "experts must hold at least one tensor, got an empty list")
    e0 = experts[0]
    for i, e in enumerate(experts):
        check_float(f"experts[{i}]", e)
        check_same(f"experts[{i}]", e, e0)
        check(e.dtype == e0.dtype, lambda i=i, e=e: f"experts[{i}] is {e.dtype}, experts[0] is {e0.dtype}")
    if base is not None:
        check_same("base", base, e0)
        check(base.dtype == e0.dtype, lambda: f"base is {base.dtype}, experts are {e0.dtype}")
    if table is not None:
        shape = (len(experts), cols) if cols else (len(experts),)
        check(
            tuple(table.shape) == shape and table.dtype == torch.float32,
            lambda: f"{table_name} must be float32 of shape {shape}, got {table.dtype} {tuple(table.shape)}",
        )


def expert_list(experts) -> list[torch.Tensor]:
    """The experts of an allocating wrapper as a list, refused when empty (there is no shape to allocate)."""
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one tensor, got an empty list")
    return experts
