"""Merge configurations: mergekit's YAML (``models:`` or ``slices:`` form), validated strictly, resolved per tensor.

A config names a ``merge_method``, an optional ``base_model``, the ``models`` with per-model ``parameters``,
global ``parameters``, ``dtype`` (inputs are cast to it, as mergekit does) and ``out_dtype``. A parameter
value is a scalar, a list (a gradient over the layer index, interpolated as mergekit does), or a list of
``{filter: substring-of-tensor-name, value: ...}`` conditions (the first match wins; no filter matches all).
Per-model settings fall back to the global ``parameters``.

``slices:`` (mergekit's layer-slice form) builds the output's layers slice by slice: each slice lists
``sources`` (a model, a ``layer_range: [start, stop)`` and per-source ``parameters``), an optional
``base_model`` and ``parameters``; all its sources span the same number of layers, which are merged pairwise and
renumbered after the previous slices' layers. Parameters resolve source, then slice, then global; gradients run
over each slice's layers. The tensors outside the layers come from the first slice's sources (embeddings) or the
last slice's (norm, head), as in mergekit. The ``models:`` form is the one slice of every model's layers.

``chat_template`` (``auto``, a built-in format name or Jinja) goes into the output's tokenizer files
(fastmerge.chat_templates). A model reference ``MODEL+ADAPTER`` is a model with a PEFT LoRA adapter applied as
its tensors are read (fastmerge.lora).

fastmerge-only settings live under a top-level ``fastmerge:`` mapping, which mergekit ignores:
``compat`` (whose semantics: mergekit by default, or official/fusionbench/peft), ``trim`` (``tensor`` or
``global`` magnitude trimming), ``backend`` (force a kernel backend), ``tasks`` (names of the tasks in a
multi-task store), ``extra_tensors`` (``error``, the default, or ``ignore``: tensors a model has and the base
lacks) and,
for the subspace methods, ``svd`` (exact, fast or randomized), ``svd_oversample``, ``svd_power_iters`` and
``exclude_keys`` (see fastmerge.methods.subspace).
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import chat_templates
from .env import BACKENDS

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "fastmerge", "name")
UNSUPPORTED_KEYS = {
}
OPTIONAL_KEYS = ("tokenizer", "tokenizer_source", "chat_template")  # null: a warning, as mergekit ignores it
FASTMERGE_KEYS = {
    "compat": ("mergekit", "official", "fusionbench", "peft"),
    "trim": ("tensor", "global"),
    "backend": ("auto", *BACKENDS),
    "tasks": None,
    "extra_tensors": ("error", "ignore"),
    "svd": ("exact", "fast", "randomized"),
    "svd_oversample": None,
    "svd_power_iters": None,
    "exclude_keys": None,
    "doge_layers": ("auto", "official", "blocks"),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")


class ConfigError(ValueError):
    """The merge configuration is invalid; the message says where and what was expected."""


def parse_dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"{where}: unknown dtype {name!r}; expected one of float32, float16, bfloat16") from None


@dataclass(frozen=True)
class InputModel:
    path: str
    parameters: dict[str, Any]
    label: str
    lora: str | None = None           # a PEFT LoRA adapter folder applied to the model (``model: PATH+ADAPTER``)

    @property
    def key(self) -> tuple[str, str | None]:
        return self.path, self.lora


@dataclass(frozen=True)
class SliceSource:
    model: int                        # index into MergeConfig.models
    start: int                        # layer_range [start, stop)
    stop: int
    parameters: dict[str, Any]


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base: int | None                  # index into MergeConfig.models: the slice's base_model, else the config's
    parameters: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return self.sources[0].stop - self.sources[0].start


@dataclass(frozen=True)
class TokenizerSpec:
    """``tokenizer_source:`` or the ``tokenizer:`` section (fastmerge.tokenizer)."""

    source: str                       # "base", "union" or a model folder
    tokens: dict[str, tuple[tuple | None, bool]]   # token -> ((kind, model index, token_id, token) | None, force)
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig:
    method: str
    base: InputModel | None
    models: list[InputModel]          # every input in order; the base is one of them (appended if not listed)
    parameters: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    options: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    slices: tuple[OutputSlice, ...] | None = None   # the ``slices:`` form; models then holds each model once
    chat_template: str | None = None                # ``auto``, a built-in name or Jinja (fastmerge.chat_templates)
    tokenizer: TokenizerSpec | None = None          # the output tokenizer, when the config builds one
    module_parameters: dict[str, Any] = field(default_factory=dict)  # a one-module ``modules:`` config's

    @property
    def experts(self) -> list[InputModel]:
        return [m for m in self.models if m is not self.base]


MAX_CONFIG_BYTES = 1 << 20  # a merge config is a few KB; anything near this is not one
MAX_DEPTH = 64               # nesting of mappings and lists
MAX_VALUES = 100_000         # values after YAML aliases are expanded (an alias "bomb" of 1 KB expands to GBs)


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load with a bound on nesting, so a hostile config fails here and not in a recursion."""

        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise ConfigError(f"config nests deeper than {MAX_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


def _check_size(data: Any) -> None:
    """Count the values of a loaded config, aliases expanded, and stop at MAX_VALUES (iteratively: a
    self-referencing alias would otherwise loop)."""
    stack, n = [data], 0
    while stack:
        x = stack.pop()
        n += 1
        if n > MAX_VALUES:
            raise ConfigError(f"config expands to more than {MAX_VALUES} values (YAML aliases repeating a large "
                              "value?): not a merge config")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str) and len(x) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config has a string of {len(x)} characters: not a merge config")


