"""Evaluation on real benchmarks, offline: an lm-eval model with skipping, task configs, the sweep.

``evaluate`` (``gateskip eval``) is importable without lm-evaluation-harness and says how to install
it when called; ``gateskip.eval.lm`` (the registered lm-eval model ``gateskip``) needs it.
"""

from gateskip.eval.sweep import evaluate

__all__ = ["evaluate"]
