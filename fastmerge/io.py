"""Checkpoints on disk: safetensors models (HF directories, sharded or not, and raw files) and sharded output.

Reading parses each file's safetensors header itself (8-byte little-endian length + JSON), so every problem
is reported with the model, the file and the tensor before anything is computed, and reads a tensor with one
positioned ``readinto`` into a preallocated buffer (optionally pinned) instead of page-faulting an mmap.
Pickle checkpoints (``.bin``/``.pt``) are refused: nothing is ever unpickled.

Writing goes to a temporary directory beside the output, which is renamed into place only when everything
is written (``ShardedWriter``); an error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the model, the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str, model: str = "") -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header. Raises CheckpointError naming the file and tensor."""
    where = f"{model}: {path}" if model else path
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{where}: file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{where}: corrupt safetensors header (claims {n} header bytes, file has {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    data0, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            b, e = (int(v) for v in meta["data_offsets"])
        except KeyError as k:
            raise CheckpointError(f"{where}: tensor {name!r} has an unsupported or missing header field {k}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry {meta!r}") from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize or b < 0 or data0 + e > size:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({meta['dtype']} {list(shape)}) has byte range [{b}, {e}) that does not fit"
                f" its shape or the file ({size - data0} data bytes): the file is truncated or corrupt"
            )
        out[name] = TensorInfo(name, path, dtype, shape, data0 + b, data0 + e)
    return out


class Checkpoint:
    """A model on disk: an HF directory (``model.safetensors`` or shards + ``model.safetensors.index.json``)
    or a raw ``.safetensors`` file. Headers are read once; tensors are read on demand."""

    def __init__(self, path: str, name: str | None = None):
        self.path = path
        self.name = name or path
        self.tensors: dict[str, TensorInfo] = {}
        if os.path.isdir(path):
            self._open_dir(path)
        elif os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise CheckpointError(f"{self.name}: {path} is not a .safetensors file (pickles are never loaded)")
            self.tensors = read_header(path, self.name)
        else:
            raise CheckpointError(f"{self.name}: {path} does not exist")

    def _open_dir(self, path: str) -> None:
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.name}: {index} is not a valid safetensors index ({e})") from None
            headers = {}
            for shard in sorted(set(weight_map.values())):
                headers[shard] = read_header(os.path.join(path, shard), self.name)
            for tname, shard in weight_map.items():
                if tname not in headers[shard]:
                    raise CheckpointError(f"{self.name}: {index} puts tensor {tname!r} in {shard}, which lacks it")
                self.tensors[tname] = headers[shard][tname]
            return
        single = os.path.join(path, SINGLE)
        if os.path.isfile(single):
            self.tensors = read_header(single, self.name)
            return
        found = sorted(os.listdir(path))
        pickles = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = ""
        if pickles:
            hint = f" (found pickle files {pickles[:3]}: convert them to safetensors; fastmerge never unpickles)"
        raise CheckpointError(f"{self.name}: {path} has neither {SINGLE} nor {INDEX}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor {name!r}") from None

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (into ``out``'s storage when given: a preallocated or pinned uint8 buffer)."""
        ti = self.info(name)
        buf = torch.empty(ti.nbytes, dtype=torch.uint8) if out is None else out.view(torch.uint8)[: ti.nbytes]
        with open(ti.file, "rb") as f:
            f.seek(ti.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != ti.nbytes:
            raise CheckpointError(f"{self.name}: {ti.file}: tensor {name!r} is truncated ({got} of {ti.nbytes} bytes)")
        return buf.view(ti.dtype).reshape(ti.shape)


class ShardedWriter:
    """Write tensors as HF-style safetensors shards + index, atomically.

    Shards are written into a temporary directory beside ``out_dir`` as soon as they fill up to
    ``max_shard_bytes``; :meth:`commit` writes the index, names the shards ``model-0000i-of-0000N``
    and renames the directory to ``out_dir``. Used as a context manager, any exception removes the
    temporary directory, so a failed merge leaves neither output nor temp files.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 << 30, metadata: dict[str, str] | None = None):
        out_dir = os.path.abspath(out_dir)
        if os.path.exists(out_dir):
            raise FileExistsError(f"output {out_dir} already exists; choose another path or remove it")
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        self.out_dir = out_dir
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.bytes_written = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t.detach().contiguous().cpu()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        i = len(self._shards)
        save_file(self._pending, os.path.join(self.tmp, f"shard-{i}.safetensors"), metadata=self.metadata)
        self.bytes_written += self._pending_bytes
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def copy_file(self, src: str, name: str | None = None) -> None:
        """Copy a side file (config.json, tokenizer files...) into the output."""
        shutil.copy2(src, os.path.join(self.tmp, name or os.path.basename(src)))

    def write_text(self, name: str, text: str) -> None:
        with open(os.path.join(self.tmp, name), "w") as f:
            f.write(text)

    def commit(self) -> str:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.tmp, f"shard-{i}.safetensors"), os.path.join(self.tmp, final))
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            self.write_text(INDEX, json.dumps({"metadata": {"total_size": self.bytes_written},
                                               "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif os.path.exists(self.tmp):
            self.commit()
