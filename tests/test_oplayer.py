"""The op layer: lean import, torch.library contracts (opcheck, fake tensors, torch.compile), dispatch, errors."""

import math
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmerge
from fastmerge import ops
from fastmerge.backends import NoBackendError, select
from fastmerge.ops.abs_histogram import abs_histogram_ref


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


def _args():
    base = torch.randn(9, 5)
    ex = [torch.randn(9, 5) for _ in range(3)]
    return base, ex


OPCHECK_CASES = {
    "abs_histogram": lambda b, e: (e[0], torch.zeros(65536, dtype=torch.int64), 0, 0),
    "row_kth_largest_abs": lambda b, e: (e[0], 2, torch.empty(9)),
    "prune": lambda b, e: (e[0], torch.zeros(1), torch.full((1,), math.inf), torch.empty(9, 5),
                           torch.zeros(2, dtype=torch.float64), 0.5, 1, 2, 0, 2.0),
    "della_prune": lambda b, e: (e[0], torch.empty(9, 5), 0.5, 0.1, 1, 2, True),
    "ties_merge": lambda b, e: (b, e, ops.ties_params(3), torch.empty(9, 5), torch.zeros(2, dtype=torch.int64),
                                1, 2, 0, 1, 1, False, 1.0, 0.5),
    "tall_masks": lambda b, e: (b, e, torch.ones(3), None, torch.empty(3, 9, 5, dtype=torch.bool)),
    "consensus_merge": lambda b, e: (b, e, torch.ones(3), None, 2, 1.0, torch.empty(9, 5)),
    "emr_elect": lambda b, e: (b, e, torch.empty(9, 5), torch.empty(3, 9, 5, dtype=torch.bool),
                               torch.zeros(3, 2, dtype=torch.float64)),
}


@pytest.mark.parametrize("op", list(OPCHECK_CASES))
def test_opcheck(op):
    args = OPCHECK_CASES[op](*_args())
    torch.library.opcheck(getattr(torch.ops.fastmerge, op).default, args)


def test_fake_tensors_check_shapes():
    with FakeTensorMode():
        base, ex = torch.empty(64, 32), [torch.empty(64, 32) for _ in range(2)]
        out, counts = ops.ties_merge(base, ex, lam=0.5)
        assert out.shape == (64, 32) and counts.shape == (2,)
        with pytest.raises(Exception, match=r"experts\[1\] has shape"):
            ops.ties_merge(base, [ex[0], torch.empty(64, 31)])


def test_torch_compile_fullgraph():
    base, ex = _args()

    def f(b, e0, e1):
        out, _ = ops.ties_merge(b, [e0, e1], merge="sum", lam=0.5)
        return out * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(base, ex[0], ex[1])
    torch.testing.assert_close(got, f(base, ex[0], ex[1]))


def test_errors_name_the_argument():
    base, ex = _args()
    with pytest.raises(Exception, match=r"experts\[2\] is torch.float16"):
        ops.ties_merge(base, [ex[0], ex[1], ex[2].half()])
    with pytest.raises(Exception, match="base has shape"):
        ops.ties_merge(torch.randn(3), ex)
    with pytest.raises(ValueError, match="experts must hold at least one"):
        ops.ties_merge(base, [])
    with pytest.raises(ValueError, match="density must be a fraction"):
        fastmerge.ties(base, ex, 1.5)
    with pytest.raises(ValueError, match="density has 2 values for 3 experts"):
        fastmerge.ties(base, ex, [0.5, 0.5])
    with pytest.raises(ValueError, match="compat must be one of"):
        fastmerge.ties(base, ex, 0.5, compat="nope")
    with pytest.raises(Exception, match="x must be a floating tensor"):
        ops.abs_histogram(torch.arange(4))
    with pytest.raises(Exception, match=r"p \(drop probability\) must be in"):
        ops.prune(ex[0], p=1.5)
    with pytest.raises(Exception, match="params must be float32 of shape"):
        ops.ties_merge(base, ex, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="weights has 2 values for 3 experts"):
        ops.ties_params(3, weights=[1.0, 2.0])


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
