"""The ``fastmerge`` command: ``merge`` a mergekit-style config, ``reconstruct`` a task from a multi-task
store, ``info`` about the build and backends."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmerge", description="Fast, memory-bounded model merging.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge the models a mergekit-style YAML config names",
                       description="Merge the models CONFIG names (mergekit YAML) into OUT_DIR, an HF directory "
                                   "of safetensors shards, streaming tensors from disk in bounded memory.")
    m.add_argument("config", help="YAML config (mergekit format, plus an optional 'fastmerge:' section)")
    m.add_argument("out_dir", help="output directory (must not exist; written atomically)")
    m.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to merge (default auto)")
    m.add_argument("--out-shard-size", default="5B",
                   help="largest output shard, bytes or with a unit: 500M, 2G, 5B (= 5e9; the default)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random sparsifiers (DARE, DELLA)")
    m.add_argument("--memory-budget", default=None,
                   help="bytes of tensors in flight (e.g. 2G); default: twice the largest tensor's inputs+output")
    m.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    m.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON to PATH")
    r = sub.add_parser("reconstruct", help="write one task's model from a multi-task store (tall, emr)")
    r.add_argument("store", help="store directory written by a tall/emr merge")
    r.add_argument("task", help="task name or index")
    r.add_argument("out_dir", help="output directory (must not exist)")
    r.add_argument("--out-shard-size", default="5B")
    sub.add_parser("info", help="versions, build, backends")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "info":
        from .info import main as info_main

        info_main()
        return 0
    from .signals import Interrupted, deferred, interruptible

    with deferred() as early:  # torch and numpy load here: a signal now is acted on once they have
        from .config import ConfigError
        from .engine import merge
        from .io import CheckpointError
        from .store import reconstruct
    if early.pending is not None:
        return _interrupted(args.cmd, Interrupted(early.pending))
    try:
        with interruptible():
            if args.cmd == "merge":
                s = merge(args.config, args.out_dir, device=args.device, out_shard_size=args.out_shard_size,
                          seed=args.seed, memory_budget=args.memory_budget, quiet=args.quiet)
                if args.summary_json:
                    with open(args.summary_json, "w") as f:
                        json.dump(s.as_dict(), f, indent=2)
                if not args.quiet:
                    print(s)
            else:
                res = reconstruct(args.store, args.task, args.out_dir, out_shard_size=args.out_shard_size)
                print(f"task {res['task']} (scale {res['scale']:.4g}) -> {res['out_dir']}")
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"fastmerge {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(args.cmd, e)
    return 0


def _interrupted(cmd: str, e: KeyboardInterrupt) -> int:
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    print(f"fastmerge {cmd}: interrupted ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
    return 128 + signum


def run() -> None:
    """The console entry point: main(), then a hard exit. Everything fastmerge wrote is closed by then, and
    interpreter teardown after importing torch (its atexit hooks, freeing every module) costs ~0.4 s."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
