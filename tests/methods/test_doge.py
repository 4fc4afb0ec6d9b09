"""DOGE: the batched closed-form optimiser against the sequential autograd reference written from the spec
(tests/peers.py), and doge_ta / doge_am through `fastmerge merge` (its step kernels: tests/ops)."""

import os

import pytest
import torch
from _models import save_hf
from peers import official_doge
from safetensors.torch import load_file

import fastmerge
from fastmerge import ops
from fastmerge.algo import doge
from fastmerge.config import ConfigError
from fastmerge.methods.doge import DEFAULTS, official_layer

# ---------------------------------------------------------------------------------------------------------
# the optimiser against the sequential autograd reference


def _layers(shapes, T, seed=0, zero_task=None):
    g = torch.Generator().manual_seed(seed)
    base, tasks = {}, [{} for _ in range(T)]
    for i, (m, n) in enumerate(shapes):
        k = f"vision_model.encoder.layers.{i}.mlp.fc1.weight"
        base[k] = 0.02 * torch.randn(m, n, generator=g)
        shared = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
        for t in range(T):
            own = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
            tau = 0.01 * (0.5 * shared + own + 0.1 * torch.randn(m, n, generator=g))
            tasks[t][k] = base[k] + (0 * tau if t == zero_task else tau)
    base["vision_model.encoder.layers.0.layer_norm1.weight"] = torch.ones(shapes[0][1])
    for t in range(T):
        tasks[t]["vision_model.encoder.layers.0.layer_norm1.weight"] = 1 + 0.01 * torch.randn(shapes[0][1],
                                                                                             generator=g)
    return base, tasks


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(("shapes", "T", "zero"), [([(24, 20), (24, 20), (30, 16)], 3, None),
                                                   ([(18, 26)], 2, None), ([(20, 20), (20, 20)], 3, 1)])
def test_batched_optimizer_equals_sequential_reference(shapes, T, zero):
    base, tasks = _layers(shapes, T, zero_task=zero)
    keys = [k for k in base if official_layer(k) and base[k].dim() == 2]
    want, deltas = official_doge(base, tasks, keys, steps=60)
    p = dict(DEFAULTS, steps=60)
    lo = None
    for shape in sorted(set(shapes)):
        ks = [k for k in sorted(keys) if tuple(base[k].shape) == shape]
        taus = torch.stack([torch.stack([t[k] - base[k] for t in tasks]) for k in ks])
        lam, delta = doge.prepare_layers(taus, p, False, "exact")
        for k, d in zip(ks, delta, strict=True):
            assert _rel(d, deltas[k][0]) < 1e-4, k
        if lo is None:  # the global thresholds the reference uses
            flat = [torch.cat([(t[k] - base[k]).reshape(-1) for k in sorted(keys)]).abs() for t in tasks]
            lo = [float(f.kthvalue(f.numel() - int(f.numel() * 0.3)).values) for f in flat]
        upd = doge.doge_ta_update(taus, lo, p, "exact")
        for k, u in zip(ks, upd, strict=True):
            assert _rel(base[k] + u, want[k]) < 1e-5, k


def test_am_optimizer_equals_sequential_reference():
    base, tasks = _layers([(22, 18), (22, 18)], 3, seed=4)
    keys = [k for k in base if official_layer(k) and base[k].dim() == 2]
    want, deltas = official_doge(base, tasks, keys, per_task=True, steps=50)
    ks = sorted(keys)
    taus = torch.stack([torch.stack([t[k] - base[k] for t in tasks]) for k in ks])
    _, delta = doge.prepare_layers(taus, dict(DEFAULTS, steps=50), True, "exact")
    for k, d in zip(ks, delta, strict=True):
        for i in range(3):
            assert _rel(d[i], deltas[k][i]) < 1e-4, (k, i)


