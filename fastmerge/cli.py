"""The ``fastmerge`` command: ``merge`` a mergekit-style config, ``reconstruct`` a task from a multi-task
store, ``info`` about the build and backends."""

from __future__ import annotations

import argparse
import json
import os
import sys

# mergekit-yaml's flags that change nothing here, and why (accepted so that its command lines run unchanged)
NOOP_FLAGS = {
    "allow_crimes": "tensors are matched by name and shape whatever the architecture",
    "low_cpu_memory": "fastmerge always streams tensors in bounded memory",
    "clone_tensors": "every output tensor is written from its own buffer",
    "trust_remote_code": "no model code is ever loaded or run",
    "lazy_unpickle": "pickled checkpoints are refused; only safetensors are read",
    "read_to_gpu": "with --cuda, inputs are read into pinned memory and copied to the GPU",
    "multi_gpu": "one device merges (the result is the same)",
    "async_write": "a writer thread always writes while the next tensors merge",
    "write_threads": "one writer thread",
    "transformers_cache": "models are local folders; nothing is downloaded",
    "lora_merge_cache": "LoRA adapters (MODEL+ADAPTER) are applied as tensors are read; no merged copy is written",
    "verbosity": "fastmerge prints one summary line (--quiet: none)",
}
# mergekit-yaml's flags whose feature fastmerge lacks: an error naming it, before anything is read
UNSUPPORTED_FLAGS = {
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings is not supported (embedding rows are never "
                                  "discarded)",
    "no_safe_serialization": "--no-safe-serialization is not supported: fastmerge writes safetensors only",
    "lora_merge_dtype": "--lora-merge-dtype is not supported: a LoRA adapter is applied in its model's own dtype "
                        "(mergekit's default)",
}


def _merge_args(m: argparse.ArgumentParser, mergekit: bool) -> None:
    """The arguments of `fastmerge merge` and of `fastmerge-yaml` (mergekit-yaml's command line): the same
    flags, mergekit's defaults; ``mergekit`` only changes what an existing OUT means (replaced, as a mergekit
    rerun overwrites it)."""
    B = argparse.BooleanOptionalAction
    m.add_argument("config", help="YAML config (mergekit format, plus an optional 'fastmerge:' section)")
    m.add_argument("out_dir", metavar="out_path" if mergekit else "out_dir",
                   help="output directory, written atomically" + (
                       "; an earlier output there is replaced" if mergekit else
                       " (must not exist, unless --overwrite)"))
    g = m.add_argument_group("fastmerge")
    g.add_argument("--device", default=None,
                   help="where to merge: auto, cpu, cuda or cuda:N (default: cpu, or cuda with --cuda)")
    g.add_argument("--cuda", action="store_true", help="merge on the GPU (= --device cuda)")
    g.add_argument("--gpu-rich", action="store_true", help="= --cuda")
    g.add_argument("--out-shard-size", default="5B",
                   help="largest output shard, bytes or with a unit: 500M, 2G, 5B (= 5e9; the default)")
    g.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0,
                   help="seed of the random sparsifiers (DARE, DELLA; fastmerge's Philox stream)")
    g.add_argument("--memory-budget", default=None,
                   help="bytes of tensors in flight (e.g. 2G); default: twice the largest tensor's inputs+output")
    g.add_argument("--copy-tokenizer", action=B, default=True, help="copy the base's tokenizer files (default)")
    g.add_argument("--write-model-card", action=B, default=True,
                   help="write README.md describing the merge (default); mergekit_config.yml is always written")
    g.add_argument("--overwrite", action=B, default=mergekit,
                   help="replace an existing output folder (only one holding what a merge writes), atomically")
    g.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the maths")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    g.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON to PATH")
    k = m.add_argument_group("mergekit-yaml flags accepted and without effect here")
    for name, why in NOOP_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if name == "verbosity":
            k.add_argument("-v", "--verbose", dest=name, action="count", default=0, help=why)
        elif name in ("transformers_cache", "lora_merge_cache", "write_threads"):
            k.add_argument(flag, default=None, help=why)
        else:
            k.add_argument(flag, action=B, default=False, help=why)
    u = m.add_argument_group("mergekit-yaml flags not supported (an error)")
    u.add_argument("--unsafe-truncate-embeddings", action="store_true", help=UNSUPPORTED_FLAGS[
        "unsafe_truncate_embeddings"])
    u.add_argument("--safe-serialization", action=B, default=True, help="only safetensors are written")
    u.add_argument("--lora-merge-dtype", default=None, help=UNSUPPORTED_FLAGS["lora_merge_dtype"])
    m.list_methods = True
    m.formatter_class = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """--help of a merge command ends with the list of methods (the registry, and torch, load only then)."""

    list_methods = False

    def format_help(self) -> str:
        if self.list_methods and self.epilog is None:
            self.epilog = _methods_epilog()
        return super().format_help()


