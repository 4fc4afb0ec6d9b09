"""``chat_template:`` (mergekit's key): the chat template a merged model's tokenizer gets.

``auto`` takes the template most of the input models carry (their ``chat_template.jinja``, else the
``chat_template`` of their tokenizer_config.json; the first in config order among equals); a name below takes
fastmerge's own rendering of that standard format; any other value with a ``{`` and at least 20 characters is
taken as Jinja. The template is written into the output's tokenizer_config.json (and its chat_template.jinja,
which transformers reads first, when the copied tokenizer has one).
"""

from __future__ import annotations

import json
import os
from collections import Counter

BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token"
        " + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"),
    "exaone": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


def check(value, where: str = "chat_template") -> str | None:
    """The config's value, or the one-line error for it."""
    if not isinstance(value, str):
        return f"{where}: expected auto, a template name or a Jinja template, got {value!r}"
    if value == "auto" or value in BUILTIN or (len(value) >= 20 and "{" in value):
        return None
    return (f"{where}: {value!r} is neither auto, a built-in template ({', '.join(BUILTIN)}) nor a Jinja "
            "template")


def model_template(path: str) -> str | None:
    """The chat template a model folder's tokenizer carries, if any (stripped, as mergekit compares them)."""
    jinja = os.path.join(path, "chat_template.jinja")
    try:
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read().strip() or None
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            t = json.load(f).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t.strip() if isinstance(t, str) and t.strip() else None


def resolve(value: str, model_paths: list[str]) -> str | None:
    """The template text for the config's value (None: ``auto`` and no input model has one)."""
    if value == "auto":
        found = [t for t in map(model_template, model_paths) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN.get(value, value)


def write(directory: str, template: str) -> bool:
    """The template into the tokenizer files in ``directory``; False when there is no tokenizer there."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, "w", encoding="utf-8") as f:
            f.write(template)
    return True
