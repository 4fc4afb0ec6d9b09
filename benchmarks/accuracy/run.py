"""The real multi-task accuracy benchmark (../shared/eval/README.md, design A): the pretrained MiniLM encoder from
PyPI, eight real text tasks from PyPI and Debian packages (Debian data unpacked without root), one fine-tuned
expert per task (cached), and every fastmerge method through its real entry point: `fastmerge merge` (the CLI)
for the data-free methods, the Python API (fastmerge.tta) for AdaMerging and Model Tinting. Writes a table of
per-task accuracy, average absolute and normalised accuracy (accuracy / the task's expert) and merge time to
benchmarks/results/accuracy-<design>.{json,md} and a bar chart PNG.

    python benchmarks/accuracy/run.py            # design A: 8 tasks (~30 min on 2 cores the first time)
    python benchmarks/accuracy/run.py --quick    # CI smoke test: 3 PyPI tasks, 200 test examples each, short
                                                 # schedules (30-step experts): about 3 min from scratch

Test-time adaptation schedules: the official ones are 500 AdaMerging steps at lr 1e-3 and 500 Tinting epochs;
on a 2-core CPU this runs AdaMerging for 100 steps at lr 5e-3 (the same largest coefficient move, 0.5) and
Tinting for 60 epochs (T steps each), both on the unlabelled test inputs, as the official code does.
--quick checks coarse properties: every merge beats zero-shot on average, and TSV-M is at least task
arithmetic - 1 point of normalised accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import torch  # noqa: E402
from demo import cli_merge, file_digest, merge_config, merged_key, summarize  # noqa: E402
from minilm import evaluate, experts, tasks  # noqa: E402
from torch import nn  # noqa: E402

import fastmerge  # noqa: E402
from fastmerge import tta  # noqa: E402

DESIGN_A = ["rt_polarity", "tweet_sentiment", "bbc_news", "fortune_langid", "fortune_topic", "wordnet_supersense",
            "debian_section", "debate_party"]
SHORT = {"rt_polarity": "rt_pol", "tweet_sentiment": "tweet", "bbc_news": "bbc", "fortune_langid": "langid",
         "fortune_topic": "f_topic", "wordnet_supersense": "wn_super", "debian_section": "deb_sec",
         "debate_party": "debate", "chatterbot_langid": "cb_lang"}
QUICK = ["rt_polarity", "tweet_sentiment", "bbc_news"]
QUICK_RECIPE = dict(experts.RECIPE, steps=30, warmup=3)
QUICK_TEST = 200

# (label, merge_method, per-model parameters, global parameters, extra YAML) -- T is filled in for "mean"
CLI_METHODS = [
    ("mean (λ=1/T)", "task_arithmetic", {"weight": 1.0}, {"lambda": "1/T"}, {}),
    ("TA λ=0.3", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.3}, {}),
    ("TA λ=0.5", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.5}, {}),
    ("TIES top-20% λ=1", "ties", {"density": 0.2, "weight": 1.0}, {"lambda": 1.0},
     {"fastmerge": {"trim": "global", "compat": "official"}}),
    ("TSV-M λ=1", "tsv_m", {}, {"alpha": 1.0}, {}),
    ("Iso-C α=1", "iso_c", {}, {"alpha": 1.0}, {}),
    ("Iso-C α=1.5", "iso_c", {}, {"alpha": 1.5}, {}),
    ("Iso-CTS α=1", "iso_cts", {}, {"alpha": 1.0}, {}),
    ("Iso-CTS α=1.5", "iso_cts", {}, {"alpha": 1.5}, {}),
    ("DOGE_TA", "doge_ta", {}, {}, {}),
]
QUICK_CLI = ["TA λ=0.3", "TIES top-20% λ=1", "TSV-M λ=1", "Iso-C α=1", "DOGE_TA"]


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------
# test-time adaptation through the API


class Head(nn.Module):
    """A task's head: logits = 20 * <normalised features, class-prompt embeddings> (+ a bias for the tint)."""

    def __init__(self, prompts_emb: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(prompts_emb.shape[1], prompts_emb.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(tasks.LOGIT_SCALE * prompts_emb)
            self.linear.bias.zero_()

    def forward(self, f):
        return self.linear(f)


def _forward(model, batch):
    return tasks.encode(model, batch)


def _loaders(tok, tlist, batch_size, seed):
    """Unlabelled test inputs of each task, tokenized, shuffled once, as batches (an endless cycle in tta)."""
    out = []
    for i, t in enumerate(tlist):
        texts = [x for x, _ in t.test]
        random.Random(seed + i).shuffle(texts)
        out.append([tok(texts[j:j + batch_size], padding=True, truncation=True, max_length=tasks.MAX_LEN,
                        return_tensors="pt") for j in range(0, len(texts), batch_size)])
    return out


@torch.inference_mode()
def _accuracy(merged, t_index, task, tok):
    feats, correct = None, 0
    for batch, labels in evaluate.test_batches(tok, task):
        feats = merged.features(batch)
        correct += int((merged.heads[t_index](feats).argmax(-1) == labels).sum())
    return correct / len(task.test)


def run_tta(kind, base, expert_dirs, tlist, heads_emb, schedule):
    """AdaMerging or Tinting on the MiniLM encoder; returns ({task: accuracy}, seconds)."""
    model, tok = tasks.load_model(base), tasks.load_tokenizer(base)
    tv = tta.TaskVectors.from_checkpoints(os.path.join(base, "model.safetensors"),
                                          {t.name: os.path.join(expert_dirs[t.name], "model.safetensors")
                                           for t in tlist})
    heads = [Head(heads_emb[t.name]) for t in tlist]
    t0 = time.perf_counter()
    if kind == "adamerging":
        res = tta.adamerging(model, tv, heads, _loaders(tok, tlist, 16, 0), steps=schedule["ada_steps"],
                             lr=schedule["ada_lr"], forward_fn=_forward)
    else:
        loss = "crosspseudoconf" if kind == "tinting++" else "crosspseudo"
        res = tta.tinting(model, tv, heads, _loaders(tok, tlist, 32, 1), loss=loss, epochs=schedule["tint_epochs"],
                          forward_fn=_forward)
    seconds = time.perf_counter() - t0
    tasks.set_threads()
    acc = {t.name: _accuracy(res.model, i, t, tok) for i, t in enumerate(tlist)}
    return acc, seconds, res


# ---------------------------------------------------------------------------------------------------------


def markdown(rows, tlist, meta):
    cols = [SHORT.get(t.name, t.name) for t in tlist]
    lines = [f"# Accuracy benchmark ({meta['design']}): MiniLM-L6 experts on {len(tlist)} real text tasks",
             "", f"- machine: {meta['machine']}; torch {meta['torch']}; {meta['when']}",
             f"- {meta['test_size']} test examples per task; norm = mean of accuracy / the task's expert accuracy; "
             "time = merge (CLI wall time) or test-time adaptation (API) seconds",
             f"- schedules: {meta['schedule']}", "",
             "| method | " + " | ".join(cols) + " | avg abs | avg norm | time s |",
             "|---|" + "---|" * (len(cols) + 3)]
    for r in rows:
        cells = [f"{100 * r['acc'][t.name]:.1f}" if t.name in r["acc"] else "" for t in tlist]
        tm = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['avg']:.1f} | {r['norm']:.1f} | {tm} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh(y, [r["norm"] for r in rows], color=["#999999" if r["label"].startswith(("zero", "experts")) else
                                                 "#2b6cb0" if r.get("kind") == "tta" else "#48a868" for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["norm"] + 0.3, i, f"{r['norm']:.1f} ({r['avg']:.1f} abs)", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=9)
    ax.invert_yaxis()
    lo = min(r["norm"] for r in rows)
    ax.set_xlim(max(0, lo - 10), 108)
    ax.set_xlabel("normalised accuracy, % of the experts (avg over tasks)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke test: 3 PyPI tasks, short schedules")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="where results go")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    threads = tasks.set_threads()
    names = QUICK if args.quick else DESIGN_A
    recipe = QUICK_RECIPE if args.quick else experts.RECIPE
    schedule = ({"ada_steps": 10, "ada_lr": 1e-2, "tint_epochs": 5, "doge_steps": 30} if args.quick
                else {"ada_steps": 100, "ada_lr": 5e-3, "tint_epochs": 60})
    design = "quick" if args.quick else "design-A"
    log(f"accuracy benchmark ({design}): {len(names)} tasks, cache {experts.cache_dir()}, {threads} threads")
    tlist = tasks.load_tasks(names)
    if args.quick:  # the first 200 of the 400 test examples (the training pool is unchanged)
        for t in tlist:
            t.test = t.test[:QUICK_TEST]
    for t in tlist:
        log(f"  {t.name:20s} {t.n_total:6d} examples, {len(t.classes):2d} classes")
    base = experts.ensure_base()
    expert_dirs = {t.name: experts.ensure_expert(t, base, log=log, recipe=recipe) for t in tlist}
    results = evaluate.ResultCache(os.path.join(experts.cache_dir(), "accuracies.json"))
    heads = evaluate.make_heads(base, tlist)

    def cached_eval(key, model_dir, which):
        acc = results.get(key)
        if acc is None:
            acc = evaluate.evaluate_dir(model_dir, which, heads, tokenizer_dir=base)
            results.put(key, acc)
        return acc

    digest = {d: file_digest(os.path.join(d, "model.safetensors")) for d in [base, *expert_dirs.values()]}

    def key(kind, d, which):
        return "/".join([kind, digest[d]] + [f"{t.name}-{t.spec_hash()}" for t in which])

    log("evaluating zero-shot and experts")
    zero = cached_eval(key("zero_shot", base, tlist), base, tlist)
    expert_acc = {}
    for t in tlist:
        expert_acc |= cached_eval(key("expert", expert_dirs[t.name], [t]), expert_dirs[t.name], [t])
    rows = [summarize("zero-shot", zero, expert_acc, kind="ref"), summarize("experts (own task)", expert_acc,
                                                                            expert_acc, kind="ref")]
    T = len(tlist)
    failed = []
    with tempfile.TemporaryDirectory(prefix="fastmerge-accuracy-") as tmp:
        for i, (label, method, mp, gp, extra) in enumerate(CLI_METHODS):
            if args.quick and label not in QUICK_CLI:
                continue
            gp = {k: (1.0 / T if v == "1/T" else v) for k, v in gp.items()}
            if args.quick and method == "doge_ta":
                gp["steps"] = schedule["doge_steps"]
            cfg = merge_config(method, base, [expert_dirs[t.name] for t in tlist], mp, gp, copy.deepcopy(extra))
            log(f"merging: {label}")
            rc, seconds, peak, output, out = cli_merge(cfg, tmp, f"out{i}")
            if rc != 0:
                log(f"  fastmerge merge failed (exit {rc}):\n{output[-2000:]}")
                failed.append(label)
                continue
            acc = cached_eval(merged_key(out, tlist), out, tlist)
            row = summarize(label, acc, expert_acc, seconds=seconds, peak_mb=peak, kind="cli")
            log(f"  {seconds:.1f} s, avg {row['avg']:.1f}, norm {row['norm']:.1f}")
            rows.append(row)
    for kind, label in (("adamerging", f"AdaMerging layer-wise ({schedule['ada_steps']} steps)"),
                        ("tinting", f"Model Tinting ({schedule['tint_epochs']} epochs)"),
                        ("tinting++", f"Model Tinting++ ({schedule['tint_epochs']} epochs)")):
        log(f"test-time adaptation: {label}")
        acc, seconds, _ = run_tta(kind, base, expert_dirs, tlist, heads, schedule)
        row = summarize(label, acc, expert_acc, seconds=seconds, kind="tta")
        log(f"  {seconds:.1f} s, avg {row['avg']:.1f}, norm {row['norm']:.1f}")
        rows.append(row)

    meta = {"design": design, "tasks": names, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"),
            "test_size": len(tlist[0].test), "threads": threads, "schedule": schedule, "expert_recipe": recipe,
            "fastmerge": fastmerge.__version__, "total_seconds": round(time.perf_counter() - t_start, 1)}
    md = markdown(rows, tlist, meta)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy-{design}")
    if not args.quick:
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows, "failed": failed}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
        bar_chart(rows, stem + ".png", f"fastmerge, MiniLM-L6, {len(tlist)} text tasks ({design})")
        log(f"results: {stem}.{{json,md,png}}")
    problems = list(failed)
    if args.quick:
        zero_avg = rows[0]["avg"]
        for r in rows[2:]:
            if r["avg"] <= zero_avg:
                problems.append(f"{r['label']} ({r['avg']:.1f}) does not beat zero-shot ({zero_avg:.1f})")
        by = {r["label"]: r for r in rows}
        if by["TSV-M λ=1"]["norm"] < by["TA λ=0.3"]["norm"] - 1.0:
            problems.append(f"TSV-M {by['TSV-M λ=1']['norm']:.1f} < TA {by['TA λ=0.3']['norm']:.1f} - 1 (normalised)")
    log(f"finished in {time.perf_counter() - t_start:.0f} s")
    if problems:
        log("FAILED: " + "; ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