# ---------------------------------------------------------------------------------------------------------
# through the engine


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("doge")
    base, tasks = _layers([(24, 20), (24, 20), (30, 16)], 3, seed=7)
    base["vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 2, 2)
    for t in tasks:
        t["vision_model.embeddings.patch_embedding.weight"] = base[
            "vision_model.embeddings.patch_embedding.weight"] + 0.1
    paths = [save_hf(os.path.join(root, "base"), base)]
    paths += [save_hf(os.path.join(root, f"t{i}"), t) for i, t in enumerate(tasks)]
    return paths, base, tasks


def _cfg(method, paths, gp=None, extra=None):
    c = {"merge_method": method, "base_model": paths[0], "models": [{"model": p} for p in paths[1:]]}
    if gp:
        c["parameters"] = gp
    if extra:
        c["fastmerge"] = extra
    return c


def test_doge_ta_through_the_engine(clip_family, tmp_path):
    paths, base, tasks = clip_family
    out = str(tmp_path / "o")
    s = fastmerge.merge(_cfg("doge_ta", paths, {"steps": 40}, {"svd": "exact"}), out, quiet=True)
    got = load_file(os.path.join(out, "model.safetensors"))
    keys = [k for k in base if official_layer(k) and base[k].dim() == 2]
    want, _ = official_doge(base, tasks, keys, steps=40)
    for k in base:
        assert _rel(got[k], want[k]) < 1e-5, k
    assert torch.equal(got["vision_model.embeddings.patch_embedding.weight"],
                       base["vision_model.embeddings.patch_embedding.weight"])  # unselected: pretrained
    assert s.passes >= 3  # two threshold passes (fp32 inputs) + the merge


def test_doge_fast_mode_close_to_exact(clip_family, tmp_path):
    paths, base, _ = clip_family
    fastmerge.merge(_cfg("doge_ta", paths, {"steps": 40}, {"svd": "exact"}), str(tmp_path / "e"), quiet=True)
    fastmerge.merge(_cfg("doge_ta", paths, {"steps": 40}), str(tmp_path / "f"), quiet=True)
    e = load_file(str(tmp_path / "e" / "model.safetensors"))
    f = load_file(str(tmp_path / "f" / "model.safetensors"))
    assert max(_rel(f[k] - base[k], e[k] - base[k]) for k in base if not torch.equal(e[k], base[k])) < 1e-3


def test_doge_am_store_and_reconstruct(clip_family, tmp_path):
    paths, base, tasks = clip_family
    store = str(tmp_path / "store")
    s = fastmerge.merge(_cfg("doge_am", paths, {"steps": 30}, {"svd": "exact"}), store, quiet=True)
    assert s.extra["kind"] == "task_vectors"
    keys = [k for k in base if official_layer(k) and base[k].dim() == 2]
    want, _ = official_doge(base, tasks, keys, per_task=True, steps=30)
    tv = load_file(os.path.join(store, "task_vectors", "model.safetensors"))
    for k in keys:
        for i in range(3):
            assert _rel(tv[k][i], want[k][i]) < 1e-4, (k, i)
    k = "vision_model.embeddings.patch_embedding.weight"
    assert torch.allclose(tv[k][1], tasks[1][k] - base[k])  # unselected tensors keep their task vectors
    fastmerge.reconstruct(store, 2, str(tmp_path / "t2"))
    got = load_file(str(tmp_path / "t2" / "model.safetensors"))
    assert torch.allclose(got[keys[0]], base[keys[0]] + tv[keys[0]][2])


def test_doge_llm_layer_rule_and_errors(tmp_path):
    from _models import make_llama_family

    fam = make_llama_family(str(tmp_path / "f"), hidden=32, layers=2, vocab=50, experts=2, dtype=torch.float32)
    out = str(tmp_path / "o")
    s = fastmerge.merge(_cfg("doge_ta", fam, {"steps": 5}), out, quiet=True)
    got = load_file(os.path.join(out, "model.safetensors"))
    b = load_file(os.path.join(fam[0], "model.safetensors"))
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["model.layers.0.input_layernorm.weight"], b["model.layers.0.input_layernorm.weight"])
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert s.tensors == len(b)
    with pytest.raises(ConfigError, match="no tensor matches"):
        fastmerge.merge(_cfg("doge_ta", fam, {"steps": 5}, {"doge_layers": "official"}), str(tmp_path / "x"),
                        quiet=True)
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ConfigError, match="steps"):
        fastmerge.merge(_cfg("doge_ta", fam, {"steps": 0}), str(tmp_path / "y"), quiet=True)
    with pytest.raises(ConfigError, match="doge_layers"):
        fastmerge.merge(_cfg("ties", fam, None, {"doge_layers": "blocks"}), str(tmp_path / "z"), quiet=True)


@pytest.mark.gpu
def test_doge_cuda_matches_cpu(clip_family, tmp_path):
    paths, base, _ = clip_family
    fastmerge.merge(_cfg("doge_ta", paths, {"steps": 40}), str(tmp_path / "c"), device="cpu", quiet=True)
    fastmerge.merge(_cfg("doge_ta", paths, {"steps": 40}), str(tmp_path / "g"), device="cuda", quiet=True)
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    g = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert max(_rel(g[k] - base[k], c[k] - base[k]) for k in base if not torch.equal(c[k], base[k])) < 1e-3


def test_optimizer_does_not_take_engine_scratch_per_step():
    """The engine lends scratch buffers that live until a tensor is written; DOGE's per-step temporaries must not
    come from it (400 steps of them grew a 22M-parameter merge to 3.6 GB)."""
    taus = torch.randn(2, 2, 12, 10)
    lam = doge.lambdas(taus, 0.07)
    basis = doge.shared_basis(taus, 2)
    lent = []
    with ops.allocating(lambda shape, dtype: lent.append(shape) or torch.empty(shape, dtype=dtype)):
        doge.optimize(taus, lam, basis, steps=50)
    assert len(lent) < 5, len(lent)
