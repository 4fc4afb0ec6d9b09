"""Checkpoints on disk: safetensors models (HF directories, sharded or not, and raw files) and sharded output.

Reading parses each file's safetensors header itself (8-byte little-endian length + JSON), so every problem
is reported with the model, the file and the tensor before anything is computed, and reads a tensor with one
positioned ``readinto`` into a preallocated buffer (optionally pinned) instead of page-faulting an mmap.
Pickle checkpoints (``.bin``/``.pt``) are refused: nothing is ever unpickled.

Writing goes to a temporary directory beside the output, which is renamed into place only when everything
is written (``ShardedWriter``); an error or Ctrl-C removes it. The page-aligned interior of each large tensor
is written with ``O_DIRECT`` where the filesystem allows it (from a small aligned bounce buffer): a buffered
write must first allocate and zero a page-cache page per 4 KiB, which on virtual machines runs at a fraction
of the disk's speed (0.4 GB/s against 1.4-1.9 GB/s direct on the 2-core CI VM). Pages that straddle two
tensors and the header go through the page cache, so no page is ever written both ways.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import mmap
import operator
import os
import shlex
import shutil
import struct
import tempfile
import warnings
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
# the files of an HF model directory besides its weights, copied from the base into the output
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
_MAX_HEADER = 100 << 20
_PAGE = mmap.PAGESIZE
_DIRECT_MIN = 1 << 20      # tensors smaller than this are written buffered
_BOUNCE = 8 << 20          # aligned staging buffer for O_DIRECT writes


def read_model_config(path: str) -> dict | None:
    """A model folder's config.json (its text_config for a multimodal one), if readable."""
    cfg = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg and os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                c = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return c.get("text_config", c) if isinstance(c, dict) else None
    return None


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the model, the file and the tensor."""


@dataclass(frozen=True, slots=True)
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


_FIELDS = frozenset(("data_offsets", "dtype", "shape"))


def _pairs(where: str):
    """A json ``object_pairs_hook``: refuses duplicate keys (json would keep the last silently) and turns each
    tensor entry into a compact tuple as it is parsed, so a header of many entries costs little more memory
    than its text."""
    def hook(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise CheckpointError(f"{where}: corrupt safetensors header (key {dup!r} appears twice)")
        if len(d) == 3 and d.keys() == _FIELDS:
            name, shape, off = d["dtype"], d["shape"], d["data_offsets"]
            dtype = DTYPES.get(name) if type(name) is str else None
            ok = dtype is not None and type(shape) is list and type(off) is list and len(off) == 2
            if ok:
                for v in shape:
                    if type(v) is not int or v < 0:
                        ok = False
                        break
                b, e = off
                ok = ok and type(b) is int and type(e) is int and 0 <= b <= e
            if ok:
                shape = tuple(shape)
                return _Entry((dtype, shapes.setdefault(shape, shape), b, e))
            return _Raw((name, shape, off))
        return d
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    return hook


class _Entry(tuple):
    """(torch dtype, shape tuple, begin, end) of a well-formed header entry, as parsed."""

    __slots__ = ()


class _Raw(tuple):
    """(dtype, shape, data_offsets) of a malformed header entry, as parsed, for the error message."""

    __slots__ = ()


def _uint(v) -> bool:
    return type(v) is int and v >= 0


def _json(raw: bytes | str, where: str, what: str, hook=None):
    """JSON text -> object, every failure (syntax, encoding, nesting too deep for the parser) as CheckpointError."""
    try:
        return json.loads(raw, object_pairs_hook=hook)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: corrupt {what} ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt {what} (JSON nested too deeply)") from None


def _malformed(where: str, name: str, dname, shape, offsets):
    """Raise the CheckpointError that names what is wrong with a malformed header entry."""
    if not (isinstance(dname, str) and dname in DTYPES):
        raise CheckpointError(f"{where}: tensor {name!r} has an unsupported dtype {dname!r} "
                              f"(supported: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_uint(d) for d in shape)):
        raise CheckpointError(f"{where}: tensor {name!r} has a malformed shape {shape!r} "
                              "(expected a list of non-negative integers)")
    raise CheckpointError(f"{where}: tensor {name!r} has malformed data_offsets {offsets!r} "
                          "(expected [begin, end], integers, 0 <= begin <= end)")


def read_header(path: str, model: str = "") -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header as the format requires: a JSON object of unique tensor
    names (and an optional ``__metadata__`` of strings), each with a known dtype, a shape of non-negative
    integers and integer ``data_offsets`` that match it; the byte ranges in offset order tile the data area
    exactly (no overlap, no gap, nothing after the last tensor). Raises CheckpointError naming the file and
    the tensor."""
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
            text = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{where}: is a directory, not a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror})") from None
    if not text.lstrip().startswith(b"{"):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    try:
        text = text.decode("utf-8")  # and the bytes go: one copy of the text while it is parsed
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({e})") from None
    header = _json(text, where, "safetensors header", _pairs(where))
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    del text
    data0, data = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name in list(header):
        meta = header.pop(name)  # each parsed entry goes as its TensorInfo comes: one copy at a time
        if isinstance(meta, _Raw):
            _malformed(where, name, *meta)
        if not isinstance(meta, _Entry):
            got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{where}: tensor {name!r}: a header entry needs exactly dtype, shape and "
                                  f"data_offsets, got {got}")
        dtype, shape, b, e = meta
        if e - b != math.prod(shape) * dtype.itemsize or e > data:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({NAMES[dtype]} {list(shape)}) has byte range [{b}, {e}) that does not"
                f" fit its shape or the file ({data} data bytes): the file is truncated or corrupt"
            )
        out[name] = TensorInfo(name, path, dtype, shape, data0 + b, data0 + e)
    end, prev = 0, None
    for t in sorted(out.values(), key=operator.attrgetter("start")):
        b, e, name = t.start - data0, t.end - data0, t.name
        if b != end:
            after = repr(prev) if prev else "the header"
            what = f"overlaps {prev!r}" if b < end else f"leaves a gap of {b - end} bytes after {after}"
            raise CheckpointError(f"{where}: tensor {name!r} (bytes [{b}, {e})) {what}: corrupt safetensors file")
        end, prev = e, name
    if end != data:
        raise CheckpointError(f"{where}: {data - end} bytes after the last tensor's data: corrupt or not a "
                              "safetensors file")
    return out


