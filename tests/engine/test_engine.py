"""The streaming engine against in-memory merging, tensor by tensor; shard layouts; the multi-task store;
whole-model trimming; bounded memory; and every bad input giving its error and leaving nothing behind."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _models import cfg, leftovers, load_dir, make_llama_family, save_hf
from safetensors.torch import load_file

import fastmerge
from fastmerge import ops
from fastmerge.algo import ties as sign_consensus
from fastmerge.config import ConfigError
from fastmerge.io import Checkpoint, CheckpointError


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return make_llama_family(str(root), hidden=64, layers=3, vocab=200, experts=3, dtype=torch.float32, seed=1)


# ---------------------------------------------------------------------------------------------------------
# streaming == in-memory, tensor by tensor


def _expected(method, b, xs, t_layer):
    """In-memory merges written from each method's definition (mergekit semantics), fp32."""
    d = [x - b for x in xs]
    if method == "task_arithmetic":
        return b + 0.8 * sum(0.5 * di for di in d)
    if method == "linear":
        return (b + sum(xs)) / (1 + len(xs))
    if method == "ties":
        return sign_consensus.ties(b, xs, 0.4, weights=[0.5 + t_layer] * len(xs), compat="mergekit")
    if method == "breadcrumbs":
        kept = [sign_consensus.breadcrumbs(di, 0.5, 0.1, per_row=False) for di in d]
        return b + sum(kept)
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "breadcrumbs"])
def test_streaming_equals_in_memory(fam, tmp_path, method):
    c = {
        "task_arithmetic": cfg("task_arithmetic", fam, {"weight": 0.5}, {"lambda": 0.8}),
        "linear": cfg("linear", fam, {"weight": 1.0}, base=False),
        "ties": cfg("ties", fam, {"weight": [0.5, 1.5], "density": 0.4}),
        "breadcrumbs": cfg("breadcrumbs", fam, {"weight": 1.0, "density": 0.5, "gamma": 0.1}),
    }[method]
    if method == "linear":
        c["models"].insert(0, {"model": fam[0], "parameters": {"weight": 1.0}})
    s = fastmerge.merge(c, str(tmp_path / "out"), quiet=True)
    got = load_dir(tmp_path / "out")
    sds = [load_dir(p) for p in fam]
    assert set(got) == set(sds[0]) and s.tensors == len(got)
    for name, b in sds[0].items():
        layer = fastmerge.config.layer_index(name)
        t = 0.0 if layer is None else layer / 2
        want = _expected(method, b, [sd[name] for sd in sds[1:]], t)
        torch.testing.assert_close(got[name], want.to(got[name].dtype), rtol=2e-6, atol=2e-7, msg=name)


