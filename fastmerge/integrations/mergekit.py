"""fastmerge as mergekit's engine (``pip install fastmerge[mergekit]``).

- :func:`run_merge`: ``mergekit.merge.run_merge``'s signature and objects (``MergeConfiguration``,
  ``MergeOptions``), merged by fastmerge's engine: mergekit's tensors (see the README's compat notes), faster.
  A config or option fastmerge cannot run goes to mergekit's own executor, with one line naming why.
- :func:`patch` (a context manager that also works as a plain call; :func:`unpatch` undoes it): mergekit's
  ``run_merge``, wherever mergekit's modules and its users' code look it up, becomes :func:`run_merge`.
- :func:`register_methods`: fastmerge's per-tensor methods that mergekit lacks, registered in mergekit's method
  registry as ``fastmerge_<name>``, so that mergekit's own executor runs them on fastmerge's kernels.
- ``python -m fastmerge.integrations.mergekit CONFIG OUT [mergekit-yaml's options]``: mergekit-yaml's command
  line on fastmerge (fastmerge-yaml's parser, which takes its every flag), falling back to mergekit-yaml itself
  for what fastmerge cannot run.

mergekit is imported only when one of these is used.
"""

from __future__ import annotations

import logging
import os
import sys

from ..peers import checkout_off_path

LOG = logging.getLogger(__name__)
_saved: list[tuple[object, object]] = []  # (module, its original run_merge) while patched


def _options_fastmerge_lacks(options) -> str | None:
    """The first MergeOptions setting fastmerge cannot honour, named; None when it can run them all."""
    if options.unsafe_truncate_embeddings:
        return "unsafe_truncate_embeddings=True"
    if not options.safe_serialization:
        return "safe_serialization=False (pickled output)"
    if options.lora_merge_dtype is not None:
        return f"lora_merge_dtype={options.lora_merge_dtype!r}"
    return None


def _stock():
    """mergekit's own run_merge (also while patched)."""
    import mergekit.merge

    for mod, original in _saved:
        if mod is mergekit.merge:
            return original
    return mergekit.merge.run_merge


def run_merge(merge_config, out_path: str, options=None, config_source: str | None = None) -> None:
    """Merge as ``mergekit.merge.run_merge`` does, on fastmerge's engine; what fastmerge cannot run (a
    ``modules:`` config, ``unsafe_truncate_embeddings``...) runs on mergekit's, after one line saying why."""
    with checkout_off_path():
        from mergekit.options import MergeOptions

    from ..config import ConfigError
    from ..engine import merge

    options = options if options is not None else MergeOptions()
    why = _options_fastmerge_lacks(options)
    if why is None:
        device = "cuda" if options.cuda or options.gpu_rich else (options.device or "cpu")
        config = config_source if config_source is not None else merge_config
        try:
            merge(config, out_path, device=device, out_shard_size=options.out_shard_size,
                  seed=options.random_seed or 0, quiet=options.quiet, overwrite=True,
                  copy_tokenizer=options.copy_tokenizer, model_card=options.write_model_card)
            return
        except ConfigError as e:  # raised before anything is written
            why = str(e)
    print(f"fastmerge: {why}: running mergekit's own executor", file=sys.stderr)
    with checkout_off_path():
        _stock()(merge_config, out_path, options=options, config_source=config_source)


# fastmerge's methods mergekit lacks, per tensor (whole-model ones, doge_ta and trim: global, need the engine)
MERGEKIT_LACKS = ("tsv_m", "iso_c", "iso_cts", "consensus_ta", "consensus_ties")


