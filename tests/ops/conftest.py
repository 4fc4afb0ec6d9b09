import pytest


@pytest.fixture
def C():
    """The compiled extension, whose C++ kernels some tests call directly (skipped when it is not built)."""
    return pytest.importorskip("fastmerge._C")


def _set_isa(monkeypatch, value):
    if value == "auto":
        monkeypatch.delenv("FASTMERGE_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("FASTMERGE_CPU_ISA", value)
    return value


@pytest.fixture(params=["auto", "base"])
def isa(request, monkeypatch):
    """Runs a test with the best instruction-set variant of the C++ kernels, then with the baseline one.

    FASTMERGE_CPU_ISA is read by the C++ side at every call; "base" forces the SSE2 build on x86-64 and
    "avx2" caps the choice at AVX2 (both no-ops where only one variant exists).
    """
    return _set_isa(monkeypatch, request.param)


@pytest.fixture(params=["auto", "avx2", "base"])
def isa3(request, monkeypatch):
    """As `isa`, plus the AVX2 variant where the best one is AVX-512 (the Philox generator has three)."""
    return _set_isa(monkeypatch, request.param)
