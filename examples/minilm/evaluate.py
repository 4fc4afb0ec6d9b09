"""Accuracy of a model directory on each task's 400 test examples, scored with each task's own frozen class-prompt
head, and a small JSON cache of accuracies (zero-shot, experts) in the demo cache directory."""

import json
import os
import tempfile

import torch

from .tasks import EVAL_BATCH, MAX_LEN, class_head, encode, load_model, load_tokenizer, logits, set_threads


def test_batches(tok, task):
    """The task's test set tokenized once, sorted by length (less padding), as (padded batch, labels) pairs."""
    texts = [t for t, _ in task.test]
    enc = tok(texts, truncation=True, max_length=MAX_LEN)
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
    out = []
    for i in range(0, len(order), EVAL_BATCH):
        idx = order[i:i + EVAL_BATCH]
        batch = tok.pad({k: [enc[k][j] for j in idx] for k in enc}, return_tensors="pt")
        out.append((batch, torch.tensor([task.test[j][1] for j in idx])))
    return out


@torch.inference_mode()
def accuracy(model, tok, task, head, batches=None):
    model.eval()
    correct = 0
    for batch, labels in batches or test_batches(tok, task):
        correct += int((logits(encode(model, batch), head).argmax(-1) == labels).sum())
    return correct / len(task.test)


def make_heads(base_dir, tasks):
    """Heads come from the pretrained model, once; every model (zero-shot, experts, merges) is scored with them."""
    model, tok = load_model(base_dir), load_tokenizer(base_dir)
    return {t.name: class_head(model, tok, t) for t in tasks}


def evaluate_dir(model_dir, tasks, heads, tokenizer_dir=None):
    """{task name: accuracy} of the model stored in `model_dir` (the base tokenizer is used when given)."""
    model = load_model(model_dir)
    tok = load_tokenizer(tokenizer_dir or model_dir)
    out = {}
    for t in tasks:
        set_threads()  # re-checked per task: 2 threads under contention are much slower than 1
        out[t.name] = accuracy(model, tok, t, heads[t.name])
    return out


class ResultCache:
    """A JSON file of {key: value}; written atomically after every update."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path) as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".acc-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
