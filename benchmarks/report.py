"""Summarise a pytest-benchmark JSON as a markdown table: median time, GB/s, and speed-up against the
baselines measured in the same run (mergekit-style, PEFT-style, the fastmerge reference).

    python benchmarks/report.py benchmarks/results/latest.json > benchmarks/results/<machine>.md
"""

import json
import re
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    m = data["machine_info"]
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    print(f"# Benchmarks: {data['datetime'][:19]} on {m.get('node', '?')}\n")
    print(f"- CPU: {cpu}, {m.get('cpu', {}).get('count', '?')} logical cores; Python {m.get('python_version')}")
    for k, v in sorted(data.get("extra_info_machine", {}).items()):
        print(f"- {k}: {v}")
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        prov = b["extra_info"].get("provider", "?")
        name = re.sub(r"\[.*", "", b["name"]).removeprefix("test_")
        case = "-".join(p for p in (b.get("param") or "").split("-") if p != prov)
        groups[(name, case)][prov] = b
    print("\n| op | case | provider | median | GB/s | vs mergekit | vs peft | vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, case), provs in sorted(groups.items()):
        for prov, b in sorted(provs.items(), key=lambda kv: kv[1]["stats"]["median"]):
            med = b["stats"]["median"]

            def ratio(base, provs=provs, med=med, prov=prov):
                return f"{provs[base]['stats']['median'] / med:.1f}x" if base in provs and base != prov else ""

            t = f"{med * 1e3:.1f} ms" if med < 10 else f"{med:.1f} s"
            print(f"| {name} | {case} | {prov} | {t} | {b['extra_info'].get('gbps', '')} | {ratio('mergekit')} "
                  f"| {ratio('peft')} | {ratio('reference')} |")


if __name__ == "__main__":
    main(sys.argv[1])
