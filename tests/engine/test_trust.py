"""Hostile and broken inputs, and signals: every one gives a one-line fastmerge error naming the file, tensor or
config key before anything is written, and nothing is left behind (issue: "no silently wrong merge, no
traceback, nothing left behind")."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
import yaml
from _models import cfg, leftovers, make_llama_family, save_hf
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge import io
from fastmerge.config import ConfigError
from fastmerge.config import load as load_config
from fastmerge.io import Checkpoint, CheckpointError, read_header


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return make_llama_family(str(root), hidden=32, layers=2, vocab=64, experts=2, dtype=torch.float32, seed=3)


def fails(tmp_path, c, exc, match, out="out"):
    o = tmp_path / out
    with pytest.raises(exc, match=match):
        fastmerge.merge(c, str(o), quiet=True)
    assert not os.path.lexists(o) and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# safetensors headers and indexes


def raw_file(path, header: dict | bytes, data: bytes) -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(("header", "data", "match"), [
    ({"a": entry(), "b": entry(offsets=(4, 12))}, 12, r"'b' .*overlaps 'a'"),
    ({"a": entry(), "b": entry(offsets=(12, 20))}, 20, r"'b' .*leaves a gap of 4 bytes after 'a'"),
    ({"a": entry()}, 12, "4 bytes after the last tensor"),
    ({"a": entry(offsets=(4, 12))}, 12, r"'a' .*gap of 4 bytes after the header"),
    ({"a": entry(shape=(2.0,))}, 8, r"'a' has a malformed shape \[2.0\]"),
    ({"a": entry(shape=("2",))}, 8, r"'a' has a malformed shape \['2'\]"),
    ({"a": entry(shape=(True, 2))}, 8, "malformed shape"),
    ({"a": entry(shape=(-2,))}, 8, "malformed shape"),
    ({"a": entry(offsets=(0.0, 8.0))}, 8, r"'a' has malformed data_offsets \[0.0, 8.0\]"),
    ({"a": entry(offsets=("0", "8"))}, 8, "malformed data_offsets"),
    ({"a": entry(offsets=(8, 0))}, 8, "malformed data_offsets"),
    ({"a": entry(offsets=(0, 8, 9))}, 8, "malformed data_offsets"),
    ({"a": entry(dtype="F8_E9M9")}, 8, "unsupported dtype 'F8_E9M9'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "needs exactly dtype, shape and data_offsets"),
    ({"a": [1, 2]}, 8, "needs exactly"),
    ({"__metadata__": {"x": 1}, "a": entry()}, 8, "__metadata__ must map strings to strings"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}', 8, "malformed data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], '
     b'"data_offsets": [0, 8]}}', 8, "key 'a' appears twice"),
    (b"[" * 200_000 + b"]" * 200_000, 0, "not a JSON object"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 0, "nested too deeply|corrupt safetensors header"),
    (b"[1, 2]", 0, "not a JSON object"),
    (b"\xff\xfe", 0, "corrupt safetensors header"),
], ids=lambda v: None)
def test_header_rules(tmp_path, header, data, match):
    p = raw_file(tmp_path / "m.safetensors", header, bytes(data))
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(p, "expert")
    assert str(e.value).startswith(f"expert: {p}") and "\n" not in str(e.value)


def test_valid_header_with_zero_size_tensors_and_padding(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "e": entry(shape=(0, 3), offsets=(0, 0)), "a": entry(),
              "z": entry(shape=(0,), offsets=(8, 8))}
    text = json.dumps(header).encode() + b"    "
    p = raw_file(tmp_path / "m.safetensors", text, struct.pack("<2f", 1.5, -2.0))
    ck = Checkpoint(p)
    assert ck.read("a").tolist() == [1.5, -2.0] and ck.read("e").shape == (0, 3)


def _index(d, weight_map):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, io.INDEX), "w") as f:
        f.write(weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map}))
    return str(d)


@pytest.mark.parametrize(("weight_map", "match"), [
    ({"a": "../other/model.safetensors"}, r"weight_map\['a'\] = '../other/model.safetensors' points outside"),
    ({"a": "/etc/model.safetensors"}, "points outside the model's directory"),
    ({"a": "sub/../../x.safetensors"}, "points outside"),
    ({"a": 3}, r"weight_map\['a'\] must be a shard file name, got 3"),
    ({"a": None}, "must be a shard file name"),
    ([["a", "m.safetensors"]], "needs a non-empty 'weight_map' object"),
    ({}, "non-empty 'weight_map'"),
    ('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    ('{"weight_map": {"a": "x", "a": "y"}}', "key 'a' appears twice"),
    ("{bad json", "corrupt safetensors index"),
], ids=lambda v: None)
def test_index_rules(tmp_path, weight_map, match):
    raw_file(tmp_path / "other.safetensors", {"a": entry()}, bytes(8))
    d = _index(tmp_path / "model", weight_map)
    with pytest.raises(CheckpointError, match=match) as e:
        Checkpoint(d, name="expert")
    assert str(e.value).startswith("expert: ") and "\n" not in str(e.value)


def test_index_shard_in_a_subfolder_is_fine(tmp_path):
    os.makedirs(tmp_path / "model" / "sub")
    raw_file(tmp_path / "model" / "sub" / "m.safetensors", {"a": entry()}, bytes(8))
    ck = Checkpoint(_index(tmp_path / "model", {"a": "sub/m.safetensors"}))
    assert ck.read("a").tolist() == [0.0, 0.0]


def test_many_entry_header_is_linear_and_compact(tmp_path):
    """A header of 200 000 entries: parsed in one pass, with Python's allocations during the read within a
    few times the header's own size (it was 15x and quadratic-looking in time on 1.5 M entries)."""
    n = 200_000
    header = {f"layers.{i}.w": entry(shape=(1,), offsets=(4 * i, 4 * i + 4)) for i in range(n)}
    p = raw_file(tmp_path / "big.safetensors", header, bytes(4 * n))
    size = os.path.getsize(p) - 4 * n
    tracemalloc.start()
    try:
        out = read_header(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == n and out[f"layers.{n - 1}.w"].start == 8 + size - 8 + 4 * (n - 1)
    assert peak < 6 * size, (peak, size)


# ---------------------------------------------------------------------------------------------------------
# config values


@pytest.mark.parametrize(("method", "params", "match"), [
    ("ties", {"density": 1.5}, r"models\[0\] .*parameters.density: 1.5 is outside \[0.0, 1.0\]"),
    ("ties", {"density": -0.1}, r"density: -0.1 is outside"),
    ("dare_ties", {"density": 2}, "density: 2 is outside"),
    ("dare_linear", {"density": [0.5, 1.2]}, "density: 1.2 is outside"),
    ("della", {"density": 1.5}, "density: 1.5 is outside"),
    ("breadcrumbs", {"density": -1}, "density: -1 is outside"),
    ("magnitude_prune", {"density": 3}, "density: 3 is outside"),
    ("breadcrumbs", {"density": 0.5, "gamma": 1.5}, "gamma: 1.5 is outside"),
    ("della", {"density": 0.5, "epsilon": -0.1}, "epsilon: -0.1 is outside"),
    ("della", {"density": 0.3, "epsilon": 0.4}, r"della needs density ± epsilon inside \(0, 1\); tensor"),
    ("ties", {"weight": 1e39}, r"weight: 1e\+39 is not a finite float32 number"),
    ("ties", {"weight": float("inf")}, "weight: inf is not a finite float32 number"),
    ("ties", {"weight": [{"filter": "mlp", "value": 1e40}, {"value": 1}]}, "weight: 1e\\+40 is not a finite"),
], ids=lambda v: None)
def test_parameter_ranges(fam, tmp_path, method, params, match):
    mp = {"weight": 1.0, **params}
    fails(tmp_path, cfg(method, fam, mp), ConfigError, match)


def test_global_parameter_ranges(fam, tmp_path):
    fails(tmp_path, cfg("ties", fam, {"weight": 1}, {"lambda": -1e39}), ConfigError, "parameters.lambda: -1e\\+39")
    fails(tmp_path, cfg("slerp", fam[:2], gp={"t": 1.2}), ConfigError, r"parameters.t: 1.2 is outside \[0.0, 1.0\]")
    fails(tmp_path, cfg("consensus_ta", fam, gp={"k": 1.5}), ConfigError, "parameters.k: expected an integer")
    fails(tmp_path, cfg("iso_cts", fam, gp={"common_fraction": 0}), ConfigError, r"outside \(0.0, 1.0\]")


def test_only_the_base_is_an_error(fam, tmp_path):
    c = {"merge_method": "ties", "base_model": fam[0], "models": [{"model": fam[0]}], "parameters": {"weight": 1}}
    fails(tmp_path, c, ConfigError, "merge_method ties needs at least one model besides the base")


def test_backend_typo_is_a_config_error(fam):
    with pytest.raises(ConfigError, match="fastmerge.backend: expected one of auto, reference, cpp"):
        load_config(cfg("ties", fam, {"weight": 1}, extra={"backend": "bogus"}))


def test_int8_mask_is_a_warning_naming_the_key(fam):
    """mergekit's int8_mask only changes how mergekit stores its masks: accepted, with a warning that says so."""
    from fastmerge import methods

    c = load_config(cfg("ties", fam, {"weight": 1, "density": 0.5}, gp={"int8_mask": True}))
    with pytest.warns(UserWarning, match="parameters.int8_mask: ignored"):
        methods.validate(c)


@pytest.mark.parametrize(("text", "match"), [
    ("a: &a [" + ",".join(["x"] * 20) + "]\n" + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 20) + "]\n"
                                                       for p, c in zip("abcdefg", "bcdefgh", strict=True))
     + "merge_method: ties\nname: *h\n", "expands to more than 100000 values"),
    ("merge_method: ties\nname: " + "[" * 100 + "]" * 100 + "\n", "nests deeper than 64 levels"),
    ("merge_method: ties\nname: 3\n", "name: expected a string"),
    ("merge_method: ties\nname: '" + "x" * (2 << 20) + "'\n", "larger than 1 MiB"),
], ids=["alias-bomb", "deep", "name", "huge"])
def test_config_loader_bounds(text, match):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        load_config(text)
    assert time.perf_counter() - t0 < 5


