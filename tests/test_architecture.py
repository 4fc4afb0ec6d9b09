"""The package's shape: no import cycles between fastmerge's modules.

Walks every module's imports with ``ast`` (function-level imports included: a cycle deferred into a function
is still a cycle of responsibilities) and fails on any strongly connected component of more than one module.
"""

import ast
import glob
import importlib.machinery
import os

import pytest

import fastmerge

PKG = os.path.dirname(fastmerge.__file__)


def _modules() -> dict[str, str]:
    """dotted name -> path of every Python module of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(PKG))[:-3]
                out[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(d, f)
    return out


def _is_extension(dotted: str) -> bool:
    head, _, name = dotted.rpartition(".")
    folder = os.path.join(os.path.dirname(PKG), *head.split("."))
    return any(os.path.exists(os.path.join(folder, name + s)) for s in importlib.machinery.EXTENSION_SUFFIXES)


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules or _is_extension(sub):
                    deps.add(sub)  # a submodule (or the compiled extension), not the package around it
                else:
                    deps.add(base)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {d for d in deps if d in modules and d != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    cycles = _cycles(graph)
    detail = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in cycles]
    assert not cycles, "import cycles: " + " | ".join(detail)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_environment_is_read_in_env_py_only():
    """Every FASTMERGE_* variable the code or README mentions is in fastmerge.env's table, and no module but
    env.py reads the environment for one (setup.py reads the build-time ones: it runs before the package)."""
    import re

    from fastmerge import env

    root = os.path.dirname(PKG)
    seen, readers = set(), []
    for top in ("fastmerge", "kernels", "csrc", "setup.py", "README.md"):
        path = os.path.join(root, top)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for f in files:
            if not f.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".md")):
                continue
            text = open(f, encoding="utf-8").read()
            seen |= set(re.findall(r"\bFASTMERGE_[A-Z_]*[A-Z]\b", text))
            rel = os.path.relpath(f, root)
            if f.endswith(".py") and rel not in ("fastmerge/env.py", "setup.py") and re.search(
                    r"environ(?:\.get)?\s*[\[(]\s*['\"]FASTMERGE_", text):
                readers.append(rel)
    seen -= {"FASTMERGE_KEYS", "FASTMERGE_WITH_CUDA"}  # a config table's name; a C++ macro setup.py defines
    assert seen <= set(env.VARIABLES), sorted(seen - set(env.VARIABLES))
    assert not readers, readers


def test_op_context_forces_the_backend_and_lends_buffers_to_its_thread_only(monkeypatch):
    import threading

    import torch

    from fastmerge import context, ops
    from fastmerge.algo import subspace

    monkeypatch.setenv("FASTMERGE_THREADS", "2")  # the stack below goes to two pool threads
    x = torch.randn(64)
    assert context.forced_backend() is None or os.environ.get("FASTMERGE_BACKEND")
    with context.use(backend="reference"):
        assert context.forced_backend() == "reference"
        assert ops.magnitude_threshold(x, 3) == float(x.abs().sort(descending=True).values[2])
        seen = []
        t = threading.Thread(target=context.worker(lambda: seen.append(context.current())))
        t.start()
        t.join()
        assert seen[0].backend == "reference"
    assert context.current().backend is None
    lent = []

    def alloc(shape, dtype):
        lent.append(shape)
        return torch.empty(shape, dtype=dtype)

    with ops.allocating(alloc):
        ops.empty((3,), torch.float32, "cpu")
        outs = subspace.batched(lambda xb: (context.current().allocator is None) * torch.ones(xb.shape[0]),
                                torch.zeros(4, 2, 2))
    assert lent == [(3,)] and bool(outs.all())  # pool threads never use the caller's pool
    with pytest.raises(ValueError, match="backend must be one of"):
        with context.use(backend="bogus"):
            pass


def test_only_the_methods_know_their_names():
    """Outside the method family modules (fastmerge/methods/*, but not its base and registry) nothing compares
    against a method's name (``cfg.method == "emr"``): what a method needs (its sink, its trim rule, its
    options, its checks, its statistics pass) is declared on its ``Method``."""
    from fastmerge.methods import METHODS

    names = set(METHODS)
    hits = []
    for rel, path in sorted(_modules().items()):
        if rel.startswith("fastmerge.methods.") and rel not in ("fastmerge.methods.base", "fastmerge.methods.registry"):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Compare):
                consts = [c for side in (node.left, *node.comparators)
                          for c in ([side] if not isinstance(side, (ast.Tuple, ast.List, ast.Set)) else side.elts)
                          if isinstance(c, ast.Constant) and c.value in names]
                if consts:
                    hits.append(f"{rel}:{node.lineno} compares with {consts[0].value!r}")
    assert not hits, hits


def test_one_file_per_op_and_kernels_named_after_it():
    """Every op has exactly one file in fastmerge/ops/ defining its schema (``SCHEMA = "<op>(...)"``) and its
    oracle ``<op>_ref``, and that file is named after it, as is its test file tests/ops/test_<op>.py; every
    kernel a native or Triton backend registers has a source named after its op (csrc/cpu/<op>.cpp,
    csrc/cuda/<op>.cu, kernels/<op>.py), and every such source is registered."""
    from fastmerge import ops
    from fastmerge.backends import get_backend

    root = os.path.dirname(PKG)
    schemas, oracles = {}, {}
    for path in sorted(glob.glob(os.path.join(PKG, "ops", "*.py"))):
        for node in ast.parse(open(path).read(), path).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SCHEMA" for t in node.targets):
                schema = ast.literal_eval(node.value)
                schemas.setdefault(schema.partition("(")[0], []).append(os.path.basename(path))
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_ref"):
                oracles.setdefault(node.name.removesuffix("_ref"), []).append(os.path.basename(path))
    assert sorted(schemas) == sorted(ops.OPS), sorted(set(schemas) ^ set(ops.OPS))
    for op in ops.OPS:
        assert schemas[op] == [f"{op}.py"], (op, schemas[op])
        assert oracles.get(op) == [f"{op}.py"], (op, oracles.get(op))
        test = os.path.join("tests", "ops", f"test_{op}.py")
        assert os.path.isfile(os.path.join(root, test)), f"{op} has no {test}"
    sources = {"cpp": "csrc/cpu/{}.cpp", "cuda": "csrc/cuda/{}.cu", "triton": "kernels/{}.py"}
    python_kernels = {("cpp", "orth_project")}  # ATen's BLAS, in fastmerge/backends/cpp.py
    for backend, pattern in sources.items():
        registered = get_backend(backend).ops
        for op in sorted(registered - {op for b, op in python_kernels if b == backend}):
            src = pattern.format(op)
            assert os.path.isfile(os.path.join(root, src)), f"{backend} has a kernel of {op}, no {src}"
        named = {os.path.basename(p).partition(".")[0] for p in glob.glob(os.path.join(root, pattern.format("*")))}
        unregistered = (named & set(ops.OPS)) - registered
        assert not unregistered, f"{backend} registers no kernel of {sorted(unregistered)}, its sources do"
