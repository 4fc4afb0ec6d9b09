"""The compat modes against the peers' own formulations, and the streaming threshold."""

import importlib.util
import math
import os
import subprocess
import sys

import peers
import pytest
import torch

import fastmerge
from fastmerge import ops
from fastmerge.algo import ties as sign_consensus
from fastmerge.ops.philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, philox_uniform


def tie_free(shape, scale=1.0):
    """Distinct magnitudes (a permutation of 1..n, random signs): top-k is unambiguous."""
    n = math.prod(shape)
    mags = (torch.randperm(n).float() + 1) * scale / n
    return (mags * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)).reshape(shape)


def model(T, shape=(24, 40)):
    base = torch.randn(shape)
    return base, [base + tie_free(shape) for _ in range(T)]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("compat", ["official", "mergekit", "peft"])
def test_magnitude_prune(density, compat):
    x = tie_free((33, 17))
    got = sign_consensus.magnitude_prune(x, density, compat=compat)
    if compat == "mergekit":
        want = peers.mk_magnitude(x, density)
    elif compat == "peft":
        want = peers.peft_prune(x, density)
    else:
        k = x.numel() - int(x.numel() * density)
        want = x if k == 0 else x * (x.abs() >= x.abs().reshape(-1).kthvalue(k).values)
    assert torch.equal(got, want)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("consensus_method", ["sum", "count"])
def test_ties_mergekit(normalize, consensus_method):
    base, ex = model(3)
    dens, w = [0.3, 0.5, 1.0], [0.5, 1.0, -0.25]
    got = fastmerge.ties(base, ex, dens, weights=w, lam=0.7, compat="mergekit", normalize=normalize,
                         elect=consensus_method)
    want = peers.mk_ties(base, ex, dens, w, lam=0.7, normalize=normalize, consensus=consensus_method)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_and_linear_as_mergekit():
    base, ex = model(3)
    w = [0.5, 1.0, 0.25]
    got = fastmerge.ties(base, ex, weights=w, compat="mergekit", elect="none", merge="sum", lam=0.3)
    want = peers.mk_ties(base, ex, [1.0] * 3, w, lam=0.3, normalize=False, consensus=None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got = fastmerge.ties(base, ex, weights=w, compat="mergekit", elect="none", merge="wmean")
    want = peers.mk_ties(base, ex, [1.0] * 3, w, normalize=True, consensus=None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_peft(method):
    _, ex = model(4)
    tvs = [e - e.mean() for e in ex]
    got = fastmerge.ties(None, tvs, 0.4, weights=[1.0, 0.5, 2.0, 1.5], compat="peft",
                         elect="sum" if method == "total" else "count")
    want = peers.peft_ties(tvs, [1.0, 0.5, 2.0, 1.5], 0.4, method)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("K", [0.2, 0.5])
def test_ties_global_official(merge, K):
    """Whole-model trim from streamed histograms == the official flatten + kthvalue code."""
    base = {f"l{i}.w": torch.randn(s) for i, s in enumerate([(16, 12), (7,), (5, 3, 3), (1,)])}
    experts = [{k: v + tie_free(v.shape, 0.1) for k, v in base.items()} for _ in range(3)]
    keys = sorted(base)
    flat = torch.stack([torch.cat([(sd[k] - base[k]).reshape(-1) for k in keys]) for sd in experts])
    want_flat = peers.official_ties(flat, K, merge)
    got = fastmerge.ties_global(base, experts, K, compat="official", merge=merge, lam=1.0)
    got_flat = torch.cat([(got[k] - base[k]).reshape(-1) for k in keys])
    torch.testing.assert_close(got_flat, want_flat, rtol=1e-5, atol=1e-6)


def test_ties_official_zero_sign_majority():
    """Exact cancellations take the tensor's majority sign (official), + (mergekit)."""
    base = torch.zeros(6)
    ex = [torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5, 0.0]), torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.5, 0.0])]
    got = fastmerge.ties(base, ex, 1.0, compat="official")
    flat = torch.stack(ex)
    trimmed_sum = flat.sum(0)
    signs = torch.sign(trimmed_sum)
    signs[signs == 0] = torch.sign(signs.sum())
    assert signs[0] == 1 and torch.equal(got, peers.official_ties(flat, 1.0 - 1e-9, "mean"))