def test_sharded_and_mixed_layouts_give_identical_output(tmp_path):
    plain = make_llama_family(str(tmp_path / "a"), hidden=64, layers=2, vocab=128, experts=2)
    mixed = make_llama_family(str(tmp_path / "b"), hidden=64, layers=2, vocab=128, experts=2,
                              shard_bytes=[40_000, None, 17_000])
    outs = []
    for i, f in enumerate((plain, mixed)):
        c = cfg("dare_ties", f, {"weight": 0.7, "density": 0.6})
        outs.append(tmp_path / f"o{i}")
        fastmerge.merge(c, str(outs[-1]), quiet=True, seed=3, out_shard_size=30_000 if i else "5B")
    assert os.path.exists(outs[1] / "model.safetensors.index.json")
    a, b = load_dir(outs[0]), load_dir(outs[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_cast_and_side_files(fam, tmp_path):
    c = cfg("task_arithmetic", fam, {"weight": 0.3}, dtype="bfloat16", out_dtype="float16")
    fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    got = load_dir(tmp_path / "o")
    assert all(v.dtype == torch.float16 for v in got.values())
    sds = [load_dir(p) for p in fam]
    name = "model.layers.1.mlp.up_proj.weight"
    # mergekit's arithmetic in `dtype`: every intermediate rounded to bf16, then cast to out_dtype
    b = sds[0][name].bfloat16()
    d = torch.stack([sd[name].bfloat16() - b for sd in sds[1:]]) * torch.tensor(0.3, dtype=torch.bfloat16)
    assert torch.equal(got[name], (b + d.sum(0)).half())
    files = set(os.listdir(tmp_path / "o"))
    assert {"config.json", "tokenizer_config.json", "generation_config.json", "fastmerge_config.yml"} <= files
    assert json.load(open(tmp_path / "o" / "config.json"))["torch_dtype"] == "float16"


# ---------------------------------------------------------------------------------------------------------
# randomness: DARE / DELLA


def test_dare_seeded_and_backend_independent(fam, tmp_path, monkeypatch):
    c = cfg("dare_linear", fam, {"weight": 1.0, "density": 0.3})
    runs = {}
    for tag, seed, backend in (("a", 5, "cpp"), ("b", 5, "reference"), ("c", 6, "cpp")):
        monkeypatch.setenv("FASTMERGE_BACKEND", backend)
        fastmerge.merge(c, str(tmp_path / tag), quiet=True, seed=seed)
        runs[tag] = load_dir(tmp_path / tag)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["lm_head.weight"], runs["c"]["lm_head.weight"])
    # one task: the kept fraction is the density, and the kept entries are rescaled to the task vector's L1 norm
    fastmerge.merge(cfg("dare_linear", fam, {"weight": 1.0, "density": 0.3}, n=1), str(tmp_path / "one"),
                    quiet=True, seed=5)
    one, b, x = load_dir(tmp_path / "one"), load_dir(fam[0]), load_dir(fam[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        d, kept = x[name] - b[name], one[name] - b[name]
        n = d.numel()
        frac = float((kept != 0).float().mean())
        assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5, (name, frac)
        torch.testing.assert_close(kept.abs().sum(dtype=torch.float64), d.abs().sum(dtype=torch.float64),
                                   rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------------------
# whole-model trimming and the multi-task store


def test_global_trim_equals_in_memory_ties_global(fam, tmp_path):
    c = cfg("ties", fam, {"density": 0.2}, {"lambda": 0.7}, {"trim": "global", "compat": "official"})
    s = fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    assert s.passes == 4  # magnitudes, refine (fp32), signs, merge
    got = load_dir(tmp_path / "o")
    sds = [load_dir(p) for p in fam]
    want = sign_consensus.ties_global(sds[0], sds[1:], 0.2, lam=0.7, compat="official")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_store_and_reconstruct(fam, tmp_path, method):
    c = cfg(method, fam, gp={"mtl": "ta"} if method == "tall" else None, extra={"tasks": ["x", "y", "z"]})
    s = fastmerge.merge(c, str(tmp_path / "store"), quiet=True)
    assert s.extra["tasks"] == ["x", "y", "z"]
    sds = [load_dir(p) for p in fam]
    b, xs = sds[0], sds[1:]
    names = [k for k in b if b[k].dtype.is_floating_point]
    if method == "emr":
        num = [sum((x[k] - b[k]).abs().mean().double() for k in names) for x in xs]
        parts = {k: ops.emr_elect(b[k], [x[k] for x in xs]) for k in names}
        den = [sum((parts[k][0] * parts[k][1][t]).abs().mean().double() for k in names) for t in range(3)]
        np.testing.assert_allclose(s.extra["scales"], [float(n / d) for n, d in zip(num, den, strict=True)],
                                   rtol=1e-6)
    for t, task in enumerate(["x", "y", "z"]):
        out = tmp_path / f"task-{task}"
        r = subprocess.run([sys.executable, "-m", "fastmerge", "reconstruct", str(tmp_path / "store"), task,
                            str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = load_dir(out)
        assert os.path.exists(out / "config.json")
        for k in names:
            if method == "tall":
                mtl = sum(x[k] - b[k] for x in xs)
                m = ops.tall_masks(b[k], [x[k] for x in xs], [0.4] * 3, mtl)[t]
                want = b[k] + m * mtl
            else:
                uni, masks, _ = parts[k]
                want = b[k] + s.extra["scales"][t] * masks[t] * uni
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match="not in the store"):
        fastmerge.reconstruct(str(tmp_path / "store"), "nope", str(tmp_path / "q"))


# ---------------------------------------------------------------------------------------------------------
# bounded memory


def test_peak_memory_bounded_by_budget(tmp_path):
    """A model family 10x larger than the budget: peak RSS grows by about the budget, not the model."""
    # 3 models x 24 tensors x 1 MiB (fp32 512x512) = 72 MiB of inputs; budget 6 MiB
    fam = []
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w{j}.weight": torch.randn(512, 512, generator=g) for i in range(8) for j in range(3)}
    fam.append(save_hf(str(tmp_path / "base"), base))
    for e in range(2):
        fam.append(save_hf(str(tmp_path / f"e{e}"), {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                    for k, v in base.items()}))
    total = sum(os.path.getsize(os.path.join(p, "model.safetensors")) for p in fam)
    budget = 6 << 20
    assert total >= 10 * budget
    cfg_path = tmp_path / "c.yml"
    cfg_path.write_text(json.dumps(cfg("ties", fam, {"weight": 0.5, "density": 0.3})))
    script = textwrap.dedent(f"""
        import json, resource, torch, fastmerge, fastmerge.engine, yaml, tqdm.auto  # imports are not merge memory
        x = torch.randn(512, 512); fastmerge.ops.ties_merge(x, [x, x]); fastmerge.magnitude_threshold(x, 5)  # warm up
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM, which ru_maxrss reads) to now
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = rss()
        s = fastmerge.merge({str(cfg_path)!r}, {str(tmp_path / "out")!r}, quiet=True, memory_budget={budget})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(dict(before=before, start=start, peak=peak, read=s.bytes_read)))
    """)
    (tmp_path / "probe.py").write_text(script)
    # Started from a small shell in the background: Linux carries a process's peak RSS across exec, so a child
    # exec'd straight from pytest would report pytest's own peak through getrusage.
    r = subprocess.run(["/bin/sh", "-c", f"'{sys.executable}' '{tmp_path / 'probe.py'}' & wait $!"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["read"] == sum(ti.nbytes for p in fam for ti in Checkpoint(p).tensors.values())
    assert m["before"] <= m["start"] + (4 << 20), m  # the reset worked: the baseline is the current RSS
    growth = m["peak"] - m["start"]
    # budget + fp32 temporaries of one tensor (delta buffer, threshold histogram, output) + allocator slack
    assert growth < budget + 12 * (1 << 20), m
    assert growth < total / 4, m


def test_malloc_policy_keeps_freed_memory_for_cpu_stack_methods_only(fam, tmp_path, monkeypatch):
    """Stack methods on the CPU keep freed blocks in glibc's heap for the merge (their temporaries would
    otherwise come back as fresh zeroed pages); streaming methods return them (bounded RSS, as above)."""
    from fastmerge import engine
    from fastmerge.execute import executor

    seen = []

    class Spy(executor.MallocPolicy):
        def __enter__(self):
            seen.append(self.keep)
            return super().__enter__()

    monkeypatch.setattr(engine, "MallocPolicy", Spy)
    fastmerge.merge(cfg("ties", fam, {"weight": 0.5, "density": 0.5}), str(tmp_path / "a"), quiet=True,
                    device="cpu")
    fastmerge.merge(cfg("tsv_m", fam), str(tmp_path / "b"), quiet=True, device="cpu")
    glibc = executor._glibc() is not None
    assert seen == [False, glibc]
    with executor.MallocPolicy(keep_freed=True) as p:  # and back: usable again after a merge
        assert p.keep == glibc
        x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        del x


# ---------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written


def _fails(tmp_path, c, exc, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        fastmerge.merge(c, str(out), quiet=True, **kw)
    assert not out.exists() and not leftovers(tmp_path)


def test_config_errors(fam, tmp_path):
    _fails(tmp_path, cfg("tie", fam), ConfigError, "unknown merge_method 'tie'; expected one of .*ties")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1, "densty": 0.5}), ConfigError,
           r"parameters.densty: not a parameter of ties; expected one of .*density")
    _fails(tmp_path, cfg("ties", fam, {"density": 0.5}), ConfigError, "missing required parameter 'weight'")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1}, {"weight": 2}, foo=1), ConfigError, "unknown config key 'foo'")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1, "lambda": 2}), ConfigError, "lambda is a global parameter")
    _fails(tmp_path, cfg("ties", fam, {"weight": "x"}), ConfigError, "expected a number, got 'x'")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1}, base=False), ConfigError, "needs 'base_model'")
    _fails(tmp_path, cfg("slerp", fam, gp={"t": 0.5}), ConfigError, "takes 2 models")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1}, extra={"trim": "everything"}), ConfigError,
           "fastmerge.trim: expected one of tensor, global")
    _fails(tmp_path, cfg("ties", fam, {"weight": 1}, dtype="float8"), ConfigError, "unknown dtype 'float8'")
    _fails(tmp_path, {**cfg("ties", fam, {"weight": 1}), "slices": []}, ConfigError,
           "exactly one of 'models:' .* and 'slices:'")
    _fails(tmp_path, cfg("dare_ties", fam, {"weight": 1}, extra={"trim": "global"}), ConfigError,
           "trim: global applies to")
    for missing in ("nope.yml", str(tmp_path / "no_such_config")):
        with pytest.raises(ConfigError, match=f"config file .*{os.path.basename(missing)} not found"):
            fastmerge.merge(missing, str(tmp_path / "o"))