def _methods_epilog() -> str:
    from .methods.registry import METHODS

    names = sorted(METHODS)
    lines, line = [], "  "
    for n in names:
        if len(line) + len(n) > 78:
            lines.append(line.rstrip())
            line = "  "
        line += n + ", "
    lines.append(line.rstrip(", "))
    return "merge methods (merge_method:):\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastmerge", description="Fast, memory-bounded model merging.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge the models a mergekit-style YAML config names",
                       description="Merge the models CONFIG names (mergekit YAML) into OUT_DIR, an HF directory "
                                   "of safetensors shards, streaming tensors from disk in bounded memory. Takes "
                                   "mergekit-yaml's flags too.")
    _merge_args(m, mergekit=False)
    r = sub.add_parser("reconstruct", help="write one task's model from a multi-task store (tall, emr)")
    r.add_argument("store", help="store directory written by a tall/emr merge")
    r.add_argument("task", help="task name or index")
    r.add_argument("out_dir", help="output directory (must not exist)")
    r.add_argument("--out-shard-size", default="5B")
    sub.add_parser("info", help="versions, build, backends")
    return p


def _yaml_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastmerge-yaml", description="mergekit-yaml's command line on fastmerge: "
                                "merge the models CONFIG_FILE names into OUT_PATH.")
    _merge_args(p, mergekit=True)
    return p


def _mergekit_flags(args: argparse.Namespace) -> str | None:
    """The error for an unsupported mergekit flag, or None; applies -j and the device flags."""
    if args.unsafe_truncate_embeddings:
        return UNSUPPORTED_FLAGS["unsafe_truncate_embeddings"]
    if not args.safe_serialization:
        return UNSUPPORTED_FLAGS["no_safe_serialization"]
    if args.lora_merge_dtype is not None:
        return UNSUPPORTED_FLAGS["lora_merge_dtype"]
    if args.num_threads is not None:
        if args.num_threads < 1:
            return f"-j/--num-threads: expected a positive number of threads, got {args.num_threads}"
        import torch

        torch.set_num_threads(args.num_threads)
    if args.device is None:
        args.device = "cuda" if args.cuda or args.gpu_rich else ("auto" if args.cmd == "merge" else "cpu")
    return None


def run_yaml() -> None:
    """The ``fastmerge-yaml`` console script: mergekit-yaml's arguments, fastmerge's engine."""
    code = main(None, yaml_cli=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, yaml_cli: bool = False, fallback=None) -> int:
    """The command line; ``fallback(reason) -> exit status`` (mergekit's own executor, for
    fastmerge.integrations.mergekit) takes over a merge whose flags or config fastmerge cannot run, before
    anything is written."""
    if yaml_cli:
        args = _yaml_parser().parse_args(argv)
        args.cmd = "merge"
    else:
        args = _parser().parse_args(argv)
    if args.cmd == "merge":
        err = _mergekit_flags(args)
        if err and fallback is not None:
            return fallback(err)
        if err:
            print(f"{'fastmerge-yaml' if yaml_cli else 'fastmerge merge'}: error: {err}", file=sys.stderr)
            return 2
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
                          seed=args.seed, memory_budget=args.memory_budget, quiet=args.quiet,
                          overwrite=args.overwrite, copy_tokenizer=args.copy_tokenizer,
                          model_card=args.write_model_card)
                if args.summary_json:
                    with open(args.summary_json, "w") as f:
                        json.dump(s.as_dict(), f, indent=2)
                if not args.quiet:
                    print(s)
            else:
                res = reconstruct(args.store, args.task, args.out_dir, out_shard_size=args.out_shard_size)
                print(f"task {res['task']} (scale {res['scale']:.4g}) -> {res['out_dir']}")
    except ConfigError as e:
        if fallback is not None:
            return fallback(str(e))
        print(f"fastmerge {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
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
