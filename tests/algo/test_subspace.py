"""The batched truncated SVD and polar factor against torch.linalg.svd (the orth_project op they use is tested
in tests/ops/test_orth_project.py). Singular vectors are not unique, so the checks compare singular
values, orthonormality, projectors and reconstructions, never raw U/V."""

import math

import pytest
import torch

from fastmerge.algo import subspace


def lowrank_noise(b, m, n, rank=12, noise=0.05, seed=0, dtype=torch.float32):
    """A stack of low-rank-plus-noise matrices with a decaying spectrum (like task vectors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(b, m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(b, n, rank, generator=g)).Q
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.8
    x = (u * s) @ v.mT + noise * torch.randn(b, m, n, generator=g) / math.sqrt(max(m, n))
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# truncated SVD


def _check_triplets(a, k, u, s, vh, *, sv_tol, rec_tol):
    """s against the exact singular values; U, V orthonormal; U diag(s) Vh against the exact rank-k part."""
    a64 = a.double()
    U, S, Vh = torch.linalg.svd(a64, full_matrices=False)
    torch.testing.assert_close(s.double(), S[..., :k], rtol=sv_tol, atol=sv_tol * float(S.max()))
    eye = torch.eye(k, dtype=torch.float64)
    assert float((u.double().mT @ u.double() - eye).abs().max()) < 1e-4
    assert float((vh.double() @ vh.double().mT - eye).abs().max()) < 1e-4
    want = (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
    got = (u.double() * s.double()[..., None, :]) @ vh.double()
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err < rec_tol, err


@pytest.mark.parametrize("shape", [(3, 40, 25), (2, 25, 40), (1, 64, 64), (4, 33, 7)], ids=str)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_svd_topk_accurate_modes(shape, mode):
    a = lowrank_noise(*shape, rank=min(shape[1:]) // 2)
    r = min(shape[1:])
    for k in (1, r // 3, r):
        u, s, vh = subspace.svd_topk(a, k, mode=mode)
        assert u.shape == (*shape[:-1], k) and s.shape == (shape[0], k) and vh.shape == (shape[0], k, shape[-1])
        _check_triplets(a, k, u, s, vh, sv_tol=1e-5, rec_tol=1e-4)


def test_svd_topk_randomized_on_a_gap():
    """Where the spectrum has a clear gap at k the randomized range finder is as good as exact."""
    g = torch.Generator().manual_seed(1)
    b, m, n, k = 3, 120, 90, 10
    u0 = torch.linalg.qr(torch.randn(b, m, k, generator=g)).Q
    v0 = torch.linalg.qr(torch.randn(b, n, k, generator=g)).Q
    a = (u0 * torch.linspace(2, 1, k)) @ v0.mT + 1e-4 * torch.randn(b, m, n, generator=g)
    u, s, vh = subspace.svd_topk(a, k, mode="randomized", power_iters=2, seed=3)
    _check_triplets(a, k, u, s, vh, sv_tol=1e-4, rec_tol=1e-3)
    again = subspace.svd_topk(a, k, mode="randomized", power_iters=2, seed=3)
    assert torch.equal(again[1], s)  # the seed fixes the test matrix
    # k + oversample >= r/2: a range finder saves nothing there, so it is the fast path
    for x, y in zip(subspace.svd_topk(a, 30, mode="randomized"), subspace.svd_topk(a, 30), strict=True):
        assert torch.equal(x, y)


def test_svd_topk_edge_cases():
    z = torch.zeros(2, 30, 20)
    for mode in subspace.MODES:
        u, s, vh = subspace.svd_topk(z, 5, mode=mode)
        assert float(s.abs().max()) == 0.0
        assert float((u * s[:, None]).abs().max()) == 0.0 and torch.isfinite(u).all() and torch.isfinite(vh).all()
    # rank-deficient: a rank-3 matrix asked for 6 triplets; the null part reconstructs to zero
    a = torch.randn(50, 3) @ torch.randn(3, 40)
    u, s, vh = subspace.svd_topk(a, 6, mode="fast")
    torch.testing.assert_close((u * s) @ vh, a, rtol=1e-4, atol=1e-4)
    # a single matrix, fp64, bf16 input, k = 0
    u, s, vh = subspace.svd_topk(torch.randn(9, 4).double(), 2)
    assert u.shape == (9, 2) and s.dtype == torch.float64
    assert subspace.svd_topk(torch.randn(9, 4).bfloat16(), 2)[1].dtype == torch.float32
    assert subspace.svd_topk(torch.randn(2, 9, 4), 0)[0].shape == (2, 9, 0)
    with pytest.raises(ValueError, match="k must lie"):
        subspace.svd_topk(torch.randn(9, 4), 5)
    with pytest.raises(ValueError, match="mode"):
        subspace.svd_topk(torch.randn(9, 4), 2, mode="lanczos")


# ---------------------------------------------------------------------------------------------------------
# polar factor


@pytest.mark.parametrize("shape", [(3, 40, 25), (2, 25, 40), (1, 33, 33)], ids=str)
def test_polar_matches_svd(shape):
    x = lowrank_noise(*shape, rank=min(shape[1:]), noise=0.3)
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    for mode in ("exact", "fast"):
        p, nuc = subspace.polar(x, mode=mode, nuclear=True)
        torch.testing.assert_close(p.double(), U @ Vh, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nuc.double(), S.sum(-1), rtol=1e-5, atol=1e-6)


def test_polar_ill_conditioned_stack():
    """A stack mixing condition numbers 10, 1e5 and 1e3 (fp32): the ill-conditioned members are multiplied
    by their W in fp64 (an fp32 product loses cond x 6e-8: 4e-4 at 1e5, as exact mode's fp32 SVD does),
    the well-conditioned one in fp32; all match the fp64 polar factor to 1e-6."""
    g = torch.Generator().manual_seed(0)

    def mat(cond):
        u = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
        return (u * torch.logspace(0, -math.log10(cond), 40, dtype=torch.float64)) @ v.T * 1e-2

    x = torch.stack([mat(10.0), mat(1e5), mat(1e3)]).float()
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    p = subspace.polar(x)
    assert p.dtype == torch.float32
    for i in range(3):
        assert float((p[i].double() - U[i] @ Vh[i]).norm() / math.sqrt(40)) < 1e-6, i


def test_polar_rank_deficient_falls_back_to_svd():
    """A rank-deficient matrix has no unique polar factor: fast mode returns the SVD's (its completion of the
    null directions, as the official code and exact mode get it), flags it, and keeps the fast path for the
    full-rank members of the same stack; polar_right flags it too (its W is the partial isometry)."""
    q = torch.linalg.qr(torch.randn(50, 12)).Q
    deficient = torch.cat([q[:, :5], q[:, 5:9] + 0.3 * q[:, :4], torch.zeros(50, 3)], 1)  # 12 columns, 3 zero
    x = torch.stack([deficient, q + 0.1 * torch.randn(50, 12)])
    p, fell = subspace.polar(x, checked=True)
    assert fell.tolist() == [True, False]
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    torch.testing.assert_close(p.double(), U @ Vh, rtol=1e-6, atol=1e-6)
    w, doubt = subspace.polar_right(x, checked=True)
    assert doubt.tolist() == [True, False]
    pw = deficient.double() @ w[0]
    assert float(pw[:, 9:].abs().max()) < 1e-12  # a partial isometry: zero on the empty columns
    torch.testing.assert_close(pw[:, :9].T @ pw[:, :9], torch.eye(9, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="randomized"):
        subspace.polar(x, mode="randomized")


def _orthonormal_pair(m, k, seed=0):
    """Stacks of two orthonormal blocks (B=4, m, k) each: generic angles, exactly shared directions, nearly
    orthogonal blocks, and a block with a zero column (an empty TSV-M slot)."""
    g = torch.Generator().manual_seed(seed)

    def q(x):
        return torch.linalg.qr(x).Q

    x1 = q(torch.randn(4, m, k, generator=g, dtype=torch.float64))
    x2 = q(torch.randn(4, m, k, generator=g, dtype=torch.float64))
    x2[1] = q(torch.cat([x1[1, :, :3], torch.randn(m, k - 3, generator=g, dtype=torch.float64)], 1))
    x2[2] = q(x2[2] - x1[2] @ (x1[2].T @ x2[2]) + 1e-9 * x1[2, :, :k])  # s ~ 1e-9: the small-angle series
    x2[3, :, 0] = 0
    return x1, x2


@pytest.mark.parametrize(("m", "k"), [(40, 7), (301, 64)])
def test_polar_right_pair_matches_gram(m, k):
    """The closed-form two-block factor equals the Gram eigendecomposition's (fp64: to round-off) and the
    SVD's polar factor wherever that is unique (no shared direction, no zero column)."""
    x1, x2 = _orthonormal_pair(m, k)
    x = torch.cat([x1, x2], -1)
    wp, doubt = subspace.polar_right(x, pair=True, checked=True)
    pair, gram = x @ wp, x @ subspace.polar_right(x)
    torch.testing.assert_close(pair, gram, rtol=1e-10, atol=1e-10)
    assert doubt.tolist() == [False, True, False, True]  # a shared direction, a zero column: not unique
    U, _, Vh = torch.linalg.svd(x[::2], full_matrices=False)
    torch.testing.assert_close(pair[::2], U @ Vh, rtol=1e-9, atol=1e-9)
    # a shared direction: the factor is a partial isometry (its Gram is a projector of rank 2k - 3)
    g = pair[1].T @ pair[1]
    torch.testing.assert_close(g @ g, g, rtol=1e-8, atol=1e-8)
    assert round(float(torch.trace(g))) == 2 * k - 3
    # fp32 blocks (as TSV-M's fast path has them): within fp32 round-off of the Gram path
    x32 = x[[0, 2, 3]].float()
    torch.testing.assert_close(x32 @ subspace.polar_right(x32, pair=True).float(),
                               x32 @ subspace.polar_right(x32).float(), rtol=1e-5, atol=1e-5)


