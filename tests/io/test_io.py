"""Checkpoints on disk: header validation with named errors, shard reading, atomic sharded writing."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.io import Checkpoint, CheckpointError, OutputDir, ShardedWriter, parse_size, read_header


def _tensors():
    return {
        "a.weight": torch.randn(7, 5).bfloat16(),
        "b.bias": torch.randn(11),
        "c.weight": torch.randn(3, 4, 5).half(),
        "d.scalar": torch.tensor(2.5),
    }


def _write(out, ts, shard_bytes, order=None):
    with OutputDir(str(out)) as od:
        w = ShardedWriter(od.tmp, [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], shard_bytes)
        for k in order or ts:  # any order: every tensor has its place from the start
            w.write(k, ts[k])
        w.finish()
        with open(os.path.join(od.tmp, "config.json"), "w") as f:
            f.write("{}")
        od.commit()


@pytest.mark.parametrize("shard_bytes", [1 << 30, 100])
def test_writer_then_checkpoint_roundtrip(tmp_path, shard_bytes):
    ts = _tensors()
    out = tmp_path / "model"
    _write(out, ts, shard_bytes, order=list(reversed(ts)))
    files = sorted(os.listdir(out))
    if shard_bytes == 100:
        assert "model.safetensors.index.json" in files and any(f.startswith("model-00001-of-") for f in files)
    else:
        assert files == ["config.json", "model.safetensors"]
    ck = Checkpoint(str(out))
    assert set(ck.tensors) == set(ts)
    for k, v in ts.items():
        got = ck.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
        assert torch.equal(load_file(ck.tensors[k].file)[k], v)  # the safetensors library reads it too
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


@pytest.mark.parametrize("direct", ["1", "0"])
def test_writer_direct_io_large_tensors(tmp_path, monkeypatch, direct):
    """Large tensors at unaligned offsets: page interiors go O_DIRECT (where the filesystem has it), the
    straddling pages and the header buffered; the bytes read back are the same either way."""
    monkeypatch.setenv("FASTMERGE_DIRECT_IO", direct)
    g = torch.Generator().manual_seed(3)
    ts = {"n0": torch.randn(3, generator=g),                      # shifts everything after it off alignment
          "big": torch.randn(1031, 1029, generator=g),            # ~4.2 MB: several bounce-buffer rounds
          "n1": torch.randn(5, generator=g).bfloat16(),
          "big2": torch.randn(2049, 1027, generator=g).bfloat16(),
          "tail": torch.randn(7, generator=g)}
    out = tmp_path / "model"
    _write(out, ts, 1 << 30, order=["big2", "tail", "big", "n0", "n1"])
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(ts) and all(torch.equal(got[k], v) for k, v in ts.items())


def test_raw_file_and_preallocated_buffer(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(p))
    ck = Checkpoint(str(p))
    buf = torch.empty(1024, dtype=torch.uint8)
    got = ck.read("w", out=buf)
    assert torch.equal(got, torch.arange(12.0).reshape(3, 4)) and got.data_ptr() == buf.data_ptr()


def test_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"), OutputDir(str(out)) as od:
        w = ShardedWriter(od.tmp, [("a", torch.float32, (100,)), ("b", torch.float32, (100,))], 10)
        w.write("a", torch.ones(100))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        OutputDir(str(tmp_path / "exists"))


def test_writer_checks_declarations(tmp_path):
    w = ShardedWriter(str(tmp_path), [("a", torch.float32, (4,)), ("b", torch.bfloat16, (2, 2))])
    with pytest.raises(KeyError, match="'c' was not declared"):
        w.write("c", torch.ones(4))
    with pytest.raises(ValueError, match="'b': got torch.float32"):
        w.write("b", torch.ones(2, 2))
    w.write("a", torch.ones(4))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.ones(4))
    with pytest.raises(RuntimeError, match="never written.*'b'"):
        w.finish()
    w.close()


def test_writer_disk_full_names_the_file(tmp_path, monkeypatch):
    import errno

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"cannot reserve \d+ bytes for .*model.safetensors: No space"):
        ShardedWriter(str(tmp_path), [("a", torch.float32, (4,))])


def test_parse_size():
    assert parse_size("5B") == 5_000_000_000 and parse_size("500M") == 500_000_000
    assert parse_size("2GiB") == 2 << 30 and parse_size(1024) == 1024 and parse_size("1.5G") == 1_500_000_000
    for bad in ("abc", "-1G", "5X", 0):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="m0: .*does not exist"):
        Checkpoint(str(tmp_path / "nope"), name="m0")
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(str(p))
    p.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(str(p))
    good = tmp_path / "good.safetensors"
    save_file({"layer.w": torch.ones(64, 64)}, str(good))
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"trunc.safetensors: tensor 'layer.w' .*truncated or corrupt"):
        Checkpoint(str(trunc))
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        Checkpoint(str(d))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(2)}, str(sharded / "s1.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                  "b": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="puts tensor 'b' in s1.safetensors, which lacks it"):
        Checkpoint(str(sharded))
    with pytest.raises(CheckpointError, match="no tensor 'zz'"):
        Checkpoint(str(good)).read("zz")


def test_map_is_zero_copy_and_unmap_keeps_values(tmp_path):
    p = tmp_path / "x.safetensors"
    big = torch.randn(3000, 7)                          # several pages, not page aligned
    save_file({"a": torch.arange(5.0), "big": big, "z": torch.empty(0, 3)}, str(p))
    ck = Checkpoint(str(p))
    m = ck.map("big")
    assert torch.equal(m, big) and torch.equal(ck.map("a"), torch.arange(5.0)) and ck.map("z").shape == (0, 3)
    ck.unmap("big")                                     # pages leave the process; the view re-reads them
    ck.unmap("z")
    assert torch.equal(m, big)
    m.mul_(2)                                           # copy-on-write: the file is never modified
    assert torch.equal(load_file(str(p))["big"], big)
    ck.close()                                          # with live views: the mapping goes when they do
    assert torch.equal(m, 2 * big)


def test_map_of_a_file_that_shrank_is_an_error(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(5.0), "b": torch.randn(4096)}, str(p))
    ck = Checkpoint(str(p))
    os.truncate(p, os.path.getsize(p) - 100)
    with pytest.raises(CheckpointError, match="'b' is truncated"):
        ck.map("b")
    ck.close()