def _slice_cfg(method, *slices, **top):
    return {"merge_method": method, **top,
            "slices": [{"sources": [{"model": m, "layer_range": list(r)} for m, r in sl]} for sl in slices]}


def test_slices_errors(tmp_path):
    """Every bad ``slices:`` config fails before anything is written, naming the slice and source."""
    f = make_llama_family(str(tmp_path / "f"), layers=3, experts=2)
    _fails(tmp_path, _slice_cfg("passthrough", [(f[1], (0, 4))]), ConfigError,
           r"slices\[0\].sources\[0\]: layer_range \[0, 4\] runs past .*ft0's 3 layers")
    _fails(tmp_path, _slice_cfg("passthrough", [(f[1], (2, 1))]), ConfigError,
           r"slices\[0\].sources\[0\].layer_range: expected \[start, stop\]")
    _fails(tmp_path, _slice_cfg("linear", [(f[1], (0, 2)), (f[2], (0, 3))]), ConfigError,
           r"slices\[0\]: every source must span the same number of layers")
    _fails(tmp_path, _slice_cfg("passthrough", [(f[1], (0, 1)), (f[2], (0, 1))]), ConfigError,
           r"passthrough takes 1 models \(base included\), got 2 in slices\[0\]")
    _fails(tmp_path, _slice_cfg("ties", [(f[1], (0, 3)), (f[2], (0, 3))], base_model=f[0]), ConfigError,
           r"slices\[0\]: base_model .*base is not among its sources")
    _fails(tmp_path, _slice_cfg("ties", [(f[0], (0, 3)), (f[1], (0, 3))], [(f[2], (0, 1))], base_model=f[0]),
           ConfigError, r"slices\[1\]: base_model .*base is not among its sources")
    _fails(tmp_path, _slice_cfg("tsv_m", [(f[0], (0, 3)), (f[1], (0, 3)), (f[2], (0, 3))], base_model=f[0]),
           ConfigError, "slices: merge_method tsv_m works on same-shape stacks of whole models")
    _fails(tmp_path, {**_slice_cfg("passthrough", [(f[1], (0, 3))]), "models": [{"model": f[1]}]}, ConfigError,
           "exactly one of 'models:'")
    bad = _slice_cfg("passthrough", [(f[1], (0, 3))])
    bad["slices"][0]["sources"][0]["layers"] = [0, 3]
    _fails(tmp_path, bad, ConfigError, r"slices\[0\].sources\[0\]: unknown key\(s\) \['layers'\]")