def _load_yaml(source: str | os.PathLike | dict) -> tuple[dict, str]:
    if isinstance(source, dict):
        _check_size(source)
        return copy.deepcopy(source), os.getcwd()
    import yaml

    text, root = str(source), os.getcwd()
    if "\n" not in text and os.path.exists(text):
        if os.path.getsize(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {text} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a merge config")
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {source}: cannot read it ({e})") from None
        root = os.path.dirname(os.path.abspath(str(source)))
    elif "\n" not in text and (text.endswith((".yml", ".yaml")) or ":" not in text):
        raise ConfigError(f"config file {text} not found")  # one line and no mapping: meant as a path
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a merge config")
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError("config nests too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a YAML mapping, got {type(data).__name__}")
    _check_size(data)
    return data, root


def _check_setting(setting: Any, where: str) -> None:
    """A scalar, a gradient (list of scalars) or conditions ({filter, value} mappings)."""
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}: a condition must be a mapping {{filter: ..., value: ...}}, got {cond!r}")
            _check_setting(cond["value"], where)
        return
    raise ConfigError(f"{where}: expected a number, a list (gradient) or [{{filter, value}}...], got {setting!r}")


def load(source: str | os.PathLike | dict) -> MergeConfig:
    """Parse and validate a config (a YAML path, YAML text or a dict).

    Relative model paths resolve against the working directory, as in mergekit, or, when nothing is there,
    against the config file's folder."""
    data, root = _load_yaml(source)
    for key in [k for k, v in data.items() if v is None and k in (*UNSUPPORTED_KEYS, *OPTIONAL_KEYS)]:
        warnings.warn(f"config key {key!r} is null: ignored, as mergekit does", stacklevel=2)
        del data[key]
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise ConfigError(f"config key {key!r}: {UNSUPPORTED_KEYS[key]}")
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown config key {key!r}; expected one of {', '.join(TOP_KEYS)}")
    if not isinstance(data.get("name", ""), str):
        raise ConfigError(f"name: expected a string, got {type(data['name']).__name__}")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("config needs 'merge_method' (a method name)")
    raw, data = data, dict(data)  # the config as given stays the record's
    module_params = _lift_module(data)
    models_raw, slices_raw = data.get("models"), data.get("slices")
    if (models_raw is None) == (slices_raw is None):
        raise ConfigError("config needs exactly one of 'models:' (whole models) and 'slices:' (layer ranges)")

    def one(p: str) -> str:
        p = os.path.expanduser(p)
        if os.path.isabs(p) or os.path.exists(p) or root == os.getcwd():
            return os.path.abspath(p)  # as mergekit: relative to the working directory
        return os.path.normpath(os.path.join(root, p))  # else relative to the config file's folder

    def resolve(p: Any, where: str) -> tuple[str, str | None]:
        """A model reference: a path, or mergekit's ``MODEL+LORA`` (unless a path of that name exists)."""
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{where}: expected a model path, got {p!r}")
        if "+" in p and not os.path.exists(one(p)):
            parts = p.split("+")
            if len(parts) != 2 or not all(parts):
                raise ConfigError(f"{where}: expected MODEL or MODEL+LORA_ADAPTER, got {p!r}")
            return one(parts[0]), one(parts[1])
        return one(p), None

    models: list[InputModel] = []
    slices = None
    if models_raw is not None:
        if not isinstance(models_raw, list) or not models_raw:
            raise ConfigError("config needs 'models:', a non-empty list of {model: PATH, parameters: {...}}")
        for i, m in enumerate(models_raw):
            where = f"models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m:
                raise ConfigError(f"{where}: expected a mapping with 'model:', got {m!r}")
            extra = set(m) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; expected 'model' and 'parameters'")
            path, lora = resolve(m["model"], where)
            models.append(InputModel(path, params_of(m, where), str(m["model"]), lora))
    else:
        slices = _parse_slices(slices_raw, models, resolve)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"parameters: expected a mapping, got {params!r}")
    for k, v in params.items():
        _check_setting(v, f"parameters.{k}")

    base = None
    if data.get("base_model") is not None:
        bkey = resolve(data["base_model"], "base_model")
        base = next((m for m in models if m.key == bkey), None)
        if base is None:
            base = InputModel(bkey[0], {}, str(data["base_model"]), bkey[1])
            models.append(base)
    if slices is not None:
        bi = None if base is None else models.index(base)
        slices = tuple(OutputSlice(s.sources, bi if s.base is None else s.base, s.parameters) for s in slices)
    keys = [m.key for m in models]
    dup = None if slices is not None else next((m for m in models if keys.count(m.key) > 1), None)
    if dup:
        raise ConfigError(f"model {dup.label} is listed more than once")
    ct = data.get("chat_template")
    if ct is not None and (why := chat_templates.check(ct)):
        raise ConfigError(why)
    tokenizer = _parse_tokenizer(data, models, resolve)

    options = data.get("fastmerge") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"fastmerge: expected a mapping of fastmerge settings, got {options!r}")
    for k, v in options.items():
        if k not in FASTMERGE_KEYS:
            raise ConfigError(f"fastmerge.{k}: unknown setting; expected one of {', '.join(FASTMERGE_KEYS)}")
        allowed = FASTMERGE_KEYS[k]
        if allowed and v not in allowed:
            raise ConfigError(f"fastmerge.{k}: expected one of {', '.join(allowed)}, got {v!r}")
    cfg = MergeConfig(method, base, models, dict(params), parse_dtype(data.get("dtype"), "dtype"),
                      parse_dtype(data.get("out_dtype"), "out_dtype"), dict(options), raw, slices, ct, tokenizer,
                      module_params)
    return cfg


