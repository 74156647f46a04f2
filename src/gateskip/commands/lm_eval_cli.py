"""``gateskip-lm-eval``: lm-evaluation-harness's own command line, with the ``gateskip`` model registered.

lm-eval 0.4 finds a model only in its registry, which is filled by imports (no plugin entry point for
models), so its ``lm_eval --model gateskip`` cannot see a model defined in another package. This is the
same command line one import earlier; every lm-eval flag works as documented there::

    gateskip-lm-eval run --model gateskip \\
        --model_args pretrained=smollm2-135m,gates=artifacts/smollm2-healed,ratio=0.45,policy=threshold \\
        --tasks hellaswag --limit 100

From Python, ``import gateskip.eval.lm`` and then ``lm_eval.simple_evaluate(model="gateskip", ...)``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import gateskip.eval.lm  # noqa: F401  (registers the model name "gateskip" with lm-eval)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
