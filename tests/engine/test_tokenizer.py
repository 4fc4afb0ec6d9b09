"""tokenizer_source / tokenizer: config errors named before anything is written, and the re-indexed rows where
models disagree on their vocabularies. Equality with mergekit is in tests/methods/test_mergekit_compat.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _models import leftovers, load_dir, make_llama_family, set_vocab

import fastmerge
from fastmerge.config import ConfigError

TOKS = ["<unk>", "<s>", "</s>", "a", "b", "c"]


@pytest.fixture
def fam(tmp_path):
    f = make_llama_family(str(tmp_path / "f"), hidden=16, layers=1, vocab=6, experts=2, dtype=torch.float32)
    set_vocab(f[0], TOKS, seed=1)
    set_vocab(f[1], TOKS + ["d", "e"], seed=2)
    set_vocab(f[2], ["<unk>", "<s>", "</s>", "c", "b", "a"], ["<t>"], seed=3)
    return f


def _cfg(f, **top):
    return {"merge_method": "linear", "base_model": f[0],
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in f], **top}


def _fails(tmp_path, c, match):
    with pytest.raises(ConfigError, match=match):
        fastmerge.merge(c, str(tmp_path / "out"), quiet=True)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_tokenizer_config_errors(fam, tmp_path):
    _fails(tmp_path, _cfg(fam, tokenizer_source="base", tokenizer={"source": "union"}), "set one of them, not both")
    _fails(tmp_path, _cfg(fam, tokenizer={"source": "union", "tokens": {"x": {"source": str(tmp_path / "other")}}}),
           r"tokenizer.tokens\['x'\].source: .*other' is not one of the merge's models")
    _fails(tmp_path, _cfg(fam, tokenizer={"tokens": {"x": {"source": {"kind": "model_token", "model": fam[1]}}}}),
           "give one of token and token_id")
    _fails(tmp_path, _cfg(fam, tokenizer={"pad_to_multiple_of": 0}), "pad_to_multiple_of: expected a positive")
    _fails(tmp_path, _cfg(fam, tokenizer={"source": "union", "extra": 1}), "tokenizer: expected a mapping of")
    _fails(tmp_path, _cfg(fam, tokenizer_source=str(tmp_path / "nowhere")), "cannot load its tokenizer")
    c = _cfg(fam, tokenizer_source="union", merge_method="tsv_m")
    c["models"] = c["models"][1:]
    _fails(tmp_path, c, "tokenizer_source: merge_method tsv_m works on same-shape stacks")


def test_rows_follow_the_tokens(fam, tmp_path):
    """union: every model's row for a token lands at the token's new id; a token one model lacks takes the one
    model's row that has it, else the base's; the LM head follows the same rows; config.json and the tokenizer
    get the new vocabulary."""
    out = str(tmp_path / "out")
    fastmerge.merge(_cfg(fam, tokenizer_source="union"), out, quiet=True)
    tok = json.load(open(os.path.join(out, "tokenizer.json")))
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    # the base's tokens, then each model's new ones in its id order (the same every run), then added tokens
    assert vocab == {**{t: i for i, t in enumerate(TOKS)}, "d": 6, "e": 7, "<t>": 8}
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == len(vocab)
    o, m = load_dir(out), [load_dir(p) for p in fam]
    ids = [{t: i for i, t in enumerate(TOKS)}, {t: i for i, t in enumerate(TOKS + ["d", "e"])},
           {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "c", "b", "a", "<t>"])}]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        for t, i in vocab.items():
            rows = [x[k][d[t]] if t in d else None for x, d in zip(m, ids, strict=True)]
            have = [r for r in rows if r is not None]
            fill = have[0] if len(have) == 1 else rows[0]  # the one model that has it, else the base
            want = sum(r if r is not None else fill for r in rows) / 3
            torch.testing.assert_close(o[k][i], want, rtol=1e-6, atol=1e-7)