def test_extra_tensors_are_an_error_unless_asked(fam, tmp_path):
    d = tmp_path / "extra"
    sd = load_file(os.path.join(fam[1], "model.safetensors"))
    sd["extra.bias"] = torch.ones(3)
    save_hf(str(d), sd)
    c = cfg("task_arithmetic", [fam[0], str(d), fam[2]], {"weight": 1})
    fails(tmp_path, c, CheckpointError, r"has 1 tensor\(s\) that .*base lacks, e.g. 'extra.bias'.*extra_tensors: "
                                        "ignore")
    with pytest.warns(UserWarning, match="not merged"):
        s = fastmerge.merge({**c, "fastmerge": {"extra_tensors": "ignore"}}, str(tmp_path / "o"), quiet=True)
    assert "extra.bias" not in Checkpoint(s.out_dir).tensors


def test_mixed_dtypes_named_at_plan_time(fam, tmp_path):
    d = tmp_path / "half"
    sd = {k: v.half() for k, v in load_file(os.path.join(fam[2], "model.safetensors")).items()}
    save_hf(str(d), sd)
    c = cfg("ties", [fam[0], fam[1], str(d)], {"weight": 1, "density": 0.5})
    fails(tmp_path, c, CheckpointError, r"half: .* is float16, .*base has float32; set `dtype:`")
    s = fastmerge.merge({**c, "dtype": "float32"}, str(tmp_path / "o"), quiet=True)
    assert s.tensors > 0


