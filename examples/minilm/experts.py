"""The pretrained base and one fine-tuned expert per task, cached as HF directories (config.json + model.safetensors
+ tokenizer) under $FASTMERGE_DEMO_CACHE (default ~/.cache/fastmerge-demo/), each written atomically.

Recipe: embeddings (and the unused pooler) frozen, all 6 transformer blocks trained; AdamW lr 5e-5, weight decay
0.1, 100 steps of batch 32, max_len 32, 10-step linear warm-up then linear decay, fp32, cross-entropy on
20 * cosine against the task's frozen class-prompt head. An expert's directory name holds the task and a hash of
the recipe and task definition, so a changed recipe trains anew and an unchanged one is never trained twice.
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from .tasks import MAX_LEN, class_head, embed, load_model, load_tokenizer, logits, pretrained_path, set_threads

RECIPE = {"lr": 5e-5, "weight_decay": 0.1, "steps": 100, "batch_size": 32, "max_len": MAX_LEN, "warmup": 10,
          "seed": 0, "dtype": "float32", "trained": "encoder.layer.*", "version": 1}
BASE_NAME = "base-all-minilm-l6-v2"


def cache_dir():
    return os.path.abspath(os.path.expanduser(os.environ.get("FASTMERGE_DEMO_CACHE", "~/.cache/fastmerge-demo")))


def _publish(build, final):
    """Run build(tmp_dir) in a temporary sibling directory, then rename it to `final` (atomic on one filesystem)."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.tmp-")
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):  # lost a race with another writer: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def base_dir():
    return os.path.join(cache_dir(), BASE_NAME)


def ensure_base():
    """The pretrained model re-saved as an HF directory with safetensors (the merges' `base_model`)."""
    final = base_dir()
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    src = pretrained_path()

    def build(tmp):
        load_model(src).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(src).save_pretrained(tmp)

    return _publish(build, final)


def recipe_hash(task, recipe=None):
    blob = json.dumps({"recipe": recipe or RECIPE, "task": task.spec_hash(), "base": BASE_NAME}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def expert_dir(task, recipe=None):
    return os.path.join(cache_dir(), "experts", f"{task.name}-{recipe_hash(task, recipe)}")


def _lr_factor(step, recipe):
    warm, steps = recipe["warmup"], recipe["steps"]
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / (steps - warm))


def train_expert(task, base, log=print, recipe=None):
    """Fine-tune the base on `task` with `recipe` (default RECIPE); returns (model, tokenizer, seconds, losses)."""
    recipe = recipe or RECIPE
    torch.manual_seed(recipe["seed"])
    model, tok = load_model(base), load_tokenizer(base)
    head = class_head(model, tok, task)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("encoder.layer."))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, recipe))
    bs, steps = recipe["batch_size"], recipe["steps"]
    order = []
    rng = random.Random(recipe["seed"])
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        if step % 10 == 0:
            threads = set_threads()  # the load may change while we train
        if len(order) < bs:
            order += rng.sample(range(len(task.train)), len(task.train))
        idx, order = order[:bs], order[bs:]
        texts = [task.train[i][0] for i in idx]
        labels = torch.tensor([task.train[i][1] for i in idx])
        loss = F.cross_entropy(logits(embed(model, tok, texts), head), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            log(f"    {task.name}: step {step + 1}/{steps}  loss {sum(losses[-25:]) / 25:.3f}  "
                f"({time.perf_counter() - t0:.0f} s, {threads} threads)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, time.perf_counter() - t0, losses


def ensure_expert(task, base, log=print, recipe=None):
    """The cached expert directory of `task` (trained with `recipe`, default RECIPE), trained first if missing."""
    recipe = recipe or RECIPE
    final = expert_dir(task, recipe)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    log(f"  training expert {task.name} ({len(task.train)} train examples, {len(task.classes)} classes)")
    model, tok, seconds, losses = train_expert(task, base, log, recipe)

    def build(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "fastmerge_demo.json"), "w") as f:
            json.dump({"task": task.name, "recipe": recipe, "recipe_hash": recipe_hash(task, recipe), "base": base,
                       "train_seconds": round(seconds, 1), "final_loss": losses[-1]}, f, indent=1)

    _publish(build, final)
    log(f"  trained {task.name} in {seconds:.0f} s -> {final}")
    return final
