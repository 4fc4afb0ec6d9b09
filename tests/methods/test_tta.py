"""Test-time adaptation: the fused merged model against its plain-autograd twin (same coefficients and heads after
training), AdaMerging and Model Tinting semantics (clamp, skipped empty batches, task-wise), loading task vectors
from checkpoints and stores, and saving."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmerge import tta


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# a small model


class Net(nn.Module):
    def __init__(self, d=12, h=16):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, h), nn.LayerNorm(h), nn.Linear(h, h)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _setup(T=3, classes=4, n=64, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Net()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = []
    for _ in range(T):
        experts.append({k: v + 0.3 * torch.randn_like(v) for k, v in base.items()})
    tv = tta.TaskVectors.from_state_dicts(base, experts, dtype=dtype)
    heads = [nn.Linear(16, classes) for _ in range(T)]
    data = [torch.randn(n, 12) for _ in range(T)]
    loaders = [[d[i:i + 8] for i in range(0, n, 8)] for d in data]
    return model, tv, heads, loaders


def test_fused_gradient_equals_autograd():
    model, tv, heads, loaders = _setup()
    fused = tta.MergedModel(model, tv, heads)
    plain = tta.MergedModel(model, tv, heads, fused=False)
    plain.coef.data.copy_(fused.coef.data)
    for m in (fused, plain):
        m.coef.data.uniform_(0.1, 0.9, generator=torch.Generator().manual_seed(1))
        tta.entropy(m(loaders[0][0], 0)).backward()
    torch.testing.assert_close(fused.coef.grad, plain.coef.grad, rtol=1e-4, atol=1e-6)
    assert fused.coef.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_adamerging_fused_equals_plain(granularity):
    model, tv, heads, loaders = _setup()
    a = tta.adamerging(model, tv, heads, loaders, steps=20, granularity=granularity)
    b = tta.adamerging(model, tv, heads, loaders, steps=20, granularity=granularity, fused=False)
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=1e-5, atol=1e-6)
    assert a.coefficients.shape == (3, len(tv.names))
    assert a.losses[-1] < a.losses[0]  # the entropy goes down
    assert (a.coefficients >= 0).all() and (a.coefficients <= 1).all()


@pytest.mark.parametrize("loss", ["crosspseudo", "crosspseudoconf", "entropy"])
def test_tinting_fused_equals_plain(loss):
    model, tv, heads, loaders = _setup()
    a = tta.tinting(model, tv, heads, loaders, loss=loss, epochs=7)
    b = tta.tinting(model, tv, heads, loaders, loss=loss, epochs=7, fused=False)
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=1e-4, atol=1e-5)
    for ha, hb in zip(a.heads, b.heads, strict=True):
        torch.testing.assert_close(ha.weight, hb.weight, rtol=1e-4, atol=1e-5)
    assert a.steps + a.skipped == 7 * 3
    for h0, h in zip(heads, a.heads, strict=True):  # the originals are untouched; the tints moved
        assert not torch.equal(h0.weight, h.weight)


def test_tinting_conf_filter_and_empty_batch():
    logits_m = torch.tensor([[5.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    logits_e = torch.tensor([[4.0, 0.0], [2.0, 0.0], [0.0, 0.1]])
    # sample 0 agrees; 1 disagrees and the expert is more confident (kept); 2 disagrees, merged more confident
    loss = tta.tinting_loss("crosspseudoconf", logits_m, logits_e)
    want = torch.nn.functional.cross_entropy(logits_m[:2], torch.tensor([0, 0]))
    torch.testing.assert_close(loss, want)
    assert tta.tinting_loss("crosspseudoconf", logits_m[2:], logits_e[2:]) is None


def test_tinting_skips_empty_batches_without_nan():
    model, tv, heads, loaders = _setup(T=2)
    # an expert head that is never confident: the merged model wins every disagreement... and agreements are
    # impossible when the expert always picks a class the merged head never does
    ex = [nn.Linear(16, 4) for _ in range(2)]
    for h in ex:
        nn.init.zeros_(h.weight)
        with torch.no_grad():
            h.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e-3]))
    res = tta.tinting(model, tv, heads, loaders, loss="crosspseudoconf", epochs=2, expert_heads=ex)
    assert all(torch.isfinite(torch.tensor(res.losses))) and torch.isfinite(res.coefficients).all()


def test_task_vectors_from_checkpoints_and_store(tmp_path):
    model, tv, heads, loaders = _setup(T=2)
    base = {k: v.contiguous() for k, v in model.state_dict().items()}
    paths = []
    for i in range(2):
        sd = {k: v + (0.1 * (i + 1) if k.startswith("fc") else 0.0) for k, v in base.items()}
        p = str(tmp_path / f"e{i}.safetensors")
        save_file(sd, p)
        paths.append(p)
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    tv2 = tta.TaskVectors.from_checkpoints(bp, paths, dtype=torch.bfloat16)
    assert set(tv2.names) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # the unchanged norm is left out
    assert tv2.taus.dtype == torch.bfloat16 and tv2.tasks == ["e0", "e1"]
    m = tta.MergedModel(model, tv2, heads[:2])
    assert torch.isfinite(m(loaders[0][0], 1)).all()
    with pytest.raises(ValueError, match="not a parameter"):
        tta.MergedModel(nn.Linear(3, 3), tv2)
    # a doge_am store
    from _models import save_hf

    import fastmerge

    dirs = [save_hf(str(tmp_path / "b"), {"encoder.l.weight": torch.randn(6, 5)})]
    for i in range(2):
        dirs.append(save_hf(str(tmp_path / f"x{i}"), {"encoder.l.weight": torch.randn(6, 5)}))
    fastmerge.merge({"merge_method": "doge_am", "base_model": dirs[0], "models": [{"model": d} for d in dirs[1:]],
                     "parameters": {"steps": 3}}, str(tmp_path / "store"), quiet=True)
    tv3 = tta.TaskVectors.from_store(str(tmp_path / "store"))
    assert tv3.names == ["encoder.l.weight"] and tv3.taus.shape == (2, 30) and tv3.tasks == ["x0", "x1"]
    with pytest.raises(ValueError, match="lacks tensor"):
        tta.TaskVectors.from_checkpoints(bp, [paths[0], str(tmp_path / "b" / "model.safetensors")])


def test_save_and_task_wrapper(tmp_path):
    model, tv, heads, loaders = _setup(T=2)
    res = tta.adamerging(model, tv, heads, loaders, steps=3)
    res.save(str(tmp_path / "out"))
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    hs = load_file(str(tmp_path / "out" / "heads.safetensors"))
    assert set(sd) == set(model.state_dict()) and "head_1.weight" in hs
    fresh = Net()
    fresh.load_state_dict(sd)
    x = loaders[1][0]
    torch.testing.assert_close(res.model.for_task(1)(x), heads[1](fresh(x)), rtol=1e-5, atol=1e-5)
    assert os.path.exists(tmp_path / "out" / "coefficients.json")
    with pytest.raises(ValueError, match="need 2 heads"):
        tta.adamerging(model, tv, heads[:1], loaders, steps=1)


def test_batched_forward_equals_separate_forwards():
    model, tv, heads, loaders = _setup()
    a = tta.adamerging(model, tv, heads, loaders, steps=5, batch_forward=True)
    b = tta.adamerging(model, tv, heads, loaders, steps=5, batch_forward=False)
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=1e-5, atol=1e-6)
    big, sizes = tta._concat([{"ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.ones(2, 3)},
                              {"ids": torch.ones(1, 5, dtype=torch.long), "mask": torch.ones(1, 5)}])
    assert sizes == [2, 1] and big["ids"].shape == (3, 5) and big["mask"][:2, 3:].sum() == 0
    assert tta._concat([torch.ones(2, 3), torch.ones(2, 4)]) is None


@pytest.mark.gpu
def test_adamerging_on_cuda_matches_cpu():
    model, tv, heads, loaders = _setup()
    a = tta.adamerging(model, tv, heads, loaders, steps=10)
    gm = _setup()[0].cuda()
    gm.load_state_dict(model.state_dict())
    gh = [nn.Linear(16, 4).cuda() for _ in heads]
    for h, g in zip(heads, gh, strict=True):
        g.load_state_dict(h.state_dict())
    b = tta.adamerging(gm, tv.to("cuda"), gh, [[x.cuda() for x in ld] for ld in loaders], steps=10)
    torch.testing.assert_close(b.coefficients.cpu(), a.coefficients, rtol=1e-4, atol=1e-5)