def test_corrupt_side_file_fails_at_plan_time(fam, tmp_path):
    import shutil

    b = tmp_path / "base"
    shutil.copytree(fam[0], b)
    (b / "config.json").write_text("{not json")
    c = cfg("task_arithmetic", [str(b), *fam[1:]], {"weight": 1})
    fails(tmp_path, c, CheckpointError, r"base.*config.json is not valid JSON")
    (b / "config.json").write_text("[1]")
    fails(tmp_path, c, CheckpointError, "config.json must hold a JSON object")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastmerge", *args], capture_output=True, text=True, **kw)


def test_cli_errors_are_one_line(fam, tmp_path):
    cp = tmp_path / "c.yml"
    cp.write_text(yaml.safe_dump(cfg("ties", fam, {"weight": 1, "density": 0.5})))
    if not torch.cuda.is_available():
        r = cli("merge", str(cp), str(tmp_path / "o"), "--device", "cuda")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no CUDA device" in r.stderr, r.stderr
    cp.write_text(yaml.safe_dump(cfg("ties", fam, {"weight": 1, "density": 7})))
    r = cli("merge", str(cp), str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "density: 7 is outside" in r.stderr, r.stderr
    assert not leftovers(tmp_path) and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# the output directory


def test_output_honours_umask_and_refuses_a_dangling_symlink(fam, tmp_path):
    c = cfg("task_arithmetic", fam, {"weight": 1})
    old = os.umask(0o027)
    try:
        s = fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    finally:
        os.umask(old)
    assert os.stat(s.out_dir).st_mode & 0o777 == 0o750
    assert not os.path.exists(os.path.join(s.out_dir, io.OWNER))
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    t0 = time.perf_counter()
    with pytest.raises(FileExistsError, match="dangling symlink"):
        fastmerge.merge(c, str(tmp_path / "link"), quiet=True)
    assert time.perf_counter() - t0 < 5 and os.path.islink(tmp_path / "link")


def test_failed_run_removes_the_parents_it_created(fam, tmp_path, monkeypatch):
    from fastmerge.execute import sinks

    out = tmp_path / "a" / "b" / "out"
    monkeypatch.setattr(sinks, "copy_side_files", lambda run, d, **kw: 1 / 0)  # fails after the merge
    with pytest.raises(ZeroDivisionError):
        fastmerge.merge(cfg("task_arithmetic", fam, {"weight": 1}), str(out), quiet=True)
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()
    with pytest.raises(ZeroDivisionError):
        fastmerge.merge(cfg("task_arithmetic", fam, {"weight": 1}), str(out), quiet=True)
    assert (tmp_path / "a").exists() and not (tmp_path / "a" / "b").exists()  # only what it created


def _stale_tmp(parent, out, owner):
    d = parent / f".{out}.tmp-stale"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    if owner is not None:
        (d / io.OWNER).write_text(json.dumps(owner))
    return d


def test_stale_temp_dirs(fam, tmp_path):
    c = cfg("task_arithmetic", fam, {"weight": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = _stale_tmp(tmp_path, "o", {"pid": dead.pid, "start": "1", "host": io._host(), "out": "x"})
    with pytest.warns(UserWarning, match=r"removed .*\.o\.tmp-stale, left by a fastmerge run \(pid \d+\) that was"):
        fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    assert not d.exists()
    d = _stale_tmp(tmp_path, "p", None)
    with pytest.warns(UserWarning, match=r"earlier run that was killed; remove it with: rm -rf .*\.p\.tmp-stale"):
        fastmerge.merge(c, str(tmp_path / "p"), quiet=True)
    assert d.exists()
    live = {"pid": os.getpid(), "start": io._start_time(os.getpid()), "host": io._host(), "out": "x"}
    _stale_tmp(tmp_path, "q", live)
    with pytest.raises(FileExistsError, match=rf"another fastmerge run \(pid {os.getpid()}\) is writing"):
        fastmerge.merge(c, str(tmp_path / "q"), quiet=True)


# ---------------------------------------------------------------------------------------------------------
# signals


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A merge that takes a few seconds (TSV-M, exact SVDs): long enough to be signalled mid-way."""
    root = tmp_path_factory.mktemp("slow")
    fam = make_llama_family(str(root), hidden=256, layers=6, vocab=512, experts=2, dtype=torch.float32, seed=4)
    cp = root / "c.yml"
    cp.write_text(yaml.safe_dump(cfg("tsv_m", fam, extra={"svd": "exact"})))
    return str(cp)


def _start(config, out):
    return subprocess.Popen([sys.executable, "-m", "fastmerge", "merge", config, str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_tmp(parent, proc, name="out"):
    t0 = time.time()
    while time.time() - t0 < 60 and proc.poll() is None:
        tmps = [p for p in os.listdir(parent) if p.startswith(f".{name}.tmp-")]
        if tmps and any(f.endswith(".safetensors") for f in os.listdir(parent / tmps[0])):
            return tmps[0]
        time.sleep(0.02)
    pytest.fail("the merge never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_merge_leaves_nothing(slow, tmp_path, sig):
    p = _start(slow, tmp_path / "out")
    _wait_for_tmp(tmp_path, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert f"interrupted ({sig.name}); nothing was written" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_kill_9_then_rerun_cleans_up(slow, tmp_path):
    p = _start(slow, tmp_path / "out")
    tmp = _wait_for_tmp(tmp_path, p)
    p.kill()
    p.wait()
    assert (tmp_path / tmp).exists()
    r = subprocess.run([sys.executable, "-m", "fastmerge", "merge", slow, str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"removed {tmp_path / tmp}" in r.stderr, r.stderr
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.25, 0.35, 0.5])
def test_early_ctrl_c_is_never_swallowed(fam, tmp_path, delay):
    cp = tmp_path / "c.yml"
    cp.write_text(yaml.safe_dump(cfg("task_arithmetic", fam, {"weight": 1})))
    p = _start(str(cp), tmp_path / "out")
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    if p.returncode == 0:  # finished before the signal: only acceptable when the merge really was done
        assert (tmp_path / "out").exists()
        return
    assert p.returncode in (130, -signal.SIGINT, 1), p.returncode
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# an input that shrinks while it is mapped


def test_sigbus_on_a_shrunk_mapping_is_a_named_error(tmp_path):
    """Touching a mapped page past the end of a file that shrank raises SIGBUS; the guard turns it into zeros
    and a named error (in a child process, so a failure of the guard cannot take the test run down)."""
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(1 << 20, dtype=torch.float32)}, str(p))
    code = f"""
import os, torch
from fastmerge.io import Checkpoint, CheckpointError, check_mapped, _guard
if _guard() is None:
    print("no guard"); raise SystemExit(0)
ck = Checkpoint({str(p)!r}, name="expert")
t = ck.map("a")
os.truncate({str(p)!r}, 4096)
ck.unmap("a")
s = float(t.sum())
try:
    check_mapped()
except CheckpointError as e:
    print("ERROR", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr)
    if "no guard" not in r.stdout:
        assert f"ERROR expert: {p}: the file shrank while it was being read" in r.stdout, r.stdout


def test_input_truncated_during_a_merge(fam, tmp_path, monkeypatch):
    import shutil

    from fastmerge import methods

    f = [str(tmp_path / f"m{i}") for i in range(3)]
    for a, b in zip(fam, f, strict=True):
        shutil.copytree(a, b)
    shard = os.path.join(f[2], "model.safetensors")
    m = methods.METHODS["task_arithmetic"]
    calls = []

    def shrink(c):
        calls.append(c.name)
        if len(calls) == 3:
            os.truncate(shard, 1024)
        return m.fn(c)

    monkeypatch.setitem(methods.METHODS, "task_arithmetic", methods.Method(m.name, m.params, shrink))
    fails(tmp_path, cfg("task_arithmetic", f, {"weight": 1}), CheckpointError, r"m2.*model.safetensors.*(shrank)")