def register_methods() -> list[str]:
    """Register fastmerge's per-tensor methods that mergekit lacks in mergekit's method registry as
    ``fastmerge_<name>`` (``fastmerge_tsv_m``, ``fastmerge_iso_c``, ...), with their parameters, so that a mergekit
    config can name them and mergekit's own executor runs them on fastmerge's kernels. Idempotent; returns the
    registered names."""
    with checkout_off_path():
        from mergekit.merge_methods.base import (
            BasePolicy,
            FunctionalGroupMergeMethod,
            InputContract,
            MergeMethodSpec,
            ParameterScope,
            ParameterSpec,
        )
        from mergekit.merge_methods.registry import register, registered_methods

    from ..methods import INPUT, METHODS, NONBASE, REQUIRED, TensorCall

    scopes = {INPUT: ParameterScope.INPUT, NONBASE: ParameterScope.NON_BASE}
    have = {m.spec.name for m in registered_methods()}
    names = []
    for fm_name in MERGEKIT_LACKS:
        method, name = METHODS[fm_name], "fastmerge_" + fm_name
        names.append(name)
        if name in have:
            continue
        spec = MergeMethodSpec(
            name=name, pretty_name=f"fastmerge {fm_name}",
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
            parameters=tuple(ParameterSpec(p.name, p.kind, scopes.get(p.scope, ParameterScope.SHARED),
                                           **({} if p.default is REQUIRED else {"default": p.default}))
                             for p in method.params))

        def run(group, _m=method, **kw):
            scope = {p.name: p.scope for p in _m.params}
            entries = group.entries
            bi = next((i for i, e in enumerate(entries) if e.is_base), None)
            shared = {k: v for k, v in kw.items() if scope[k] not in (INPUT, NONBASE)}
            per_input = [{k: v[e.id] for k, v in kw.items()
                          if scope[k] == INPUT or (scope[k] == NONBASE and not e.is_base)} for e in entries]
            call = TensorCall(group.metadata.name or "", [e.tensor for e in entries], bi, shared, per_input, 0,
                              entries[bi if bi is not None else 0].tensor.dtype, {})
            return _m.fn(call)

        register(FunctionalGroupMergeMethod(spec, run))
    return names


class _Patched:
    """What :func:`patch` returns: ``with patch(): ...`` unpatches on exit; a plain ``patch()`` stays."""

    def __enter__(self) -> _Patched:
        return self

    def __exit__(self, *exc) -> None:
        unpatch()


def patch() -> _Patched:
    """Make mergekit's ``run_merge`` fastmerge's: ``mergekit.merge.run_merge`` and every loaded mergekit module
    that imported it by name (``mergekit.scripts.run_yaml`` ...). Idempotent."""
    with checkout_off_path():
        import mergekit.merge
        import mergekit.scripts.run_yaml  # noqa: F401 - mergekit-yaml's module binds run_merge by name
    if not _saved:
        original = mergekit.merge.run_merge
        for name, mod in list(sys.modules.items()):
            if (name == "mergekit" or name.startswith("mergekit.")) and getattr(mod, "run_merge", None) is original:
                _saved.append((mod, original))
                mod.run_merge = run_merge
    return _Patched()


def unpatch() -> None:
    """Give mergekit its own ``run_merge`` back."""
    while _saved:
        mod, original = _saved.pop()
        mod.run_merge = original


def main(argv: list[str] | None = None) -> int:
    """``python -m fastmerge.integrations.mergekit``: mergekit-yaml's command line (fastmerge-yaml's parser takes
    its every flag) on fastmerge's engine, without importing mergekit; flags or a config fastmerge cannot run go
    to mergekit-yaml itself, after one line saying why."""
    from ..cli import main as fastmerge_yaml

    argv = sys.argv[1:] if argv is None else list(argv)

    def stock(why: str) -> int:
        print(f"fastmerge: {why}: running mergekit's own executor", file=sys.stderr)
        with checkout_off_path():
            from mergekit.scripts.run_yaml import main as mergekit_yaml

            mergekit_yaml.main(args=argv, prog_name="mergekit-yaml", standalone_mode=False)
        return 0

    return fastmerge_yaml(argv, yaml_cli=True, fallback=stock)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as fastmerge's own command line: no teardown of torch
