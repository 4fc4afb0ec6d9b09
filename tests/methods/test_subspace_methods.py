"""The subspace methods through `fastmerge merge`: exact mode against the official algorithms (tests/peers.py,
one key at a time with per-matrix SVDs), fast mode against exact, the key predicate, stacking across layers,
TSV-C's store and reconstruction, and config errors."""

import math
import os

import pytest
import torch
from _models import llama_config, load_dir, save_hf, shared_task_vectors
from peers import official_is_matrix, official_iso_c, official_iso_cts, official_mean, official_tsv_c, official_tsv_m

import fastmerge
from fastmerge.config import ConfigError
from fastmerge.config import load as load_config
from fastmerge.engine import Engine
from fastmerge.methods import subspace as svd_methods
from fastmerge.plan import Group

OFFICIAL = {"tsv_m": official_tsv_m, "iso_c": official_iso_c, "iso_cts": official_iso_cts}
# three experts, and two (TSV-M's fast path has a closed form at T = 2)
FAMILY_METHODS = [(f, m) for f in ("fam", "fam2") for m in OFFICIAL]


def _task_family(root, T=3, dtype=torch.float32, seed=0, hidden=48, layers=2, inter=80, vocab=400):
    """base + T experts whose task vectors are low-rank + shared + noise (realistic spectra), plus a
    CLIP-style text_projection and a 1-D norm."""
    cfg = llama_config(hidden, layers, vocab, inter, "float32")
    g = torch.Generator().manual_seed(seed)
    from _models import llama_shapes

    shapes = llama_shapes(cfg) | {"text_projection": (hidden, 32)}
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    shared = {k: _lowrank(s, 6, g) for k, s in shapes.items()}
    paths = [save_hf(os.path.join(root, "base"), {k: v.to(dtype) for k, v in base.items()}, cfg)]
    for t in range(T):
        sd = {k: (v + 0.01 * (0.3 * shared[k] + _lowrank(v.shape, 8, g)
                              + 0.05 * torch.randn(v.shape, generator=g))).to(dtype) for k, v in base.items()}
        paths.append(save_hf(os.path.join(root, f"task{t}"), sd, cfg))
    return paths


def _lowrank(shape, rank, g):
    if len(shape) != 2:
        return torch.randn(shape, generator=g)
    m, n = shape
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.7
    return (torch.randn(m, rank, generator=g) * s) @ torch.randn(rank, n, generator=g) / math.sqrt(rank)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return _task_family(str(tmp_path_factory.mktemp("svdfam")))


@pytest.fixture(scope="module")
def fam2(tmp_path_factory):
    """Two experts: TSV-M's fast path orthogonalises two blocks in closed form."""
    return _task_family(str(tmp_path_factory.mktemp("svdfam2")), T=2, seed=5)


def _cfg(method, fam, extra=None, gp=None, mp=None):
    c = {"merge_method": method, "base_model": fam[0],
         "models": [{"model": m, **({"parameters": dict(mp)} if mp else {})} for m in fam[1:]]}
    if gp:
        c["parameters"] = gp
    if extra:
        c["fastmerge"] = extra
    return c


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _official(method, fam, alpha=1.0, exclude=("text_projection",)):
    sds = [load_dir(p) for p in fam]
    out = {}
    for k, b in sds[0].items():
        taus = [sd[k].float() - b.float() for sd in sds[1:]]
        if official_is_matrix(k, b) and not any(s in k for s in exclude if s != "text_projection"):
            delta = OFFICIAL[method](taus)
        else:
            delta = official_mean(taus)
        out[k] = b.float() + alpha * delta
    return out


@pytest.mark.parametrize(("family", "method"), FAMILY_METHODS)
def test_exact_mode_equals_official(request, family, tmp_path, method):
    fam = request.getfixturevalue(family)
    s = fastmerge.merge(_cfg(method, fam, {"svd": "exact"}, {"alpha": 0.7}), str(tmp_path / "o"), quiet=True)
    got, want = load_dir(str(tmp_path / "o")), _official(method, fam, 0.7)
    assert set(got) == set(want) and s.tensors == len(want)
    for k in want:
        base = load_dir(fam[0])[k].float()
        assert _rel(got[k] - base, want[k] - base) <= 1e-5, k  # the merged update, relative


