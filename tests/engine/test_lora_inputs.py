"""LoRA inputs (``model: MODEL+ADAPTER``): the adapter applied as the model's tensors are read, PEFT's maths
(fp32 factors, one rounding to the model's dtype), nothing written beside the inputs, bad adapters named before
anything is written. Equality with mergekit (which merges through PEFT) is in tests/methods/test_mergekit_compat."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _models import leftovers, load_dir, make_llama_family, make_lora
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.config import ConfigError
from fastmerge.io import CheckpointError


def _expected(model: str, adapter: str) -> dict[str, torch.Tensor]:
    """The model's tensors with the adapter applied, straight from the files (PEFT's merge, by hand)."""
    sd = load_dir(model)
    ad = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    for k, v in ad.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in k or k.endswith("lora_embedding_A"):
            emb = k.endswith("lora_embedding_A")
            mod = name.rsplit(".", 2 if not emb else 1)[0]
            b = ad[k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            r = next((x for p, x in cfg["rank_pattern"].items() if mod.endswith(p)), cfg["r"])
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
            d = b.float() @ v.float()
            w = sd[mod + ".weight"]
            sd[mod + ".weight"] = (w.float() + (d.T if emb else d) * s).to(w.dtype)
        elif "lora_" not in k:
            sd[name] = v.to(sd[name].dtype)
    return sd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adapter_applied_as_peft_merges_it(tmp_path, dtype):
    f = make_llama_family(str(tmp_path / "f"), layers=2, experts=1, dtype=dtype, hidden=96, inter=160)
    ad = make_lora(str(tmp_path / "ad"), f[1], ["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, alpha=8,
                   dtype=torch.bfloat16, use_rslora=dtype == torch.float32, rank_pattern={"down_proj": 2},
                   modules_to_save=["lm_head"])
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "out")
    fastmerge.merge({"merge_method": "passthrough", "models": [{"model": f"{f[1]}+{ad}"}]}, out, quiet=True)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["out"])  # no merged copy of the model anywhere
    got, want, plain = load_dir(out), _expected(f[1], ad), load_dir(f[1])
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == dtype and torch.equal(got[k], want[k]), k
    changed = [k for k in want if not torch.equal(want[k], plain[k])]
    assert len(changed) == 2 * 3 + 2  # q, v, down of both layers, embeddings, the head


def test_same_model_with_and_without_adapter_is_two_inputs(tmp_path):
    f = make_llama_family(str(tmp_path / "f"), layers=1, experts=1, dtype=torch.float32)
    ad = make_lora(str(tmp_path / "ad"), f[1], ["o_proj"])
    out = str(tmp_path / "out")
    fastmerge.merge({"merge_method": "task_arithmetic", "base_model": f[1],
                     "models": [{"model": f"{f[1]}+{ad}", "parameters": {"weight": 1.0}}]}, out, quiet=True)
    got, want, base = load_dir(out), _expected(f[1], ad), load_dir(f[1])
    k = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def _fails(tmp_path, model, match):
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ConfigError), match=match):
        fastmerge.merge({"merge_method": "passthrough", "models": [{"model": model}]}, str(out), quiet=True)
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_adapters_are_named(tmp_path):
    f = make_llama_family(str(tmp_path / "f"), layers=1, experts=1, dtype=torch.float32)
    ad = make_lora(str(tmp_path / "ad"), f[1], ["q_proj"])
    _fails(tmp_path, f"{f[1]}+{tmp_path / 'nope'}", "LoRA adapter .*nope does not exist")
    _fails(tmp_path, f"{f[1]}+{ad}+{ad}", "expected MODEL or MODEL\\+LORA_ADAPTER")
    cfg_path = os.path.join(ad, "adapter_config.json")
    good = json.load(open(cfg_path))
    for change, match in (({"use_dora": True}, "DoRA adapters"), ({"r": 0}, "r must be a positive number"),
                          ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported")):
        json.dump({**good, **change}, open(cfg_path, "w"))
        _fails(tmp_path, f"{f[1]}+{ad}", match)
    json.dump(good, open(cfg_path, "w"))
    wpath = os.path.join(ad, "adapter_model.safetensors")
    w = load_file(wpath)
    k = next(k for k in w if "lora_A" in k)
    for bad, match in (({**w, k: w[k][:, :-1].contiguous()}, "do not fit"),
                       ({x: v for x, v in w.items() if x != k}, "has lora_B but not its other factor"),
                       ({**w, k.replace("q_proj", "zz_proj"): w[k].clone(),
                         k.replace("q_proj", "zz_proj").replace("lora_A", "lora_B"):
                             w[k.replace("lora_A", "lora_B")].clone()},
                        "targets .*zz_proj.weight', which the model lacks")):
        save_file(bad, wpath)
        _fails(tmp_path, f"{f[1]}+{ad}", match)
    os.remove(wpath)
    _fails(tmp_path, f"{f[1]}+{ad}", "is not a PEFT LoRA adapter folder")
