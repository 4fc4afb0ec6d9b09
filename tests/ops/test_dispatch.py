"""The op layer as a whole: a lean import, the backends' registration, the dispatcher (forced backends, every
reason when none fits, the fallback's warning) and non-contiguous inputs through it."""

import subprocess
import sys

import pytest
import torch
from _backends import NATIVE, device_or_skip, kernel
from _cases import qint

from fastmerge import env, ops
from fastmerge.backends import BACKENDS, NoBackendError, get_backend, select
from fastmerge.ops.abs_histogram import abs_histogram_ref
from fastmerge.ops.consensus_merge import consensus_merge_ref
from fastmerge.ops.prune import prune_ref
from fastmerge.ops.ties_merge import ties_merge_ref, ties_params


def test_import_is_lean():
    code = (
        "import sys, torch, fastmerge, fastmerge.ops, fastmerge.algo.ties\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'fastmerge._C' not in sys.modules, 'extension loaded at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "fastmerge.info"], check=True, capture_output=True, text=True).stdout
    assert "ties_merge" in out and "backends:" in out


def test_backends_register_themselves():
    """Every backend is one of FASTMERGE_BACKEND's values and registers kernels of ops only; the reference has
    every op; the native backends' kernels are the extension's functions ``<op>_<suffix>``."""
    assert set(BACKENDS) == set(env.BACKENDS)
    for b in BACKENDS.values():
        assert b.ops <= set(ops.OPS), (b.name, sorted(b.ops - set(ops.OPS)))
    assert get_backend("reference").ops == set(ops.OPS)
    C = pytest.importorskip("fastmerge._C")
    bound = {name.removesuffix("_cpu") for name in dir(C) if name.endswith("_cpu")}
    assert get_backend("cpp").ops - {"orth_project"} == bound  # orth_project: ATen's BLAS, no kernel of its own
    for op in bound:
        assert kernel("cpp", op) is getattr(C, f"{op}_cpu")


@pytest.mark.parametrize("backend", NATIVE)
def test_forced_backend_non_contiguous(backend, monkeypatch):
    dev = device_or_skip(backend)
    monkeypatch.setenv("FASTMERGE_BACKEND", backend)
    dtype = torch.float16
    big = [qint((40, 66), dtype, dev) for _ in range(4)]
    base, ex = big[0].t()[3:40:2], [b.t()[3:40:2] for b in big[1:]]  # (19, 40), strided
    assert not base.is_contiguous()
    params = ties_params(3, weights=[1.0, 0.5, 2.0], lo=0.25)
    got, counts = ops.ties_merge(base, ex, params, merge="wmean", weighted_elect=True, lam=0.5)
    want, wc = ties_merge_ref(base, ex, params, merge="wmean", weighted_elect=True, lam=0.5)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
    assert torch.equal(counts.cpu(), wc.cpu())
    x = ex[0]
    got, st = ops.prune(x, 0.25, 1.0, p=0.5, seed=3, key=4)
    assert torch.equal(got.cpu(), prune_ref(x, torch.tensor([0.25]), torch.tensor([1.0]), 0.5, 3, 4)[0].cpu())
    h = ops.abs_histogram(x)
    assert torch.equal(h.cpu(), abs_histogram_ref(x, 0).cpu())
    out = torch.empty(base.t().shape, dtype=dtype, device=dev).t()  # non-contiguous output
    torch.ops.fastmerge.consensus_merge(base, ex, torch.ones(3), None, 2, 1.0, out)
    assert torch.equal(out.cpu(), consensus_merge_ref(base, ex, torch.ones(3)).cpu())


def test_forced_backend(monkeypatch):
    x = torch.randn(100)
    monkeypatch.setenv("FASTMERGE_BACKEND", "reference")
    assert torch.equal(ops.abs_histogram(x), abs_histogram_ref(x, 0))
    monkeypatch.setenv("FASTMERGE_BACKEND", "cuda")
    with pytest.raises(NoBackendError, match=r"cuda: cuda runs on cuda, inputs are on cpu"):
        ops.abs_histogram(x)
    monkeypatch.setenv("FASTMERGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMERGE_BACKEND must be one of"):
        ops.abs_histogram(x)


def test_dispatch_lists_every_reason(monkeypatch):
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    with pytest.raises(NoBackendError) as e:
        select("ties_merge", torch.device("cpu"), (torch.int32,))
    msg = str(e.value)
    assert "cpp:" in msg and "reference: reference does not support dtype int32" in msg


def test_fallback_warns_once_when_native_missing(monkeypatch):
    from fastmerge.backends import registry

    if registry.BACKENDS["cpp"].unavailable() is None:
        pytest.skip("the native extension is built: no fallback")
    registry._warned.clear()
    with pytest.warns(UserWarning, match="falling back to the slow reference"):
        ops.abs_histogram(torch.randn(3))
