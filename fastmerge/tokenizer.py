"""The output tokenizer (mergekit's ``tokenizer_source:`` / ``tokenizer:``) and the embedding rows that follow it.

With either key set, the output's vocabulary is the base model's (``base``; the base is the first model when the
config has none), another model's (a path), or the union of every input's (``union``: the base's tokens in their
order, then each model's new tokens in config and id order, then their added tokens; mergekit takes the new tokens
in hash order, which changes from run to run when a model brings several), plus the ``tokens:`` the config names.

Every vocabulary-indexed tensor (input embeddings, LM head) of every input is then re-indexed by token before it
is merged. A token the model has takes its row; a token it lacks takes a default row: the row of the one model
that has it, else the base's, else the mean over the models that have it (summed in the tensor's dtype, as
mergekit does), or what ``tokens:`` says (``source``: a model's row for the token, ``{kind: model_token, model,
token | token_id}``, ``{kind: zero}``; ``force`` uses it even where a model has the token).
``pad_to_multiple_of`` pads the rows with their mean. config.json gets the new ``vocab_size``; the tokenizer is
written with transformers' ``save_pretrained``. transformers is imported only here, only when a config asks for a
tokenizer.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, MergeConfig, TokenizerSpec
from .io import read_model_config
from .peers import checkout_off_path

# tensors indexed by token along dim 0: input embeddings and LM heads
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|word_embeddings|tok_embeddings|lm_head|embed_out)"
                          r"\.weight$")


def _vocab_size(path: str) -> int | None:
    v = (read_model_config(path) or {}).get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _load(path: str, label: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # transformers raises many kinds; the message names the model
        raise ConfigError(f"{label}: cannot load its tokenizer from {path} ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None


def _stripped(tok, path: str, label: str):
    """The tokenizer without the tokens whose id is past the model's vocab_size (BPE tokenizers only)."""
    size = _vocab_size(path) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    import tokenizers

    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ConfigError(f"{label}: its tokenizer has {len(unused)} tokens past vocab_size {size} and is "
                          f"{d['model']['type']}, not BPE: it cannot be trimmed for a tokenizer merge")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok, toks: list[tuple[Any, int]]):
    """The base tokenizer with every model's new tokens added after its own, then the added tokens."""
    import tempfile

    import transformers

    vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in toks:  # in id order (mergekit walks get_vocab()'s hash order: ids differ run to run)
        dec = tok.added_tokens_decoder
        names = {info.content for info in dec.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in names:
                vocab.setdefault(t)
        for i, info in sorted(dec.items()):
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as p:  # a copy: the base tokenizer stays as it is
        base_tok.save_pretrained(p)
        out = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
    have = base_tok.get_vocab()
    for t in vocab:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class Vocabulary:
    """The output tokenizer and how every input model's rows map onto it."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int                                   # rows of the output (vocab padded to pad_to_multiple_of)
    perm: dict[int, torch.Tensor]               # model index -> (len(vocab),) its row per output id, or -1
    original: dict[int, dict[str, int]]         # model index -> its own vocabulary
    spec: TokenizerSpec
    base: int

    def save(self, directory: str) -> None:
        with checkout_off_path():
            self.tokenizer.save_pretrained(directory)

    def permute(self, name: str, inputs: tuple[int, ...], base_index: int | None,
                tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every input's rows of ``name`` re-indexed to the output vocabulary (PermutedVocabulary's rules)."""
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        n, row, dev = len(self.vocab), tuple(tensors[0].shape[1:]), tensors[0].device
        perms = [self.perm[m].to(dev) for m in inputs]
        present = torch.stack([p >= 0 for p in perms])            # (models, vocab)
        forced = torch.zeros(n, dtype=torch.bool, device=dev)
        for tok, (_, force) in self.spec.tokens.items():
            if force and tok in self.vocab:
                forced[self.vocab[tok]] = True
        base = inputs[base_index] if base_index is not None else None
        defaults: dict[int, torch.Tensor] = {}
        need = (~present.all(0)) | forced
        ids = {i: t for t, i in self.vocab.items()}
        for tid in need.nonzero().flatten().tolist():
            tok = ids[tid]
            cfg = self.spec.tokens.get(tok)
            if cfg is not None:  # configured: its source, whatever the models have
                defaults[tid] = self._configured(name, tok, tid, cfg[0], inputs, tensors)
                continue
            has = present[:, tid]
            k = int(has.sum())
            bj = inputs.index(base) if base is not None else None
            if k == 1 or (k > 1 and bj is not None and bool(has[bj])):  # the one model that has it, or the base
                j = int(has.nonzero()[0]) if k == 1 else bj
                defaults[tid] = tensors[j][int(perms[j][tid])]
            elif k == 0:
                warnings.warn(f"{name}: token {tok!r} is in no model; its row is zero", stacklevel=3)
                defaults[tid] = torch.zeros(row, dtype=dtype, device=dev)
            else:  # the mean, summed in the models' order and dtype as mergekit does
                e = torch.zeros(row, dtype=dtype, device=dev)
                for j in range(len(inputs)):
                    if has[j]:
                        e = e + tensors[j][int(perms[j][tid])]
                e /= k
                defaults[tid] = e
        out = []
        for t, p in zip(tensors, perms, strict=True):
            new = torch.zeros((self.size, *row), dtype=dtype, device=dev)
            take = (p >= 0) & ~forced
            idx = take.nonzero().flatten()
            new[idx] = t[p[idx]].to(dtype)
            for tid, e in defaults.items():
                if not take[tid]:
                    new[tid] = e
            if self.size > n:
                new[n:] = torch.mean(new[:n], dim=0)
            out.append(new)
        return out

    def _configured(self, name: str, tok: str, tid: int, src: tuple | None, inputs: tuple[int, ...],
                    tensors: list[torch.Tensor]) -> torch.Tensor:
        if src is None:
            raise ValueError(f"tokenizer.tokens[{tok!r}]: needs a source for tensor {name!r}")
        kind, model, token_id, token = src
        if kind == "zero":
            return tensors[0].new_zeros(tensors[0].shape[1:])
        if model not in inputs:
            raise ValueError(f"tokenizer.tokens[{tok!r}]: the source model is not an input of {name!r}")
        t = tensors[inputs.index(model)]
        if kind == "model_token":
            if token_id is None:
                if token not in self.original[model]:
                    raise ValueError(f"tokenizer.tokens[{tok!r}]: token {token!r} is not in the source model")
                token_id = self.original[model][token]
            if not 0 <= token_id < t.shape[0]:
                raise ValueError(f"tokenizer.tokens[{tok!r}]: token_id {token_id} is out of range for {name!r}")
            return t[token_id]
        p = int(self.perm[model][tid])
        if p < 0:
            raise ValueError(f"tokenizer.tokens[{tok!r}]: the source model lacks this token")
        return t[p]


def build(cfg: MergeConfig, spec: TokenizerSpec) -> Vocabulary:
    """The output tokenizer and every model's permutation, from the tokenizer files alone (plan time)."""
    with checkout_off_path():
        return _build(cfg, spec)


def _build(cfg: MergeConfig, spec: TokenizerSpec) -> Vocabulary:
    models = cfg.models
    bi = cfg.models.index(cfg.base) if cfg.base is not None else 0
    base_tok = _stripped(_load(models[bi].path, models[bi].label), models[bi].path, models[bi].label)
    toks = {bi: base_tok}
    for i, m in enumerate(models):
        if i != bi:
            toks[i] = _load(m.path, m.label)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        ordered = [bi] + [i for i in range(len(models)) if i != bi]
        out = _union(base_tok, [(toks[i], _vocab_size(models[i].path) or toks[i].vocab_size) for i in ordered])
    else:
        out = _load(spec.source, f"tokenizer source {spec.source}")
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    perm, original = {}, {}
    for i, m in enumerate(models):
        mv = toks[i].get_vocab()
        original[i] = mv
        size = _vocab_size(m.path) or len(mv)
        p = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, new in vocab.items():
            old = mv.get(t)
            if old is not None and old < size:
                p[new] = old
        perm[i] = p
    n = len(vocab)
    size = n if not spec.pad_to_multiple_of or n % spec.pad_to_multiple_of == 0 else \
        (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    return Vocabulary(out, vocab, size, perm, original, spec, bi)