def _lift_module(data: dict) -> dict[str, Any]:
    """mergekit's ``modules:`` form with one module (a one-module architecture's name, e.g. ``default``): its
    ``models:`` or ``slices:`` become the config's, its ``parameters`` rank between a slice's and the global
    ones (returned). mergekit's own run_merge leaves a config in this form. Several modules are an error."""
    mods = data.pop("modules", None)
    if mods is None:
        return {}
    if not isinstance(mods, dict) or len(mods) != 1:
        got = list(mods) if isinstance(mods, dict) else mods
        raise ConfigError("config key 'modules': only one module is supported (a model of several modules, such "
                          f"as a vision-language model, is not), got {got!r}")
    ((name, mdef),) = mods.items()
    where = f"modules.{name}"
    if not isinstance(mdef, dict) or set(mdef) - {"slices", "models", "parameters", "name"}:
        raise ConfigError(f"{where}: expected a mapping of models or slices, and parameters")
    for key in ("models", "slices"):
        if mdef.get(key) is not None:
            if data.get("models") is not None or data.get("slices") is not None:
                raise ConfigError("config needs exactly one of 'models:', 'slices:' and 'modules:'")
            data[key] = mdef[key]
    return params_of(mdef, where)


def params_of(m: dict, where: str) -> dict:
    """A mapping's ``parameters:``, each setting checked."""
    params = m.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.parameters: expected a mapping, got {params!r}")
    for k, v in params.items():
        _check_setting(v, f"{where}.parameters.{k}")
    return dict(params)