def test_slices_config_json_and_models_form(tmp_path):
    """A frankenmerge's config.json gets its layer count and its per-layer lists rebuilt; one slice of every
    model's layers is the ``models:`` form, byte for byte; residual_weight is ignored with a warning."""
    f = make_llama_family(str(tmp_path / "f"), layers=3, experts=2)
    c = json.load(open(os.path.join(f[1], "config.json")))
    c["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    json.dump(c, open(os.path.join(f[1], "config.json"), "w"))
    out = str(tmp_path / "frank")
    fastmerge.merge(_slice_cfg("passthrough", [(f[1], (0, 2))], [(f[2], (1, 3))], [(f[1], (1, 2))]), out,
                    quiet=True)
    oc = json.load(open(os.path.join(out, "config.json")))
    assert oc["num_hidden_layers"] == 5
    assert oc["layer_types"] == ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
                                 "full_attention"]
    o, a, b = load_dir(out), load_dir(f[1]), load_dir(f[2])
    assert len(o) == 3 + 5 * 9  # embed, norm, head and 9 tensors per layer
    assert torch.equal(o["model.layers.4.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(o["model.layers.2.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(o["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(o["lm_head.weight"], a["lm_head.weight"])  # the last slice's source
    models = cfg("ties", f, {"weight": [0.3, 1.0], "density": 0.5}, {"lambda": 0.9})
    sl = {"merge_method": "ties", "base_model": f[0], "parameters": {"lambda": 0.9}, "slices": [{
        "sources": [{"model": f[0], "layer_range": [0, 3]}] + [
            {"model": p, "layer_range": [0, 3], "parameters": {"weight": [0.3, 1.0], "density": 0.5}} for p in f[1:]],
        "residual_weight": 0.5}]}
    fastmerge.merge(models, str(tmp_path / "m"), quiet=True)
    with pytest.warns(UserWarning, match=r"slices\[0\].residual_weight: ignored"):
        fastmerge.merge(sl, str(tmp_path / "s"), quiet=True)
    x, y = load_dir(str(tmp_path / "m")), load_dir(str(tmp_path / "s"))
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_one_module_modules_form(tmp_path):
    """mergekit's modules: form with one module is its models: / slices: form, its parameters between the
    inputs' and the global ones; several modules are an error naming the key."""
    f = make_llama_family(str(tmp_path / "f"), layers=2, experts=2)
    models = [{"model": p, "parameters": {"weight": 0.5}} for p in f[1:]]
    flat = {"merge_method": "ties", "base_model": f[0], "models": models, "parameters": {"density": 0.4}}
    mod = {"merge_method": "ties", "base_model": f[0], "parameters": {"density": 0.9},
           "modules": {"default": {"models": models, "parameters": {"density": 0.4}}}}
    fastmerge.merge(flat, str(tmp_path / "a"), quiet=True)
    fastmerge.merge(mod, str(tmp_path / "b"), quiet=True)
    x, y = load_dir(str(tmp_path / "a")), load_dir(str(tmp_path / "b"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    _fails(tmp_path, {**mod, "modules": {"a": {"models": models}, "b": {"models": models}}}, ConfigError,
           "config key 'modules': only one module is supported")
    _fails(tmp_path, {**mod, "models": models}, ConfigError, "exactly one of 'models:', 'slices:' and 'modules:'")


def _copy_family(fam, dst):
    import shutil

    out = []
    for p in fam:
        q = os.path.join(dst, os.path.basename(p))
        shutil.copytree(p, q)
        out.append(q)
    return out


def test_checkpoint_errors_name_model_file_tensor(fam, tmp_path):
    f = _copy_family(fam, tmp_path / "m")
    c = cfg("task_arithmetic", f, {"weight": 1})
    # missing model
    _fails(tmp_path, {**c, "models": c["models"] + [{"model": str(tmp_path / "ghost"), "parameters": {"weight": 1}}]},
           CheckpointError, "ghost does not exist")
    # corrupt header
    p = os.path.join(f[2], "model.safetensors")
    good = open(p, "rb").read()
    open(p, "wb").write(b"\xff" * 8 + good[8:])
    _fails(tmp_path, c, CheckpointError, r"ft1.*model.safetensors: corrupt safetensors header")
    # truncated data
    open(p, "wb").write(good[:-100])
    _fails(tmp_path, c, CheckpointError, r"ft1.*tensor '[a-z.]+' .*truncated or corrupt")
    # shape mismatch
    sd = load_file(os.path.join(fam[2], "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(65)
    os.remove(p)
    save_hf(f[2], sd)
    _fails(tmp_path, c, CheckpointError, r"ft1.*tensor 'model.norm.weight' has shape \[65\], .*base has \[64\]")
    # missing tensor
    del sd["model.norm.weight"]
    os.remove(p)
    save_hf(f[2], sd)
    _fails(tmp_path, c, CheckpointError, r"model .*ft1 lacks tensor 'model.norm.weight'")
    # integer where the base is floating
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    os.remove(p)
    save_hf(f[2], sd)
    _fails(tmp_path, c, CheckpointError, "'model.norm.weight' is torch.int32")
    # pickles are refused
    os.remove(p)
    open(os.path.join(f[2], "pytorch_model.bin"), "wb").write(b"x")
    _fails(tmp_path, c, CheckpointError, "found pickle files .*never unpickles")


def test_nan_input_named(fam, tmp_path):
    f = _copy_family(fam, tmp_path / "m")
    sd = load_file(os.path.join(f[1], "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    os.remove(os.path.join(f[1], "model.safetensors"))
    save_hf(f[1], sd)
    _fails(tmp_path, cfg("task_arithmetic", f, {"weight": 1}), ValueError,
           r"'model.layers.1.mlp.up_proj.weight' with task_arithmetic produced NaN/inf \(input\(s\) .*ft0 hold NaN")
    _fails(tmp_path, cfg("ties", f, {"weight": 1, "density": 0.5}), ValueError,
           r"'model.layers.1.mlp.up_proj.weight' with ties produced NaN/inf \(input\(s\) .*ft0 hold NaN")


def test_existing_output_and_interrupt_leave_nothing(fam, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        fastmerge.merge(cfg("task_arithmetic", fam, {"weight": 1}), str(tmp_path / "out"), quiet=True)
    os.rmdir(tmp_path / "out")
    calls = []

    def boom(c):
        calls.append(c.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return ops.ties_merge(c.base, c.experts, None, elect="none", merge="sum")[0]

    from fastmerge import methods

    m = methods.METHODS["task_arithmetic"]
    monkeypatch.setitem(methods.METHODS, "task_arithmetic", methods.Method(m.name, m.params, boom))
    _fails(tmp_path, cfg("task_arithmetic", fam, {"weight": 1}), KeyboardInterrupt, None)


def test_cli_merge_summary_and_quiet(fam, tmp_path):
    import yaml

    cp = tmp_path / "c.yml"
    cp.write_text(yaml.safe_dump(cfg("ties", fam, {"weight": 1.0, "density": 0.5})))
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cp), str(tmp_path / "o"), "--quiet",
                        "--summary-json", str(tmp_path / "s.json"), "--out-shard-size", "20K"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    s = json.load(open(tmp_path / "s.json"))
    assert s["tensors"] == len(Checkpoint(str(tmp_path / "o")).tensors) and s["bytes_read"] > 0
    assert set(s["stages"]) >= {"plan", "read", "merge", "write"}
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cp), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(cp), str(tmp_path / "p")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "merged" in r.stdout and "tensors" in r.stderr  # summary line; tqdm bar


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_cuda_merge_equals_cpu(fam, tmp_path, method):
    c = cfg(method, fam, {"weight": 0.6, "density": 0.4})
    outs = {}
    for dev in ("cpu", "cuda"):
        s = fastmerge.merge(c, str(tmp_path / dev), quiet=True, seed=2, device=dev, memory_budget="1M")
        outs[dev] = load_dir(tmp_path / dev)
        if dev == "cuda":
            assert s.peak_gpu_bytes > 0
    for k, v in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_bf16_cut_matches_bf16_rounding():
    from fastmerge.methods.task_arithmetic import _bf16_cut

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=g) * 2.0 ** torch.randint(-20, 5, (200_000,), generator=g)).float()
    x = torch.cat([x, x.bfloat16().float(), (x.bfloat16().float() + x) / 2])  # exact bf16 values and midpoints
    xb = x.bfloat16().float()
    for v in xb[torch.randint(0, x.numel(), (300,), generator=g)].tolist() + [0.0, float("inf")]:
        torch.testing.assert_close(xb >= v, x >= _bf16_cut(v), msg=str(v))


def test_pool_reuses_buffers_and_bounds_idle_bytes():
    from fastmerge.execute.executor import _Pool

    pool = _Pool(cap=3 << 20, pin=False)
    a = pool.tensor((256, 1024), torch.float32)            # 1 MiB, lent
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.tensor((512, 512), torch.float32)             # same byte size: the same buffer comes back
    assert b.data_ptr() == ptr and pool.idle_bytes == 0
    c = pool.tensor((1 << 20,), torch.bfloat16)            # 2 MiB, fresh
    pool.release(b)
    pool.release(c)
    assert pool.lent_bytes == 0 and pool.idle_bytes == 3 << 20
    d = pool.tensor((3 << 20,), torch.uint8)               # lent 3 MiB: both idle buffers go (oldest first)
    assert pool.idle_bytes == 0 and pool.lent_bytes == 3 << 20
    pool.release(d)
    pool.release(d)                                       # a second release, or a foreign tensor: no-op
    pool.release(torch.empty(1 << 20))
    assert pool.idle_bytes == 3 << 20 and pool.lent_bytes == 0
    small = pool.tensor((10,), torch.float32)              # small tensors are not pooled
    pool.release(small)
    assert pool.idle_bytes == 3 << 20
