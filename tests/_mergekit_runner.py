"""Run many mergekit merges in ONE process (importing mergekit costs ~10 s), for the golden tests.

    python tests/_mergekit_runner.py JOBS.json RESULTS.json

JOBS.json is a list of ``[config_yaml_path, out_dir]`` (or ``[..., {option: value}]`` to change options for
that job). Each config is run with
``mergekit.merge.run_merge`` and ``MergeOptions(random_seed=0, copy_tokenizer=False, quiet=True)`` (and a
LoRA merge cache beside RESULTS.json), the same options ``mergekit-yaml CFG OUT --no-copy-tokenizer
--random-seed 0 --quiet --lora-merge-cache DIR`` gives (run_merge re-seeds
before every merge, so each result is the same as a lone run of that config). A failing config does not stop
the others: RESULTS.json gets one ``{"config", "out", "ok", "seconds", "error"}`` record per job, in order,
plus the import time. The exit status is 0 even when a config fails (the tests look at each record).
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(jobs_path: str, results_path: str) -> int:
    t0 = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import_s = time.perf_counter() - t0
    import os

    lora_cache = os.path.join(os.path.dirname(os.path.abspath(results_path)), "lora_merge_cache")
    options = MergeOptions(random_seed=0, copy_tokenizer=False, quiet=True, write_model_card=False,
                           lora_merge_cache=lora_cache)
    with open(jobs_path) as f:
        jobs = json.load(f)
    records = []
    for cfg_path, out_dir, *extra in jobs:
        t = time.perf_counter()
        rec = {"config": cfg_path, "out": out_dir, "ok": True, "error": None}
        try:
            with open(cfg_path, encoding="utf-8") as f:
                source = f.read()
            cfg = MergeConfiguration.model_validate(yaml.safe_load(source))
            opts = options.model_copy(update=extra[0]) if extra else options
            run_merge(cfg, out_dir, options=opts, config_source=source)
        except Exception:  # reported per config
            rec.update(ok=False, error=traceback.format_exc(limit=8))
        rec["seconds"] = round(time.perf_counter() - t, 3)
        records.append(rec)
    with open(results_path, "w") as f:
        json.dump({"import_seconds": round(import_s, 3), "jobs": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
