"""``python -m fastmerge.info``: versions, the build, and which backend can run each op here (and why not)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys

import torch

from .backends.registry import BACKENDS, PRIORITY
from .ops import OPS

_DTYPES = (torch.float32, torch.bfloat16)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {"native": False, "reason": f"{path} missing: fastmerge was not installed with setup.py"}


def report() -> str:
    from ._version import __version__

    lines = [
        f"fastmerge {__version__}",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton    {_version('triton')}",
        f"build     {json.dumps(build_info())}",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
        lines.append(f"gpu       {torch.cuda.get_device_name(0)} (cc {cc})")
    else:
        lines.append("gpu       none visible")
    lines.append("\nbackends:")
    for name, b in BACKENDS.items():
        why = b.unavailable()
        lines.append(f"  {name:10s} {'available' if not why else 'unavailable: ' + why}")
    for dev in devices:
        names = PRIORITY[dev] + (("triton",) if dev == "cpu" else ())
        lines.append(f"\nops on {dev} (tried in the order {' > '.join(PRIORITY[dev])}):")
        lines.append(f"  {'op':20s} " + " ".join(f"{n:12s}" for n in names))
        for op in OPS:
            cells = []
            for name in names:
                b = BACKENDS[name]
                if op not in b.ops:
                    cell = "no kernel"
                elif b.unavailable():
                    cell = "unavailable"
                elif dev == "cpu" and name == "triton":
                    cell = "interpreter"  # TRITON_INTERPRET=1 + FASTMERGE_BACKEND=triton, for tests
                else:
                    cell = "yes" if not b.reasons(op, torch.device(dev), _DTYPES) else "no"
                cells.append(f"{cell:12s}")
            lines.append(f"  {op:20s} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
