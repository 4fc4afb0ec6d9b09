"""Property-based tests (hypothesis) of the safetensors header reader and the index reader: random mutations
of valid files give either a correct read or a CheckpointError naming the file, never another exception and
never a read outside the bytes a tensor declares."""

import json
import math
import os
import struct
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmerge.io import INDEX, Checkpoint, CheckpointError, read_header

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_file(draw):
    """(header dict in file order, data bytes): tensors laid out contiguously in a random order."""
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=n, max_size=n, unique=True))
    specs = [(name, draw(st.sampled_from(sorted(DTYPES))), draw(st.lists(st.integers(0, 3), max_size=3)))
             for name in names]
    order = draw(st.permutations(list(range(n))))
    header, off = {}, 0
    for i in order:
        name, dt, shape = specs[i]
        nb = math.prod(shape) * DTYPES[dt]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = bytes(draw(st.binary(min_size=off, max_size=off)))
    return header, data


def _mutate_json(draw, header):
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["field", "entry", "duplicate", "extra", "metadata", "none"]))
    if kind == "none" or (not names and kind in ("field", "entry", "duplicate")):
        return json.dumps(header)
    if kind == "field":
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(JSON_JUNK | st.lists(st.integers(-5, 1 << 40), max_size=3))
    elif kind == "entry":
        header[draw(st.sampled_from(names))] = draw(JSON_JUNK)
    elif kind == "extra":
        header[draw(st.text(max_size=4))] = draw(JSON_JUNK)
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON_JUNK)
    else:  # the same key twice: json.dumps can't, so splice the text
        name = draw(st.sampled_from(names))
        text = json.dumps(header)
        return text[:-1] + ", " + json.dumps({name: header[name]})[1:]
    return json.dumps(header, allow_nan=True)


@st.composite
def mutated_file(draw):
    header, data = draw(valid_file())
    text = _mutate_json(draw, header).encode()
    n = len(text)
    kind = draw(st.sampled_from(["json", "bytes", "length", "truncate", "append"]))
    if kind == "bytes" and text:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1:]
    elif kind == "length":
        n = draw(st.integers(0, len(text) + len(data) + 16) | st.integers(0, (1 << 64) - 1))
    blob = struct.pack("<Q", n) + text + data
    if kind == "truncate":
        blob = blob[:draw(st.integers(0, len(blob)))]
    elif kind == "append":
        blob += draw(st.binary(min_size=1, max_size=16))
    return blob


def _check_read(path, blob):
    try:
        infos = read_header(path, "fuzz")
    except CheckpointError as e:
        assert str(e).startswith(f"fuzz: {path}") and "\n" not in str(e)
        return
    n = struct.unpack("<Q", blob[:8])[0]
    data0, end = 8 + n, len(blob)
    spans = sorted((ti.start, ti.end) for ti in infos.values())
    pos = data0
    for a, b in spans:  # the accepted layout tiles the data area exactly
        assert a == pos and b >= a
        pos = b
    assert pos == end
    ck = Checkpoint(path, name="fuzz")
    try:
        for name, ti in infos.items():
            got = ck.read(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == blob[ti.start:ti.end]
    finally:
        ck.close()


@SETTINGS
@given(mutated_file())
def test_header_reader_survives_mutations(blob):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        _check_read(path, blob)


@SETTINGS
@given(valid_file())
def test_valid_files_read_back(spec):
    header, data = spec
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + data
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        assert set(read_header(path)) == {k for k in header if k != "__metadata__"}
        _check_read(path, blob)


SHARD_NAMES = st.sampled_from(["a.safetensors", "b.safetensors", "sub/c.safetensors", "../a.safetensors",
                               "/tmp/a.safetensors", "missing.safetensors", "", "sub/../a.safetensors", "."])


@st.composite
def index_doc(draw):
    names = draw(st.lists(st.sampled_from(["x", "y", "z", "w"]), unique=True, max_size=4))
    wm = {n: draw(SHARD_NAMES | JSON_JUNK) if draw(st.integers(0, 4)) == 0 else draw(SHARD_NAMES) for n in names}
    doc = draw(st.sampled_from(["ok", "junk", "wm_junk"]))
    if doc == "junk":
        return draw(JSON_JUNK)
    if doc == "wm_junk":
        return {"weight_map": draw(JSON_JUNK)}
    return {"metadata": {}, "weight_map": wm}


@SETTINGS
@given(index_doc())
def test_index_reader_survives_mutations(doc):
    with tempfile.TemporaryDirectory() as root:
        d = os.path.join(root, "model")
        os.makedirs(os.path.join(d, "sub"))
        for shard, names in (("a.safetensors", ["x", "y"]), ("b.safetensors", ["z"]), ("sub/c.safetensors", ["w"])):
            header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                      for i, n in enumerate(names)}
            text = json.dumps(header).encode()
            with open(os.path.join(d, shard), "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + bytes(4 * len(names)))
        with open(os.path.join(root, "a.safetensors"), "wb") as f:  # outside the model: must never be read
            f.write(b"")
        with open(os.path.join(d, INDEX), "w") as f:
            json.dump(doc, f, allow_nan=True)
        try:
            ck = Checkpoint(d, name="fuzz")
        except CheckpointError as e:
            assert str(e).startswith("fuzz: ") and "\n" not in str(e)
            return
        for ti in ck.tensors.values():
            assert os.path.commonpath([os.path.realpath(ti.file), os.path.realpath(d)]) == os.path.realpath(d)
            assert ck.read(ti.name).numel() == 1
        ck.close()