class Checkpoint:
    """A model on disk: an HF directory (``model.safetensors`` or shards + ``model.safetensors.index.json``)
    or a raw ``.safetensors`` file. Headers are read once; tensors are read on demand."""

    def __init__(self, path: str, name: str | None = None):
        self.path = path
        self.name = name or path
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[str, int] = {}
        self._mmaps: dict[str, mmap.mmap] = {}
        self._slots: list[int] = []  # SIGBUS guard slots of this checkpoint's mappings
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
            self._open_index(path, index)
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

    def _open_index(self, path: str, index: str) -> None:
        where = f"{self.name}: {index}"
        try:
            with open(index, "rb") as f:
                raw = f.read(_MAX_HEADER + 1)
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read ({e.strerror})") from None
        if len(raw) > _MAX_HEADER:
            raise CheckpointError(f"{where}: larger than {_MAX_HEADER >> 20} MiB: not a safetensors index")
        doc = _json(raw, where, "safetensors index", _pairs(where))
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{where}: not a valid safetensors index (needs a non-empty 'weight_map' object "
                                  "of tensor name -> shard file)")
        for tname, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"{where}: weight_map[{tname!r}] must be a shard file name, got {shard!r}")
            parts = shard.replace("\\", "/").split("/")
            if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise CheckpointError(f"{where}: weight_map[{tname!r}] = {shard!r} points outside the model's "
                                      "directory; shards must be relative paths inside it")
        headers = {}
        for shard in sorted(set(weight_map.values())):
            headers[shard] = read_header(os.path.join(path, shard), self.name)
        for tname, shard in weight_map.items():
            if tname not in headers[shard]:
                raise CheckpointError(f"{where}: puts tensor {tname!r} in {shard}, which lacks it")
            self.tensors[tname] = headers[shard][tname]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor {name!r}") from None

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (into ``out``'s storage when given: a preallocated or pinned uint8 buffer).

        Each file is opened once and kept open until :meth:`close`; reads are positioned (``preadv``), so
        several threads may read at once."""
        ti = self.info(name)
        buf = torch.empty(ti.nbytes, dtype=torch.uint8) if out is None else out.view(torch.uint8)[: ti.nbytes]
        fd = self._fd(ti.file)
        view, got = memoryview(buf.numpy()), 0
        while got < ti.nbytes:
            n = os.preadv(fd, [view[got:]], ti.start + got)
            if n <= 0:
                break
            got += n
        if got != ti.nbytes:
            raise CheckpointError(f"{self.name}: {ti.file}: tensor {name!r} is truncated ({got} of {ti.nbytes} bytes)")
        return buf.view(ti.dtype).reshape(ti.shape)

    def map(self, name: str) -> torch.Tensor:
        """One tensor as a zero-copy view of its file (mapped copy-on-write: page-cache pages are used as they
        are, and a write would only touch a private copy). Its pages are faulted in here, on the caller's thread,
        so that a cold read blocks the reader and not the merge; :meth:`unmap` drops them from this process.

        A mapped file that shrinks later would raise SIGBUS on the next touch of a page past its new end, which
        kills the process; the native SIGBUS guard turns that into a zero page and a count that
        :func:`check_mapped` reports as a named error. Without the native module (a pure-Python build) this
        reads the tensor instead (:meth:`read`)."""
        ti = self.info(name)
        guard = _guard()
        if guard is None:
            return self.read(name)
        mm = self._mmaps.get(ti.file)
        if mm is None:
            fd = self._fd(ti.file)
            try:
                mm = self._mmaps[ti.file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.name}: {ti.file}: cannot map ({e})") from None
            start = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            slot = guard.mapped_guard_watch(start, len(mm))
            self._slots.append(slot)
            _watched[slot] = (start, start + len(mm), f"{self.name}: {ti.file}")
        if os.fstat(self._fds[ti.file]).st_size < ti.end:
            raise CheckpointError(f"{self.name}: {ti.file}: tensor {name!r} is truncated (the file shrank)")
        t = torch.frombuffer(mm, dtype=torch.uint8, count=ti.nbytes, offset=ti.start) if ti.nbytes else \
            torch.empty(0, dtype=torch.uint8)
        if ti.nbytes:
            t[::_PAGE].sum()  # one touch per page: fault-around maps the rest (and reads from disk when cold)
        return t.view(ti.dtype).reshape(ti.shape)

    def unmap(self, name: str) -> None:
        """Drop a mapped tensor's pages from this process (they stay in the page cache): bounded RSS."""
        ti = self.info(name)
        mm = self._mmaps.get(ti.file)
        if mm is None or not ti.nbytes:
            return
        start = ti.start - ti.start % _PAGE
        end = min(len(mm), -(-ti.end // _PAGE) * _PAGE)
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{self.name}: {file}: cannot open ({e.strerror})") from None
        return fd

    def close(self) -> None:
        guard = _guard() if self._slots else None
        for slot in self._slots:
            guard.mapped_guard_unwatch(slot)
            _watched.pop(slot, None)
        self._slots.clear()
        self._mmaps.clear()  # never mm.close(): tensors from map() keep their mapping alive until they go
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_watched: dict[int, tuple[int, int, str]] = {}  # SIGBUS guard slot -> (start, end, "model: file")
_faults_seen = 0


@functools.cache
def _guard():
    """The native SIGBUS guard (fastmerge._C), or None in a pure-Python build."""
    from .backends._native import _C

    return _C if _C is not None and hasattr(_C, "mapped_guard_watch") else None


def check_mapped() -> None:
    """Raise the named error if a mapped input file shrank since the last check (the SIGBUS guard counted a
    touch of a page past its end: the data read there are zeros, so nothing computed from them may be kept)."""
    global _faults_seen
    guard = _guard()
    if guard is None:
        return
    n, addr = guard.mapped_guard_faults()
    if n == _faults_seen:
        return
    _faults_seen = n
    where = next((w for lo, hi, w in list(_watched.values()) if lo <= addr < hi), "an input file")
    raise CheckpointError(f"{where}: the file shrank while it was being read (another program truncated or "
                          "rewrote it during the merge)")


OWNER = ".fastmerge-owner"  # inside a temporary output directory: which process writes it


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc), to tell it from a later process with its pid;
    None where /proc has no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class OutputDir:
    """A directory built beside its final path and renamed into place by :meth:`commit`.

    Used as a context manager, an exception (Ctrl-C, SIGTERM and SIGHUP included, see fastmerge.signals)
    removes the temporary directory and the parent directories it created, so a failed merge leaves neither
    the output nor temp files. An existing output, or a symlink in its place, is never overwritten. The
    output gets the permissions the umask gives a new directory.

    A process killed outright (SIGKILL, power loss) leaves its ``.OUT.tmp-*`` behind; it holds a note of its
    owner (pid, start time, host), so the next run for the same OUT removes it when that process is gone, and
    otherwise says how to.
    """

    def __init__(self, path: str, overwrite: bool = False):
        path = os.path.abspath(path)
        if os.path.islink(path):
            what = "symlink" if os.path.exists(path) else "dangling symlink"
            raise FileExistsError(f"output {path} is a {what} (to {os.readlink(path)}); remove it or choose "
                                  "another path")
        self.replace = False
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"output {path} already exists; choose another path, remove it, or pass "
                                      "--overwrite to replace it")
            why = _not_replaceable(path)
            if why:
                raise FileExistsError(f"output {path} exists and {why}: it is not replaced (choose another path)")
            self.replace = True
        parent = os.path.dirname(path)
        self.created: list[str] = []  # parent directories this run made, deepest first
        d = parent
        while not os.path.isdir(d):
            self.created.append(d)
            d = os.path.dirname(d)
        os.makedirs(parent, exist_ok=True)
        self.path = path
        try:
            self._stale(parent, os.path.basename(path))
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        except BaseException:
            self._remove_created()
            raise
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o777 & ~mask)  # mkdtemp makes it 0700
        with open(os.path.join(self.tmp, OWNER), "w") as f:
            json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "host": _host(), "out": path}, f)

    @staticmethod
    def _stale(parent: str, base: str) -> None:
        """Temporary directories of earlier runs for the same output: removed where their process is gone,
        reported (with the command that removes them) where that can't be told; a live one is an error."""
        for entry in os.listdir(parent):
            tmp = os.path.join(parent, entry)
            if not entry.startswith(f".{base}.tmp-") or not os.path.isdir(tmp) or os.path.islink(tmp):
                continue
            try:
                with open(os.path.join(tmp, OWNER)) as f:
                    owner = json.load(f)
                pid, start, host = int(owner["pid"]), owner["start"], owner["host"]
            except (OSError, ValueError, KeyError, TypeError):
                warnings.warn(f"{tmp} looks like the temporary output of an earlier run that was killed; "
                              f"remove it with: rm -rf {shlex.quote(tmp)}", stacklevel=3)
                continue
            if host != _host():
                warnings.warn(f"{tmp} is the temporary output of a run on {host} (pid {pid}); if that run is "
                              f"over, remove it with: rm -rf {shlex.quote(tmp)}", stacklevel=3)
            elif start is not None and _start_time(pid) == start:
                raise FileExistsError(f"another fastmerge run (pid {pid}) is writing {os.path.join(parent, base)} "
                                      f"now (into {tmp}); wait for it or stop it")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                warnings.warn(f"removed {tmp}, left by a fastmerge run (pid {pid}) that was killed", stacklevel=3)

    def sub(self, *parts: str) -> str:
        p = os.path.join(self.tmp, *parts)
        os.makedirs(p if not os.path.splitext(p)[1] else os.path.dirname(p), exist_ok=True)
        return p

    def commit(self) -> str:
        """The finished directory takes OUT's place: a rename, or, over an earlier output (``overwrite``), an
        atomic exchange of the two (renameat2 RENAME_EXCHANGE) after which the old one is removed; readers
        see the old output or the new one, never a mix."""
        os.unlink(os.path.join(self.tmp, OWNER))
        if self.replace and os.path.exists(self.path):
            if not _exchange(self.tmp, self.path):  # no renameat2 here: the old output moves aside first
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=os.path.dirname(self.path))
                os.replace(self.path, os.path.join(old, "out"))
                os.replace(self.tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
                return self.path
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the old output
            return self.path
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self.created:
            try:
                os.rmdir(d)
            except OSError:
                break

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or os.path.exists(self.tmp):
            self.abort()


_STORE_DIRS = {"base", "task_vectors", "shared", "masks", "factors"}  # a multi-task store's folders
_OUTPUT_SUFFIXES = (".safetensors", ".json", ".yml", ".yaml", ".md", ".jinja", ".model", ".txt", ".npy", ".bin")


def _not_replaceable(path: str, depth: int = 0) -> str | None:
    """Why an existing OUT may not be replaced by ``overwrite``, or None: only a directory holding what a merge
    writes (safetensors, JSON/YAML/Markdown side files, tokenizer files, a store's folders) is, so that a
    mistyped path never deletes anything else."""
    if not os.path.isdir(path):
        return "is not a directory"
    for entry in os.listdir(path):
        p = os.path.join(path, entry)
        if os.path.islink(p):
            return f"holds a symlink ({entry})"
        if os.path.isdir(p):
            why = f"holds a folder a merge does not write ({entry})"
            if depth or entry not in _STORE_DIRS or _not_replaceable(p, 1):
                return why
        elif entry not in SIDE_FILES and not entry.endswith(_OUTPUT_SUFFIXES):
            return f"holds a file a merge does not write ({entry})"
    return None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # the kernel or filesystem can't: fall back
        return False
    raise OSError(err, f"cannot swap {a} into place of {b}: {os.strerror(err)}")


def _host() -> str:
    import socket

    return socket.gethostname()


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class ShardedWriter:
    """HF-style safetensors shards + ``model.safetensors.index.json``, laid out before any data is written.

    The caller declares every tensor (name, dtype, shape) up front, so each shard's header is final from the
    start and each tensor goes straight to its offset with ``pwrite``: tensors can arrive in any order (from a
    writer thread), nothing is buffered, and the whole output is reserved with ``posix_fallocate`` so a full
    disk fails at once, naming the file, instead of after an hour of merging.
    """

    def __init__(self, directory: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 << 30, metadata: dict[str, str] | None = None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in layout:
            nb = math.prod(shape) * _itemsize(dtype)
            if groups[-1] and size + nb > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape)))
            size += nb
        n = len(groups)
        self.files: list[str] = []
        self._fds: list[int] = []
        self._direct: list[int | None] = []   # an O_DIRECT descriptor per file, where the filesystem has one
        self._bounce: mmap.mmap | None = None
        self._where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._pending = {name for name, _, _ in layout}
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        self.total_bytes = 0
        meta = {"format": "pt", **(metadata or {})}
        try:
            for i, group in enumerate(groups):
                fname = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                path = os.path.join(directory, fname)
                header, off = {"__metadata__": meta}, 0
                for name, dtype, shape in group:
                    nb = math.prod(shape) * _itemsize(dtype)
                    header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
                    off += nb
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                self.files.append(path)
                self._direct.append(_open_direct(path))
                data0 = 8 + len(raw)
                total = data0 + off
                try:
                    os.posix_fallocate(fd, 0, max(total, 1))
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise OSError(e.errno, f"cannot reserve {total} bytes for {path}: {e.strerror}") from None
                    os.ftruncate(fd, total)  # a filesystem without fallocate: a sparse file
                self._pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0, path)
                for name, dtype, shape in group:
                    b, e = header[name]["data_offsets"]
                    self._where[name] = (i, data0 + b, dtype, shape)
                    self.weight_map[name] = fname
                self.total_bytes += total
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pwrite(fd: int, data, offset: int, path: str) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.pwrite(fd, view, offset)
            except OSError as e:
                raise OSError(e.errno, f"writing {path}: {e.strerror}") from None
            view, offset = view[n:], offset + n

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write one declared tensor (dtype and shape must match the declaration)."""
        try:
            i, off, dtype, shape = self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} was not declared in the output layout") from None
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r}: got {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data).cast("B")
        a = -(-off // _PAGE) * _PAGE                 # the whole pages inside [off, off + n)
        b = (off + len(view)) // _PAGE * _PAGE
        direct = self._direct[i]
        if direct is not None and b - a >= _DIRECT_MIN:
            self._pwrite(self._fds[i], view[:a - off], off, self.files[i])
            self._pwrite(self._fds[i], view[b - off:], b, self.files[i])
            try:
                self._pwrite_direct(direct, view[a - off:b - off], a)
            except OSError as e:
                if e.errno != errno.EINVAL:  # an unexpected alignment rule: buffered from now on
                    raise OSError(e.errno, f"writing {self.files[i]}: {e.strerror}") from None
                self._direct[i] = None
                self._pwrite(self._fds[i], view[a - off:b - off], a, self.files[i])
        else:
            self._pwrite(self._fds[i], view, off, self.files[i])
        self._pending.discard(name)
        self.bytes_written += data.nbytes

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> None:
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, _BOUNCE)  # anonymous mappings are page-aligned
        bounce = memoryview(self._bounce)
        try:
            while view:
                n = min(len(view), _BOUNCE)
                bounce[:n] = view[:n]
                done = 0
                while done < n:
                    done += os.pwrite(fd, bounce[done:n], offset + done)
                view, offset = view[n:], offset + n
        finally:
            bounce.release()

    def finish(self) -> None:
        """Check every declared tensor was written and write the index for sharded outputs. (No fsync: like
        ``save_file``, the data reaches the disk when the OS writes its page cache back.)"""
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} declared tensors were never written, e.g. {missing[:3]}")
        self.close()
        if len(self.files) > 1:
            with open(os.path.join(self.directory, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.bytes_written},
                           "weight_map": dict(sorted(self.weight_map.items()))}, f, indent=2)

    def close(self) -> None:
        for fd in self._fds + [d for d in self._direct if d is not None]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds, self._direct = [], []
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


def _open_direct(path: str) -> int | None:
    """A second, O_DIRECT descriptor of ``path``, or None where the OS or filesystem has none (tmpfs, macOS)."""
    flag = getattr(os, "O_DIRECT", 0)
    from .env import direct_io

    if not flag or not direct_io():
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def parse_size(v: int | float | str) -> int:
    """Bytes from an int or a string such as '5B' (billion), '500M', '2G', '2GiB', '1.5GB'."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v <= 0:
            raise ValueError(f"size must be positive, got {v}")
        return int(v)
    s = str(v).strip().upper().replace(" ", "")
    units = {"": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "B": 10**9,
             "T": 10**12, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in units or value <= 0:
        raise ValueError(f"cannot read size {v!r}; use bytes or a number with K/M/G/T (GiB etc.) or B (billions)")
    return int(value * units[unit])
