"""Checkpoints on disk: header validation with named errors, shard reading, atomic sharded writing."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.io import Checkpoint, CheckpointError, ShardedWriter, read_header


def _tensors():
    return {
        "a.weight": torch.randn(7, 5).bfloat16(),
        "b.bias": torch.randn(11),
        "c.weight": torch.randn(3, 4, 5).half(),
        "d.scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("shard_bytes", [1 << 30, 100])
def test_writer_then_checkpoint_roundtrip(tmp_path, shard_bytes):
    ts = _tensors()
    out = tmp_path / "model"
    with ShardedWriter(str(out), max_shard_bytes=shard_bytes) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.write_text("config.json", "{}")
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
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


def test_raw_file_and_preallocated_buffer(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(p))
    ck = Checkpoint(str(p))
    buf = torch.empty(1024, dtype=torch.uint8)
    got = ck.read("w", out=buf)
    assert torch.equal(got, torch.arange(12.0).reshape(3, 4)) and got.data_ptr() == buf.data_ptr()


def test_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(str(out), max_shard_bytes=10) as w:
        w.add("a", torch.ones(100))
        w.add("b", torch.ones(100))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        ShardedWriter(str(tmp_path / "exists"))


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