def test_breadcrumbs_official_and_mergekit():
    x = tie_free((12, 50))
    torch.testing.assert_close(sign_consensus.breadcrumbs(x, 0.2, 0.06), peers.official_breadcrumbs(x, 0.2, 0.06))
    v = tie_free((77,))
    torch.testing.assert_close(sign_consensus.breadcrumbs(v, 0.3, 0.1), peers.official_breadcrumbs(v, 0.3, 0.1))
    for dens, gamma in [(0.3, 0.01), (0.5, 0.0), (0.9, 0.2)]:
        got = sign_consensus.breadcrumbs(x, dens, gamma, per_row=False)
        assert torch.equal(got, peers.mk_outliers(x, dens, gamma)), (dens, gamma)


def test_dare_statistics_and_rescale():
    x = torch.randn(200_000)
    for p in (0.1, 0.5, 0.9):
        y = sign_consensus.dare(x, p, seed=1, key="w")
        kept = (y != 0).float().mean().item()
        assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / x.numel())
        torch.testing.assert_close(y[y != 0], x[y != 0] / (1 - p))
        l1 = sign_consensus.dare(x, p, seed=1, key="w", rescale="l1")
        torch.testing.assert_close(l1.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)
        assert torch.equal(l1 != 0, y != 0)
    a, b = sign_consensus.dare(x, 0.5, seed=1, key="a"), sign_consensus.dare(x, 0.5, seed=1, key="b")
    assert not torch.equal(a != 0, b != 0)
    assert torch.equal(sign_consensus.dare(x, 0.5, seed=9, key="a"), sign_consensus.dare(x, 0.5, seed=9, key="a"))


def test_della_statistics():
    x = tie_free((64, 500))
    y = sign_consensus.della(x, 0.5, 0.2, seed=3, key="w", rescale=False)
    kept = (y != 0).float()
    # keep probability rises with rank: small magnitudes ~0.3, large ~0.7
    order = x.abs().argsort(dim=1)
    by_rank = kept.gather(1, order).mean(0)
    assert abs(by_rank[:100].mean() - 0.32) < 0.05 and abs(by_rank[-100:].mean() - 0.68) < 0.05
    assert abs(kept.mean() - 0.5) < 0.01


def test_tall_consensus_emr_as_official():
    tvs = torch.stack([tie_free((300,)) for _ in range(4)])
    lam = [0.2, 0.4, 0.5, 0.6]
    masks = ops.tall_masks(None, list(tvs), lam)
    assert torch.equal(masks, peers.official_tall(tvs, lam))
    base = torch.randn(300)
    cons = ops.consensus_merge(base, [base + t for t in tvs], lam, min_count=2, lam=0.8)
    want = base + 0.8 * (peers.official_tall(tvs, lam).sum(0) >= 2) * tvs.sum(0)
    torch.testing.assert_close(cons, want, rtol=1e-6, atol=1e-6)
    uni, agree, stats = ops.emr_elect(None, list(tvs))
    wu, wa = peers.official_emr(tvs)
    assert torch.equal(agree, wa)
    torch.testing.assert_close(uni, wu)
    torch.testing.assert_close(stats[:, 0], tvs.abs().double().sum(1))


