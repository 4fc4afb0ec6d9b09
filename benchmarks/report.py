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
    engine_section(data["benchmarks"])
    subspace_section(data["benchmarks"])
    tta_section(data["benchmarks"])


def tta_section(benchmarks: list) -> None:
    """bench_tta.py: ms per optimisation step, fused against the plain functional_call + autograd twin."""
    rows = defaultdict(dict)
    for b in benchmarks:
        x = b["extra_info"]
        if str(x.get("op", "")).startswith("tta_"):
            rows[(x["op"], x["case"], x["T"], x["params"])][x["provider"]] = x
    if not rows:
        return
    print("\n## Test-time adaptation: one optimisation step, fused vs plain autograd (same run, same start)\n")
    print("| algorithm | model | T | parameters | plain ms/step | fused ms/step | speed-up | max coef diff after "
          "the steps | max head diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (op, case, T, P), r in sorted(rows.items()):
        pl, fu = r.get("plain", {}), r.get("fused", {})
        print(f"| {op.removeprefix('tta_')} | {case} | {T} | {P / 1e6:.1f}M | {pl.get('step_ms', '')} | "
              f"{fu.get('step_ms', '')} | **{fu.get('speedup_per_step', '?')}x** | {fu.get('max_coef_diff', '')} | "
              f"{fu.get('max_head_diff', '')} |")


def subspace_section(benchmarks: list) -> None:
    """bench_subspace.py / bench_doge.py: fastmerge paths against the official-style loop (speed-up, error)."""
    rows = defaultdict(dict)
    for b in benchmarks:
        x = b["extra_info"]
        if "speedup_vs_official" in x or x.get("provider") == "official":
            rows[(x["op"], x.get("block", ""), x.get("T", ""))][x["provider"]] = x
    if not rows:
        return
    provs = sorted({p for r in rows.values() for p in r if p != "official"})
    print("\n## Against the official-style loop (same inputs, same run): wall time, speed-up, relative error\n")
    print("err: against the official loop's result; fp64: against the same algorithm in fp64 (where measured).\n")
    print("| op | shape | T | official | " + " | ".join(provs) + " |")
    print("|---|---|---|---|" + "---|" * len(provs))

    def fp64(x):
        return f", fp64 {x['err_vs_fp64']}" if "err_vs_fp64" in x else ""

    for (op, block, T), r in sorted(rows.items(), key=lambda kv: tuple(str(v) for v in kv[0][:2]) + (kv[0][2] or 0,)):
        cells = []
        for p in provs:
            x = r.get(p)
            cells.append("" if x is None else f"{x['wall_s']:.2f} s, **{x.get('speedup_vs_official', '?')}x**, "
                                               f"err {x.get('err_vs_exact', '?')}{fp64(x)}")
        o = r.get("official")
        off = "" if o is None else f"{o['wall_s']:.2f} s{fp64(o)}"
        print(f"| {op} | {block} | {T} | {off} | " + " | ".join(cells) + " |")


def engine_section(benchmarks: list) -> None:
    """bench_engine.py: whole merges, fastmerge CLI vs mergekit-yaml (wall, peak RSS, ratios, targets)."""
    rows = defaultdict(dict)
    imports = {}
    gpu = {}
    floors = {}
    for b in benchmarks:
        x = b["extra_info"]
        if x.get("op") == "engine":
            rows[x["method"]][x["provider"]] = x
        elif x.get("op") == "import":
            imports[x["provider"]] = x["import_s"]
        elif x.get("op") == "engine_gpu":
            gpu[x["provider"]] = x
        elif x.get("op") == "write_floor":
            floors[x["provider"]] = x
    if not rows and not imports and not gpu:
        return
    print("\n## Engine: whole merges (fastmerge CLI vs mergekit-yaml, same YAML, warm page cache)\n")
    if imports:
        print("- interpreter start + import: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(imports.items())))
    if floors:
        print("- writing one model's bytes into a new file: " + ", ".join(
            f"{k} {v['gbps']:.2f} GB/s" for k, v in sorted(floors.items())))
    if rows:
        print("\n| method | mergekit wall | fastmerge wall | fastmerge engine | speed-up | ex. imports | target "
              "| mergekit RSS | fastmerge RSS | RSS ratio | GB/s read (wall / engine) | meets target | other CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for method, p in sorted(rows.items()):
            mk, fm = p.get("mergekit", {}), p.get("fastmerge", {})
            tgt = fm.get("target") or {}
            unit = {"speedup": (">=", "x"), "rss_ratio": ("<=", " RSS"), "max_wall_s": ("<=", " s wall")}
            tgt_s = ", ".join(f"{unit[k][0]} {v}{unit[k][1]}" for k, v in tgt.items())
            other = "/".join(str(d.get("other_cpu_s", "")) for d in (mk, fm) if d)
            print(f"| {method} | {_s(mk.get('wall_s'))} | {_s(fm.get('wall_s'))} | {_s(fm.get('engine_s'))} "
                  f"| {_x(fm.get('speedup'))} | {_x(fm.get('speedup_ex_import'))} | {tgt_s} "
                  f"| {_mb(mk.get('peak_rss_mb'))} | {_mb(fm.get('peak_rss_mb'))} "
                  f"| {fm.get('rss_ratio', '')} | {fm.get('gbps', '')} / {fm.get('engine_gbps', '')} "
                  f"| {'' if 'meets_target' not in fm else ('yes' if fm['meets_target'] else '**no**')} | {other} |")
        speed = [f"{m} {p['fastmerge']['eigh1024_fp64_ms']} ms" for m, p in sorted(rows.items())
                 if "eigh1024_fp64_ms" in p.get("fastmerge", {})]
        if speed:
            print("\n- the VM's speed at each wall-time case, as one fp64 1024 x 1024 eigh on one thread: "
                  + ", ".join(speed))
    if gpu:
        fm, floor = gpu.get("fastmerge_cuda", {}), gpu.get("read_to_gpu", {})
        print(f"\n- GPU ({fm.get('device') or floor.get('device', '?')}), ties: fastmerge --device cuda "
              f"{_s(fm.get('wall_s'))} wall, {_s(fm.get('engine_s'))} engine; reading all inputs onto the GPU "
              f"(pinned) {_s(floor.get('wall_s'))}: engine / read floor = {fm.get('engine_vs_read_floor', '?')}")


def _s(v) -> str:
    return "" if v is None else f"{v:.2f} s"


def _x(v) -> str:
    return "" if v is None else f"{v:.1f}x"


def _mb(v) -> str:
    return "" if v is None else f"{v / 1024:.2f} GiB"


if __name__ == "__main__":
    main(sys.argv[1])
