"""Generated Llama-shaped checkpoints on disk (HF directories mergekit and transformers accept), for the
engine's tests and benchmarks. No transformers import: tensors are written with safetensors directly."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def llama_config(hidden: int, layers: int, vocab: int, inter: int | None = None, dtype: str = "bfloat16") -> dict:
    heads = max(1, hidden // 64)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter or (hidden * 4 if hidden < 512 else int(hidden * 2.6875)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "hidden_act": "silu",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def save_hf(path: str, tensors: dict[str, torch.Tensor], cfg: dict | None = None, shard_bytes: int | None = None,
            extra_files: dict[str, str] | None = None) -> str:
    """An HF directory: model.safetensors, or shards of about ``shard_bytes`` + model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    if cfg is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    if shard_bytes is None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nb
    weight_map = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                   "weight_map": weight_map}, f)
    return path


def make_llama_family(root: str, *, hidden: int = 64, layers: int = 2, vocab: int = 256, experts: int = 2,
                      dtype: torch.dtype = torch.bfloat16, noise: float = 0.01, seed: int = 0,
                      shard_bytes: int | list[int | None] | None = None, inter: int | None = None) -> list[str]:
    """Write base + ``experts`` fine-tunes (base + noise * N(0, 1)) as HF dirs; returns [base, ft0, ft1, ...].

    shard_bytes: one value for every model, or one per model (mixed shard layouts)."""
    dname = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    cfg = llama_config(hidden, layers, vocab, inter, dname)
    shapes = llama_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
    for k in base:
        if k.endswith("norm.weight"):
            base[k] = (1.0 + 0.1 * torch.randn(base[k].shape, generator=g)).to(dtype)
    layouts = shard_bytes if isinstance(shard_bytes, list) else [shard_bytes] * (experts + 1)
    tok = {"tokenizer_config.json": json.dumps({"model_max_length": 512}),
           "generation_config.json": json.dumps({"do_sample": False})}
    paths = [save_hf(os.path.join(root, "base"), base, cfg, layouts[0], tok)]
    for e in range(experts):
        ge = torch.Generator().manual_seed(100 + e + seed)
        sd = {k: (v.float() + noise * torch.randn(v.shape, generator=ge)).to(dtype) for k, v in base.items()}
        paths.append(save_hf(os.path.join(root, f"ft{e}"), sd, cfg, layouts[e + 1]))
    return paths


def shared_task_vectors(m: int, n: int, tasks: int, shared: float, *, seed: int = 0, rank: int = 16,
                        shared_rank: int = 8, noise: float = 0.05) -> torch.Tensor:
    """(tasks, m, n) fp32 task vectors as fine-tunes of one model have them: per-expert low rank + a component
    every expert shares (``shared`` times as strong) + noise. Strong sharing makes the top singular vectors of
    all tasks nearly equal, so TSV-M's packed singular vectors are ill-conditioned (1e5-1e7) and the sum of the
    tasks has a large condition number: the regime where a Gram-based polar factor loses digits."""
    g = torch.Generator().manual_seed(seed)
    scale = (m * n) ** 0.25
    common = shared * (torch.randn(m, shared_rank, generator=g) @ torch.randn(shared_rank, n, generator=g)) / scale
    out = [3 * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / scale + common
           + noise * torch.randn(m, n, generator=g) for _ in range(tasks)]
    return torch.stack(out) * 1e-3


def cfg(method, fam, mp=None, gp=None, extra=None, base=True, n=None, **top):
    """A merge config dict: ``method`` over ``fam`` = [base, expert, ...] (the first n experts), per-model
    parameters ``mp``, global parameters ``gp``, ``fastmerge:`` settings ``extra``, other top-level keys."""
    c = {"merge_method": method,
         "models": [{"model": m, "parameters": dict(mp or {})} for m in fam[1:1 + (n or len(fam) - 1)]]}
    if base:
        c["base_model"] = fam[0]
    if gp:
        c["parameters"] = gp
    if extra:
        c["fastmerge"] = extra
    c.update(top)
    return c


def leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".")]


