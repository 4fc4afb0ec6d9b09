"""fastmerge.integrations.mergekit through mergekit's own API and command line, with mergekit installed: the
patched run_merge and the mergekit-yaml shim give stock mergekit's tensors and fastmerge's record, patch()
undoes itself (and runs the config mergekit's own run_merge leaves behind, rewritten into its modules: form),
an option fastmerge cannot honour falls back to mergekit's executor with one line saying why; methods
registered in mergekit's registry give the engine's bytes.
mergekit runs in subprocesses outside the checkout (importing it costs seconds; see fastmerge.peers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from _models import load_dir, make_llama_family

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed")

SCRIPT = textwrap.dedent("""
    import json, sys, yaml
    import mergekit.merge, mergekit.scripts.run_yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from fastmerge.integrations import mergekit as fm

    cfg_path, root = sys.argv[1:]
    stock = mergekit.merge.run_merge
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
    opts = MergeOptions(random_seed=0, copy_tokenizer=False, quiet=True)
    res = {}
    stock(cfg, root + "/stock", options=opts)
    with fm.patch():
        res["patched"] = mergekit.merge.run_merge is mergekit.scripts.run_yaml.run_merge is fm.run_merge
        mergekit.merge.run_merge(cfg, root + "/patched", options=opts)  # cfg as stock run_merge left it
    res["restored"] = mergekit.merge.run_merge is mergekit.scripts.run_yaml.run_merge is stock
    fm.patch()
    fm.patch()  # idempotent
    lacking = MergeOptions(random_seed=0, copy_tokenizer=False, quiet=True, unsafe_truncate_embeddings=True)
    mergekit.merge.run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path))), root + "/fallback",
                             options=lacking)
    fm.unpatch()
    res["restored_again"] = mergekit.merge.run_merge is stock
    res["registered"] = fm.register_methods() == fm.register_methods()  # idempotent
    for name in ("tsv_m", "consensus_ties"):  # mergekit's own executor, fastmerge's per-tensor methods
        c = dict(yaml.safe_load(open(cfg_path)), merge_method="fastmerge_" + name)
        for m in c["models"]:
            m.pop("parameters", None)
        stock(MergeConfiguration.model_validate(c), root + "/registered-" + name, options=opts)
    print(json.dumps(res))
""")


def _run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _same(a: str, b: str) -> None:
    x, y = load_dir(a), load_dir(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)), k


def test_run_merge_patch_and_shim_give_mergekits_tensors(tmp_path):
    f = make_llama_family(str(tmp_path / "f"), hidden=64, layers=2, vocab=128, experts=2, dtype=torch.bfloat16)
    cfg = {"merge_method": "ties", "base_model": f[0],
           "models": [{"model": f[1], "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": f[2], "parameters": {"weight": 0.4, "density": 0.7}}]}
    path = str(tmp_path / "cfg.yml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    r = _run(["-c", SCRIPT, path, str(tmp_path)], cwd=str(tmp_path))
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"patched": True, "restored": True, "restored_again": True, "registered": True}, r.stderr[-3000:]
    import fastmerge

    for name in ("tsv_m", "consensus_ties"):
        fastmerge.merge({**cfg, "merge_method": name, "models": [{"model": p} for p in f[1:]]},
                        str(tmp_path / f"engine-{name}"), quiet=True)
        _same(str(tmp_path / f"engine-{name}"), str(tmp_path / f"registered-{name}"))
    _same(str(tmp_path / "stock"), str(tmp_path / "patched"))
    assert os.path.exists(tmp_path / "patched" / "fastmerge_config.yml")  # fastmerge's engine ran
    assert "fastmerge: unsafe_truncate_embeddings=True: running mergekit's own executor" in r.stderr
    assert not os.path.exists(tmp_path / "fallback" / "fastmerge_config.yml")  # mergekit's did
    _same(str(tmp_path / "stock"), str(tmp_path / "fallback"))
    # mergekit-yaml's command line on fastmerge (run from the checkout: kernels/ kept off sys.path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _run(["-m", "fastmerge.integrations.mergekit", path, str(tmp_path / "shim"), "--no-copy-tokenizer",
          "--random-seed", "0", "--quiet"], cwd=root)
    _same(str(tmp_path / "stock"), str(tmp_path / "shim"))
    assert os.path.exists(tmp_path / "shim" / "fastmerge_config.yml")
    # a flag fastmerge lacks: mergekit-yaml itself runs the same command line
    r = _run(["-m", "fastmerge.integrations.mergekit", path, str(tmp_path / "shim_stock"), "--no-copy-tokenizer",
              "--random-seed", "0", "--quiet", "--unsafe-truncate-embeddings"], cwd=str(tmp_path))
    assert "--unsafe-truncate-embeddings is not supported" in r.stderr and "mergekit's own executor" in r.stderr
    _same(str(tmp_path / "stock"), str(tmp_path / "shim_stock"))
    assert not os.path.exists(tmp_path / "shim_stock" / "fastmerge_config.yml")