@pytest.mark.parametrize(("family", "method"), FAMILY_METHODS)
def test_fast_mode_close_to_exact(request, family, tmp_path, method):
    fam = request.getfixturevalue(family)
    fastmerge.merge(_cfg(method, fam, {"svd": "exact"}), str(tmp_path / "exact"), quiet=True)
    fastmerge.merge(_cfg(method, fam), str(tmp_path / "fast"), quiet=True)
    ex, fa, base = load_dir(str(tmp_path / "exact")), load_dir(str(tmp_path / "fast")), load_dir(fam[0])
    worst = max(_rel(fa[k] - base[k], ex[k] - base[k]) for k in ex)
    assert worst <= 1e-3, worst
    weights = max(_rel(fa[k], ex[k]) for k in ex)
    assert weights <= 1e-4, weights


def test_randomized_mode_runs_and_is_reproducible(fam, tmp_path):
    c = _cfg("tsv_m", fam, {"svd": "randomized", "svd_power_iters": 3, "svd_oversample": 4})
    fastmerge.merge(c, str(tmp_path / "a"), quiet=True)
    fastmerge.merge(c, str(tmp_path / "b"), quiet=True)
    a, b = load_dir(str(tmp_path / "a")), load_dir(str(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exclude_keys_and_weights(fam, tmp_path):
    """exclude_keys: [] puts text_projection through TSV (FusionBench); per-model weights scale each task
    vector before the SVDs (FusionBench's list of alphas)."""
    out = str(tmp_path / "o")
    fastmerge.merge(_cfg("tsv_m", fam, {"svd": "exact", "exclude_keys": []}, mp={"weight": 0.5}), out, quiet=True)
    got = load_dir(out)
    sds = [load_dir(p) for p in fam]
    b = sds[0]["text_projection"].float()
    taus = [0.5 * (sd["text_projection"].float() - b) for sd in sds[1:]]
    assert _rel(got["text_projection"] - b, official_tsv_m(taus)) <= 1e-5
    norm = "model.norm.weight"
    want = official_mean([0.5 * (sd[norm] - sds[0][norm]) for sd in sds[1:]])
    assert _rel(got[norm] - sds[0][norm], want) <= 1e-5


def test_same_shape_tensors_are_stacked(fam):
    eng = Engine(load_config(_cfg("tsv_m", fam)))
    eng.plan()
    units = eng.units()
    groups = [u for u in units if isinstance(u, Group)]
    assert any(len(g.jobs) > 1 for g in groups)
    assert sorted(j.name for u in units for j in (u.jobs if isinstance(u, Group) else (u,))) == sorted(
        j.name for j in eng.jobs)
    for g in groups:
        assert len({j.shape for j in g.jobs}) == 1
    # a tight budget gives smaller stacks, never a wrong merge
    eng2 = Engine(load_config(_cfg("tsv_m", fam)), memory_budget=200_000)
    eng2.plan()
    def biggest(us):
        return max(len(u.jobs) for u in us if isinstance(u, Group) and len(u.jobs[0].shape) == 2)

    assert biggest(eng2.units()) < biggest(groups)


def test_bf16_models(tmp_path):
    fam = _task_family(str(tmp_path / "f"), T=2, dtype=torch.bfloat16, seed=3)
    fastmerge.merge(_cfg("iso_cts", fam, {"svd": "exact"}), str(tmp_path / "e"), quiet=True)
    fastmerge.merge(_cfg("iso_cts", fam), str(tmp_path / "f2"), quiet=True)
    ex, fa = load_dir(str(tmp_path / "e")), load_dir(str(tmp_path / "f2"))
    assert all(t.dtype == torch.bfloat16 for t in fa.values())
    assert max(_rel(fa[k], ex[k]) for k in ex) <= 1e-2  # one bf16 rounding apart at most


def test_tsv_c_store_and_reconstruct(fam, tmp_path):
    store = str(tmp_path / "store")
    s = fastmerge.merge(_cfg("tsv_c", fam, {"svd": "exact", "tasks": ["a", "b", "c"]}), store, quiet=True)
    assert s.extra["tasks"] == ["a", "b", "c"] and 0 < s.extra["size_ratio"] < 1
    assert {"base", "factors", "store.json"} <= set(os.listdir(store))
    sds = [load_dir(p) for p in fam]
    from fastmerge.store import reconstruct

    for t, name in enumerate(["a", "b", "c"]):
        out = str(tmp_path / f"task-{name}")
        reconstruct(store, name, out)
        got = load_dir(out)
        for k, b in sds[0].items():
            tau = sds[t + 1][k].float() - b.float()
            want = b.float() + (official_tsv_c(tau, 3) if b.dim() == 2 else tau)
            assert _rel(got[k] - b, want - b) <= 1e-5, (name, k)
        assert os.path.exists(os.path.join(out, "config.json"))


@pytest.mark.parametrize(("extra", "gp", "match"), [
    ({"svd": "qr"}, None, "fastmerge.svd"),
    ({"svd_power_iters": -1}, None, "svd_power_iters"),
    ({"exclude_keys": "text_projection"}, None, "exclude_keys"),
    (None, {"common_fraction": 1.5}, "common_fraction"),
    (None, {"densty": 0.5}, "not a parameter of iso_cts"),
])
def test_config_errors(fam, tmp_path, extra, gp, match):
    with pytest.raises(ConfigError, match=match):
        fastmerge.merge(_cfg("iso_cts", fam, extra, gp), str(tmp_path / "o"), quiet=True)
    assert not os.path.exists(tmp_path / "o")


def test_svd_options_rejected_for_other_methods(fam, tmp_path):
    with pytest.raises(ConfigError, match="fastmerge.svd: applies to tsv_m, iso_c, iso_cts, tsv_c, doge_ta, "
                       "doge_am, not ties"):
        fastmerge.merge(_cfg("ties", fam, {"svd": "exact"}), str(tmp_path / "o"), quiet=True)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_cuda_engine_matches_cpu(fam, tmp_path, method):
    fastmerge.merge(_cfg(method, fam), str(tmp_path / "cpu"), device="cpu", quiet=True)
    fastmerge.merge(_cfg(method, fam), str(tmp_path / "gpu"), device="cuda", quiet=True)
    a, b = load_dir(str(tmp_path / "cpu")), load_dir(str(tmp_path / "gpu"))
    base = load_dir(fam[0])
    assert max(_rel(b[k] - base[k], a[k] - base[k]) for k in a) <= 1e-3


@pytest.mark.parametrize("T", [2, 3])
def test_fast_mode_where_tasks_share_directions(T):
    """Task vectors that share their top directions (as real ones do) make the packed singular vectors nearly
    dependent: the polar factor's coefficients reach ~1e4 and an fp32 product with them cancels. Fast mode
    then forms the factors in fp64: against exact mode run in fp64 it stays within 1e-4 at T = 2 (the closed
    form, on fp64 blocks) and 2e-3 at T = 3, while exact mode in fp32 (the official code) is ~1e-2 off."""
    g = torch.Generator().manual_seed(0)
    spike = torch.randn(96, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 64, generator=g, dtype=torch.float64)
    taus = torch.stack([spike + 1e-3 * torch.randn(96, 64, generator=g, dtype=torch.float64) for _ in range(T)])
    taus = taus.float()
    truth = svd_methods.tsv_m_delta(taus.double(), mode="exact")  # the same inputs, fp64 throughout
    fast = svd_methods.tsv_m_delta(taus)
    official = svd_methods.tsv_m_delta(taus, mode="exact")
    assert fast.dtype == torch.float32
    assert _rel(fast, truth) <= (1e-4 if T == 2 else 2e-3)
    assert _rel(official, truth) > 5 * _rel(fast, truth)
    iso = svd_methods.iso_c_delta(taus.double(), mode="exact")
    assert _rel(svd_methods.iso_c_delta(taus), iso) <= 1e-3


def test_fast_mode_mixed_stack_equals_one_by_one():
    """A stack whose members take different precision paths (one with shared directions, one without) gives
    each member what it gets alone."""
    g = torch.Generator().manual_seed(1)
    spike = torch.randn(80, 2, generator=g) @ torch.randn(2, 48, generator=g)
    shared = torch.stack([spike + 1e-3 * torch.randn(80, 48, generator=g) for _ in range(2)])
    benign = torch.randn(2, 80, 48, generator=g)
    both = svd_methods.tsv_m_delta(torch.stack([shared, benign]))
    for i, t in enumerate((shared, benign)):
        torch.testing.assert_close(both[i], svd_methods.tsv_m_delta(t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [2, 3])
def test_fewer_directions_than_tasks(T):
    """A matrix with r < T (e.g. a 2-label head merged from 3 tasks) keeps int(r/T) = 0 triplets per task:
    a zero update in every mode, as the official code gives."""
    taus = torch.randn(4, T, 1, 9) if T == 2 else torch.randn(4, T, 2, 9)
    for mode in ("exact", "fast", "randomized"):
        out = svd_methods.tsv_m_delta(taus, mode=mode)
        assert out.shape == (4, *taus.shape[-2:]) and float(out.abs().max()) == 0.0, mode



# ---------------------------------------------------------------------------------------------------------
# fast mode's contract: within 1e-4 of the same algorithm in fp64 on every matrix, or computed exactly (and
# reported). The fp32 inputs are the same for both; only the arithmetic differs.

DELTAS = {"tsv_m": svd_methods.tsv_m_delta, "iso_c": svd_methods.iso_c_delta, "iso_cts": svd_methods.iso_cts_delta}


def _fast_vs_fp64(method, taus):
    fn = DELTAS[method]
    ref = fn(taus.double(), mode="exact")
    out, fell = fn(taus, mode="fast", checked=True)
    assert out.dtype == torch.float32 and fell.shape == taus.shape[:-3]
    errs = [_rel(out[g], ref[g]) if float(ref[g].norm()) else float(out[g].norm())
            for g in range(taus.shape[0])]
    return errs, fell


@pytest.mark.parametrize("shape", [(160, 160), (288, 96), (96, 288)], ids=str)
@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("method", list(DELTAS))
def test_fast_mode_within_1e4_of_fp64_where_tasks_share_a_component(method, T, shape):
    """Shared-component strengths 0, 30 and 1000 (the last puts TSV-M's packed singular vectors at a condition
    number of ~1e7, where a pseudo-inverse tolerance once dropped real directions: 10-50 % off)."""
    taus = torch.stack([shared_task_vectors(*shape, T, s, seed=i) for i, s in enumerate((0.0, 30.0, 1e3))])
    errs, fell = _fast_vs_fp64(method, taus)
    assert max(errs) <= 1e-4, (errs, fell)
    assert not bool(fell.any()), fell  # well-posed: no fallback needed


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("method", list(DELTAS))
def test_fast_mode_degenerate_matrices_fall_back_to_exact(method, T):
    """Where the fp64 algorithm's result depends on an SVD's arbitrary choices (an expert whose tensor equals
    the base, two identical experts, noise-free low-rank tasks, equal singular values at the cut), fast mode
    computes that matrix exactly in fp64, says so, and matches the fp64 algorithm; its neighbours in the
    stack stay on the fast path."""
    m = n = 128
    g = torch.Generator().manual_seed(T)
    zero = shared_task_vectors(m, n, T, 10.0, seed=1)
    zero[-1] = 0
    dup = shared_task_vectors(m, n, T, 10.0, seed=2)
    dup[1] = dup[0]
    lowrank = torch.stack([torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) for _ in range(T)])
    lowrank[..., n // 2:] = 0  # exactly rank-deficient (fp32 round-off alone leaves a full-rank tail at 1e-7)
    q = [torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q for _ in range(2 * T)]
    s = torch.linspace(1, 0.1, m, dtype=torch.float64)
    k = m // T
    s[k - 3:k + 3] = s[k]  # a tie across the cut
    tie = torch.stack([(q[2 * t] * s) @ q[2 * t + 1].T for t in range(T)]).float()
    fine = shared_task_vectors(m, n, T, 30.0, seed=3)
    taus = torch.stack([zero, dup, lowrank, tie, fine])
    errs, fell = _fast_vs_fp64(method, taus)
    assert max(errs) <= 1e-4, (errs, fell)
    assert not bool(fell[4]), fell
    if method != "iso_c":  # Iso-C sums the tasks: only its rank-deficient sums are degenerate
        assert bool(fell[:2].all()), fell
    else:
        assert bool(fell[2]), fell  # a sum with zero columns: the SVD's completion carries mean(s)


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_merge_summary_reports_fallbacks(fam, tmp_path, method):
    """An expert identical to the base (a zero task vector on every tensor) makes every matrix degenerate:
    the summary says how many of the matrices fast mode computed exactly, and the weights equal exact mode's
    on fp64 task vectors to 1e-4."""
    same = save_hf(str(tmp_path / "same"), load_dir(fam[0]), llama_config(48, 2, 400, 80, "float32"))
    models = [fam[1], same]
    c = {"merge_method": method, "base_model": fam[0], "models": [{"model": m} for m in models]}
    s = fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    matrices = s.extra["svd_matrices"]
    assert matrices == 2 * 7 + 2  # 7 per layer, the embedding and the head (text_projection is excluded)
    assert s.extra["svd_exact_fallback"] == matrices
    assert f"{matrices} of {matrices} matrices fell back to the exact fp64 path" in str(s)
    got, base = load_dir(str(tmp_path / "o")), load_dir(fam[0])
    taus = {k: torch.stack([load_dir(m)[k].double() - base[k].double() for m in models]) for k in got}
    fn = DELTAS[method]
    for k, t in taus.items():
        if t.dim() == 3 and k != "text_projection":
            assert _rel(got[k].double() - base[k].double(), fn(t, mode="exact")) <= 1e-4, k