def load_dir(d: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF output dir; checks the shard index (if any) against the shards' contents."""
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert files, f"no .safetensors in {d}: {os.listdir(d)}"
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for fname in files:
        with safe_open(os.path.join(d, fname), "pt") as s:
            for k in s.keys():  # safe_open is not a Mapping
                assert k not in out, f"{k} in both {where[k]} and {fname}"
                out[k], where[k] = s.get_tensor(k), fname
    idx = os.path.join(d, "model.safetensors.index.json")
    if len(files) > 1 or os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        assert wm == where, f"{d}: index.json weight_map disagrees with the shards"
    return out


def make_lora(path: str, model: str, modules: list[str], *, r: int = 4, alpha: float = 8, dtype=torch.float32,
              seed: int = 0, use_rslora: bool = False, rank_pattern: dict | None = None,
              alpha_pattern: dict | None = None, modules_to_save: list[str] | None = None) -> str:
    """A PEFT LoRA adapter folder for the model at ``model`` (as ``LoraModel.save_pretrained`` writes one):
    lora_A/lora_B of the Linear layers whose name ends with one of ``modules`` (lora_embedding_A/B for
    ``embed_tokens``), full copies of the ``modules_to_save`` weights; B is random too, so every delta is
    non-zero. Ranks follow ``rank_pattern``."""
    sd = load_dir(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in sd.items():
        if not name.endswith(".weight") or w.dim() != 2:
            continue
        mod = name[: -len(".weight")]
        if not any(mod.split(".")[-1] == m for m in modules):
            continue
        rank = next((v for k, v in (rank_pattern or {}).items() if mod.endswith(k)), r)
        key = "base_model.model." + mod
        if mod.endswith("embed_tokens"):
            out[key + ".lora_embedding_A"] = (0.1 * torch.randn(rank, w.shape[0], generator=g)).to(dtype)
            out[key + ".lora_embedding_B"] = (0.1 * torch.randn(w.shape[1], rank, generator=g)).to(dtype)
        else:
            out[key + ".lora_A.weight"] = (0.1 * torch.randn(rank, w.shape[1], generator=g)).to(dtype)
            out[key + ".lora_B.weight"] = (0.1 * torch.randn(w.shape[0], rank, generator=g)).to(dtype)
    for m in modules_to_save or []:
        out[f"base_model.model.{m}.weight"] = (sd[f"{m}.weight"].float() + 0.01).to(sd[f"{m}.weight"].dtype)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model, "r": r,
           "lora_alpha": alpha, "target_modules": modules, "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": use_rslora, "rank_pattern": rank_pattern or {},
           "alpha_pattern": alpha_pattern or {}, "modules_to_save": modules_to_save, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


TOKENS = ["<unk>", "<s>", "</s>", "hello", "world", "<|im_start|>", "<|im_end|>"]


def add_tokenizer(model: str, template: str | None = None, jinja_file: bool = False, tokens: list[str] | None = None,
                  added: list[str] | None = None) -> None:
    """A small real tokenizer (a WordLevel tokenizer.json that transformers loads) in a model folder: ``tokens``
    in order, then the ``added`` tokens; ``template`` as its chat template, in tokenizer_config.json or
    (``jinja_file``) in chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens or TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if added:
        tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    tok.save(os.path.join(model, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 512}
    if template is not None and not jinja_file:
        cfg["chat_template"] = template
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    if template is not None and jinja_file:
        with open(os.path.join(model, "chat_template.jinja"), "w") as f:
            f.write(template)


def set_vocab(model: str, tokens: list[str], added: list[str] = (), rows: int | None = None, seed: int = 0) -> None:
    """Give a generated Llama-shaped model its own tokenizer (``tokens``, then ``added``) and embedding / LM-head
    rows to match (``rows``, default one per token; more rows are padding), config.json's vocab_size too."""
    sd = load_dir(model)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    n = rows or len(tokens) + len(added)
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = (0.02 * torch.randn(n, sd[k].shape[1], generator=g)).to(sd[k].dtype)
    cfg["vocab_size"] = n
    for f in os.listdir(model):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(model, f))
    save_hf(model, sd, cfg)
    add_tokenizer(model, tokens=tokens, added=list(added))