def test_polar_right_pair_keeps_the_closed_form_for_close_random_subspaces(monkeypatch):
    """Two random halves of a space (TSV-M at T = 2 on noise-like task vectors) often share a direction to
    1 - cos = 1e-7: the closed form is still exact there (its limit is 1 - cos ~ 1e4 k eps64), so it must not
    hand such members to the general Gram path (2-4x slower per stack)."""
    g = torch.Generator().manual_seed(0)
    m, k = 256, 64
    q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    theta = math.sqrt(2e-7)  # 1 - cos(theta) = 1e-7, as measured between two noise tasks' top halves
    x2 = q[:, k:2 * k].clone()
    x2[:, 0] = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, k]
    x = torch.cat([q[:, :k], x2], -1)
    calls = []
    real = subspace._polar_gram
    monkeypatch.setattr(subspace, "_polar_gram", lambda *a: calls.append(1) or real(*a))
    w, doubt = subspace.polar_right(x, pair=True, checked=True)
    assert not calls and not bool(doubt)
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(x @ w, U @ Vh, rtol=0, atol=1e-9)


def test_polar_right_rejects_bad_shapes():
    with pytest.raises(ValueError, match="tall"):
        subspace.polar_right(torch.randn(5, 8))
    with pytest.raises(ValueError, match="two equal blocks"):
        subspace.polar_right(torch.randn(9, 5), pair=True)
    assert subspace.polar_right(torch.randn(2, 6, 0)).shape == (2, 0, 0)