def _parse_tokenizer(data: dict, models: list[InputModel], resolve) -> TokenizerSpec | None:
    """``tokenizer_source`` (base, union or a model) or the ``tokenizer:`` section (source, tokens,
    pad_to_multiple_of), as mergekit reads them; a token's source model must be one of the merge's models."""
    ts, sec = data.get("tokenizer_source"), data.get("tokenizer")
    if ts is not None and sec is not None:
        raise ConfigError("tokenizer_source and tokenizer: set one of them, not both")
    if ts is None and sec is None:
        return None

    def source(v: Any, where: str) -> str:
        if v in ("base", "union"):
            return v
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}: expected base, union or a model path, got {v!r}")
        path, lora = resolve(v.removeprefix("model:"), where)
        if lora is not None:
            raise ConfigError(f"{where}: a tokenizer comes from a model folder, not MODEL+LORA ({v!r})")
        return path

    def model_index(v: Any, where: str) -> int:
        key = resolve(v, where)
        for i, m in enumerate(models):
            if m.key == key:
                return i
        raise ConfigError(f"{where}: {v!r} is not one of the merge's models")

    if ts is not None:
        return TokenizerSpec(source(ts, "tokenizer_source"), {})
    if not isinstance(sec, dict) or set(sec) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ConfigError("tokenizer: expected a mapping of source, tokens, pad_to_multiple_of")
    pad = sec.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = {}
    raw = sec.get("tokens") or {}
    if not isinstance(raw, dict):
        raise ConfigError("tokenizer.tokens: expected a mapping of token -> {source, force}")
    for tok, tc in raw.items():
        where = f"tokenizer.tokens[{tok!r}]"
        tc = {} if tc is None else tc
        if not isinstance(tok, str) or not isinstance(tc, dict) or set(tc) - {"source", "force"}:
            raise ConfigError(f"{where}: expected a token string mapped to {{source, force}}")
        force = tc.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
        src = tc.get("source")
        if src is None:
            parsed = None
        elif isinstance(src, str):
            parsed = ("model", model_index(src, f"{where}.source"), None, None)
        elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
            parsed = ("zero", None, None, None)
        elif isinstance(src, dict) and src.get("kind") == "model_token" and set(src) <= {"kind", "model", "token",
                                                                                        "token_id"}:
            tid, t = src.get("token_id"), src.get("token")
            if (tid is None) == (t is None):
                raise ConfigError(f"{where}.source: give one of token and token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
                raise ConfigError(f"{where}.source.token_id: expected an integer, got {tid!r}")
            parsed = ("model_token", model_index(src.get("model"), f"{where}.source.model"), tid, t)
        else:
            raise ConfigError(f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, model, "
                              f"token | token_id}}, got {src!r}")
        tokens[tok] = (parsed, force)
    return TokenizerSpec(source(sec.get("source", "union"), "tokenizer.source"), tokens, pad)


def _parse_slices(raw: Any, models: list[InputModel], resolve) -> list[OutputSlice]:
    """``slices:`` into OutputSlices whose sources index ``models`` (each distinct model appended once); a
    slice's own base_model is resolved here, the config's is filled in by the caller."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices: expected a non-empty list of {sources: [...], base_model?, parameters?}")

    def index(key: tuple[str, str | None], label: str) -> int:
        for i, m in enumerate(models):
            if m.key == key:
                return i
        models.append(InputModel(key[0], {}, label, key[1]))
        return len(models) - 1

    out = []
    for i, sl in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{where}: expected a mapping with 'sources:', a non-empty list")
        extra = set(sl) - {"sources", "base_model", "parameters", "residual_weight"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; expected sources, base_model, parameters")
        if sl.get("residual_weight") is not None:
            warnings.warn(f"{where}.residual_weight: ignored, as mergekit does", stacklevel=3)
        sources = []
        for j, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{w}: expected a mapping with 'model:' and 'layer_range: [start, stop]'")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"{w}: unknown key(s) {sorted(extra)}; expected model, layer_range, parameters")
            lr = src["layer_range"]
            if (not isinstance(lr, list) or len(lr) != 2 or any(isinstance(x, bool) or not isinstance(x, int)
                                                                 for x in lr) or not 0 <= lr[0] <= lr[1]):
                raise ConfigError(f"{w}.layer_range: expected [start, stop] with 0 <= start <= stop, got {lr!r}")
            mi = index(resolve(src["model"], w), str(src["model"]))
            if any(s.model == mi for s in sources):
                raise ConfigError(f"{w}: model {src['model']} is listed twice in this slice")
            sources.append(SliceSource(mi, lr[0], lr[1], params_of(src, w)))
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) > 1:
            raise ConfigError(f"{where}: every source must span the same number of layers, got "
                              f"{[[s.start, s.stop] for s in sources]}")
        base = None
        if sl.get("base_model") is not None:
            base = index(resolve(sl["base_model"], f"{where}.base_model"), str(sl["base_model"]))
        out.append(OutputSlice(tuple(sources), base, params_of(sl, where)))
    return out


# ---------------------------------------------------------------------------------------------------------
# per-tensor resolution (mergekit's rules)


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # a config.json's layer count


def out_layers(cfg: MergeConfig) -> list[tuple[int, int]]:
    """A ``slices:`` merge's output layers in order, each as (model index, layer) of its slice's first source."""
    return [(sl.sources[0].model, sl.sources[0].start + i) for sl in cfg.slices for i in range(sl.num_layers)]


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_t(name: str, num_layers: int) -> float:
    """mergekit's gradient position: i/(L-1) for the i-th block's tensors (1 when L == 1), 0 elsewhere."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def _coerce(value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if math.isnan(v):
            raise ConfigError(f"{where}: NaN is not a valid value")
        return int(v) if kind is int else v
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def evaluate(setting: Any, tensor: str, t: float, kind: type, where: str) -> Any:
    """A setting's value for one tensor: filters first match, gradients interpolated at t. None: no match."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            vals = [_coerce(e, kind, where) for e in setting]
            if kind not in (int, float):
                return vals[int(t * (len(vals) - 1))]
            x = t * (len(vals) - 1)
            i0 = int(x)
            i1 = min(len(vals) - 1, i0 + 1)
            f = x - i0
            return _coerce((1 - f) * vals[i0] + f * vals[i1], kind, where)
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor and str(flt) in tensor):
                return evaluate(cond["value"], tensor, t, kind, where)
        return None
    return _coerce(setting, kind, where)
