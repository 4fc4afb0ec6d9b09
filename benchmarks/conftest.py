import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # peers.py: the "today" baselines

from fastmerge.backends import BACKENDS, get_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.benchmark)


def provider_device(name: str) -> str:
    """Device a fastmerge backend is benchmarked on; skips when it cannot run here (the interpreter is not timed)."""
    if name in ("reference", "mergekit", "peft"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    why = get_backend(name).unavailable()
    if why:
        pytest.skip(why)
    if name == "cpp":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip(f"{name} is benchmarked on a GPU only")
    return "cuda"


@pytest.fixture
def forced(monkeypatch):
    """Force one fastmerge backend (FASTMERGE_BACKEND) for the duration of a benchmark."""

    def force(name):
        if name in BACKENDS:
            monkeypatch.setenv("FASTMERGE_BACKEND", name)

    return force


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(benchmark, fn, device, rounds=3):
    def run():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


def record(benchmark, *, bytes_moved: float, elements: int, **extra):
    """Derived throughput in extra_info (GB/s from the median), plus anything else worth keeping."""
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(gbps=round(bytes_moved / med / 1e9, 3), elements=elements, **extra)