@pytest.mark.parametrize("numpy_blas", [True, False], ids=["numpy-syrk", "torch-blocks"])
@pytest.mark.parametrize("shape", [(1, 50, 384), (2, 60, 385), (1, 900, 800), (3, 20, 1000)], ids=str)
def test_cpu_gram_is_the_plain_product(shape, numpy_blas, monkeypatch):
    """The CPU Gram is numpy's symmetric rank-k update, or torch GEMMs over the lower block triangle, mirrored:
    the plain product either way (also on transposed views, and with a block that does not divide n)."""
    monkeypatch.setattr(subspace, "_prefer_numpy", lambda: numpy_blas)
    monkeypatch.setattr(subspace, "GRAM_BLOCK", 128)
    a = torch.randn(*shape)
    for x in (a, a.mT.contiguous().mT, torch.randn(shape[0], shape[2], shape[1]).mT):
        xd = x.double()
        with subspace._one_thread():
            got = subspace._gram(x)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, xd.mT @ xd, rtol=1e-13, atol=1e-11)
        torch.testing.assert_close(got, got.mT, rtol=1e-13, atol=1e-11)


@pytest.mark.parametrize("numpy_lapack", [True, False], ids=["numpy", "torch"])
def test_eigh_either_lapack(numpy_lapack, monkeypatch):
    """The CPU fp64 eigensolver takes numpy's LAPACK where that is measured faster: same eigenvalues, same
    eigenspaces (projectors), ascending, on a stack large enough to take that path and with a repeated eigenvalue."""
    import numpy as np

    monkeypatch.setattr(subspace, "_prefer_numpy", lambda: numpy_lapack)
    calls = []
    real = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: calls.append(a.shape) or real(a))
    n = subspace.NUMPY_MIN + 7
    q = torch.linalg.qr(torch.randn(2, n, n, dtype=torch.float64)).Q
    lam = torch.linspace(1, 2, n, dtype=torch.float64).repeat(2, 1)
    lam[:, -3:] = 5.0  # a threefold top eigenvalue: only its eigenspace is defined
    g = (q * lam.unsqueeze(1)) @ q.mT
    with subspace._one_thread():  # numpy's LAPACK is used in the one-threaded workers only
        w, v = subspace.eigh(g)
    assert calls == ([(2, n, n)] if numpy_lapack else [])
    torch.testing.assert_close(w, lam, rtol=0, atol=1e-12)
    top = v[..., -3:] @ v[..., -3:].mT
    torch.testing.assert_close(top, q[..., -3:] @ q[..., -3:].mT, rtol=0, atol=1e-10)
    torch.testing.assert_close(v.mT @ v, torch.eye(n, dtype=torch.float64).expand(2, n, n), rtol=0, atol=1e-12)


