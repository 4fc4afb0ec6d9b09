"""What a mergekit user meets: mergekit-yaml's command line (fastmerge-yaml, and the same flags on `fastmerge
merge`), mergekit's output files, reruns into an existing output, config leftovers mergekit ignores, and a
mergekit MergeConfiguration object as the config."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from _models import cfg, load_dir, make_llama_family

import fastmerge
from fastmerge.cli import main
from fastmerge.config import ConfigError


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return make_llama_family(str(root), hidden=64, layers=2, vocab=128, experts=2, dtype=torch.bfloat16, seed=4)


def _cfg_file(tmp_path, c: dict, name: str = "c.yml") -> str:
    p = tmp_path / name
    text = "# a comment mergekit_config.yml keeps\n" + yaml.safe_dump(c, sort_keys=False)
    p.write_text(text)
    return str(p)


def test_fastmerge_yaml_flags_and_output_files(fam, tmp_path, capsys):
    c = _cfg_file(tmp_path, cfg("ties", fam, {"weight": 0.5, "density": 0.4}))
    out = str(tmp_path / "out")
    argv = [c, out, "--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--no-copy-tokenizer",
            "--write-model-card", "--random-seed", "3", "-j", "1", "--clone-tensors", "--trust-remote-code",
            "--out-shard-size", "1B", "--no-async-write", "-v", "--quiet"]
    assert main(argv, yaml_cli=True) == 0, capsys.readouterr().err
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "mergekit_config.yml", "README.md", "fastmerge_config.yml"} <= files
    assert "tokenizer_config.json" not in files and "generation_config.json" not in files  # --no-copy-tokenizer
    assert open(os.path.join(out, "mergekit_config.yml")).read() == open(c).read()  # the config as written
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\n") and "method `ties`" in card and fam[1] in card and "```yaml" in card
    # the same merge through `fastmerge merge` with the same flags: the same tensors
    out2 = str(tmp_path / "out2")
    assert main(["merge", *argv[:1], out2, *argv[2:]]) == 0
    a, b = load_dir(out), load_dir(out2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_replaces_an_output_atomically(fam, tmp_path, capsys):
    c1 = _cfg_file(tmp_path, cfg("task_arithmetic", fam, {"weight": 0.3}), "a.yml")
    c2 = _cfg_file(tmp_path, cfg("task_arithmetic", fam, {"weight": 0.7}), "b.yml")
    out = str(tmp_path / "out")
    assert main([c1, out, "--quiet"], yaml_cli=True) == 0
    first = load_dir(out)
    stale = os.path.join(out, "model-00002-of-00002.safetensors")  # what an earlier, bigger run left
    open(stale, "wb").close()
    assert main([c2, out, "--quiet"], yaml_cli=True) == 0  # mergekit-yaml's rerun: replaced
    second = load_dir(out)
    assert not os.path.exists(stale) and not torch.equal(first["lm_head.weight"], second["lm_head.weight"])
    assert [e for e in os.listdir(tmp_path) if e.startswith(".out.")] == []  # no temp or old folder left
    # `fastmerge merge` refuses an existing output unless told to replace it
    assert main(["merge", c1, out, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", c1, out, "--quiet", "--overwrite"]) == 0
    assert torch.equal(load_dir(out)["lm_head.weight"], first["lm_head.weight"])


def test_rerun_never_replaces_a_folder_a_merge_did_not_write(fam, tmp_path, capsys):
    c = _cfg_file(tmp_path, cfg("task_arithmetic", fam, {"weight": 0.3}))
    for name, what in (("notes.py", "file"), ("src", "folder")):
        out = tmp_path / f"home-{what}"
        out.mkdir()
        (out / "config.json").write_text("{}")
        p = out / name
        p.mkdir() if what == "folder" else p.write_text("print(1)")
        assert main([c, str(out), "--quiet"], yaml_cli=True) == 2
        err = capsys.readouterr().err
        assert f"a {what} a merge does not write ({name})" in err, err
        assert sorted(os.listdir(out)) == sorted(["config.json", name])


def test_unsupported_flags_name_themselves(fam, tmp_path, capsys):
    c = _cfg_file(tmp_path, cfg("task_arithmetic", fam, {"weight": 0.3}))
    for flag in (["--no-safe-serialization"], ["--unsafe-truncate-embeddings"], ["--lora-merge-dtype", "float32"]):
        assert main([c, str(tmp_path / "o"), *flag], yaml_cli=True) == 2
        assert flag[0] in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "o")
    # a no-op: adapters are applied as tensors are read
    assert main([c, str(tmp_path / "o"), "--lora-merge-cache", str(tmp_path / "cache"), "--quiet"],
                yaml_cli=True) == 0
    assert not os.path.exists(tmp_path / "cache")


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "merge methods" in out and "breadcrumbs_ties" in out and "--allow-crimes" in out


def test_leftovers_warn_unknown_keys_fail(fam, tmp_path):
    c = cfg("linear", fam, {"weight": 0.5, "density": 0.3}, gp={"int8_mask": True}, base=False, tokenizer=None,
            chat_template=None)
    with pytest.warns(UserWarning) as rec:
        fastmerge.merge(c, str(tmp_path / "o"), quiet=True)
    msgs = " | ".join(str(w.message) for w in rec)
    for key in ("'tokenizer' is null", "'chat_template' is null", "takes no 'density'", "takes no 'int8_mask'"):
        assert key in msgs, msgs
    with pytest.raises(ConfigError, match="parameters.densty: not a parameter of ties"):
        fastmerge.merge(cfg("ties", fam, {"weight": 0.5}, gp={"densty": 0.3}), str(tmp_path / "o2"), quiet=True)
    assert not os.path.exists(tmp_path / "o2")


def test_mergekit_configuration_object(fam, tmp_path):
    """fastmerge.merge takes mergekit's MergeConfiguration and its model_dump() (in a child process run
    outside the checkout: the checkout's kernels/ folder would shadow the `kernels` package transformers
    imports)."""
    pytest.importorskip("mergekit")
    c = cfg("ties", fam, {"weight": 0.5, "density": 0.4}, dtype="bfloat16")
    want = str(tmp_path / "want")
    fastmerge.merge(c, want, quiet=True)
    script = (f"import fastmerge\nfrom mergekit.config import MergeConfiguration\n"
              f"c = MergeConfiguration.model_validate({c!r})\n"
              f"fastmerge.merge(c, {str(tmp_path / 'obj')!r}, quiet=True)\n"
              f"fastmerge.merge(c.model_dump(), {str(tmp_path / 'dump')!r}, quiet=True)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w = load_dir(want)
    for d in ("obj", "dump"):
        got = load_dir(str(tmp_path / d))
        assert sorted(got) == sorted(w) and all(torch.equal(got[k], w[k]) for k in w), d
    rec = yaml.safe_load(open(tmp_path / "obj" / "mergekit_config.yml"))
    assert rec["merge_method"] == "ties" and json.dumps(rec)