# ---- the streaming threshold ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_streaming_equals_kthvalue(dtype):
    chunks = [torch.randn(n).to(dtype) for n in (1, 1000, 4097, 333)]
    allv = torch.cat([c.float() for c in chunks]).abs()
    for k in (1, 2, 17, 2000, allv.numel()):
        want = allv.sort(descending=True).values[k - 1].item()
        assert ops.magnitude_threshold(chunks, k) == want
    assert ops.magnitude_threshold(chunks, 0) == math.inf
    with pytest.raises(ValueError, match="k must be in"):
        ops.magnitude_threshold(chunks, allv.numel() + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_small_threshold_equals_the_histogram_path(dtype, monkeypatch):
    """Few elements are ranked by a selection (ops.threshold._SMALL): the same thresholds as the two-pass histogram,
    with ties, -0.0, inf and values that round to the same fp32 key."""
    g = torch.Generator().manual_seed(3)
    x = ((torch.randn(3001, generator=g, dtype=torch.float64) * 8).round() / 4).to(dtype)
    x[0], x[1], x[2] = -0.0, math.inf, -math.inf
    chunks = [x[:1000], x[1000:].reshape(1, -1)[:, ::2], x[1001::2]]
    n = sum(c.numel() for c in chunks)
    ks = (0, 1, 2, 3, 17, n // 2, n - 1, n)
    small = [ops.magnitude_threshold(chunks, k) for k in ks]
    monkeypatch.setattr(ops.threshold, "_SMALL", -1)
    assert small == [ops.magnitude_threshold(chunks, k) for k in ks]


def test_threshold_passes_bf16_one_pass():
    sel = ops.MagnitudeThreshold()
    sel.add(torch.randn(1000).bfloat16())
    assert sel.select(10) is False  # bf16: exact after one pass
    sel = ops.MagnitudeThreshold()
    sel.add(torch.randn(1000))
    assert sel.select(10) is True


def test_threshold_nan_names_tensor():
    sel = ops.MagnitudeThreshold()
    x = torch.ones(10)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN in layers.3.w"):
        sel.add(x, "layers.3.w")


def test_threshold_beyond_2_31_elements():
    """int64 counts: 2^31 + 2^27 elements streamed as 17 chunks of 2^27 bf16 values."""
    chunk = torch.zeros(1 << 27, dtype=torch.bfloat16)
    chunk[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    sel = ops.MagnitudeThreshold()
    for _ in range(17):
        sel.add(chunk)
    assert sel.n == 17 << 27 and sel.n > 2**31
    assert not sel.select(17 * 3)
    assert sel.threshold() == 3.0
    assert int(sel.hist[0]) == 17 * ((1 << 27) - 5)


def test_reference_philox_matches_scalar_python():
    """The vectorised oracle RNG equals a scalar transcription of Philox4x32-10."""
    def philox(g, seed, key):
        m = 0xFFFFFFFF
        c = [g & m, g >> 32, key & m, key >> 32]
        k0, k1 = seed & m, seed >> 32
        for r in range(10):
            if r:
                k0, k1 = (k0 + PHILOX_W0) & m, (k1 + PHILOX_W1) & m
            p0, p1 = PHILOX_M0 * c[0], PHILOX_M1 * c[2]
            c = [(p1 >> 32) ^ c[1] ^ k0, p1 & m, (p0 >> 32) ^ c[3] ^ k1, p0 & m]
        return c

    seed, key = 2**63 + 12345, 2**40 + 7
    u = philox_uniform(16, seed, key, offset=2**34)
    for i in range(16):
        idx = 2**34 + i
        assert u[i].item() == (philox(idx >> 2, seed, key)[idx & 3] >> 8) / 2**24


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_peft_installed_with_ties(method, tmp_path):
    """compat="peft" against the installed PEFT's merge_utils on task vectors quantised to a few hundred
    values (thousands tied at every cut): the same kept entries, in torch.topk's tie order, and its sums.
    PEFT runs in a child process outside the checkout (its transformers import would find the checkout's
    kernels/ folder on the path)."""
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    g = torch.Generator().manual_seed(7)
    tvs = [torch.randint(-200, 201, (512, 384), generator=g).float() / 256 for _ in range(3)]
    weights, density = [1.0, 0.5, 2.0], 0.3
    torch.save({"tvs": tvs, "w": weights, "d": density, "m": method}, tmp_path / "in.pt")
    script = ("import torch\nfrom peft.utils import merge_utils as m\n"
              "a = torch.load('in.pt')\n"
              "torch.save({'ties': m.ties(a['tvs'], torch.tensor(a['w']), a['d'], a['m']),\n"
              "            'prune': m.magnitude_based_pruning(a['tvs'][0], a['d'])}, 'out.pt')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    want = torch.load(tmp_path / "out.pt")
    assert torch.equal(sign_consensus.magnitude_prune(tvs[0], density, compat="peft"), want["prune"])
    got = fastmerge.ties(None, tvs, density, weights=weights, compat="peft",
                         elect="sum" if method == "total" else "count")
    assert torch.equal(got != 0, want["ties"] != 0)
    torch.testing.assert_close(got, want["ties"], rtol=1e-6, atol=1e-7)