def test_worker_threads_run_numpy_blas_single_threaded():
    blas = subspace._numpy_blas()
    if blas is None or not len(blas):
        pytest.skip("threadpoolctl sees no BLAS under numpy here")
    with blas.limit(limits=2):  # as on a 2-core machine without OMP_NUM_THREADS=1
        with subspace._one_thread():
            assert [i["num_threads"] for i in blas.info()] == [1] * len(blas)
        assert [i["num_threads"] for i in blas.info()] == [2] * len(blas)


def test_cpu_workers_split_the_stack(monkeypatch):
    a = lowrank_noise(5, 30, 20)
    threads = torch.get_num_threads()
    monkeypatch.setenv("FASTMERGE_THREADS", "1")
    one = subspace.svd_topk(a, 4)
    monkeypatch.setenv("FASTMERGE_THREADS", "2")
    two = subspace.svd_topk(a, 4)
    for x, y in zip(one, two, strict=True):
        torch.testing.assert_close(x, y)
    assert torch.get_num_threads() == threads  # the workers' one-thread setting is undone


# ---------------------------------------------------------------------------------------------------------
# rank formulas of the official code


def test_rank_formulas():
    assert [subspace.tsv_pack_sizes(768, t) for t in (8, 14, 20)] == [96, 54, 38]
    assert [subspace.tsv_pack_sizes(1024, t) for t in (8, 14, 20)] == [128, 73, 51]
    assert [subspace.iso_cts_sizes(768, t) for t in (8, 14, 20)] == [(616, 19), (614, 11), (608, 8)]
    assert [subspace.iso_cts_sizes(1024, t) for t in (8, 14, 20)] == [(816, 26), (814, 15), (824, 10)]
    assert [subspace.iso_cts_sizes(50, t) for t in (8, 14, 20)] == [(42, 1), (36, 1), (50, 0)]
