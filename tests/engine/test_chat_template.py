"""chat_template: the built-in formats render as their model families expect, bad values fail before
anything is written, and a template with nowhere to go is a warning (as in mergekit). Equality with mergekit for
``auto`` and raw Jinja is in tests/methods/test_mergekit_compat.py."""

from __future__ import annotations

import json
import os

import jinja2
import pytest
import torch
from _models import add_tokenizer, leftovers, make_llama_family

import fastmerge
from fastmerge.chat_templates import BUILTIN
from fastmerge.config import ConfigError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\n2+2?\n\n"
              "### Response:\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello![|endofturn|]\n[|user|]2+2?\n"
              "[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_their_format(name):
    # as transformers renders chat templates
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    got = env.from_string(BUILTIN[name]).render(messages=CHAT, add_generation_prompt=name != "mistral",
                                                bos_token="<s>", eos_token="</s>")
    assert got == EXPECTED[name]


def test_chat_template_written_and_checked(tmp_path):
    f = make_llama_family(str(tmp_path / "f"), layers=1, experts=1, dtype=torch.float32)
    add_tokenizer(f[0], "{{ 'old base template' }}", jinja_file=True)
    c = {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in f],
         "chat_template": "chatml"}
    out = str(tmp_path / "out")
    fastmerge.merge(c, out, quiet=True)
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["chat_template"] == BUILTIN["chatml"]
    assert open(os.path.join(out, "chat_template.jinja")).read() == BUILTIN["chatml"]  # transformers reads it first
    with pytest.warns(UserWarning, match="no tokenizer is written"):
        fastmerge.merge(c, str(tmp_path / "o2"), quiet=True, copy_tokenizer=False)
    with pytest.warns(UserWarning, match="auto, but no input model has a chat template"):
        fastmerge.merge({**c, "models": c["models"][1:], "chat_template": "auto"}, str(tmp_path / "o3"), quiet=True)
    for bad in ("chatmlx", "{short}", 42):
        with pytest.raises(ConfigError, match="chat_template: "):
            fastmerge.merge({**c, "chat_template": bad}, str(tmp_path / "o4"), quiet=True)
    assert not os.path.exists(tmp_path / "o4") and not leftovers(tmp_path)
